"""The training tests' demo corpus and CLI launcher, shared with the reliability tests."""

from tests.training.conftest import demo_data, launch_train, read_log, workdir  # noqa: F401
