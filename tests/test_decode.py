"""Decoding single images: pixel formats other than 8- and 16-bit grayscale, byte order."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from neu_model.inference.decode import ImageError, decode

from conftest import FIXTURE_IMAGES


def gray(name: str) -> np.ndarray:
    return np.asarray(Image.open(FIXTURE_IMAGES / f"{name}.bmp"))


def test_16_bit_tiff_big_endian(tmp_path):
    values = gray("Pa_2").astype(">u2") * 257
    Image.frombuffer("I;16B", (200, 200), values.tobytes(), "raw", "I;16B", 0, 1).save(tmp_path / "be.tif")
    image = decode((tmp_path / "be.tif").read_bytes(), 200)
    assert image.note == ""
    np.testing.assert_allclose(image.to_float(), gray("Pa_2") / np.float32(255), atol=1e-6, rtol=0)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_other_pixel_formats_are_read_with_a_note_or_refused_in_one_line():
    g = gray("Sc_1")
    colour = Image.fromarray(np.stack([g, g // 2, 255 - g], axis=-1))
    readable = {
        "1-bit (black and white) image": encoded(Image.fromarray(g).convert("1"), "PNG"),
        "converted from a colour palette to luminance": encoded(colour.quantize(64), "PNG"),
        "converted from CMYK to luminance": encoded(colour.convert("CMYK"), "JPEG"),
        "alpha channel ignored": encoded(Image.fromarray(g).convert("LA"), "PNG"),
        "first of 2 frames read": encoded(Image.fromarray(g), "TIFF", save_all=True,
                                          append_images=[Image.fromarray(g)]),
        "": encoded(Image.fromarray((g / 255).astype(np.float32)), "TIFF"),
    }
    for note, data in readable.items():
        image = decode(data, 200)
        assert image.note == note and image.to_float().dtype == np.float32
        assert 0 <= image.to_float().min() <= image.to_float().max() <= 1
    np.testing.assert_allclose(decode(readable[""]).to_float(), g / 255, atol=1e-6)
    with pytest.raises(ImageError, match="not in \\[0, 1\\]; scale it"):
        decode(encoded(Image.fromarray(g.astype(np.float32)), "TIFF"))
    with pytest.raises(ImageError, match="outside 0-65535; save it as 16-bit"):
        decode(encoded(Image.fromarray(g.astype(np.int32) * 1000), "TIFF"))
