"""Provider health and circuit breaker per (clinic, provider label).

Contract:

- `record(clinic, provider, outcome)` adds one outcome to a rolling, time-bucketed window (by
  default the last 5 minutes in 10 s buckets). Only `success` and `failure` count; `ignored`
  (rate-limit answers, recipient and compliance errors: `outcome_for` decides from the error's
  `counts_for_health`) changes nothing but a half-open probe slot.
- Health bands, re-evaluated on every `record`/`allow` while the circuit is closed: with at
  least `min_samples` (20) counted outcomes in the window, success rate > 95 % is `healthy`,
  80-95 % `degraded`, < 80 % `down`. With fewer, the band stays what it was (initially
  `healthy`). These bands are a product choice (PROVIDER-FACTS §6), paired with a minimum volume
  as Hystrix does.
- Circuit breaker (https://learn.microsoft.com/azure/architecture/patterns/circuit-breaker):
  `down` opens the circuit. `allow()` is False while open, until `cool_down_seconds` have passed;
  then the circuit is half-open and at most `half_open_probes` calls are allowed (atomically,
  across processes with Redis). That many successful probes close it, and the window is reset
  (band `healthy`) so old failures cannot reopen it at once; one probe failure opens it again
  with a new cool-down. If allowed probes never report back, a new round of probes is allowed
  one cool-down after the last round started. While open or half-open the band is `down`.
- Callers ask `allow()` before each call to a provider and `record()` its outcome after it.
- `record_probe()` stores the result of the periodic connection test; it changes no state.

Two implementations behind `HealthTracker`: `InProcessHealth` (this process; injectable clock)
and `RedisHealth` (one hash per (clinic, provider) changed only by one Lua script using the
Redis server's TIME, so every process sees one circuit). A Redis failure answers from an
in-process tracker with a warning at most once a minute; it never raises.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from clinicomm.providers.errors import ProviderError, redact
from clinicomm.telemetry import metrics

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What one provider call says about the provider's health."""

    SUCCESS = "success"  # the provider accepted the message (or answered a probe)
    FAILURE = "failure"  # 5xx, timeout, unreachable, auth/config error: counts against it
    IGNORED = "ignored"  # rate limit, recipient or compliance error: says nothing about it


class HealthState(StrEnum):
    """The seed's provider health status."""

    HEALTHY = "healthy"  # success rate > 95 %
    DEGRADED = "degraded"  # 80-95 %
    DOWN = "down"  # < 80 %, or the circuit is not closed


class CircuitState(StrEnum):
    """Circuit breaker position."""

    CLOSED = "closed"  # calls pass
    OPEN = "open"  # calls are refused until the cool-down has passed
    HALF_OPEN = "half_open"  # a few probe calls pass


#: `communication_circuit_state` values.
CIRCUIT_CODES: dict[CircuitState, int] = {
    CircuitState.CLOSED: 0,
    CircuitState.HALF_OPEN: 1,
    CircuitState.OPEN: 2,
}


def outcome_for(error: BaseException | None) -> Outcome:
    """SUCCESS for None; for a ProviderError its `counts_for_health` decides FAILURE/IGNORED;
    any other exception (an adapter bug, an unclassified network error) is a FAILURE."""
    if error is None:
        return Outcome.SUCCESS
    if isinstance(error, ProviderError) and not error.counts_for_health:
        return Outcome.IGNORED
    return Outcome.FAILURE


def health_key(clinic_id: str | None, provider: str | None = None) -> str:
    """The one place health keys are built.

    `health:{<clinicId>}:<provider>` is the (clinic, provider) hash; without a provider,
    `health:{<clinicId>}` is the set of the clinic's provider labels. None is the platform
    ("global"). The clinic id is a Redis Cluster hash tag, so both keys share a slot.
    """
    clinic = (clinic_id or "global").replace("{", "%7B").replace("}", "%7D")
    base = "health:{" + clinic + "}"
    return base if provider is None else f"{base}:{provider}"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Window, bands and breaker settings (defaults: the seed's and PROVIDER-FACTS §8 item 7)."""

    window_seconds: float = 300.0
    bucket_seconds: float = 10.0
    min_samples: int = 20
    healthy_above: float = 0.95
    degraded_from: float = 0.80
    cool_down_seconds: float = 30.0
    half_open_probes: int = 3
    #: Redis keys expire after this long without a write.
    ttl_seconds: int = 86400

    def __post_init__(self) -> None:
        if not (0 < self.bucket_seconds <= self.window_seconds):
            raise ValueError("need 0 < bucket_seconds <= window_seconds")
        if self.min_samples < 1 or self.half_open_probes < 1 or self.cool_down_seconds < 0:
            raise ValueError("min_samples and half_open_probes must be >= 1, cool-down >= 0")

    def band(self, successes: int, failures: int, previous: HealthState) -> HealthState:
        """The band for these counts; `previous` below the minimum volume."""
        samples = successes + failures
        if samples < self.min_samples:
            return previous
        rate = successes / samples
        if rate > self.healthy_above:
            return HealthState.HEALTHY
        if rate >= self.degraded_from:
            return HealthState.DEGRADED
        return HealthState.DOWN


def as_datetime(ts: float | None) -> datetime | None:
    """Epoch seconds as an aware UTC datetime (None stays None)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """Health of one provider for one clinic at one moment."""

    clinic_id: str  # "global" for the platform
    provider: str  # the chain hop label, e.g. "clinic:sendgrid"
    state: HealthState
    circuit: CircuitState
    success_rate: float | None  # None without counted outcomes in the window
    samples: int  # counted outcomes in the window
    last_failure_at: datetime | None
    last_check_at: datetime | None
    last_check_ok: bool | None
    last_check_detail: str | None
    opened_at: datetime | None


class HealthTracker(ABC):
    """Health and circuit per (clinic, provider); see the module docstring for the contract.

    No method raises for a Redis failure. `clinic_id` None means the platform ("global").
    """

    @abstractmethod
    async def record(
        self, clinic_id: str | None, provider: str, outcome: Outcome
    ) -> ProviderHealth:
        """Count one call outcome and apply the transitions it causes; returns the new state."""

    @abstractmethod
    async def allow(self, clinic_id: str | None, provider: str) -> bool:
        """Whether a call may go to this provider now (takes a probe slot when half-open)."""

    @abstractmethod
    async def state(self, clinic_id: str | None, provider: str) -> ProviderHealth:
        """The current health, without changing anything."""

    @abstractmethod
    async def snapshot(self, clinic_id: str | None) -> dict[str, ProviderHealth]:
        """Every provider of this clinic that has health data, by provider label."""

    @abstractmethod
    async def record_probe(
        self, clinic_id: str | None, provider: str, ok: bool, detail: str | None = None
    ) -> None:
        """Store the periodic connection test's time and result (`detail` is redacted)."""

    async def aclose(self) -> None:  # noqa: B027 - a hook; nothing to do by default
        """Send what this process holds (the runtime's shutdown); nothing by default."""

    def _transition(self, clinic: str, provider: str, before: str, after: str) -> None:
        if before == after:
            return
        metrics.CIRCUIT_TRANSITIONS.labels(clinic, provider, after).inc()
        metrics.CIRCUIT_STATE.labels(clinic, provider).set(
            CIRCUIT_CODES.get(CircuitState(after), 0)
        )
        level = logging.WARNING if after == CircuitState.OPEN else logging.INFO
        log.log(
            level,
            "circuit %s -> %s",
            before,
            after,
            extra={"event": "circuit_" + after, "clinicId": clinic, "provider": provider},
        )


# ---- in process ------------------------------------------------------------------------------
@dataclass(slots=True)
class _Entry:
    buckets: dict[int, list[int]] = field(default_factory=dict)  # index → [successes, failures]
    circuit: CircuitState = CircuitState.CLOSED
    band: HealthState = HealthState.HEALTHY
    opened_at: float | None = None
    half_at: float | None = None
    issued: int = 0  # probe calls allowed in this half-open round
    probe_ok: int = 0  # of which succeeded
    last_failure_at: float | None = None
    last_check_at: float | None = None
    last_check_ok: bool | None = None
    last_check_detail: str | None = None


class InProcessHealth(HealthTracker):
    """Health in this process only (the embedded default); `clock` is epoch seconds."""

    def __init__(
        self, config: HealthConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config or HealthConfig()
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._providers: dict[str, set[str]] = {}

    def _entry(self, clinic_id: str | None, provider: str) -> _Entry:
        key = health_key(clinic_id, provider)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            self._providers.setdefault(health_key(clinic_id), set()).add(provider)
        return entry

    def _window(self, entry: _Entry, now: float, *, prune: bool) -> tuple[int, int, int]:
        cfg = self.config
        current = math.floor(now / cfg.bucket_seconds)
        first = current - math.ceil(cfg.window_seconds / cfg.bucket_seconds) + 1
        ok = bad = 0
        for index in list(entry.buckets):
            if index < first:
                if prune:
                    del entry.buckets[index]
                continue
            ok += entry.buckets[index][0]
            bad += entry.buckets[index][1]
        return current, ok, bad

    def _open(self, entry: _Entry, now: float) -> None:
        entry.circuit = CircuitState.OPEN
        entry.opened_at = now
        entry.issued = entry.probe_ok = 0
        entry.band = HealthState.DOWN

    def _evaluate(self, entry: _Entry, ok: int, bad: int, now: float) -> None:
        if entry.circuit is CircuitState.CLOSED:
            entry.band = self.config.band(ok, bad, entry.band)
            if entry.band is HealthState.DOWN:
                self._open(entry, now)

    def _view(
        self, clinic_id: str | None, provider: str, entry: _Entry, now: float
    ) -> ProviderHealth:
        _, ok, bad = self._window(entry, now, prune=False)
        if entry.circuit is CircuitState.CLOSED:
            band = self.config.band(ok, bad, entry.band)
        else:
            band = HealthState.DOWN
        samples = ok + bad
        return ProviderHealth(
            clinic_id=clinic_id or "global",
            provider=provider,
            state=band,
            circuit=entry.circuit,
            success_rate=ok / samples if samples else None,
            samples=samples,
            last_failure_at=as_datetime(entry.last_failure_at),
            last_check_at=as_datetime(entry.last_check_at),
            last_check_ok=entry.last_check_ok,
            last_check_detail=entry.last_check_detail,
            opened_at=as_datetime(entry.opened_at),
        )

    def record_now(self, clinic_id: str | None, provider: str, outcome: Outcome) -> ProviderHealth:
        """The synchronous core of `record`."""
        now = self.clock()
        entry = self._entry(clinic_id, provider)
        before = entry.circuit
        current, ok, bad = self._window(entry, now, prune=True)
        half_open = entry.circuit is CircuitState.HALF_OPEN
        if outcome is Outcome.SUCCESS:
            entry.buckets.setdefault(current, [0, 0])[0] += 1
            ok += 1
            if half_open:
                entry.probe_ok += 1
                if entry.probe_ok >= self.config.half_open_probes:
                    entry.buckets.clear()
                    ok = bad = 0
                    entry.circuit = CircuitState.CLOSED
                    entry.band = HealthState.HEALTHY
                    entry.opened_at = entry.half_at = None
                    entry.issued = entry.probe_ok = 0
        elif outcome is Outcome.FAILURE:
            entry.buckets.setdefault(current, [0, 0])[1] += 1
            bad += 1
            entry.last_failure_at = now
            if half_open:
                self._open(entry, now)
        elif half_open and entry.issued > entry.probe_ok:
            entry.issued -= 1  # an ignored answer proves nothing: free its probe slot
        self._evaluate(entry, ok, bad, now)
        self._transition(clinic_id or "global", provider, before, entry.circuit)
        return self._view(clinic_id, provider, entry, now)

    def allow_now(self, clinic_id: str | None, provider: str) -> bool:
        """The synchronous core of `allow`."""
        now = self.clock()
        cfg = self.config
        entry = self._entry(clinic_id, provider)
        before = entry.circuit
        allowed = True
        if entry.circuit is CircuitState.CLOSED:
            _, ok, bad = self._window(entry, now, prune=True)
            self._evaluate(entry, ok, bad, now)
            allowed = entry.circuit is CircuitState.CLOSED
        elif entry.circuit is CircuitState.OPEN:
            assert entry.opened_at is not None
            if now >= entry.opened_at + cfg.cool_down_seconds:
                entry.circuit = CircuitState.HALF_OPEN
                entry.half_at = now
                entry.issued, entry.probe_ok = 1, 0
            else:
                allowed = False
        elif entry.issued < cfg.half_open_probes:
            entry.issued += 1
        elif entry.half_at is not None and now >= entry.half_at + cfg.cool_down_seconds:
            entry.issued = entry.probe_ok + 1  # the round's probes never reported: a new round
            entry.half_at = now
        else:
            allowed = False
        self._transition(clinic_id or "global", provider, before, entry.circuit)
        return allowed

    def state_now(self, clinic_id: str | None, provider: str) -> ProviderHealth:
        """The synchronous core of `state`."""
        key = health_key(clinic_id, provider)
        entry = self._entries.get(key) or _Entry()
        return self._view(clinic_id, provider, entry, self.clock())

    def snapshot_now(self, clinic_id: str | None) -> dict[str, ProviderHealth]:
        """The synchronous core of `snapshot`."""
        names = sorted(self._providers.get(health_key(clinic_id), ()))
        return {name: self.state_now(clinic_id, name) for name in names}

    def probe_now(
        self, clinic_id: str | None, provider: str, ok: bool, detail: str | None = None
    ) -> None:
        """The synchronous core of `record_probe`."""
        entry = self._entry(clinic_id, provider)
        entry.last_check_at = self.clock()
        entry.last_check_ok = ok
        entry.last_check_detail = redact(detail)

    async def record(
        self, clinic_id: str | None, provider: str, outcome: Outcome
    ) -> ProviderHealth:
        return self.record_now(clinic_id, provider, outcome)

    async def allow(self, clinic_id: str | None, provider: str) -> bool:
        return self.allow_now(clinic_id, provider)

    async def state(self, clinic_id: str | None, provider: str) -> ProviderHealth:
        return self.state_now(clinic_id, provider)

    async def snapshot(self, clinic_id: str | None) -> dict[str, ProviderHealth]:
        return self.snapshot_now(clinic_id)

    async def record_probe(
        self, clinic_id: str | None, provider: str, ok: bool, detail: str | None = None
    ) -> None:
        self.probe_now(clinic_id, provider, ok, detail)
