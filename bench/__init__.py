"""mvz benchmark suite: latency per stage, compute floor, fidelity against a reference, quality by rewards.

Entry points: :func:`bench.suite.run_bench` (what ``mvz bench`` calls), :mod:`bench.report` (report.json
schema, report.md, ``--compare``), :mod:`bench.gpu_check` (the prepared one-GPU script).
"""

SCHEMA_VERSION = 1
