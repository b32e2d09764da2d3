"""Pulling: getting the images the fold wants onto the node, and keeping them there.

The ``inventory`` is the one owner of what the node holds and asks for pulls; the ``puller``
pulls (bounded, timed out, backed off), within the cluster-wide ``pullbudget`` (its slots are
``leases``), through a mirror after a few seeds (``seeding``) and with the registry credentials
of ``registryauth``; ``reconcile`` re-checks the runtime every period; ``runtimehealth`` follows
whether the runtime answers.
"""
