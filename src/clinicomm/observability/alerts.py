"""Alert rules from the seed ("Alerts"), evaluated periodically, fired once, resolved once.

Critical: `provider_down` (a provider of a clinic's chain is `down`), `credential_expiry`
(credentials carrying `expiresAt` within 7 days, or past), `token_expiry` (the same, with
the expiry the provider states: Meta's `debug_token`, read by the probes),
`rate_limit_exceeded` (the clinic's own limit is used up: it cannot send now),
`bounce_rate` (> 10 % of the clinic's sent deliveries bounced over the window, with a
minimum volume). Warning: `provider_degraded`,
`rate_limit_high` (≥ 80 % of a limit), `cache_hit_rate` (< 90 % of config reads from a cache
over the sample window), `config_fetch_p95` (> 200 ms).

Lifecycle: the `alerts` table holds one row per occurrence. An alert is identified by its key
(`rule:clinic:channel:provider`); while active, `active_key` holds the key under a unique
index, so however many processes evaluate, exactly one inserts it and only that one emits
`alert_fired` (a structured log line with ids only, and a JSON POST to
`CLINICOMM_ALERT_WEBHOOK_URL` when set). When the condition clears, the one process whose
UPDATE flips the row to `resolved` emits `alert_resolved`. A rule with too little data to
judge (`complete=False`) resolves nothing that round.

The cache-hit and fetch-latency rules count in each process (its Prometheus counters), so
each evaluation adds this process's deltas since its previous one to `alert_samples` and
judges the sum of every process's samples of the last `sample_window_seconds` (300 s): a
healthy process cannot resolve what a struggling one fired, and a process that stopped
ages out of the window. Health and limits are shared through Redis when configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from clinicomm.delivery.bounces import bounce_counts, per_clinic
from clinicomm.observability.inventory import Inventory, clinic_inventory
from clinicomm.observability.probes import TokenExpiries
from clinicomm.providers.base import Channel
from clinicomm.routing.chain import ChainBuilder
from clinicomm.routing.health import HealthState, HealthTracker
from clinicomm.routing.limits import RateLimiter, clinic_channel_key, clinic_channel_limits
from clinicomm.settings.service import ConfigService
from clinicomm.store.db import Database
from clinicomm.store.models import AlertRecord, AlertSample, aware, utcnow
from clinicomm.telemetry import metrics

log = logging.getLogger(__name__)

CRITICAL = "critical"
WARNING = "warning"


@dataclass(frozen=True, slots=True)
class AlertConfig:
    """Thresholds (the seed's) and windows."""

    expiry_days: float = 7.0
    rate_limit_high: float = 0.8
    bounce_rate: float = 0.10
    bounce_window_seconds: float = 86400.0
    bounce_min_samples: int = 20
    cache_hit_rate: float = 0.90
    cache_min_reads: int = 100
    fetch_p95_seconds: float = 0.200
    fetch_min_samples: int = 100
    #: The cache-hit and fetch-p95 rules judge every process's counts of this many seconds.
    sample_window_seconds: float = 300.0
    webhook_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Condition:
    """A rule's finding: the alert that should be active now."""

    rule: str
    severity: str
    clinic_id: str | None = None
    channel: str | None = None
    provider: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        parts = [self.rule, self.clinic_id or "-", self.channel or "-", self.provider or "-"]
        return ":".join(parts)


@dataclass(slots=True)
class RuleResult:
    conditions: list[Condition]
    #: False when the rule lacked data: its active alerts are kept as they are.
    complete: bool = True


@dataclass(frozen=True, slots=True)
class Transition:
    """An alert this process fired or resolved in one evaluation."""

    event: str  # alert_fired | alert_resolved
    alert: dict[str, Any]


def alert_json(row: AlertRecord) -> dict[str, Any]:
    """The API and webhook form of an alert (ids and numbers only)."""
    return {
        "id": str(row.id),
        "rule": row.rule,
        "severity": row.severity,
        "status": row.status,
        "clinicId": row.clinic_id,
        "channel": row.channel,
        "provider": row.provider,
        "details": row.details or {},
        "firedAt": aware(row.fired_at).isoformat(),
        "resolvedAt": aware(row.resolved_at).isoformat() if row.resolved_at else None,
    }


class _Deltas:
    """Counter/histogram totals of this process, as deltas since the previous read. The first
    read is the baseline (delta 0): the process's history before the engine started (tests,
    a long uptime) is not judged as if it had happened in one interval."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def delta(self, name: str, value: float) -> float:
        before = self._last.get(name)
        self._last[name] = value
        return 0.0 if before is None else max(0.0, value - before)


def _sample_sum(metric: Any, suffix: str, **match: str) -> float:
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith(suffix):
                continue
            if all(sample.labels.get(k) == v for k, v in match.items()):
                total += sample.value
    return total


def _histogram_buckets(metric: Any) -> dict[float, float]:
    """Cumulative bucket counts summed over every label set: upper bound → count."""
    buckets: dict[float, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def _skipped(clinic_id: str | None, channel: Channel, exc: Exception) -> None:
    log.warning(
        "alert rule skipped a config it cannot read",
        extra={
            "event": "alert_config_failed",
            "clinicId": clinic_id or "global",
            "channel": channel.value,
            "error": type(exc).__name__,
        },
    )


class AlertEngine:
    """Evaluates the rules and keeps the `alerts` table, logs and webhook in step."""

    def __init__(
        self,
        db: Database,
        config: ConfigService,
        chains: ChainBuilder,
        health: HealthTracker,
        limiter: RateLimiter,
        *,
        http: aiohttp.ClientSession | None = None,
        webhook_url: str | None = None,
        settings: AlertConfig | None = None,
        now: Callable[[], datetime] = utcnow,
        expiries: TokenExpiries | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.chains = chains
        self.health = health
        self.limiter = limiter
        self.http = http
        self.webhook_url = webhook_url
        self.settings = settings or AlertConfig()
        self.now = now
        #: Token expiries the probes read from the providers (`token_expiry` rule).
        self.expiries = expiries
        self._deltas = _Deltas()
        self._buckets_before: dict[float, float] = {}
        #: This process in `alert_samples` (host, pid and a random part: pids are reused).
        self.process = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(4)}"

    # ---- rules ----------------------------------------------------------------------------
    async def _providers(self, inventory: Inventory) -> RuleResult:
        """provider_down / provider_degraded over each clinic's chain and the global providers."""
        found: list[Condition] = []
        seen: set[tuple[str | None, str]] = set()
        for clinic_id in [None, *inventory]:
            for channel in Channel:
                if clinic_id is not None and channel not in inventory[clinic_id]:
                    continue
                try:
                    resolved = await self.config.get_clinic_config(clinic_id, channel)
                    chain = self.chains.chain(resolved)
                except Exception as exc:
                    _skipped(clinic_id, channel, exc)
                    continue
                for hop in chain.hops:
                    owner = hop.health_owner(clinic_id)
                    if (owner, hop.label) in seen:
                        continue
                    seen.add((owner, hop.label))
                    state = await self.health.state(owner, hop.label)
                    if state.state is HealthState.HEALTHY:
                        continue
                    down = state.state is HealthState.DOWN
                    found.append(
                        Condition(
                            "provider_down" if down else "provider_degraded",
                            CRITICAL if down else WARNING,
                            owner,
                            channel.value,
                            hop.label,
                            {
                                "circuit": state.circuit.value,
                                "successRate": state.success_rate,
                                "samples": state.samples,
                            },
                        )
                    )
        return RuleResult(found)

    async def _own_settings(self, inventory: Inventory) -> RuleResult:
        """credential_expiry and the two rate-limit rules, from each clinic's own settings."""
        found: list[Condition] = []
        horizon = self.now() + timedelta(days=self.settings.expiry_days)
        for clinic_id, channels in inventory.items():
            for channel in channels:
                try:
                    own = (await self.config.get_clinic_config(clinic_id, channel)).own
                except Exception as exc:
                    _skipped(clinic_id, channel, exc)
                    continue
                if own is None:
                    continue
                for path, slot in own.slots():
                    expires = getattr(slot.credentials, "expires_at", None)
                    if slot.active and isinstance(expires, datetime):
                        expires = aware(expires)
                        if expires <= horizon:
                            found.append(
                                Condition(
                                    "credential_expiry",
                                    CRITICAL,
                                    clinic_id,
                                    channel.value,
                                    f"clinic:{slot.provider}@{path}",
                                    {
                                        "expiresAt": expires.astimezone(UTC).isoformat(),
                                        "expired": expires <= self.now(),
                                    },
                                )
                            )
                limits = clinic_channel_limits(own.rate_limit)
                if not limits:
                    continue
                key = clinic_channel_key(clinic_id, channel.value)
                usage = await self.limiter.usage(key, limits)
                if usage >= 1.0:
                    found.append(
                        Condition(
                            "rate_limit_exceeded",
                            CRITICAL,
                            clinic_id,
                            channel.value,
                            details={"usage": round(usage, 3)},
                        )
                    )
                elif usage >= self.settings.rate_limit_high:
                    found.append(
                        Condition(
                            "rate_limit_high",
                            WARNING,
                            clinic_id,
                            channel.value,
                            details={"usage": round(usage, 3)},
                        )
                    )
        return RuleResult(found)

    async def _bounces(self) -> RuleResult:
        """bounce_rate per clinic in the window, as `delivery.bounces` defines it (bounced /
        handed to a provider)."""
        since = self.now() - timedelta(seconds=self.settings.bounce_window_seconds)
        # A day of deliveries (ix_deliveries_sent): off the loop's thread on SQLite.
        async with self.db.report() as session:
            counts = await bounce_counts(session, since)
        found = []
        cfg = self.settings
        for clinic_id, (total, n_bounced) in sorted(per_clinic(counts).items()):
            if total >= cfg.bounce_min_samples and n_bounced / total > cfg.bounce_rate:
                rate = round(n_bounced / total, 4)
                details = {"bounced": n_bounced, "total": total, "rate": rate}
                found.append(Condition("bounce_rate", CRITICAL, clinic_id, details=details))
        return RuleResult(found)

    def _token_expiry(self) -> RuleResult:
        """token_expiry: a token whose expiry the provider states (Meta `debug_token`, read
        by this process's probes) ends within `expiry_days`, or has ended. No data until a
        probe round completed (every process probes the same providers, so they agree)."""
        book = self.expiries
        if book is None or book.rounds == 0:
            return RuleResult([], complete=False)
        horizon = self.now() + timedelta(days=self.settings.expiry_days)
        found = []
        for (clinic_id, channel, label), expires in sorted(
            book.found.items(), key=lambda item: (item[0][0] or "", item[0][1], item[0][2])
        ):
            if expires is not None and aware(expires) <= horizon:
                details = {
                    "expiresAt": aware(expires).astimezone(UTC).isoformat(),
                    "expired": aware(expires) <= self.now(),
                    "source": "provider",
                }
                found.append(
                    Condition("token_expiry", CRITICAL, clinic_id, channel, label, details)
                )
        return RuleResult(found)

    async def _shared(self, metric: str, mine: dict[str, float]) -> dict[str, float]:
        """Record this process's counts of `metric` since its previous evaluation (when there
        are any) and answer the sum of every process's counts in the sample window."""
        now = self.now()
        window = self.settings.sample_window_seconds
        since = now - timedelta(seconds=window)
        async with self.db.session() as session:
            if any(mine.values()):
                session.add(
                    AlertSample(process=self.process, metric=metric, sampled_at=now, data=mine)
                )
                await session.flush()
            await session.execute(
                delete(AlertSample).where(
                    AlertSample.metric == metric,
                    AlertSample.sampled_at < now - timedelta(seconds=2 * window),
                )
            )
            rows = (
                await session.scalars(
                    select(AlertSample.data).where(
                        AlertSample.metric == metric, AlertSample.sampled_at >= since
                    )
                )
            ).all()
        total: dict[str, float] = {}
        for data in rows:
            for key, value in (data or {}).items():
                total[key] = total.get(key, 0.0) + float(value)
        return total

    async def _cache(self) -> RuleResult:
        """cache_hit_rate over every process's config reads in the sample window (each
        process adds its own counts since its previous evaluation: `alert_samples`)."""
        hits = self._deltas.delta("hits", _sample_sum(metrics.CONFIG_CACHE_HIT, "_total"))
        misses = self._deltas.delta("misses", _sample_sum(metrics.CONFIG_CACHE_MISS, "_total"))
        shared = await self._shared("config_cache", {"hits": hits, "misses": misses})
        hits, misses = shared.get("hits", 0.0), shared.get("misses", 0.0)
        reads = hits + misses
        if reads < self.settings.cache_min_reads:
            return RuleResult([], complete=False)
        rate = hits / reads
        if rate < self.settings.cache_hit_rate:
            details = {"hitRate": round(rate, 4), "reads": int(reads)}
            return RuleResult([Condition("cache_hit_rate", WARNING, details=details)])
        return RuleResult([])

    async def _fetch_latency(self) -> RuleResult:
        """config_fetch_p95: the bucket holding the 95th percentile of every process's config
        fetches in the sample window (an upper bound of the true p95)."""
        now = _histogram_buckets(metrics.CONFIG_FETCH_LATENCY)
        mine = {str(b): max(0.0, now[b] - self._buckets_before.get(b, 0.0)) for b in now}
        if not self._buckets_before:
            mine = {}  # the first read is the baseline, as for the counters
        self._buckets_before = now
        shared = await self._shared("config_fetch", mine)
        window = {float(b): c for b, c in shared.items()}
        count = window.get(float("inf"), 0.0)
        if count < self.settings.fetch_min_samples:
            return RuleResult([], complete=False)
        p95 = float("inf")
        for bound in sorted(window):
            if window[bound] >= 0.95 * count:
                p95 = bound
                break
        if p95 > self.settings.fetch_p95_seconds:
            details = {"p95Seconds": p95 if p95 != float("inf") else None, "samples": int(count)}
            return RuleResult([Condition("config_fetch_p95", WARNING, details=details)])
        return RuleResult([])

    async def conditions(self) -> dict[str, RuleResult]:
        """Every rule's result, by rule name (the combined rules report under each name)."""
        inventory = await clinic_inventory(self.db)
        providers = await self._providers(inventory)
        own = await self._own_settings(inventory)
        results = {
            "provider": providers,
            "own": own,
            "bounce_rate": await self._bounces(),
            "cache_hit_rate": await self._cache(),
            "config_fetch_p95": await self._fetch_latency(),
            "token_expiry": self._token_expiry(),
        }
        return results

    # ---- lifecycle ------------------------------------------------------------------------
    async def evaluate(self) -> list[Transition]:
        """One evaluation: fire new alerts, resolve cleared ones; returns what this process
        fired/resolved (each also logged and POSTed to the webhook)."""
        results = await self.conditions()
        rules_of = {
            "provider": {"provider_down", "provider_degraded"},
            "own": {"credential_expiry", "rate_limit_exceeded", "rate_limit_high"},
            "bounce_rate": {"bounce_rate"},
            "cache_hit_rate": {"cache_hit_rate"},
            "config_fetch_p95": {"config_fetch_p95"},
            "token_expiry": {"token_expiry"},
        }
        wanted: dict[str, Condition] = {}
        judged: set[str] = set()
        for name, result in results.items():
            for condition in result.conditions:
                wanted[condition.key] = condition
            if result.complete:
                judged |= rules_of[name]
        transitions: list[Transition] = []
        async with self.db.read() as session:
            active = list(
                (
                    await session.execute(select(AlertRecord).where(AlertRecord.status == "active"))
                ).scalars()
            )
        active_keys = {row.key for row in active}
        for key, condition in wanted.items():
            if key in active_keys:
                continue
            row = await self._fire(condition)
            if row is not None:
                transitions.append(Transition("alert_fired", alert_json(row)))
        for row in active:
            if row.key in wanted or row.rule not in judged:
                continue
            resolved = await self._resolve(row)
            if resolved is not None:
                transitions.append(Transition("alert_resolved", alert_json(resolved)))
        for transition in transitions:
            self._log(transition)
            await self._post(transition)
        return transitions

    async def _fire(self, condition: Condition) -> AlertRecord | None:
        row = AlertRecord(
            key=condition.key,
            active_key=condition.key,
            rule=condition.rule,
            severity=condition.severity,
            clinic_id=condition.clinic_id,
            channel=condition.channel,
            provider=condition.provider,
            status="active",
            details=condition.details,
            fired_at=self.now(),
        )
        try:
            async with self.db.session() as session:
                session.add(row)
                await session.flush()
        except IntegrityError:  # another process fired it first
            return None
        return row

    async def _resolve(self, row: AlertRecord) -> AlertRecord | None:
        at = self.now()
        async with self.db.session() as session:
            result = await session.execute(
                update(AlertRecord)
                .where(AlertRecord.id == row.id, AlertRecord.status == "active")
                .values(status="resolved", active_key=None, resolved_at=at)
            )
        if getattr(result, "rowcount", 0) != 1:
            return None  # another process resolved it
        row.status, row.active_key, row.resolved_at = "resolved", None, at
        return row

    def _log(self, transition: Transition) -> None:
        alert = transition.alert
        log.log(
            logging.WARNING if transition.event == "alert_fired" else logging.INFO,
            "%s %s",
            transition.event,
            alert["rule"],
            extra={
                "event": transition.event,
                "alertId": alert["id"],
                "rule": alert["rule"],
                "severity": alert["severity"],
                "clinicId": alert["clinicId"],
                "channel": alert["channel"],
                "provider": alert["provider"],
            },
        )

    async def _post(self, transition: Transition) -> None:
        if not self.webhook_url or self.http is None:
            return
        try:
            async with self.http.post(
                self.webhook_url,
                json={"event": transition.event, "alert": transition.alert},
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout),
                allow_redirects=False,
            ) as answer:
                if answer.status >= 300:
                    raise aiohttp.ClientResponseError(answer.request_info, (), status=answer.status)
        except Exception as exc:
            log.warning(
                "alert webhook failed",
                extra={
                    "event": "alert_webhook_failed",
                    "alertId": transition.alert["id"],
                    "error": type(exc).__name__,
                },
            )

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        """Evaluate every `interval` seconds until `stop` is set; never raises."""
        while not stop.is_set():
            try:
                await self.evaluate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "alert evaluation failed",
                    extra={"event": "alert_evaluation_failed", "error": type(exc).__name__},
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def list_alerts(
    db: Database, *, clinic_id: str | None = None, status: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Alerts newest first, optionally of one clinic and/or one status."""
    query = select(AlertRecord)
    if clinic_id is not None:
        query = query.where(AlertRecord.clinic_id == clinic_id)
    if status is not None:
        query = query.where(AlertRecord.status == status)
    query = query.order_by(AlertRecord.id.desc()).limit(limit)
    async with db.read() as session:
        rows = (await session.execute(query)).scalars()
        return [alert_json(r) for r in rows]
