"""Generated CRI stubs (runtime.v1: ImageService, ListContainers); regenerate: `just proto`.

The stubs are committed so that the syncer needs no protoc at run time;
tests/unit/test_proto_stubs.py fails when they drift from proto/runtime/v1/api.proto.
"""
