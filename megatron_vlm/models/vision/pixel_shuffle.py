"""Pixel shuffle ("v2", InternVL / Nemotron VL): trade spatial resolution for channels.

With ratio 0.5 each 2x2 neighbourhood of patch features becomes one token of 4x the width:
32x32x1280 -> 16x16x5120 for a 512 px tile. Merged token (i, j) is the concatenation
``[x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]]`` (row offset major). The connector's
first weights depend on this order; it equals
``transformers``' ``nemotron_h_omni`` ``pixel_shuffle`` (checked by tests/vision/test_connector.py).
"""

import torch


def pixel_shuffle(features: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """[n, rows, cols, c] -> [n, rows*ratio, cols*ratio, c/ratio^2]."""
    n, rows, cols, c = features.shape
    merge = round(1 / ratio)
    if rows % merge or cols % merge:
        raise ValueError(f"patch grid {rows}x{cols} is not divisible by the pixel-shuffle merge "
                         f"factor {merge}")
    # Fold neighbouring columns into channels, swap the spatial axes, fold neighbouring rows
    # (now in the column slot) into channels, swap back ("v2" restores the row-major layout).
    x = features.reshape(n, rows, cols // merge, c * merge)
    x = x.transpose(1, 2).reshape(n, cols // merge, rows // merge, c * merge * merge)
    return x.transpose(1, 2).contiguous()


def shuffle_tokens(features: torch.Tensor, grid: tuple, ratio: float = 0.5) -> torch.Tensor:
    """Patch tokens [n, rows*cols, c] (row-major) -> merged tokens [n, rows*cols*ratio^2, c/ratio^2]."""
    n, tokens, c = features.shape
    rows, cols = grid
    if tokens != rows * cols:
        raise ValueError(f"{tokens} patch tokens do not form a {rows}x{cols} grid")
    x = pixel_shuffle(features.reshape(n, rows, cols, c), ratio)
    return x.reshape(n, -1, x.shape[-1])
