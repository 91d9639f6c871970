"""The bytes of an email as the SMTP adapter sends them, written directly.

`render` gives exactly what the standard library's compat32 classes give for the same message
(`MIMEText` parts in `utf-8` with quoted-printable bodies, a `multipart/alternative` when both
text and HTML are present, then `Message.as_bytes()`), at a fraction of the cost: building the
`email.mime` objects and running the generator took ~330 µs per message (bench/smtp_pool.py,
the SMTP path's largest share of CPU), this ~10 µs for a short one. Each header line still goes
through compat32's folding (RFC 2047 encoded-words, lines of at most 78 characters) unless it is
ASCII and already short, and each body through `email.quoprimime`, so the output is the same
7-bit message byte for byte (tests/providers/email/test_mime.py compares the two).

Lines end with `\\n`, as `as_bytes()` writes them; the SMTP session (`smtp_session.Session`)
turns them into CRLF and dot-stuffs the data.
"""

from __future__ import annotations

import random
import re
import sys
from email import quoprimime
from email.header import Header
from email.policy import compat32

#: compat32's folding width: a header line up to this long is written as it is.
_MAX_LINE = 78
#: Printable ASCII words separated by single spaces: a value compat32's folding leaves as it is
#: (it rewrites runs and ends of whitespace, and control characters).
_PLAIN = re.compile(r"[!-~]+(?: [!-~]+)*")
_NEWLINES = re.compile(r"\r\n|\r|\n")
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))


def _text_headers(subtype: str) -> bytes:
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\n'
        "MIME-Version: 1.0\n"
        "Content-Transfer-Encoding: quoted-printable\n"
    ).encode()


_PLAIN_TEXT, _HTML = _text_headers("plain"), _text_headers("html")


def header_line(name: str, value: str | Header) -> bytes:
    """`name: value` and its line end, folded and encoded as compat32's generator writes it."""
    if (
        isinstance(value, str)
        and len(name) + len(value) + 2 <= _MAX_LINE
        and _PLAIN.fullmatch(value) is not None
    ):
        return f"{name}: {value}\n".encode()
    # typeshed says str; compat32 folds a Header too (it is what `msg[name] = Header(...)` stores).
    return compat32.fold_binary(name, value)  # type: ignore[arg-type]


def _body(text: str) -> bytes:
    """A `MIMEText(text, _, utf-8 with quoted-printable)` part's body as the generator writes it."""
    encoded = quoprimime.body_encode(text.encode("utf-8").decode("latin-1"))
    return _NEWLINES.sub("\n", encoded).encode("ascii")


def render(
    *,
    sender: str,
    to: str,
    subject: str | Header,
    date: str,
    message_id: str,
    text: str | None,
    html: str | None,
    boundary: str | None = None,
) -> bytes:
    """The message: text, HTML, or multipart/alternative with both (text first). Header values
    are as the caller would set them on an `email.message.Message`; at least one body must be
    non-empty. `boundary`: the multipart boundary (default: a random one absent from the parts,
    of the generator's form)."""
    if not (text or html):
        raise ValueError("a message needs text or HTML")
    headers = (
        header_line("From", sender)
        + header_line("To", to)
        + header_line("Subject", subject)
        + header_line("Date", date)
        + header_line("Message-ID", message_id)
    )
    if text and html:
        plain = _PLAIN_TEXT + b"\n" + _body(text)
        rich = _HTML + b"\n" + _body(html)
        boundary = boundary or _boundary(plain + b"\n" + rich)
        content_type = header_line("Content-Type", f'multipart/alternative; boundary="{boundary}"')
        marker = f"--{boundary}".encode()
        return (
            content_type
            + b"MIME-Version: 1.0\n"
            + headers
            + b"\n"
            + marker
            + b"\n"
            + plain
            + b"\n"
            + marker
            + b"\n"
            + rich
            + b"\n"
            + marker
            + b"--\n"
        )
    if text:
        return _PLAIN_TEXT + headers + b"\n" + _body(text)
    return _HTML + headers + b"\n" + _body(html or "")


def _boundary(parts: bytes) -> str:
    """A boundary of the generator's form (`===…<digits>==`) that no line of `parts` holds."""
    while True:
        boundary = "=" * 15 + f"{random.randrange(sys.maxsize):0{_BOUNDARY_DIGITS}d}" + "=="
        if boundary.encode() not in parts:
            return boundary
