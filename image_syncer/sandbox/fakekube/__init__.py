"""A protocol-faithful fake Kubernetes API server: the one piece of the sandbox that is not real.

No kube-apiserver can be installed where the tests and the demo run, so this serves the resources
image-syncer uses (Agones Fleets and GameServers, the agones-controller Deployment, Nodes) with the
real URLs, bodies and status codes. Broadcaster tests drive it through the real ``kubernetes``
client; syncer tests and the demo's cold node through the syncer's own HTTP calls.
"""

from .server import AdmissionAttributes, Denial, FakeKube

__all__ = ["AdmissionAttributes", "Denial", "FakeKube"]
