"""Checks of an image set before the download stage publishes it as ``data/raw``.

How many images each class has, that every image is a ``size`` x ``size`` 8-bit grayscale
picture that decodes to the end, and, when the file names are exactly the public NEU-CLS
set's, that every file matches the published sha256 list. Each failure is a one-line
``StageError`` naming the file and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from neu_model.core.stage import StageError

log = logging.getLogger("neu_model.data.download")


def check_counts(labels: Sequence[str], classes: Sequence[str], expected_per_class: int | None,
                 source: str) -> dict[str, int]:
    """Reject an empty source and wrong class counts; return the counts per class.

    Args:
        labels: the class of each image found.
        classes: every class the data must have (``data.classes``).
        expected_per_class: the exact count each class must have; None: any count above 0.
        source: how messages name the source.

    Raises:
        StageError: no images, a class with none, or a count other than ``expected_per_class``.
    """
    if not labels:
        raise StageError(f"{source}: no images found (.bmp/.png/.jpg named <CLS>_<n> or in class folders); "
                         f"fix data.source or NEU_DATA_SOURCE")
    counts = {c: sum(label == c for label in labels) for c in classes}
    text = ", ".join(f"{c} {n}" for c, n in counts.items())
    for c, n in counts.items():
        if n == 0:
            raise StageError(f"{source}: no images of class {c} ({text}); every class in data.classes needs images")
        if expected_per_class is not None and n != expected_per_class:
            raise StageError(f"{source}: {n} images of class {c}, expected {expected_per_class} ({text}); "
                             f"fix the source, or set data.expected_per_class=any for a plant's own data")
    return counts


def check_image(path: Path, shown: str, size: int) -> tuple[int, int]:
    """Decode ``path`` fully; require ``size`` x ``size`` 8-bit grayscale. Returns (width, height)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            mode, dims, palette = img.mode, img.size, img.getpalette() if img.mode == "P" else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise StageError(f"{shown}: cannot be decoded as an image ({exc}); replace it with a good copy") from None
    if dims != (size, size):
        raise StageError(f"{shown}: is {dims[0]}x{dims[1]}, expected {size}x{size} (data.image_size); "
                         f"replace or remove it")
    # A palette image whose palette is the grey ramp 0..255 is grayscale stored another way.
    grey = palette is not None and all(palette[i:i + 3] == [i // 3] * 3 for i in range(0, len(palette), 3))
    if mode != "L" and not grey:
        raise StageError(f"{shown}: mode {mode}, expected 8-bit single-channel grayscale (L); convert it")
    return dims


def read_checksums(path: Path) -> dict[str, str]:
    """Read a sha256sum-format list into {file name: hex digest}."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        raise StageError(f"{path}: checksum list not found; restore it from git or fix data.checksums") from None
    sums = {}
    for line in filter(str.strip, lines):
        digest, _, name = line.strip().partition(" ")
        sums[PurePosixPath(name.lstrip(" *")).name] = digest.lower()
    return sums


def verify_public(digests: Mapping[str, str], shown: Mapping[str, str], checksums: Path) -> bool:
    """If the file names are exactly the public set's, require every sha256 to match; else False.

    Args:
        digests: each file's sha256 hex digest, by its published name.
        shown: how messages name each file (where it came from), by its published name.
        checksums: the public set's list in sha256sum format.

    Raises:
        StageError: naming the first file, in ``digests``' order, whose digest differs.
    """
    sums = read_checksums(checksums)
    if set(digests) != set(sums):
        log.info("file names differ from %s: a plant's own data, format checked only", checksums)
        return False
    for name, digest in digests.items():
        if digest != sums[name]:
            raise StageError(f"{shown[name]}: sha256 {digest[:12]}... does not match the public NEU-CLS list "
                             f"{checksums}; the file is damaged or modified, get a clean copy")
    return True
