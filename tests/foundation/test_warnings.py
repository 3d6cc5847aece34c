"""Known third-party noise is silenced by exact message only; anything else, ours included, shows."""

import warnings

import pytest
from _pytest.config import parse_warning_filter

from megatron_vlm.known_warnings import KNOWN_NOISE, ignore_known_noise, pytest_filter_lines

# The messages as megatron-core 0.16.1 / torch 2.13 print them (collected with -W default).
SEEN = [
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local "
                  "implementations of multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale"),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    (DeprecationWarning, "Warning: tp_group is None, using default tp group. Passing tp_group will "
                         "be mandatory soon"),
    (DeprecationWarning, "MLP requires ffn_hidden_size, but it was not provided. Using"
                         "                     config.ffn_hidden_size by default."),
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                    "`torch.distributed.reduce_scatter_single` instead."),
]


def _shown(category, message, module="megatron.core.fake"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        ignore_known_noise()
        warnings.warn_explicit(message, category, "fake.py", 1, module=module)
    return len(caught)


@pytest.mark.parametrize("category,message", SEEN)
def test_known_noise_is_ignored(category, message):
    assert _shown(category, message) == 0


def test_other_warnings_show():
    # A new deprecation, a known message of another category, a known message with more after it.
    assert _shown(DeprecationWarning, "MambaStack.forward: argument x is deprecated") == 1
    assert _shown(DeprecationWarning, "Apex is not installed. Falling back to Torch Norm") == 1
    assert _shown(UserWarning, "Apex is not installed. Falling back to Torch Norm, and more") == 1


def test_ours_show_once():
    registry = {}  # the warning module's __warningregistry__
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        ignore_known_noise()
        for line in (7, 7, 9):
            warnings.warn_explicit("projector_norm_eps=1e-6 differs", UserWarning, "hf.py", line,
                                   module="megatron_vlm.conversion.hf", registry=registry)
    assert len(caught) == 1


def test_pytest_lines_parse_and_match_the_list():
    lines = pytest_filter_lines()
    assert len(lines) == len(KNOWN_NOISE) + 1
    for line in lines:
        action, message, category, module, lineno = parse_warning_filter(line, escape=False)
        assert action in ("ignore", "once")
