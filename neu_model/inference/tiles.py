"""The input side of inference: any mix of images, folders and archives as batches of tiles.

    stream = TileStream(["strips/", "day2.tar.gz"], batch_size=64)
    for item in with_progress(stream):
        if isinstance(item, ReadError): ...      # one CSV row with ``error`` set
        else: ...                                 # item.tiles: float32 (B, 1, 200, 200) in [0, 1]

Images of any bit depth and colour mode are read as grayscale in [0, 1] (see ``decode``);
an image larger than the model's 200x200 input is cut into 200x200 tiles (``stride`` apart,
the last row and column aligned to the border so every pixel is covered). A file that cannot
be used becomes a :class:`ReadError` naming what is wrong; everything else is still read.

A reader thread decodes at most ``prefetch`` items ahead of the consumer, so memory stays
bounded by the batch size whatever the number of files. Items come in input order: a
ReadError first hands over the partial batch of the files before it.

Importing this module loads neither training code, MLflow nor matplotlib.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neu_model.core.config import CLASSES
from neu_model.core.progress import show_bars
from neu_model.inference.decode import GrayImage, ImageError, decode
from neu_model.inference.input_files import MAX_FILE_BYTES, NoImagesError, check_inputs, iter_members

TILE_SIZE = 200
# The predictions CSV, one row per tile or unreadable file. x, y: the tile's top-left pixel;
# ``error`` is empty on prediction rows and set on error rows (see ``error_row``). Notes
# ("converted from RGB to luminance") get no column: these columns are what downstream
# scripts parse, and a note does not make a prediction wrong as an error does. They go to
# stderr instead, per image for the first few of each kind, and counted in the run's
# summary (``NoteTally``).
# ``unknown_score``: how unlike the training images the tile is; ``unknown``: above the model's
# threshold (such a tile needs review too); both empty for a model without the statistics.
CSV_COLUMNS: tuple[str, ...] = ("file", "x", "y", "predicted", "confidence", "needs_review",
                                *(f"p_{c}" for c in CLASSES), "unknown_score", "unknown", "error")
LOCATE_COLUMN = "boxes"  # appended after ``error`` with --locate

log = logging.getLogger("neu_model.inference.tiles")


@dataclass
class Batch:
    """Tiles ready for the model, and where each comes from.

    Attributes:
        tiles: float32 (B, 1, size, size) in [0, 1].
        files: per tile, the image's name (a path, or ``<archive>:<member>``).
        xs: per tile, the left pixel column in its image.
        ys: per tile, the top pixel row in its image.
        notes: per tile, what was converted reading its image ("" when nothing was).
        images: with ``keep_images``, the whole float32 (H, W) image of every image larger
            than one tile whose last tile is in this batch (for ``stripmap.strip_map``).
    """

    tiles: np.ndarray
    files: list[str]
    xs: list[int]
    ys: list[int]
    notes: list[str]
    images: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class ReadError:
    """A file that gave no tiles: ``error`` says what is wrong in one line, naming the fix."""

    file: str
    error: str


def tile_origins(length: int, size: int = TILE_SIZE, stride: int = TILE_SIZE) -> list[int]:
    """Offsets of the tiles along one side: 0, stride, 2 stride, ... and the last flush with the end.

    ``tile_origins(450)`` is [0, 200, 250]: the last tile overlaps its neighbour rather than
    leaving 50 pixels unseen.
    """
    if not 1 <= stride <= size:
        raise ValueError(f"stride {stride} must be from 1 to the tile size {size}, or pixels are skipped")
    if length < size:
        raise ValueError(f"length {length} is shorter than one tile ({size})")
    origins = list(range(0, length - size + 1, stride))
    if origins[-1] != length - size:
        origins.append(length - size)
    return origins


def error_row(error: ReadError) -> dict[str, object]:
    """The CSV row of an unreadable file: flagged for review, so filtering on it finds it."""
    return {c: "" for c in CSV_COLUMNS} | {"file": error.file, "needs_review": True, "error": error.error}


class BatchBuilder:
    """Fills one preallocated tile array; ``take`` hands it over and starts the next."""

    def __init__(self, batch_size: int, size: int):
        self.batch_size, self.size = batch_size, size
        self._reset()

    def _reset(self) -> None:
        self.tiles = np.empty((self.batch_size, 1, self.size, self.size), dtype=np.float32)
        self.files: list[str] = []
        self.xs: list[int] = []
        self.ys: list[int] = []
        self.notes: list[str] = []
        self.images: dict[str, np.ndarray] = {}

    @property
    def full(self) -> bool:
        return len(self.files) == self.batch_size

    def add(self, image: GrayImage, name: str, x: int, y: int) -> None:
        image.crop(x, y, self.size, out=self.tiles[len(self.files), 0])
        self.files.append(name)
        self.xs.append(x)
        self.ys.append(y)
        self.notes.append(image.note)

    def take(self) -> Batch:
        n = len(self.files)
        batch = Batch(self.tiles[:n], self.files, self.xs, self.ys, self.notes, self.images)
        self._reset()
        return batch


class _Stopped(Exception):
    """The consumer went away; the reader thread ends."""


_END = object()


class TileStream:
    """Batches of tiles (and ReadErrors) from ``inputs``, decoded by a thread a bounded way ahead.

    Args:
        inputs: image files, folders, ``.zip`` / ``.tar`` / ``.tar.gz`` / ``.tgz`` archives.
        batch_size: tiles per batch.
        stride: pixels between neighbouring tiles, 1 to ``size``.
        size: the tile side, the model's input size.
        prefetch: batches (or errors) decoded ahead of the consumer at most.
        keep_images: attach every image larger than one tile to the batch of its last tile.
        max_pixels: larger images become ReadErrors; default Pillow's decompression-bomb limit.
        max_bytes: larger files and archive members become ReadErrors.

    Raises:
        InputNotFoundError: (at construction) an input path does not exist.
        NoImagesError: (when iterated) the inputs hold no image file at all.

    Attributes:
        files_read: image files taken from the inputs so far (read or not), by the thread.
        tiles_read: tiles cut so far.
        errors: ReadErrors so far.
    """

    def __init__(self, inputs: Sequence[Path | str], batch_size: int = 64, stride: int = TILE_SIZE,
                 size: int = TILE_SIZE, prefetch: int = 2, keep_images: bool = False,
                 max_pixels: int | None = None, max_bytes: int = MAX_FILE_BYTES):
        tile_origins(size, size, stride)  # a bad stride fails here, not in the thread
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size ({batch_size}) and prefetch ({prefetch}) must be at least 1")
        self.inputs = check_inputs(inputs)
        self.batch_size, self.stride, self.size, self.prefetch = batch_size, stride, size, prefetch
        self.keep_images, self.max_pixels, self.max_bytes = keep_images, max_pixels, max_bytes
        self.files_read = self.tiles_read = self.errors = 0

    def __iter__(self) -> Iterator[Batch | ReadError]:
        items: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            raise _Stopped

        def run() -> None:
            try:
                self._produce(put)
                put(_END)
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                try:
                    put(exc)
                except _Stopped:
                    pass

        thread = threading.Thread(target=run, name="neu-tile-reader", daemon=True)
        thread.start()
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # the consumer stopped early, or failed: end the thread
            thread.join()

    def _produce(self, put: Callable[[object], None]) -> None:
        builder = BatchBuilder(self.batch_size, self.size)
        for member in iter_members(self.inputs, self.max_bytes):
            self.files_read += 1
            error, image = member.error, None
            if not error:
                try:
                    image = decode(member.data, self.size, self.max_pixels)
                except ImageError as exc:
                    error = str(exc)
            if error:
                if builder.files:  # rows stay in input order
                    put(builder.take())
                self.errors += 1
                put(ReadError(member.name, error))
                continue
            self._cut(image, member.name, builder, put)
        if builder.files:
            put(builder.take())
        if not self.files_read:
            raise NoImagesError(f"{', '.join(map(str, self.inputs))}: no images found "
                                "(.bmp, .png, .jpg, .jpeg, .tif, .tiff); check the paths")

    def _cut(self, image: GrayImage, name: str, builder: BatchBuilder, put: Callable[[object], None]) -> None:
        for y in tile_origins(image.height, self.size, self.stride):
            for x in tile_origins(image.width, self.size, self.stride):
                if builder.full:
                    put(builder.take())
                builder.add(image, name, x, y)
                self.tiles_read += 1
        if self.keep_images and (image.height, image.width) != (self.size, self.size):
            builder.images[name] = image.to_float()
        if builder.full:
            put(builder.take())


def with_progress(stream: TileStream, every_s: float = 10.0) -> Iterator[Batch | ReadError]:
    """``stream``'s items, with a tqdm bar on a terminal, else a log line every ``every_s`` seconds."""
    start = last = time.monotonic()
    bar = None
    if show_bars():
        from tqdm.auto import tqdm

        bar = tqdm(unit=" files", leave=False)
    try:
        for item in stream:
            yield item
            now = time.monotonic()
            if bar is not None:
                bar.update(stream.files_read - bar.n)
            elif now - last >= every_s:
                last = now
                log.info("%s", progress_line(stream, now - start))
    finally:
        if bar is not None:
            bar.close()
    log.info("%s", progress_line(stream, time.monotonic() - start))


def progress_line(stream: TileStream, seconds: float) -> str:
    rate = stream.files_read / seconds if seconds > 0 else 0.0
    return (f"read {stream.files_read} files, {stream.tiles_read} tiles, {stream.errors} unreadable "
            f"({rate:.0f} files/s)")


class NoteTally:
    """Notes per kind: the first ``show`` files of each are printed, all are counted for the summary.

    Notes ("converted from RGB to luminance") are not in the CSV, whose columns are fixed; a
    folder of 20,000 colour JPEGs would otherwise print 20,000 identical lines.
    """

    def __init__(self, show: int = 3):
        self.show = show
        self.kinds: dict[str, list] = {}  # note: [count, first file, last file]

    def add(self, file: str, note: str) -> bool:
        """Count ``note`` for ``file`` once; True when it is among the first ``show`` of its kind."""
        if not note:
            return False
        kind = self.kinds.setdefault(note, [0, file, None])
        if kind[2] == file:  # another tile of the same image
            return False
        kind[0] += 1
        kind[2] = file
        return kind[0] <= self.show

    def summary(self) -> list[str]:
        """One line per kind of note, with its count and first file."""
        return [f"note: {count} image{'s' * (count > 1)}: {note} (first: {first})"
                for note, (count, first, _) in self.kinds.items()]
