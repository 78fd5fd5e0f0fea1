"""``neu-predict --overlays DIR``: one PNG per image with where its defects are.

Drawn with Pillow, like the strip map, so that inference never loads matplotlib. On the grey
image: the localisation's heat map (blue for weak evidence to red for strong, transparent where
there is none), each tile's boxes (its best one green, the others yellow), and per tile its
class and confidence in the class colours of the strip map, a tile flagged for review outlined
white in black; the legend of the class colours below. An image larger than one tile shows all
its tiles: each fills its own cell (where tiles overlap, the pixels nearest its centre), so
memory holds one image's tiles at a time, drawn as soon as its last tile is scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from neu_model.core.files import atomic_path
from neu_model.inference.console import map_name
from neu_model.inference.stripmap import CLASS_COLOURS, FONT_SIZE, REVIEW_COLOUR, cells, legend, shrunk_rgb, stack
from neu_model.inference.tiles import TILE_SIZE, Batch
from neu_model.localisation.methods import Located

TOP_BOX, OTHER_BOX = (0, 255, 0), (255, 255, 0)
HEAT_OPACITY = 0.6  # at the strongest evidence; weaker evidence is more transparent


@dataclass(frozen=True)
class OverlayTile:
    """One tile's part of an overlay.

    Attributes:
        x: the tile's left pixel column in its image.
        y: the tile's top pixel row.
        code: the predicted class.
        confidence: its probability.
        flagged: needs review.
        heat: uint8 (size, size) evidence, 255 at the tile's strongest.
        boxes: ``[x0, y0, x1, y1, score]`` in image pixels, best first.
    """

    x: int
    y: int
    code: str
    confidence: float
    flagged: bool
    heat: np.ndarray
    boxes: Sequence[Sequence[float]]


def jet_table() -> np.ndarray:
    """A 256-entry RGB lookup table from blue through green and yellow to red."""
    level = np.linspace(0, 1, 256)[:, None]
    centres = np.array([[3.0, 2.0, 1.0]])  # red, green, blue peak at 3/4, 1/2, 1/4
    return np.rint(np.clip(1.5 - np.abs(4 * level - centres), 0, 1) * 255).astype(np.uint8)


def heat_canvas(tiles: Sequence[OverlayTile], height: int, width: int, size: int = TILE_SIZE) -> np.ndarray:
    """The image's uint8 heat: each tile's heat map over its own cell."""
    canvas = np.zeros((height, width), np.uint8)
    columns = cells(sorted({t.x for t in tiles}), size, width)
    rows = cells(sorted({t.y for t in tiles}), size, height)
    for tile in tiles:
        (c0, c1), (r0, r1) = columns[tile.x], rows[tile.y]
        canvas[r0:r1, c0:c1] = tile.heat[r0 - tile.y: r1 - tile.y, c0 - tile.x: c1 - tile.x]
    return canvas


def coloured(image: np.ndarray, heat: np.ndarray, scale: float) -> Image.Image:
    """The grey image with the heat map laid over it, shrunk by ``scale``."""
    base = shrunk_rgb(image, scale)
    levels = Image.fromarray(heat).resize(base.size, Image.Resampling.BOX) if scale < 1 else Image.fromarray(heat)
    values = np.asarray(levels)
    colour = Image.fromarray(jet_table()[values])
    opacity = Image.fromarray(np.rint(values * HEAT_OPACITY).astype(np.uint8))
    return Image.composite(colour, base, opacity)


def rectangle(box: Sequence[float], scale: float) -> tuple[int, int, int, int]:
    """Pixel edges (x0, y0, x1, y1), x1 and y1 exclusive, as a Pillow rectangle in the shrunk image."""
    x0, y0 = round(box[0] * scale), round(box[1] * scale)
    return x0, y0, max(x0, round(box[2] * scale) - 1), max(y0, round(box[3] * scale) - 1)


def draw_tiles(draw: ImageDraw.ImageDraw, tiles: Sequence[OverlayTile], spans: dict, scale: float) -> None:
    """Class-coloured tile edges, the boxes, review outlines, then the labels on top.

    Args:
        spans: per tile (x, y), its own cell (x0, y0, x1, y1) in image pixels.
    """
    font = ImageFont.load_default(size=FONT_SIZE)
    for tile in tiles:
        cell = rectangle(spans[tile.x, tile.y], scale)
        draw.rectangle(cell, outline=CLASS_COLOURS[tile.code], width=1)
        for rank, box in reversed(list(enumerate(tile.boxes))):  # the best box drawn last, on top
            draw.rectangle(rectangle(box, scale), outline=TOP_BOX if rank == 0 else OTHER_BOX,
                           width=2 if rank == 0 else 1)
        if tile.flagged:
            draw.rectangle(cell, outline=(0, 0, 0), width=4)
            draw.rectangle((cell[0] + 1, cell[1] + 1, cell[2] - 1, cell[3] - 1), outline=REVIEW_COLOUR, width=2)
    for tile in tiles:
        left, top = rectangle(spans[tile.x, tile.y], scale)[:2]
        text, colour = f"{tile.code} {tile.confidence:.2f}", CLASS_COLOURS[tile.code]
        label = draw.textbbox((left + 5, top + 3), text, font=font)
        draw.rectangle((label[0] - 3, label[1] - 2, label[2] + 3, label[3] + 2), fill=colour, outline=(0, 0, 0))
        draw.text((left + 5, top + 3), text, fill=(0, 0, 0) if sum(colour) > 400 else (255, 255, 255), font=font)


def draw_overlay(image: np.ndarray, tiles: Sequence[OverlayTile], path: Path, size: int = TILE_SIZE,
                 max_side: int = 4096) -> Path:
    """Write the overlay PNG of one image (float (H, W) in [0, 1]) and its tiles at ``path``, atomically.

    Images longer than ``max_side`` pixels on a side are shrunk to it first.
    """
    height, width = image.shape
    scale = min(1.0, max_side / max(height, width))
    columns = cells(sorted({t.x for t in tiles}), size, width)
    rows = cells(sorted({t.y for t in tiles}), size, height)
    spans = {(t.x, t.y): (columns[t.x][0], rows[t.y][0], columns[t.x][1], rows[t.y][1]) for t in tiles}
    picture = coloured(image, heat_canvas(tiles, height, width, size), scale)
    draw_tiles(ImageDraw.Draw(picture), tiles, spans, scale)
    out = stack(picture, legend(picture.width))
    with atomic_path(path) as tmp:
        out.save(tmp, format="PNG")
    return path


class OverlayWriter:
    """Gathers each image's tiles in stream order and draws its overlay when the image is complete.

    Args:
        folder: where the PNGs go, named like the strip maps (``predict_report.map_name``).

    Attributes:
        written: the PNGs written so far.
    """

    def __init__(self, folder: Path, max_side: int = 4096) -> None:
        self.folder, self.max_side = Path(folder), max_side
        self.names: set[str] = set()
        self.images: dict[str, np.ndarray] = {}  # whole images of several tiles, until drawn
        self.current: str | None = None
        self.first_tile: np.ndarray | None = None  # the whole image when it is a single tile
        self.tiles: list[OverlayTile] = []
        self.written: list[Path] = []

    def add(self, batch: Batch, rows: Sequence[dict], located: Sequence[Located],
            boxes: Sequence[Sequence[Sequence[float]]]) -> None:
        """Take a batch's rows, their localisation and their boxes in image pixels."""
        self.images.update(batch.images)
        for i, (row, answer, tile_boxes) in enumerate(zip(rows, located, boxes, strict=True)):
            # Every image starts with its tile (0, 0): a file named twice is two images.
            if row["file"] != self.current or (row["x"], row["y"]) == (0, 0):
                self.finish(row["file"])
                self.current, self.first_tile = row["file"], batch.tiles[i, 0].copy()
            heat = np.rint(np.clip(answer.heat, 0, 1) * 255).astype(np.uint8)
            self.tiles.append(OverlayTile(row["x"], row["y"], row["predicted"], float(row["confidence"]),
                                          bool(row["needs_review"]), heat, tile_boxes))

    def finish(self, following: str | None = None) -> None:
        """Draw the current image, if any; ``following`` is the next image's name (the same file
        named twice keeps its whole image for the second time)."""
        if self.current is None:
            return
        whole = self.images.get if following == self.current else self.images.pop
        image = whole(self.current, None)
        image = self.first_tile if image is None else image
        path = self.folder / map_name(self.current, self.names)
        self.written.append(draw_overlay(image, self.tiles, path, max_side=self.max_side))
        self.current, self.first_tile, self.tiles = None, None, []

    def close(self) -> None:
        self.finish()
