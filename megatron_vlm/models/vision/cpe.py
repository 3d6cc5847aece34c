"""Cropped position embedding (CPE) of RADIO: one learned table, resampled to each input's grid.

The table covers a ``max_rows x max_cols`` patch grid (128 x 128 for 2048 px at patch 16).

* Inference (:func:`interpolate_window`): the table is resized bilinearly with
  ``align_corners=False`` to a square ``(m, m)``, ``m = max(rows, cols)``, and the top-left
  ``(rows, cols)`` window is kept. Non-square inputs therefore see the same position scale along
  both axes. This is what ``transformers``' ``RadioModel``, vLLM and Megatron-trained checkpoints
  use (the original RADIO remote code resizes with ``align_corners=True``; Megatron-Bridge patches
  that back to ``False``).
* Training (:func:`sample_crops` + :func:`crop_window`): each tile samples its own crop of the
  table, side ``scale`` in [sqrt(0.1), 1] with a log-uniform aspect ratio in [3/4, 4/3] (clamped
  to the table), at a uniform position, and the crop is resampled to ``(rows, cols)`` with
  ``grid_sample(align_corners=True)`` -- Megatron-LM's RADIO training augmentation, which keeps
  the model from tying features to absolute positions of one resolution.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

MIN_CROP_SCALE = math.sqrt(0.1)
MAX_CROP_ASPECT = 4.0 / 3.0


def _as_grid(table: torch.Tensor, table_dims: Tuple[int, int]) -> torch.Tensor:
    """[1, R*C, h] -> [1, h, R, C] (channels first, what interpolate / grid_sample take)."""
    rows, cols = table_dims
    return table.reshape(1, rows, cols, -1).permute(0, 3, 1, 2)


def _as_tokens(grid: torch.Tensor) -> torch.Tensor:
    """[n, h, r, c] -> [n, r*c, h], row-major like the patch sequence."""
    return grid.flatten(2).transpose(1, 2)


def interpolate_window(table: torch.Tensor, table_dims: Tuple[int, int],
                       input_dims: Tuple[int, int]) -> torch.Tensor:
    """Inference CPE for a ``input_dims = (rows, cols)`` patch grid -> [1, rows*cols, h]."""
    if tuple(input_dims) == tuple(table_dims):
        return table
    rows, cols = input_dims
    side = max(rows, cols)
    grid = F.interpolate(_as_grid(table, table_dims).float(), size=(side, side), mode="bilinear",
                         align_corners=False)
    return _as_tokens(grid[..., :rows, :cols]).to(table.dtype)


def sample_crops(batch: int, device=None, generator: Optional[torch.Generator] = None):
    """Random crop boxes in table coordinates [0, 1]: ``(size_xy, origin_xy)``, each [batch, 2]."""
    def uniform(low, high):
        return torch.rand(batch, 1, device=device, generator=generator) * (high - low) + low

    scale = uniform(MIN_CROP_SCALE, 1.0)
    aspect = torch.exp(uniform(-math.log(MAX_CROP_ASPECT), math.log(MAX_CROP_ASPECT)))
    size_xy = torch.cat([scale * aspect, scale / aspect], dim=1).clamp(0.0, 1.0)
    origin_xy = torch.rand(batch, 2, device=device, generator=generator) * (1.0 - size_xy)
    return size_xy, origin_xy


def crop_window(table: torch.Tensor, table_dims: Tuple[int, int], input_dims: Tuple[int, int],
                size_xy: torch.Tensor, origin_xy: torch.Tensor) -> torch.Tensor:
    """Resample each crop box of the table to ``input_dims`` -> [batch, rows*cols, h].

    Box coordinates are fractions of the table (x = columns, y = rows); the corner samples of the
    output sit exactly on the box corners (``align_corners=True``).
    """
    rows, cols = input_dims
    batch = size_xy.shape[0]
    device = table.device
    unit_x = torch.linspace(0.0, 1.0, cols, device=device).view(1, 1, cols).expand(batch, rows, cols)
    unit_y = torch.linspace(0.0, 1.0, rows, device=device).view(1, rows, 1).expand(batch, rows, cols)
    x = unit_x * size_xy[:, 0, None, None] + origin_xy[:, 0, None, None]
    y = unit_y * size_xy[:, 1, None, None] + origin_xy[:, 1, None, None]
    sample_at = torch.stack([x, y], dim=-1) * 2.0 - 1.0  # grid_sample wants [-1, 1]
    grid = _as_grid(table, table_dims).float().expand(batch, -1, -1, -1)
    out = F.grid_sample(grid, sample_at.float(), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return _as_tokens(out).to(table.dtype)
