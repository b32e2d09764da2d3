"""A Kubernetes ``ApiClient`` from a kubeconfig file or the in-cluster service account."""

from __future__ import annotations

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

__all__ = ["KubeConfigError", "api_client"]


class KubeConfigError(RuntimeError):
    """No usable Kubernetes configuration; the text says which source was tried."""


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """A client of its own (never the process-global default), so tests can run several.

    ``kubeconfig`` is a file's path; empty or None means the pod's service account.
    """
    try:
        if kubeconfig:
            loaded: client.ApiClient = config.new_client_from_config(config_file=kubeconfig)
            return loaded
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except (ConfigException, OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        # The client walks the YAML without checking its shape: a file of the wrong shape
        # surfaces as TypeError/AttributeError/KeyError from deep inside it.
        source = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster config"
        raise KubeConfigError(f"cannot load {source}: {e}") from e
