"""Stage ``export``: the trained model as ONNX, checked in ONNX Runtime and OpenVINO.

Writes ``models/model.onnx`` with the registered model's contract: float32 (N, 1, 200, 200)
grayscale in [0, 1] in (any N), (N, 6) probabilities in class order Cr, In, Pa, PS, RS, Sc out;
the input stem (trimmed mean, detrending, standardisation), the softmax and, with ``--mirror``,
the mirror averaging are inside the graph. ``models/model.int8.onnx`` is its statically quantised
twin, calibrated on training images. Every variant (``neu_model.runtimes.VARIANTS``) is run on
the test images, clean and under the corruption suite, and compared with PyTorch; the figures and
which variants are offered go to ``reports/export.json``:

- fp32 (ONNX Runtime, OpenVINO): kept when every test prediction is PyTorch's and no
  probability differs by more than ``--tolerance``;
- bf16 and int8: kept when the test accuracy is within ``--max-accuracy-images`` images of
  PyTorch's and the suite's mean accuracy within ``--max-robustness-points`` points.

    python -m neu_model.export [--mirror]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neu_model import corruptions, runtimes
from neu_model.cli import StageError, run_stage
from neu_model.config import CLASSES
from neu_model.data import IMAGE_DIR, SPLIT_FILE, ImageSet, load_split, to_float
from neu_model.files import atomic_path, sha256_file, write_json
from neu_model.model import MaxPool2x2, TrimmedPool2d

log = logging.getLogger("neu_model.export")

REPORT_FILE = Path("reports/export.json")
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
REDUCED = ("bf16", "int8")


class PooledTrimmedMean(nn.Module):
    """``TrimmedPool2d`` from pooling kernels: (4 x mean - max - min) / 2 of each 2x2 block, the
    minimum being minus the max pool of the negated image. The same numbers in PyTorch; in a
    graph three pooling kernels instead of four strided Slice nodes and six elementwise nodes
    (ONNX Runtime spent a third of its time in that stem)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool2d(x, 2) * 4 - F.max_pool2d(x, 2) + F.max_pool2d(-x, 2)) * 0.5


def native_pooling(net: nn.Module) -> nn.Module:
    """``net`` with its strided-view poolings replaced by pooling kernels (in place): each
    ``MaxPool2x2`` by ``nn.MaxPool2d(2)``, each ``TrimmedPool2d`` by ``PooledTrimmedMean``.

    The views are faster in eager PyTorch; in ONNX Runtime and OpenVINO the pooling kernels
    are, and they give the same numbers (parity checks it).
    """
    for name, child in net.named_children():
        if isinstance(child, MaxPool2x2):
            setattr(net, name, nn.MaxPool2d(2))
        elif isinstance(child, TrimmedPool2d):
            setattr(net, name, PooledTrimmedMean())
        else:
            native_pooling(child)
    return net


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the named loggers to WARNING for the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=False):
            logger.setLevel(level)


def export_onnx(model: nn.Module, path: Path, image_size: int = 200, metadata: dict[str, str] | None = None) -> None:
    """Write ``model`` (images to probabilities) as ONNX with a dynamic batch dimension.

    torch.export-based exporter (``dynamo=True``): the legacy TorchScript exporter is
    deprecated, warns on Detrend's shape check and writes four times the nodes for the same graph.
    """
    import onnx

    example = torch.rand(2, 1, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    # The exporter prints its progress to stdout, which a stage keeps for results, and logs
    # every rewrite of its optimiser at INFO.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), quiet_loggers("onnxscript", "onnx_ir"):
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=OPSET,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), external_data=False, optimize=True)
    proto = program.model_proto
    proto.doc_string = (f"NEU-CLS surface-defect classifier: {INPUT_NAME} float32 (N, 1, {image_size}, {image_size}) "
                        f"grayscale in [0, 1] -> {OUTPUT_NAME} (N, {len(CLASSES)}) in class order {', '.join(CLASSES)}")
    onnx.helper.set_model_props(proto, {"classes": ",".join(CLASSES), **(metadata or {})})
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray, batch_size: int = 32) -> None:
    """ONNX Runtime static quantisation (QDQ; int8 weights per channel, uint8 activations) of the
    convolutions, poolings and classifier, calibrated on ``calibration`` images.

    The stem's detrending (a MatMul over raw pixels) and standardisation stay fp32. Activation
    ranges are the 99.999th percentiles: on the seed-0 model they changed half as many
    predictions under the corruption suite as the min-max ranges (25 against 45 of 15,660).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calibration[i: i + batch_size] for i in range(0, len(calibration), batch_size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    # The percentile calibrator prints its progress to stdout.
    with (tempfile.TemporaryDirectory() as work, atomic_path(int8_path) as tmp,
          quiet_loggers("onnxruntime.quantization"), contextlib.redirect_stdout(io.StringIO())):
        prepared = Path(work) / "prepared.onnx"  # shapes inferred, graph simplified: what the quantiser expects
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=["Conv", "MaxPool", "GlobalAveragePool", "Gemm"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile)


def suite_predictions(predictors: dict[str, runtimes.Predictor], images: torch.Tensor,
                      batch_size: int) -> dict[str, list[np.ndarray]]:
    """Each predictor's probabilities on every case of the corruption suite, as evaluate builds it
    (corrupted, then rounded back to uint8 like a camera's pixels)."""
    clean = to_float(images)
    out: dict[str, list[np.ndarray]] = {name: [] for name in predictors}
    for name, (_, severities) in corruptions.SUITE.items():
        for severity in severities:
            corrupted = to_float((corruptions.corrupt(clean, name, severity) * 255).round().to(torch.uint8))
            for variant, predictor in predictors.items():
                out[variant].append(runtimes.predict_all(predictor, corrupted.numpy(), batch_size))
    return out


def variant_figures(probs: np.ndarray, suite: list[np.ndarray], reference: np.ndarray,
                    reference_suite: list[np.ndarray], labels: np.ndarray) -> dict:
    """Agreement with the reference (clean and under the suite), accuracy and suite mean accuracy."""
    return {
        "changed_predictions": int((probs.argmax(1) != reference.argmax(1)).sum()),
        "suite_changed_predictions": int(sum((p.argmax(1) != r.argmax(1)).sum()
                                             for p, r in zip(suite, reference_suite, strict=False))),
        "max_prob_diff": float(np.abs(probs - reference).max()),
        "accuracy": round(float((probs.argmax(1) == labels).mean()), 6),
        "errors": int((probs.argmax(1) != labels).sum()),
        "robustness_mean": round(float(np.mean([(p.argmax(1) == labels).mean() for p in suite])), 6),
    }


def verdict(name: str, figures: dict, reference: dict, args: argparse.Namespace) -> tuple[bool, str]:
    """Whether variant ``name`` is offered, and why (or why not)."""
    if runtimes.VARIANTS[name].precision not in REDUCED:
        if figures["changed_predictions"] or figures["max_prob_diff"] > args.tolerance:
            return False, (f"parity failed: {figures['changed_predictions']} changed predictions, largest "
                           f"probability difference {figures['max_prob_diff']:.2g} (tolerance {args.tolerance:g})")
        return True, f"parity: same predictions, probabilities within {args.tolerance:g}"
    extra_errors = abs(figures["errors"] - reference["errors"])
    robustness_points = 100 * abs(figures["robustness_mean"] - reference["robustness_mean"])
    if extra_errors > args.max_accuracy_images or robustness_points > args.max_robustness_points:
        return False, (f"{extra_errors} test images apart from fp32 (at most {args.max_accuracy_images}), suite "
                       f"mean {robustness_points:.2f} points apart (at most {args.max_robustness_points:g})")
    return True, (f"within {args.max_accuracy_images} test image(s) and {args.max_robustness_points:g} suite "
                  f"points of fp32")


def unsupported(name: str) -> str | None:
    """Why this machine cannot judge variant ``name``, or None."""
    variant = runtimes.VARIANTS[name]
    if variant.runtime == "openvino" and variant.precision == "bf16" and not runtimes.openvino_supports("bf16"):
        return "this CPU has no bf16 instructions (OpenVINO would silently run fp32)"
    return None


def load_data(split_file: Path, image_dir: Path, split: str) -> ImageSet:
    data = load_split(split, split_file, image_dir)
    if not len(data):
        raise StageError(f"{split_file}: no {split} images; run the split stage (dvc repro split)")
    return data


def calibration_images(split_file: Path, image_dir: Path, count: int, seed: int = 0) -> np.ndarray:
    """``count`` training images, a seeded sample (the test images stay unseen)."""
    train = load_data(split_file, image_dir, "train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return to_float(train.images[pick]).numpy()


def write_graphs(net: nn.Module, args: argparse.Namespace, image_size: int) -> tuple[Path, Path]:
    """Export ``net`` (loaded from ``args.model``) to ONNX and quantise it; returns the fp32 and int8 files."""
    onnx_file, int8_file = args.out_dir / runtimes.ONNX_FILE, args.out_dir / runtimes.INT8_FILE
    metadata = {"mirror": str(args.mirror).lower(), "source_sha256": sha256_file(args.model)}
    graph = runtimes.probability_model(native_pooling(copy.deepcopy(net)), args.mirror)
    export_onnx(graph, onnx_file, image_size, metadata)
    quantize_int8(onnx_file, int8_file, calibration_images(args.split, args.images, args.calibration_images))
    log.info("wrote %s and %s", onnx_file, int8_file)
    return onnx_file, int8_file


def timed_predictions(predictor: runtimes.Predictor, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    """Probabilities for ``images`` and the images/s of that pass (after a warm-up call that
    compiles shapes and starts thread pools)."""
    predictor.predict(images[:batch_size])
    start = time.perf_counter()
    probs = runtimes.predict_all(predictor, images, batch_size)
    return probs, round(len(images) / (time.perf_counter() - start), 1)


def export(args: argparse.Namespace) -> dict:
    """Export, quantise, compare every variant with PyTorch; write and return the report."""
    net = runtimes.load_network(args.model)
    test = load_data(args.split, args.images, "test")
    onnx_file, int8_file = write_graphs(net, args, test.images.shape[-1])
    predictors = {"torch": runtimes.TorchPredictor(runtimes.probability_model(net, args.mirror))}
    entries = {}
    for name, variant in runtimes.VARIANTS.items():
        reason = None if name == "torch" else unsupported(name)
        if reason:
            entries[name] = {"runtime": variant.runtime, "file": variant.file, "precision": variant.precision,
                             "kept": False, "reason": reason}
        elif name != "torch":
            predictors[name] = runtimes.load_predictor(name, args.out_dir)
    images, labels = to_float(test.images).numpy(), test.labels.numpy()
    clean = {name: timed_predictions(predictor, images, args.batch_size) for name, predictor in predictors.items()}
    suite = suite_predictions(predictors, test.images, args.batch_size)
    reference = variant_figures(clean["torch"][0], suite["torch"], clean["torch"][0], suite["torch"], labels)
    for name in list(predictors)[1:]:
        figures = variant_figures(clean[name][0], suite[name], clean["torch"][0], suite["torch"], labels)
        kept, reason = verdict(name, figures, reference, args)
        variant = runtimes.VARIANTS[name]
        entries[name] = {"runtime": variant.runtime, "file": variant.file, "precision": variant.precision,
                         **figures, "images_per_second": clean[name][1], "kept": kept, "reason": reason}
        log.info("%-14s %s: %s", name, "kept" if kept else "dropped", reason)
    report = {"onnx_file": str(onnx_file), "int8_file": str(int8_file), "mirror": args.mirror,
              "exporter": f"torch {torch.__version__.split('+')[0]} torch.onnx dynamo, opset {OPSET}",
              "n_test": len(test), "tolerance": args.tolerance,
              "reference": {"runtime": "torch", **{k: reference[k] for k in ("accuracy", "errors", "robustness_mean")},
                            "images_per_second": clean["torch"][1]},
              "variants": {name: entries[name] for name in runtimes.VARIANTS if name in entries},
              "offered": runtimes.offered({"variants": entries})}
    write_json(args.report, report)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=runtimes.MODELS_DIR / runtimes.TORCH_FILE)
    parser.add_argument("--split", type=Path, default=SPLIT_FILE)
    parser.add_argument("--images", type=Path, default=IMAGE_DIR)
    parser.add_argument("--out-dir", type=Path, default=runtimes.MODELS_DIR,
                        help="where model.onnx and model.int8.onnx go")
    parser.add_argument("--report", type=Path, default=REPORT_FILE)
    parser.add_argument("--mirror", action="store_true", help="average each image with its mirror image, in the graph")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest probability difference of an fp32 variant")
    parser.add_argument("--max-accuracy-images", type=int, default=1, help="bf16 / int8: test images apart from fp32")
    parser.add_argument("--max-robustness-points", type=float, default=0.3,
                        help="bf16 / int8: corruption-suite mean accuracy apart from fp32, in points")
    parser.add_argument("--calibration-images", type=int, default=256, help="training images that calibrate int8")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if not Path(args.model).is_file():  # before reading any image: the cheap check first
        raise StageError(f"{args.model}: no trained model; run the pipeline first (make pipeline)")
    report = export(args)
    log.info("offered: %s (mirror %s); figures in %s", ", ".join(report["offered"]) or "none",
             "on" if args.mirror else "off", args.report)


if __name__ == "__main__":
    sys.exit(run_stage(main))
