"""decode_tile's fast path for the plain PNG tiles the shard builder writes, against Pillow."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from megatron_vlm.data.image import ImageDecodeError, _decode_plain_png, decode_tile, encode_tile

T = 32


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _tiles():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, T, dtype=np.float32)
    yield rng.integers(0, 256, (T, T, 3), dtype=np.uint8)  # noise: every PNG filter type
    yield np.zeros((T, T, 3), dtype=np.uint8)
    yield np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    yield (rng.random((T, T, 3)) < 0.1).astype(np.uint8) * 255  # sparse dots, like text


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_fast_path_equals_pillow(level):
    for pixels in _tiles():
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)
        data = buf.getvalue()
        fast = _decode_plain_png(data, T)
        assert fast is not None, "a plain 8-bit RGB PNG must take the fast path"
        assert np.array_equal(fast, pixels) and np.array_equal(fast, _pillow(data))
    # What the shard builder writes takes it too.
    assert _decode_plain_png(encode_tile(Image.fromarray(pixels)), T) is not None


def _png(mode: str, **save) -> bytes:
    rgb = next(_tiles())
    img = Image.fromarray(rgb).convert(mode) if mode != "I;16" else Image.fromarray(
        rgb[..., 0].astype(np.uint16) * 257)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def _with_text_chunk() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("k", "v")
    buf = io.BytesIO()
    Image.fromarray(next(_tiles())).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.mark.parametrize("data", [
    _png("RGBA"), _png("L"), _png("P"), _png("I;16"), _png("RGB", transparency=(0, 0, 0)),
    _with_text_chunk(),
], ids=["rgba", "grey", "palette", "16-bit", "transparency-key", "text-chunk"])
def test_other_pngs_take_the_general_path_with_the_same_pixels(data):
    assert _decode_plain_png(data, T) is None
    general = decode_tile(data, T)
    assert general.shape == (T, T, 3) and general.dtype == np.uint8


def test_interlaced_header_takes_the_general_path():
    # Pillow writes no interlaced PNGs: mark the header interlaced (with a right CRC).
    data = bytearray(_png("RGB"))
    data[8 + 8 + 12] = 1  # IHDR's interlace byte
    data[8 + 8 + 13: 8 + 8 + 17] = struct.pack(">I", zlib.crc32(bytes(data[8 + 4: 8 + 8 + 13])))
    assert _decode_plain_png(bytes(data), T) is None


def _chunk_offsets(data: bytes) -> dict:
    pos, out = 8, {}
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        out.setdefault(kind, pos)
        pos += 12 + length
    return out


def test_damaged_pngs_fall_back_and_raise_or_match_pillow():
    data = encode_tile(Image.fromarray(next(_tiles())))
    idat = _chunk_offsets(data)[b"IDAT"]
    # Truncated inside the pixel data: an error naming the problem, from either path.
    with pytest.raises(ImageDecodeError):
        decode_tile(data[: idat + 40], T)
    # A flipped byte in the compressed data: the CRC no longer matches, so the general path
    # decides (Pillow does not check IDAT CRCs; zlib's own check then fails).
    bad = bytearray(data)
    bad[idat + 8 + 20] ^= 0xFF
    assert _decode_plain_png(bytes(bad), T) is None
    with pytest.raises(ImageDecodeError):
        decode_tile(bytes(bad), T)
    # Consistent CRCs around damaged zlib data: the fast path's decoder fails, the general path names it.
    length = struct.unpack_from(">I", data, idat)[0]
    body = bytearray(data[idat + 8: idat + 8 + length])
    body[5] ^= 0xFF
    fixed = (data[:idat + 8] + bytes(body) + struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)))
             + data[idat + 12 + length:])
    with pytest.raises(ImageDecodeError):
        decode_tile(fixed, T)
    # Wrong size: the general path's size error.
    with pytest.raises(ImageDecodeError, match="expected 16x16"):
        decode_tile(data, 16)
