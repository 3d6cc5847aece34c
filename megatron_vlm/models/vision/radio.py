"""RADIO ViT (c-RADIOv2-VLM-H layout) on megatron-core: patch embedding, CPE, prefix tokens, blocks.

    tower = build_radio_tower("radio_tiny")          # after initialize_distributed(...)
    features = tower(tiles)                          # [N, 3, H, W] normalised -> [N, H/p * W/p, h]

* Input normalisation (CLIP mean/std) is done in preprocessing (``megatron_vlm.data.image``), not
  here: the tower takes normalised tiles.
* Patch embedding: a bias-free linear over non-overlapping ``p x p`` patches, each flattened
  channel-major ``(c, y, x)``, patches in row-major order.
* Position: CPE table of the ``max_img_size / p`` grid (see ``cpe.py``), added to the patches.
* Prefix tokens (cls + registers; one learned table ``class_token``) are prepended, attend with
  the patches, and are dropped from the output: only the patch features go to the connector.
* No final LayerNorm.

Parameter names follow megatron's ``RADIOViTModel`` (``embedder``, ``position_embeddings``,
``class_token``, ``decoder.layers.i``) so Megatron-LM checkpoints line up.
"""

from typing import Optional, Tuple, Union

import torch
from torch import nn

from megatron.core.models.common.vision_module.vision_module import VisionModule
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.config import config_fields
from megatron_vlm.models.norms import param_device
from megatron_vlm.models.vision import cpe
from megatron_vlm.models.vision.config import load_radio_config, make_vision_transformer_config
from megatron_vlm.models.vision.specs import get_vit_block_spec


def image_to_patches(tiles: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)*(W/p), C*p*p]; patches row-major, each flattened (c, y, x)."""
    n, c, h, w = tiles.shape
    rows, cols = h // patch_size, w // patch_size
    x = tiles.reshape(n, c, rows, patch_size, cols, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, c * patch_size * patch_size)


class RadioVisionTower(VisionModule):
    """Tiles -> patch features [N, patches, hidden] (prefix tokens removed)."""

    def __init__(
        self,
        config: TransformerConfig,
        block_spec: TransformerBlockSubmodules,
        patch_size: int = 16,
        max_img_size: int = 2048,
        class_token_len: int = 8,
        num_channels: int = 3,
        cpe_train_crop: bool = True,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.class_token_len = class_token_len
        self.table_dims = (max_img_size // patch_size, max_img_size // patch_size)
        self.cpe_train_crop = cpe_train_crop
        hidden = config.hidden_size

        # Column-parallel with gathered output, as in megatron's RADIO: the weight is sharded over
        # TP (so it checkpoints like every other linear) and every rank gets the full embedding.
        self.embedder = ColumnParallelLinear(
            num_channels * patch_size * patch_size, hidden, config=config,
            init_method=config.init_method, bias=False, gather_output=True,
        )
        device = param_device(config)
        self.position_embeddings = nn.Parameter(torch.empty(
            1, self.table_dims[0] * self.table_dims[1], hidden, dtype=config.params_dtype,
            device=device))
        self.class_token = nn.Parameter(torch.empty(
            class_token_len, hidden, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            std = config.init_method_std
            nn.init.trunc_normal_(self.position_embeddings, std=std, a=-2 * std, b=2 * std)
            nn.init.trunc_normal_(self.class_token, std=std, a=-2 * std, b=2 * std)

        kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
        self.decoder = TransformerBlock(config=config, spec=block_spec, pre_process=True,
                                        post_process=False, **kwargs)

    def set_input_tensor(self, input_tensor) -> None:
        # The tower never receives activations from a previous pipeline stage.
        pass

    def grid_dims(self, height: int, width: int) -> Tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"tile size {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def position_embedding(self, batch: int, input_dims: Tuple[int, int]) -> torch.Tensor:
        """[1 or batch, rows*cols, hidden]: interpolated window, or random crops in training."""
        if self.training and self.cpe_train_crop:
            size_xy, origin_xy = cpe.sample_crops(batch, device=self.position_embeddings.device)
            return cpe.crop_window(self.position_embeddings, self.table_dims, input_dims,
                                   size_xy, origin_xy)
        return cpe.interpolate_window(self.position_embeddings, self.table_dims, input_dims)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.dim() != 4 or tiles.shape[1] != self.num_channels:
            raise ValueError(f"expected tiles [N, {self.num_channels}, H, W], got {tuple(tiles.shape)}")
        n = tiles.shape[0]
        input_dims = self.grid_dims(tiles.shape[2], tiles.shape[3])
        patches = image_to_patches(tiles.to(self.position_embeddings.dtype), self.patch_size)
        x, _ = self.embedder(patches)                          # [N, P, h]
        x = x + self.position_embedding(n, input_dims)
        prefix = self.class_token.unsqueeze(0).expand(n, -1, -1)
        x = torch.cat([prefix, x], dim=1)                      # [N, prefix + P, h]
        x = self.decoder(hidden_states=x.transpose(0, 1).contiguous(), attention_mask=None)
        return x[self.class_token_len:].transpose(0, 1).contiguous()  # [N, P, h]


def build_radio_tower(
    vision_cfg: Union[str, dict],
    config: Optional[TransformerConfig] = None,
    impl: str = "auto",
    pg_collection=None,
    **config_overrides,
) -> RadioVisionTower:
    """Build the tower from a recipe name / YAML path / dict.

    config: a ready TransformerConfig, else made from the YAML with ``config_overrides`` (e.g.
    ``params_dtype="float32"``, ``use_cpu_initialization=True``, ``perform_initialization=False``).
    impl: "te", "local" or "auto".
    """
    cfg = load_radio_config(vision_cfg)
    if config is None:
        config = make_vision_transformer_config(cfg, **config_overrides)
    elif config_overrides:
        raise ValueError("pass either config or config overrides, not both")
    return RadioVisionTower(
        config=config,
        block_spec=get_vit_block_spec(cfg["num_layers"], impl),
        **config_fields(cfg, "patch_size", "max_img_size", "class_token_len", "num_channels",
                        "cpe_train_crop"),
        pg_collection=pg_collection,
    )
