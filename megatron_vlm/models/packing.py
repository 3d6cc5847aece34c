"""Packed sequences for the hybrid LLM: megatron ``PackedSeqParams`` <-> per-token sequence ids.

Convention (megatron's): several samples are concatenated along the sequence axis and
``cu_seqlens`` lists their cumulative lengths over the batch-major flattening of the [b, s] token
grid (token (b, s) sits at b*s_len + s). The usual packed batch has b = 1 and ``qkv_format='thd'``;
that is the form the TransformerEngine spec understands too. Tokens after ``cu_seqlens[-1]``
(pack padding) form one extra sequence, so they never mix with real samples.

Every mixer honours the boundaries: attention is causal within a sample, the Mamba convolution
and SSM state restart at each sample start.
"""

from typing import Optional

import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_vlm.models.ssd_scan import seq_idx_from_cu_seqlens


def make_packed_seq_params(cu_seqlens: torch.Tensor, qkv_format: str = "thd",
                           cu_seqlens_padded: Optional[torch.Tensor] = None,
                           max_seqlen: Optional[int] = None) -> PackedSeqParams:
    """PackedSeqParams for self-attention from cumulative sample lengths (int32, starting at 0).

    ``cu_seqlens_padded``: boundaries including per-sample padding (when samples are padded to a
    multiple, e.g. for TE/CP); the model uses them for positions when given. ``max_seqlen``
    (longest sample, known on the host from the loader) saves a device sync.
    """
    if cu_seqlens_padded is None and _context_parallel_size() > 1:
        # TE's context-parallel THD attention wants the padded boundaries; ours are the same
        # tokens (the loader pads samples, the pad belongs to its sample's segment).
        cu_seqlens_padded = cu_seqlens
    cu = cu_seqlens.to(torch.int32)
    lengths = (cu[1:] - cu[:-1]) if cu_seqlens_padded is None else (
        cu_seqlens_padded[1:] - cu_seqlens_padded[:-1])
    if max_seqlen is not None:
        max_len = int(max_seqlen)
    else:
        max_len = int(lengths.max().item()) if lengths.numel() else 0
    padded = None if cu_seqlens_padded is None else cu_seqlens_padded.to(torch.int32)
    return PackedSeqParams(
        qkv_format=qkv_format,
        cu_seqlens_q=cu, cu_seqlens_kv=cu,
        cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
        max_seqlen_q=max_len, max_seqlen_kv=max_len,
    )


def _context_parallel_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def packed_seq_idx(packed_seq_params: Optional[PackedSeqParams], batch: int, seqlen: int):
    """[batch, seqlen] sequence ids from PackedSeqParams, or None when not packed.

    Uses the padded boundaries when given (they index the tensor the model actually sees).
    """
    if packed_seq_params is None:
        return None
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    if cu is None:
        return None
    return seq_idx_from_cu_seqlens(cu, batch, seqlen)
