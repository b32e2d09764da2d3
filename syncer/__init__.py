"""The node syncer: one per node, folds the Fleet event log, pulls through CRI into the runtime.

A Fleet event travels through the stages in this order, one package each: ``reading`` (the log)
-> ``folding`` (the desired state) -> ``pulling`` (the images onto the node) -> ``runtime`` (the
container runtime's clients); beside them ``keeping`` (what stays, what goes), ``node`` (this
node's Node, taints and startup gate) and ``reporting`` (the status the cluster reads).
``assembly`` builds the parts and wires them together, ``runner`` starts, runs and stops them;
``settings`` and ``metrics`` are read by every stage, and ``following`` is the pushed per-node
consumer that both ``node`` (node images) and ``reporting`` (replay requests) use. The layers
between the packages are an import-linter contract in pyproject.toml.
"""
