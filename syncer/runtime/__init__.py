"""The container runtime's clients: CRI over gRPC, containerd's images service.

``cri`` is the syncer's only way to touch images, ``criobjects`` the plain values it answers
with, ``containerd_images`` the native client that reads and labels image records (pins). The
generated stubs they use stay in ``syncer/cri_api`` and ``syncer/containerd_api``.
"""
