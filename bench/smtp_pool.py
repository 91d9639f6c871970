"""SMTP adapter micro-bench: the pooled `SmtpAdapter` against raw aiosmtplib, one table.

    PYTHONPATH=src python -m bench.smtp_pool [--messages 3000] [--connections 5] [--concurrency 200]

(PYTHONPATH=src: the venv's editable install points at /work/main; this measures the checkout.)

Against Postfix `smtp-sink` (bench/sinks.py), in one run:

- adapter, pooled: `--concurrency` concurrent `adapter.send()` calls on one adapter with
  `maxConnections = --connections` (the pipeline's path, minus storage and routing);
- adapter, new connection per message: `maxMessagesPerConnection = 1` (connect, EHLO, send,
  QUIT each time), same concurrency;
- raw aiosmtplib, `--connections` connections opened once (bench/raw.py `smtp_pooled_rate`);
- raw aiosmtplib, a new connection per message, `--connections` at once.

Every row is messages per second with connection set-up of the pooled rows included only as it
happens in use (the adapter opens lazily). Target: pooled adapter >= 0.8 x raw pooled.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench import raw
from bench.sinks import SmtpSink
from clinicomm.providers.base import AdapterContext, Channel, OutboundMessage
from clinicomm.providers.email.smtp import SmtpAdapter, SmtpCredentials


def _message(i: int) -> OutboundMessage:
    return OutboundMessage(
        channel=Channel.EMAIL,
        to=f"patient{i}@example.com",
        reference=f"dlv_{i:06d}",
        subject="Appointment confirmed",
        text="Your appointment is at 10:30.",
        from_email="clinic@clinic-a.example",
        from_name="Clinic A",
    )


async def adapter_rate(
    host: str, port: int, *, count: int, connections: int, concurrency: int, per_connection: int
) -> float:
    """Messages per second through one SmtpAdapter, `concurrency` sends at once."""
    creds = SmtpCredentials.model_validate(
        {
            "host": host,
            "port": port,
            "requireTls": False,
            "maxConnections": connections,
            "maxMessagesPerConnection": per_connection,
        }
    )
    adapter = SmtpAdapter(creds, AdapterContext(http=None, timeout=30.0))
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await adapter.send(_message(i))

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - start)
    finally:
        await adapter.close()


async def main(messages: int, connections: int, concurrency: int) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    with SmtpSink() as sink:
        host, port = sink.host, sink.port
        # Warm-up (process-wide FQDN lookup, imports) not counted.
        await adapter_rate(host, port, count=50, connections=connections, concurrency=10,
                           per_connection=100)
        rows.append((f"adapter, pooled ({connections} connections, {concurrency} concurrent)",
                     await adapter_rate(host, port, count=messages, connections=connections,
                                        concurrency=concurrency, per_connection=100)))
        rows.append((f"adapter, new connection per message ({connections} at once)",
                     await adapter_rate(host, port, count=max(messages // 3, 100),
                                        connections=connections, concurrency=concurrency,
                                        per_connection=1)))
        rows.append((f"raw aiosmtplib, {connections} connections reused",
                     await raw.smtp_pooled_rate(host, port, count=messages,
                                                connections=connections)))
        rows.append((f"raw aiosmtplib, new connection per message ({connections} at once)",
                     await raw.smtp_new_connection_rate(host, port,
                                                        count=max(messages // 3, 100),
                                                        concurrency=connections)))
    return rows


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    rows = asyncio.run(main(args.messages, args.connections, args.concurrency))
    width = max(len(name) for name, _ in rows)
    print(f"{'path':<{width}}  msg/s")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:8.0f}")
    pooled, raw_pooled = rows[0][1], rows[2][1]
    print(f"\npooled adapter / raw pooled = {pooled / raw_pooled:.2f} (target >= 0.80)")


if __name__ == "__main__":
    run()
