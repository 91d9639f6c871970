"""Who may do what: roles, permissions, bearer JWTs, and the one clinic-scoping rule.

- Tokens are JWTs: HS256 with `CLINICOMM_JWT_SECRET`, or RS256/ES256 verified with
  `CLINICOMM_JWT_PUBLIC_KEY` (PEM). Claims: `sub`, `role`, `exp` (all required), `clinic_id`
  (required for the clinic-scoped roles), `clinic_ids` (optional list, `Service` only: any
  other role carrying it is refused with 401, so a claim can never widen a scope).
- A `Service` token's `clinic_id` and/or `clinic_ids` limit it to those clinics for sending,
  listing and reading; a `Service` token with neither is the platform's own (every clinic and
  the global providers).
- `CLINICOMM_JWT_AUDIENCE` / `CLINICOMM_JWT_ISSUER`, when set, must be the token's `aud` /
  `iss` (401 otherwise); `exp - iat` (or `exp - now` without `iat`) may not exceed
  `CLINICOMM_JWT_MAX_TTL_SECONDS` (one day).
- With neither configured, a development secret is generated into `data_dir/jwt.secret`
  (mode 0600) with a warning; `CLINICOMM_ENV=production` refuses that, like the master key.
- `Principal.allows(permission, clinic_id)` is the only place a permission is checked against
  a clinic; the API's dependencies (`api.deps.require`) and the later send endpoints call it.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import jwt

from clinicomm.config import Settings

log = logging.getLogger(__name__)


class Permission(StrEnum):
    """What a token may do to a clinic's communication."""

    VIEW = "clinic:communication:view"  #: read settings (masked), health, messages
    MANAGE = "clinic:communication:manage"  #: change settings, read the audit log
    TEST = "clinic:communication:test"  #: send a test message through the clinic's providers
    STATS = "clinic:communication:stats"  #: read delivery statistics
    DELETE = "clinic:communication:delete"  #: remove settings (fall back to global)
    SEND = "clinic:communication:send"  #: send messages


class Role(StrEnum):
    """Roles of the seed; the `role` claim must name one of them."""

    SUPER_ADMIN = "SuperAdmin"  #: every permission, every clinic
    CLINIC_ADMIN = "ClinicAdmin"  #: everything but platform operations, own clinic
    CLINIC_MANAGER = "ClinicManager"  #: view and stats, own clinic
    SERVICE = "Service"  #: send; its `clinic_id`/`clinic_ids`, or every clinic without them
    DOCTOR = "Doctor"  #: nothing here
    PATIENT = "Patient"  #: nothing here


ALL_PERMISSIONS = frozenset(Permission)

#: The role table of API.md.
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.SUPER_ADMIN: ALL_PERMISSIONS,
    Role.CLINIC_ADMIN: frozenset(
        {
            Permission.VIEW,
            Permission.MANAGE,
            Permission.TEST,
            Permission.STATS,
            Permission.DELETE,
            Permission.SEND,
        }
    ),
    Role.CLINIC_MANAGER: frozenset({Permission.VIEW, Permission.STATS}),
    Role.SERVICE: frozenset({Permission.SEND}),
    Role.DOCTOR: frozenset(),
    Role.PATIENT: frozenset(),
}

#: Roles bound to one clinic by the `clinic_id` claim (required for them).
CLINIC_SCOPED: frozenset[Role] = frozenset({Role.CLINIC_ADMIN, Role.CLINIC_MANAGER})

_ASYMMETRIC = ("RS256", "ES256")


class AuthError(Exception):
    """No token, or a token that is not valid (401). The message is safe to answer."""


class JwtConfigError(Exception):
    """The JWT secret or key is missing, malformed, or a dev secret is refused."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, from a verified token."""

    sub: str
    role: Role
    clinic_id: str | None = None
    #: For `Service`: the clinics it may act for (its `clinic_id` and `clinic_ids` claims);
    #: `None` means every clinic (the platform's own service). Always None for other roles.
    clinic_ids: frozenset[str] | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def permissions(self) -> frozenset[Permission]:
        return ROLE_PERMISSIONS[self.role]

    def allows(self, permission: Permission, clinic_id: str | None) -> bool:
        """Whether this caller holds `permission` for `clinic_id`.

        `clinic_id=None` asks for the permission platform-wide (every clinic, e.g. creating a
        clinic), which only a role unbound to any clinic holds.
        """
        if permission not in self.permissions:
            return False
        if self.role is Role.SUPER_ADMIN:
            return True
        if self.role in CLINIC_SCOPED:
            return clinic_id is not None and clinic_id == self.clinic_id
        if self.role is not Role.SERVICE:  # Doctor, Patient: hold nothing (checked above)
            return False
        if self.clinic_ids is not None:
            return clinic_id is not None and clinic_id in self.clinic_ids
        return True

    def scope(self, *permissions: Permission) -> frozenset[str] | None:
        """The clinics where this caller holds any of `permissions`: None for every clinic
        (and the global providers), else that set (empty: nowhere). The one place a listing
        derives its scope; it never widens what `allows` grants."""
        held = [p for p in permissions if p in self.permissions]
        if not held:
            return frozenset()
        if self.role is Role.SUPER_ADMIN:
            return None
        if self.role in CLINIC_SCOPED:
            return frozenset({self.clinic_id}) if self.clinic_id else frozenset()
        if self.role is Role.SERVICE:
            return self.clinic_ids
        return frozenset()


class TokenVerifier:
    """Verifies bearer tokens and issues them (for `clinicomm token` and tests)."""

    def __init__(
        self,
        secret: str | None,
        public_key: str | None,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        max_ttl: int = 86400,
    ) -> None:
        if not secret and not public_key:
            raise JwtConfigError("no JWT secret or public key configured")
        self.audience = audience or None
        self.issuer = issuer or None
        self.max_ttl = max_ttl
        self._secret = secret or None
        self._public_key = public_key or None
        self._verified: dict[str, tuple[Principal, float]] = {}
        if self._public_key:
            try:
                from cryptography.hazmat.primitives.serialization import load_pem_public_key

                load_pem_public_key(self._public_key.encode())
            except (ValueError, TypeError) as exc:
                raise JwtConfigError("CLINICOMM_JWT_PUBLIC_KEY is not a PEM public key") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """From `CLINICOMM_JWT_SECRET` / `CLINICOMM_JWT_PUBLIC_KEY`, or a generated dev secret."""
        limits: dict[str, Any] = {
            "audience": settings.jwt_audience,
            "issuer": settings.jwt_issuer,
            "max_ttl": settings.jwt_max_ttl_seconds,
        }
        if settings.jwt_secret or settings.jwt_public_key:
            return cls(settings.jwt_secret, settings.jwt_public_key, **limits)
        return cls(dev_secret(settings.data_dir, production=settings.production), None, **limits)

    @property
    def can_issue(self) -> bool:
        return self._secret is not None

    def issue(
        self,
        role: Role,
        *,
        sub: str = "cli",
        clinic_id: str | None = None,
        clinic_ids: list[str] | None = None,
        ttl: int = 3600,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A signed HS256 token carrying the configured `aud`/`iss`. Raises JwtConfigError
        without a shared secret."""
        if self._secret is None:
            raise JwtConfigError(
                "only CLINICOMM_JWT_PUBLIC_KEY is configured; tokens are issued by its private key"
            )
        now = int(time.time())
        claims: dict[str, Any] = {"sub": sub, "role": role.value, "iat": now, "exp": now + ttl}
        if clinic_id is not None:
            claims["clinic_id"] = clinic_id
        if clinic_ids is not None:
            claims["clinic_ids"] = clinic_ids
        if self.audience:
            claims["aud"] = self.audience
        if self.issuer:
            claims["iss"] = self.issuer
        claims.update(extra or {})
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str) -> Principal:
        """The principal of a valid token. Raises AuthError (bad, expired, wrong claims).

        A token whose signature was checked is remembered (bounded) until it expires, so a
        service sending many messages with one token pays for the check once.
        """
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires:
                return principal
            del self._verified[token]
        principal, expires = self._verify(token)
        if len(self._verified) >= 10_000:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("malformed token") from exc
        alg = header.get("alg")
        key: str | None
        if alg == "HS256":
            key = self._secret
        elif alg in _ASYMMETRIC:
            key = self._public_key
        else:
            key = None
        if key is None:
            raise AuthError("token algorithm not accepted")
        required = ["exp", "sub", "role"]
        if self.audience:
            required.append("aud")
        if self.issuer:
            required.append("iss")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                options={"require": required, "verify_aud": self.audience is not None},
                audience=self.audience,
                issuer=self.issuer,
                leeway=5,
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("token signature invalid") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"claim {exc.claim!r} is required") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError("token audience not accepted") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError("token issuer not accepted") from exc
        except jwt.PyJWTError as exc:
            raise AuthError("token invalid") from exc
        exp = claims["exp"]
        iat = claims.get("iat")
        start = iat if isinstance(iat, int | float) else time.time()
        if not isinstance(exp, int | float) or exp - start > self.max_ttl + 5:
            raise AuthError(f"token lifetime exceeds {self.max_ttl} seconds")
        return principal_from_claims(claims), float(exp) + 5


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """Check the claims' shape; raises AuthError naming the bad claim."""
    sub, role_name = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not sub or len(sub) > 200:
        raise AuthError("claim 'sub' must be a non-empty string")
    try:
        role = Role(str(role_name))
    except ValueError:
        raise AuthError("claim 'role' names no known role") from None
    clinic_id = claims.get("clinic_id")
    if clinic_id is not None and not isinstance(clinic_id, str):
        raise AuthError("claim 'clinic_id' must be a string")
    if role in CLINIC_SCOPED and not clinic_id:
        raise AuthError(f"claim 'clinic_id' is required for role {role.value}")
    raw_ids = claims.get("clinic_ids")
    clinic_ids: frozenset[str] | None = None
    if raw_ids is not None:
        if role is not Role.SERVICE:
            raise AuthError(
                f"claim 'clinic_ids' is accepted on Service tokens only, not {role.value}"
            )
        if not isinstance(raw_ids, list) or not all(isinstance(i, str) for i in raw_ids):
            raise AuthError("claim 'clinic_ids' must be a list of strings")
        clinic_ids = frozenset(raw_ids)
    if role is Role.SERVICE and clinic_id:
        clinic_ids = (clinic_ids or frozenset()) | {clinic_id}
    return Principal(sub, role, clinic_id, clinic_ids, claims)


def dev_secret(data_dir: Path, *, production: bool) -> str:
    """The development JWT secret in `data_dir/jwt.secret`, generated (0600) when absent."""
    if production:
        raise JwtConfigError(
            "CLINICOMM_JWT_SECRET (or CLINICOMM_JWT_PUBLIC_KEY) is not set; "
            "CLINICOMM_ENV=production refuses a dev secret"
        )
    path = data_dir / "jwt.secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race; read its secret
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48) + "\n")
    log.warning(
        "using a DEVELOPMENT JWT secret; set CLINICOMM_JWT_SECRET for real deployments",
        extra={"event": "dev_jwt_secret", "path": str(path)},
    )
    value = path.read_text().strip()
    if not value:
        raise JwtConfigError(f"{path} is empty; delete it to generate a new dev secret")
    return value
