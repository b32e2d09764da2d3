"""Telling the cluster: this node's status, and the operators' replay requests.

``nodestate`` takes the node's state from memory (no I/O); ``reporter`` writes it to the status
bucket when it changed; ``replaykv`` is where an operator's replay request waits (KV) and how it
is completed; ``replayrequests`` honours them in the running syncer.
"""
