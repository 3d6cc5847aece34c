"""Incremental decoding for the hybrid LLM and the VLM: a decode state per layer, one step per token.

    decoder = IncrementalDecoder(model)                  # the LLM (MambaModel) or the VLM
    logits = decoder.prefill(prompt_ids, tiles=tiles)   # [b, V]: next-token logits of the prompt
    logits = decoder.step(next_ids)                     # [b, V]: one new token per row, one step

Decode state per layer type:

* Mamba2 mixer: the last ``d_conv`` inputs of the depthwise convolution ([b, conv_dim, d_conv])
  and the SSM state ([b, heads, head_dim, state], fp32). A step is the recurrence
  ``h = exp(dt A) h + dt B x; y = C.h + D x`` for one token: O(1) in the sequence length.
* Attention: the keys and values of every token so far (a KV cache, preallocated to the
  decoder's ``capacity``). A step attends its one query to the cache.
* MLP: none (position-wise).

How: for the duration of a prefill or step, each Mamba layer's ``mixer`` and each attention
layer's ``core_attention`` are swapped for stateful stand-ins (:class:`MambaDecodeMixer`,
:class:`CachedCoreAttention`) that use the original modules' parameters; everything else
(norm-fused projections, residuals, the MLP layers, final norm, output layer) is megatron's own
forward. The prefill computes exactly what the training forward computes (the same chunked
scan, returning its final state; the same causal attention), so greedy decoding equals the full
re-run token for token up to floating-point ties. Only the last position's logits are computed.

Works at tensor-parallel size 1 and pipeline-parallel size 1 (the whole model on one rank), on
CPU or GPU (the step math is plain torch; the prefill uses the mixer's kernels seam).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_vlm.models import mamba_ops
from megatron_vlm.models.ssd_scan import ssd_chunked_scan


# ------------------------------------------------------------------------------------ Mamba

def mamba_conv_step(conv_state: torch.Tensor, xbc: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One token of SiLU(depthwise causal conv): shift ``xbc`` [b, d] into ``conv_state``
    [b, d, k] (in place) and return the activation [b, d]. weight [d, k]; tap k-1 is the newest."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = xbc
    out = (conv_state * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out)


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor]) -> torch.Tensor:
    """One token of the SSD recurrence, in fp32, updating ``state`` [b, h, p, n] in place.

    x [b, h, p], dt [b, h] (positive), A/D [h], B/C [b, g, n] -> y [b, h, p] (fp32).
    """
    heads, groups = x.shape[1], B.shape[1]
    rep = heads // groups
    xf, dtf = x.float(), dt.float()
    Bh = B.float().repeat_interleave(rep, dim=1)  # [b, h, n]
    Ch = C.float().repeat_interleave(rep, dim=1)
    decay = torch.exp(dtf * A.float())  # [b, h]
    state.mul_(decay[..., None, None]).add_((dtf[..., None] * xf)[..., None] * Bh[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.float()[None, :, None] * xf
    return y


class MambaDecodeMixer(nn.Module):
    """Stand-in for a ``HybridMambaMixer`` holding its decode state (same forward signature).

    The first call (any length) is the prefill: the mixer's own computation, keeping the final
    convolution window and SSM state. Later calls take one token each.
    """

    def __init__(self, mixer: nn.Module):
        super().__init__()
        object.__setattr__(self, "mixer", mixer)  # not a submodule: parameters stay the mixer's
        self.conv_state: Optional[torch.Tensor] = None
        self.ssm_state: Optional[torch.Tensor] = None

    def _split(self, zxbcdt):
        m = self.mixer
        gs = m.ngroups_local * m.d_state
        return torch.split(zxbcdt, [m.d_inner_local, m.d_inner_local + 2 * gs, m.nheads_local], dim=-1)

    def _dt(self, dt):
        m = self.mixer
        step = F.softplus(dt.float() + m.dt_bias.float())
        return step.clamp(min=m.dt_clamp_min) if m.dt_clamp_min is not None else step

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("incremental decoding takes unpacked sequences")
        m = self.mixer
        zxbcdt, _ = m.in_proj(hidden_states)  # [s, b, proj]
        seqlen, bsz, _ = zxbcdt.shape
        zxbcdt = zxbcdt.transpose(0, 1)  # [b, s, proj]
        z, xbc, dt = self._split(zxbcdt)
        weight = m.conv1d.weight.squeeze(1)  # [d, k]
        gs = m.ngroups_local * m.d_state
        A = -torch.exp(m.A_log.float())
        if self.ssm_state is None:  # prefill
            k = weight.shape[-1]
            window = xbc[:, -k:].transpose(1, 2)  # [b, d, <=k]
            self.conv_state = F.pad(window, (k - window.shape[-1], 0)).contiguous()
            act = mamba_ops.causal_conv1d_silu(xbc, weight, m.conv1d.bias)
            x, B, C = torch.split(act, [m.d_inner_local, gs, gs], dim=-1)
            y, self.ssm_state = ssd_chunked_scan(
                x.reshape(bsz, seqlen, m.nheads_local, m.headdim), self._dt(dt), A,
                B.reshape(bsz, seqlen, m.ngroups_local, m.d_state),
                C.reshape(bsz, seqlen, m.ngroups_local, m.d_state),
                m.chunk_size, D=m.D, return_final_states=True)
        else:
            if seqlen != 1:
                raise ValueError("a decode step takes one token per sequence")
            act = mamba_conv_step(self.conv_state, xbc[:, 0], weight, m.conv1d.bias)
            x, B, C = torch.split(act, [m.d_inner_local, gs, gs], dim=-1)
            y = ssd_step(self.ssm_state, x.reshape(bsz, m.nheads_local, m.headdim),
                         self._dt(dt[:, 0]), A, B.reshape(bsz, m.ngroups_local, m.d_state),
                         C.reshape(bsz, m.ngroups_local, m.d_state), m.D)
            y = y.to(x.dtype).unsqueeze(1)
        y = m.norm(y.reshape(bsz, seqlen, m.d_inner_local), z)
        return m.out_proj(y.transpose(0, 1).contiguous())


# ------------------------------------------------------------------------------------ attention

class CachedCoreAttention(nn.Module):
    """Stand-in for an attention layer's ``core_attention`` with a KV cache.

    The prefill runs the original core attention (causal over the prompt) and stores keys and
    values; a step appends its key/value and attends its query to the whole cache.
    """

    def __init__(self, core: nn.Module, capacity: int):
        super().__init__()
        object.__setattr__(self, "core", core)
        self.capacity = capacity
        self.keys: Optional[torch.Tensor] = None    # [b, groups, capacity, d]
        self.values: Optional[torch.Tensor] = None
        self.length = 0

    def _store(self, key, value):
        """key/value [s, b, groups, d] appended at the cache end."""
        s, b, g, d = key.shape
        if self.keys is None:
            self.keys = key.new_empty(b, g, self.capacity, d)
            self.values = value.new_empty(b, g, self.capacity, d)
        if self.length + s > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded")
        self.keys[:, :, self.length:self.length + s] = key.permute(1, 2, 0, 3)
        self.values[:, :, self.length:self.length + s] = value.permute(1, 2, 0, 3)
        self.length += s

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        if self.length == 0:
            self._store(key, value)
            return self.core(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                             attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                             **kwargs)
        if query.shape[0] != 1:
            raise ValueError("a decode step takes one token per sequence")
        self._store(key, value)
        sq, b, nq, d = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, nq, 1, d]
        k = self.keys[:, :, :self.length]
        v = self.values[:, :, :self.length]
        scale = getattr(self.core, "softmax_scale", None)
        ctx = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=nq != k.shape[1])
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, nq * d)


# ------------------------------------------------------------------------------------ decoder

class IncrementalDecoder:
    """Prefill once, then one step per new token, on a whole model held by one rank."""

    def __init__(self, model: nn.Module, capacity: int = 4096):
        self.model = model
        self.llm = getattr(model, "language_model", model)
        if not (self.llm.pre_process and self.llm.post_process):
            raise ValueError("incremental decoding needs the whole model on one rank (PP = 1)")
        if self.llm.config.tensor_model_parallel_size != 1:
            raise ValueError("incremental decoding runs at tensor-parallel size 1")
        self.capacity = capacity
        self.mixers: List[MambaDecodeMixer] = []
        self.attentions: List[CachedCoreAttention] = []
        self._swaps = []  # (module, attribute, stand-in)
        for layer, kind in zip(self.llm.decoder.layers, self.llm.decoder.layer_type_list):
            if kind == "M":
                stand_in = MambaDecodeMixer(layer.mixer)
                self.mixers.append(stand_in)
                self._swaps.append((layer, "mixer", stand_in))
            elif kind == "*":
                attn = layer.self_attention
                stand_in = CachedCoreAttention(attn.core_attention, capacity)
                self.attentions.append(stand_in)
                self._swaps.append((attn, "core_attention", stand_in))
        self.length = 0

    @contextmanager
    def _stateful(self):
        originals = [(module, name, getattr(module, name)) for module, name, _ in self._swaps]
        try:
            for module, name, stand_in in self._swaps:
                module._modules[name] = stand_in
            yield
        finally:
            for module, name, original in originals:
                module._modules[name] = original

    def _run(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder over [s, b, h] embeddings; logits [b, V] of the last position (fp32)."""
        with self._stateful():
            out = self.llm.decoder(hidden_states=hidden, attention_mask=None)
        weight = None
        if self.llm.share_embeddings_and_output_weights:
            weight = self.llm.shared_embedding_or_output_weight()
        logits, _ = self.llm.output_layer(out[-1:], weight=weight)
        self.length += hidden.shape[0]
        return logits[0].float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, tiles: Optional[torch.Tensor] = None,
                **media: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] (image tokens expanded; tiles in their order) -> logits [b, V].
        ``media``: ``tiles_per_media`` / ``media_tokens`` for EVS-pruned videos (VLM only)."""
        if self.length:
            raise ValueError("prefill runs once per decoder")
        if input_ids.shape[1] > self.capacity:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens exceeds capacity {self.capacity}")
        if self.llm is not self.model:
            hidden = self.model.embed_inputs(input_ids, tiles, media.get("tiles_per_media"),
                                             media.get("media_tokens"))
        else:
            if tiles is not None:
                raise ValueError("tiles given to a text-only model")
            hidden = self.llm.embedding(input_ids=input_ids, position_ids=None)
        return self._run(hidden)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [b] (one new token per sequence) -> logits [b, V]."""
        if not self.length:
            raise ValueError("step before prefill")
        hidden = self.llm.embedding(input_ids=token_ids.view(-1, 1), position_ids=None)
        return self._run(hidden)


def supports_incremental(model: nn.Module) -> bool:
    """True for the hybrid LLM / VLM (megatron modules with a hybrid decoder)."""
    llm = getattr(model, "language_model", model)
    decoder = getattr(llm, "decoder", None)
    return decoder is not None and hasattr(decoder, "layer_type_list") and hasattr(llm, "output_layer")
