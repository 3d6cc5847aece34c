"""Fixtures of the cluster-readiness tests: the demo shards (megatron_single is tests/conftest.py's)."""

# The training tests' demo corpus (one build per session) and repo-like working directory.
from tests.training.conftest import demo_data, workdir  # noqa: E402,F401
