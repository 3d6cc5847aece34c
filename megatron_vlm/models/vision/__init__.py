"""RADIO vision tower on megatron-core (see radio.py), its layer specs, CPE and pixel shuffle."""

from megatron_vlm.models.vision.config import load_radio_config, make_vision_transformer_config
from megatron_vlm.models.vision.pixel_shuffle import pixel_shuffle, shuffle_tokens
from megatron_vlm.models.vision.radio import RadioVisionTower, build_radio_tower
from megatron_vlm.models.vision.specs import get_vit_block_spec, get_vit_layer_spec

__all__ = [
    "RadioVisionTower", "build_radio_tower", "get_vit_block_spec", "get_vit_layer_spec",
    "load_radio_config", "make_vision_transformer_config", "pixel_shuffle", "shuffle_tokens",
]
