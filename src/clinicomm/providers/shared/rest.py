"""Plumbing shared by the HTTP adapters: one session, one request seam, common classification.

`RestAdapter` gives an adapter `_request()`, which sends through the process's shared aiohttp
session (`context.http`; a private one is created lazily and closed in `close()` when there is
none) and turns network failures into the error tree: a timeout is `TransientError`, a refused
or unresolvable connection is `ProviderDownError`. Each provider then classifies the answer's
status and error code itself; `classify_status` is the fallback for codes it does not know.

Also here: what every template send needs (resolve the logical name, order the variables,
check the declared parameter count before any call).
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from clinicomm.providers.base import (
    AdapterContext,
    OutboundMessage,
    ProviderAdapter,
    ProviderCredentials,
    TemplateRef,
)
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    RecipientError,
    TransientError,
    parse_retry_after,
)
from clinicomm.providers.phone import normalize_e164


@dataclass(frozen=True, slots=True)
class Answer:
    """A provider's HTTP answer: status, headers and body text (JSON decoded on demand)."""

    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.text) if self.text else None
        except ValueError:
            return None

    @property
    def retry_after(self) -> float | None:
        """Seconds from the `Retry-After` header, if any."""
        return parse_retry_after(self.headers.get("Retry-After"))


def basic_auth(user: str, password: str) -> dict[str, str]:
    """An HTTP Basic `Authorization` header (aiohttp.BasicAuth is deprecated in 3.14)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def _user_agent() -> str:
    try:
        version = importlib.metadata.version("clinicomm")
    except importlib.metadata.PackageNotFoundError:
        version = "0.0.0"
    return f"clinicomm/{version}"


#: Sent on every provider call instead of aiohttp's default ("Python/3.11 aiohttp/…"), which
#: Meta's spec rejects: its User-Agent pattern wants `name/x.y.z`.
USER_AGENT = _user_agent()


class RestAdapter(ProviderAdapter):
    """Base of the HTTP adapters: session handling and the one request seam."""

    def __init__(self, credentials: ProviderCredentials, context: AdapterContext) -> None:
        super().__init__(credentials, context)
        self._own_session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context(cafile=context.ca_file) if context.ca_file else None
        )

    def _session(self) -> aiohttp.ClientSession:
        if self.context.http is not None and not self.context.http.closed:
            return self.context.http
        if self._own_session is None or self._own_session.closed:
            self._own_session = aiohttp.ClientSession()
        return self._own_session

    async def close(self) -> None:
        """Close the private session, if this adapter had to create one."""
        if self._own_session is not None and not self._own_session.closed:
            await self._own_session.close()
        self._own_session = None

    async def _request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        """Send one request and read the whole answer; network failures become ProviderErrors."""
        timeout = aiohttp.ClientTimeout(total=self.context.timeout)
        all_headers = {"User-Agent": USER_AGENT, **(headers or {})}
        try:
            async with self._session().request(
                method,
                url,
                json=json_body,
                data=data,
                headers=all_headers,
                params=params,
                timeout=timeout,
                ssl=self._ssl if self._ssl is not None else True,
            ) as response:
                text = await response.text(errors="replace")
                return Answer(response.status, response.headers, text)
        except TimeoutError:
            raise TransientError("provider call timed out", provider=self.key) from None
        except aiohttp.ClientConnectorError as exc:
            raise ProviderDownError(
                "provider unreachable", provider=self.key, detail=type(exc).__name__
            ) from None
        except aiohttp.ClientError as exc:
            # The request may have reached the provider (the answer was lost): retry later.
            raise TransientError(
                "provider connection failed", provider=self.key, detail=type(exc).__name__
            ) from None

    def _recipient(self, message: OutboundMessage) -> str:
        """The message's recipient in canonical E.164; RecipientError (no call) if it is not."""
        try:
            return normalize_e164(message.to)
        except ValueError as exc:
            raise RecipientError(f"invalid phone number: {exc}", provider=self.key) from None


def classify_status(
    answer: Answer, *, provider: str, code: str | None = None, detail: str | None = None
) -> ProviderError:
    """The error for an answer whose provider code is unknown, from its HTTP status alone."""
    status = answer.status
    kw: dict[str, Any] = {
        "provider": provider,
        "status_code": status,
        "code": code,
        "detail": detail if detail is not None else answer.text,
    }
    if status == 429:
        return RateLimitedError("rate limited", retry_after=answer.retry_after, **kw)
    if status in (401, 403):
        return ConfigurationError("credentials refused", **kw)
    if status >= 500:
        return TransientError("provider error", retry_after=answer.retry_after, **kw)
    if status == 408:
        return TransientError("provider timed out", retry_after=answer.retry_after, **kw)
    # Any other 4xx: the request we built is wrong for this account (bad sender, template or
    # parameter); sending it again will not help, another provider may.
    return ConfigurationError("request refused", **kw)


# --- templates -------------------------------------------------------------------------


def template_name(template: TemplateRef, mapping: Mapping[str, str]) -> str:
    """The provider's name for a template: the credentials' mapping of a logical name, or as is."""
    return mapping.get(template.name, template.name)


def ordered_variables(variables: Mapping[str, str]) -> list[str]:
    """Positional parameters from `variables`: keys "1", "2", … in numeric order.

    Non-numeric keys sort after the numeric ones, by name, so the order is deterministic.
    """

    def order(key: str) -> tuple[int, int, str]:
        return (0, int(key), "") if key.isdigit() else (1, 0, key)

    return [str(variables[k]) for k in sorted(variables, key=order)]


def check_param_count(
    declared: Mapping[str, int],
    template: TemplateRef,
    provider_name: str,
    count: int,
    *,
    provider: str,
) -> None:
    """Raise ConfigurationError (before any call) when a declared parameter count differs.

    `declared` maps a template name (logical or the provider's) to its body parameter count;
    a template without a declaration is not checked.
    """
    expected = declared.get(template.name, declared.get(provider_name))
    if expected is not None and expected != count:
        raise ConfigurationError(
            f"template {template.name!r} takes {expected} parameters, got {count}",
            provider=provider,
            code="template_params",
        )


def require_text(message: OutboundMessage, provider: str) -> str:
    """The message's text; ConfigurationError when it has none (nothing to send)."""
    if not message.text:
        raise ConfigurationError("message has no text and no usable template", provider=provider)
    return message.text
