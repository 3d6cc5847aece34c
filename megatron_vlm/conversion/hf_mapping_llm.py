"""Nemotron-H weights: `transformers` NemotronHForCausalLM <-> our megatron hybrid LLM.

Works on *unsharded* (TP=1, PP=1) state dicts; other layouts are reached by saving / loading a
megatron dist checkpoint, which reshards. Parameter correspondence for layer i (pattern char c):

    HF model.layers.i.norm.weight  ->  the layer's fused pre-norm ``layer_norm_weight``:
        M: decoder.layers.i.mixer.in_proj.layer_norm_weight
        *: decoder.layers.i.self_attention.linear_qkv.layer_norm_weight
        -: decoder.layers.i.mlp.linear_fc1.layer_norm_weight
    M: mixer.{in_proj.weight, conv1d.weight, conv1d.bias, dt_bias, A_log, D, norm.weight,
       out_proj.weight} -> same names under decoder.layers.i.mixer (identical layouts:
       in_proj rows [z | x | B | C | dt], conv channels [x | B | C])
    *: q_proj, k_proj, v_proj -> linear_qkv.weight, rows interleaved per KV group
       [q heads of group g | k_g | v_g] for g = 0..G-1 (megatron's GQA layout);
       o_proj -> linear_proj.weight
    -: up_proj -> linear_fc1.weight, down_proj -> linear_fc2.weight
    model.embeddings.weight -> embedding.word_embeddings.weight (rows padded to megatron's
    padded vocabulary), model.norm_f.weight -> decoder.final_norm.weight,
    lm_head.weight -> output_layer.weight.

The Mamba step size: megatron-core, vLLM and the released model's own (remote) code take
softplus(dt + dt_bias) unclamped (the released config's ``time_step_limit`` is (0, inf));
``transformers``' native NemotronH clamps it from below at ``time_step_min`` in its prefill
(chunked) path, but not in its one-token decode path. An export therefore writes the clamp our
model applies: none (``mamba_dt_clamp_min: null``, the shipped recipes) is written as
``time_step_min = NO_CLAMP`` (1e-46: positive, so transformers' dt_bias initialisation stays
finite, yet it rounds to 0 in fp32/bf16, so the clamp is an exact no-op and prefill and decode
agree); a set ``mamba_dt_clamp_min`` is written as itself.

All of it is one table, :func:`llm_rules`, walked in both directions
(``megatron_vlm.conversion.mapping``).
"""

from typing import Dict, List

import torch

from megatron_vlm.conversion.mapping import Rule, rename, to_hf, to_ours
from megatron_vlm.models.config import load_model_config, padded_vocab_size

# time_step_min written for a model that does not clamp: > 0 (transformers' init takes its log),
# below half the smallest fp32 subnormal, so clamp(min=NO_CLAMP) is clamp(min=0) in fp32/bf16.
NO_CLAMP = 1e-46

_HF_LAYER_TYPES = {"M": "mamba", "*": "attention", "-": "mlp"}


def hf_config_kwargs(model_cfg) -> dict:
    """Keyword arguments for ``transformers.NemotronHConfig`` describing the same model."""
    cfg = load_model_config(model_cfg)
    clamp = cfg["mamba_dt_clamp_min"]
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        hybrid_override_pattern=cfg["hybrid_override_pattern"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_query_groups"],
        head_dim=cfg["kv_channels"],
        mamba_num_heads=cfg["mamba_num_heads"],
        mamba_head_dim=cfg["mamba_head_dim"],
        ssm_state_size=cfg["mamba_state_dim"],
        n_groups=cfg["mamba_num_groups"],
        conv_kernel=cfg["mamba_conv_kernel"],
        chunk_size=cfg["mamba_chunk_size"],
        expand=cfg["mamba_num_heads"] * cfg["mamba_head_dim"] // cfg["hidden_size"],
        # transformers clamps dt from below at time_step_min: write our clamp, or an exact no-op.
        time_step_min=clamp if clamp is not None else NO_CLAMP,
        time_step_limit=(clamp if clamp is not None else 0.0, float("inf")),
        layer_norm_epsilon=cfg["layernorm_epsilon"],
        mlp_hidden_act="relu2",
        attention_bias=False,
        mlp_bias=False,
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=not cfg["untie_embeddings_and_output_weights"],
        max_position_embeddings=cfg["max_sequence_length"],
        residual_in_fp32=False,
    )


def model_cfg_from_hf_config(hf_config, **extra) -> dict:
    """Our model-config dict from a ``NemotronHConfig`` (dense layers M, *, - only)."""
    pattern = hf_config.hybrid_override_pattern
    if set(pattern) - set(_HF_LAYER_TYPES):
        raise NotImplementedError(f"layer types {set(pattern) - set(_HF_LAYER_TYPES)} not supported")
    cfg = dict(
        hybrid_override_pattern=pattern,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=hf_config.head_dim,
        mamba_num_heads=hf_config.mamba_num_heads,
        mamba_head_dim=hf_config.mamba_head_dim,
        mamba_state_dim=hf_config.ssm_state_size,
        mamba_num_groups=hf_config.n_groups,
        mamba_conv_kernel=hf_config.conv_kernel,
        mamba_chunk_size=hf_config.chunk_size,
        # The released models' semantics: time_step_limit (0 = no clamp), see the module doc.
        mamba_dt_clamp_min=float(hf_config.time_step_limit[0]) or None,
        layernorm_epsilon=hf_config.layer_norm_epsilon,
        vocab_size=hf_config.vocab_size,
        untie_embeddings_and_output_weights=not hf_config.tie_word_embeddings,
        max_sequence_length=hf_config.max_position_embeddings,
    )
    cfg.update(extra)
    return load_model_config(cfg)


_NORM_OWNER = {"M": "mixer.in_proj", "*": "self_attention.linear_qkv", "-": "mlp.linear_fc1"}
_MAMBA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
                 "norm.weight", "out_proj.weight")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def _vocab_rule(ours: str, hf: str, vocab: int, padded: int) -> Rule:
    """Our rows are padded to megatron's padded vocabulary; HF holds exactly ``vocab`` rows."""
    return Rule((ours,), (hf,), lambda t: (t[:vocab],), lambda t: (_pad_rows(t, padded),))


def _tied_to_ours(padded: int):
    def to_ours_(embeddings, lm_head):
        if embeddings.device.type != "meta" and not torch.equal(embeddings, lm_head):
            raise ValueError("the recipe ties embeddings and output layer, but the HF lm_head.weight "
                             "differs from model.embeddings.weight")
        return (_pad_rows(embeddings, padded),)
    return to_ours_


def _qkv_rule(i: int, groups: int, per_group: int, hd: int) -> Rule:
    """megatron's GQA qkv rows [q heads of group g | k_g | v_g] per group <-> HF q, k, v."""
    def to_hf_(qkv):
        hidden = qkv.shape[1]
        q, k, v = torch.split(qkv.reshape(groups, (per_group + 2) * hd, hidden),
                              [per_group * hd, hd, hd], dim=1)
        return tuple(t.reshape(-1, hidden) for t in (q, k, v))

    def to_ours_(q, k, v):
        hidden = q.shape[1]
        parts = [q.reshape(groups, per_group * hd, hidden), k.reshape(groups, hd, hidden),
                 v.reshape(groups, hd, hidden)]
        return (torch.cat(parts, dim=1).reshape(-1, hidden),)

    ours = f"decoder.layers.{i}.self_attention.linear_qkv.weight"
    hf = tuple(f"model.layers.{i}.mixer.{p}_proj.weight" for p in "qkv")
    return Rule((ours,), hf, to_hf_, to_ours_)


def llm_rules(model_cfg) -> List[Rule]:
    """The NemotronHForCausalLM <-> megatron (TP=1, PP=1) table, one rule per tensor group."""
    cfg = load_model_config(model_cfg)
    vocab, padded = cfg["vocab_size"], padded_vocab_size(cfg, 1)
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_query_groups"], cfg["kv_channels"]
    rules = [_vocab_rule("embedding.word_embeddings.weight", "model.embeddings.weight", vocab, padded),
             rename("decoder.final_norm.weight", "model.norm_f.weight")]
    if cfg["untie_embeddings_and_output_weights"]:
        rules.append(_vocab_rule("output_layer.weight", "lm_head.weight", vocab, padded))
    else:  # transformers' NemotronH never ties lm_head: it is written as a copy of the embedding
        rules[0] = Rule(rules[0].ours, ("model.embeddings.weight", "lm_head.weight"),
                        lambda t: (t[:vocab], t[:vocab].clone()), _tied_to_ours(padded))
    for i, char in enumerate(cfg["hybrid_override_pattern"]):
        if char not in _NORM_OWNER:
            raise NotImplementedError(f"layer type {char!r}")
        ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        rules.append(rename(f"{ours}{_NORM_OWNER[char]}.layer_norm_weight", hf + "norm.weight"))
        if char == "M":
            rules += [rename(f"{ours}mixer.{n}", f"{hf}mixer.{n}") for n in _MAMBA_PARAMS]
        elif char == "*":
            rules += [_qkv_rule(i, groups, heads // groups, hd),
                      rename(ours + "self_attention.linear_proj.weight", hf + "mixer.o_proj.weight")]
        else:
            rules += [rename(ours + "mlp.linear_fc1.weight", hf + "mixer.up_proj.weight"),
                      rename(ours + "mlp.linear_fc2.weight", hf + "mixer.down_proj.weight")]
    return rules


def hf_to_megatron(hf_sd: Dict[str, torch.Tensor], model_cfg) -> Dict[str, torch.Tensor]:
    """Megatron (TP=1, PP=1) state dict from a NemotronHForCausalLM state dict."""
    return to_ours(llm_rules(model_cfg), hf_sd)


def megatron_to_hf(mg_sd: Dict[str, torch.Tensor], model_cfg) -> Dict[str, torch.Tensor]:
    """NemotronHForCausalLM state dict from a megatron
    (TP=1, PP=1) state dict; padded vocabulary rows are dropped."""
    return to_hf(llm_rules(model_cfg), mg_sd)
