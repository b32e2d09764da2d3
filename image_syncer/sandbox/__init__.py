"""Real NATS, containerd and registry processes on loopback, for the demo, the tests and bench/.

Each launcher starts the real binary on free loopback ports with its state in a directory it is
given, waits until the process says it is ready, and stops it on exit. Nothing here is a fake.
"""
