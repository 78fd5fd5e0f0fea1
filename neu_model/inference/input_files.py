"""The images named on a command line: files, folders and archives, read one at a time.

Folders are searched recursively in sorted order; ``.zip``, ``.tar``, ``.tar.gz`` and ``.tgz``
archives are read member by member without extracting them to disk, each image named
``<archive>:<member path>``. Hidden files and folders (a leading dot) and macOS ``__MACOSX``
metadata are skipped in folders and archives, and so are archives inside folders (name them
to read them); a file named explicitly is always read as an image or archive.

Only one file's bytes are held at a time, so memory does not grow with the number of files.
A file that cannot be read becomes a :class:`Member` with an ``error``; the rest is still read.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from neu_model.core.stage import StageError

IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# Far above any camera frame (a 16-bit 8k x 8k TIFF is 128 MiB) yet small enough that a
# damaged length field or a zip bomb cannot exhaust memory.
MAX_FILE_BYTES = 512 * 2**20
_MIB = 2**20


class InputNotFoundError(StageError):
    """A path given as input does not exist: a usage error (exit status 2)."""


class NoImagesError(StageError):
    """The inputs hold no image files at all: a usage error (exit status 2)."""


@dataclass(frozen=True)
class Member:
    """One image file's bytes, or why they could not be read.

    Attributes:
        name: the path as given, or ``<archive>:<member path>``.
        data: the file's bytes; None when ``error`` is set.
        error: one line saying what is wrong and how to fix it.
    """

    name: str
    data: bytes | None
    error: str = ""


def check_inputs(paths: Sequence[Path | str]) -> list[Path]:
    """The inputs as paths; a missing one raises before anything is read.

    Raises:
        InputNotFoundError: a path that is neither a file nor a folder.
    """
    checked = [Path(p) for p in paths]
    missing = [str(p) for p in checked if not (p.is_file() or p.is_dir())]
    if missing:
        raise InputNotFoundError(f"{', '.join(missing)}: no such file or folder; check the path")
    if not checked:
        raise NoImagesError("no inputs given; name image files, folders or archives")
    return checked


def is_archive(path: Path) -> bool:
    """A zip or tar file, by name (sniffing the bytes could mistake an image for a tar)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def is_wanted(parts: Sequence[str]) -> bool:
    """An image file by suffix, not macOS metadata nor hidden."""
    return (bool(parts) and parts[-1].lower().endswith(IMAGE_SUFFIXES)
            and not any(p == "__MACOSX" or p.startswith(".") for p in parts))


def iter_members(paths: Sequence[Path], max_bytes: int = MAX_FILE_BYTES) -> Iterator[Member]:
    """Every image file of ``paths`` in order: files as given, folders sorted, archives as stored."""
    for path in paths:
        if path.is_dir():
            for file in walk_images(path):
                yield read_file(file, max_bytes)
        elif is_archive(path):
            reader = zip_members if path.name.lower().endswith(".zip") else tar_members
            yield from reader(path, max_bytes)
        else:
            yield read_file(path, max_bytes)


def walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, recursively, in the order of ``sorted(folder.rglob("*"))``.

    Walked lazily (one folder listing at a time) instead of listing the whole tree first.
    Symbolic links to folders are not followed, so a link loop cannot recurse forever.
    """
    with os.scandir(folder) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith(".") or entry.name == "__MACOSX":
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from walk_images(Path(entry.path))
        elif entry.is_file() and is_wanted([entry.name]):
            yield Path(entry.path)


def too_big(size: int, max_bytes: int) -> str:
    return (f"file is {size / _MIB:.0f} MiB, above the reader's limit of {max_bytes / _MIB:.0f} MiB; "
            "cut the image into smaller files")


def read_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> Member:
    """The bytes of one file, or a Member with the reason it cannot be read."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        return Member(str(path), None, f"cannot be read ({exc.strerror or exc}); check the file and its permissions")
    if len(data) > max_bytes:
        return Member(str(path), None, too_big(path.stat().st_size, max_bytes))
    return Member(str(path), data)


def member_name(archive: Path, name: str) -> str:
    """``<archive>:<member path>``, the member path without a leading ``./``."""
    return f"{archive}:{PurePosixPath(name.replace(chr(92), '/')).as_posix()}"


def zip_members(archive: Path, max_bytes: int = MAX_FILE_BYTES) -> Iterator[Member]:
    """The image members of a zip file, in stored order, decompressed one at a time."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        yield Member(str(archive), None, f"damaged or not a zip archive ({exc}); fetch it again")
        return
    with zf:
        for info in zf.infolist():
            if info.is_dir() or not is_wanted(PurePosixPath(info.filename).parts):
                continue
            name = member_name(archive, info.filename)
            if info.file_size > max_bytes:
                yield Member(name, None, too_big(info.file_size, max_bytes))
                continue
            try:
                with zf.open(info) as fh:
                    # The size in the central directory may lie; read no more than the limit.
                    data = fh.read(max_bytes + 1)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError) as exc:
                # RuntimeError: encrypted member; NotImplementedError: unsupported compression.
                yield Member(name, None, f"damaged archive member ({exc}); fetch the archive again")
                continue
            yield Member(name, None, too_big(len(data), max_bytes)) if len(data) > max_bytes else Member(name, data)


def tar_members(archive: Path, max_bytes: int = MAX_FILE_BYTES) -> Iterator[Member]:
    """The image members of a (compressed) tar file, read as a stream in stored order.

    A stream reads a ``.tar.gz`` once from start to end, never seeking back, so a large
    archive is neither extracted nor decompressed into memory.
    """
    count = 0
    try:
        with tarfile.open(archive, mode="r|*") as tf:
            for info in tf:
                if not info.isfile() or not is_wanted(PurePosixPath(info.name).parts):
                    continue
                name = member_name(archive, info.name)
                if info.size > max_bytes:
                    yield Member(name, None, too_big(info.size, max_bytes))
                else:
                    fh = tf.extractfile(info)
                    yield Member(name, fh.read() if fh else b"")
                count += 1
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        where = f"after {count} images" if count else "at its start"
        yield Member(str(archive), None, f"damaged or not a tar archive, unreadable {where} ({exc}); fetch it again")
