"""Builder for the Nemotron-H hybrid LLM on megatron-core's ``MambaModel``.

    from megatron_vlm.models.llm import build_hybrid_llm
    model = build_hybrid_llm("nemotron_h_tiny")            # after initialize_distributed(...)
    loss = model(input_ids, None, None, labels=labels)       # [b, s] per-token loss

Forward (megatron ``MambaModel.forward``)::

    model(input_ids [b, s] | None, position_ids=None, attention_mask=None,
          decoder_input=None,            # [s, b, hidden] embeddings instead of input_ids (VLM)
          labels=None,                   # [b, s] -> returns per-token loss [b, s]
          packed_seq_params=None)        # megatron PackedSeqParams (see models/packing.py)
    -> logits [b, s, vocab/tp] when labels is None (parallel_output=True keeps them TP-split)

* No positional embedding: ``position_ids`` is ignored and may be None.
* ``attention_mask`` may be None: attention is causal inside the model. A boolean mask (True =
  masked out, broadcastable to [b, 1, s, s]) is honoured by the local attention in addition.
* VLM: build text embeddings with ``model.embedding(input_ids=ids, position_ids=None)`` ([s, b, h]),
  splice the vision embeddings in, pass the result as ``decoder_input``.
* Packing: ``make_packed_seq_params(cu_seqlens)`` with input [1, total] tokens; attention, the
  Mamba convolution and the SSM state all restart at each sample.
* Pipeline stages other than the first receive their input through ``model.set_input_tensor``
  (megatron's schedules do this); stages other than the last return hidden states [s, b, h].
"""

from typing import Optional, Union

import torch

from megatron.core import parallel_state
from megatron.core.models.mamba import MambaModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.config import load_model_config, make_transformer_config, padded_vocab_size
from megatron_vlm.models.hybrid_specs import get_hybrid_stack_spec
from megatron_vlm.models.packing import make_packed_seq_params

__all__ = ["build_hybrid_llm", "count_parameters", "make_packed_seq_params"]


def build_hybrid_llm(
    model_cfg: Union[str, dict],
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    config: Optional[TransformerConfig] = None,
    impl: str = "auto",
    parallel_output: bool = True,
    pg_collection=None,
    scatter_embedding_sequence_parallel: bool = True,
    **config_overrides,
) -> MambaModel:
    """Build the hybrid LLM for this pipeline stage.

    Args:
        model_cfg: recipe name, YAML path or dict (``load_model_config``).
        pre_process / post_process: embedding / output layer on this stage; default from
            megatron's parallel_state (first / last pipeline stage).
        config: a ready TransformerConfig; else made from the YAML with ``config_overrides``
            (e.g. ``params_dtype="float32"``, ``use_cpu_initialization=True``).
        impl: layer implementation, "auto" (TE with a GPU, else local), "te" or "local".
        parallel_output: keep logits split over TP ranks (what megatron's loss expects).
        scatter_embedding_sequence_parallel: with sequence parallelism, scatter the embeddings
            over the sequence (megatron's default); the VLM passes False, it splices image
            embeddings into the whole sequence and scatters the result itself.
    """
    cfg = load_model_config(model_cfg)
    if config is None:
        config = make_transformer_config(cfg, **config_overrides)
    elif config_overrides:
        raise ValueError("pass either config or config overrides, not both")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    spec = get_hybrid_stack_spec(
        impl,
        chunk_size=cfg["mamba_chunk_size"],
        dt_clamp_min=cfg["mamba_dt_clamp_min"],
        mamba_norm_eps=cfg["layernorm_epsilon"],
        conv_kernel=cfg["mamba_conv_kernel"],
    )
    kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
    return MambaModel(
        config=config,
        mamba_stack_spec=spec,
        vocab_size=padded_vocab_size(cfg, config.tensor_model_parallel_size),
        max_sequence_length=cfg["max_sequence_length"],
        pre_process=pre_process,
        post_process=post_process,
        hybrid_override_pattern=cfg["hybrid_override_pattern"],
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=not cfg["untie_embeddings_and_output_weights"],
        position_embedding_type="none",
        scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
        **kwargs,
    )


def count_parameters(module: Optional[torch.nn.Module]) -> int:
    """Parameter elements held by this rank (works on the meta device); 0 for a part this
    pipeline stage does not hold (None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())
