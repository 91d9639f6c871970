"""Ground-level telemetry: Prometheus metrics and structured logs (imports nothing of clinicomm)."""
