"""Stage ``export``: the trained model as ONNX, checked in ONNX Runtime and OpenVINO.

Writes ``models/model.onnx`` with the registered model's contract: float32 (N, 1, 200, 200)
grayscale in [0, 1] in (any N), (N, 6) probabilities in class order Cr, In, Pa, PS, RS, Sc out;
the input stem (trimmed mean, detrending, standardisation), the softmax and, with ``inference.mirror``,
the mirror averaging are inside the graph. ``models/model.int8.onnx`` is its statically quantised
twin, calibrated on ``export.calibration_images`` training images. Every variant
(``neu_model.inference.runtimes.VARIANTS``) is run on the test images, clean and under the corruption suite,
and compared with PyTorch; the figures and which variants are offered go to ``reports/export.json``
(a DVC metrics file; the register stage logs them into the MLflow run as ``export_*`` metrics):

- fp32 (ONNX Runtime, OpenVINO): kept when every test prediction is PyTorch's and no
  probability differs by more than ``export.tolerance``;
- bf16 and int8: kept when the test accuracy is within ``export.max_accuracy_images`` images of
  PyTorch's and the suite's mean accuracy within ``export.max_robustness_points`` points.

Mirror averaging follows ``inference.mirror``. The settings come from params.yaml; ``--set``
overrides them for one run, as in every stage.

    python -m neu_model.inference.export [--set export.tolerance=2e-4] [--set inference.mirror=false]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neu_model.core import paths
from neu_model.core.config import Config, ExportConfig, add_config_args, load_config
from neu_model.core.files import sha256_file, write_json
from neu_model.core.stage import StageError, run_stage
from neu_model.data import corruptions
from neu_model.data.dataset import ImageSet, load_split, to_float
from neu_model.data.foreign import foreign_sets
from neu_model.inference import runtimes
from neu_model.inference.onnx_graphs import OPSET, export_onnx, native_pooling, quantize_int8
from neu_model.inference.predictors import Predictor, predict_batched, scored_probabilities
from neu_model.inference.torch_model import TorchPredictor, load_torch_model, probability_model
from neu_model.inference.unknown import ScoredModel, UnknownScorer

log = logging.getLogger("neu_model.inference.export")

REDUCED = ("bf16", "int8")


def suite_predictions(predictors: dict[str, Predictor], images: torch.Tensor,
                      batch_size: int) -> dict[str, list[np.ndarray]]:
    """Each predictor's probabilities on every case of the corruption suite, as evaluate builds it
    (corrupted, then rounded back to uint8 like a camera's pixels)."""
    clean = to_float(images)
    out: dict[str, list[np.ndarray]] = {name: [] for name in predictors}
    for name, (_, severities) in corruptions.SUITE.items():
        for severity in severities:
            corrupted = to_float((corruptions.corrupt(clean, name, severity) * 255).round().to(torch.uint8))
            for variant, predictor in predictors.items():
                out[variant].append(predict_batched(predictor.predict, corrupted.numpy(), batch_size))
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


def verdict(name: str, figures: dict, reference: dict, ex: ExportConfig) -> tuple[bool, str]:
    """Whether variant ``name`` is offered, and why (or why not)."""
    if runtimes.VARIANTS[name].precision not in REDUCED:
        if figures.get("unknown_changed_flags"):
            return False, (f"parity failed: {figures['unknown_changed_flags']} tiles flagged unknown otherwise "
                           "than in PyTorch")
        if figures["changed_predictions"] or figures["max_prob_diff"] > ex.tolerance:
            return False, (f"parity failed: {figures['changed_predictions']} changed predictions, largest "
                           f"probability difference {figures['max_prob_diff']:.2g} (tolerance {ex.tolerance:g})")
        return True, f"parity: same predictions, probabilities within {ex.tolerance:g}"
    extra_errors = abs(figures["errors"] - reference["errors"])
    robustness_points = 100 * abs(figures["robustness_mean"] - reference["robustness_mean"])
    if extra_errors > ex.max_accuracy_images or robustness_points > ex.max_robustness_points:
        return False, (f"{extra_errors} test images apart from fp32 (at most {ex.max_accuracy_images}), suite "
                       f"mean {robustness_points:.2f} points apart (at most {ex.max_robustness_points:g})")
    return True, (f"within {ex.max_accuracy_images} test image(s) and {ex.max_robustness_points:g} suite "
                  f"points of fp32")


def unknown_sets(test: ImageSet, image_dir: Path) -> dict[str, np.ndarray]:
    """The test images and the non-steel sets derived from them, float32 in [0, 1]."""
    files = [(image_dir / f).read_bytes() for f in test.files]
    sets = {"test": test.images.numpy()} | foreign_sets(test.images.numpy(), files)
    return {name: images.astype(np.float32) / 255 for name, images in sets.items()}


def unknown_parity(predictors: dict[str, Predictor], sets: dict[str, np.ndarray], batch_size: int) -> dict:
    """Per variant: the largest difference of its unknown scores from PyTorch's on the test images
    (absolute and relative to the threshold), and how many tiles of the test images and every
    non-steel set it flags otherwise. Degenerate tiles (flat frames: features near zero) may
    differ more in score, so the decision, not their score, is compared there."""
    def scores(predictor: Predictor) -> dict[str, np.ndarray]:
        return {name: predict_batched(lambda b: scored_probabilities(predictor, b)[1], images, batch_size)
                for name, images in sets.items()}

    reference, threshold = scores(predictors["torch"]), predictors["torch"].unknown_threshold
    out = {}
    for name, predictor in list(predictors.items())[1:]:
        own = scores(predictor)
        own_threshold = getattr(predictor, "unknown_threshold", None)
        own_threshold = np.inf if own_threshold is None else own_threshold
        diff = float(np.abs(own["test"] - reference["test"]).max())
        changed = sum(int(((own[k] > own_threshold) != (reference[k] > threshold)).sum()) for k in sets)
        out[name] = {"unknown_tiles": sum(len(s) for s in sets.values()), "unknown_max_diff": diff,
                     "unknown_max_rel_diff": diff / max(abs(threshold), 1e-12), "unknown_changed_flags": changed}
    return out


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


def write_graphs(net: nn.Module, meta: dict, cfg: Config, files: ExportFiles, image_size: int) -> tuple[Path, Path]:
    """Export ``net`` (loaded from ``files.model``) to ONNX and quantise it; returns the fp32 and int8 files."""
    onnx_file, int8_file = files.out_dir / paths.ONNX_FILE, files.out_dir / paths.INT8_FILE
    mirror, stats = cfg.inference.mirror, meta.get("unknown")
    metadata = {"mirror": str(mirror).lower(), "source_sha256": sha256_file(files.model)}
    plain = native_pooling(copy.deepcopy(net))
    if stats:  # a second output: the unknown score, and its threshold in the metadata
        graph = ScoredModel(plain, UnknownScorer(stats), mirror)
        metadata |= {runtimes.UNKNOWN_THRESHOLD_KEY: repr(float(stats["threshold"])), "unknown_method": stats["method"]}
    else:
        graph = probability_model(plain, mirror)
    export_onnx(graph, onnx_file, image_size, metadata, unknown=bool(stats))
    quantize_int8(onnx_file, int8_file, calibration_images(files.split, files.images, cfg.export.calibration_images))
    log.info("wrote %s and %s", onnx_file, int8_file)
    return onnx_file, int8_file


def timed_predictions(predictor: Predictor, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    """Probabilities for ``images`` and the images/s of that pass (after a warm-up call that
    compiles shapes and starts thread pools)."""
    predictor.predict(images[:batch_size])
    start = time.perf_counter()
    probs = predict_batched(predictor.predict, images, batch_size)
    return probs, round(len(images) / (time.perf_counter() - start), 1)


@dataclass(frozen=True)
class ExportFiles:
    """What the export stage reads and writes (the defaults are the pipeline's files)."""

    model: Path = paths.MODEL_FILE
    split: Path = paths.SPLIT_FILE
    images: Path = paths.IMAGE_DIR
    out_dir: Path = paths.MODELS_DIR  # model.onnx and model.int8.onnx
    report: Path = paths.EXPORT_REPORT


def export(cfg: Config, files: ExportFiles = ExportFiles()) -> dict:
    """Export, quantise, compare every variant with PyTorch; write and return the report.

    Settings: ``inference.mirror`` (mirror averaging in the graph) and the ``export`` section.
    """
    ex, mirror = cfg.export, cfg.inference.mirror
    net, meta = load_torch_model(files.model)
    test = load_data(files.split, files.images, "test")
    onnx_file, int8_file = write_graphs(net, meta, cfg, files, test.images.shape[-1])
    predictors = {"torch": TorchPredictor(net, meta=meta, mirror=mirror)}
    entries = {}
    for name, variant in runtimes.VARIANTS.items():
        reason = None if name == "torch" else unsupported(name)
        if reason:
            entries[name] = {"runtime": variant.runtime, "file": variant.file, "precision": variant.precision,
                             "kept": False, "reason": reason}
        elif name != "torch":
            predictors[name] = runtimes.variant_predictor(name, files.out_dir)
    images, labels = to_float(test.images).numpy(), test.labels.numpy()
    clean = {name: timed_predictions(predictor, images, ex.batch_size) for name, predictor in predictors.items()}
    suite = suite_predictions(predictors, test.images, ex.batch_size)
    reference = variant_figures(clean["torch"][0], suite["torch"], clean["torch"][0], suite["torch"], labels)
    unknown = unknown_parity(predictors, unknown_sets(test, files.images), ex.batch_size) if meta.get("unknown") else {}
    for name in list(predictors)[1:]:
        figures = variant_figures(clean[name][0], suite[name], clean["torch"][0], suite["torch"], labels)
        figures |= unknown.get(name, {})
        kept, reason = verdict(name, figures, reference, ex)
        variant = runtimes.VARIANTS[name]
        entries[name] = {"runtime": variant.runtime, "file": variant.file, "precision": variant.precision,
                         **figures, "images_per_second": clean[name][1], "kept": kept, "reason": reason}
        log.info("%-14s %s: %s", name, "kept" if kept else "dropped", reason)
    report = {"onnx_file": str(onnx_file), "int8_file": str(int8_file), "mirror": mirror,
              # what the register stage checks before it logs the files with a version
              "model_sha256": sha256_file(files.model), "onnx_sha256": sha256_file(onnx_file),
              "int8_sha256": sha256_file(int8_file),
              "exporter": f"torch {torch.__version__.split('+')[0]} torch.onnx dynamo, opset {OPSET}",
              "n_test": len(test), "tolerance": ex.tolerance,
              "reference": {"runtime": "torch", **{k: reference[k] for k in ("accuracy", "errors", "robustness_mean")},
                            "images_per_second": clean["torch"][1]},
              "variants": {name: entries[name] for name in runtimes.VARIANTS if name in entries},
              "offered": runtimes.offered({"variants": entries})}
    write_json(files.report, report)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)  # --set export.tolerance=2e-4, --set inference.mirror=false, ...
    defaults = ExportFiles()
    parser.add_argument("--model", type=Path, default=defaults.model)
    parser.add_argument("--split", type=Path, default=defaults.split)
    parser.add_argument("--images", type=Path, default=defaults.images)
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir,
                        help="where model.onnx and model.int8.onnx go")
    parser.add_argument("--report", type=Path, default=defaults.report)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    if not Path(args.model).is_file():  # before reading any image: the cheap check first
        raise StageError(f"{args.model}: no trained model; run the pipeline first (make pipeline)")
    report = export(cfg, ExportFiles(args.model, args.split, args.images, args.out_dir, args.report))
    log.info("offered: %s (mirror %s); figures in %s", ", ".join(report["offered"]) or "none",
             "on" if cfg.inference.mirror else "off", args.report)


if __name__ == "__main__":
    sys.exit(run_stage(main))
