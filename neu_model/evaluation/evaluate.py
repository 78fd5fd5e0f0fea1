"""Stage ``evaluate``: score the trained model on the test part, clean and corrupted.

Writes ``reports/metrics.json`` (accuracy, macro_f1, per_class, review, robustness; ``test_sets``:
accuracy on the public test images and on the plant's labelled ones, ``neu_model.data.test_sets``), the
confusion matrix as ``reports/confusion.json`` (DVC's confusion template) and
``reports/confusion.png``, a gallery of every misclassified test image
(``reports/misclassified.png``), per-image predictions (``reports/predictions.csv``), what each
review threshold would flag (``reports/review_curve.csv``) and per-corruption accuracy and
review figures (``reports/robustness.csv``). Where the model finds the defects, scored against
NEU-DET's boxes (``data/boxes.csv``, from the boxes stage) on the test and validation images:
``reports/localisation.json``, a summary under ``localisation`` in metrics.json, and
``reports/locate_gallery.png`` (``neu_model.evaluation.localisation``).

    python -m neu_model.evaluation.evaluate
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from neu_model.core import paths, provenance
from neu_model.core.config import CLASSES, Config, add_config_args, load_config
from neu_model.core.files import write_csv, write_json
from neu_model.core.paths import BOXES_FILE, MODEL_FILE, REPORTS_DIR, SPLIT_FILE
from neu_model.core.stage import run_stage
from neu_model.data import corruptions
from neu_model.data.dataset import ImageSet, load_split, read_split, to_float
from neu_model.data.test_sets import ORIGINS, figures, origins
from neu_model.evaluation.figures import confusion_figure, gallery_figure
from neu_model.evaluation.localisation import GALLERY_FILE, REPORT_FILE, localise, mlflow_metrics, read_box_file
from neu_model.evaluation.metrics import classification_metrics, review_curve, review_metrics
from neu_model.evaluation.prediction_table import predictions_frame
from neu_model.evaluation.unknown_report import mlflow_metrics as unknown_metrics
from neu_model.evaluation.unknown_report import unknown_report
from neu_model.inference.torch_model import MirrorAverage, load_torch_model, predict_logits, select_device
from neu_model.localisation.methods import params_from_dict
from neu_model.registry import tracking
from neu_model.registry.register import test_split_id

log = logging.getLogger("neu_model.evaluation.evaluate")

# The review thresholds of reports/review_curve.csv; the top class of six is never below 1/6.
CURVE_THRESHOLDS = [round(0.2 + 0.05 * i, 2) for i in range(16)]
ROBUSTNESS_COLUMNS = ["case", "corruption", "severity", "accuracy", "flagged_share", "accepted_errors"]


def robustness(model: nn.Module, data: ImageSet, device: torch.device, batch_size: int,
               review_below: float) -> pd.DataFrame:
    """Accuracy on each fixed corruption and severity of the suite, and what review flags there.

    A degraded camera should send more images to a person rather than make silent errors:
    ``flagged_share`` and ``accepted_errors`` say whether it does.
    """
    clean = to_float(data.images)
    rows = []
    for name, (_, severities) in corruptions.SUITE.items():
        for severity in severities:
            corrupted = (corruptions.corrupt(clean, name, severity) * 255).round().to(torch.uint8)
            probs = predict_logits(model, corrupted, device, batch_size).softmax(1)
            review = review_metrics(data.labels, probs, review_below)
            rows.append({"case": f"{name} {severity:g}", "corruption": name, "severity": severity,
                         "accuracy": round((probs.argmax(1) == data.labels).float().mean().item(), 6),
                         "flagged_share": review["flagged_share"], "accepted_errors": review["accepted_errors"]})
    return pd.DataFrame(rows, columns=ROBUSTNESS_COLUMNS)


def log_evaluation(run: tracking.Run | None, metrics: Mapping[str, Any], reports: Path, split_file: Path) -> None:
    """Log test metrics, per-class table and evaluation figures into the training run.

    The run is tagged with the test split's id, which the register stage checks before it
    trusts ``metrics.json``.
    """
    if run is None:
        return
    values = {f"test_{k}": metrics[k] for k in ("accuracy", "macro_f1", "errors", "in_ps_errors")}
    values["inference_images_per_second"] = metrics["inference_images_per_second"]
    for origin, figure in metrics.get("test_sets", {}).items():
        values[f"test_images_{origin}"] = figure["images"]
        if figure["accuracy"] is not None:
            values[f"test_accuracy_{origin}"] = figure["accuracy"]
    for code, row in metrics["per_class"].items():
        values |= {f"test_{k}_{code}": row[k] for k in ("precision", "recall", "f1")}
    values |= {f"robustness_{k}": v for k, v in metrics.get("robustness", {}).items()}
    values |= {f"review_{k}": v for k, v in metrics.get("review", {}).items()}
    values |= mlflow_metrics(metrics.get("localisation", {}))
    values |= unknown_metrics(metrics.get("unknown", {}))
    run.log_metrics(values)
    table = pd.DataFrame([{"class": c} | row for c, row in metrics["per_class"].items()])
    # log_dict, not log_table: log_table appends to an existing file, so re-evaluating the same
    # run (evaluate's code changed, training did not) would duplicate every row.
    run.client.log_dict(run.run_id, {"columns": list(table.columns), "data": table.values.tolist()},
                        "evaluation/per_class.json")
    split_id = test_split_id(split_file, run.record.get("dataset_version", provenance.UNKNOWN))
    run.set_tags({"test_split_id": split_id, "n_test": metrics["n_test"]})
    for name in ("confusion.png", "misclassified.png", GALLERY_FILE):
        run.log_artifact(reports / name, "figures")
    for name in ("metrics.json", "robustness.csv", "predictions.csv", "review_curve.csv", REPORT_FILE):
        run.log_artifact(reports / name, "evaluation")


def evaluate(cfg: Config, model_file: Path = MODEL_FILE, split_file: Path = SPLIT_FILE,
             image_dir: Path | None = None, reports: Path = REPORTS_DIR, boxes_file: Path | None = None) -> dict:
    """Evaluate on the test part and write every report; returns the metrics dict.

    ``boxes_file`` is the boxes stage's table (the stage passes ``data/boxes.csv``); None: no
    boxes, the localisation figures are skipped and say so.
    """
    locate_params, boxes = params_from_dict(cfg.locate), read_box_file(boxes_file)  # bad input fails before any work
    run = tracking.open_run(reports / paths.RUN_FILE.name, model_file)  # checks the store before any work
    device = select_device(cfg.train.device)
    net, meta = load_torch_model(model_file, device)
    model = MirrorAverage(net) if cfg.inference.mirror else net  # as the registered and exported models run it
    images = {"image_dir": image_dir} if image_dir else {}
    test = load_split("test", split_file, **images)
    start = time.perf_counter()
    probs = predict_logits(model, test.images, device, cfg.evaluate.batch_size).softmax(1)
    seconds = time.perf_counter() - start
    predicted = probs.argmax(1)
    metrics = classification_metrics(test.labels, predicted)
    metrics |= {"n_test": len(test), "model": meta["model_name"],
                "inference_images_per_second": round(len(test) / max(seconds, 1e-9), 1),
                "review": review_metrics(test.labels, probs, cfg.review.below_confidence)}

    frame = predictions_frame(test.files, probs, cfg.review.below_confidence)
    frame.insert(1, "label", [CLASSES[i] for i in test.labels.tolist()])
    split_table = read_split(split_file)
    frame.insert(2, "origin", frame["file"].map(dict(zip(split_table["file"], origins(split_table), strict=True))))
    sets = figures(frame)
    metrics["test_sets"] = {name: sets[name] for name in ORIGINS}  # the public figure and the plant's
    write_csv(frame, reports / "predictions.csv")
    write_csv(pd.DataFrame(review_curve(test.labels, probs, CURVE_THRESHOLDS)), reports / "review_curve.csv")
    write_json(reports / "confusion.json",
               [{"actual": a, "predicted": p} for a, p in zip(frame["label"], frame["predicted"], strict=False)])
    confusion_figure(metrics["confusion_matrix"], reports / "confusion.png",
                     f"{meta['model_name']}: test accuracy {metrics['accuracy']:.2%}")
    wrong = (predicted != test.labels).nonzero().flatten()
    titles = [f"{test.files[i]}\ntrue {CLASSES[test.labels[i]]} → {CLASSES[predicted[i]]} ({probs[i].max():.2f})"
              for i in wrong.tolist()]
    gallery_figure(test.images[wrong], titles, reports / "misclassified.png")

    # Written either way: dvc.yaml declares the file, so a run without the suite leaves it empty.
    table = (robustness(model, test, device, cfg.evaluate.batch_size, cfg.review.below_confidence)
             if cfg.evaluate.robustness else pd.DataFrame(columns=ROBUSTNESS_COLUMNS))
    write_csv(table, reports / "robustness.csv")
    if cfg.evaluate.robustness:
        metrics["robustness"] = {"mean_accuracy": round(table["accuracy"].mean(), 6)} | {
            name: round(group["accuracy"].mean(), 6) for name, group in table.groupby("corruption", sort=False)}
        n_images = len(test) * len(table)
        metrics["review"] |= {"suite_flagged_share": round(table["flagged_share"].mean(), 6),
                              "suite_accepted_error_rate": round(table["accepted_errors"].sum() / n_images, 6)}
    metrics["localisation"] = localise(net, test, load_split("val", split_file, **images), boxes, locate_params,
                                       reports)
    metrics["unknown"] = unknown_report(net.cpu(), meta.get("unknown"), test, image_dir or paths.IMAGE_DIR,
                                        cfg.evaluate.batch_size, cfg.evaluate.robustness)
    write_json(reports / "metrics.json", metrics)
    log_evaluation(run, metrics, reports, split_file)
    return metrics


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--model", type=Path, default=MODEL_FILE)
    parser.add_argument("--boxes", type=Path, default=BOXES_FILE,
                        help=f"the boxes stage's table (default: {BOXES_FILE})")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    m = evaluate(cfg, args.model, boxes_file=args.boxes)
    r = m["review"]
    log.info("test accuracy %.4f  macro-F1 %.4f  errors %d (In<->PS %d)  robustness mean %s",
             m["accuracy"], m["macro_f1"], m["errors"], m["in_ps_errors"],
             m.get("robustness", {}).get("mean_accuracy", "n/a"))
    log.info("review below %.2f confidence: %d images flagged (%.2f%%), %d of the errors among them; "
             "%d errors accepted (In<->PS %d)", r["below_confidence"], r["flagged"], 100 * r["flagged_share"],
             r["flagged_errors"], r["accepted_errors"], r["accepted_in_ps_errors"])
    if "suite_flagged_share" in r:
        log.info("under the corruption suite: %.2f%% flagged, %.3f%% errors accepted",
                 100 * r["suite_flagged_share"], 100 * r["suite_accepted_error_rate"])


if __name__ == "__main__":
    sys.exit(run_stage(main))
