"""Fixtures of the vision tests: a single-process megatron (gloo) in the test process."""

import pytest


@pytest.fixture(scope="session")
def megatron_single():
    """tp = pp = 1 in this process; megatron's parallel state must exist to build its layers."""
    from megatron_vlm.distributed import initialize_distributed

    initialize_distributed(tp=1, pp=1)
    yield
