"""A chaos soak: real network partitions and process kills at random, then exact convergence.

Development only (not in the wheel): it needs root for network namespaces. ``./dev chaos
[--minutes N] [--seed S]`` runs it; tests/faults/test_chaos.py runs a short fixed-seed soak.
"""
