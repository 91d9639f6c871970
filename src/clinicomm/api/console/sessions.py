"""Console sign-in: one-time links, server-side sessions, CSRF tokens.

- A *link token* is a JWT signed like any bearer token (`TokenVerifier`), with `use:
  "console"`, a `jti` and at most `LINK_MAX_TTL` seconds of life (`clinicomm console-link`, or
  the platform issues the same). It is exchanged once: the session row's `link_jti` is unique.
- The session cookie holds a random token; the row is keyed by its SHA-256. A session ends at
  sign-out (server side), after `idle_seconds` without a request, or at `expires_at`.
- Each session has a CSRF token that every state-changing request must send back
  (`check_csrf`); the cookie is also `SameSite=Strict`.
- The principal is rebuilt from the stored claims with `auth.principal_from_claims`, so the
  console's permissions are exactly the API's (`Principal.allows`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from clinicomm.api.auth import (
    CLINIC_SCOPED,
    AuthError,
    Principal,
    Role,
    TokenVerifier,
    principal_from_claims,
)
from clinicomm.store.db import Database
from clinicomm.store.models import ConsoleSession, aware, utcnow

COOKIE = "clinicomm_console"
#: The longest a sign-in link may live.
LINK_MAX_TTL = 900
#: Defaults: idle timeout and absolute lifetime of a session.
IDLE_SECONDS = 900
MAX_SECONDS = 8 * 3600
#: Activity is written back at most this often (not on every page view).
_TOUCH_EVERY = 30
_CLAIMS = ("sub", "role", "clinic_id", "clinic_ids")


class SignInError(Exception):
    """The link is not valid, expired, or was used already. The message is safe to show."""


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """A signed-in session: who, and the CSRF token their forms carry."""

    session_id: str
    principal: Principal
    csrf: str


def issue_link_token(
    verifier: TokenVerifier,
    role: Role,
    *,
    clinic_id: str | None = None,
    sub: str = "console",
    ttl: int = 300,
) -> str:
    """A one-time console sign-in token (raises JwtConfigError without a shared secret)."""
    if not 1 <= ttl <= LINK_MAX_TTL:
        raise ValueError(f"a console link lives 1 to {LINK_MAX_TTL} seconds")
    if role in CLINIC_SCOPED and not clinic_id:
        raise ValueError(f"role {role.value} needs a clinic")
    extra = {"use": "console", "jti": uuid.uuid4().hex}
    return verifier.issue(role, sub=sub, clinic_id=clinic_id, ttl=ttl, extra=extra)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    """Console sessions in the database (shared by every API process)."""

    def __init__(
        self, db: Database, *, idle_seconds: int = IDLE_SECONDS, max_seconds: int = MAX_SECONDS
    ) -> None:
        self._db = db
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds

    async def sign_in(self, verifier: TokenVerifier, link_token: str) -> tuple[str, ConsoleUser]:
        """Exchange a link token for (cookie token, user). Raises SignInError."""
        try:
            principal = verifier.verify(link_token.strip())
        except AuthError as exc:
            raise SignInError(f"the sign-in link is not valid: {exc}") from None
        claims = principal.claims
        jti = claims.get("jti")
        if claims.get("use") != "console" or not isinstance(jti, str) or not jti:
            raise SignInError("this token is not a console sign-in link")
        issued, expires = claims.get("iat"), claims.get("exp")
        if (
            isinstance(issued, int | float)
            and isinstance(expires, int | float)
            and expires - issued > LINK_MAX_TTL
        ):
            raise SignInError("a console sign-in link may live at most 15 minutes")
        if len(jti) > 128:
            raise SignInError("the sign-in link is not valid")
        token = secrets.token_urlsafe(32)
        now = utcnow()
        row = ConsoleSession(
            id=_digest(token),
            link_jti=jti,
            claims={k: claims[k] for k in _CLAIMS if k in claims},
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(seconds=self.max_seconds),
        )
        try:
            async with self._db.session() as session:
                session.add(row)
        except IntegrityError:
            raise SignInError("this sign-in link was used already; ask for a new one") from None
        return token, ConsoleUser(row.id, principal_from_claims(row.claims), row.csrf)

    async def lookup(self, token: str | None) -> ConsoleUser | None:
        """The user of a live session cookie, or None (absent, unknown, ended, idle, expired)."""
        if not token or len(token) > 100:
            return None
        sid = _digest(token)
        async with self._db.read() as session:
            row = await session.scalar(select(ConsoleSession).where(ConsoleSession.id == sid))
        if row is None or row.ended_at is not None:
            return None
        now = utcnow()
        idle = now - aware(row.last_seen_at)
        if aware(row.expires_at) <= now or idle > timedelta(seconds=self.idle_seconds):
            await self.end(sid)
            return None
        if idle > timedelta(seconds=_TOUCH_EVERY):
            async with self._db.session() as session:
                await session.execute(
                    update(ConsoleSession).where(ConsoleSession.id == sid).values(last_seen_at=now)
                )
        try:
            principal = principal_from_claims(dict(row.claims))
        except AuthError:
            return None
        return ConsoleUser(sid, principal, row.csrf)

    async def end(self, session_id: str) -> None:
        """Sign out: the session is refused from now on, by every process."""
        async with self._db.session() as session:
            await session.execute(
                update(ConsoleSession)
                .where(ConsoleSession.id == session_id, ConsoleSession.ended_at.is_(None))
                .values(ended_at=utcnow())
            )


def check_csrf(user: ConsoleUser, sent: Any) -> bool:
    """Whether a form's `csrf` field is this session's token (constant-time)."""
    return isinstance(sent, str) and hmac.compare_digest(sent.encode(), user.csrf.encode())
