"""What the tests share, imported as ``support.<module>`` (tests/ is on sys.path through
tests/conftest.py): harnesses that run the syncer and the broadcaster, the Fleet dicts, polling
with a deadline, link cuts and proxies, tmpfs, the kustomize builds, the fake Kubernetes API's
harness and shapes (fakekube, kubeshapes, fakenodeapi), the admission-policy evaluator. No test
module imports another test module: what two of them need lives here.
"""
