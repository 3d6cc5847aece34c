"""transformers references with random tiny weights, and the mapping of them into our modules."""

import torch

from megatron_vlm.models.vision.config import load_radio_config

IMAGE_TOKEN_ID = 7  # any id of nemotron_h_tiny's vocabulary that random text avoids


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.1, skip=("lambda1",)) -> None:
    """Overwrite every parameter (norms and biases included) so a wrong mapping cannot hide
    behind default values (ones / zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not any(s in name for s in skip):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def hf_radio_like(vision_cfg) -> "torch.nn.Module":
    """transformers RadioModel with the geometry of one of our tower configs, random weights."""
    from transformers.models.radio.configuration_radio import RadioConfig
    from transformers.models.radio.modeling_radio import RadioModel

    cfg = load_radio_config(vision_cfg)
    hf_cfg = RadioConfig(
        hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        mlp_ratio=cfg["ffn_hidden_size"] / cfg["hidden_size"], patch_size=cfg["patch_size"],
        max_img_size=cfg["max_img_size"], layer_norm_eps=cfg["layernorm_epsilon"],
        # Our single prefix table covers cls + registers; split it any way.
        num_cls_tokens=2, num_registers=cfg["class_token_len"] - 2,
    )
    hf_cfg._attn_implementation = "eager"
    model = RadioModel(hf_cfg).eval()
    randomize_(model, seed=0)
    return model
