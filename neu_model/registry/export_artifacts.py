"""The exported files of a registered version: checked against the export report, logged with the run.

The register stage logs, under the artifact folder ``exported/`` of the version's MLflow run:
``model.pt`` (the trained network), ``model.onnx``, ``model.int8.onnx`` (only when the export
stage kept an int8 variant) and ``export.json`` (the export stage's report). A client holding only
``models:/<name>@champion`` resolves the alias to the version's run id and downloads
``exported/model.onnx`` from that run (docs/mlflow.md). The report's figures also become run
metrics, ``export_<variant>_<figure>``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from neu_model.core.files import sha256_file
from neu_model.core.paths import INT8_FILE, ONNX_FILE, TORCH_FILE
from neu_model.core.stage import StageError
from neu_model.inference.runtimes import VARIANTS

FOLDER = "exported"
REPORT_NAME = "export.json"
FIX = "rerun the export stage (dvc repro export)"
# The report's figure of each variant -> the metric's suffix.
FIGURES = {"max_prob_diff": "max_diff", "changed_predictions": "changed", "suite_changed_predictions": "suite_changed",
           "accuracy": "accuracy", "errors": "errors", "robustness_mean": "robustness_mean",
           "images_per_second": "images_per_second", "kept": "kept"}


def checked_report(report_file: Path, model_sha256: str, mirror: bool, models_dir: Path) -> dict:
    """The export report, checked to be about this model, this mirror setting and the files in ``models_dir``.

    Raises:
        StageError: the report is missing, or describes another model, mirror setting or file.
    """
    report_file = Path(report_file)
    if not report_file.is_file():
        raise StageError(f"{report_file}: not found; {FIX}")
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"{report_file}: unreadable ({exc}); {FIX}") from None
    if report.get("model_sha256") != model_sha256:
        raise StageError(f"{report_file} describes another model than the evaluated one; {FIX}")
    if report.get("mirror") is not mirror:
        raise StageError(f"{report_file} was exported with mirror averaging {report.get('mirror')}, but "
                         f"inference.mirror is {str(mirror).lower()}; {FIX}")
    for key, name in (("onnx_sha256", ONNX_FILE), ("int8_sha256", INT8_FILE)):
        path = Path(models_dir) / name
        if not path.is_file() or sha256_file(path) != report.get(key):
            raise StageError(f"{path} is not the file that {report_file} judged; {FIX}")
    return report


def keeps_int8(report: Mapping[str, Any]) -> bool:
    """Whether the export stage offered an int8 variant (and so the int8 file is published)."""
    return any(v.get("kept") and VARIANTS[n].precision == "int8"
               for n, v in report.get("variants", {}).items() if n in VARIANTS)


def metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``export_<variant>_<figure>`` of every variant the report judged (``onnx-int8`` -> ``onnx_int8``);
    ``kept`` is 1 or 0."""
    out = {}
    for name, entry in report.get("variants", {}).items():
        for figure, suffix in FIGURES.items():
            if figure in entry:
                out[f"export_{name.replace('-', '_')}_{suffix}"] = float(entry[figure])
    return out


def version_tags(report: Mapping[str, Any]) -> dict[str, str]:
    """What a version says of its exported files: the ONNX file's sha256 and the variants offered."""
    return {"export.onnx_sha256": report["onnx_sha256"], "export.offered": ",".join(report.get("offered", []))}


def log_exported(run, report_file: Path, report: Mapping[str, Any], models_dir: Path, model_file: Path) -> list[str]:
    """Log the files under ``exported/`` of ``run`` and the report's figures as its metrics.

    The files are copied under their published names first, so that the folder's contents do not
    depend on where the stage found them. Returns the names logged.
    """
    files = {TORCH_FILE: Path(model_file), ONNX_FILE: Path(models_dir) / ONNX_FILE, REPORT_NAME: Path(report_file)}
    if keeps_int8(report):
        files[INT8_FILE] = Path(models_dir) / INT8_FILE
    with tempfile.TemporaryDirectory(prefix="neu-exported-") as tmp:
        for name, path in files.items():
            shutil.copyfile(path, Path(tmp) / name)
        run.client.log_artifacts(run.run_id, tmp, FOLDER)
    run.log_metrics(metrics(report))
    return sorted(files)
