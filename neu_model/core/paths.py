"""Every file and folder the stages read or write, by name, relative to the checkout (the
working directory of ``dvc repro``); nothing else lives here. ``dvc.yaml`` names the same files."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: neu_model/core/paths.py
PARAMS_FILE = ROOT / "params.yaml"
DVC_FILE = ROOT / "dvc.yaml"

# data/: the source stage's fingerprint, the images, the boxes, the split
SOURCE_FILE = Path("data/source.json")  # fingerprint of the images' source
BOXES_SOURCE_FILE = Path("data/boxes_source.json")  # fingerprint of the boxes' source
LABELS_SOURCE_FILE = Path("data/labels_source.json")  # fingerprint of the plant's labelled images
RAW_DIR = Path("data/raw")
IMAGE_DIR = RAW_DIR / "NEU-CLS"
MANIFEST = RAW_DIR / "manifest.csv"
CACHE_DIR = Path("data/cache")  # downloads kept between runs
BOXES_FILE = Path("data/boxes.csv")
SPLIT_FILE = Path("data/split.csv")

# models/: file names are also those of a registered version's exported/ artifacts
TORCH_FILE = "model.pt"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MODELS_DIR = Path("models")
MODEL_FILE = MODELS_DIR / TORCH_FILE
CHECKPOINT_FILE = MODELS_DIR / "checkpoint.pt"

# reports/
REPORTS_DIR = Path("reports")
RUN_FILE = REPORTS_DIR / "run.json"  # the MLflow run of one pipeline pass
TRAIN_LOG = REPORTS_DIR / "train_log.csv"
TRAIN_METRICS = REPORTS_DIR / "train_metrics.json"
TRAIN_CURVES = REPORTS_DIR / "train_curves.png"
METRICS_FILE = REPORTS_DIR / "metrics.json"
EXPORT_REPORT = REPORTS_DIR / "export.json"
REGISTRATION_FILE = REPORTS_DIR / "registration.json"

# .dvc/tmp: per-workspace state that git and DVC ignore
LOCK_FILE = Path(".dvc/tmp/neu-workspace.lock")
RUN_PARAMS_RECORD = Path(".dvc/tmp/flow-params.json")
