"""The evaluate stage's localisation part: where the trained model finds the defects, scored
against NEU-DET's boxes (``data/boxes.csv``, from the boxes stage) on the test and validation images.

Writes ``reports/localisation.json`` (every method of ``neu_model.localisation.methods``, overall and per
class, on both parts) and ``reports/locate_gallery.png`` (every misclassified test image and two
of each class, with the chosen method's regions), and returns the compact summary that goes into
``reports/metrics.json`` under ``localisation``. The method neu-predict uses is
``locate.method``; a method that localises better on the validation images is pointed out (the
test part never chooses anything). Without boxes the figures are skipped, never faked; the
gallery is drawn all the same, without true boxes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from torch import nn

from neu_model.core.files import write_json
from neu_model.core.paths import BOXES_FILE
from neu_model.core.stage import StageError
from neu_model.data.dataset import ImageSet
from neu_model.data.neu_det import BOX_COLUMNS, read_boxes
from neu_model.localisation.gallery import locate_gallery
from neu_model.localisation.geometry import boxes_by_file
from neu_model.localisation.methods import METHODS, LocateParams, localisation_report

log = logging.getLogger("neu_model.evaluation.localisation")

SKIPPED = {"skipped": "no boxes: set data.boxes or NEU_BOXES_SOURCE"}
SUMMARY_KEYS = ("box_accuracy", "recall", "precision", "pointing")  # per method, in metrics.json and MLflow
REPORT_FILE, GALLERY_FILE = "localisation.json", "locate_gallery.png"


def read_box_file(path: Path | None = BOXES_FILE) -> pd.DataFrame:
    """The boxes stage's table; empty for ``None`` (no boxes).

    Raises:
        StageError: the file is missing or malformed, naming it and the fix.
    """
    if path is None:
        return pd.DataFrame(columns=BOX_COLUMNS)
    if not Path(path).is_file():
        raise StageError(f"{path}: no box table; run the boxes stage first (dvc repro boxes)")
    return read_boxes(path)


def best_method(report: Mapping) -> str:
    """The method of ``report`` with the highest box accuracy; the chosen one wins a tie, then
    the order of ``locate.METHODS``."""
    scored = report["methods"]
    order = [report["chosen"], *(m for m in METHODS if m != report["chosen"])]
    return max((m for m in order if m in scored), key=lambda m: scored[m]["overall"].get("box_accuracy", -1.0))


def split_report(model: nn.Module, data: ImageSet, table: pd.DataFrame, params: LocateParams) -> dict | None:
    """``locate.localisation_report`` of one part; None when none of its images has a box of its class."""
    truth = boxes_by_file(table)
    if not any(f in truth for f in data.files):
        return None
    return localisation_report(model, data.images, data.labels, data.files, table, params)


def metrics_entry(test: Mapping, best_on_validation: str | None) -> dict:
    """What metrics.json keeps: the chosen method, the validation's best and each method's main test figures."""
    return {"chosen": test["chosen"], "best_on_validation": best_on_validation, "images": test["images"],
            "methods": {m: {k: figures["overall"][k] for k in SUMMARY_KEYS} for m, figures in test["methods"].items()}}


def localise(model: nn.Module, test: ImageSet, val: ImageSet, table: pd.DataFrame, params: LocateParams,
             reports: Path) -> dict:
    """Score every method on ``test`` and ``val``, write the report and the gallery; returns the summary.

    Args:
        model: the trained classifier (its CAM maps drive the gradcam and combined methods).
        test: the test part.
        val: the validation part (it may be empty).
        table: the boxes (``read_box_file``); empty: no figures, the gallery only.
        params: the ``locate:`` section (``locate.params_from_dict``).
        reports: the folder of ``localisation.json`` and ``locate_gallery.png``.

    Returns:
        ``{"chosen", "best_on_validation", "images", "methods": {method: {box_accuracy, recall,
        precision, pointing}}}`` for the test part, or ``SKIPPED`` when no test image has boxes.
    """
    start = time.perf_counter()
    shown = locate_gallery(model, test.images, test.labels, test.files, table, reports / GALLERY_FILE, params)
    test_report = split_report(model, test, table, params) if len(table) else None
    if test_report is None:
        if len(table):
            log.warning("no test image has a box of its class in the box table: localisation metrics skipped")
        write_json(reports / REPORT_FILE, SKIPPED)
        log.info("localisation: %s; gallery of %d test images", SKIPPED["skipped"], len(shown))
        return dict(SKIPPED)
    val_report = split_report(model, val, table, params)
    best = best_method(val_report) if val_report else None
    if best is not None and best != params.method:
        figures = val_report["methods"]
        log.warning("locate.method is %s, but %s finds more boxes on the validation images (box accuracy %.3f "
                    "against %.3f); consider locate.method=%s", params.method, best,
                    figures[best]["overall"]["box_accuracy"], figures[params.method]["overall"]["box_accuracy"], best)
    write_json(reports / REPORT_FILE, {
        "chosen": params.method, "best_on_validation": best,
        "rule": "the chosen method is locate.method; best_on_validation: the highest box accuracy on the "
                "validation images (the test images never choose)",
        "test": test_report, "validation": val_report or {"skipped": "no validation image has boxes of its class"}})
    result = metrics_entry(test_report, best)
    chosen = result["methods"][params.method]
    log.info("localisation (%s) on %d test images: box accuracy %.3f, recall %.3f, precision %.3f, pointing "
             "%.3f; gallery of %d images; %.1fs", params.method, result["images"], chosen["box_accuracy"],
             chosen["recall"], chosen["precision"], chosen["pointing"], len(shown), time.perf_counter() - start)
    return result


def mlflow_metrics(result: Mapping) -> dict[str, float]:
    """The summary as flat MLflow metrics: ``loc_<method>_<figure>`` (none when skipped)."""
    return {f"loc_{method}_{key}": value for method, figures in result.get("methods", {}).items()
            for key, value in figures.items()}
