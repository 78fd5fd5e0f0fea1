"""Unpack the images of a zip or tar archive, refusing anything unsafe before writing a byte.

Refused, with a one-line error naming the member: a path that is absolute or climbs out
with ``..``; a device file or FIFO; a symbolic or hard link that points outside the archive,
or one named like an image (its target would be taken for data); image members that add up
to more than ``max_bytes`` by their headers, or that write more than that (or more than their
own header says) while unpacking. Links inside the archive under other names (a repository's
README link) are skipped. Tar members also pass ``tarfile.data_filter``, the standard
library's safe-extraction policy.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from neu_model.core.stage import StageError

log = logging.getLogger("neu_model.data.download")

MAX_BYTES = 2 << 30
IMAGE_EXTS = frozenset({".bmp", ".png", ".jpg", ".jpeg"})
CHUNK = 1 << 20
CLEAN_COPY = "the archive is unsafe, get a clean copy of the data"


class DamagedArchive(StageError):
    """Not an archive, or one that cannot be read to the end; ``what`` says which."""

    def __init__(self, archive: Path, what: str, fix: str):
        self.what = what
        super().__init__(f"{archive}: {what}; {fix}")


@dataclass(frozen=True)
class Member:
    """One archive member as this module judges it."""

    name: str
    parts: tuple[str, ...]
    kind: str  # "file", "dir", "link" or "special" (device, FIFO, socket)
    size: int  # bytes its header declares
    link_escapes: bool  # a link whose target is absolute or climbs out of the archive
    open: Callable[[], BinaryIO]


def wanted(parts: tuple[str, ...] | list[str]) -> bool:
    """An image file, not macOS metadata or a hidden file."""
    return (bool(parts) and Path(parts[-1]).suffix.lower() in IMAGE_EXTS
            and not any(p == "__MACOSX" or p.startswith(".") for p in parts))


def member_parts(name: str, archive: Path) -> tuple[str, ...]:
    """Path parts of an archive member; reject the archive if it would escape the target."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise StageError(f"{archive}: member {name!r} would be written outside the extraction folder; {CLEAN_COPY}")
    return path.parts


def _escapes(link_dir: str, target: str) -> bool:
    """Whether a link target is absolute or leaves the archive's top folder."""
    target = target.replace("\\", "/")
    resolved = posixpath.normpath(posixpath.join(link_dir, target))
    return target.startswith("/") or resolved == ".." or resolved.startswith("../")


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> Iterable[Member]:
    for info in zf.infolist():
        parts = member_parts(info.filename, archive)
        mode = info.external_attr >> 16  # unix st_mode, when the archiver recorded one
        kind = ("dir" if info.is_dir() else "file" if not stat.S_IFMT(mode) or stat.S_ISREG(mode)
                else "link" if stat.S_ISLNK(mode) else "special")
        escapes = kind == "link" and _escapes(posixpath.dirname(info.filename), _zip_link_target(zf, info))
        yield Member(info.filename, parts, kind, info.file_size, escapes, lambda i=info: zf.open(i))


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """A zip symlink stores its target as its contents; read no more than a path can be long."""
    with zf.open(info) as fh:
        return fh.read(4096).decode(errors="replace")


def _tar_members(tf: tarfile.TarFile, archive: Path, dest: Path) -> Iterable[Member]:
    for m in tf.getmembers():
        parts = member_parts(m.name, archive)
        try:
            tarfile.data_filter(m, str(dest))
            escapes = False
        except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError):
            escapes = True
        except tarfile.FilterError as exc:  # a device, a FIFO, an absolute or outside path
            raise StageError(f"{archive}: member {m.name!r} refused ({exc}); {CLEAN_COPY}") from None
        kind = ("file" if m.isreg() else "dir" if m.isdir() else "link" if m.issym() or m.islnk() else "special")
        yield Member(m.name, parts, kind, m.size, escapes, lambda m=m: tf.extractfile(m))


def _check(members: list[Member], archive: Path, max_bytes: int) -> list[Member]:
    """Refuse unsafe members; return the image files to unpack."""
    images, skipped = [], []
    for m in members:
        what = {"link": "a link", "special": "a device file or FIFO"}.get(m.kind)
        if m.kind == "special" or m.link_escapes:
            where = " pointing outside the archive" if m.link_escapes else ""
            raise StageError(f"{archive}: member {m.name!r} is {what}{where}, not a plain file; {CLEAN_COPY}")
        if m.kind == "link" and wanted(m.parts):
            raise StageError(f"{archive}: member {m.name!r} is a link, not a plain file; pack the images themselves "
                             f"(tar --dereference --hard-dereference, zip without --symlinks)")
        if m.kind == "link":
            skipped.append(m.name)
        elif m.kind == "file" and wanted(m.parts):
            images.append(m)
    if skipped:
        log.info("skipped %d links that are not images (e.g. %s)", len(skipped), skipped[0])
    declared = sum(m.size for m in images)
    if declared > max_bytes:
        raise StageError(f"{archive}: its images unpack to {declared / 2**20:.0f} MB, more than the limit of "
                         f"{max_bytes / 2**20:.0f} MB (data.max_unpacked_mb); check the archive, or raise the limit")
    return images


def copy_limited(src: BinaryIO, target: Path, member: Member, budget: list[int], archive: Path) -> None:
    """Copy ``src`` to ``target``, stopping once it passes its header's size or the budget left.

    Headers can lie: a member may decompress to more than it declares, so bytes are counted
    as they are written. ``budget`` is a one-element list of the bytes still allowed.
    """
    written = 0
    with target.open("wb") as out:
        while block := src.read(CHUNK):
            written += len(block)
            budget[0] -= len(block)
            if written > member.size or budget[0] < 0:
                raise StageError(f"{archive}: member {member.name!r} unpacks to more than its header's "
                                 f"{member.size} bytes or the unpacked-size limit (data.max_unpacked_mb); "
                                 f"{CLEAN_COPY}")
            out.write(block)


@contextlib.contextmanager
def open_members(archive: Path, dest: Path, not_archive_fix: str) -> Iterator[list[Member]]:
    """Every member of a zip or tar archive, judged (kind, size, links escaping ``dest``) and
    openable while the block runs: the one reader of archives behind the download and boxes stages.

    Raises:
        StageError: not an archive (``not_archive_fix`` says what to point at instead), a damaged
            one, or a member whose path would leave ``dest``.
    """
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                yield list(_zip_members(zf, archive))
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                yield list(_tar_members(tf, archive, dest))
        else:
            raise DamagedArchive(archive, _not_archive(archive), not_archive_fix)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DamagedArchive(archive, f"damaged archive ({exc})", "delete it and download it again") from None


def extract(archive: Path, dest: Path, max_bytes: int = MAX_BYTES) -> None:
    """Extract the image files of a zip or tar archive into ``dest``; every member is checked first.

    Raises:
        StageError: not an archive, a damaged one, or an unsafe one (see the module's doc).
    """
    with open_members(archive, dest, "point data.source at a folder, zip or tar archive") as members:
        _unpack(members, archive, dest, max_bytes)


def _unpack(members: list[Member], archive: Path, dest: Path, max_bytes: int) -> None:
    budget = [max_bytes]
    for m in _check(members, archive, max_bytes):
        target = dest.joinpath(*m.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with m.open() as src:
            copy_limited(src, target, m, budget, archive)


def _not_archive(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page, not an archive (a login or error page saved in its place?)"
    return "not a folder, zip or tar archive"
