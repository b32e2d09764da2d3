"""Keeping: which pulled images stay on the node, and which go.

``keeper`` holds the three protections against the kubelet's image GC together: ``pinning`` (and
``criopins``, CRI-O's pinned_images drop-in), the ``diskbudget`` and ``gcfight``. ``cleaner`` is
the rule of ``--remove-unused`` (only our own pulls, after a grace) and its ledger;
``unusedimages`` runs it in the syncer.
"""
