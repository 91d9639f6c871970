"""Benchmark harness for clinicomm: local provider sinks, raw-client ceilings, end-to-end runs.

See ``bench/README`` text in the project README and ``/work/shared/design/PERFORMANCE.md``.
"""
