"""Image bytes to grayscale pixels with their full scale: any bit depth, any colour mode.

Pillow's ``convert("L")`` clips 16-bit images to 8 bits (a bright 16-bit frame turns white),
so 16-bit grayscale is kept as it is and divided by its own full scale: 65535, or
``2**bits - 1`` when the file records a sensor depth (PNG ``sBIT``, TIFF ``BitsPerSample``).
Colour is reduced to luminance with ITU-R 601 weights, as Pillow's "L" mode does, and the
conversion is reported as a note, so that nothing changes silently.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_BITS_PER_SAMPLE = 258
DARK_16_BIT_NOTE = ("16-bit image using only values below 4096: if it holds a 12-bit camera's unscaled values, "
                    "save it with its bit depth (PNG sBIT or TIFF BitsPerSample 12)")


class ImageError(Exception):
    """The bytes are not a usable image; the message is one line naming the fix."""


@dataclass(frozen=True)
class GrayImage:
    """Decoded grayscale pixels.

    Attributes:
        pixels: (H, W) uint8, uint16 or float32 values as stored.
        full_scale: the value that means white: 255, 65535, 4095, or 1.0 for float images.
        note: what was converted on the way ("converted from RGB to luminance"), else "".
    """

    pixels: np.ndarray
    full_scale: float
    note: str = ""

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    def crop(self, x: int, y: int, size: int, out: np.ndarray | None = None) -> np.ndarray:
        """The ``size`` x ``size`` square at (x, y) as float32 in [0, 1], written into ``out`` if given."""
        return to_unit(self.pixels[y:y + size, x:x + size], self.full_scale, out)

    def to_float(self) -> np.ndarray:
        """The whole image as float32 (H, W) in [0, 1]."""
        return to_unit(self.pixels, self.full_scale)


def to_unit(values: np.ndarray, full_scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``values / full_scale``: a true division, so 8-bit input matches ``data.to_float``.

    Division in float32 of the exact integer values: a 16-bit copy (value x 257) of an 8-bit
    image gives the very same floats as the original.
    """
    return np.divide(values, np.float32(full_scale), out=out, dtype=np.float32)


def decode(data: bytes, min_side: int = 1, max_pixels: int | None = None) -> GrayImage:
    """Decode image bytes to grayscale.

    Args:
        data: the file's bytes.
        min_side: images narrower or lower than this are refused before decoding.
        max_pixels: images with more pixels are refused before decoding; default Pillow's
            decompression-bomb limit.

    Raises:
        ImageError: empty, not an image, truncated or damaged, too small or too large, or a
            pixel format with no sensible grayscale reading.
    """
    if not data:
        raise ImageError("empty file (0 bytes); copy it again from its source")
    max_pixels = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_size(im.size, min_side, max_pixels)
            image = to_gray(im, data)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large ({exc}); cut it into smaller images") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image file (Pillow cannot identify it); remove it or replace it "
                         "with a .bmp, .png, .jpg or .tif image") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, struct.error... on bad data
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"truncated or damaged image ({reason}); copy the file again from its source") from None
    return image


def check_size(size: tuple[int, int], min_side: int, max_pixels: int) -> None:
    width, height = size
    if width < min_side or height < min_side:
        raise ImageError(f"image is {width}x{height}, smaller than the {min_side}x{min_side} the model takes; "
                         f"use images of at least {min_side}x{min_side} pixels")
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} ({width * height / 1e6:.0f} megapixels), above the reader's "
                         f"limit of {max_pixels / 1e6:.0f}; cut it into smaller images")


def to_gray(im: Image.Image, data: bytes) -> GrayImage:
    """The decoded image ``im`` (of the file ``data``) as grayscale pixels and their full scale."""
    notes = []
    if getattr(im, "n_frames", 1) > 1:
        notes.append(f"first of {im.n_frames} frames read")
    mode = im.mode
    if mode == "L":
        image = GrayImage(np.asarray(im), 255)
    elif mode in SIXTEEN_BIT_MODES or mode == "I":
        image = sixteen_bit(im, data)
    elif mode == "F":
        image = float_gray(im)
    elif mode == "1":
        image = GrayImage(np.asarray(im.convert("L")), 255, "1-bit (black and white) image")
    elif mode in ("LA", "La"):
        image = GrayImage(np.asarray(im.getchannel("L")), 255, "alpha channel ignored")
    elif mode in ("P", "PA"):
        gray = np.asarray(im.convert("L"))
        image = GrayImage(gray, 255, "" if gray_palette(im) else "converted from a colour palette to luminance")
    elif mode in COLOUR_MODES:
        depth = stored_bits(im, data)
        deeper = f"{depth}-bit colour read at 8 bits and " if depth > 8 else ""
        image = GrayImage(np.asarray(im.convert("L")), 255, f"{deeper}converted from {mode} to luminance")
    else:
        raise ImageError(f"pixel format {mode} has no grayscale reading here; save it as 8- or 16-bit grayscale")
    notes.append(image.note)
    return GrayImage(image.pixels, image.full_scale, "; ".join(n for n in notes if n))


def sixteen_bit(im: Image.Image, data: bytes) -> GrayImage:
    """16-bit grayscale scaled by its recorded sensor depth, else by the full 16-bit range."""
    values = np.asarray(im)
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise ImageError(f"{im.mode} image with values from {values.min()} to {values.max()}, outside 0-65535; "
                         "save it as 16-bit grayscale")
    values = values.astype(np.uint16)  # native byte order, whatever the file's
    if im.format == "PNG":
        bits = png_significant_bits(data)
        if bits < 16:
            return png_sensor_depth(values, bits)
    elif im.format == "TIFF":
        bits = stored_bits(im, data)
        if bits < 16:  # Pillow unpacks packed 12-bit samples to 0..4095, unshifted
            return GrayImage(values, 2**bits - 1)
    return GrayImage(values, 65535, DARK_16_BIT_NOTE if values.max(initial=0) < 4096 else "")


def png_sensor_depth(values: np.ndarray, bits: int) -> GrayImage:
    """A 16-bit PNG whose sBIT chunk says only ``bits`` bits are significant.

    The PNG standard stores such samples shifted to the top of the 16 bits (12-bit 4095 is
    stored as 65520 or 65535), so the top ``bits`` bits are the sensor's value. Some cameras
    store the value unshifted instead (4095 as 4095): then no value reaches ``2**bits`` and
    the low bits are not all zero, which a shifted dark image (low bits zero) cannot show.
    """
    shift = 16 - bits
    low_bits_used = bool(np.any(values & ((1 << shift) - 1)))
    if values.max(initial=0) < 2**bits and low_bits_used:
        return GrayImage(values, 2**bits - 1, f"16-bit PNG holding unshifted {bits}-bit values (sBIT {bits})")
    return GrayImage(values >> shift, 2**bits - 1)


def float_gray(im: Image.Image) -> GrayImage:
    """32-bit float grayscale, accepted when already in [0, 1]."""
    values = np.asarray(im, dtype=np.float32)
    if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 1:
        raise ImageError(f"float image with values from {np.nanmin(values):g} to {np.nanmax(values):g}, not in "
                         "[0, 1]; scale it to [0, 1] or save it as 8- or 16-bit grayscale")
    return GrayImage(values, 1.0)


def gray_palette(im: Image.Image) -> bool:
    """Whether every palette entry is a grey (R = G = B): then "L" loses nothing."""
    palette = np.asarray(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    return bool((palette == palette[:, :1]).all())


def stored_bits(im: Image.Image, data: bytes) -> int:
    """Bits per sample as the file records them: PNG IHDR bit depth, TIFF BitsPerSample; else 8."""
    if im.format == "TIFF":
        bits = im.tag_v2.get(TIFF_BITS_PER_SAMPLE, (8,))
        return max(bits) if isinstance(bits, tuple) else int(bits)
    if im.format == "PNG":
        ihdr = png_chunks(data).get(b"IHDR", b"")
        return ihdr[8] if len(ihdr) > 8 else 8
    return 8


def png_significant_bits(data: bytes) -> int:
    """The grey sample's significant bits from a PNG's sBIT chunk; 16 when it has none.

    Pillow parses but does not expose sBIT, hence this small chunk reader.
    """
    sbit = png_chunks(data).get(b"sBIT", b"")
    return sbit[0] if sbit and 1 <= sbit[0] <= 16 else 16


def png_chunks(data: bytes) -> dict[bytes, bytes]:
    """The chunks before the image data of a PNG file, by type (IHDR, sBIT, ...)."""
    chunks: dict[bytes, bytes] = {}
    pos = len(PNG_SIGNATURE) if data.startswith(PNG_SIGNATURE) else len(data)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            break
        chunks[kind] = data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return chunks
