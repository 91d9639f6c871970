"""Tokens and the permission rule: claims, algorithms, Service scoping, dev secret, CLI."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from typer.testing import CliRunner

from clinicomm.api.auth import (
    AuthError,
    JwtConfigError,
    Permission,
    Principal,
    Role,
    TokenVerifier,
    dev_secret,
)
from clinicomm.cli import app as cli
from tests.api.conftest import Api, create_clinic

SECRET = "unit-secret-" + "z" * 32


def _claims(**over: object) -> dict[str, object]:
    return {"sub": "u", "role": "SuperAdmin", "exp": int(time.time()) + 60, **over}


def test_service_scoping_and_platform_scope() -> None:
    anyone = Principal("svc", Role.SERVICE)
    assert anyone.allows(Permission.SEND, "clinic-a") and anyone.allows(Permission.SEND, None)
    assert not anyone.allows(Permission.VIEW, "clinic-a")
    scoped = Principal("svc", Role.SERVICE, clinic_ids=frozenset({"clinic-a"}))
    assert scoped.allows(Permission.SEND, "clinic-a")
    assert not scoped.allows(Permission.SEND, "clinic-b")
    assert not scoped.allows(Permission.SEND, None)
    admin = Principal("a", Role.CLINIC_ADMIN, clinic_id="clinic-a")
    assert admin.allows(Permission.TEST, "clinic-a") and admin.allows(Permission.SEND, "clinic-a")
    assert not admin.allows(Permission.MANAGE, None)
    manager = Principal("m", Role.CLINIC_MANAGER, clinic_id="clinic-a")
    assert manager.allows(Permission.STATS, "clinic-a")
    assert not manager.allows(Permission.MANAGE, "clinic-a")
    for role in (Role.DOCTOR, Role.PATIENT):
        assert not any(Principal("d", role, "clinic-a").allows(p, "clinic-a") for p in Permission)


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"role": "Janitor"}, "role"),
        ({"role": "ClinicAdmin"}, "clinic_id"),
        ({"sub": ""}, "sub"),
        ({"clinic_ids": "clinic-a"}, "clinic_ids"),
    ],
)
def test_bad_claims(claims: dict[str, object], message: str) -> None:
    verifier = TokenVerifier(SECRET, None)
    with pytest.raises(AuthError, match=message):
        verifier.verify(jwt.encode(_claims(**claims), SECRET, algorithm="HS256"))


def test_exp_required_and_alg_none_refused() -> None:
    verifier = TokenVerifier(SECRET, None)
    no_exp = {"sub": "u", "role": "SuperAdmin"}
    with pytest.raises(AuthError):
        verifier.verify(jwt.encode(no_exp, SECRET, algorithm="HS256"))
    unsigned = jwt.encode(_claims(), None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(AuthError):
        verifier.verify(unsigned)
    with pytest.raises(AuthError):
        verifier.verify("not.a.jwt")


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
def test_public_key_tokens(kind: str) -> None:
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    verifier = TokenVerifier(None, pem)
    token = jwt.encode(_claims(role="ClinicManager", clinic_id="c1"), private, algorithm=kind)
    principal = verifier.verify(token)
    assert principal.role is Role.CLINIC_MANAGER and principal.clinic_id == "c1"
    # Algorithm confusion: an HS256 token "signed" with the public key is refused.
    with pytest.raises(AuthError):
        verifier.verify(jwt.encode(_claims(), SECRET, algorithm="HS256"))
    with pytest.raises(JwtConfigError):
        verifier.issue(Role.SUPER_ADMIN)
    with pytest.raises(JwtConfigError):
        TokenVerifier(None, "not a pem")


def test_dev_secret(tmp_path: Path) -> None:
    first = dev_secret(tmp_path / "d", production=False)
    assert first == dev_secret(tmp_path / "d", production=False)
    assert (os.stat(tmp_path / "d" / "jwt.secret").st_mode & 0o777) == 0o600
    with pytest.raises(JwtConfigError, match="production"):
        dev_secret(tmp_path / "e", production=True)


def test_cli_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINICOMM_JWT_SECRET", SECRET)
    monkeypatch.setenv("CLINICOMM_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(cli, ["token", "--role", "ClinicAdmin", "--clinic", "c1", "--ttl", "60", "--sub", "ops"])
    assert result.exit_code == 0, result.output
    principal = TokenVerifier(SECRET, None).verify(result.output.strip())
    assert (principal.sub, principal.role, principal.clinic_id) == ("ops", Role.CLINIC_ADMIN, "c1")
    assert principal.claims["exp"] - time.time() <= 60
    bad = runner.invoke(cli, ["token", "--role", "Janitor"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    missing = runner.invoke(cli, ["token", "--role", "ClinicAdmin"])
    assert missing.exit_code == 2


async def test_wrong_scheme_and_garbage_tokens_are_401(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer x.y.z", "Token abc"):
        answer = await api.client.get("/api/v1/clinics/clinic-a", headers={"Authorization": header})
        assert answer.status_code == 401, header
        assert answer.headers["www-authenticate"] == "Bearer"


async def test_service_token_cannot_read_settings(api: Api) -> None:
    await create_clinic(api, "clinic-a")
    token = api.verifier.issue(Role.SERVICE, sub="billing", clinic_ids=["clinic-a"])
    answer = await api.client.get(
        "/api/v1/clinics/clinic-a", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 403


# ---- issue 13: audience, issuer, lifetime; clinic_ids only on Service ----------------------


def test_clinic_ids_only_on_service_tokens() -> None:
    verifier = TokenVerifier(SECRET, None)
    for role, extra in (
        ("Doctor", {}),
        ("Patient", {}),
        ("ClinicAdmin", {"clinic_id": "clinic-a"}),
        ("ClinicManager", {"clinic_id": "clinic-a"}),
        ("SuperAdmin", {}),
    ):
        token = jwt.encode(_claims(role=role, clinic_ids=["clinic-b"], **extra), SECRET, algorithm="HS256")
        with pytest.raises(AuthError, match="clinic_ids"):
            verifier.verify(token)
    # A Service token's clinic_id binds it (it did not: `--clinic clinic-a` could act for b).
    bound = verifier.verify(jwt.encode(_claims(role="Service", clinic_id="clinic-a"), SECRET, algorithm="HS256"))
    assert bound.allows(Permission.SEND, "clinic-a") and not bound.allows(Permission.SEND, "clinic-b")
    assert not bound.allows(Permission.SEND, None)
    assert bound.scope(Permission.SEND) == frozenset({"clinic-a"})
    both = verifier.verify(
        jwt.encode(_claims(role="Service", clinic_id="a", clinic_ids=["b"]), SECRET, algorithm="HS256")
    )
    assert both.scope(Permission.SEND) == frozenset({"a", "b"})
    platform = verifier.verify(jwt.encode(_claims(role="Service"), SECRET, algorithm="HS256"))
    assert platform.scope(Permission.SEND) is None  # the platform's own service
    assert Principal("d", Role.DOCTOR).scope(Permission.SEND, Permission.VIEW) == frozenset()


def test_audience_issuer_and_lifetime() -> None:
    strict = TokenVerifier(SECRET, None, audience="clinicomm", issuer="https://idp.example", max_ttl=3600)
    ok = strict.issue(Role.SUPER_ADMIN, ttl=600)  # issue() writes aud and iss
    claims = jwt.decode(ok, SECRET, algorithms=["HS256"], audience="clinicomm")
    assert claims["aud"] == "clinicomm" and claims["iss"] == "https://idp.example"
    assert strict.verify(ok).role is Role.SUPER_ADMIN
    now = int(time.time())
    cases = {
        "missing aud": {"iss": "https://idp.example"},
        "foreign aud": {"aud": "another-service", "iss": "https://idp.example"},
        "missing iss": {"aud": "clinicomm"},
        "foreign iss": {"aud": "clinicomm", "iss": "https://evil.example"},
        "too long": {"aud": "clinicomm", "iss": "https://idp.example", "iat": now, "exp": now + 7200},
    }
    for name, extra in cases.items():
        token = jwt.encode(_claims(**extra), SECRET, algorithm="HS256")
        with pytest.raises(AuthError):
            strict.verify(token)
        assert name
    # Without iat the lifetime counts from now.
    with pytest.raises(AuthError, match="lifetime"):
        strict.verify(
            jwt.encode(
                {"sub": "u", "role": "SuperAdmin", "exp": now + 7200, "aud": "clinicomm", "iss": "https://idp.example"},
                SECRET,
                algorithm="HS256",
            )
        )
    # Not configured: a foreign aud is not checked; the default lifetime limit is one day.
    loose = TokenVerifier(SECRET, None)
    loose.verify(jwt.encode(_claims(aud="anything"), SECRET, algorithm="HS256"))
    with pytest.raises(AuthError, match="lifetime"):
        loose.verify(jwt.encode(_claims(iat=now, exp=now + 2 * 86400), SECRET, algorithm="HS256"))


def test_cli_token_writes_audience_and_issuer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINICOMM_JWT_SECRET", SECRET)
    monkeypatch.setenv("CLINICOMM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CLINICOMM_JWT_AUDIENCE", "clinicomm-api")
    monkeypatch.setenv("CLINICOMM_JWT_ISSUER", "clinicomm-cli")
    result = CliRunner().invoke(cli, ["token", "--role", "Service", "--clinic", "clinic-a"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="clinicomm-api")
    assert (claims["aud"], claims["iss"]) == ("clinicomm-api", "clinicomm-cli")
    strict = TokenVerifier(SECRET, None, audience="clinicomm-api", issuer="clinicomm-cli")
    assert strict.verify(token).scope(Permission.SEND) == frozenset({"clinic-a"})
