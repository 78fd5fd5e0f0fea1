"""Stream many images through the inference reader; print its peak memory and speed.

    python benchmarks/bench_reader.py                        # 20,000 images in a folder
    python benchmarks/bench_reader.py --n 2000               # memory must not depend on n
    python benchmarks/bench_reader.py --form tar.gz          # the same images in one archive
    python benchmarks/bench_reader.py --images data/raw/NEU-CLS --batch-size 64 --prefetch 2

The ``--n`` images are copies of the ``--images`` folder's, cycled: hard links in a temporary
folder (no extra disk), or members of a temporary archive with ``--form``. Nothing is written
in the repository. Only reading and decoding are timed: the consumer touches each batch and
drops it, as the model would after its forward pass. Peak RSS is the whole process's
(``resource.getrusage``), the imports of torch and numpy included; the baseline line shows
that part. Not part of the test suite: it reads about 800 MB.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import resource
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from neu_model.inference.input_files import walk_images
from neu_model.inference.tiles import Batch, TileStream, with_progress

ROOT = Path(__file__).resolve().parent.parent

FORMS = ("folder", "zip", "tar", "tar.gz")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def make_inputs(images: Path, n: int, form: str, work: Path) -> Path:
    """``n`` copies of the images under ``images``, as a folder of hard links or one archive."""
    sources = list(itertools.islice(itertools.cycle(walk_images(images)), n))
    names = [f"{i // 1000:03d}/{i:06d}_{src.name}" for i, src in enumerate(sources)]  # 1,000 a folder
    if form == "folder":
        for name, src in zip(names, sources, strict=False):
            dest = work / "images" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dest)
            except OSError:  # another file system: a link costs no disk either
                dest.symlink_to(src.resolve())
        return work / "images"
    path = work / f"images.{form}"
    if form == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name, src in zip(names, sources, strict=False):
                zf.write(src, name)
    else:
        options = {"mode": "w:gz", "compresslevel": 1} if form == "tar.gz" else {"mode": "w"}
        with tarfile.open(path, **options) as tf:
            for name, src in zip(names, sources, strict=False):
                tf.add(src, name)
    return path


def stream(inputs: Path, batch_size: int, prefetch: int) -> dict:
    """Read everything once; counts and seconds."""
    reader = TileStream([inputs], batch_size=batch_size, prefetch=prefetch)
    start = time.perf_counter()
    checksum = 0.0
    for item in with_progress(reader):
        if isinstance(item, Batch):
            checksum += float(item.tiles[:, :, 100, 100].sum())  # touch every batch, as a model would
    seconds = time.perf_counter() - start
    return {"files": reader.files_read, "tiles": reader.tiles_read, "errors": reader.errors,
            "seconds": seconds, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "raw" / "NEU-CLS",
                        help="folder of images to copy (default data/raw/NEU-CLS, else the test fixture)")
    parser.add_argument("--n", type=int, default=20_000, help="images to stream")
    parser.add_argument("--form", choices=FORMS, default="folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    images = args.images if args.images.is_dir() else ROOT / "tests" / "fixtures" / "NEU-tiny"
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        inputs = make_inputs(images, args.n, args.form, Path(tmp))
        baseline = peak_rss_mb()
        result = stream(inputs, args.batch_size, args.prefetch)
    rate = result["files"] / result["seconds"]
    print(f"{result['files']} images ({result['tiles']} tiles, {result['errors']} unreadable) from a {args.form} "
          f"of copies of {images.name}, batch {args.batch_size}, prefetch {args.prefetch}: "
          f"{result['seconds']:.1f} s, {rate:.0f} images/s; peak RSS {peak_rss_mb():.0f} MB "
          f"(baseline after imports and setup {baseline:.0f} MB)")


if __name__ == "__main__":
    main()
