"""The one configuration source: ``params.yaml`` read into frozen dataclasses.

Any key can be overridden for one run with dotted ``key=value`` pairs, the way
``dvc exp run -S train.lr=0.01`` does, e.g. ``load_config(overrides=["train.model=seed_cnn"])``.
An unknown key or a value of the wrong type is refused in one line naming the key and what it
may be. The resolved config (``to_dict``) is saved with every checkpoint and model.
"""

from __future__ import annotations

import copy
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neu_model.core.paths import PARAMS_FILE
from neu_model.core.schema import ConfigError, build, plain

DATA_SOURCE_ENV = "NEU_DATA_SOURCE"
BOXES_SOURCE_ENV = "NEU_BOXES_SOURCE"  # overrides data.boxes, as NEU_DATA_SOURCE data.source

# Canonical class order: the model's output columns, everywhere.
CLASSES: tuple[str, ...] = ("Cr", "In", "Pa", "PS", "RS", "Sc")
CLASS_NAMES: dict[str, str] = {"Cr": "crazing", "In": "inclusion", "Pa": "patches", "PS": "pitted surface",
                               "RS": "rolled-in scale", "Sc": "scratches"}
# The unknown-input scores of neu_model.inference.unknown (here: loading params needs no torch).
UNKNOWN_METHODS = ("msp", "energy", "maxlogit", "mahalanobis", "knn", "layers")
# Folder and NEU-DET spellings of the classes (``crazing/``, ``rolled-in_scale_12.xml``), lower case.
FOLDER_CLASSES: dict[str, str] = {"crazing": "Cr", "inclusion": "In", "patches": "Pa", "pitted": "PS",
                                  "pitted_surface": "PS", "rolled": "RS", "rolled_in_scale": "RS", "scratches": "Sc"}




@dataclass(frozen=True)
class DataConfig:
    source: str
    classes: tuple[str, ...]
    expected_per_class: int | None  # None: any count ("any" in params.yaml)
    checksums: str
    image_size: int
    boxes: str | None = None  # NEU-DET boxes for the localisation figures (neu_model.data.boxes); None: none
    labels: str | None = None  # the plant's reviewed tiles (neu_model.data.labels), beside the source; None: none


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float
    val_fraction: float


@dataclass(frozen=True)
class Recipe:
    """How one model is trained."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    loss: str
    schedule: str
    warmup_epochs: int
    label_smoothing: float
    augment: str
    turn_probability: float  # share of training images turned by 90 degrees
    roll_mark_share: float  # share of training images given faint lines along the rolling direction
    shuffle: bool
    ema_decay: float  # exponential moving average of the weights per step; 0 = off
    # The model constructor's keyword arguments (neu_model.model.networks.build_model), read-only, lists
    # as tuples; empty: the constructor's defaults.
    arch: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))

    def __post_init__(self) -> None:
        arch = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.arch or {}).items()}
        object.__setattr__(self, "arch", types.MappingProxyType(arch))


@dataclass(frozen=True)
class TrainConfig:
    model: str
    device: str
    num_threads: int
    recipes: Mapping[str, Recipe]
    # Several processes (torchrun): batch statistics over all ranks' images (CUDA only); False: per rank.
    sync_batchnorm: bool = False
    # Above this size (train + val images as uint8) the images are memory-mapped from a packed file.
    memory_budget_mb: int = 2048

    @property
    def recipe(self) -> Recipe:
        """The recipe of the selected model."""
        return self.recipes[self.model]


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int
    robustness: bool


@dataclass(frozen=True)
class ReviewConfig:
    below_confidence: float  # a prediction less confident than this is flagged for a person


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str
    accuracy_floor: float
    min_improvement: float


@dataclass(frozen=True)
class InferenceConfig:
    mirror: bool  # average each image's class probabilities with its left-right mirror image's


@dataclass(frozen=True)
class UnknownConfig:
    method: str  # msp, energy, maxlogit, mahalanobis or knn (neu_model.inference.unknown)
    flag_share: float  # the threshold flags this share of the validation part
    k: int  # knn: the k-th nearest training feature


@dataclass(frozen=True)
class RetrainConfig:
    min_new_labels: int  # labelled images not yet in the training data that a labels commit needs to retrain
    within_hours: float  # new labels count when labelled within this window (neu_model.ops.label_trigger)


@dataclass(frozen=True)
class ExportConfig:
    tolerance: float  # largest probability difference from PyTorch of an fp32 variant
    max_accuracy_images: int  # test images a bf16 / int8 variant may be apart from fp32
    max_robustness_points: float  # corruption-suite mean accuracy points apart from fp32
    calibration_images: int  # training images that calibrate the int8 ranges
    batch_size: int


@dataclass(frozen=True)
class Config:
    seed: int
    data: DataConfig
    split: SplitConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    review: ReviewConfig
    mlflow: MlflowConfig
    register: RegisterConfig
    inference: InferenceConfig
    unknown: UnknownConfig
    export: ExportConfig
    retrain: RetrainConfig
    # the locate knobs as params.yaml writes them; neu_model.localisation.methods.params_from_dict checks them
    locate: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (saved in checkpoints, logged as params)."""
        return plain(self)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted ``key=value`` overrides applied.

    Values are parsed as YAML, so ``train.recipes.defectnet.epochs=3`` gives an int and
    ``data.expected_per_class=any`` a string. A key must already exist, so a typo fails.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. train.model=seed_cnn")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: no section {part!r} in params.yaml; "
                                  f"keys there: {', '.join(node)}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: no key {key!r} in params.yaml; check the spelling; "
                              f"keys there: {', '.join(map(str, node)) or 'none'}")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a Config from the params mapping.

    Raises:
        ConfigError: an unknown or missing key, a value of the wrong type or out of range; one
            line naming the key and what it may be.
    """
    data = raw.get("data")
    if isinstance(data, Mapping) and data.get("expected_per_class") == "any":
        raw = {**raw, "data": {**data, "expected_per_class": None}}
    cfg = build(Config, raw, "")
    if cfg.train.model not in cfg.train.recipes:
        raise ConfigError(f"train.model={cfg.train.model!r} has no recipe under train.recipes; "
                          f"choose one of {sorted(cfg.train.recipes)}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.train.device):
        raise ConfigError(f"train.device={cfg.train.device!r} is no device; use auto, cpu, cuda, cuda:N or mps")
    if not 0 < cfg.split.test_fraction < 1 or not 0 <= cfg.split.val_fraction < 1:
        raise ConfigError("split.test_fraction must be in (0, 1) and split.val_fraction in [0, 1)")
    for name, recipe in cfg.train.recipes.items():
        for key in ("turn_probability", "roll_mark_share"):
            if not 0 <= getattr(recipe, key) <= 1:
                raise ConfigError(f"train.recipes.{name}.{key}={getattr(recipe, key)} must be a share "
                                  "of the training images, in [0, 1]")
    if not isinstance(cfg.train.sync_batchnorm, bool):
        raise ConfigError(f"train.sync_batchnorm={cfg.train.sync_batchnorm!r} must be true or false")
    if type(cfg.train.memory_budget_mb) is not int or cfg.train.memory_budget_mb < 0:  # bool is no size
        raise ConfigError(f"train.memory_budget_mb={cfg.train.memory_budget_mb!r} must be a whole number of "
                          "megabytes >= 0 (0: always memory-map the images)")
    if cfg.unknown.method not in UNKNOWN_METHODS:
        raise ConfigError(f"unknown.method={cfg.unknown.method!r}: choose one of {', '.join(UNKNOWN_METHODS)}")
    if cfg.retrain.min_new_labels < 1 or cfg.retrain.within_hours <= 0:
        raise ConfigError(f"retrain.min_new_labels={cfg.retrain.min_new_labels} must be at least 1 and "
                          f"retrain.within_hours={cfg.retrain.within_hours} positive")
    if not 0 < cfg.unknown.flag_share < 1 or cfg.unknown.k < 1:
        raise ConfigError(f"unknown.flag_share={cfg.unknown.flag_share} must be in (0, 1) and unknown.k="
                          f"{cfg.unknown.k} at least 1")
    if not 0 <= cfg.review.below_confidence <= 1:
        raise ConfigError(f"review.below_confidence={cfg.review.below_confidence} must be in [0, 1] "
                          "(0 flags nothing, 1 flags everything)")
    ex = cfg.export
    if not (ex.tolerance > 0 and min(ex.max_accuracy_images, ex.max_robustness_points) >= 0
            and min(ex.calibration_images, ex.batch_size) >= 1):
        raise ConfigError(f"export: tolerance must be > 0, max_accuracy_images and max_robustness_points >= 0, "
                          f"calibration_images and batch_size >= 1; got {plain(ex)}")
    return cfg


def load_raw(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """Read the params file as a plain mapping."""
    path = Path(path)
    try:
        with path.open() as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found; run from the repository root") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections; compare it with the one in git")
    return raw


def load_config(path: Path | str = PARAMS_FILE, overrides: Sequence[str] = ()) -> Config:
    """Load ``params.yaml``, apply overrides, then ``NEU_DATA_SOURCE`` and ``NEU_BOXES_SOURCE`` if set."""
    raw = apply_overrides(load_raw(path), overrides)
    for env, key in ((DATA_SOURCE_ENV, "source"), (BOXES_SOURCE_ENV, "boxes")):
        if os.environ.get(env):
            raw["data"][key] = os.environ[env]
    return from_dict(raw)


def add_config_args(parser) -> None:
    """Add the ``--params`` and ``--set`` options every stage shares."""
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a param for this run, e.g. --set train.model=seed_cnn (repeatable)",
    )
