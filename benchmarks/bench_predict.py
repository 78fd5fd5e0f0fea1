"""Score many images with ``neu-predict`` in a child process; print its peak memory and speed next to the model's.

    python benchmarks/bench_predict.py                                  # 20,000 images, models/model.pt
    python benchmarks/bench_predict.py --n 2000                         # memory must not depend on n
    python benchmarks/bench_predict.py --images data/raw/NEU-CLS --model models/model.pt --batch-size 64

The ``--n`` images are hard links to the ``--images`` folder's, cycled, in a temporary folder (no
extra disk, nothing written in the repository). The command runs as a child process,
``python -m neu_model.inference.predict FOLDER --model MODEL --out CSV``, exactly as on the line; its peak
RSS is the child's (``getrusage(RUSAGE_CHILDREN)``), its speed the images over its whole wall
time: start-up, decoding, the model, the CSV. The model's own speed is ``predict_logits`` on
the distinct images preloaded as one tensor, same batch size, in this process. Not part of the
test suite: it reads about 800 MB.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from neu_model.data.dataset import decode_gray
from neu_model.inference.input_files import walk_images
from neu_model.inference.torch_model import load_torch_model, predict_logits, select_device

ROOT = Path(__file__).resolve().parent.parent


def link_images(images: Path, n: int, work: Path) -> Path:
    """``n`` hard links (symbolic across file systems) to the images under ``images``, 1,000 a folder."""
    sources = itertools.islice(itertools.cycle(walk_images(images)), n)
    for i, src in enumerate(sources):
        dest = work / "images" / f"{i // 1000:03d}" / f"{i:06d}_{src.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            dest.symlink_to(src.resolve())
    return work / "images"


def run_command(folder: Path, model: Path, batch_size: int, out: Path) -> dict:
    """The command on ``folder``, as a child: exit status, wall seconds, rows and its peak RSS (MB)."""
    cmd = [sys.executable, "-m", "neu_model.inference.predict", str(folder), "--model", str(model), "--device", "cpu",
           "--batch-size", str(batch_size), "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "NEU_PROGRESS": "0"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.exit(f"neu-predict failed ({done.returncode}): {done.stderr[-2000:]}")
    rows = sum(1 for _ in out.open()) - 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e6  # Linux: KiB
    return {"status": done.returncode, "seconds": seconds, "rows": rows, "peak_mb": peak,
            "summary": done.stderr.strip().splitlines()[-1]}


def model_speed(images: Path, model_file: Path, batch_size: int, passes: int = 2) -> tuple[float, int]:
    """Images per second of ``predict_logits`` on the distinct images preloaded (best of ``passes``)."""
    device = select_device("cpu")
    model, _ = load_torch_model(model_file, device)
    tensor = torch.stack([torch.from_numpy(decode_gray(p)) for p in walk_images(images)])[:, None]
    predict_logits(model, tensor[:batch_size], device, batch_size)  # warm-up: oneDNN picks its kernels
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        predict_logits(model, tensor, device, batch_size)
        best = min(best, time.perf_counter() - start)
    return len(tensor) / best, len(tensor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "raw" / "NEU-CLS",
                        help="folder of images to link (default data/raw/NEU-CLS)")
    parser.add_argument("--n", type=int, default=20_000, help="images to score")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "model.pt")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if not args.images.is_dir() or not args.model.is_file():
        sys.exit(f"need --images ({args.images}) and --model ({args.model}); run `make pipeline` first")
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        folder = link_images(args.images, args.n, Path(tmp))
        result = run_command(folder, args.model, args.batch_size, Path(tmp) / "predictions.csv")
    rate = args.n / result["seconds"]
    alone, distinct = model_speed(args.images, args.model, args.batch_size)
    print(f"neu-predict on {args.n} images (links to {args.images.name}), batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads: {result['rows']} rows, exit {result['status']}, "
          f"{result['seconds']:.1f} s, {rate:.0f} images/s including start-up and decoding; "
          f"peak RSS {result['peak_mb']:.0f} MB")
    print(f"the model alone (predict_logits on {distinct} preloaded images, same batch): {alone:.0f} images/s; "
          f"the command runs at {rate / alone:.0%} of it")
    print(f"its summary: {result['summary']}")


if __name__ == "__main__":
    main()
