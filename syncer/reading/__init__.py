"""Reading the event log: how a Fleet event reaches this node.

The start-up replay folds the whole log (``replay``); then the node's own durable consumer
(``durable``) is long-polled (``longpoll``) by the live loop (``consumer``), and each delivered
event is folded, pulled for and acked (``dispatch``). ``antientropy`` folds the whole log again
now and then, for what no event will ever say.
"""
