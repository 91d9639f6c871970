"""Health and volume over time: hourly series from the attempts table, drawn as inline SVG.

`provider_series` reads one clinic's provider calls of the last `hours` and buckets them per
(channel, provider, hour) in Python (portable across SQLite and PostgreSQL; bounded by
`MAX_ROWS`, beyond which the answer says it is truncated). The SVG is built here, on the
server, with no script: every chart has a `<title>` and an `aria-label` summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape

from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.store.models import Delivery, DeliveryAttempt, aware

MAX_ROWS = 200_000
WIDTH, HEIGHT, PAD = 720, 160, 36


@dataclass
class Series:
    """One (channel, provider): per-hour counts and latencies, oldest hour first."""

    channel: str
    provider: str
    sent: list[int]
    failed: list[int]
    durations: list[list[int]] = field(repr=False)

    @property
    def total_sent(self) -> int:
        return sum(self.sent)

    @property
    def total_failed(self) -> int:
        return sum(self.failed)

    @property
    def success_rate(self) -> float | None:
        total = self.total_sent + self.total_failed
        return self.total_sent / total if total else None

    def percentile(self, p: int) -> int | None:
        values = sorted(v for hour in self.durations for v in hour)
        return nearest_rank(values, p)

    def hourly_percentile(self, p: int) -> list[int | None]:
        return [nearest_rank(sorted(hour), p) for hour in self.durations]

    def hourly_success(self) -> list[float | None]:
        return [s / (s + f) if s + f else None for s, f in zip(self.sent, self.failed, strict=True)]


def nearest_rank(values: list[int], p: int) -> int | None:
    """The nearest-rank percentile of sorted `values` (as `delivery.stats` computes it)."""
    if not values:
        return None
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


async def provider_series(
    session: AsyncSession, clinic_id: str, now: datetime, hours: int = 168
) -> tuple[list[Series], bool]:
    """(series per channel and provider, truncated) for the `hours` before `now`."""
    start = now - timedelta(hours=hours)
    rows = (
        await session.execute(
            select(
                Delivery.channel,
                DeliveryAttempt.provider,
                DeliveryAttempt.outcome,
                DeliveryAttempt.duration_ms,
                DeliveryAttempt.at,
            )
            .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
            .where(Delivery.clinic_id == clinic_id, DeliveryAttempt.at >= start)
            .order_by(DeliveryAttempt.id.desc())
            .limit(MAX_ROWS + 1)
        )
    ).all()
    truncated = len(rows) > MAX_ROWS
    found: dict[tuple[str, str], Series] = {}
    for channel, provider, outcome, duration, at in rows[:MAX_ROWS]:
        index = int((aware(at) - start).total_seconds() // 3600)
        if not 0 <= index < hours:
            continue
        series = found.get((channel, provider))
        if series is None:
            series = Series(channel, provider, [0] * hours, [0] * hours, [[] for _ in range(hours)])
            found[(channel, provider)] = series
        if outcome == "sent":
            series.sent[index] += 1
        else:
            series.failed[index] += 1
        series.durations[index].append(int(duration))
    return sorted(found.values(), key=lambda s: (s.channel, s.provider)), truncated


def _frame(title: str, summary: str, body: str, y_max: float, unit: str) -> Markup:
    axis = (
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 8}" y2="{HEIGHT - PAD}" class="axis"/>'
        f'<line x1="{PAD}" y1="8" x2="{PAD}" y2="{HEIGHT - PAD}" class="axis"/>'
        f'<text x="{PAD - 4}" y="14" class="tick" text-anchor="end">'
        f"{escape(_fmt(y_max))}{unit}</text>"
        f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" class="tick" text-anchor="end">0</text>'
        f'<text x="{PAD}" y="{HEIGHT - 10}" class="tick">7 days ago</text>'
        f'<text x="{WIDTH - 8}" y="{HEIGHT - 10}" class="tick" text-anchor="end">now</text>'
    )
    svg = (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(summary)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>{axis}{body}</svg>"
    )
    return Markup(svg)  # noqa: S704 - every interpolated text is escaped above


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.2f}"


def _x(index: int, count: int) -> float:
    return PAD + (WIDTH - 8 - PAD) * index / max(1, count)


def _y(value: float, y_max: float) -> float:
    return (HEIGHT - PAD) - (HEIGHT - PAD - 8) * (value / y_max if y_max else 0)


def volume_chart(series: Series) -> Markup:
    """Sent (stacked under failed) per hour, as bars."""
    count = len(series.sent)
    y_max = (
        float(max((s + f for s, f in zip(series.sent, series.failed, strict=True)), default=0))
        or 1.0
    )
    width = max(1.0, (WIDTH - 8 - PAD) / count - 0.5)
    bars: list[str] = []
    for i, (s, f) in enumerate(zip(series.sent, series.failed, strict=True)):
        x = _x(i, count)
        if s:
            top = _y(s, y_max)
            bars.append(
                f'<rect class="sent" x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" '
                f'height="{HEIGHT - PAD - top:.1f}"/>'
            )
        if f:
            top = _y(s + f, y_max)
            bars.append(
                f'<rect class="failed" x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" '
                f'height="{_y(s, y_max) - top:.1f}"/>'
            )
    summary = (
        f"{series.provider} {series.channel}: {series.total_sent} sent, "
        f"{series.total_failed} failed per hour over 7 days"
    )
    return _frame(f"Sent and failed per hour: {series.provider}", summary, "".join(bars), y_max, "")


def line_chart(
    title: str,
    summary: str,
    lines: dict[str, list[float | None]],
    unit: str,
    y_max: float | None = None,
) -> Markup:
    """Lines (one CSS class per name) over the hours; gaps where a value is None. The y axis
    goes to `y_max`, or to the largest value."""
    values = [v for line in lines.values() for v in line if v is not None]
    y_max = y_max or max(values, default=0.0) or 1.0
    body: list[str] = []
    for name, line in lines.items():
        count = len(line)
        runs: list[list[str]] = [[]]  # stretches of hours with a value
        for i, v in enumerate(line):
            if v is None:
                runs.append([])
            else:
                runs[-1].append(f"{_x(i, count):.1f},{_y(v, y_max):.1f}")
        for run in runs:
            if len(run) > 1:
                body.append(f'<polyline class="{escape(name)}" points="{" ".join(run)}"/>')
            elif run:
                x, y = run[0].split(",")
                body.append(f'<circle class="{escape(name)}" cx="{x}" cy="{y}" r="2"/>')
    return _frame(title, summary, "".join(body), y_max, unit)


def latency_chart(series: Series) -> Markup:
    p50, p95 = series.percentile(50), series.percentile(95)
    summary = f"{series.provider} latency over 7 days: p50 {p50} ms, p95 {p95} ms"
    lines: dict[str, list[float | None]] = {
        "p50": [float(v) if v is not None else None for v in series.hourly_percentile(50)],
        "p95": [float(v) if v is not None else None for v in series.hourly_percentile(95)],
    }
    return line_chart(f"Latency p50 and p95 per hour: {series.provider}", summary, lines, " ms")


def success_chart(series: Series) -> Markup:
    rate = series.success_rate
    summary = (
        f"{series.provider} success rate over 7 days: "
        f"{'no calls' if rate is None else f'{rate:.1%}'}"
    )
    hourly = [v * 100 if v is not None else None for v in series.hourly_success()]
    title = f"Success rate per hour: {series.provider}"
    return line_chart(title, summary, {"rate": hourly}, " %", 100.0)
