"""Builds a process's shared objects from `Settings`: database, keys, caches, config service.

`Runtime` is what the HTTP app, the worker and the Python `Client` hold. It owns the Redis
connection and the aiohttp session, and closes them in `close()`.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from redis.asyncio import BlockingConnectionPool, Redis

from clinicomm.callbacks.targets import CallbackTargets
from clinicomm.config import Settings
from clinicomm.crypto import MasterKeyring
from clinicomm.delivery.outbox import Notifier
from clinicomm.messaging.service import MessagingService
from clinicomm.providers.base import AdapterContext
from clinicomm.providers.egress import EgressPolicy, http_session
from clinicomm.routing.chain import ChainBuilder
from clinicomm.routing.health import HealthConfig, HealthTracker, InProcessHealth
from clinicomm.routing.health_redis import RedisHealth
from clinicomm.routing.limits import RateLimiter, make_limiter
from clinicomm.settings.cache import ConfigCache
from clinicomm.settings.globals import load_global_settings
from clinicomm.settings.keys import KeyStore
from clinicomm.settings.service import ConfigService, ResolvedChannel
from clinicomm.store.db import Database, upgrade_async

log = logging.getLogger(__name__)


#: `gc.set_threshold` of serve and worker: a young collection per 10,000 new container
#: objects, not CPython's 700. A batch of 500 messages keeps tens of thousands of objects
#: alive until its answer (items, rows, deliveries); at 700, ~40 young collections per batch
#: moved them to the old generations, and ~1 in 120 was a full collection of the old one
#: (45 to 75 ms each, with the workers' 10,000 cached contents in it).
#: Measured (batch-accept, PostgreSQL, one process, Dec 6 2026), four interleaved pairs: the
#: collector's time 1.9 to 3.0 s → 0.75 to 1.0 s for 50,000 deliveries (33 full collections → 1),
#: service CPU per delivery 0.267/0.338/0.237/0.285 → 0.230/0.224/0.202/0.231 ms, resident
#: memory unchanged (two earlier pairs: 0.317 → 0.234, 0.247 → 0.265). The older
#: generations keep CPython's thresholds (10, 10).
COLLECTOR_THRESHOLDS = (10_000, 10, 10)


def freeze_startup_heap() -> None:
    """Take everything alive after startup (modules, the app, the runtime) out of the garbage
    collector's walks, so a long-running process's full collections cover only what it made
    since (`gc.freeze`), and collect the young generation less often
    (`COLLECTOR_THRESHOLDS`).

    For `clinicomm serve` and `clinicomm worker` only, once they are built, never a library
    user's process: frozen objects are never freed. Measured with `bench.pipeline_inproc`
    on PostgreSQL (2026-12-02): full collections took 0.84 s of CPU per 5,000 WhatsApp messages,
    0.31 s frozen; CPU per message 0.48 → 0.40 ms in accept, 1.11 → 0.97 ms in the worker.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


#: Connections to Redis per process (a blocking pool: past it, a caller waits up to 2 s).
REDIS_MAX_CONNECTIONS = 64


@dataclass
class Runtime:
    """The process-wide objects; build with `Runtime.create(settings)`."""

    settings: Settings
    db: Database
    keyring: MasterKeyring
    keys: KeyStore
    redis: Redis | None
    config: ConfigService
    http: aiohttp.ClientSession
    notifier: Notifier
    messaging: MessagingService
    chains: ChainBuilder
    health: HealthTracker
    limiter: RateLimiter
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def create(
        cls,
        settings: Settings,
        *,
        migrate: bool = False,
        env: dict[str, str] | None = None,
    ) -> Runtime:
        """Build and start a runtime. `migrate` runs migrations first (the embedded default)."""
        settings.sns_prefixes  # noqa: B018 - refuses a plain-http prefix in production now
        keyring = MasterKeyring.from_environment(
            settings.master_keys, data_dir=settings.data_dir, production=settings.production
        )
        global_settings = load_global_settings(
            os.environ if env is None else env, settings.global_settings_file
        )
        if migrate:
            await upgrade_async(settings.database_url)
        db = Database(settings.database_url)
        redis = (
            Redis(
                connection_pool=BlockingConnectionPool.from_url(
                    settings.redis_url,
                    # A full pool makes a caller wait (up to `timeout`) for a connection:
                    # the default pool raised at 100, and every health and limit call of a
                    # busy worker then fell back to in-process answers, unshared.
                    max_connections=REDIS_MAX_CONNECTIONS,
                    timeout=2.0,
                    socket_connect_timeout=1.0,
                    socket_timeout=2.0,
                    health_check_interval=10,
                )
            )
            if settings.redis_url
            else None
        )
        policy = egress_policy(settings)
        keys = KeyStore(keyring)
        cache: ConfigCache[ResolvedChannel] = ConfigCache(
            redis, ttl=settings.cache_ttl_seconds, ack_timeout=settings.invalidation_ack_timeout
        )
        config = ConfigService(
            db,
            keys,
            cache,
            global_settings,
            poll_seconds=settings.config_poll_seconds,
            egress=policy,
        )
        await config.start()
        http = http_session(
            policy,
            json_serialize=_json_dumps,
            connector_args={"limit": 1024, "limit_per_host": 256, "ttl_dns_cache": 300},
            timeout=aiohttp.ClientTimeout(total=settings.provider_timeout_seconds),
        )
        notifier = Notifier()
        context = AdapterContext(
            http=http,
            timeout=settings.provider_timeout_seconds,
            environment=settings.env,
            egress=policy,
            public_url=settings.public_url,
        )
        return cls(
            settings,
            db,
            keyring,
            keys,
            redis,
            config,
            http,
            notifier,
            MessagingService(db, config, notifier, CallbackTargets(config, settings)),
            ChainBuilder(context),
            make_health(
                redis,
                HealthConfig(
                    window_seconds=settings.health_window_seconds,
                    bucket_seconds=min(
                        settings.health_bucket_seconds, settings.health_window_seconds
                    ),
                    min_samples=settings.health_min_samples,
                    cool_down_seconds=settings.health_cool_down_seconds,
                    half_open_probes=settings.health_half_open_probes,
                ),
            ),
            make_limiter(redis),
        )

    async def close(self) -> None:
        await self.messaging.writer.close()
        await self.chains.close()
        await self.limiter.close()
        await self.health.aclose()
        await self.http.close()
        await self.config.stop()
        if self.redis is not None:
            await self.redis.aclose()
        await self.db.dispose()


def egress_policy(settings: Settings) -> EgressPolicy:
    """The process's egress policy (`providers.egress`) from `CLINICOMM_EGRESS_*`."""
    return EgressPolicy.from_strings(
        allow_private=settings.egress_private_allowed,
        allow=settings.egress_allow_list,
        production=settings.production,
    )


def _json_dumps(value: Any) -> str:
    """Provider request bodies, serialised with orjson (several times faster than json)."""
    return orjson.dumps(value).decode()


def make_health(
    redis: Redis | None,
    config: HealthConfig | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> HealthTracker:
    """`RedisHealth` when a Redis client is given (every process shares one circuit per
    (clinic, provider)), else `InProcessHealth` (`clock` applies to it)."""
    if redis is None:
        return InProcessHealth(config, clock=clock)
    return RedisHealth(redis, config)
