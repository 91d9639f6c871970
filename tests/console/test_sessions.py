"""Console sign-in and sessions against the real database (both legs), and the provider
forms generated from the credentials models' JSON schema."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from clinicomm.api.auth import Role, TokenVerifier
from clinicomm.api.console.forms import SECRET, credentials_from_form, provider_fields
from clinicomm.api.console.sessions import SessionStore, SignInError, check_csrf, issue_link_token
from clinicomm.providers.base import MASK, Channel
from clinicomm.runtime import Runtime
from clinicomm.store.models import ConsoleSession, utcnow

VERIFIER = TokenVerifier("console-unit-secret-" + "z" * 32, None)


async def test_a_link_opens_one_session_once(runtime: Runtime) -> None:
    sessions = SessionStore(runtime.db)
    link = issue_link_token(VERIFIER, Role.CLINIC_ADMIN, clinic_id="clinic-a", sub="amy")
    cookie, user = await sessions.sign_in(VERIFIER, link)
    assert user.principal.role is Role.CLINIC_ADMIN and user.principal.clinic_id == "clinic-a"
    found = await sessions.lookup(cookie)
    assert found is not None and found.principal.sub == "amy"
    with pytest.raises(SignInError, match="used already"):
        await sessions.sign_in(VERIFIER, link)


async def test_only_short_lived_console_links_are_accepted(runtime: Runtime) -> None:
    sessions = SessionStore(runtime.db)
    bearer = VERIFIER.issue(Role.SUPER_ADMIN)  # an API token is not a sign-in link
    with pytest.raises(SignInError, match="not a console sign-in link"):
        await sessions.sign_in(VERIFIER, bearer)
    long = VERIFIER.issue(Role.SUPER_ADMIN, ttl=3600, extra={"use": "console", "jti": "j1"})
    with pytest.raises(SignInError, match="at most 15 minutes"):
        await sessions.sign_in(VERIFIER, long)
    other = TokenVerifier("another-secret-" + "q" * 32, None)
    with pytest.raises(SignInError, match="not valid"):
        await sessions.sign_in(VERIFIER, issue_link_token(other, Role.SUPER_ADMIN))
    with pytest.raises(ValueError, match="needs a clinic"):
        issue_link_token(VERIFIER, Role.CLINIC_MANAGER)


async def test_sign_out_and_idle_timeout_end_the_session(runtime: Runtime) -> None:
    sessions = SessionStore(runtime.db, idle_seconds=60)
    cookie, user = await sessions.sign_in(VERIFIER, issue_link_token(VERIFIER, Role.SUPER_ADMIN))
    await sessions.end(user.session_id)
    assert await sessions.lookup(cookie) is None
    cookie, user = await sessions.sign_in(VERIFIER, issue_link_token(VERIFIER, Role.SUPER_ADMIN))
    async with runtime.db.session() as session:  # as if the last request was 61 s ago
        await session.execute(
            update(ConsoleSession)
            .where(ConsoleSession.id == user.session_id)
            .values(last_seen_at=utcnow() - timedelta(seconds=61))
        )
    assert await sessions.lookup(cookie) is None
    assert await sessions.lookup("not-a-session") is None
    assert await sessions.lookup(None) is None


async def test_csrf_token_must_match(runtime: Runtime) -> None:
    sessions = SessionStore(runtime.db)
    _, user = await sessions.sign_in(VERIFIER, issue_link_token(VERIFIER, Role.SUPER_ADMIN))
    assert check_csrf(user, user.csrf)
    assert not check_csrf(user, None) and not check_csrf(user, user.csrf + "x")


def test_provider_form_comes_from_the_credentials_schema() -> None:
    fields = {f.name: f for f in provider_fields(Channel.EMAIL, "sendgrid", {"apiKey": MASK})}
    assert fields["apiKey"].kind == SECRET and fields["apiKey"].is_set
    assert fields["apiKey"].value == ""  # a secret's value never reaches the page
    assert list(fields)[-1] == "expiresAt"
    smtp = {f.name: f for f in provider_fields(Channel.EMAIL, "smtp", None)}
    assert smtp["host"].required and smtp["password"].kind == SECRET
    assert smtp["requireTls"].kind == "checkbox" and smtp["requireTls"].checked
    assert smtp["requireTls"].label == "Require TLS"


def test_posted_form_keeps_unreplaced_secrets_as_the_mask() -> None:
    form = {"cred.apiKey": "", "isset.apiKey": "1", "cred.fromEmail": " a@b.example "}
    creds = credentials_from_form(Channel.EMAIL, "sendgrid", form, prefix="p")
    assert creds == {"apiKey": MASK, "fromEmail": "a@b.example"}
    form["clear.apiKey"] = "on"
    assert "apiKey" not in credentials_from_form(Channel.EMAIL, "sendgrid", form, prefix="p")
    form["cred.apiKey"] = "SG.new"
    assert credentials_from_form(Channel.EMAIL, "sendgrid", form, prefix="p")["apiKey"] == "SG.new"
