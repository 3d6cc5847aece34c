"""ViT layer specs (megatron ``ModuleSpec``) for the RADIO tower: TE and local, one parameter layout.

Each layer is megatron's ``TransformerLayer``: pre-LayerNorm self-attention (qkv and output
biases, no mask) and a pre-LayerNorm GELU MLP with biases, both with residuals. The pre-norms are
fused into the first linear of each block (TE's convention), so both specs name the parameters of
layer ``i`` (in ``decoder.layers.i``)::

    self_attention.linear_qkv.{layer_norm_weight,layer_norm_bias,weight,bias}
    self_attention.linear_proj.{weight,bias}
    mlp.linear_fc1.{layer_norm_weight,layer_norm_bias,weight,bias}
    mlp.linear_fc2.{weight,bias}

The two specs differ only in which modules fill the slots (ModuleSpec swap, no forked layers).
megatron's own ``get_vit_layer_with_local_spec`` is not used: it masks causally and its local
``DotProductAttention`` needs CUDA.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_vlm.models.hybrid_specs import resolved_impl
from megatron_vlm.models.vision.layers import BidirectionalCoreAttention, LayerNormColumnParallelLinear


def _vit_layer(norm_linear, row_linear, core_attention) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=norm_linear,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=norm_linear, linear_fc2=row_linear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_vit_layer_spec(impl: str = "auto") -> ModuleSpec:
    """One ViT layer. impl: "te", "local" or "auto" (TE when importable with a GPU, else local)."""
    impl = resolved_impl(impl)
    if impl == "local":
        return _vit_layer(LayerNormColumnParallelLinear, RowParallelLinear,
                          BidirectionalCoreAttention)
    if impl == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        return _vit_layer(TELayerNormColumnParallelLinear, TERowParallelLinear,
                          TEDotProductAttention)
    raise ValueError(f"unknown ViT spec implementation {impl!r} (te, local or auto)")


def get_vit_block_spec(num_layers: int, impl: str = "auto") -> TransformerBlockSubmodules:
    """All ``num_layers`` layers and no final norm (RADIO has none).

    Given as explicit block submodules so megatron does not divide the layers by the LLM's
    pipeline size: the tower is whole on the first stage.
    """
    return TransformerBlockSubmodules(layer_specs=[get_vit_layer_spec(impl)] * num_layers,
                                      layer_norm=None)
