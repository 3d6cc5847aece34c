import glob
import os
import sysconfig

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vlm.data.image import CLIP_MEAN, CLIP_STD, denormalize_tiles, load_rgb, normalize_tiles
from megatron_vlm.data.tiling import (
    TilingConfig,
    candidate_grids,
    choose_grid,
    num_tiles,
    tile_image,
    tokens_per_tile,
)

DEFAULT = TilingConfig()  # 512 px, 1..12 tiles, thumbnail


@pytest.mark.parametrize("size, grid, n_tiles", [
    ((300, 200), (3, 2), 7),     # small image, still 3x2 (aspect rules) + thumbnail
    ((512, 512), (1, 1), 1),     # square, too small for 2x2 -> no thumbnail
    ((100, 100), (1, 1), 1),
    ((800, 800), (2, 2), 5),     # tie 1x1 / 2x2 / 3x3; 640000 px > half of 2x2 (524288)
    ((1024, 1024), (2, 2), 5),   # 3x3 needs > 1179648 px
    ((1600, 1600), (3, 3), 10),  # 4x4 = 16 tiles is not a candidate
    ((800, 600), (4, 3), 13),
    ((1024, 512), (2, 1), 3),
    ((2000, 500), (4, 1), 5),
    ((500, 2000), (1, 4), 5),
    ((4000, 100), (12, 1), 13),  # very wide: the widest grid
    ((100, 4000), (1, 12), 13),
    ((1000, 700), (3, 2), 7),    # 1.43: nearest 3/2
    ((1200, 500), (5, 2), 11),   # 2.4: nearest 5/2 (2.5) vs 2/1 and 3/1
])
def test_grid_for_size_default_rule(size, grid, n_tiles):
    assert choose_grid(*size, DEFAULT) == grid
    assert num_tiles(*size, DEFAULT) == n_tiles


def _internvl_oracle(w, h, tile, mn, mx):
    """InternVL's dynamic_preprocess grid choice, restated independently for comparison."""
    ratios = sorted({(i, j) for n in range(mn, mx + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if mn <= i * j <= mx}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(w / h - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and w * h > 0.5 * tile * tile * r[0] * r[1]:
            best = r
    return best


@pytest.mark.parametrize("tile, mn, mx", [(512, 1, 12), (64, 1, 6), (448, 1, 6), (64, 2, 9), (32, 1, 24)])
def test_rule_matches_internvl_everywhere(tile, mn, mx):
    cfg = TilingConfig(tile, mn, mx)
    mismatches = [(w, h) for w in range(4, 2400, 53) for h in range(4, 2400, 59)
                  if choose_grid(w, h, cfg) != _internvl_oracle(w, h, tile, mn, mx)]
    # exact aspect ties are where the rule is subtle: include them explicitly
    for cols, rows in candidate_grids(1, mx):
        for scale in (tile // 4, tile // 2, tile, 2 * tile):
            w, h = cols * scale, rows * scale
            if choose_grid(w, h, cfg) != _internvl_oracle(w, h, tile, mn, mx):
                mismatches.append((w, h))
    assert mismatches == []


def test_candidates_cover_all_counts():
    grids = candidate_grids(1, 12)
    assert len(grids) == len(set(grids)) == sum(len([d for d in range(1, n + 1) if n % d == 0]) for n in range(1, 13))
    assert all(1 <= c * r <= 12 for c, r in grids)
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)


def test_small_tile_parameters_and_thumbnail_switch():
    small = TilingConfig(tile_size=64, max_tiles=12)
    assert choose_grid(300, 200, small) == (3, 2)
    assert choose_grid(640, 640, small) == (3, 3)  # large relative to 64 px tiles: most tiles
    no_thumb = TilingConfig(tile_size=64, max_tiles=12, use_thumbnail=False)
    tiled = tile_image(Image.new("RGB", (300, 200)), no_thumb)
    assert len(tiled.tiles) == 6 and not tiled.has_thumbnail
    capped = TilingConfig(tile_size=64, max_tiles=4)
    assert choose_grid(2000, 500, capped) == (4, 1)
    assert choose_grid(800, 600, capped) == (2, 2)  # 4:3 ties 1x1 and 2x2; big enough for 2x2
    with pytest.raises(ValueError):
        TilingConfig(min_tiles=3, max_tiles=2)


def test_tokens_per_tile():
    assert tokens_per_tile(512, 16, 0.5) == 256
    assert tokens_per_tile(64, 16, 0.5) == 4
    assert tokens_per_tile(64, 8, 0.5) == 16
    with pytest.raises(ValueError):
        tokens_per_tile(48, 16, 0.5)  # 3x3 patches cannot be pixel-shuffled by 2


def _real_images():
    """PNG files shipped inside installed packages (networkx, sympy, werkzeug test assets)."""
    site = sysconfig.get_paths()["purelib"]
    paths = sorted(glob.glob(os.path.join(site, "networkx", "**", "*.png"), recursive=True))[:2]
    paths += sorted(glob.glob(os.path.join(site, "sympy", "**", "*.png"), recursive=True))[:1]
    paths += sorted(glob.glob(os.path.join(site, "werkzeug", "**", "*.png"), recursive=True))[:1]
    return paths


def _check_tiles(img, cfg):
    tiled = tile_image(img, cfg)
    cols, rows = tiled.grid
    t = cfg.tile_size
    assert (cols, rows) == choose_grid(img.width, img.height, cfg)
    assert len(tiled.tiles) == cols * rows + (1 if tiled.has_thumbnail else 0)
    assert tiled.has_thumbnail == (cfg.use_thumbnail and cols * rows > 1)
    assert all(tile.size == (t, t) and tile.mode == "RGB" for tile in tiled.tiles)
    # grid tiles are the resized image cut row-major; the thumbnail is the whole image
    resized = np.asarray(img.convert("RGB").resize((cols * t, rows * t), Image.Resampling.BICUBIC))
    stitched = np.concatenate([np.concatenate([np.asarray(tiled.tiles[r * cols + c]) for c in range(cols)], axis=1)
                               for r in range(rows)], axis=0)
    assert np.array_equal(stitched, resized)
    if tiled.has_thumbnail:
        thumb = np.asarray(img.convert("RGB").resize((t, t), Image.Resampling.BICUBIC))
        assert np.array_equal(np.asarray(tiled.tiles[-1]), thumb)
    return tiled


def test_real_images_of_many_aspect_ratios():
    paths = _real_images()
    if not paths:
        pytest.skip("no PNG assets in site-packages")
    checked = 0
    for path in paths:
        img = load_rgb(path)
        w, h = img.size
        if w < 100:  # werkzeug's 16x16 icon: tiny square -> one tile, no thumbnail
            tiled = _check_tiles(img, DEFAULT)
            assert tiled.grid == (1, 1) and len(tiled.tiles) == 1
            checked += 1
            continue
        assert _check_tiles(img, DEFAULT).grid == (4, 3)  # 800x600 and 640x480 are 4:3
        # crops with exact grid aspect ratios: the grid is that ratio (unless a tie resolves to more area)
        crops = {(w, w // 4): (4, 1), (h // 3, h): (1, 3), (h, h * 2 // 3): (3, 2), (w // 2, h): (2, 3),
                 (w // 2, w // 10): (5, 1), (h // 2, h // 2): (1, 1), (w, h // 2): (5, 2)}  # 8:3, nearest 5/2
        for (cw, ch), grid in crops.items():
            crop = img.crop((0, 0, cw, ch))
            tiled = _check_tiles(crop, DEFAULT)
            assert tiled.grid == grid, (path, crop.size, tiled.grid)
            checked += 1
        for cfg in (TilingConfig(64, 1, 12), TilingConfig(64, 1, 6, use_thumbnail=False)):
            _check_tiles(img.crop((0, 0, w, h // 2)), cfg)
            checked += 1
    assert checked >= 8


def test_generated_images_and_modes():
    for size, grid in [((300, 200), (3, 2)), ((20, 20), (1, 1)), ((90, 30), (3, 1)), ((30, 120), (1, 4))]:
        for mode in ("RGB", "L", "RGBA", "P"):
            img = Image.linear_gradient("L").resize(size).convert(mode)
            assert _check_tiles(img, TilingConfig(32, 1, 12)).grid == grid


def test_normalisation_is_clip():
    tiles = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    tiles[0] = (255, 128, 0)
    tiles[1] = 10
    x = normalize_tiles(tiles)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    for c, v in enumerate((255, 128, 0)):
        assert torch.allclose(x[0, c], torch.full((8, 8), (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]))
    assert torch.equal(denormalize_tiles(x), torch.from_numpy(tiles))


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.save(tmp_path / "t.png")
    assert np.asarray(load_rgb(tmp_path / "t.png")).min() == 255
