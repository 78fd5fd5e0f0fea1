"""The strip map: a large image with every tile tinted by its predicted class, flagged tiles outlined.

Drawn with Pillow's ImageDraw (not matplotlib) so that inference stays light. A legend of
the six class colours sits under the image. Images wider or higher than ``max_side`` are
shrunk first, so a map of a long strip stays a few megabytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from neu_model.core.config import CLASS_NAMES, CLASSES
from neu_model.core.files import atomic_path
from neu_model.inference.tiles import TILE_SIZE

# Six well-separated hues from Trubetskoy's list of distinct colours; none is grey, so a tint never
# looks like the steel itself. Red and green differ in lightness too, for red-green colour blindness.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "Cr": (230, 25, 75),    # red
    "In": (60, 180, 75),    # green
    "Pa": (255, 225, 25),   # yellow
    "PS": (0, 130, 200),    # blue
    "RS": (245, 130, 48),   # orange
    "Sc": (145, 30, 180),   # purple
}
UNKNOWN_COLOUR = (70, 240, 240)  # cyan: a tile unlike the training data, whatever class it was given
REVIEW_COLOUR = (255, 255, 255)  # white inside a black line: visible on every tint
FONT_SIZE = 14
PAD = 6

# x, y (top-left pixel), predicted class, needs_review, and (optional, default false) unknown
Tile = tuple[int, int, str, bool] | tuple[int, int, str, bool, bool]


def strip_map(image: np.ndarray, tiles: Sequence[Tile], out_path: Path | str, size: int = TILE_SIZE,
              max_side: int = 4096, tint: float = 0.4) -> Path:
    """Write a PNG of ``image`` with its tiles coloured by class and flagged tiles outlined.

    Args:
        image: (H, W) grayscale in [0, 1].
        tiles: (x, y, class, needs_review[, unknown]) per tile; x, y its top-left pixel; an
            unknown tile is filled with ``UNKNOWN_COLOUR`` and labelled ``?``. Where tiles
            overlap (a stride below ``size``, the last row and column), each pixel shows the
            tile whose centre is nearest, so every tile keeps a visible cell of its own.
        out_path: the PNG to write (atomically).
        size: the tile side in pixels.
        max_side: a larger image is shrunk to this many pixels on its longer side.
        tint: how strongly the class colour covers the image, 0 to 1.

    Returns:
        ``out_path``.

    Raises:
        ValueError: an image that is not 2-D, or a class outside ``CLASSES``.
    """
    if image.ndim != 2:
        raise ValueError(f"strip_map takes a (H, W) grayscale image, not shape {image.shape}")
    unknown = sorted({t[2] for t in tiles} - set(CLASS_COLOURS))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; expected codes among {list(CLASSES)}")
    scale = min(1.0, max_side / max(image.shape))
    base = shrunk_rgb(image, scale)
    columns = cells(sorted({t[0] for t in tiles}), size, image.shape[1])
    rows = cells(sorted({t[1] for t in tiles}), size, image.shape[0])
    boxes = [scaled((*columns[t[0]], *rows[t[1]]), scale) for t in tiles]
    labels = [("?" if len(t) > 4 and t[4] else t[2], bool(t[3])) for t in tiles]
    coloured = base.copy()
    fill = ImageDraw.Draw(coloured)
    for rect, (code, _) in zip(boxes, labels, strict=False):
        fill.rectangle(rect, fill=tile_colour(code))
    mapped = Image.blend(base, coloured, tint)
    draw_tiles(ImageDraw.Draw(mapped), boxes, labels)
    out = stack(mapped, legend(mapped.width))
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        out.save(tmp, format="PNG")
    return out_path


def tile_colour(code: str) -> tuple[int, int, int]:
    """A class's colour; ``?`` (unknown input) has its own."""
    return UNKNOWN_COLOUR if code == "?" else CLASS_COLOURS[code]


def shrunk_rgb(image: np.ndarray, scale: float) -> Image.Image:
    """The [0, 1] image as 8-bit RGB, shrunk by ``scale`` (box filter: an average, no ringing)."""
    gray = Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8))
    if scale < 1:
        gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))),
                           Image.Resampling.BOX)
    return gray.convert("RGB")


def cells(origins: Sequence[int], size: int, length: int) -> dict[int, tuple[int, int]]:
    """Along one side, each tile's own span (start, end): up to midway between neighbouring centres.

    Tiles 200 apart keep their full 200 pixels; overlapping tiles split the overlap.
    """
    edges = [0] + [(a + b + size) // 2 for a, b in pairwise(origins)] + [max(length, origins[-1] + size)]
    return {o: (edges[i], edges[i + 1]) for i, o in enumerate(origins)}


def scaled(span: tuple[int, int, int, int], scale: float) -> tuple[int, int, int, int]:
    """A cell (x0, x1, y0, y1) as a PIL rectangle (left, top, right, bottom) in the shrunk image."""
    x0, x1, y0, y1 = span
    return round(x0 * scale), round(y0 * scale), round(x1 * scale) - 1, round(y1 * scale) - 1


def draw_tiles(draw: ImageDraw.ImageDraw, boxes: Sequence[tuple[int, int, int, int]],
               labels: Sequence[tuple[str, bool]]) -> None:
    """Thin class-coloured edges and class codes, then the review outlines on top of everything."""
    font = ImageFont.load_default(size=FONT_SIZE)
    for (left, top, right, bottom), (cls, _) in zip(boxes, labels, strict=False):
        draw.rectangle((left, top, right, bottom), outline=tile_colour(cls), width=1)
        if min(right - left, bottom - top) >= 3 * FONT_SIZE:  # codes only where they fit
            draw.text((left + 6, top + 4), cls, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    for (left, top, right, bottom), (_, flagged) in zip(boxes, labels, strict=False):
        if flagged:
            draw.rectangle((left, top, right, bottom), outline=(0, 0, 0), width=5)
            draw.rectangle((left + 1, top + 1, right - 1, bottom - 1), outline=REVIEW_COLOUR, width=3)


def legend(width: int) -> Image.Image:
    """A band of the six class swatches and the review outline, wrapped onto rows to fit ``width``."""
    font = ImageFont.load_default(size=FONT_SIZE)
    entries = [(CLASS_COLOURS[c], f"{c} {CLASS_NAMES[c]}") for c in CLASSES] + [(UNKNOWN_COLOUR, "? unknown input"),
                                                                                (None, "needs review")]
    swatch, line = FONT_SIZE, FONT_SIZE + PAD
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [swatch + PAD + round(measure.textlength(text, font=font)) + 2 * PAD for _, text in entries]
    rows: list[list[int]] = [[]]
    used = PAD
    for i, w in enumerate(widths):
        if rows[-1] and used + w > width:
            rows.append([])
            used = PAD
        rows[-1].append(i)
        used += w
    band = Image.new("RGB", (max(width, max(widths) + PAD), PAD + line * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for r, row in enumerate(rows):
        left, top = PAD, PAD + r * line
        for i in row:
            colour, text = entries[i]
            square = (left, top, left + swatch - 1, top + swatch - 1)
            if colour is None:
                draw.rectangle(square, fill=(200, 200, 200), outline=(0, 0, 0), width=1)
                draw.rectangle((left + 1, top + 1, left + swatch - 2, top + swatch - 2), outline=REVIEW_COLOUR, width=2)
            else:
                draw.rectangle(square, fill=colour, outline=(0, 0, 0))
            draw.text((left + swatch + PAD, top - 2), text, fill=(0, 0, 0), font=font)
            left += widths[i]
    return band


def stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    """``top`` above ``bottom`` on a white canvas as wide as the wider one."""
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), (255, 255, 255))
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height))
    return canvas
