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

One semantic difference to know: `transformers` clamps the Mamba step size at
``time_step_min``; megatron-core does not. Set ``mamba_dt_clamp_min`` in the model YAML to get the
HF behaviour (the parity test does).
"""

from typing import Dict

import torch

from megatron_vlm.models.config import load_model_config, padded_vocab_size

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
        # HF always clamps dt from below at time_step_min (also its dt_bias init floor).
        time_step_min=clamp if clamp is not None else 0.001,
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
        mamba_dt_clamp_min=hf_config.time_step_min,
        layernorm_epsilon=hf_config.layer_norm_epsilon,
        vocab_size=hf_config.vocab_size,
        untie_embeddings_and_output_weights=not hf_config.tie_word_embeddings,
        max_sequence_length=hf_config.max_position_embeddings,
    )
    cfg.update(extra)
    return load_model_config(cfg)


def _layer_norm_key(char: str, i: int) -> str:
    return {
        "M": f"decoder.layers.{i}.mixer.in_proj.layer_norm_weight",
        "*": f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
        "-": f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
    }[char]


_MAMBA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
                 "norm.weight", "out_proj.weight")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, pad], dim=0)


def hf_to_megatron(hf_sd: Dict[str, torch.Tensor], model_cfg) -> Dict[str, torch.Tensor]:
    """Megatron (TP=1, PP=1) state dict from a NemotronHForCausalLM state dict."""
    cfg = load_model_config(model_cfg)
    vocab = padded_vocab_size(cfg, 1)
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_query_groups"], cfg["kv_channels"]
    per_group = heads // groups
    out = {
        "embedding.word_embeddings.weight": _pad_rows(hf_sd["model.embeddings.weight"], vocab),
        "decoder.final_norm.weight": hf_sd["model.norm_f.weight"],
    }
    if cfg["untie_embeddings_and_output_weights"]:
        out["output_layer.weight"] = _pad_rows(hf_sd["lm_head.weight"], vocab)
    for i, char in enumerate(cfg["hybrid_override_pattern"]):
        hf = f"model.layers.{i}."
        out[_layer_norm_key(char, i)] = hf_sd[hf + "norm.weight"]
        if char == "M":
            for name in _MAMBA_PARAMS:
                out[f"decoder.layers.{i}.mixer.{name}"] = hf_sd[hf + "mixer." + name]
        elif char == "*":
            hidden = hf_sd[hf + "mixer.q_proj.weight"].shape[1]
            q = hf_sd[hf + "mixer.q_proj.weight"].view(groups, per_group * hd, hidden)
            k = hf_sd[hf + "mixer.k_proj.weight"].view(groups, hd, hidden)
            v = hf_sd[hf + "mixer.v_proj.weight"].view(groups, hd, hidden)
            qkv = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
            out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = qkv
            out[f"decoder.layers.{i}.self_attention.linear_proj.weight"] = hf_sd[hf + "mixer.o_proj.weight"]
        elif char == "-":
            out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = hf_sd[hf + "mixer.up_proj.weight"]
            out[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = hf_sd[hf + "mixer.down_proj.weight"]
        else:
            raise NotImplementedError(f"layer type {char!r}")
    return out


def megatron_to_hf(mg_sd: Dict[str, torch.Tensor], model_cfg) -> Dict[str, torch.Tensor]:
    """NemotronHForCausalLM state dict from a megatron (TP=1, PP=1) state dict.

    Extra megatron entries (``_extra_state``) are ignored; padded vocabulary rows are dropped.
    """
    cfg = load_model_config(model_cfg)
    vocab = cfg["vocab_size"]
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_query_groups"], cfg["kv_channels"]
    per_group = heads // groups
    out = {
        "model.embeddings.weight": mg_sd["embedding.word_embeddings.weight"][:vocab],
        "model.norm_f.weight": mg_sd["decoder.final_norm.weight"],
    }
    if cfg["untie_embeddings_and_output_weights"]:
        out["lm_head.weight"] = mg_sd["output_layer.weight"][:vocab]
    else:
        out["lm_head.weight"] = out["model.embeddings.weight"]
    for i, char in enumerate(cfg["hybrid_override_pattern"]):
        hf = f"model.layers.{i}."
        out[hf + "norm.weight"] = mg_sd[_layer_norm_key(char, i)]
        if char == "M":
            for name in _MAMBA_PARAMS:
                out[hf + "mixer." + name] = mg_sd[f"decoder.layers.{i}.mixer.{name}"]
        elif char == "*":
            qkv = mg_sd[f"decoder.layers.{i}.self_attention.linear_qkv.weight"]
            hidden = qkv.shape[1]
            qkv = qkv.view(groups, (per_group + 2) * hd, hidden)
            q, k, v = torch.split(qkv, [per_group * hd, hd, hd], dim=1)
            out[hf + "mixer.q_proj.weight"] = q.reshape(-1, hidden)
            out[hf + "mixer.k_proj.weight"] = k.reshape(-1, hidden)
            out[hf + "mixer.v_proj.weight"] = v.reshape(-1, hidden)
            out[hf + "mixer.o_proj.weight"] = mg_sd[f"decoder.layers.{i}.self_attention.linear_proj.weight"]
        elif char == "-":
            out[hf + "mixer.up_proj.weight"] = mg_sd[f"decoder.layers.{i}.mlp.linear_fc1.weight"]
            out[hf + "mixer.down_proj.weight"] = mg_sd[f"decoder.layers.{i}.mlp.linear_fc2.weight"]
        else:
            raise NotImplementedError(f"layer type {char!r}")
    return out
