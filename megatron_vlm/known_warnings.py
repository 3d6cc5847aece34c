"""Third-party warnings that are known noise, each silenced by its exact message; nothing wholesale.

Every entry names the category, a regex of the whole message and why it is not actionable here. A
warning not listed (a new megatron-core or transformers deprecation, say one that touches the
classes we subclass or patch) is shown. Our own warnings are shown once per process.

The commands call :func:`ignore_known_noise` at start; the test suite adds the same list to
pytest's ``filterwarnings`` (tests/conftest.py), so both see exactly the same warnings.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Type


class KnownWarning(NamedTuple):
    category: Type[Warning]
    message: str  # regex matched against the whole message
    why: str


KNOWN_NOISE = (
    KnownWarning(UserWarning,
                 r"Transformer Engine and Apex are not installed\. Falling back to (Torch "
                 r"optimizers|local implementations of multi_tensor_applier"
                 r"(, multi_tensor_l2norm,)? and multi_tensor_scale)\.?",
                 "megatron-core at import without TransformerEngine/Apex: the CPU path, expected"),
    KnownWarning(UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
                 "megatron-core without Apex: the CPU path, expected"),
    KnownWarning(DeprecationWarning, r"`torch\.jit\.script_method` is deprecated\. Please switch to "
                 r"`torch\.compile` or `torch\.export`\.",
                 "megatron-core's jit helpers at import; we disable compilation on CPU"),
    KnownWarning(DeprecationWarning,
                 r"The following imports from `dynamic_context\.py` will be removed in this file in "
                 r"`megatron-core` 0\.14\..*",
                 "megatron-core's own inference package imports itself the old way"),
    KnownWarning(DeprecationWarning,
                 r"Warning: tp_group is None, using default tp group\. Passing tp_group will be "
                 r"mandatory soon",
                 "megatron-core's layers built from specs without a process-group collection; the "
                 "default group is the one we initialise"),
    KnownWarning(DeprecationWarning,
                 r"MLP requires ffn_hidden_size, but it was not provided\. Using\s+"
                 r"config\.ffn_hidden_size by default\.",
                 "megatron-core's own layer specs build the MLP this way"),
    KnownWarning(UserWarning,
                 r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed\..*",
                 "megatron-core's distributed optimizer reads .grad of its shard views in zero_grad "
                 "(attributed to platform.py, whose CPU mode forwards the access)"),
    KnownWarning(UserWarning,
                 r"If you are using transformer_engine as the transformer implementation, the "
                 r"core_attn is from transformer_engine and may be the fused version\. .*",
                 "megatron-core's advice on every selective recompute; recompute.mode: selective "
                 "means recomputing the core attention (recipe.py), the recipe's choice"),
    KnownWarning(FutureWarning,
                 r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                 r"deprecated\. Please use `torch\.distributed\.(reduce_scatter|all_gather)_single` "
                 r"instead\.",
                 "megatron-core's distributed optimizer and DDP call the old torch collectives"),
)

# Our modules: a warning of ours is actionable, shown once rather than per call.
OURS = r"megatron_vlm(\.|$)"


def ignore_known_noise() -> None:
    """Put the filters in front of the others (calling it again after another part of the program
    added filters, e.g. run_report's "once" per category, puts them in front again)."""
    warnings.filterwarnings("once", module=OURS)
    # After "once" for our modules: a known third-party message forwarded by platform.py's CPU
    # mode is attributed to our module but stays ignored.
    for known in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=known.message + "$", category=known.category)


def pytest_filter_lines() -> list:
    """The same filters in pytest's ``filterwarnings`` syntax (a colon would split the fields)."""
    lines = [f"ignore:{k.message.replace(':', chr(92) + 'x3a')}$:{k.category.__name__}"
             for k in KNOWN_NOISE]
    return [f"once:::{OURS}"] + lines  # pytest applies them in order, the last one first
