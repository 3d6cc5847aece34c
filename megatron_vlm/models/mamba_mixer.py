"""Mamba2 mixer for megatron-core's hybrid stack (``MambaLayer.mixer``), runnable on CPU and GPU.

Parameters, shapes and tensor-parallel partitioning follow megatron-core's ``MambaMixer`` so that
Megatron-LM Nemotron-H checkpoints load unchanged:

    in_proj   ColumnParallel  hidden -> [z | x | B | C | dt]   (d_inner, d_inner, G*N, G*N, H)
    conv1d    depthwise over [x | B | C], kernel d_conv, with bias
    dt_bias, A_log, D   [H]        norm.weight [d_inner]        out_proj RowParallel d_inner -> hidden

Tensor parallelism: every rank owns H/tp heads and G/tp groups. Megatron's ColumnParallelLinear
cuts its output rows into contiguous rank blocks, so rank r's in_proj rows are its own
[z_r | x_r | B_r | C_r | dt_r] -- the per-rank layout is the same as the unsplit one, just smaller.
Consequently the *full* in_proj matrix is not the concatenation of the rank blocks; the sharded
state dict therefore splits in_proj (and conv1d) into z/x/B/C/dt pieces, each sharded over TP
(keys ``in_proj.weight.z`` ... as in megatron), which is what makes resharding between TP sizes
exact.

Compute goes through ``mamba_ops`` (fused kernels on CUDA when present, plain torch otherwise).
Packed sequences (``PackedSeqParams.cu_seqlens_q[_padded]``) reset both the convolution window and
the SSM state at every sequence start.

Context parallelism (``pg_collection.cp`` of size > 1): megatron-core's ``MambaContextParallel``
all-to-all (see ``context_parallel.MambaCP``) turns each rank's sequence shard into whole
sequences of a 1/cp share of the heads around the convolution and the scan.
"""

import math
from dataclasses import replace
from typing import List, Optional

import torch
from torch import nn

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_vlm.models import mamba_ops
from megatron_vlm.models.context_parallel import MambaCP
from megatron_vlm.models.norms import GatedRMSNorm, param_device
from megatron_vlm.models.packing import packed_seq_idx


class HybridMambaMixer(MegatronModule):
    """Drop-in for megatron's MambaMixer in a ``MambaLayer`` spec (same constructor arguments).

    Spec params beyond megatron's: ``dt_clamp_min`` (optional lower clamp of the step size; None =
    megatron behaviour, ``transformers`` clamps at its time_step_min) and ``norm_eps``.
    ``chunk_size`` is megatron's own argument (SSD chunk length).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules,
        d_model: int,
        d_conv: int = 4,
        conv_init: Optional[float] = None,
        expand: int = 2,
        A_init_range=(1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 128,
        dt_clamp_min: Optional[float] = None,
        norm_eps: float = 1e-5,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        pp_layer_offset: int = 0,
    ):
        super().__init__(config)
        # Megatron-LM Nemotron-H: gated RMSNorm after the scan, per-head D, no projection bias.
        if not rmsnorm or norm_before_gate or D_has_hdim or bias:
            raise NotImplementedError("only rmsnorm=True, norm_before_gate=False, per-head D, no bias")
        assert pg_collection is not None, "pg_collection must be provided"
        self.config = config
        self.layer_number = layer_number
        self.pp_layer_offset = pp_layer_offset
        self.chunk_size = chunk_size
        self.dt_clamp_min = dt_clamp_min
        self.tp_group = pg_collection.tp
        self._set_sizes(config, d_model, d_conv, expand)

        # Created in megatron's order (in_proj, SSM parameters, norm, out_proj): same random init.
        self.in_proj = build_module(
            submodules.in_proj, d_model, 2 * self.d_inner + 2 * self.ngroups * self.d_state
            + self.nheads, config=config, init_method=config.init_method, gather_output=False,
            bias=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1",
            tp_group=self.tp_group)
        self._init_ssm_parameters(config, conv_init, conv_bias, A_init_range,
                                  (dt_min, dt_max, dt_init_floor))

        # Context parallelism: megatron's all-to-all between sequence and heads (a no-op at cp=1).
        # It slices the conv1d / dt_bias / A_log / D parameters per CP rank in the forward pass,
        # so the parameters and the checkpoint layout do not depend on the CP size.
        cp_group = pg_collection.cp
        self.cp = None
        if cp_group is not None and cp_group.size() > 1:
            self.cp = MambaCP(cp_group, self.d_inner_local, self.nheads_local, self.ngroups_local,
                              self.d_state, self.conv1d, self.dt_bias, self.A_log, self.D,
                              D_has_hdim=False)

        self.norm = GatedRMSNorm(self.d_inner_local, self.d_inner // self.ngroups, norm_eps,
                                 config, tp_group=self.tp_group)

        self.out_proj = build_module(
            submodules.out_proj, self.d_inner, d_model, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2", tp_group=self.tp_group)

    def _set_sizes(self, config: TransformerConfig, d_model: int, d_conv: int, expand: int) -> None:
        """Heads, groups and widths, whole and per tensor-parallel rank."""
        self.d_model = d_model
        self.d_conv = d_conv
        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        if config.mamba_num_heads is not None:
            self.nheads = config.mamba_num_heads
        else:
            assert (expand * d_model) % self.headdim == 0
            self.nheads = expand * d_model // self.headdim
        self.d_inner = self.nheads * self.headdim

        tp = self.tp_group.size()
        assert self.nheads % tp == 0, "mamba heads must divide by the tensor-parallel size"
        assert self.ngroups % tp == 0, "mamba groups must divide by the tensor-parallel size"
        assert self.nheads % self.ngroups == 0, "mamba heads must divide by groups"
        self.nheads_local = self.nheads // tp
        self.ngroups_local = self.ngroups // tp
        self.d_inner_local = self.d_inner // tp

    def _init_ssm_parameters(self, config: TransformerConfig, conv_init: Optional[float],
                             conv_bias: bool, A_init_range, dt_init: tuple) -> None:
        """conv1d, dt_bias, A_log and D of this rank's heads (megatron's init, in its order)."""
        dt_min, dt_max, dt_init_floor = dt_init
        device = param_device(config)
        dtype = config.params_dtype
        d_conv = self.d_conv
        conv_dim = self.d_inner_local + 2 * self.ngroups_local * self.d_state
        # Per-rank-distinct random init, like megatron (the fork is the model-parallel RNG).
        with get_cuda_rng_tracker().fork():
            self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim,
                                    padding=d_conv - 1, bias=conv_bias, device=device, dtype=dtype)
            if config.perform_initialization:
                if conv_init is not None:
                    nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
                else:
                    nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
            # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max].
            dt = torch.exp(
                torch.rand(self.nheads_local, device=device, dtype=dtype)
                * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            A = torch.empty(self.nheads_local, dtype=torch.float32, device=device)
            if config.perform_initialization:
                A.uniform_(*A_init_range)
            else:
                A.fill_(1.0)
            self.A_log = nn.Parameter(torch.log(A))  # kept in fp32, as in megatron
        self.D = nn.Parameter(torch.ones(self.nheads_local, device=device))  # fp32
        for p in (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D):
            if p is not None:
                setattr(p, "tensor_model_parallel", True)
                setattr(p, "partition_dim", 0)
                setattr(p, "partition_stride", 1)

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        """hidden_states [s, b, h] -> (out [s, b, h], out_bias).

        With sequence parallelism the input is the local sequence shard; in_proj gathers it and
        out_proj scatters back, so the scan always sees whole sequences.
        """
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("incremental decoding is not implemented in HybridMambaMixer")

        zxbcdt, _ = self.in_proj(hidden_states)  # [s, b, local proj]
        if self.cp is not None:  # [s/cp, b, proj] -> [s, b, proj/cp]: whole sequences, fewer heads
            zxbcdt = self.cp.pre_conv_ssm(zxbcdt, packed_seq_params)
        seqlen, bsz, _ = zxbcdt.shape
        zxbcdt = zxbcdt.transpose(0, 1)  # [b, s, .]
        seq_idx = packed_seq_idx(packed_seq_params, bsz, seqlen)
        if seq_idx is not None:
            seq_idx = seq_idx.to(zxbcdt.device)

        cp = self.cp
        d_inner = self.d_inner_local if cp is None else cp.d_inner_local_tpcp
        nheads = self.nheads_local if cp is None else cp.nheads_local_tpcp
        ngroups = self.ngroups_local if cp is None else cp.ngroups_local_tpcp
        gs = ngroups * self.d_state
        z, xbc, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * gs, nheads], dim=-1)
        conv_weight = self.conv1d.weight if cp is None else cp.get_conv1d_weight()
        conv_bias = self.conv1d.bias if cp is None else cp.get_conv1d_bias()
        xbc = mamba_ops.causal_conv1d_silu(xbc, conv_weight.squeeze(1), conv_bias, seq_idx, compile_ok=True)
        x, B, C = torch.split(xbc, [d_inner, gs, gs], dim=-1)

        y = mamba_ops.ssd(
            x.reshape(bsz, seqlen, nheads, self.headdim),
            dt,
            self.dt_bias if cp is None else cp.get_dt_bias(),
            -torch.exp((self.A_log if cp is None else cp.get_A_log()).float()),
            B.reshape(bsz, seqlen, ngroups, self.d_state),
            C.reshape(bsz, seqlen, ngroups, self.d_state),
            self.D if cp is None else cp.get_D(),
            self.chunk_size,
            seq_idx=seq_idx,
            dt_min=self.dt_clamp_min,
            compile_ok=True,
        )
        y = y.reshape(bsz, seqlen, d_inner)
        if cp is None:
            y = self.norm(y, z)
        else:
            # As megatron: gate on this rank's heads, back to [s/cp, b, d_inner], then normalise
            # (a norm group may span CP ranks).
            y = y.float() * torch.nn.functional.silu(z.float())
            y = cp.post_conv_ssm(y.to(z.dtype).transpose(0, 1).contiguous(), packed_seq_params)
            y = self.norm(y.transpose(0, 1), None)
        return self.out_proj(y.transpose(0, 1).contiguous())

    # ------------------------------------------------------------------ checkpointing

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron MambaMixer's checkpoint layout (see module docstring)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        dp_cp_group = metadata["dp_cp_group"]
        own = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items() if "." not in k}
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, {"A_log": 0, "dt_bias": 0, "D": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=dp_cp_group)
        for name, module in self.named_children():
            if name == "conv1d":
                sharded.update(make_sharded_tensors_for_checkpoint(
                    module.state_dict(prefix="", keep_vars=True), f"{prefix}{name}.",
                    {"weight": 0, "bias": 0}, sharded_offsets,
                    tp_group=self.tp_group, dp_cp_group=dp_cp_group))
            else:
                sharded.update(sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group))

        gs = self.ngroups_local * self.d_state
        key = f"{prefix}in_proj.weight"
        sharded[key] = _split_rows_factory(
            sharded[key], [self.d_inner_local, self.d_inner_local, gs, gs, self.nheads_local],
            ["z", "x", "B", "C", "dt"])
        for name in ("conv1d.weight", "conv1d.bias"):
            key = f"{prefix}{name}"
            if key in sharded:
                sharded[key] = _split_rows_factory(
                    sharded[key], [self.d_inner_local, gs, gs], ["x", "B", "C"])
        return sharded


def _split_rows_factory(sh_ten: ShardedTensor, sections: List[int], names: List[str]):
    """Checkpoint a TP-sharded tensor as independent row blocks ``<key>.<name>``.

    Each block is narrowed out of the rank-local tensor and keeps TP sharding along axis 0, so a
    block's global tensor is the concatenation of that block over ranks -- independent of the TP
    size, which is what resharding needs.
    """
    assert isinstance(sh_ten, ShardedTensor), type(sh_ten)
    assert sum(sections) == sh_ten.local_shape[0], (sections, sh_ten.local_shape)
    template = sh_ten.without_data()

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        full = replace(template, key=key, data=data, dtype=data.dtype, replica_id=replica_id,
                       flattened_range=flattened_range)
        pieces, start = [], 0
        for size, name in zip(sections, names):
            for piece in full.narrow(0, start, size):
                piece.key = f"{piece.key}.{name}"
                pieces.append(piece)
            start += size
        return pieces

    @torch.no_grad()
    def merge(loaded):
        return torch.cat(loaded)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)
