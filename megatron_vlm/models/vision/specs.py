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

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_vlm.models.hybrid_specs import attention_block, mlp_block, spec_modules
from megatron_vlm.models.vision.layers import LayerNormColumnParallelLinear


def get_vit_layer_spec(impl: str = "auto") -> ModuleSpec:
    """One ViT layer. impl: "te", "local" or "auto" (TE when importable with a GPU, else local)."""
    modules = spec_modules(impl, "ViT spec", local_norm_linear=LayerNormColumnParallelLinear)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            **attention_block(modules, AttnMaskType.no_mask), **mlp_block(modules)),
    )


def get_vit_block_spec(num_layers: int, impl: str = "auto") -> TransformerBlockSubmodules:
    """All ``num_layers`` layers and no final norm (RADIO has none).

    Given as explicit block submodules so megatron does not divide the layers by the LLM's
    pipeline size: the tower is whole on the first stage.
    """
    return TransformerBlockSubmodules(layer_specs=[get_vit_layer_spec(impl)] * num_layers,
                                      layer_norm=None)
