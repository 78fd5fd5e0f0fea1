"""Where the defect is: scored regions ``[x0, y0, x1, y1, score]`` per image, and how well they
match NEU-DET's boxes.

Methods (``METHODS``):

- ``whole_image``: one box over the whole image (the reference every method must beat).
- ``classical``: the original design, the image's own shadows (``neu_model.localisation.regions``).
- ``gradcam``: the predicted class's CAM map (``neu_model.localisation.cam``) cut into regions.
- ``combined``: the classical regions, each scored by its heat weighted with the CAM map raised
  to ``cam_power``: the image gives sharp extents, the model says which shadows are its class's.

The knobs of every method except ``whole_image`` are per predicted class (``LocateParams``);
the defaults (``DEFAULT_LOCATE``) were chosen on the train and validation images of the seed-0
split (``benchmarks/bench_locate.py``). Inference code: no training code, MLflow or matplotlib.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from neu_model.core.config import CLASSES, ConfigError
from neu_model.core.schema import typed
from neu_model.localisation.cam import CAM_KINDS, class_maps
from neu_model.localisation.geometry import boxes_by_file, greedy_matches, iou_matrix, points_inside
from neu_model.localisation.regions import RegionParams, classical_heat, heat_regions

METHODS = ("whole_image", "classical", "gradcam", "combined")
MODEL_METHODS = ("gradcam", "combined")  # the methods that need the model's maps


@dataclass(frozen=True)
class LocateParams:
    """A method, its CAM maps and its knobs per class (classes not listed get ``default``).

    Attributes:
        method: the method reported as the chosen one (one of ``METHODS``).
        cam_stage: the convolution stage (index into ``cam.cam_layers``) of ``combined``'s map.
        cam_kind: ``gradcam`` or ``layercam``: how ``combined``'s map is made.
        gradcam_stage: the stage of the ``gradcam`` method's map.
        gradcam_kind: how the ``gradcam`` method's map is made.
        gradcam_threshold: share of its maximum at which the ``gradcam`` method cuts its map.
    """

    method: str = "combined"
    cam_stage: int = 1
    cam_kind: str = "layercam"
    gradcam_stage: int = 4
    gradcam_kind: str = "gradcam"
    gradcam_threshold: float = 0.5
    default: RegionParams = field(default_factory=RegionParams)
    classes: Mapping[str, RegionParams] = field(default_factory=dict)

    def for_class(self, code: str) -> RegionParams:
        return self.classes.get(code, self.default)


def params_from_dict(raw: Mapping) -> LocateParams:
    """``LocateParams`` from a params.yaml-style ``locate:`` section.

    Top-level keys are the fields of ``LocateParams`` (``method``, ``cam_stage``, ...), any
    ``RegionParams`` field (the default of every class) and ``classes: {Cr: {field: value}}``.

    Raises:
        ConfigError: an unknown key or class, a value of the wrong type or out of range, an
            unknown method or map kind; one line naming the key and what it may be (a ValueError).
    """
    raw = dict(raw)
    per_class = raw.pop("classes", None) or {}
    unknown = sorted(set(raw) - {*MAP_KEYS, *KNOBS}, key=str)
    if unknown:
        raise ConfigError(f"params.yaml: unknown key locate.{unknown[0]}; check the spelling; keys under locate: "
                          f"{', '.join([*MAP_KEYS, *KNOBS, 'classes'])}")
    if not isinstance(per_class, Mapping) or set(per_class) - set(CLASSES):
        raise ConfigError(f"params.yaml: locate.classes {per_class!r}: a section per class code among {list(CLASSES)}")
    hints = typing.get_type_hints(LocateParams)
    top = {key: typed(raw.pop(key), hints[key], f"locate.{key}") for key in MAP_KEYS if key in raw}
    default = _region(raw, RegionParams(), "locate")
    params = LocateParams(**top, default=default,
                          classes={c: _region(v, default, f"locate.classes.{c}") for c, v in per_class.items()})
    for key, allowed in (("method", METHODS), ("cam_kind", CAM_KINDS), ("gradcam_kind", CAM_KINDS)):
        if getattr(params, key) not in allowed:
            raise ConfigError(f"params.yaml: locate.{key}={getattr(params, key)!r}: choose one of {', '.join(allowed)}")
    return params


def _region(values: Mapping, base: RegionParams, where: str) -> RegionParams:
    """``base`` with the knobs of ``values`` (keys and types checked) changed."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"params.yaml: {where} must be a section of key: value lines, not {values!r}")
    unknown = sorted(set(values) - set(KNOBS), key=str)
    if unknown:
        raise ConfigError(f"params.yaml: unknown key {where}.{unknown[0]}; check the spelling; "
                          f"keys under {where}: {', '.join(KNOBS)}")
    hints = typing.get_type_hints(RegionParams)
    changes = {k: typed(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:  # RegionParams's own checks: polarity, threshold and keep ranges
        raise ConfigError(f"params.yaml: {where}: {exc}") from None


MAP_KEYS = tuple(f.name for f in dataclasses.fields(LocateParams) if f.name not in ("default", "classes"))
KNOBS = tuple(f.name for f in dataclasses.fields(RegionParams))  # every class's region knobs


# Chosen by benchmarks/bench_locate.py --search on the 1,260 train and validation images of the
# seed-0 split (README of that script: the rule); the top-level knobs are every class's default.
DEFAULT_LOCATE = params_from_dict({
    "method": "combined", "cam_stage": 1, "cam_kind": "layercam",
    "gradcam_stage": 4, "gradcam_kind": "gradcam", "gradcam_threshold": 0.5,
    "polarity": "dark", "k": 1.0, "background": 12.0, "spread": [8, 4], "threshold": 0.1, "keep": 0.1,
    "max_regions": 3, "cam_power": 0.5,
    "classes": {
        "Cr": {"k": 1.5, "background": 24.0, "spread": [4, 28], "keep": 0.5, "max_regions": 3},
        "In": {"spread": [8, 4], "keep": 0.05, "max_regions": 5},
        "Pa": {"k": 0.0, "background": 24.0, "spread": [4, 4], "threshold": 0.35, "keep": 0.1, "max_regions": 4},
        "PS": {"k": 0.5, "spread": [28, 8], "keep": 0.05, "max_regions": 2},
        "RS": {"spread": [8, 4], "keep": 0.1, "max_regions": 2},
        "Sc": {"polarity": "bright", "spread": [4, 4], "keep": 0.05, "max_regions": 4},
    },
})


@dataclass(frozen=True)
class Located:
    """One image's answer: regions (n, 5) best first, the heat map they were cut from (maximum 1,
    all zero without evidence) and the class whose knobs and CAM map were used."""

    regions: np.ndarray
    heat: np.ndarray
    code: str


def _normalised(heat: np.ndarray) -> np.ndarray:
    top = float(heat.max())
    return (heat / top if top > 0 else np.zeros_like(heat)).astype(np.float32)


def locate_one(image: np.ndarray, method: str, params: LocateParams, code: str,
               cam: np.ndarray | None = None) -> Located:
    """Regions of one uint8 (H, W) image of (predicted) class ``code``; ``cam`` is needed by the model methods."""
    knobs = params.for_class(code)
    h, w = image.shape
    if method == "whole_image":
        return Located(np.array([[0.0, 0.0, w, h, 1.0]]), np.ones((h, w), np.float32), code)
    if method in MODEL_METHODS and cam is None:
        raise ValueError(f"method {method!r} needs the model's CAM maps")
    if method == "gradcam":
        return Located(heat_regions(cam, dataclasses.replace(knobs, threshold=params.gradcam_threshold)), cam, code)
    heat = classical_heat(image, knobs)
    if method == "classical":
        return Located(heat_regions(heat, knobs), _normalised(heat), code)
    if method == "combined":
        weights = np.power(np.clip(cam, 0, None), knobs.cam_power)
        return Located(heat_regions(heat, knobs, weights), _normalised(heat * weights), code)
    raise ValueError(f"unknown locate method {method!r}; choose one of {METHODS}")


def locate(images: torch.Tensor, params: LocateParams = DEFAULT_LOCATE, model: nn.Module | None = None,
           method: str | None = None, batch_size: int = 64) -> list[Located]:
    """Regions of uint8 images (N, 1, H, W) by ``method`` (default: ``params.method``).

    With a model, each image's knobs and CAM map are those of its predicted class; without one
    (``classical`` and ``whole_image`` only) every image gets ``params.default``.
    """
    method = method or params.method
    if model is None and method in MODEL_METHODS:
        raise ValueError(f"method {method!r} needs a model")
    maps, codes = _maps(images, params, model, [method], batch_size)
    return [locate_one(images[i, 0].numpy(), method, params, codes[i], maps[method][i] if method in maps else None)
            for i in range(len(images))]


def map_of(params: LocateParams, method: str) -> tuple[int, str]:
    """The (stage, kind) of the CAM map ``method`` uses."""
    return (params.gradcam_stage, params.gradcam_kind) if method == "gradcam" else (params.cam_stage, params.cam_kind)


def _maps(images: torch.Tensor, params: LocateParams, model: nn.Module | None, methods: Sequence[str],
          batch_size: int) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """The CAM maps of each model method among ``methods`` (one pass per distinct map) and the
    predicted class codes (None without a model)."""
    if model is None:
        return {}, [None] * len(images)
    computed, probs = {}, None
    for method in [m for m in methods if m in MODEL_METHODS] or ["combined"]:
        stage, kind = map_of(params, method)
        if (stage, kind) not in computed:
            maps, probs = class_maps(model, images, stage, kind=kind, batch_size=batch_size)
            computed[stage, kind] = maps.numpy()
    by_method = {m: computed[map_of(params, m)] for m in methods if m in MODEL_METHODS}
    return by_method, [CLASSES[i] for i in probs.argmax(1).tolist()]


def score_image(located: Located, boxes: np.ndarray) -> dict:
    """How one image's regions match its boxes (the boxes of its own class, pixel edges).

    - ``hit``: the top region overlaps a box with IoU >= 0.5 (box accuracy).
    - ``matched``: regions matched one-to-one to boxes at IoU >= 0.5, greedily, best region first
      (recall = matched / boxes, precision = matched / regions, summed over images).
    - ``point`` / ``point_strict``: the top region's centre lies in a box grown by 15 px / in a box
      (pointing game of a region method).
    - ``point_max`` / ``point_max_strict``: the same for the heat map's maximum (the pointing game
      of a map; for ``whole_image`` the map is flat and its first pixel is taken).
    """
    top = located.regions[0]
    cx, cy = (top[0] + top[2]) / 2, (top[1] + top[3]) / 2
    row, col = np.unravel_index(int(np.argmax(located.heat)), located.heat.shape)
    return {
        "hit": bool(iou_matrix(located.regions[:1], boxes).max(initial=0) >= 0.5),
        "matched": greedy_matches(located.regions, boxes), "regions": len(located.regions), "boxes": len(boxes),
        "point": points_inside(cx, cy, boxes), "point_strict": points_inside(cx, cy, boxes, 0),
        "point_max": points_inside(col + 0.5, row + 0.5, boxes),
        "point_max_strict": points_inside(col + 0.5, row + 0.5, boxes, 0),
    }


def localisation_figures(scores: pd.DataFrame) -> dict:
    """Box accuracy, recall, precision and pointing figures of per-image ``score_image`` rows."""
    if scores.empty:
        return {"images": 0}
    return {
        "images": len(scores), "boxes": int(scores["boxes"].sum()), "regions": int(scores["regions"].sum()),
        "box_accuracy": round(float(scores["hit"].mean()), 4),
        "recall": round(float(scores["matched"].sum() / max(scores["boxes"].sum(), 1)), 4),
        "precision": round(float(scores["matched"].sum() / max(scores["regions"].sum(), 1)), 4),
        "pointing": round(float(scores["point"].mean()), 4),
        "pointing_strict": round(float(scores["point_strict"].mean()), 4),
        "pointing_max": round(float(scores["point_max"].mean()), 4),
        "pointing_max_strict": round(float(scores["point_max_strict"].mean()), 4),
    }


def localisation_report(model: nn.Module | None, images: torch.Tensor, labels: torch.Tensor | Sequence,
                        files: Sequence[str], boxes_table: pd.DataFrame,
                        method_params: LocateParams | Mapping | None = None,
                        methods: Sequence[str] = METHODS) -> dict:
    """Localisation figures of every method, overall and per true class.

    Args:
        model: the classifier (None: only ``whole_image`` and ``classical``, knobs ``default``).
        images: uint8 (N, 1, H, W).
        labels: true classes, as indices into ``CLASSES`` or codes.
        files: NEU-CLS file names, the keys of ``boxes_table``.
        boxes_table: ``boxes.read_boxes``'s table; images without a box of their class are left out.
        method_params: ``LocateParams``, a ``locate:`` params section, or None for ``DEFAULT_LOCATE``.

    Returns:
        ``{"chosen": method, "images": n, "unannotated": m, "methods": {method: {"overall": {...},
        "classes": {code: {...}}}}}`` with the figures of ``localisation_figures``.
    """
    params = method_params if isinstance(method_params, LocateParams) else (
        params_from_dict(method_params) if method_params is not None else DEFAULT_LOCATE)
    codes = [CLASSES[int(c)] if not isinstance(c, str) else c for c in labels]
    truth = boxes_by_file(boxes_table)
    annotated = [i for i, f in enumerate(files) if f in truth]
    methods = [m for m in methods if model is not None or m not in MODEL_METHODS]
    maps, predicted = _maps(images[annotated], params, model, methods, 64)
    report: dict = {"chosen": params.method, "images": len(annotated), "unannotated": len(files) - len(annotated),
                    "methods": {}}
    for method in methods:
        rows = []
        for j, i in enumerate(annotated):
            located = locate_one(images[i, 0].numpy(), method, params, predicted[j],
                                 maps[method][j] if method in maps else None)
            rows.append({"class": codes[i], **score_image(located, truth[files[i]])})
        table = pd.DataFrame(rows)
        report["methods"][method] = {
            "overall": localisation_figures(table),
            "classes": {c: localisation_figures(table[table["class"] == c]) for c in CLASSES
                        if (table["class"] == c).any()},
        }
    return report
