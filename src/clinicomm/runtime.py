"""Builds a process's shared objects from `Settings`: database, keys, caches, config service.

`Runtime` is what the HTTP app, the worker and the Python `Client` hold. It owns the Redis
connection and the aiohttp session, and closes them in `close()`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from clinicomm.config import Settings
from clinicomm.crypto import MasterKeyring
from clinicomm.settings.cache import ConfigCache
from clinicomm.settings.globals import load_global_settings
from clinicomm.settings.keys import KeyStore
from clinicomm.settings.service import ConfigService, ResolvedChannel
from clinicomm.store.db import Database, upgrade_async

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The process-wide objects; build with `Runtime.create(settings)`."""

    settings: Settings
    db: Database
    keyring: MasterKeyring
    keys: KeyStore
    redis: Redis | None
    config: ConfigService
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
            Redis.from_url(
                settings.redis_url,
                socket_connect_timeout=1.0,
                socket_timeout=2.0,
                health_check_interval=10,
            )
            if settings.redis_url
            else None
        )
        keys = KeyStore(keyring)
        cache: ConfigCache[ResolvedChannel] = ConfigCache(
            redis, ttl=settings.cache_ttl_seconds, ack_timeout=settings.invalidation_ack_timeout
        )
        config = ConfigService(
            db, keys, cache, global_settings, poll_seconds=settings.config_poll_seconds
        )
        await config.start()
        return cls(settings, db, keyring, keys, redis, config)

    async def close(self) -> None:
        await self.config.stop()
        if self.redis is not None:
            await self.redis.aclose()
        await self.db.dispose()
