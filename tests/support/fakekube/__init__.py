"""The fake Kubernetes API server (image_syncer/sandbox/fakekube), and what broadcaster tests share."""

from image_syncer.sandbox.fakekube import FakeKube

__all__ = ["FakeKube"]
