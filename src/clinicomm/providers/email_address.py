"""Email addresses checked and normalized: `email_validator`'s answer, with a fast path.

`normalize_email(address)` is `email_validator.validate_email(address,
check_deliverability=False).normalized`, or raises its `EmailNotValidError`: same answers,
same errors. `validate_email` costs ~30 µs an address (its IDNA and Unicode checks run per
character), about a tenth of a message's accept on the bench. Most addresses are plain ASCII
of one simple shape (`local@label.label.tld`); for those the answer is computed here: the
local part as given, the domain in lower case. Everything else (quoted or unusual local parts,
any non-ASCII, punycode labels, special-use domains, lengths near the limits) goes to
`validate_email`. The fast path accepts nothing that `validate_email` refuses and answers
exactly what it answers (tests/providers/test_email_address.py compares them).
"""

from __future__ import annotations

import re

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

__all__ = ["EmailNotValidError", "normalize_email"]

# A dot-atom local part of letters, digits and `_ + -` only; domain labels of letters, digits
# and inner hyphens (never `--`: `xn--` labels are punycode, which validate_email decodes);
# a top-level label of letters only. Lengths are checked after the match.
_SIMPLE = re.compile(
    r"(?P<local>[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*)"
    r"@(?P<domain>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})"
)
_SPECIAL = tuple(SPECIAL_USE_DOMAIN_NAMES)


def _fast(address: str) -> str | None:
    """The normalized form of a plain address, or None to ask `validate_email`."""
    if len(address) > 200 or not address.isascii():
        return None
    match = _SIMPLE.fullmatch(address)
    if match is None:
        return None
    local, domain = match.group("local"), match.group("domain").lower()
    if len(local) > 64 or "--" in domain:
        return None
    for special in _SPECIAL:
        if domain == special or domain.endswith("." + special):
            return None
    return f"{local}@{domain}"


def normalize_email(address: str) -> str:
    """`validate_email(address, check_deliverability=False).normalized` (module docstring);
    raises `EmailNotValidError` with its message for an invalid address."""
    fast = _fast(address)
    if fast is not None:
        return fast
    return validate_email(address, check_deliverability=False).normalized
