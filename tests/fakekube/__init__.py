"""A protocol-faithful fake Kubernetes API server for agones.dev/v1, for broadcaster tests."""

from .server import FakeKube

__all__ = ["FakeKube"]
