"""FastAPI dependencies: the runtime, the caller, and permission checks in one place.

Routes declare what they need as `principal: Principal = Depends(require(Permission.VIEW))`.
`require` authenticates (401) and then asks `Principal.allows` for the clinic named by the
path's `clinicId` (403); `require(…, platform=True)` asks for the permission on every clinic
(creating a clinic). Routes whose clinic is in the body (sending) take `authenticated` and
call `authorize(principal, permission, clinic_id)` themselves, so the rule stays the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from clinicomm.api.auth import AuthError, Permission, Principal, TokenVerifier
from clinicomm.api.errors import ApiError, forbidden, unauthorized
from clinicomm.runtime import Runtime
from clinicomm.telemetry.logging import bind_context

_bearer = HTTPBearer(auto_error=False, description="A JWT: `clinicomm token --role …`")


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread
# pool, which costs more than the work they do.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def authenticated(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Principal:
    """The caller of a valid bearer token; 401 (with `WWW-Authenticate: Bearer`) otherwise."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise unauthorized("a bearer token is required")
    try:
        return _authenticate(request, credentials.credentials)
    except AuthError as exc:
        raise unauthorized(str(exc)) from None


def bearer_principal(request: Request) -> Principal | None:
    """The caller of a valid bearer token, as `authenticated` answers it, or None (no token,
    or one that is not valid: let `authenticated` answer the 401). For lean routes
    (`api.lean`)."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        return _authenticate(request, token)
    except AuthError:
        return None


def _authenticate(request: Request, token: str) -> Principal:
    """Verify `token` (AuthError if not valid) and bind its caller to the request."""
    verifier: TokenVerifier = request.app.state.verifier
    principal = verifier.verify(token)
    bind_context(sub=principal.sub, role=principal.role.value)
    request.state.principal = principal
    return principal


def authorize(principal: Principal, permission: Permission, clinic_id: str | None) -> None:
    """Raise 403 unless `principal` holds `permission` for `clinic_id` (None: every clinic)."""
    if not principal.allows(permission, clinic_id):
        scope = f"clinic {clinic_id!r}" if clinic_id is not None else "every clinic"
        raise forbidden(f"role {principal.role.value} lacks {permission.value} for {scope}")


def require(
    permission: Permission, *, platform: bool = False
) -> Callable[..., Awaitable[Principal]]:
    """A dependency answering the caller if it holds `permission` for the path's clinic."""

    async def dependency(
        request: Request, principal: Principal = Depends(authenticated)
    ) -> Principal:
        clinic_id = None if platform else request.path_params.get("clinicId")
        if not platform and clinic_id is None:  # a route bug, not the caller's
            raise RuntimeError("require() on a route without {clinicId}; use platform=True")
        if clinic_id is not None:
            bind_context(clinicId=clinic_id)
        authorize(principal, permission, clinic_id)
        return principal

    dependency.__name__ = f"require_{permission.name.lower()}"
    return dependency


async def if_match(request: Request) -> int | None:
    """The version named by `If-Match` (`"3"`, `W/"3"` or `3`); None when absent or `*`.

    A value that names no version can never match the current one: 412.
    """
    raw = request.headers.get("if-match")
    if raw is None or raw.strip() == "*":
        return None
    value = raw.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    if not value.isdigit() or len(value) > 12:
        raise ApiError(412, "version_conflict", "If-Match does not name a version of this clinic")
    return int(value)
