"""This node itself: its Node object, its taints, the images it keeps for itself.

``nodeinfo`` reads the Node (labels and taints) without a client library; ``nodetaints`` removes
one taint; ``nodeimages`` are ``--extra-image`` and the node-wide images the broadcaster
publishes; ``startupgate`` keeps new game servers off the node until the images are there;
``gatekeeper`` wires the last two to the rest of the syncer.
"""
