"""`normalize_email` answers exactly what `email_validator.validate_email` answers: its fast
path takes only addresses `validate_email` accepts, and normalizes them the same way."""

from __future__ import annotations

import pytest
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from clinicomm.providers.email_address import _SIMPLE, _fast, normalize_email


def reference(address: str) -> str | None:
    try:
        return validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


CASES = [
    "Patient@Example.COM",
    "a.b+c@sub.Example.co.uk",
    "x@xn--bcher-kva.ch",
    "a@b.c1",
    "a@123.com",
    "-a@b.com",
    "a..b@c.com",
    ".a@c.com",
    "a.@c.com",
    "a@-b.com",
    "a@b-.com",
    "a@b--c.com",
    "a@b.co",
    "a@test",
    "a@localhost",
    "a@b.local",
    "a@x.arpa",
    "a@b.invalid",
    "a@b.onion",
    "a@b.test",
    "a@testing.com",
    "a@b.c",
    "a@b.c-d",
    "ü@b.com",
    "a@bücher.ch",
    '"a b"@c.com',
    "a@[127.0.0.1]",
    "a" * 64 + "@b.com",
    "a" * 65 + "@b.com",
    "a@" + "b" * 63 + ".com",
    "a@" + "b" * 64 + ".com",
    "a@" + ".".join(["b" * 60] * 4) + ".com",
    "",
    "@",
    "a@",
    "@b.com",
    "a@b@c.com",
    " a@b.com",
    "a@b.com\n",
]


@pytest.mark.parametrize("address", CASES)
def test_same_answer_as_email_validator(address: str) -> None:
    expected = reference(address)
    fast = _fast(address)
    assert fast is None or fast == expected
    if expected is None:
        with pytest.raises(EmailNotValidError):
            normalize_email(address)
    else:
        assert normalize_email(address) == expected


def test_plain_addresses_take_the_fast_path() -> None:
    assert _fast("Patient.Name+tag@Mail.Example.ORG") == "Patient.Name+tag@mail.example.org"
    assert _fast("patient12345@example.com") == "patient12345@example.com"


# Mostly near-valid shapes (so the fast path is taken often), with the characters and
# names that make an address invalid or need validate_email's own handling mixed in.
_LOCAL = st.one_of(
    st.text(alphabet="aZ09._+-", min_size=0, max_size=70),
    st.text(alphabet="aZ09._+-!#'\" é", min_size=0, max_size=70),
)
_LABEL = st.one_of(
    st.text(alphabet="aZ09-", min_size=0, max_size=66),
    st.text(alphabet="aZ09-_é", min_size=0, max_size=66),
)
_TLD = st.one_of(
    st.text(alphabet="aZ", min_size=1, max_size=6),
    st.text(alphabet="aZ09-", min_size=0, max_size=6),
    st.sampled_from(SPECIAL_USE_DOMAIN_NAMES),
)


@settings(max_examples=1000, deadline=None)
@given(local=_LOCAL, labels=st.lists(_LABEL, min_size=0, max_size=5), tld=_TLD)
def test_generated_addresses(local: str, labels: list[str], tld: str) -> None:
    address = f"{local}@{'.'.join([*labels, tld])}"
    fast = _fast(address)
    if fast is not None:
        assert fast == reference(address), address


@settings(max_examples=500, deadline=None)
@given(address=st.from_regex(_SIMPLE, fullmatch=True))
def test_every_shape_the_fast_path_matches(address: str) -> None:
    """Strings of the fast path's own pattern: where it answers, validate_email agrees."""
    fast = _fast(address)
    if fast is not None:
        assert fast == reference(address), address
