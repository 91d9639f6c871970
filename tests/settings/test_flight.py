"""`SingleFlight`: concurrent calls for one key share one load, its result or its exception;
a cancelled leader leaves the others to load themselves; other keys never wait."""

from __future__ import annotations

import asyncio

import pytest

from clinicomm.settings.flight import SingleFlight


async def test_concurrent_calls_share_one_load_and_other_keys_do_not_wait() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls: list[str] = []
    gate = asyncio.Event()

    async def load(key: str) -> int:
        calls.append(key)
        n = len(calls)
        if key == "a":
            await gate.wait()
        return n

    a = [asyncio.ensure_future(flight.run("a", lambda: load("a"))) for _ in range(10)]
    await asyncio.sleep(0)
    assert await flight.run("b", lambda: load("b")) == 2  # "a" is still waiting
    gate.set()
    assert await asyncio.gather(*a) == [1] * 10
    assert calls == ["a", "b"]
    assert await flight.run("a", lambda: load("a")) == 3  # nothing kept after the flight


async def test_the_loads_exception_reaches_every_caller() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0

    async def broken() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("database down")

    results = await asyncio.gather(
        *(flight.run("k", broken) for _ in range(5)), return_exceptions=True
    )
    assert calls == 1 and all(isinstance(r, RuntimeError) for r in results)


async def test_a_cancelled_leader_leaves_the_others_to_load() -> None:
    flight: SingleFlight[str] = SingleFlight()
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return f"load {calls}"

    leader = asyncio.ensure_future(flight.run("k", load))
    await asyncio.sleep(0)
    follower = asyncio.ensure_future(flight.run("k", load))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await follower == "load 2"


async def test_a_cancelled_follower_does_not_cancel_the_load() -> None:
    flight: SingleFlight[str] = SingleFlight()

    async def load() -> str:
        await asyncio.sleep(0.05)
        return "done"

    leader = asyncio.ensure_future(flight.run("k", load))
    await asyncio.sleep(0)
    follower = asyncio.ensure_future(flight.run("k", load))
    await asyncio.sleep(0)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    assert await leader == "done"
