"""The one egress policy: which provider destinations this process may connect to.

A clinic administrator chooses endpoints (`baseUrl`, `apiUrl`, `endpointUrl`, an SMTP
`host`/`port`, a callback `url`). Without a policy that person could point the service at the
platform's own network (cloud metadata at 169.254.169.254, a database port, an admin API) and
have it send a stored credential there. `EgressPolicy` decides, for every connection an
adapter, the SMTP client, the AWS signers or the callback sender makes:

* The **resolved** addresses are checked at connect time (`EgressConnector._resolve_host` for
  every aiohttp session built by `http_session`, `EgressPolicy.resolve` for SMTP), so a DNS
  name that resolves to a private address is refused like the literal address. aiohttp then
  connects to exactly the addresses that passed: there is no second lookup to race.
* Refused unless `allow_private`: every address Python does not call global (loopback,
  RFC 1918, link-local 169.254.0.0/16 and fe80::/10, unique-local fc00::/7, unspecified,
  shared 100.64.0.0/10, documentation and reserved ranges) and multicast; an IPv4-mapped IPv6
  address is judged as its IPv4 address.
* `allow` lists hosts (exact name, case-insensitive) or networks (CIDR) that are allowed
  anyway: an internal SMTP relay, the platform's callback receiver.
* Redirects are never followed (`HttpAdapter._request`, the callback sender pass
  `allow_redirects=False`).

A refused destination raises `DestinationNotAllowedError` (an `OSError`, so aiohttp wraps it in
`ClientConnectorDNSError` without opening a socket); adapters turn it into a
`ConfigurationError("destination not allowed")`. `check_endpoint` is the save-time check of
the same rule for literal addresses (and `http://` in production).

Defaults: `Settings.egress_policy()` builds the policy from `CLINICOMM_EGRESS_ALLOW_PRIVATE`
(false in production, true otherwise) and `CLINICOMM_EGRESS_ALLOW`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The one message every refusal carries (delivery error, probe, config test).
NOT_ALLOWED = "destination not allowed"

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class DestinationNotAllowedError(OSError):
    """The egress policy refuses this destination; no connection was made."""

    def __init__(self, host: str) -> None:
        super().__init__(NOT_ALLOWED)
        #: The host asked for (an operator's or admin's setting, never patient data).
        self.host = host


def _address(value: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(value.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public(ip: IPAddress) -> bool:
    """Whether `ip` is a global unicast address (what the policy allows without `allow`)."""
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Whether a destination may be reached. Immutable; build with `from_strings`."""

    #: Development and tests: private destinations (local stand-ins) are allowed.
    allow_private: bool = True
    #: Host names allowed whatever they resolve to (lower case).
    allow_hosts: frozenset[str] = frozenset()
    #: Networks allowed even though private.
    allow_networks: tuple[IPNetwork, ...] = ()
    #: Production: endpoint URLs must be https (checked at save time).
    production: bool = False
    _cache: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_strings(
        cls, *, allow_private: bool, allow: Iterable[str] = (), production: bool = False
    ) -> EgressPolicy:
        """From settings: `allow` holds host names and CIDRs (a bare address is a /32 or
        /128). Raises ValueError for an entry that is neither."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in allow:
            entry = raw.strip()
            if not entry:
                continue
            if _address(entry.split("/", 1)[0]) is not None:
                networks.append(ipaddress.ip_network(entry, strict=False))
            elif "/" in entry or " " in entry:
                raise ValueError(f"egress allow entry {entry!r} is neither a host nor a CIDR")
            else:
                hosts.add(entry.lower().rstrip("."))
        return cls(allow_private, frozenset(hosts), tuple(networks), production)

    # --- decisions ---------------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        """Whether `host` (a name) is on the allow list, so any address it resolves to is."""
        return host.lower().rstrip(".") in self.allow_hosts

    def address_allowed(self, address: str) -> bool:
        """Whether a resolved address may be connected to. Cached per address (pure)."""
        cached = self._cache.get(address)
        if cached is not None:
            return cached
        ip = _address(address)
        if ip is None:
            decision = False
        elif self.allow_private or is_public(ip):
            decision = True
        else:
            decision = any(ip in net for net in self.allow_networks if net.version == ip.version)
        if len(self._cache) < 4096:
            self._cache[address] = decision
        return decision

    def filter(self, host: str, addresses: Sequence[str]) -> list[str]:
        """The addresses of `host` that may be connected to (all of them for an allowed host)."""
        if self.allow_private or self.host_allowed(host):
            return list(addresses)
        return [a for a in addresses if self.address_allowed(a)]

    def check_endpoint(self, value: str, *, url: bool) -> str | None:
        """Save-time check of one endpoint field: a problem message, or None when fine.

        Only what can be known without DNS: a literal private address (or `localhost`) when
        private destinations are refused, a non-http(s) URL, and `http://` in production.
        Names are checked again at connect time, after resolution.
        """
        host = value
        if url:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return "must be an absolute http(s) URL"
            if parts.username or parts.password:
                return "must not carry credentials"
            if self.production and parts.scheme != "https":
                return "must be an https URL in production"
            host = parts.hostname
        if self.allow_private or self.host_allowed(host):
            return None
        if host.lower().rstrip(".") in _LOCAL_NAMES:
            return f"{NOT_ALLOWED}: a loopback name"
        ip = _address(host)
        if ip is not None and not self.address_allowed(str(ip)):
            return f"{NOT_ALLOWED}: a private or reserved address"
        return None

    # --- connecting ------------------------------------------------------------------

    async def resolve(self, host: str, port: int) -> list[tuple[int, str]]:
        """(family, address) pairs of `host` that may be connected to, in resolver order.

        Raises DestinationNotAllowedError when none may (nothing is connected), OSError
        (socket.gaierror) when the name does not resolve.
        """
        literal = _address(host)
        if literal is not None:
            family = int(socket.AF_INET6 if literal.version == 6 else socket.AF_INET)
            pairs: list[tuple[int, str]] = [(family, str(literal))]
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            pairs = []
            for family, _type, _proto, _name, sockaddr in infos:
                pair = (int(family), str(sockaddr[0]))
                if pair not in pairs:
                    pairs.append(pair)
        allowed = set(self.filter(host, [a for _f, a in pairs]))
        kept: list[tuple[int, str]] = [(f, a) for f, a in pairs if a in allowed]
        if not kept:
            raise DestinationNotAllowedError(host)
        return kept

    async def open_socket(self, host: str, port: int) -> socket.socket:
        """A connected, non-blocking TCP socket to an allowed address of `host` (the caller
        bounds the time with `asyncio.timeout`).

        Raises DestinationNotAllowedError (no connection attempted), or the last OSError when
        no address accepted.
        """
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for family, address in await self.resolve(host, port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (address, port))
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise last if last is not None else ConnectionRefusedError(host)

    def connector(self, **kwargs: Any) -> EgressConnector:
        """An aiohttp connector that applies this policy to every connection it opens."""
        return EgressConnector(self, **kwargs)


class EgressConnector(aiohttp.TCPConnector):
    """`TCPConnector` whose resolution step drops refused addresses (literal or resolved).

    aiohttp connects to exactly what `_resolve_host` answers, so this is the connect-time
    check; `tests/providers/test_egress.py` pins that contract for the aiohttp in use.
    """

    def __init__(self, policy: EgressPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.egress = policy

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Any] | None = None
    ) -> list[ResolveResult]:
        results = await super()._resolve_host(host, port, traces)
        if self.egress.allow_private or self.egress.host_allowed(host):
            return results
        kept = [r for r in results if self.egress.address_allowed(r["host"])]
        if not kept:
            raise DestinationNotAllowedError(host)
        return kept


def http_session(policy: EgressPolicy, **kwargs: Any) -> aiohttp.ClientSession:
    """The one way a clinicomm aiohttp session is built: through the policy's connector, and
    keeping no cookies.

    One session carries every clinic's provider calls (and callbacks), so a cookie a host set
    in answer to one clinic's request would go out with the next clinic's request to that host:
    no provider API or callback needs cookies, so none are stored or sent.

    `connector_args` (a dict) go to the connector; the other keyword arguments to the session.
    """
    connector_args: dict[str, Any] = kwargs.pop("connector_args", {})
    kwargs.setdefault("cookie_jar", aiohttp.DummyCookieJar())
    return aiohttp.ClientSession(connector=policy.connector(**connector_args), **kwargs)


def refused(exc: BaseException) -> bool:
    """Whether `exc` (or the OSError an aiohttp error wraps) is an egress refusal."""
    if isinstance(exc, DestinationNotAllowedError):
        return True
    inner = getattr(exc, "os_error", None)
    return isinstance(inner, DestinationNotAllowedError)


#: The permissive policy (development defaults): used where no policy is configured.
PERMISSIVE = EgressPolicy()
