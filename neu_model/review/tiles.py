"""A reviewed tile's pixels, read back from the image that ``neu-predict`` scored.

The CSV's ``file`` is a path, or ``<archive>:<member>`` for a zip or tar member
(``input_files.member_name``); relative paths are tried from the working folder, then from the
CSV's folder. Bytes are read with ``input_files`` and decoded with ``decode``, as neu-predict
reads them, so ``read_tile`` returns the pixels the model saw: the float tile in [0, 1]
quantised to uint8 exactly as ``tile_boxes.tiles_uint8`` does (8-bit input comes back
unchanged), without importing torch.

A tile's identity is the sha256 of its image's bytes (the member's bytes for an archive member)
with its x, y: the same image under two names is one tile.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from neu_model.inference.decode import GrayImage, ImageError, decode, to_unit
from neu_model.inference.input_files import (
    MAX_FILE_BYTES,
    Member,
    is_archive,
    member_name,
    read_file,
    tar_members,
)
from neu_model.inference.tiles import TILE_SIZE

CONTEXT_SIZE = 600  # the neighbourhood shown beside a tile: 3 tiles wide where the strip allows
OUTLINE = (255, 96, 0)  # the tile's frame in the neighbourhood: orange shows on any grey


class TileError(Exception):
    """A tile that cannot be read; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class Origin:
    """Where a CSV's ``file`` value lives on disk.

    Attributes:
        ref: the CSV's value as written.
        path: the file on disk, absolute: the image, or the archive holding it.
        member: the member's path inside ``path``; "" for a plain file.
    """

    ref: str
    path: Path
    member: str = ""


def locate(ref: str, base: Path | None = None) -> Origin:
    """The file behind a CSV ``file`` value, tried from the working folder, then from ``base``.

    Raises:
        TileError: no such file or archive.
    """
    for root in (Path.cwd(), *([base] if base else [])):
        whole = root / ref
        if whole.is_file():
            return Origin(ref, whole.resolve())
        # An archive member: the longest prefix before a ':' that is an archive on disk (the
        # member path may hold ':' itself, a Windows drive letter the archive path).
        for cut in sorted((i for i, c in enumerate(ref) if c == ":"), reverse=True):
            archive = root / ref[:cut]
            if is_archive(archive) and archive.is_file():
                return Origin(ref, archive.resolve(), ref[cut + 1:])
    raise TileError(f"{ref}: no such file (looked from {Path.cwd()}{f' and {base}' if base else ''}); run "
                    "neu-review from the folder neu-predict ran in, or put the images back")


def read_bytes(origin: Origin) -> bytes:
    """The image's bytes: the file, or the archive member (a zip member is read directly; a tar
    is streamed to the member, as neu-predict read it).

    Raises:
        TileError: the file or member cannot be read.
    """
    if not origin.member:
        member = read_file(origin.path)
    elif origin.path.name.lower().endswith(".zip"):
        member = _zip_member(origin.path, origin.member)
    else:
        wanted = member_name(origin.path, origin.member)
        member = next((m for m in tar_members(origin.path) if m.name == wanted), None)
    if member is None:
        raise TileError(f"{origin.ref}: no member {origin.member!r} in {origin.path} any more; put the archive "
                        "that neu-predict read back")
    if member.error:
        raise TileError(f"{origin.ref}: {member.error}")
    return member.data


def _zip_member(archive: Path, member: str) -> Member | None:
    wanted = member_name(archive, member)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if member_name(archive, info.filename) != wanted:
                    continue
                with zf.open(info) as fh:
                    data = fh.read(MAX_FILE_BYTES + 1)
                if len(data) > MAX_FILE_BYTES:
                    return Member(wanted, None, "member above the reader's size limit; cut the image")
                return Member(wanted, data)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError) as exc:
        return Member(wanted, None, f"damaged zip archive ({exc}); fetch it again")
    return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_image(origin: Origin) -> tuple[str, GrayImage]:
    """The sha256 of the image's bytes and the decoded grayscale image.

    Raises:
        TileError: unreadable, or not an image.
    """
    data = read_bytes(origin)
    try:
        image = decode(data, TILE_SIZE)
    except ImageError as exc:
        raise TileError(f"{origin.ref}: {exc}") from None
    return sha256_bytes(data), image


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] as uint8: x 255, rounded half to even, clamped (``tiles_uint8`` in numpy)."""
    return np.clip(np.rint(np.asarray(values, dtype=np.float32) * np.float32(255)), 0, 255).astype(np.uint8)


def tile_of(image: GrayImage, x: int, y: int, ref: str = "") -> np.ndarray:
    """The 200x200 uint8 tile at (x, y) of a decoded image.

    Raises:
        TileError: the tile does not lie inside the image (the CSV belongs to another image).
    """
    if not (0 <= x <= image.width - TILE_SIZE and 0 <= y <= image.height - TILE_SIZE):
        raise TileError(f"{ref}: tile x={x} y={y} lies outside the {image.width}x{image.height} image; the CSV "
                        "belongs to another image: run neu-predict on it again")
    return to_uint8(image.crop(x, y, TILE_SIZE))


def read_tile(ref: str, x: int, y: int, base: Path | None = None, sha256: str | None = None) -> np.ndarray:
    """The uint8 200x200 pixels of the tile at (x, y) of the image ``ref`` names: what the model saw.

    Args:
        ref: a CSV ``file`` value (a path, or ``<archive>:<member>``).
        base: a second folder to resolve a relative ``ref`` from (the CSV's).
        sha256: the image's bytes must still have this hash.

    Raises:
        TileError: unreadable, changed since (``sha256``), or the tile outside the image.
    """
    origin = locate(ref, base)
    digest, image = load_image(origin)
    if sha256 and digest != sha256:
        raise TileError(changed_message(ref))
    return tile_of(image, x, y, ref)


def changed_message(ref: str) -> str:
    return (f"{ref}: the image changed on disk after it was predicted; run neu-predict on it again and review "
            "the new CSV")


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless PNG of uint8 grayscale (H, W) or RGB (H, W, 3) pixels, the same bytes for the same
    pixels (no metadata, fixed compression)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def context_png(image: GrayImage, x: int, y: int, size: int = CONTEXT_SIZE) -> bytes:
    """The ``size`` x ``size`` neighbourhood centred on the tile at (x, y) (shifted to stay inside
    the image, smaller when the image is), the tile outlined."""
    left = min(max(x + TILE_SIZE // 2 - size // 2, 0), max(image.width - size, 0))
    top = min(max(y + TILE_SIZE // 2 - size // 2, 0), max(image.height - size, 0))
    crop = to_uint8(to_unit(image.pixels[top:top + size, left:left + size], image.full_scale))
    rgb = Image.fromarray(crop).convert("RGB")
    ImageDraw.Draw(rgb).rectangle([x - left, y - top, x - left + TILE_SIZE - 1, y - top + TILE_SIZE - 1],
                                  outline=OUTLINE, width=2)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)  # shown once: speed over size
    return buf.getvalue()


class ImageCache:
    """The last few decoded images, so that the tiles of one strip decode it once.

    An entry is read again when its file's modification time changes, so a changed file is
    seen (its new sha256 then differs from the queue's).
    """

    def __init__(self, size: int = 6) -> None:
        self.size = size
        self._entries: OrderedDict[Path | tuple, tuple[int, str, GrayImage]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, origin: Origin) -> tuple[str, GrayImage]:
        """``load_image(origin)``, from memory when the file is unchanged."""
        key = (origin.path, origin.member)
        try:
            stamp = os.stat(origin.path).st_mtime_ns
        except OSError as exc:
            raise TileError(f"{origin.ref}: cannot be read ({exc.strerror}); put the file back") from None
        with self._lock:
            hit = self._entries.get(key)
            if hit and hit[0] == stamp:
                self._entries.move_to_end(key)
                return hit[1], hit[2]
        digest, image = load_image(origin)
        with self._lock:
            self._entries[key] = (stamp, digest, image)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return digest, image
