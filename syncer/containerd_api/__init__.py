"""Generated stubs of containerd's native images service (Get, List, Update): `just proto`.

Committed, like the CRI stubs, so the syncer needs no protoc at run time;
tests/unit/test_proto_stubs.py fails when they drift from proto/containerd.
"""
