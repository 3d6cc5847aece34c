import pytest


@pytest.fixture(scope="module")
def megatron_single():
    """A one-process gloo world with megatron's parallel state (TP=PP=1)."""
    from megatron_vlm.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(tp=1, pp=1)
    yield
    destroy_distributed()
