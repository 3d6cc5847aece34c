"""Mamba2 SSD (state space duality) scan in plain torch, for machines without the Triton kernels.

The recurrence computed, per batch row b, head h, head channel p and state channel n:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        (state, shape [p, n] per head)
    y_t = C_t . h_t + D * x_t

with B_t, C_t shared by all heads of a group (heads are assigned to groups contiguously, head
h -> group h // (heads / groups), as in mamba-ssm and `transformers`).

`ssd_chunked_scan` evaluates it in the chunked "SSD" form: the sequence is cut into chunks of
`chunk_size`; inside a chunk the output is a masked, decayed attention-like product (quadratic in
the chunk length only), and chunk-to-chunk state is carried by one small [chunks, chunks] decay
matrix per head (quadratic in the number of chunks only, a small term next to the rest). Packed
sequences are handled through `seq_idx` (one id per token): the state is reset wherever the id
changes, i.e. no information crosses a boundary. The reset is applied with masks on the decay
differences rather than by putting -inf into the per-step log-decay, because the chunk formulas
subtract cumulative sums and an infinite (or huge) decay inside them would destroy their precision.

`ssd_reference_scan` is the token-by-token recurrence above; it exists as the test oracle.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Per-token sequence ids, shape [batch, seqlen], from cumulative sequence lengths.

    `cu_seqlens` indexes the batch-major flattening of the [batch, seqlen] token grid (token (b, s)
    is at b * seqlen + s), the convention of megatron's PackedSeqParams (where batch is 1 for the
    'thd' format). Tokens past cu_seqlens[-1] (padding at the end of a pack) form one more
    sequence of their own. Row starts always begin a new sequence, since different batch rows
    never share state, even if cu_seqlens does not list the row boundary.
    """
    total = batch * seqlen
    cu = cu_seqlens.to(torch.long).flatten()
    positions = torch.arange(total, device=cu.device)
    # id = number of boundaries (excluding the leading 0) at or before the token.
    ids = torch.searchsorted(cu[1:].contiguous(), positions, right=True)
    ids = ids.view(batch, seqlen)
    if batch > 1:
        # Offset every row so a sequence that would straddle a row boundary is split there.
        row_offset = torch.arange(batch, device=cu.device).unsqueeze(1) * (cu.numel() + 1)
        ids = ids + row_offset
    return ids


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum_{k=j+1..i} a[..., k] for j <= i, and -inf above the diagonal.

    Computed with a masked cumulative sum instead of cumsum[i] - cumsum[j], so that long chunks
    with strong decay keep full relative precision.
    """
    q = a.size(-1)
    a = a.unsqueeze(-1).expand(*a.shape, q)  # [..., i(k), j]
    strictly_lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(a, dim=-2)
    lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def _pad_to_chunks(x, dt, B, C, seq_idx, chunk_size: int):
    """Zero-pad the sequence axis (1) to a multiple of ``chunk_size``: exact, as padded steps have
    dt = 0; the padding continues the last sequence of ``seq_idx``."""
    pad = (-x.shape[1]) % chunk_size
    if not pad:
        return x, dt, B, C, seq_idx
    if seq_idx is not None:
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(x.shape[0], pad)], dim=1)
    return (F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad)),
            F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad)), seq_idx)


def _chunk_owner(chunk_seq_ids: torch.Tensor) -> torch.Tensor:
    """[b, c]: the sequence that owns the state entering chunk c - the one of chunk c-1's last
    token (for chunk 0, the initial state belongs to the row's first sequence)."""
    return torch.cat([chunk_seq_ids[:, :1, 0], chunk_seq_ids[:, :-1, -1]], dim=1)


def _carry_states(a_cumsum, chunk_states, initial_state, chunk_seq_ids, owner):
    """States entering each chunk [b, c, h, p, n] and the final state [b, h, p, n]:
    entering[z] = sum_{c<z} decay(c+1..z-1) chunk_states[c] (+ decay(0..z-1) initial). One
    [c+1, c+1] decay matrix per head and one einsum instead of a Python loop over chunks, whose
    per-chunk select/stack backward costs O(chunks^2) memory traffic. Index 0 of the padded axis
    stands for the initial state. With packed sequences (``chunk_seq_ids`` [b, c, q], ``owner``
    [b, c]) a state crosses chunk z only if chunk z ends in its owner's sequence: the chunks where
    it does not are counted (exact integers) and a carry is kept only over a stretch with none."""
    states = torch.cat([initial_state.unsqueeze(1), chunk_states], dim=1)  # [b, c+1, h, p, n]
    # [b, h, c+1]; entry z+1 is chunk z's whole-chunk log-decay.
    chunk_log_decay = F.pad(a_cumsum[..., -1].transpose(1, 2), (1, 0))
    carry = torch.exp(_segsum(chunk_log_decay))  # [b, h, z, c]: decay over chunks c..z-1
    if chunk_seq_ids is not None:
        last_ids = chunk_seq_ids[:, :, -1]
        breaks = F.pad((last_ids != owner).to(torch.int32).cumsum(dim=1), (1, 0))  # [b, c+1]
        survives = breaks.unsqueeze(-1) == breaks.unsqueeze(-2)  # [b, z, c]
        carry = carry * survives.unsqueeze(1)
    states = torch.einsum("bhzc,bchpn->bzhpn", carry, states)
    return states[:, :-1], states[:, -1]


class _DecayedScores(torch.autograd.Function):
    """scores[b, c, h, l, s] = decay(l, s) * (C_l . B_s), with decay = exp(a_col + a_row) masked
    to 0 at ``outside`` (above the diagonal, across a sequence boundary) and C.B ([b, c, g, l, s])
    broadcast over the heads of its group.

    The same floating-point operations as the autograd graph of ``exp(masked_fill(a_col + a_row))
    * cb`` (so the same bits), but the chunk-sized [b, c, h, l, s] intermediates are made once and
    updated in place: the mask and the exp in the forward, the exp's backward in the backward,
    and no masked_fill backward (the decay is exactly 0 where masked, so its gradient already
    is). At 16K tokens each of these is a 33 MB tensor per Mamba layer.
    """

    @staticmethod
    def forward(ctx, a_col, a_row, outside, cb):
        decay = (a_col + a_row).masked_fill_(outside, float("-inf")).exp_()  # [b, c, h, l, s]
        b, c, h, q, _ = decay.shape
        g = cb.shape[2]
        decay6 = decay.view(b, c, g, h // g, q, q)
        cb6 = cb.unsqueeze(3)
        ctx.save_for_backward(decay6, cb6)
        return (decay6 * cb6).view(b, c, h, q, q)

    @staticmethod
    def backward(ctx, grad):
        decay6, cb6 = ctx.saved_tensors
        g6 = grad.reshape(decay6.shape)
        product = g6 * decay6
        grad_cb = product.sum(3)
        # exp's backward, grad * exp, in the same buffer (one chunk-sized tensor fewer).
        grad_diff = torch.mul(g6, cb6, out=product).mul_(decay6).view(grad.shape)
        return grad_diff.sum(-1, keepdim=True), grad_diff.sum(-2, keepdim=True), None, grad_cb


def ssd_chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
):
    """Chunked SSD scan.

    Args:
        x: [b, l, h, p] inputs.
        dt: [b, l, h] step sizes, already positive (softplus and bias applied by the caller).
        A: [h] negative decay rates (-exp(A_log)).
        B, C: [b, l, g, n] input/output projections, g groups dividing h.
        chunk_size: chunk length; need not divide l (the tail is zero-padded, which is exact:
            padded steps have dt = 0, so they neither decay nor feed the state).
        D: [h] skip coefficient (optional).
        seq_idx: [b, l] integer sequence ids for packed sequences (optional).
        initial_states: [b, h, p, n] state before the first token (belongs to the first
            sequence of each row).
        return_final_states: also return the state after the last token, [b, h, p, n].

    Returns:
        y [b, l, h, p] in x's dtype (and the final state in fp32 when requested).
    Computation is in fp32 regardless of the input dtype.
    """
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    assert nheads % ngroups == 0, "heads must be a multiple of groups"
    heads_per_group = nheads // ngroups
    out_dtype = x.dtype

    Af = A.float()
    xf, dtf, Bf, Cf, seq_idx = _pad_to_chunks(x.float(), dt.float(), B.float(), C.float(),
                                             seq_idx, chunk_size)
    nchunks = xf.shape[1] // chunk_size
    q = chunk_size

    # [b, c, q, ...] chunk views.
    xc = xf.view(bsz, nchunks, q, nheads, headdim)
    dtc = dtf.view(bsz, nchunks, q, nheads)
    Bc = Bf.view(bsz, nchunks, q, ngroups, dstate)
    Cc = Cf.view(bsz, nchunks, q, ngroups, dstate)

    # Log-decay per step, laid out [b, c, h, q]: the chunk position is the last axis and the
    # [b, c, h, l, s] intra-chunk tensors below come out in the layout the batched matmuls want
    # (no permuted copies of the large tensors).
    a = (dtc * Af).transpose(2, 3)
    a_cumsum = torch.cumsum(a, dim=-1)  # decay from chunk start (exclusive) to position l
    # decay(l, s) = exp(cumsum[l] - cumsum[s]) on and below the diagonal (the form mamba-ssm's
    # kernels use; within one chunk the fp32 cancellation is far below the scan's tolerance),
    # 0 above it and across a sequence boundary. The difference is written as a sum with the
    # negated small tensor so that its backward needs no full-size negation, and both masks are
    # one masked_fill before the exp (exp(-inf) = 0, with a zero gradient); ``_DecayedScores``
    # does this and the product with C.B (step 1).
    outside = ~torch.tril(torch.ones(q, q, dtype=torch.bool, device=a_cumsum.device))
    if seq_idx is not None:
        sc = seq_idx.view(bsz, nchunks, q)
        outside = outside | (sc.unsqueeze(-1) != sc.unsqueeze(-2)).unsqueeze(2)  # [b, c, 1, l, s]

    # dt_s * x_s, made contiguous once as [b, c, h, s, p]: the layout of the batched matmuls
    # below, which would otherwise each copy a permuted view (forward and backward).
    xdt = (xc * dtc.unsqueeze(-1)).transpose(2, 3).contiguous()

    # 1) Intra-chunk output: y_l = sum_{s<=l} (C_l . B_s) decay(l, s) dt_s x_s.
    #    C.B is per group; it broadcasts over the heads of its group (heads are contiguous per
    #    group) instead of being repeated to every head.
    cb = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # [b, c, g, l, s]
    scores = _DecayedScores.apply(a_cumsum.unsqueeze(-1), (-a_cumsum).unsqueeze(-2), outside, cb)
    y = torch.matmul(scores, xdt)  # [b, c, h, l, p]

    # 2) State each chunk contributes at its own end: sum_s decay(end, s) B_s dt_s x_s.
    #    decay(end, s) is the last row of the intra-chunk decay, computed on its own (the same
    #    floats): selecting it from ``decay`` would cost a full-size zero fill in the backward.
    #    The decay is folded into B (n channels per head, fewer than x's p), broadcasting B over
    #    its group's heads rather than repeating it.
    to_end = a_cumsum[..., -1:] + (-a_cumsum)  # [b, c, h, s]
    if seq_idx is not None:
        to_end = to_end.masked_fill((sc[..., -1:] != sc).unsqueeze(2), float("-inf"))
    decay_to_end = torch.exp(to_end).view(bsz, nchunks, ngroups, heads_per_group, q, 1)
    Bg = Bc.permute(0, 1, 3, 2, 4).unsqueeze(3)  # [b, c, g, 1, s, n]
    Bh = (Bg * decay_to_end).reshape(bsz, nchunks, nheads, q, dstate)  # [b, c, h, s, n]
    chunk_states = torch.matmul(xdt.transpose(-1, -2), Bh)  # [b, c, h, p, n]

    # 3) Carry the state across chunks.
    if initial_states is None:
        initial_states = xf.new_zeros(bsz, nheads, headdim, dstate)
    owner = None if seq_idx is None else _chunk_owner(sc)
    entering, state = _carry_states(a_cumsum, chunk_states, initial_states.float(),
                                    None if seq_idx is None else sc, owner)

    # 4) Output from the entering state: y_l += exp(a_cumsum[l]) C_l . state (the decay folded
    #    into C, broadcast over the group's heads like B above).
    out_decay = torch.exp(a_cumsum)  # [b, c, h, l]
    if seq_idx is not None:
        out_decay = out_decay * (sc == owner.unsqueeze(-1)).unsqueeze(2)
    out_decay = out_decay.view(bsz, nchunks, ngroups, heads_per_group, q, 1)
    Cg = Cc.permute(0, 1, 3, 2, 4).unsqueeze(3)  # [b, c, g, 1, l, n]
    Ch = (Cg * out_decay).reshape(bsz, nchunks, nheads, q, dstate)  # [b, c, h, l, n]
    y = y + torch.matmul(Ch, entering.transpose(-1, -2))  # [b, c, h, l, p]

    y = y.transpose(2, 3)  # [b, c, l, h, p]: token order, not contiguous
    if D is not None and nchunks * q == seqlen:
        # The skip term as the first operand: the sum then comes out contiguous in token order,
        # so no separate copy of the transposed y (same products and sums).
        skip = xf * D.float().view(1, 1, nheads, 1)
        y = (skip.view(y.shape) + y).view(bsz, seqlen, nheads, headdim)
    else:
        y = y.reshape(bsz, nchunks * q, nheads, headdim)[:, :seqlen]
        if D is not None:
            y = y + xf[:, :seqlen] * D.float().view(1, 1, nheads, 1)
    y = y.to(out_dtype)
    if return_final_states:
        return y, state
    return y


def ssd_reference_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence (fp64), the oracle for `ssd_chunked_scan`. Returns (y, final)."""
    bsz, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    rep = nheads // ngroups
    xd, dtd, Ad = x.double(), dt.double(), A.double()
    Bd = B.double().repeat_interleave(rep, dim=2)
    Cd = C.double().repeat_interleave(rep, dim=2)
    state = (
        initial_states.double()
        if initial_states is not None
        else xd.new_zeros(bsz, nheads, headdim, B.shape[3])
    )
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).double().view(bsz, 1, 1, 1)
            state = state * keep
        decay = torch.exp(dtd[:, t] * Ad).view(bsz, nheads, 1, 1)
        inp = (dtd[:, t].view(bsz, nheads, 1, 1) * xd[:, t].unsqueeze(-1)) * Bd[:, t].unsqueeze(2)
        state = decay * state + inp
        y = torch.einsum("bhpn,bhn->bhp", state, Cd[:, t])
        if D is not None:
            y = y + D.double().view(1, nheads, 1) * xd[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), state
