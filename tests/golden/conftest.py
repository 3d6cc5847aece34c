from tests.training.conftest import demo_data, workdir  # noqa: F401
