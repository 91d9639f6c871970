"""The one HTTP seam of the provider adapters: `HttpAdapter` and what every HTTP adapter shares.

Every HTTP adapter (email: SendGrid, Mailgun, Postmark, SES; WhatsApp/SMS: Meta, Twilio,
MessageBird, Vonage, SNS) subclasses `HttpAdapter`. It gives `_request()`, which:

* sends through the process's shared aiohttp session (`context.http`); when there is none (or it
  is closed), one private session is created lazily and closed in `close()`: never a session
  per message;
* applies `context.timeout` as the total timeout, `context.ca_file` as extra trust, and our
  `User-Agent`;
* turns network failures into the error tree, never letting an aiohttp exception out: a timeout
  or a dropped connection is `TransientError`, a refused or unresolvable host is
  `ProviderDownError`;
* reads the whole answer into an `Answer`, whose `retry_after` honours `Retry-After` (and, for
  adapters that declare it, an epoch `X-RateLimit-Reset`).

Each provider then classifies an error answer by its own codes; `rate_limit_or_server_error`
and `classify_status` are the status-only steps they share.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from clinicomm.providers import egress
from clinicomm.providers.base import AdapterContext, ProviderAdapter, ProviderCredentials
from clinicomm.providers.errors import (
    ConfigurationError,
    ProviderDownError,
    ProviderError,
    RateLimitedError,
    TransientError,
    parse_retry_after,
)


def retry_after(
    headers: Mapping[str, str], *, reset_header: str | None = None, now: float | None = None
) -> float | None:
    """Seconds to wait from `Retry-After`, else from the epoch in `reset_header` when given.

    `headers` is an aiohttp answer's (case-insensitive) headers.
    """
    delay = parse_retry_after(headers.get("Retry-After"), now=now)
    if delay is not None or reset_header is None:
        return delay
    reset = headers.get(reset_header)
    if not reset:
        return None
    try:
        epoch = float(reset)
    except ValueError:
        return None
    current = time.time() if now is None else now
    return max(0.0, epoch - current)


@dataclass(frozen=True, slots=True)
class Answer:
    """A provider's HTTP answer, read in full: status, headers and body text."""

    status: int
    headers: CIMultiDictProxy[str]
    text: str
    #: The epoch rate-limit reset header this provider sends, if `retry_after` should read one.
    reset_header: str | None = None

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.text) if self.text else None
        except ValueError:
            return None

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait as the provider asked (`Retry-After`, else `reset_header`), if any."""
        return retry_after(self.headers, reset_header=self.reset_header)


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


class HttpAdapter(ProviderAdapter):
    """Base of every HTTP adapter: session handling and the one request seam, `_request()`."""

    #: Header carrying the epoch second a rate limit resets, read when `Retry-After` is absent
    #: (SendGrid's `X-RateLimit-Reset`). None: only `Retry-After` counts.
    rate_limit_reset_header: ClassVar[str | None] = None

    def __init__(self, credentials: ProviderCredentials, context: AdapterContext) -> None:
        super().__init__(credentials, context)
        self._own_session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=context.ca_file) if context.ca_file else True
        )

    def _session(self) -> aiohttp.ClientSession:
        if self.context.http is not None and not self.context.http.closed:
            return self.context.http
        if self._own_session is None or self._own_session.closed:
            self._own_session = egress.http_session(self.context.egress)
        return self._own_session

    async def close(self) -> None:
        """Close the session this adapter created (never the shared one). Safe to call twice."""
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
        """Send one request and read the whole answer, whatever its status.

        Raises TransientError on a timeout or a dropped connection, ProviderDownError when the
        host cannot be reached, ConfigurationError("destination not allowed") when the egress
        policy refuses every address of the host (no connection made); never an aiohttp
        exception. Redirects are never followed: a 3xx is an answer like any other.
        """
        timeout = _timeout(self.context.timeout)
        all_headers = {"User-Agent": USER_AGENT, **(headers or {})}
        if json_body is not None:
            if data is not None:  # as aiohttp refused `json=` with `data=`
                raise ValueError("json_body and data cannot be used together")
            # orjson, as the API's answers: aiohttp's `json=` encodes with the stdlib.
            data = orjson.dumps(json_body)
            all_headers.setdefault("Content-Type", "application/json")
        try:
            async with self._session().request(
                method,
                url,
                data=data,
                headers=all_headers,
                params=params,
                timeout=timeout,
                ssl=self._ssl,
                allow_redirects=False,
            ) as response:
                text = await response.text(errors="replace")
                return Answer(response.status, response.headers, text, self.rate_limit_reset_header)
        except TimeoutError:
            raise TransientError("provider call timed out", provider=self.key) from None
        except aiohttp.ClientConnectorError as exc:
            if egress.refused(exc):
                raise ConfigurationError(egress.NOT_ALLOWED, provider=self.key) from None
            raise ProviderDownError(
                "provider unreachable", provider=self.key, detail=type(exc).__name__
            ) from None
        except aiohttp.ClientError as exc:
            # The request may have reached the provider (the answer was lost): retry later.
            raise TransientError(
                "provider connection failed", provider=self.key, detail=type(exc).__name__
            ) from None


@lru_cache(maxsize=16)
def _timeout(total: float) -> aiohttp.ClientTimeout:
    """One `ClientTimeout` per value (an attrs instance per request was ~2 % of a send)."""
    return aiohttp.ClientTimeout(total=total)


# --- classification by status --------------------------------------------------------------


_XML_MESSAGE = re.compile(r"<Message>([^<]{1,1000})</Message>")


def documented_detail(answer: Answer) -> str | None:
    """The provider's documented error text of an answer, or None; never the raw body.

    Read from the error fields the providers document: Meta `error.message`, SendGrid
    `errors[].message`, MessageBird `errors[].description`, Twilio/Mailgun `message`,
    Postmark `Message`, RFC 7807 `title`/`detail` (Vonage), OAuth `error_description`, AWS
    `<Message>`. An answer from anything else (a metadata service, an admin page) yields
    None, so what an arbitrary endpoint returns never reaches an API answer or a log.
    `ProviderError` then cuts the text to 200 characters and masks addresses.
    """
    body = answer.json()
    parts: list[str] = []
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            parts.append(error["message"])
        errors = body.get("errors")
        if isinstance(errors, list):
            for item in errors[:3]:
                if isinstance(item, dict):
                    text = item.get("message") or item.get("description")
                    if isinstance(text, str):
                        parts.append(text)
        for key in ("message", "Message", "title", "detail", "error_description"):
            value = body.get(key)
            if isinstance(value, str):
                parts.append(value)
    elif body is None and answer.text.lstrip().startswith("<"):
        match = _XML_MESSAGE.search(answer.text)
        if match:
            parts.append(match.group(1))
    return "; ".join(p for p in parts if p) or None


def error_fields(
    answer: Answer, *, provider: str, code: str | None = None, detail: str | None = None
) -> dict[str, Any]:
    """The keyword arguments every ProviderError from this answer takes (detail: the given
    documented text, else `documented_detail`; never the raw body)."""
    return {
        "provider": provider,
        "status_code": answer.status,
        "code": code,
        "detail": detail if detail is not None else documented_detail(answer),
    }


def rate_limit_or_server_error(answer: Answer, fields: Mapping[str, Any]) -> TransientError | None:
    """RateLimitedError for a 429, TransientError for a 5xx (both with `retry_after`), else None.

    `fields` is `error_fields(...)` of the answer.
    """
    if answer.status == 429:
        return RateLimitedError("rate limited", retry_after=answer.retry_after, **fields)
    if answer.status >= 500:
        return TransientError("provider error", retry_after=answer.retry_after, **fields)
    return None


def classify_status(
    answer: Answer, *, provider: str, code: str | None = None, detail: str | None = None
) -> ProviderError:
    """The error for an answer whose provider code is unknown, from its HTTP status alone."""
    fields = error_fields(answer, provider=provider, code=code, detail=detail)
    if (error := rate_limit_or_server_error(answer, fields)) is not None:
        return error
    if answer.status in (401, 403):
        return ConfigurationError("credentials refused", **fields)
    if answer.status == 408:
        return TransientError("provider timed out", retry_after=answer.retry_after, **fields)
    # Any other 4xx: the request we built is wrong for this account (bad sender, template or
    # parameter); sending it again will not help, another provider may.
    return ConfigurationError("request refused", **fields)
