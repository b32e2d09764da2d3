"""The Kubernetes API client, from a kubeconfig file or the pod's service account.

Only the broadcaster talks to the API server, and only through this client and the custom objects
API: Agones resources are CRDs, so no typed models are involved.
"""

from __future__ import annotations

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

__all__ = ["KubeConfigError", "custom_objects_api"]


class KubeConfigError(RuntimeError):
    """No usable Kubernetes configuration; the text says which source was tried."""


def custom_objects_api(kubeconfig: str | None) -> client.CustomObjectsApi:
    """A client of its own (never the process-global default), so tests can run several."""
    try:
        if kubeconfig:
            api_client = config.new_client_from_config(config_file=kubeconfig)
        else:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
    except (ConfigException, OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        # The client walks the YAML without checking its shape: a file of the wrong shape
        # surfaces as TypeError/AttributeError/KeyError from deep inside it.
        source = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster config"
        raise KubeConfigError(f"cannot load {source}: {e}") from e
    return client.CustomObjectsApi(api_client)
