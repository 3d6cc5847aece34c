"""Fixtures of the cluster-readiness tests: single-process megatron and the demo shards."""

import pytest


@pytest.fixture(scope="session")
def megatron_single():
    """tp = pp = 1 in this process; megatron's parallel state must exist to build its layers."""
    from megatron_vlm.distributed import initialize_distributed

    initialize_distributed(tp=1, pp=1)
    yield


# The training tests' demo corpus (one build per session) and repo-like working directory.
from tests.training.conftest import demo_data, workdir  # noqa: E402,F401
