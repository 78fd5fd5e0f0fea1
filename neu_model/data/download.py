"""DVC stage ``download``: fetch the NEU-CLS images, validate them, publish ``data/raw``.

The source (``data.source``, or the ``NEU_DATA_SOURCE`` environment variable) is an
http(s) URL of a .zip/.tar(.gz) archive, a local archive, or a local folder, in the flat
NEU-CLS layout (``Cr_12.bmp``) or in class folders (Kaggle's ``train/Crazing/Cr_1.bmp``).
The output is ``data/raw/NEU-CLS/<CLS>_<n>.bmp`` plus ``data/raw/manifest.csv``. The plant's
labelled images (``data.labels``, ``neu_model.data.labels``) are merged in as
``data/raw/NEU-CLS/<CLS>_<hash>.png`` with ``origin`` plant in the manifest, and
``data/raw/labels.json`` says which version of them.
Everything is built and checked in a temporary folder first, so bad input leaves the
previous ``data/raw`` exactly as it was. Fetching (the download cache, retries, timeouts, HTML
pages instead of archives) is ``neu_model.data.fetch``; unpacking (unsafe members, zip bombs)
``neu_model.data.archive``; the checks of counts, image format and the public set's checksums
``neu_model.data.checks``. Credentials in the source URL never reach a message or log
(``neu_model.core.redact``).

    python -m neu_model.data.download [--params params.yaml] [--set data.expected_per_class=any]
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from neu_model.core.config import FOLDER_CLASSES, Config, add_config_args, load_config
from neu_model.core.files import replace_dir, sha256_file
from neu_model.core.paths import ROOT
from neu_model.core.redact import install_log_redaction, redact_url
from neu_model.core.stage import StageError, run_stage
from neu_model.data.archive import wanted
from neu_model.data.checks import check_counts, check_image, verify_public
from neu_model.data.fetch import READ_TIMEOUT, RETRY_DELAYS, extract_source, local_source
from neu_model.data.labels import Labels, read_labels

log = logging.getLogger("neu_model.data.download")  # not "__main__" under python -m

IMAGES_SUBDIR = "NEU-CLS"
MANIFEST_NAME = "manifest.csv"
LABELS_NAME = "labels.json"  # which version of the plant's labels was merged (neu_model.data.labels)
# origin: "public" for the images of data.source, "plant" for the plant's labelled ones (data.labels)
MANIFEST_COLUMNS = ("file", "label", "sha256", "width", "height", "origin")
MAX_UNPACKED_MB = 2048  # the most an archive's images (and a download) may take on disk
# Folder names of Kaggle's copy (and common spellings), normalised by _norm_folder.
_NAME_RE = re.compile(r"^([A-Za-z]+)_0*(\d+)$")  # the NEU-CLS scheme: Cr_12
_DIGITS_RE = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class DownloadResult:
    """What ``download`` published."""

    n_images: int
    counts: dict[str, int]
    dataset_version: str  # first 12 hex of the manifest's sha256
    verified_sha256: bool  # True: the public set, every file matched the checksum list
    plant: int = 0  # labelled images of data.labels merged in
    plant_unknown: int = 0  # ... and those labelled "unknown", kept there, not trained on
    labels_version: str | None = None  # data.labels' version (neu_model.data.labels), None: no labels


@dataclass(frozen=True)
class _Entry:
    src: Path
    shown: str  # how error messages name the file: source plus path inside it
    label: str
    name: str  # canonical output name


def scan(root: Path, classes: Sequence[str], shown_root: str = "") -> list[_Entry]:
    """Find the dataset's images under ``root`` and give each its class and canonical name.

    The class comes from a ``<CLS>_<n>`` file-name prefix, else from the nearest class
    folder (Crazing, Inclusion, ...). Images with neither (a repository's plots) are skipped.
    """
    by_lower = {c.lower(): c for c in classes}
    entries: list[_Entry] = []
    unnumbered: list[tuple[Path, str, str]] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX" and not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for fname in sorted(filenames):
            rel = rel_dir / fname
            if not wanted(rel.parts):
                continue
            stem, ext = Path(fname).stem, Path(fname).suffix.lower()
            shown = shown_root + rel.as_posix()
            match = _NAME_RE.match(stem)
            if match and match.group(1).lower() in by_lower:
                label = by_lower[match.group(1).lower()]
                entries.append(_Entry(root / rel, shown, label, f"{label}_{match.group(2)}{ext}"))
                continue
            # The nearest folder with a class name: "Rolled-in scale" -> "rolled_in_scale" -> RS.
            folders = [re.sub(r"[\s-]+", "_", p.strip().lower()) for p in reversed(rel_dir.parts)]
            folder = next((FOLDER_CLASSES[f] for f in folders if f in FOLDER_CLASSES), None)
            if folder in classes:
                digits = _DIGITS_RE.search(stem)
                if digits:
                    entries.append(_Entry(root / rel, shown, folder, f"{folder}_{int(digits.group(1))}{ext}"))
                else:
                    unnumbered.append((root / rel, shown, folder))
            elif match:
                raise StageError(f"{shown}: unknown class prefix {match.group(1)!r}; name images <CLS>_<n> with CLS "
                                 f"one of {', '.join(classes)} (data.classes), or put them in class folders")
            else:
                skipped.append(shown)
    if skipped:
        log.info("skipped %d images with no class (e.g. %s)", len(skipped), skipped[0])
    # Files like Crazing/scan.bmp get numbers after the largest one already used in their class.
    for src, shown, label in unnumbered:
        used = [int(_DIGITS_RE.search(Path(e.name).stem).group(1)) for e in entries if e.label == label]
        entries.append(_Entry(src, shown, label, f"{label}_{max(used, default=0) + 1}{src.suffix.lower()}"))
    return entries


def drop_duplicates(entries: Sequence[_Entry]) -> list[_Entry]:
    """Keep one of each file name and canonical name; refuse a clash unless it is a true copy.

    Two files clash when they have the same file name anywhere in the source (Kaggle's
    ``train/Crazing/x.bmp`` and ``valid/Inclusion/x.bmp``) or become the same canonical name
    (``Cr_01.bmp`` and ``Cr_1.bmp``). Identical bytes in the same class are one image stored
    twice: the first is kept, with a note. Anything else is ambiguous data.

    Raises:
        StageError: naming both files and why they clash.
    """
    first: dict[tuple[str, str], _Entry] = {}
    kept, copies = [], []
    for e in entries:
        keys = (("file", e.src.name), ("name", e.name))
        other = next((first[k] for k in keys if k in first), None)
        if other is None:
            first.update(dict.fromkeys(keys, e))
            kept.append(e)
            continue
        identical = filecmp.cmp(other.src, e.src, shallow=False)
        if identical and other.label == e.label:
            copies.append(f"{e.shown} (a copy of {other.shown})")
        elif identical:
            raise StageError(f"{other.shown} and {e.shown}: the same image labelled {other.label} and {e.label}; "
                             f"keep it only in the folder of its true class")
        elif other.label != e.label:
            raise StageError(f"{other.shown} and {e.shown}: the same file name in class {other.label} and class "
                             f"{e.label}; file names must be unique across class folders, rename one of them")
        else:
            same = f"both become {e.name}" if other.name == e.name else f"both are named {e.src.name}"
            raise StageError(f"{other.shown} and {e.shown} {same} but differ; remove or rename one of them")
    if copies:
        log.warning("skipped %d identical copies of images: %s", len(copies), "; ".join(copies[:5]))
    return kept


def download(cfg: Config, raw_dir: Path = Path("data/raw"), *, cache_dir: Path = Path("data/cache"),
             retry_delays: Sequence[float] = RETRY_DELAYS, read_timeout: float = READ_TIMEOUT,
             max_unpacked_mb: float = MAX_UNPACKED_MB) -> DownloadResult:
    """Fetch, validate and publish the images as ``raw_dir/NEU-CLS`` and ``raw_dir/manifest.csv``.

    Args:
        cfg: the configuration; ``cfg.data.source`` says where the images are.
        raw_dir: the output folder.
        cache_dir: where downloaded archives are kept between runs.
        retry_delays: seconds before each retry of a failed download.
        read_timeout: seconds a server may stay silent before the attempt is given up.
        max_unpacked_mb: the most an archive's images, and a download, may take (zip bombs).

    Raises:
        StageError: bad source or bad data; ``raw_dir`` is then left untouched. No message
            shows the credentials of a source URL.
    """
    try:
        return _download(cfg, Path(raw_dir), Path(cache_dir), retry_delays, read_timeout, int(max_unpacked_mb * 2**20))
    except StageError as exc:  # the messages are built redacted; this also covers any library text
        raise StageError(redact_url(str(exc))) from None


def _download(cfg: Config, raw_dir: Path, cache_dir: Path, retry_delays: Sequence[float], read_timeout: float,
              max_bytes: int) -> DownloadResult:
    source, shown_source = cfg.data.source, redact_url(cfg.data.source)
    path, cached = local_source(source, cache_dir, retry_delays, read_timeout, max_bytes)
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".raw-tmp-", dir=raw_dir.parent))
    try:
        # Messages name files as the user wrote the source: "<folder>/<file>" or "<archive>:<member>".
        if path.is_dir():
            root, shown_root, place = path, shown_source.rstrip("/") + "/", shutil.copyfile
        else:
            root, shown_root, place = work / "extract", shown_source + ":", os.replace
            extract_source(path, root, max_bytes, cached, shown_source)
        entries = sorted(drop_duplicates(scan(root, cfg.data.classes, shown_root)), key=lambda e: e.name)
        counts = check_counts([e.label for e in entries], cfg.data.classes, cfg.data.expected_per_class, shown_source)
        new = work / "raw"
        (new / IMAGES_SUBDIR).mkdir(parents=True)
        rows = []
        for e in entries:
            out = new / IMAGES_SUBDIR / e.name
            place(e.src, out)
            width, height = check_image(out, e.shown, cfg.data.image_size)
            rows.append((e.name, e.label, sha256_file(out), width, height, "public"))
        verified = verify_public({r[0]: r[2] for r in rows}, {e.name: e.shown for e in entries},
                                 ROOT / cfg.data.checksums)
        labels = read_labels(Path(cfg.data.labels), cfg.data.classes, cfg.data.image_size) if cfg.data.labels \
            else Labels([], 0, None)
        rows += merge_labels(labels, rows, {e.name: e.shown for e in entries}, new / IMAGES_SUBDIR)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([MANIFEST_COLUMNS, *rows])
        manifest = buf.getvalue().encode()
        (new / MANIFEST_NAME).write_bytes(manifest)
        (new / LABELS_NAME).write_text(json.dumps({"labels_version": labels.version, "plant": len(rows) - len(entries),
                                                   "plant_unknown": labels.unknown}) + "\n")
        replace_dir(new, raw_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    version = hashlib.sha256(manifest).hexdigest()
    log.info("dataset version %s (sha256 of %s)", version, raw_dir / MANIFEST_NAME)
    plant = sum(r[5] == "plant" for r in rows)
    counts = {c: sum(r[1] == c for r in rows) for c in cfg.data.classes}
    return DownloadResult(len(rows), counts, version[:12], verified, plant, labels.unknown, labels.version)


def merge_labels(labels: Labels, rows: Sequence[tuple], shown: dict[str, str], out: Path) -> list[tuple]:
    """Copy the plant's labelled images beside the source's; returns their manifest rows.

    An image that is byte for byte one of the source's is that image (kept once); with another
    class it is an error naming both labels.
    """
    by_sha = {r[2]: r for r in rows}
    added = []
    for image in labels.images:
        same = by_sha.get(image.sha256)
        if same is not None:
            if same[1] != image.label:
                raise StageError(f"{image.path} ({image.label}) and {shown[same[0]]} ({same[1]}): the same image "
                                 f"labelled {image.label} and {same[1]}; correct the label in the labels manifest")
            continue
        shutil.copyfile(image.path, out / image.path.name)
        by_sha[image.sha256] = row = (image.path.name, image.label, image.sha256, *_size(out / image.path.name),
                                      "plant")
        added.append(row)
    return added


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def get_args_parser() -> argparse.ArgumentParser:
    """The stage's command-line options."""
    parser = argparse.ArgumentParser(description="Fetch and validate the NEU-CLS images into data/raw.")
    add_config_args(parser)
    parser.add_argument("--raw-dir", type=Path, default=Path("data/raw"),
                        help="output folder: <raw-dir>/NEU-CLS and <raw-dir>/manifest.csv (default: data/raw)")
    parser.add_argument("--cache-dir", type=Path, default=Path("data/cache"),
                        help="where downloaded archives are kept between runs (default: data/cache)")
    return parser


def main(argv: Sequence[str] | None = None) -> DownloadResult:
    """Run the stage and print a short summary."""
    install_log_redaction()  # run_stage has set up logging: every line passes redact_url
    args = get_args_parser().parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    result = download(cfg, args.raw_dir, cache_dir=args.cache_dir)
    counts = ", ".join(f"{c} {n}" for c, n in result.counts.items())
    print(f"{result.n_images} images in {args.raw_dir / IMAGES_SUBDIR} ({counts})")
    print(f"dataset version {result.dataset_version} ({args.raw_dir / MANIFEST_NAME})")
    print("verified: public NEU-CLS set, every sha256 matches" if result.verified_sha256
          else "checked: format only (not the public set)")
    if result.labels_version:
        print(f"plant labels {result.labels_version}: {result.plant} images merged, {result.plant_unknown} "
              f"labelled unknown kept aside (not trained on)")
    return result


if __name__ == "__main__":
    sys.exit(run_stage(main))
