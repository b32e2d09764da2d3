"""Benchmarks: each measures one figure of image-syncer against a raw baseline in the same run.

Every benchmark is a module runnable alone (``python -m bench.replay --quick``) that prints one
JSON line: the figure, its unit, the raw baseline measured on the same machine in the same run,
their ratio, the target and whether it was met, plus the parameters it ran with. ``python -m
bench [NAME ...]`` runs all of them, or the named ones, each in its own process so that one's
memory, threads and event loop cannot colour another's figures.
"""
