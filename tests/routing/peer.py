"""A second process for the cross-process health and limit tests (not a test module).

`python tests/routing/peer.py <redis_url>` prints `{"ready": true}`, then answers one JSON
command per stdin line with one JSON line:

- `{"op": "allow"|"state"|"record", "clinic", "provider", "outcome"?}` against `RedisHealth`
  (cool-down and window from `"config"` when given);
- `{"op": "acquire_all", "key": [...], "limits": [[n, s]], "count": N}`: acquires N events,
  sleeping the returned wait between refusals; answers the admission times (server clock).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from redis.asyncio import Redis

from clinicomm.routing.health import HealthConfig, Outcome
from clinicomm.routing.health_redis import RedisHealth
from clinicomm.routing.limits import RedisLimiter


async def acquire_all(limiter: RedisLimiter, cmd: dict[str, Any]) -> list[float]:
    limits = [(int(n), float(s)) for n, s in cmd["limits"]]
    times: list[float] = []
    while len(times) < cmd["count"]:
        admission = await limiter.try_acquire(cmd["key"], limits)
        if admission.admitted:
            times.append(admission.at)
        else:
            await asyncio.sleep(admission.wait)
    return times


async def main(url: str) -> None:
    redis = Redis.from_url(url)
    limiter = RedisLimiter(redis)
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "acquire_all":
                print(json.dumps({"times": await acquire_all(limiter, cmd)}), flush=True)
                continue
            health = RedisHealth(redis, HealthConfig(**cmd.get("config", {})))
            clinic, provider = cmd["clinic"], cmd["provider"]
            if op == "allow":
                answer: Any = await health.allow(clinic, provider)
            elif op == "record":
                answer = (await health.record(clinic, provider, Outcome(cmd["outcome"]))).circuit
            else:
                answer = (await health.state(clinic, provider)).circuit
            print(json.dumps({"answer": answer}), flush=True)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
