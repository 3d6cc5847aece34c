"""Dynamic tiling of an image into square tiles (Nemotron Nano V2 VL / InternVL rule).

The rule (InternVL ``dynamic_preprocess``, used by Megatron-LM for Nemotron Nano V2 VL and by
vLLM's ``nano_nemotron_vl`` through InternVL's target ratios):

1. Candidate grids are all ``(cols, rows)`` with ``min_tiles <= cols * rows <= max_tiles``,
   visited in increasing order of ``cols * rows`` (the tile count).
2. The image's aspect ratio ``a = width / height`` is compared with each grid's ``cols / rows``.
   The grid with the smallest ``|a - cols/rows|`` wins; the first one met (fewest tiles) wins a
   tie, *unless* a later tied grid satisfies
   ``width * height > 0.5 * tile_size**2 * cols * rows``: the image is large enough to fill at
   least half of that grid's area, so the larger grid is taken. (Exactly InternVL's loop: on a
   tie the later candidate replaces the current best when the area condition holds.)
3. The image is resized (bicubic, Pillow's antialiased filter) to
   ``(tile_size * cols, tile_size * rows)`` and cut into ``cols * rows`` tiles, row-major.
4. When ``use_thumbnail`` and the grid has more than one tile, a ``tile_size x tile_size``
   thumbnail of the *original* image (bicubic) is appended last.

So the grid depends on the aspect ratio, not the size: a 300x200 image becomes a 3x2 grid (6
tiles + thumbnail, upsampled); a 512x512 image stays 1x1 (no thumbnail); 1024x1024 ties 1x1, 2x2
and 3x3 on aspect, and is large enough only for 2x2 (2x2 + thumbnail = 5 tiles).

Each tile costs ``tokens_per_tile(tile_size, patch_size, pixel_shuffle_ratio)`` LLM tokens:
``(tile_size / patch_size * ratio) ** 2``, i.e. 256 for 512 px tiles, patch 16, ratio 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from PIL import Image


@dataclass(frozen=True)
class TilingConfig:
    """Parameters of the tiling rule (defaults are the released model's)."""

    tile_size: int = 512
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True

    def __post_init__(self):
        if self.tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {self.tile_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")

    def to_dict(self) -> dict:
        return {
            "tile_size": self.tile_size,
            "min_tiles": self.min_tiles,
            "max_tiles": self.max_tiles,
            "use_thumbnail": self.use_thumbnail,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TilingConfig":
        return cls(
            tile_size=int(d["tile_size"]),
            min_tiles=int(d["min_tiles"]),
            max_tiles=int(d["max_tiles"]),
            use_thumbnail=bool(d["use_thumbnail"]),
        )


def tokens_per_tile(tile_size: int, patch_size: int = 16, pixel_shuffle_ratio: float = 0.5) -> int:
    """LLM tokens one tile becomes after the ViT (patch_size) and pixel shuffle (ratio)."""
    if tile_size % patch_size:
        raise ValueError(f"tile_size {tile_size} is not a multiple of patch_size {patch_size}")
    side = tile_size // patch_size
    merged = side * pixel_shuffle_ratio
    if merged != int(merged) or merged < 1:
        raise ValueError(f"{side} patches per side cannot be pixel-shuffled with ratio {pixel_shuffle_ratio}")
    return int(merged) ** 2


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, by increasing tile count.

    Grids with the same tile count keep the iteration order of a Python set built the way
    InternVL builds it. That order decides ties between same-count grids equally far from the
    image's aspect ratio (possible when min_tiles > 1, e.g. 1x2 vs 2x1 for a square image), so
    it is reproduced rather than replaced by a "nicer" one.
    """
    grids = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, config: TilingConfig = TilingConfig()) -> tuple[int, int]:
    """The (cols, rows) grid the rule picks for a width x height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(config.min_tiles, config.max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * config.tile_size**2 * cols * rows:
            # Tie on aspect: prefer more tiles when the image has the pixels to fill them.
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, config: TilingConfig = TilingConfig()) -> int:
    """Tiles (thumbnail included) the rule produces for a width x height image."""
    cols, rows = choose_grid(width, height, config)
    n = cols * rows
    return n + 1 if (config.use_thumbnail and n > 1) else n


@dataclass
class TiledImage:
    tiles: list  # list[PIL.Image.Image], RGB, tile_size x tile_size; grid tiles row-major, thumbnail last
    grid: tuple[int, int]  # (cols, rows)
    has_thumbnail: bool
    source_size: tuple[int, int]  # (width, height) of the original image


def tile_image(image: Image.Image, config: TilingConfig = TilingConfig()) -> TiledImage:
    """Cut an image into tiles by the rule in the module docstring."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    width, height = image.size
    cols, rows = choose_grid(width, height, config)
    t = config.tile_size
    resized = image.resize((t * cols, t * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
    has_thumbnail = config.use_thumbnail and len(tiles) > 1
    if has_thumbnail:
        tiles.append(image.resize((t, t), Image.Resampling.BICUBIC))
    return TiledImage(tiles=tiles, grid=(cols, rows), has_thumbnail=has_thumbnail, source_size=(width, height))


def resize_frame(frame: Image.Image, tile_size: int) -> Image.Image:
    """A video frame becomes one tile: resized to tile_size x tile_size (aspect not kept), bicubic."""
    frame = frame.convert("RGB") if frame.mode != "RGB" else frame
    return frame.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
