"""The Kubernetes API client, built one way for every part that talks to the API server.

The broadcaster (custom objects: Agones resources are CRDs) and the auth callout (TokenReview)
both need a client of their own from a kubeconfig file or the pod's service account, and both
must turn every way a configuration can be unusable into one error that names its source. The
syncer never imports this package (an import-linter contract): it stays without the client.
"""

from kubeclient.loading import KubeConfigError, api_client

__all__ = ["KubeConfigError", "api_client"]
