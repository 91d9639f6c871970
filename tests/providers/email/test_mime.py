"""`providers.email.mime.render` writes the same bytes as the standard library's compat32
classes and generator (what the SMTP adapter used before), for any subject, name and body."""

from __future__ import annotations

from email import message_from_bytes
from email.charset import BASE64, QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinicomm.providers.email.mime import header_line, render

_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_UTF8_QP.header_encoding = BASE64
DATE = "Thu, 03 Dec 2026 12:52:27 GMT"
MESSAGE_ID = "<179630234792.6892.13987381191970628075@clinic-a.example>"
BOUNDARY = "===============6098433853125357540=="


def reference(sender: str, to: str, subject: str, text: str | None, html: str | None) -> bytes:
    """The message as `email.mime` and `Message.as_bytes()` write it."""
    mime: Message
    if text and html:
        mime = MIMEMultipart("alternative")
        mime.attach(MIMEText(text, "plain", _UTF8_QP))  # type: ignore[arg-type]
        mime.attach(MIMEText(html, "html", _UTF8_QP))  # type: ignore[arg-type]
        mime.set_boundary(BOUNDARY)
    elif text:
        mime = MIMEText(text, "plain", _UTF8_QP)  # type: ignore[arg-type]
    else:
        mime = MIMEText(html or "", "html", _UTF8_QP)  # type: ignore[arg-type]
    mime["From"] = sender
    mime["To"] = to
    mime["Subject"] = subject if subject.isascii() else Header(subject, "utf-8")  # type: ignore[assignment]
    mime["Date"] = DATE
    mime["Message-ID"] = MESSAGE_ID
    return mime.as_bytes()


def ours(sender: str, to: str, subject: str, text: str | None, html: str | None) -> bytes:
    return render(
        sender=sender,
        to=to,
        subject=subject if subject.isascii() else Header(subject, "utf-8"),
        date=DATE,
        message_id=MESSAGE_ID,
        text=text,
        html=html,
        boundary=BOUNDARY,
    )


# One line (subjects and names are SingleLine in the API), any characters otherwise.
one_line = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs",),
        blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
    ),
    max_size=200,
)
bodies = st.one_of(
    st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400)
)


@pytest.mark.parametrize(
    ("subject", "text", "html"),
    [
        ("Appointment confirmed", "Your appointment is at 10:30.", None),
        ("Terminbestätigung für Müller", "Ihr Termin ist um 10:30.\nBis bald!", None),
        ("  spaced   out  ", None, "<p>Hello</p>"),
        ("A" * 120, "x" * 300 + "\r\nline two\rline three", "<p>" + "é" * 200 + "</p>"),
        ("tab\there", "trailing spaces   \nand = signs", "<b>=3D</b>"),
        ("", "only text", None),
        ("予約の確認", "明日 10:30 にご予約があります。", "<p>明日</p>"),
    ],
)
def test_same_bytes_as_the_standard_library(
    subject: str, text: str | None, html: str | None
) -> None:
    sender = formataddr(("Clinic A", "clinic@clinic-a.example"))
    assert ours(sender, "patient@example.com", subject, text, html) == reference(
        sender, "patient@example.com", subject, text, html
    )


@settings(max_examples=300, deadline=None)
@given(name=one_line, subject=one_line, text=bodies, html=bodies)
def test_same_bytes_for_any_name_subject_and_body(
    name: str, subject: str, text: str | None, html: str | None
) -> None:
    if not (text or html):
        return
    sender = formataddr((name, "clinic@clinic-a.example")) if name else "clinic@clinic-a.example"
    assert ours(sender, "patient@example.com", subject, text, html) == reference(
        sender, "patient@example.com", subject, text, html
    )


def test_the_message_parses_back() -> None:
    data = render(
        sender="Clinic A <clinic@clinic-a.example>",
        to="patient@example.com",
        subject=Header("Terminbestätigung", "utf-8"),
        date=DATE,
        message_id=MESSAGE_ID,
        text="Grüße",
        html="<p>Grüße</p>",
    )
    parsed = message_from_bytes(data)
    assert parsed.get_content_type() == "multipart/alternative"
    plain, rich = parsed.get_payload()  # type: ignore[misc]
    assert plain.get_payload(decode=True).decode() == "Grüße"
    assert rich.get_payload(decode=True).decode() == "<p>Grüße</p>"
    assert str(parsed["Message-ID"]) == MESSAGE_ID
    assert all(byte < 128 for byte in data)


def test_long_and_irregular_header_values_are_folded_like_the_generator() -> None:
    for value in ("x " * 60, "a  b", " lead", "trail ", "tab\tin", "ümlaut"):
        message = Message()
        message["Subject"] = value
        assert header_line("Subject", value) == message.as_bytes().split(b"\n\n")[0] + b"\n"


def test_a_message_without_a_body_is_refused() -> None:
    with pytest.raises(ValueError, match="text or HTML"):
        render(
            sender="a@b.example",
            to="c@d.example",
            subject="s",
            date=DATE,
            message_id=MESSAGE_ID,
            text="",
            html=None,
        )
