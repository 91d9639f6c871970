"""The periodic connection test of every configured provider (the seed's "Connection test
every 5 minutes").

`ProbeRunner.run(stop)` runs in `clinicomm serve` and `clinicomm worker`: every
`CLINICOMM_PROBE_INTERVAL_SECONDS` (300) it calls `probe()` on each provider of each clinic's
own chain and on each global provider (once, not once per clinic), at most `concurrency` at a
time, each within `timeout` seconds, and stores the result with `HealthTracker.record_probe`
(the health endpoint's "last check"). A probe changes no band or circuit: only real sends do.
Nothing a probe does (an adapter bug, a timeout, an undecryptable config) stops the loop.

After a successful probe of an adapter that `reads_token_expiry` (Meta: Graph API
`debug_token`), the token's expiry as the provider states it goes into `expiries`
(`TokenExpiries`), which the alert engine's `token_expiry` rule reads. Providers whose APIs
expose no expiry (Twilio, SendGrid, Mailgun, Postmark, SES, Vonage, MessageBird, SMTP) keep
only the typed-in `expiresAt` of `credential_expiry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from clinicomm.observability.inventory import clinic_inventory
from clinicomm.providers.base import Channel, ProviderAdapter
from clinicomm.providers.errors import ProviderError
from clinicomm.routing.chain import ChainBuilder
from clinicomm.routing.health import HealthTracker
from clinicomm.settings.service import ConfigService
from clinicomm.store.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One provider to test: whose health it is (None: the platform's) and its chain label."""

    clinic_id: str | None
    label: str
    adapter: ProviderAdapter
    channel: str = ""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    clinic_id: str | None
    label: str
    ok: bool
    detail: str | None


@dataclass(slots=True)
class TokenExpiries:
    """Token expiries read from the providers by this process's probes: (owner clinic id or
    None, channel, chain label) → when it expires (None: never). `rounds` counts completed
    probe rounds: before the first, the rule that reads this has no data."""

    found: dict[tuple[str | None, str, str], datetime | None] = field(default_factory=dict)
    rounds: int = 0


class ProbeRunner:
    """Tests every configured provider periodically; see the module docstring."""

    def __init__(
        self,
        db: Database,
        config: ConfigService,
        chains: ChainBuilder,
        health: HealthTracker,
        *,
        interval: float = 300.0,
        timeout: float = 10.0,
        concurrency: int = 16,
        expiries: TokenExpiries | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.chains = chains
        self.health = health
        self.interval = interval
        self.timeout = timeout
        self.concurrency = concurrency
        self.rounds = 0
        self.expiries = expiries if expiries is not None else TokenExpiries()

    async def targets(self) -> list[ProbeTarget]:
        """Each clinic's own providers and the global ones (each global provider once)."""
        inventory = await clinic_inventory(self.db)
        found: list[ProbeTarget] = []
        seen_global: set[str] = set()
        clinics: list[str | None] = [None, *inventory]
        for clinic_id in clinics:
            for channel in Channel:
                if clinic_id is not None and channel not in inventory[clinic_id]:
                    continue
                try:
                    resolved = await self.config.get_clinic_config(clinic_id, channel)
                    chain = self.chains.chain(resolved)
                except Exception as exc:  # an undecryptable or invalid config: skip it
                    log.warning(
                        "probe targets unavailable",
                        extra={
                            "event": "probe_config_failed",
                            "clinicId": clinic_id or "global",
                            "channel": channel.value,
                            "error": type(exc).__name__,
                        },
                    )
                    continue
                for hop in chain.hops:
                    owner = hop.health_owner(clinic_id)
                    if owner is None:  # a global provider: probed once for everyone
                        if hop.label + channel.value in seen_global:
                            continue
                        seen_global.add(hop.label + channel.value)
                    found.append(ProbeTarget(owner, hop.label, hop.adapter, channel.value))
        return found

    async def probe_one(self, target: ProbeTarget) -> ProbeResult:
        """Probe one provider within the timeout and record the result; never raises."""
        ok, detail = True, None
        try:
            await asyncio.wait_for(target.adapter.probe(), self.timeout)
        except TimeoutError:
            ok, detail = False, f"probe timed out after {self.timeout:g}s"
        except ProviderError as exc:
            ok, detail = False, f"{exc.error_class.value}: {exc.detail or exc.message}"
        except Exception as exc:
            ok, detail = False, f"unexpected probe error: {type(exc).__name__}"
        with contextlib.suppress(Exception):
            await self.health.record_probe(target.clinic_id, target.label, ok, detail)
        if ok and type(target.adapter).reads_token_expiry:
            await self._read_expiry(target)
        if not ok:
            log.info(
                "provider probe failed",
                extra={
                    "event": "probe_failed",
                    "clinicId": target.clinic_id or "global",
                    "provider": target.label,
                },
            )
        return ProbeResult(target.clinic_id, target.label, ok, detail)

    async def _read_expiry(self, target: ProbeTarget) -> None:
        """The token's expiry from the provider into `expiries`; a failure keeps the last."""
        key = (target.clinic_id, target.channel, target.label)
        try:
            expires = await asyncio.wait_for(target.adapter.token_expiry(), self.timeout)
        except Exception as exc:
            log.info(
                "token expiry unreadable",
                extra={
                    "event": "token_expiry_failed",
                    "clinicId": target.clinic_id or "global",
                    "provider": target.label,
                    "error": type(exc).__name__,
                },
            )
            return
        self.expiries.found[key] = expires

    async def run_once(self) -> list[ProbeResult]:
        """One round over every target, `concurrency` probes at a time."""
        targets = await self.targets()
        gate = asyncio.Semaphore(self.concurrency)

        async def bounded(target: ProbeTarget) -> ProbeResult:
            async with gate:
                return await self.probe_one(target)

        results = list(await asyncio.gather(*(bounded(t) for t in targets)))
        wanted = {(t.clinic_id, t.channel, t.label) for t in targets}
        for key in list(self.expiries.found):
            if key not in wanted:  # a provider removed from the settings
                del self.expiries.found[key]
        self.rounds += 1
        self.expiries.rounds += 1
        return results

    async def run(self, stop: asyncio.Event) -> None:
        """A round every `interval` seconds (the first one interval after start), until `stop`
        is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            if stop.is_set():
                return
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down, say: try again next round
                log.warning(
                    "probe round failed",
                    extra={"event": "probe_round_failed", "error": type(exc).__name__},
                )
