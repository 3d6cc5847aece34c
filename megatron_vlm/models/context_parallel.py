"""Context parallelism (CP) for the hybrid stack: which tokens each CP rank holds, and the exchanges.

The split is TransformerEngine's causal load balancing, per packed sample: every sample (its length
a multiple of ``2 * cp``; the loader pads samples so) is cut into ``2 * cp`` equal chunks and CP
rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r`` of every sample, in sample order. A rank thus
holds ``total / cp`` tokens, and with causal attention every rank does the same work. Without
packing each row of the batch is one sample (megatron's non-packed split).

``PackedSeqParams`` keep the *global* ``cu_seqlens`` (megatron's convention); each rank's own
boundaries are ``cu_seqlens // cp``.

* :func:`partition_index` is our equivalent of TE's ``thd_get_partitioned_indices``.
* :func:`shard_sequence` / :func:`shard_tokens` cut a full-sequence tensor to this rank's tokens
  (embeddings after the image splice, labels, loss mask, token ids).
* :class:`MambaCP` is megatron-core's ``MambaContextParallel`` (all-to-all between the sequence
  and the head dimension) with our partition index in place of TE's for packed sequences.
* :func:`gather_sequence` all-gathers K/V over the CP group in global token order (CPU attention).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.ssm.mamba_context_parallel import (
    MambaContextParallel,
    _all_to_all_hp2cp,
    _redo_attention_load_balancing,
)
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def cp_group_and_rank():
    """(group, size, rank) of megatron's context-parallel group; (None, 1, 0) when uninitialised."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None, 1, 0
    return (parallel_state.get_context_parallel_group(),
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_context_parallel_rank())


def row_cu_seqlens(batch: int, seqlen: int, device=None) -> torch.Tensor:
    """cu_seqlens of an unpacked [batch, seqlen] grid: every row is one sample."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def global_cu_seqlens(packed_seq_params: Optional[PackedSeqParams]) -> Optional[torch.Tensor]:
    """The boundaries the split follows: the padded ones when given (they index the tokens)."""
    if packed_seq_params is None:
        return None
    cu = packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q if cu is None else cu


def check_divisible(cu_seqlens: torch.Tensor, cp_size: int) -> None:
    """Every sample must split into 2*cp equal chunks (the loader pads samples to that)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bad = [n for n in lengths if n % (2 * cp_size)]
    if bad:
        raise ValueError(f"context parallelism cp={cp_size} needs every packed sample's length to "
                         f"be a multiple of 2*cp={2 * cp_size}; got lengths {bad[:4]} (pad samples "
                         "with the loader's pad_multiple)")


def partition_index(cu_seqlens: torch.Tensor, total_tokens: int, cp_size: int,
                    cp_rank: int) -> torch.Tensor:
    """Global token indices held by ``cp_rank``, in its local order (int64, ``total / cp``).

    Same result as TE's ``thd_get_partitioned_indices(cu_seqlens, total, cp, rank)``: per sample,
    chunk ``rank`` then chunk ``2 * cp - 1 - rank`` of its ``2 * cp`` chunks. Since the first
    chunk precedes the second in the sample, the rank's tokens in global order are already in its
    local order.
    """
    cu = cu_seqlens.to(torch.int64).cpu()
    if int(cu[-1]) != total_tokens:
        raise ValueError(f"cu_seqlens end at {int(cu[-1])}, the sequence has {total_tokens} tokens")
    check_divisible(cu, cp_size)
    lengths = cu[1:] - cu[:-1]
    position = torch.arange(total_tokens)
    sample = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    offset = position - cu[:-1][sample]
    chunk = offset // (lengths[sample] // (2 * cp_size))
    owner = torch.where(chunk < cp_size, chunk, 2 * cp_size - 1 - chunk)
    return position[owner == cp_rank]


def _rank_major_order(cu_seqlens: torch.Tensor, total_tokens: int, cp_size: int) -> torch.Tensor:
    """Global index of every token in the rank-major concatenation of all ranks' local tokens."""
    return torch.cat([partition_index(cu_seqlens, total_tokens, cp_size, r) for r in range(cp_size)])


def shard_tokens(t: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This CP rank's part of a batch-major [b, s] tensor (ids, labels, loss mask): [b, s / cp].

    ``cu_seqlens`` are over the flattened [b * s] tokens (None: every row is one sample). Identity
    without CP.
    """
    _, cp_size, cp_rank = cp_group_and_rank()
    if t is None or cp_size == 1:
        return t
    b, s = t.shape[:2]
    cu = row_cu_seqlens(b, s) if cu_seqlens is None else cu_seqlens
    index = partition_index(cu, b * s, cp_size, cp_rank).to(t.device)
    return t.reshape(b * s, *t.shape[2:]).index_select(0, index).view(b, s // cp_size, *t.shape[2:])


def shard_sequence(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """This CP rank's part of a sequence-major [s, b, h] tensor (embeddings): [s / cp, b, h].

    Packed batches have b = 1 (``cu_seqlens`` over the s tokens); without ``cu_seqlens`` each row
    is one sample and all rows are cut alike. Autograd flows back to the full tensor.
    """
    _, cp_size, cp_rank = cp_group_and_rank()
    if cp_size == 1:
        return x
    s, b = x.shape[:2]
    if cu_seqlens is not None and b != 1:
        raise ValueError("packed sequences with context parallelism need micro batches of one row")
    cu = row_cu_seqlens(1, s) if cu_seqlens is None else cu_seqlens
    index = partition_index(cu, s, cp_size, cp_rank).to(x.device)
    return x.index_select(0, index)


def gather_sequence(local: torch.Tensor, cu_seqlens: torch.Tensor, group) -> torch.Tensor:
    """All-gather this rank's tokens [n, ...] over the CP group, in global token order [n*cp, ...].

    Differentiable: the backward pass reduce-scatters the gradient (megatron's sequence-parallel
    gather, on the CP group).
    """
    cp_size = group.size()
    gathered = gather_from_sequence_parallel_region(local.contiguous(), True, group=group)
    order = _rank_major_order(cu_seqlens, gathered.shape[0], cp_size).to(local.device)
    natural = torch.empty_like(order)
    natural[order] = torch.arange(order.numel(), device=order.device)
    return gathered.index_select(0, natural)


class MambaCP(MambaContextParallel):
    """megatron-core's Mamba all-to-all context parallelism, runnable without TransformerEngine.

    megatron asks TE's ``thd_get_partitioned_indices`` where each rank's tokens sit in a packed
    sequence; this class does the same reordering with :func:`partition_index`. Everything else
    (the all-to-alls, per-rank slices of conv1d / dt_bias / A_log / D, head and group rules) is
    megatron's.
    """

    def pre_conv_ssm(self, input_: torch.Tensor,
                     packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """[s / cp, b, proj_tp] on each rank -> [s, b, proj_tp / cp] in global token order."""
        cu = global_cu_seqlens(packed_seq_params)
        if self.cp_size == 1 or cu is None:
            return super().pre_conv_ssm(input_, packed_seq_params)
        # megatron's exchange with its whole-sequence reordering, which we undo and replace by the
        # per-sample one (index permutations only; the data moved is the same).
        whole = super().pre_conv_ssm(input_, None)
        rank_major = _redo_attention_load_balancing(whole, self.cp_size, None)
        order = _rank_major_order(cu, rank_major.shape[0], self.cp_size).to(input_.device)
        natural = torch.empty_like(order)
        natural[order] = torch.arange(order.numel(), device=order.device)
        return rank_major.index_select(0, natural)

    def post_conv_ssm(self, input_: torch.Tensor,
                      packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """[s, b, d_tp / cp] in global order -> [s / cp, b, d_tp] of this rank's tokens."""
        cu = global_cu_seqlens(packed_seq_params)
        if self.cp_size == 1 or cu is None:
            return super().post_conv_ssm(input_, packed_seq_params)
        order = _rank_major_order(cu, input_.shape[0], self.cp_size).to(input_.device)
        return _all_to_all_hp2cp(input_.index_select(0, order), self.cp_group)


def check_mamba_cp_sizes(nheads: int, ngroups: int, tp: int, cp: int) -> Optional[str]:
    """Why megatron's Mamba CP cannot split these heads/groups, or None when it can."""
    if cp == 1:
        return None
    if (nheads // tp) % cp:
        return (f"mamba heads per tensor-parallel rank ({nheads}/tp={nheads // tp}) must be "
                f"divisible by cp={cp}")
    groups = ngroups // tp
    if groups < cp and cp % groups:
        return f"cp={cp} must be a multiple of the mamba groups per TP rank ({ngroups}/tp={groups})"
    if groups >= cp and groups % cp:
        return f"mamba groups per TP rank ({ngroups}/tp={groups}) must be divisible by cp={cp}"
    return None
