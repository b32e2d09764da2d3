"""Folding: an event into the node's desired state, Fleet -> images. Pure, no I/O.

``desired`` is the fold itself, ``transitions`` the log lines of what an event changed;
``filtering`` (opt-out, label selector) and ``scheduling`` (could a game server land here) decide
which Fleets this node admits; ``references`` puts image references in one normal form, so the
Fleet's spelling and the runtime's compare.
"""
