"""Inference speed of every runtime on the test images, in one run; prints one Markdown table.

    make bench-inference                                  # = python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --passes 7 --batches 1 64
    python benchmarks/bench_inference.py --mirror         # also the mirror-averaged graphs

Exports ``--model`` to ONNX (and int8, calibrated on ``export.calibration_images`` training images)
in a work folder, then runs each runtime in its own process (so that its peak memory is its own)
on the same test images: images/s at each batch size (the median of ``--passes`` passes over all
test images), latency p50/p99 of single images, images per CPU-second at batch 64 (steadier than
the wall clock on a loaded host), peak RSS, test accuracy and whether every prediction matches
eager PyTorch's. Cases whose instructions the CPU lacks (bf16, int8) are left out and named.
Ratios are to eager PyTorch as ``neu-predict`` runs it, measured in the same run: only ratios from
one run compare, since the host and its load change from run to run. With ``--mirror``, mirror
averaging is measured for eager PyTorch and for the fastest case that matches eager on every
image (the ``+ mirror`` rows, compared with eager + mirror). Nothing under models/ or reports/ is
written. Not part of the test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neu_model.core import paths

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

UNCHUNKED = 1 << 30
# name -> (runtime variant, predictor options, CPU flags one of which it needs)
CASES = {
    "torch eager": ("torch", {}, ()),
    "torch.compile": ("torch-compile", {}, ()),
    "onnxruntime": ("onnx", {}, ()),
    "onnxruntime unchunked": ("onnx", {"chunk": UNCHUNKED}, ()),
    "openvino": ("openvino", {}, ()),
    "openvino unchunked": ("openvino", {"chunk": UNCHUNKED}, ()),
    "openvino bf16": ("openvino-bf16", {}, ("avx512_bf16", "amx_bf16")),
    "onnxruntime int8": ("onnx-int8", {}, ("avx512_vnni", "avx_vnni", "amx_int8")),
    "openvino int8": ("openvino-int8", {}, ("avx512_vnni", "avx_vnni", "amx_int8")),
}
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> tuple[str, set[str]]:
    """The CPU model name and its flags (Linux /proc/cpuinfo; elsewhere the platform's name, no flags)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return name, set(flags)


def load_predictor(variant: str, work: Path, mirror: bool, options: dict, threads: int = 0):
    """The predictor of ``variant`` (``torch-compile``: eager PyTorch under torch.compile) on
    ``threads`` threads (0: each runtime's default, one per physical core)."""
    import torch

    from neu_model.inference import runtimes
    from neu_model.inference.torch_model import TorchPredictor, load_torch_model

    if threads:
        torch.set_num_threads(threads)
        options = options | {"threads": threads}
    models = work / ("mirror" if mirror else "plain")
    if variant.startswith("torch"):
        network = load_torch_model(work / "model.pt")[0]
        predictor = TorchPredictor(network, mirror=mirror)
        if variant == "torch-compile":
            # dynamic=True: one graph for every batch size (the last batch of a pass is smaller).
            predictor.model = torch.compile(predictor.model, dynamic=True)
        return predictor
    spec = runtimes.VARIANTS[variant]
    if spec.runtime == "openvino":
        return runtimes.OpenVinoPredictor(models / spec.file, spec.precision, **options)
    return runtimes.OnnxPredictor(models / spec.file, **options)


def time_passes(predictor, images: np.ndarray, batch_size: int, passes: int) -> tuple[float, float, list[float]]:
    """Median images/s over ``passes`` passes through ``images``, images per CPU-second (all
    threads of this process), and every call's seconds.

    Images per CPU-second is the steadier figure on a loaded host: waiting for a core shows
    in the wall clock, not in the CPU time (spinning threads still count).
    """
    predictor.predict(images[:batch_size])  # warm-up: first-call allocations, graph compilation
    rates, calls = [], []
    cpu_start = time.process_time()
    for _ in range(passes):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            t = time.perf_counter()
            predictor.predict(images[i: i + batch_size])
            calls.append(time.perf_counter() - t)
        rates.append(len(images) / (time.perf_counter() - start))
    per_cpu_second = passes * len(images) / (time.process_time() - cpu_start)
    return float(np.median(rates)), per_cpu_second, calls


def peak_rss_mib() -> int:
    """This process's peak resident memory. VmHWM, not getrusage: Linux carries ru_maxrss over
    exec, so a child started by a large parent would report the parent's peak."""
    try:
        status = Path("/proc/self/status").read_text()
        return round(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def worker(args: argparse.Namespace) -> None:
    """One case in this process: predictions, speed, latency and peak RSS as JSON on stdout."""
    variant, mirror, options = case_spec(args.worker)

    from neu_model.inference.predictors import predict_batched

    images = np.load(args.workdir / "images.npy")
    predictor = load_predictor(variant, args.workdir, mirror, options, args.threads)
    probs = predict_batched(predictor.predict, images, 64)
    np.save(args.workdir / f"probs-{args.worker}.npy", probs)
    result = {"case": args.worker}
    for batch_size in args.batches:
        rate, per_cpu_second, calls = time_passes(predictor, images, batch_size, args.passes)
        result[f"img/s b{batch_size}"] = round(rate)
        if batch_size == 64:
            result["img/CPU-s b64"] = round(per_cpu_second)
        if batch_size == 1:
            result["p50 ms"], result["p99 ms"] = (round(1e3 * float(np.percentile(calls, q)), 2) for q in (50, 99))
    result["peak RSS MiB"] = peak_rss_mib()
    print(json.dumps(result))


def case_spec(case: str) -> tuple[str, bool, dict]:
    """Variant, mirror averaging and predictor options of a case; ``X + mirror`` is case X with mirror averaging."""
    variant, options, _ = CASES[case.removesuffix(" + mirror")]
    return variant, case.endswith(" + mirror"), options


def prepare(args: argparse.Namespace, work: Path) -> np.ndarray:
    """Test images and labels as .npy, the model and its ONNX exports in ``work``; returns the labels."""
    import shutil

    from neu_model.core.config import load_config
    from neu_model.data.dataset import load_split, to_float
    from neu_model.inference import export, onnx_graphs
    from neu_model.inference.torch_model import load_torch_model, probability_model

    test = load_split("test", args.split, args.images)
    np.save(work / "images.npy", to_float(test.images).numpy())
    shutil.copy(args.model, work / "model.pt")
    calibration = export.calibration_images(args.split, args.images, load_config().export.calibration_images)
    for mirror in (False, True) if args.mirror else (False,):
        folder = work / ("mirror" if mirror else "plain")
        net = onnx_graphs.native_pooling(load_torch_model(args.model)[0])
        onnx_graphs.export_onnx(probability_model(net, mirror), folder / paths.ONNX_FILE)
        onnx_graphs.quantize_int8(folder / paths.ONNX_FILE, folder / paths.INT8_FILE, calibration)
    return test.labels.numpy()


def run_case(case: str, args: argparse.Namespace, work: Path) -> dict | None:
    """Run one case in a fresh process; None (with a note) when it fails."""
    command = [sys.executable, __file__, "--worker", case, "--workdir", str(work), "--passes", str(args.passes),
               "--threads", str(args.threads),
               "--batches", *map(str, args.batches)]
    print(f"# {case} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    if done.returncode or not done.stdout.strip():
        print(f"# {case} failed, left out: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(row: dict, work: Path, labels: np.ndarray, reference: str) -> dict:
    """Accuracy and agreement with the reference case's predictions."""
    probs, ref = np.load(work / f"probs-{row['case']}.npy"), np.load(work / f"probs-{reference}.npy")
    row["accuracy %"] = round(100 * float((probs.argmax(1) == labels).mean()), 2)
    row["same as eager"] = "yes" if (probs.argmax(1) == ref.argmax(1)).all() else (
        f"no ({int((probs.argmax(1) != ref.argmax(1)).sum())} differ)")
    row["max prob diff"] = f"{float(np.abs(probs - ref).max()):.1e}"
    return row


def add_ratios(rows: list[dict], eager: dict, batches: list[int]) -> None:
    """Each speed column as a multiple of eager PyTorch's."""
    columns = [f"img/s b{b}" for b in batches] + (["img/CPU-s b64"] if 64 in batches else [])
    for row in rows:
        for column in columns:
            name = f"x eager {column.split()[1]}" if column.startswith("img/s") else "x eager CPU b64"
            row[name] = round(row[column] / eager[column], 2)


def compile_note(rows: list[dict], batches: list[int]) -> str:
    """Whether torch.compile helps over eager at the measured batch sizes (it is only worth its
    start-up time where it is faster)."""
    by_case = {r["case"]: r for r in rows}
    if "torch.compile" not in by_case:
        return " torch.compile: failed or not run, left out."
    faster = [b for b in batches if by_case["torch.compile"][f"img/s b{b}"] > by_case["torch eager"][f"img/s b{b}"]]
    return (f" torch.compile faster than eager at batch {', '.join(map(str, faster))}." if faster
            else " torch.compile is no faster than eager at any batch size here: not worth it.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/model.pt")
    parser.add_argument("--split", type=Path, default=ROOT / "data/split.csv")
    parser.add_argument("--images", type=Path, default=ROOT / "data/raw/NEU-CLS")
    parser.add_argument("--passes", type=int, default=5, help="passes over the test images per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of every runtime; 0: their defaults (one per core). 1 compares "
                             "per core, which a loaded host distorts least")
    parser.add_argument("--mirror", action="store_true",
                        help="also measure mirror averaging (eager and the fastest case that matches eager)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import pandas as pd

    cpu, flags = cpu_description()
    print(f"CPU: {cpu}; {os.cpu_count()} logical CPUs; flags: {', '.join(f for f in FLAGS if f in flags) or 'none of'} "
          f"(of {', '.join(FLAGS)})")
    with tempfile.TemporaryDirectory(prefix="neu-bench-inference-") as tmp:
        work = Path(tmp)
        labels = prepare(args, work)
        cases = [c for c in args.cases if c == "torch eager" or not CASES[c][2] or flags & set(CASES[c][2])]
        skipped = sorted(set(args.cases) - set(cases))
        rows = [r for r in (run_case(c, args, work) for c in dict.fromkeys(["torch eager", *cases])) if r]
        rows = [score(r, work, labels, "torch eager") for r in rows]
        batch = 64 if 64 in args.batches else args.batches[-1]
        fastest = max((r for r in rows if r["same as eager"] == "yes" and r["case"] != "torch eager"),
                      key=lambda r: r[f"img/s b{batch}"], default=None)
        mirror_cases = ["torch eager", *([fastest["case"]] if fastest else [])] if args.mirror else []
        mirror_rows = [r for r in (run_case(f"{c} + mirror", args, work) for c in mirror_cases) if r]
        rows += [score(r, work, labels, "torch eager + mirror") for r in mirror_rows]
    if not rows or rows[0]["case"] != "torch eager":
        sys.exit("eager PyTorch, the reference, failed; see the note above")
    add_ratios(rows, rows[0], args.batches)
    print("\n" + pd.DataFrame(rows).fillna("").to_markdown(index=False))
    import onnxruntime
    import openvino
    import torch

    print(f"\ntorch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}; "
          f"{args.passes} passes over {len(labels)} test images per batch size; "
          f"threads: {args.threads or 'each runtime its default'}"
          + ("; mirror rows compared with eager + mirror." if args.mirror else ".")
          + (f" Skipped (CPU lacks the instructions): {', '.join(skipped)}." if skipped else "")
          + compile_note(rows, args.batches))


if __name__ == "__main__":
    main()
