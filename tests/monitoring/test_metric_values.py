"""`telemetry.metrics`' Counter and Histogram (lock-free values, bisected buckets) expose
exactly what prometheus_client's own do for the same observations."""

from __future__ import annotations

import math

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from clinicomm.telemetry import metrics

BOUNDS = (0.00001, 0.0005, 0.001, 0.01, 0.5, 1)
AMOUNTS = [0, -1, 1e-6, *BOUNDS, *(b * 1.0001 for b in BOUNDS), 0.3, 2, 1e9, math.inf]


def _exposed(kind: str, amounts: list[float], exemplar: bool = False) -> bytes:
    registry = CollectorRegistry()
    theirs = getattr(prometheus_client, kind)
    ours = getattr(metrics, kind)
    for name, cls in (("lib", theirs), ("ours", ours)):
        options = {"buckets": BOUNDS} if kind == "Histogram" else {}
        metric = cls(f"t_{name}", "help", ["clinicId"], registry=registry, **options)
        child = metric.labels("c-1")
        for amount in amounts:
            if kind == "Histogram":
                child.observe(amount, {"trace": "t"} if exemplar else None)
            else:
                child.inc(abs(amount) if math.isfinite(amount) else 1)
    text = generate_latest(registry)
    lib = b"\n".join(
        line for line in text.splitlines() if b"t_lib" in line and b"created" not in line
    )
    own = b"\n".join(
        line for line in text.splitlines() if b"t_ours" in line and b"created" not in line
    )
    return lib.replace(b"t_lib", b"T") + b"|" + own.replace(b"t_ours", b"T")


@pytest.mark.parametrize("kind", ["Counter", "Histogram"])
def test_the_same_exposition_as_the_librarys(kind: str) -> None:
    lib, own = _exposed(kind, AMOUNTS).split(b"|")
    assert lib == own
    assert b"T_bucket" in own if kind == "Histogram" else b"T_total" in own


def test_a_nan_and_an_exemplar_take_the_librarys_path() -> None:
    lib, own = _exposed("Histogram", [0.2, math.nan, 0.4]).split(b"|")
    assert lib == own
    lib, own = _exposed("Histogram", [0.2, 0.4], exemplar=True).split(b"|")
    assert lib == own


def test_the_librarys_checks_still_apply() -> None:
    registry = CollectorRegistry()
    counter = metrics.Counter("t_checks", "help", ["clinicId"], registry=registry)
    histogram = metrics.Histogram("t_checks_h", "help", ["clinicId"], registry=registry)
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("c-1").inc(-1)
    with pytest.raises(ValueError, match="missing label values"):
        counter.inc()
    with pytest.raises(ValueError, match="missing label values"):
        histogram.observe(0.1)


def test_the_services_metrics_use_them() -> None:
    assert isinstance(metrics.HTTP_REQUESTS, metrics.Counter)
    assert isinstance(metrics.HTTP_LATENCY, metrics.Histogram)
    assert isinstance(metrics.HTTP_LATENCY.labels("GET", "unmatched")._sum, metrics.LoopValue)
