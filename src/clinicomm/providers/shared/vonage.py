"""Vonage Messages API v1, shared by the WhatsApp and SMS adapters.

`POST {baseUrl}/v1/messages` with JSON `{message_type, channel, to, from, …}`, answered `202
{"message_uuid"}` (https://developer.vonage.com/en/api/messages). Numbers go without `+`
("Don't use a leading + or 00", spec `ToNumber`). Authentication is a JWT (RS256, signed with
the application's private key) when `applicationId` and `privateKey` are set, else HTTP Basic
with `apiKey:apiSecret`; the JWT is cached and renewed a minute before it expires.

Errors are RFC 7807 bodies `{"type", "title", "detail", "instance"}`; the `type` link's
fragment and the `title` tell a bad recipient from a bad request (spec `ErrorRecipient`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from clinicomm.providers.base import OutboundMessage, SendResult
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RecipientError,
    TransientError,
)
from clinicomm.providers.phone import digits
from clinicomm.providers.shared.credentials import VonageCredentials
from clinicomm.providers.shared.http import (
    Answer,
    HttpAdapter,
    basic_auth,
    classify_status,
    error_fields,
)
from clinicomm.providers.shared.messaging import recipient_e164, require_text

JWT_TTL = 900  # seconds a token is valid
JWT_RENEW_BEFORE = 60  # renew this long before expiry

# Fragments of the error `type` link that mean "the recipient is wrong".
_RECIPIENT_TYPES = frozenset({"110", "1130"})


def classify_vonage_error(answer: Answer, provider: str = "vonage") -> ProviderError:
    """Turn a Vonage Messages error answer into the exception the worker acts on."""
    body = answer.json()
    body = body if isinstance(body, dict) else {}
    type_link = str(body.get("type") or "")
    fragment = type_link.rsplit("#", 1)[1] if "#" in type_link else None
    title = str(body.get("title") or "")
    detail = " ".join(p for p in (title, str(body.get("detail") or "")) if p) or None
    kw = error_fields(answer, provider=provider, code=fragment, detail=detail)
    if answer.status == 402:
        return ProviderDownError("account balance too low", **kw)
    if answer.status == 422:
        if fragment in _RECIPIENT_TYPES or "recipient" in title.lower():
            return RecipientError("recipient refused", **kw)
        return ConfigurationError("request refused", **kw)
    # 429, 401, 5xx and the rest by their status alone.
    return classify_status(answer, provider=provider, code=fragment, detail=detail)


class VonageAdapterBase(HttpAdapter):
    """Vonage send and probe; subclasses set the channel name used in the body."""

    #: The Messages API `channel` value ("whatsapp", "sms").
    vonage_channel: str = "sms"

    _jwt: str | None = None
    _jwt_expires: float = 0.0

    @property
    def creds(self) -> VonageCredentials:
        assert isinstance(self.credentials, VonageCredentials)
        return self.credentials

    def _bearer(self) -> str:
        now = time.time()
        if self._jwt is None or now > self._jwt_expires - JWT_RENEW_BEFORE:
            assert self.creds.private_key is not None
            claims = {
                "application_id": self.creds.application_id,
                "iat": int(now),
                "exp": int(now) + JWT_TTL,
                "jti": str(uuid.uuid4()),
            }
            try:
                self._jwt = jwt.encode(
                    claims, self.creds.private_key.get_secret_value(), algorithm="RS256"
                )
            except (ValueError, TypeError, jwt.PyJWTError):
                # Never echo the key or the library's message (it may quote the key).
                raise ConfigurationError(
                    "privateKey is not a usable RSA key", provider=self.key
                ) from None
            self._jwt_expires = now + JWT_TTL
        return self._jwt

    def _auth(self) -> dict[str, str]:
        creds = self.creds
        if creds.application_id and creds.private_key:
            return {"Authorization": f"Bearer {self._bearer()}"}
        # The credentials model guarantees one complete pair.
        assert creds.api_key is not None
        assert creds.api_secret is not None
        return basic_auth(creds.api_key, creds.api_secret.get_secret_value())

    def _from(self) -> str:
        sender = self.creds.from_number
        return sender[1:] if sender.startswith("+") else sender

    def build_payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON body for one message; raises ConfigurationError/RecipientError locally."""
        payload: dict[str, Any] = {
            "channel": self.vonage_channel,
            "to": digits(recipient_e164(message, self.key)),
            "from": self._from(),
            # Our opaque delivery id; echoed in status webhooks.
            "client_ref": message.reference,
        }
        if message.template is not None:
            payload.update(self._template(message))
        else:
            payload.update(message_type="text", text=require_text(message, self.key))
        return payload

    def _template(self, message: OutboundMessage) -> dict[str, Any]:
        raise ConfigurationError(
            f"{self.vonage_channel} has no provider templates; send rendered text",
            provider=self.key,
        )

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST /v1/messages; returns the `message_uuid`."""
        payload = self.build_payload(message)
        url = f"{self.creds.base_url.rstrip('/')}/v1/messages"
        answer = await self._request("POST", url, json_body=payload, headers=self._auth())
        if answer.status >= 300:
            raise classify_vonage_error(answer, self.key)
        body = answer.json()
        if not isinstance(body, dict) or not body.get("message_uuid"):
            raise TransientError(
                "answer without a message_uuid", provider=self.key, status_code=answer.status
            )
        return SendResult(str(body["message_uuid"]), str(answer.status))

    async def probe(self) -> None:
        """Check credentials without sending.

        With an API key and secret: GET the account balance (`/account/get-balance`). With only
        an application key pair, the Messages API has no read endpoint: the key is checked by
        signing a token locally.
        """
        creds = self.creds
        if creds.api_key and creds.api_secret:
            # The Account API lives on rest.nexmo.com; a baseUrl override is used as given.
            base = creds.base_url.rstrip("/")
            if base == "https://api.nexmo.com":
                base = "https://rest.nexmo.com"
            auth = basic_auth(creds.api_key, creds.api_secret.get_secret_value())
            answer = await self._request("GET", f"{base}/account/get-balance", headers=auth)
            if answer.status >= 300:
                raise classify_vonage_error(answer, self.key)
            return
        self._jwt = None
        self._bearer()
