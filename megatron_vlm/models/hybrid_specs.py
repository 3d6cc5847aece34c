"""Layer specs (ModuleSpec) for the Nemotron-H hybrid stack on megatron-core's MambaModel.

Two specs with one parameter layout, picked automatically:

* ``te``: TransformerEngine linears with the pre-norm fused in (``TELayerNormColumnParallelLinear``),
  ``TEDotProductAttention``, ``TENorm`` -- megatron's own ``mamba_stack_spec`` with the Mamba
  mixer swapped for :class:`HybridMambaMixer` (which itself uses the mamba-ssm kernels on CUDA).
* ``local``: megatron's local Column/RowParallelLinear, with :class:`NormColumnParallelLinear`
  standing in for TE's fused norm+linear, :class:`LocalCoreAttention` (packed sequences on CPU)
  and :class:`RMSNorm`. Runs on CPU.

Both give the parameter names (per layer ``i``, in ``decoder.layers.i``)::

    M: mixer.in_proj.{weight,layer_norm_weight} mixer.conv1d.{weight,bias} mixer.{dt_bias,A_log,D}
       mixer.norm.weight mixer.out_proj.weight
    *: self_attention.linear_qkv.{weight,layer_norm_weight} self_attention.linear_proj.weight
    -: mlp.linear_fc1.{weight,layer_norm_weight} mlp.linear_fc2.weight
    decoder.final_norm.weight, embedding.word_embeddings.weight, output_layer.weight

i.e. every layer's pre-norm weight lives as ``layer_norm_weight`` in the layer's first linear
(TE's convention, also what Megatron-LM Nemotron-H checkpoints contain), never as a separate
``norm`` / ``input_layernorm`` module. TE modules additionally carry ``_extra_state`` entries
(FP8 metadata); the local modules return None for it.

The choice of modules per implementation (``spec_modules``) and the attention / MLP blocks
(``attention_block``, ``mlp_block``) also build the ViT's and the connector's specs.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_vlm.models.core_attention import LocalCoreAttention
from megatron_vlm.models.mamba_mixer import HybridMambaMixer
from megatron_vlm.models.norms import NormColumnParallelLinear, RMSNorm


def te_available() -> bool:
    """TransformerEngine importable and a GPU present (TE's modules need CUDA)."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:  # pragma: no cover
        return False
    return bool(HAVE_TE) and torch.cuda.is_available()


@dataclass
class MixerSubmodules:
    """Linear layers of the Mamba mixer (megatron's MambaMixerSubmodules, which cannot be imported
    without Triton)."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


@dataclass
class HybridStackSubmodules(MambaStackSubmodules):
    """MambaStackSubmodules plus the final norm, which megatron hard-codes to TENorm."""

    final_norm: Union[ModuleSpec, type] = None


class HybridStack(MambaStack):
    """megatron's MambaStack with the final norm taken from the spec.

    MambaStack builds ``final_norm`` with TENorm unconditionally, which cannot exist without TE;
    everything else (layer allocation from ``hybrid_override_pattern``, pipeline split, sharded
    state dict) is megatron's.
    """

    def __init__(self, config, submodules: HybridStackSubmodules, *args,
                 post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = build_module(submodules.final_norm, config=config,
                                           hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)

    # ---- full activation recompute (megatron's MambaStack has none) -------------------------
    def forward(self, hidden_states, attention_mask, inference_context=None, rotary_pos_emb=None,
                *, packed_seq_params=None, **kwargs):
        """megatron's forward, except in training with ``recompute_granularity == "full"``:
        then chunks of layers keep only their input and run again in the backward pass
        (``recompute_method`` uniform: every ``recompute_num_layers`` layers; block: the first
        ``recompute_num_layers`` layers of the stage), as megatron's TransformerBlock does."""
        if not (self.training and self.config.recompute_granularity == "full"
                and inference_context is None):
            return super().forward(hidden_states, attention_mask, inference_context,
                                   rotary_pos_emb, packed_seq_params=packed_seq_params, **kwargs)
        return self._checkpointed_forward(hidden_states, attention_mask, packed_seq_params)

    def _run_layers(self, start: int, end: int, hidden_states, attention_mask, packed_seq_params):
        from contextlib import nullcontext

        from megatron.core.enums import Fp8Recipe
        from megatron.core.fp8_utils import get_fp8_context

        inner = self.config.fp8 and self.config.fp8_recipe != Fp8Recipe.delayed
        for layer in self.layers[start:end]:
            context = get_fp8_context(self.config, layer.layer_number - 1) if inner else nullcontext()
            with context:
                if isinstance(layer, TransformerLayer):
                    hidden_states, _ = layer(hidden_states=hidden_states,
                                             attention_mask=attention_mask,
                                             packed_seq_params=packed_seq_params)
                else:  # MambaLayer, or megatron's MLPLayer / our attention layers' tuples
                    hidden_states = layer(hidden_states=hidden_states,
                                          attention_mask=attention_mask,
                                          packed_seq_params=packed_seq_params)
            if isinstance(hidden_states, tuple):
                hidden_states = hidden_states[0]
        return hidden_states

    def _checkpointed_forward(self, hidden_states, attention_mask, packed_seq_params):
        from contextlib import nullcontext

        from megatron.core import tensor_parallel
        from megatron.core.enums import Fp8Recipe
        from megatron.core.fp8_utils import get_fp8_context
        from megatron.core.utils import WrappedTensor, make_viewless_tensor

        if not self.pre_process:
            hidden_states = self.input_tensor
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        cfg = self.config

        def checkpointed(start, end, hidden):
            def run(h, mask):
                return self._run_layers(start, end, h, mask, packed_seq_params)

            if cfg.fp8:  # TransformerEngine's checkpoint keeps the FP8 scaling state consistent
                from megatron.core.extensions.transformer_engine import te_checkpoint

                return te_checkpoint(run, cfg.distribute_saved_activations,
                                     tensor_parallel.random.get_cuda_rng_tracker,
                                     self.pg_collection.tp, hidden, attention_mask)
            return tensor_parallel.checkpoint(run, cfg.distribute_saved_activations, hidden,
                                              attention_mask)

        n, k = len(self.layers), cfg.recompute_num_layers
        outer = get_fp8_context(cfg) if cfg.fp8 and cfg.fp8_recipe == Fp8Recipe.delayed \
            else nullcontext()
        with outer:
            if cfg.recompute_method == "uniform":
                for start in range(0, n, k):
                    hidden_states = checkpointed(start, min(start + k, n), hidden_states)
            else:  # block: the first k layers recomputed, the rest kept
                for i in range(n):
                    if i < k:
                        hidden_states = checkpointed(i, i + 1, hidden_states)
                    else:
                        hidden_states = self._run_layers(i, i + 1, hidden_states, attention_mask,
                                                         packed_seq_params)
        if self.post_process and self.post_layer_norm:
            hidden_states = self.final_norm(hidden_states)
        return make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad,
                                    keep_graph=True)


def resolved_impl(impl: str = "auto") -> str:
    """The implementation ``get_hybrid_stack_spec(impl)`` picks."""
    return ("te" if te_available() else "local") if impl == "auto" else impl


@dataclass(frozen=True)
class SpecModules:
    """The modules that fill the slots of a spec (the LLM's, the ViT's, the connector's)."""

    norm_linear: type  # the block's pre-norm fused into its first (column-parallel) linear
    row_linear: type
    core_attention: type
    norm: type


def spec_modules(impl: str, what: str, local_norm_linear: type = NormColumnParallelLinear
                 ) -> SpecModules:
    """Modules of ``impl``: "te", "local" or "auto" (TE when importable with a GPU, else local).

    ``local_norm_linear``: the local fused norm + linear (RMSNorm by default; the ViT's is
    LayerNorm). TE's one reads the norm from the config. ``what`` names the spec in errors.
    """
    impl = resolved_impl(impl)
    if impl == "local":
        return SpecModules(local_norm_linear, RowParallelLinear, LocalCoreAttention, RMSNorm)
    if impl == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return SpecModules(TELayerNormColumnParallelLinear, TERowParallelLinear,
                           TEDotProductAttention, TENorm)
    raise ValueError(f"unknown {what} implementation {impl!r} (te, local or auto)")


def mlp_submodules(modules: SpecModules) -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=modules.norm_linear, linear_fc2=modules.row_linear)


def attention_block(modules: SpecModules, attn_mask_type: AttnMaskType) -> dict:
    """``TransformerLayerSubmodules`` fields of a pre-norm self-attention block with residual."""
    return dict(
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": attn_mask_type},
            submodules=SelfAttentionSubmodules(
                linear_qkv=modules.norm_linear,
                core_attention=modules.core_attention,
                linear_proj=modules.row_linear,
            ),
        ),
        self_attn_bda=get_bias_dropout_add,
    )


def mlp_block(modules: SpecModules) -> dict:
    """``TransformerLayerSubmodules`` fields of a pre-norm MLP block with residual."""
    return dict(mlp=ModuleSpec(module=MLP, submodules=mlp_submodules(modules)),
                mlp_bda=get_bias_dropout_add)


def _layer_specs(modules: SpecModules, mixer_params: dict):
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    mixer=ModuleSpec(
                        module=HybridMambaMixer,
                        params=dict(mixer_params),
                        submodules=MixerSubmodules(in_proj=modules.norm_linear,
                                                   out_proj=modules.row_linear),
                    ),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    **attention_block(modules, AttnMaskType.causal)),
            ),
            mlp_layer=ModuleSpec(module=MLPLayer,
                                 submodules=TransformerLayerSubmodules(**mlp_block(modules))),
            final_norm=modules.norm,
        ),
    )


def get_hybrid_stack_spec(
    impl: str = "auto",
    chunk_size: int = 128,
    dt_clamp_min: Optional[float] = None,
    mamba_norm_eps: float = 1e-5,
    conv_kernel: int = 4,
) -> ModuleSpec:
    """Spec for ``MambaModel(mamba_stack_spec=...)``.

    impl: "te", "local" or "auto" (TE when importable with a GPU, else local).
    The other arguments are Mamba mixer settings that TransformerConfig does not carry.
    """
    mixer_params = dict(chunk_size=chunk_size, dt_clamp_min=dt_clamp_min,
                        norm_eps=mamba_norm_eps, d_conv=conv_kernel)
    return _layer_specs(spec_modules(impl, "hybrid spec"), mixer_params)
