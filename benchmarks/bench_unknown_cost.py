"""What the unknown flag costs: images per second with and without it, one run, one machine.

    python benchmarks/bench_unknown_cost.py [--model models/model.pt] [--passes 5] [--batch 64]

The model is exported twice into a temporary folder, as the export stage writes it (mirror
averaging as ``inference.mirror`` says): probabilities alone, and probabilities with the unknown
score as a second output. ONNX Runtime (the default runtime here) and eager PyTorch each run both
on the test images, the two alternating pass by pass so that a change in the host's load hits
both alike; the median images/s of each and their ratio are printed with the CPU model. Only
the ratio carries to another host. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neu_model.core.config import load_config  # noqa: E402
from neu_model.data.dataset import load_split, to_float  # noqa: E402
from neu_model.inference import runtimes  # noqa: E402
from neu_model.inference.onnx_graphs import export_onnx, native_pooling  # noqa: E402
from neu_model.inference.predictors import predict_batched  # noqa: E402
from neu_model.inference.torch_model import TorchPredictor, load_torch_model, probability_model  # noqa: E402
from neu_model.inference.unknown import ScoredModel, UnknownScorer  # noqa: E402


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")


def rates(calls: dict, images: np.ndarray, batch: int, passes: int) -> dict[str, float]:
    """Median images/s of each callable, the callables alternating pass by pass."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call(images[:batch])  # warm-up
    for _ in range(passes):
        for name, call in calls.items():
            start = time.perf_counter()
            predict_batched(call, images, batch)
            seconds[name].append(time.perf_counter() - start)
    return {name: round(len(images) / float(np.median(s)), 1) for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/model.pt")
    parser.add_argument("--split", type=Path, default=ROOT / "data/split.csv")
    parser.add_argument("--images", type=Path, default=ROOT / "data/raw/NEU-CLS")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    net, meta = load_torch_model(args.model)
    if not meta.get("unknown"):
        sys.exit(f"{args.model}: no unknown-input statistics; retrain it (dvc repro train)")
    mirror = load_config().inference.mirror
    images = to_float(load_split("test", args.split, args.images).images).numpy()
    with tempfile.TemporaryDirectory(prefix="neu-unknown-cost-") as tmp:
        plain, scored = Path(tmp) / "plain.onnx", Path(tmp) / "scored.onnx"
        export_onnx(probability_model(native_pooling(copy.deepcopy(net)), mirror), plain)
        export_onnx(ScoredModel(native_pooling(copy.deepcopy(net)), UnknownScorer(meta["unknown"]), mirror), scored,
                    unknown=True)
        onnx_plain, onnx_scored = runtimes.OnnxPredictor(plain), runtimes.OnnxPredictor(scored)
        eager = TorchPredictor(net, meta=meta, mirror=mirror)
        found = rates({"onnx": onnx_plain.predict, "onnx + unknown": lambda b: onnx_scored.run(b)[0],
                       "eager": eager.predict, "eager + unknown": lambda b: eager.predict_scored(b)[0]},
                      images, args.batch, args.passes)
    print(f"CPU: {cpu_model()}; batch {args.batch}; {args.passes} passes over {len(images)} test images; "
          f"mirror {'on' if mirror else 'off'}; method {meta['unknown']['method']}\n")
    print("| runtime | img/s without | img/s with the flag | with / without |\n|---|---|---|---|")
    for name in ("onnx", "eager"):
        print(f"| {name} | {found[name]:,} | {found[name + ' + unknown']:,} | "
              f"{found[name + ' + unknown'] / found[name]:.2f} |")


if __name__ == "__main__":
    main()
