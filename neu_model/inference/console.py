"""What ``neu-predict`` says on stderr while it scores, and the strip maps it draws.

One line per image larger than one tile (its tiles, the classes found, how many are flagged)
and per unreadable file, each kind capped at ``show`` lines so that a folder of thousands stays
readable; single-tile images get no line of their own. A total closes the run: images, tiles
per class, flagged tiles, unreadable files, and the lines left out.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

import numpy as np

from neu_model.core.config import CLASSES
from neu_model.core.progress import show_bars
from neu_model.inference.stripmap import Tile, strip_map
from neu_model.inference.tiles import Batch, NoteTally, ReadError

MAX_MAP_NAME = 150


def map_name(file: str, taken: set[str]) -> str:
    """A file name for ``file``'s strip map: path separators and odd characters as ``_``, the
    image suffix dropped, ``.png`` added; ``-2``, ``-3``... when another image already has it."""
    stem = re.sub(r"\.(bmp|png|jpe?g|tiff?)$", "", file, flags=re.IGNORECASE)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[-MAX_MAP_NAME:] or "image"
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return name


def class_counts(counts: Counter) -> str:
    """``Cr 2, Sc 1`` in class order, the classes present only."""
    return ", ".join(f"{c} {counts[c]}" for c in CLASSES if counts[c])


class ImageReport:
    """Rows of a run in order, gathered per image: stderr lines, strip maps and the run's total.

    Args:
        map_dir: where strip maps go (None: no maps); needs the stream's ``keep_images``.
        show: lines per kind (images of several tiles, unreadable files) before the rest is
            only counted.
        out: the stream the lines go to; default stderr.

    Attributes:
        errors: unreadable files so far.
    """

    def __init__(self, map_dir: Path | None = None, show: int = 20, out: TextIO | None = None):
        self.map_dir, self.show, self.out = map_dir, show, out or sys.stderr
        self.current: str | None = None
        self.tiles: list[Tile] = []
        self.images: dict[str, np.ndarray] = {}  # whole images of several tiles, until their map is drawn
        self.classes: Counter = Counter()
        self.shown: Counter = Counter()
        self.hidden: Counter = Counter()
        self.notes = NoteTally()
        self.map_names: set[str] = set()
        self.n_images = self.n_tiles = self.flagged = self.unknown = self.errors = 0

    def say(self, kind: str, line: str) -> None:
        """Print ``line`` unless ``show`` lines of ``kind`` were printed already."""
        if self.shown[kind] >= self.show:
            self.hidden[kind] += 1
            return
        self.shown[kind] += 1
        # On a terminal, clear the progress bar's line first so the text does not run into it.
        print(("\r\x1b[K" if show_bars() else "") + line, file=self.out)

    def add(self, item: Batch | ReadError, rows: list[dict]) -> None:
        """Take one item of the stream and its CSV rows."""
        if isinstance(item, ReadError):
            self.finish()
            self.errors += 1
            self.say("unreadable", f"{item.file}: unreadable: {item.error}")
            return
        self.images.update(item.images)
        for row, note in zip(rows, item.notes, strict=True):
            if row["file"] != self.current:
                self.finish()
                self.current = row["file"]
            self.tiles.append((row["x"], row["y"], row["predicted"], row["needs_review"], row.get("unknown") is True))
            if self.notes.add(row["file"], note):
                self.say("note", f"{row['file']}: note: {note}")

    def finish(self) -> None:
        """Close the current image: count it, and for several tiles print its line and draw its map."""
        if self.current is None:
            return
        file, tiles = self.current, self.tiles
        counts = Counter(t[2] for t in tiles)
        flagged, unknown = sum(t[3] for t in tiles), sum(t[4] for t in tiles)
        self.n_images += 1
        self.unknown += unknown
        self.n_tiles += len(tiles)
        self.classes.update(counts)
        self.flagged += flagged
        image = self.images.pop(file, None)
        if len(tiles) > 1:
            line = (f"{file}: {len(tiles)} tiles: {class_counts(counts)}; {flagged} flagged for review"
                    + (f", {unknown} of them unknown input" if unknown else ""))
            if self.map_dir is not None and image is not None:
                path = strip_map(image, tiles, self.map_dir / map_name(file, self.map_names))
                line += f"; map {path}"
            self.say("strip", line)
        self.current, self.tiles = None, []

    def close(self, out: Path | None = None, overlays: list[Path] | None = None) -> None:
        """Finish the last image and print the notes' summary and the run's total (naming ``out``
        and the folder of ``overlays``, the overlay PNGs written)."""
        self.finish()
        for line in self.notes.summary():
            print(line, file=self.out)
        left_out = [f"{n} {kind} line{'s' * (n > 1)}" for kind, n in self.hidden.items() if n]
        total = (f"scored {self.n_images} image{'s' * (self.n_images != 1)}, {self.n_tiles} tiles: "
                 f"{class_counts(self.classes) or 'no tiles'}; {self.flagged} tiles flagged for review "
                 f"({self.unknown} unknown input); "
                 f"{self.errors} unreadable file{'s' * (self.errors != 1)}"
                 + (" (error rows)" if self.errors else ""))
        if out is not None:
            total += f"; wrote {out}"
        if overlays:
            total += f"; {len(overlays)} overlay{'s' * (len(overlays) != 1)} in {overlays[0].parent}"
        if left_out:
            total += f"; not listed above: {', '.join(left_out)}"
        print(total, file=self.out)
