"""The build-info metric every process exports: which version is running where.

``image_syncer_build_info{version="0.1.0"} 1`` is the Prometheus convention for joining a version
onto other series (``* on(instance) group_left(version)``) and for spotting a half-finished
rollout. Set once, by whoever serves /metrics (``ops.serving.serve_http``).
"""

from __future__ import annotations

import importlib.metadata
import platform

from prometheus_client import Gauge

__all__ = ["BUILD_INFO", "package_version", "record_build_info"]

BUILD_INFO = Gauge(
    "image_syncer_build_info",
    "Always 1; the labels say which image-syncer version and Python run this process.",
    ["version", "python"],
)


def package_version() -> str:
    try:
        return importlib.metadata.version("image-syncer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def record_build_info() -> None:
    BUILD_INFO.labels(package_version(), platform.python_version()).set(1)
