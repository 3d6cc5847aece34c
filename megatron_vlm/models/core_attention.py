"""Core attention for the local specs: causal or bidirectional, GQA, packed-sequence aware, CPU.

megatron's local ``DotProductAttention`` rejects ``packed_seq_params`` (only TE handles packing)
and depends on CUDA's global memory buffer, so the local specs use this module instead. It is a
drop-in ``core_attention`` of megatron's ``SelfAttention`` (same constructor and forward
signature) built on ``torch.nn.functional.scaled_dot_product_attention``. As with TE's
``TEDotProductAttention``, the spec's ``attn_mask_type`` decides causality: causal for the hybrid
LLM, ``no_mask`` (full attention over each tile) for the ViT.

Packed sequences are attended one segment at a time (each an attention of its own), so nothing
crosses a sample boundary and no [s, s] block-diagonal mask is materialised.

Context parallelism (``config.context_parallel_size > 1``, causal only): each rank's queries are
its load-balanced chunks of every sample; K/V are all-gathered over the CP group (gloo on CPU)
and each sample is attended with a causal mask on global positions -- exactly the attention
without CP. On GPU the TE spec uses TE's own CP (``config.cp_comm_type``).
No positional embedding is applied here or anywhere in Nemotron-H (megatron
``position_embedding_type='none'``; ``transformers``' NemotronHAttention applies no rotary).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.context_parallel import (
    gather_sequence,
    global_cu_seqlens,
    partition_index,
    row_cu_seqlens,
)
from megatron_vlm.models.packing import packed_seq_idx


def _segments(seq_idx: torch.Tensor):
    """(start, end) runs of equal ids in the batch-major flattening of seq_idx [b, s]."""
    flat = seq_idx.flatten()
    change = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    bounds = [0] + change.tolist() + [flat.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)
_BIDIRECTIONAL = (AttnMaskType.no_mask, AttnMaskType.padding)


def _both(a: Optional[Tensor], b: Tensor) -> Tensor:
    return b if a is None else a & b


class LocalCoreAttention(MegatronModule):
    """Scaled-dot-product attention over [s, b, heads, dim] (or 'thd' [t, heads, dim]); causal
    unless ``attn_mask_type`` is ``no_mask`` / ``padding``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in _CAUSAL + _BIDIRECTIONAL:
            raise NotImplementedError(
                f"LocalCoreAttention is causal or unmasked, got {attn_mask_type}")
        if config.apply_query_key_layer_scaling:
            raise NotImplementedError("apply_query_key_layer_scaling is not supported")
        self.layer_number = layer_number
        self.causal = attn_mask_type in _CAUSAL
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = None
        if config.context_parallel_size > 1:
            if not self.causal:
                raise NotImplementedError("context parallelism is implemented for causal attention "
                                          "only (the LLM); the vision tower runs without it")
            self.cp_group = (pg_collection.cp if pg_collection is not None and
                             getattr(pg_collection, "cp", None) is not None
                             else parallel_state.get_context_parallel_group())

    def _sdpa(self, q, k, v, attn_mask=None):
        # q [b, np, s, d], k/v [b, ng, s, d]; query head i uses kv head i // (np/ng), which is
        # megatron's interleaved-by-group qkv layout.
        p = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=attn_mask, is_causal=self.causal and attn_mask is None,
                      scale=self.softmax_scale, dropout_p=p,
                      enable_gqa=q.size(1) != k.size(1))
        if p > 0.0:
            with get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Returns the context [s, b, heads*dim]. ``attention_mask`` (megatron convention, True =
        masked out, broadcastable to [b, 1, s, s]) is combined with causality when given."""
        assert attention_bias is None, "attention_bias is not supported"
        if query.dim() == 3:  # 'thd': megatron squeezed the unit batch axis
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        sq, bsz, nq, hd = query.shape
        if self.cp_group is not None and self.cp_group.size() > 1:
            return self._context_parallel(query, key, value, attention_mask, packed_seq_params)

        seq_idx = packed_seq_idx(packed_seq_params, bsz, sq)
        if seq_idx is not None and attention_mask is None:
            # One attention per packed segment, on [1, heads, len, dim] slices of the
            # batch-major token order.
            def flat(t):  # [s, b, h, d] -> [b*s, h, d]
                return t.transpose(0, 1).reshape(bsz * sq, t.size(2), t.size(3))

            qf, kf, vf = flat(query), flat(key), flat(value)
            outs = []
            for start, end in _segments(seq_idx.to(query.device)):
                q = qf[start:end].transpose(0, 1).unsqueeze(0)
                k = kf[start:end].transpose(0, 1).unsqueeze(0)
                v = vf[start:end].transpose(0, 1).unsqueeze(0)
                outs.append(self._sdpa(q, k, v)[0].transpose(0, 1))  # [len, np, d]
            ctx = torch.cat(outs, dim=0).view(bsz, sq, nq * hd)
            return ctx.transpose(0, 1).contiguous()

        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        # Boolean mask, True = attend; None leaves causality (if any) to SDPA's is_causal.
        allowed = None
        if self.causal and (attention_mask is not None or seq_idx is not None):
            allowed = torch.ones(sq, sq, dtype=torch.bool, device=q.device).tril()
            allowed = allowed.view(1, 1, sq, sq)
        if seq_idx is not None:
            seq_idx = seq_idx.to(q.device)
            allowed = _both(allowed, seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
        if attention_mask is not None:
            allowed = _both(allowed, ~attention_mask.to(torch.bool))
        ctx = self._sdpa(q, k, v, attn_mask=allowed)  # [b, np, s, d]
        return ctx.permute(2, 0, 1, 3).reshape(sq, bsz, nq * hd)

    # ---- context parallelism ----------------------------------------------------------------
    def _context_parallel(self, query, key, value, attention_mask, packed_seq_params):
        """Exact causal attention of this CP rank's queries over the whole sequence.

        Each rank holds chunks r and 2cp-1-r of every sample (``context_parallel``); K and V are
        all-gathered over the CP group in global token order, then every local query attends to
        the keys of its own sample up to its global position -- the same scores as without CP.
        (TE's ring exchange computes the same on GPU.)
        """
        if attention_mask is not None:
            raise NotImplementedError("an explicit attention_mask is not supported with context "
                                      "parallelism (packed causal attention is)")
        sq, bsz, nq, hd = query.shape
        cp_size = self.cp_group.size()
        cp_rank = self.cp_group.rank()
        cu = global_cu_seqlens(packed_seq_params)
        if cu is None:
            cu = row_cu_seqlens(bsz, sq * cp_size)
        elif bsz != 1:
            raise ValueError("packed sequences with context parallelism need one row per batch")
        cu = cu.to(torch.int64).cpu()

        def flat(t):  # [s, b, h, d] -> [b*s, h, d], batch-major like cu_seqlens
            return t.transpose(0, 1).reshape(bsz * sq, t.size(2), t.size(3))

        total = bsz * sq * cp_size
        k_all = gather_sequence(flat(key), cu, self.cp_group)  # [total, ng, d], global order
        v_all = gather_sequence(flat(value), cu, self.cp_group)
        q_local = flat(query)
        positions = partition_index(cu, total, cp_size, cp_rank).to(query.device)
        outs, local_start = [], 0
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            n_local = (end - start) // cp_size
            q_pos = positions[local_start:local_start + n_local] - start
            q = q_local[local_start:local_start + n_local].transpose(0, 1).unsqueeze(0)
            k = k_all[start:end].transpose(0, 1).unsqueeze(0)
            v = v_all[start:end].transpose(0, 1).unsqueeze(0)
            allowed = torch.arange(end - start, device=query.device)[None, :] <= q_pos[:, None]
            outs.append(self._sdpa(q, k, v, attn_mask=allowed.view(1, 1, n_local, end - start))
                        [0].transpose(0, 1))  # [n_local, np, d]
            local_start += n_local
        ctx = torch.cat(outs, dim=0).view(bsz, sq, nq * hd)
        return ctx.transpose(0, 1).contiguous()
