"""Image bytes <-> pixels, and the normalisation the vision tower expects.

Tiles are stored as 8-bit RGB (PNG or JPEG) and normalised only when a batch is built:
``x = (pixel / 255 - CLIP_MEAN) / CLIP_STD`` per channel, float32, channels first
([N, 3, T, T]). The statistics are OpenAI CLIP's, which RADIO (c-RADIOv2-VLM-H) uses.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from megatron_vlm.media_format import CLIP_MEAN, CLIP_STD


class ImageDecodeError(ValueError):
    """Bytes that are not a complete, decodable image."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode Pillow opens -> 8-bit RGB; the one conversion used at build and at load time.

    - transparency (RGBA, LA, La, PA, RGBa, or P/L/RGB with a transparency key): composited on
      white (documents and plots are drawn on white), not black;
    - 16/32-bit integer greyscale (I;16, I;16B, I...): 0..65535 scaled to 0..255 (Pillow's own
      conversion clips everything above 255 to white);
    - float greyscale (F): 0..1 when no value exceeds 1, else 0..255, clipped;
    - everything else (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX): Pillow's conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in img.info:
        if img.mode == "La":  # premultiplied: Pillow converts it only to LA
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def load_rgb(source) -> Image.Image:
    """Open a path or file object and fully decode it to RGB (raises on truncated/corrupt files)."""
    with Image.open(source) as img:
        img.load()  # decode now, so truncation is detected here and not later
        return to_rgb(img).copy()


_TILE_FORMATS = ("PNG", "JPEG")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_plain_png(data: bytes, tile_size: int):
    """The PNG tiles the shard builder writes (8-bit RGB, not interlaced, tile_size square, only
    IHDR / IDAT / IEND chunks, every CRC right) decoded by Pillow's own zlib decoder without
    opening them as a file: for a 64 px tile that parsing is a third of the cost. None for any
    other bytes, which then take the general path (and its errors)."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    view, pos, idat, header = memoryview(data), len(_PNG_SIGNATURE), [], False
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body, crc_at = pos + 8, pos + 8 + length
        if crc_at + 4 > len(data) or zlib.crc32(view[pos + 4:crc_at]) != struct.unpack_from(">I", data, crc_at)[0]:
            return None
        if kind == b"IHDR" and not header:
            if length != 13 or struct.unpack_from(">IIBBBBB", data, body) != (tile_size, tile_size, 8, 2, 0, 0, 0):
                return None
            header = True
        elif kind == b"IDAT" and header:
            idat.append(view[body:crc_at])
        elif kind == b"IEND" and idat:
            try:
                img = Image.frombytes("RGB", (tile_size, tile_size), b"".join(idat), "zip", "RGB")
            except Exception:  # damaged data: the general path names the error
                return None
            return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(tile_size, tile_size, 3)
        else:
            return None
        pos = crc_at + 4
    return None


def decode_tile(data: bytes, tile_size: int) -> np.ndarray:
    """Decode one stored tile (PNG or JPEG) to a uint8 [T, T, 3] array, checking its size."""
    plain = _decode_plain_png(data, tile_size)
    if plain is not None:
        return plain
    try:
        # Naming the formats skips Pillow's probing of every plugin (a large share of the cost
        # for small tiles).
        with Image.open(io.BytesIO(data), formats=_TILE_FORMATS) as img:
            img.load()
            img = to_rgb(img)  # tiles are written as RGB; converted like the build if not
            if img.size != (tile_size, tile_size):
                raise ImageDecodeError(f"tile is {img.size[0]}x{img.size[1]}, expected {tile_size}x{tile_size}")
            return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(tile_size, tile_size, 3)
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... on bad data
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from exc


def encode_tile(tile: Image.Image, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """Encode one RGB tile; deterministic for a given Pillow version (no timestamps, fixed options)."""
    buf = io.BytesIO()
    if image_format == "png":
        tile.save(buf, format="PNG", compress_level=6)
    elif image_format in ("jpg", "jpeg"):
        tile.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    else:
        raise ValueError(f"unknown tile format {image_format!r} (png or jpeg)")
    return buf.getvalue()


def _stats(torch):
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def normalize_tiles(tiles_uint8):
    """uint8 [N, T, T, 3] (numpy or torch) -> float32 torch [N, 3, T, T], CLIP-normalised."""
    import torch  # imported here so shard building does not pay for torch

    x = torch.as_tensor(tiles_uint8)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, T, T, 3], got {tuple(x.shape)} {x.dtype}")
    mean, std = _stats(torch)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std).contiguous()


def denormalize_tiles(tiles):
    """Inverse of normalize_tiles, to uint8 [N, T, T, 3] (for inspection and tests)."""
    import torch

    mean, std = _stats(torch)
    x = tiles * std + mean
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
