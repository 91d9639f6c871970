"""Benchmark harness for clinicomm: local provider sinks, raw-client ceilings, end-to-end runs.

See the Benchmarks section of the project README. The targets are the design notes'
(PERFORMANCE.md); ``bench/run.py`` carries them and ``bench/RESULTS.md`` records each run.
"""
