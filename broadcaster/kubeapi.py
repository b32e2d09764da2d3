"""The Kubernetes API client, from a kubeconfig file or the pod's service account.

Only the broadcaster talks to the API server, and only through this client and the custom objects
API: Agones resources are CRDs, so no typed models are involved.
"""

from __future__ import annotations

from kubernetes import client

from kubeclient import KubeConfigError, api_client

__all__ = ["KubeConfigError", "custom_objects_api"]


def custom_objects_api(kubeconfig: str | None) -> client.CustomObjectsApi:
    """A client of its own (never the process-global default), so tests can run several."""
    return client.CustomObjectsApi(api_client(kubeconfig))
