"""The search behind ``neu_model.locate.DEFAULT_LOCATE``: knobs chosen by their box figures on the
choosing images (the train and validation parts, or validation alone), never on the test part.

The rule, in three steps, each scored on the true class's images (the class a knob belongs to):

1. Coarse: every combination of ``COARSE`` for each class on a fixed subsample of
   ``SUBSAMPLE`` choosing images per class; the ``FINALISTS`` best by box accuracy (then pointing)
   go on.
2. Fine: the finalists on all choosing images, each with every ``KEEP`` x ``MAX_REGIONS``. One
   (knobs, keep, max_regions) per class is chosen to maximise recall + box accuracy over all
   classes subject to precision >= ``min_precision``: per class the option maximising
   ``matched + lam * (matched - min_precision * regions) + mu * hits``, over a grid of lam, mu.
3. Model: the combined method's CAM stage, kind and power, and the ``gradcam`` method's cut, by
   box accuracy + recall of the whole choosing set with precision >= ``min_precision``.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pandas as pd
import torch

from neu_model.boxes import boxes_by_file, greedy_matches, iou_matrix, points_inside
from neu_model.config import CLASSES
from neu_model.data import ImageSet, load_split
from neu_model.locate import LocateParams, localisation_report
from neu_model.regions import RegionParams, classical_heat, heat_regions

POLARITIES = {"Cr": ("dark",), "In": ("dark",), "Pa": ("dark",), "PS": ("dark", "both"), "RS": ("dark",),
              "Sc": ("bright", "both")}  # the shadows each defect casts (bright: scratches catch the light)
COARSE = {"background": (0.0, 12.0, 24.0), "k": (0.0, 0.5, 1.0, 1.5), "sy": (4.0, 8.0, 16.0, 28.0),
          "sx": (4.0, 8.0, 16.0, 28.0), "threshold": (0.1, 0.17, 0.25, 0.35, 0.5)}
KEEP = (0.0, 0.1, 0.25, 0.5)
MAX_REGIONS = (1, 2, 3, 5, 10)
SUBSAMPLE, FINALISTS = 40, 6
CAM_OPTIONS = [(stage, kind, power) for stage in (2, 3) for kind in ("gradcam", "layercam") for power in (0.5, 1.0)]
CAM_THRESHOLDS = (0.15, 0.3, 0.5)


def _configs(code: str) -> list[RegionParams]:
    grid = itertools.product(POLARITIES[code], COARSE["background"], COARSE["k"], COARSE["sy"], COARSE["sx"],
                             COARSE["threshold"])
    return [RegionParams(polarity=p, background=b, k=k, spread=(sy, sx), threshold=t, keep=0.0, max_regions=1000)
            for p, b, k, sy, sx, t in grid]


def _score(images, files, truth, configs: list[RegionParams]) -> pd.DataFrame:
    """One row per (config, image): hit, point and, per keep x max_regions, matched and regions."""
    rows = []
    for image, file in zip(images, files, strict=True):
        boxes, last, heat = truth[file], None, None
        for index, knobs in enumerate(configs):
            key = (knobs.polarity, knobs.background, knobs.k, knobs.spread)
            if key != last:  # configs differing only in threshold come in a row and share one heat map
                heat, last = classical_heat(image, knobs), key
            regions = heat_regions(heat, knobs)
            top = regions[0]
            row = {"config": index, "hit": iou_matrix(regions[:1], boxes).max() >= 0.5,
                   "point": points_inside((top[0] + top[2]) / 2, (top[1] + top[3]) / 2, boxes)}
            for keep in KEEP:
                kept = regions[regions[:, 4] >= keep * top[4]]
                for most in MAX_REGIONS:
                    row[f"m{keep}_{most}"] = greedy_matches(kept[:most], boxes)
                    row[f"n{keep}_{most}"] = min(len(kept), most)
            rows.append(row)
    return pd.DataFrame(rows)


def _class_images(data, code: str, truth: dict, limit: int | None = None, seed: int = 0):
    idx = [i for i, f in enumerate(data.files) if f.startswith(f"{code}_") and f in truth]
    if limit is not None and len(idx) > limit:
        idx = sorted(random.Random(seed).sample(idx, limit))
    return [data.images[i, 0].numpy() for i in idx], [data.files[i] for i in idx]


def _options(scores: pd.DataFrame, configs: list[RegionParams], code: str, boxes: int) -> pd.DataFrame:
    summed = scores.groupby("config").sum(numeric_only=True)
    rows = []
    for config, s in summed.iterrows():
        for keep, most in itertools.product(KEEP, MAX_REGIONS):
            rows.append({"class": code, "knobs": dataclasses.replace(configs[config], keep=keep, max_regions=most),
                         "hits": s["hit"], "points": s["point"], "matched": s[f"m{keep}_{most}"],
                         "regions": s[f"n{keep}_{most}"], "boxes": boxes})
    return pd.DataFrame(rows)


def choose_counts(options: pd.DataFrame, images: int, min_precision: float) -> pd.DataFrame:
    """One option per class maximising recall + box accuracy with precision >= ``min_precision``."""
    total_boxes = options.groupby("class")["boxes"].first().sum()
    best, best_value = None, -1.0
    for lam, mu in itertools.product(np.linspace(0, 10, 41), (0.0, 0.5, 1.0, 2.0, 4.0)):
        value = (options["matched"] + lam * (options["matched"] - min_precision * options["regions"])
                 + mu * options["hits"])
        chosen = options.loc[value.groupby(options["class"]).idxmax()]
        matched, regions = chosen["matched"].sum(), chosen["regions"].sum()
        objective = matched / total_boxes + chosen["hits"].sum() / images
        if matched >= min_precision * regions and objective > best_value:
            best, best_value = chosen, objective
    return best


def search_classical(data, truth: dict, min_precision: float) -> dict[str, RegionParams]:
    """Steps 1 and 2: per-class knobs of the classical regions."""
    options = []
    for code in CLASSES:
        configs = _configs(code)
        coarse = _score(*_class_images(data, code, truth, SUBSAMPLE), truth, configs)
        ranked = coarse.groupby("config")[["hit", "point"]].mean().sort_values(["hit", "point"], ascending=False)
        finalists = [configs[i] for i in ranked.index[:FINALISTS]]
        images, files = _class_images(data, code, truth)
        fine = _score(images, files, truth, finalists)
        options.append(_options(fine, finalists, code, sum(len(truth[f]) for f in files)))
        print(f"# {code}: {len(configs)} coarse configs on {SUBSAMPLE} images, {FINALISTS} on {len(files)}",
              flush=True)
    chosen = choose_counts(pd.concat(options, ignore_index=True), len(data.files), min_precision)
    return dict(zip(chosen["class"], chosen["knobs"], strict=True))


def _objective(report: dict, method: str, min_precision: float) -> float:
    o = report["methods"][method]["overall"]
    return o["box_accuracy"] + o["recall"] if o["precision"] >= min_precision else o["box_accuracy"] - 1


def search(model, args, choose_on: str, min_precision: float) -> tuple[LocateParams, str, dict]:
    """All three steps; returns the params, the rule in words and a params.yaml ``locate:`` section."""
    parts = ["train", "val"] if choose_on == "trainval" else ["val"]
    loaded = [load_split(p, args.split, args.images) for p in parts]
    data = ImageSet(files=sum((d.files for d in loaded), ()), images=torch.cat([d.images for d in loaded]),
                    labels=torch.cat([d.labels for d in loaded]))
    truth = boxes_by_file(args.boxes_table)
    per_class = search_classical(data, truth, min_precision)
    best, best_value = None, -2.0
    for stage, kind, power in CAM_OPTIONS:
        classes = {c: dataclasses.replace(k, cam_power=power) for c, k in per_class.items()}
        params = LocateParams(method="combined", cam_stage=stage, cam_kind=kind, classes=classes)
        report = localisation_report(model, data.images, data.labels, data.files, args.boxes_table, params,
                                     ["combined", "gradcam"])
        value = _objective(report, "combined", min_precision)
        print(f"# combined with {kind} stage {stage} power {power}: {report['methods']['combined']['overall']}",
              flush=True)
        if value > best_value:
            best, best_value = params, value
    cut = max(CAM_THRESHOLDS, key=lambda t: localisation_report(
        model, data.images, data.labels, data.files, args.boxes_table,
        dataclasses.replace(best, cam_threshold=t), ["gradcam"])["methods"]["gradcam"]["overall"]["box_accuracy"])
    best = dataclasses.replace(best, cam_threshold=cut)
    rule = (f"searched on {choose_on} ({len(data.files)} images): coarse grid on {SUBSAMPLE} images a class, "
            f"{FINALISTS} finalists on all, recall + box accuracy with precision >= {min_precision}")
    return best, rule, to_section(best)


def to_section(params: LocateParams) -> dict:
    """A params.yaml ``locate:`` section for ``locate.params_from_dict``."""
    section = {"method": params.method, "cam_stage": params.cam_stage, "cam_kind": params.cam_kind,
               "cam_threshold": params.cam_threshold, "classes": {}}
    for code, knobs in params.classes.items():
        values = dataclasses.asdict(knobs)
        values["spread"] = list(values["spread"])
        section["classes"][code] = values
    return section
