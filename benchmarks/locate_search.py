"""The search behind ``neu_model.localisation.methods.DEFAULT_LOCATE``: knobs chosen by their box figures on the
choosing images (the train and validation parts, or validation alone), never on the test part.

The rule, each step scored on the images of the class the knobs belong to:

1. Coarse, without the model: every combination of ``COARSE`` on ``SUBSAMPLE`` choosing images a
   class; finalists are the ``FINALISTS`` best by box accuracy (then pointing) and the
   ``FINALISTS`` best by matched - ``min_precision`` x regions at their best keep x max_regions.
2. Fine, for the classical method and for the combined method with each of ``CAM_OPTIONS``: the
   finalists on all choosing images with every ``KEEP`` x ``MAX_REGIONS``. One (knobs, keep,
   max_regions) per class maximises recall + box accuracy over all classes with precision >=
   ``min_precision`` (per class the option maximising ``matched + lam * (matched - min_precision *
   regions) + mu * hits``, over a grid of lam and mu). The best of the methods is chosen.
3. The ``gradcam`` method's map (``GRADCAM_STAGES`` x Grad-CAM or LayerCAM) and cut
   (``CAM_THRESHOLDS``): the best box accuracy.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neu_model.core.config import CLASSES
from neu_model.data.dataset import ImageSet, load_split
from neu_model.localisation.cam import class_maps
from neu_model.localisation.geometry import boxes_by_file, iou_matrix, points_inside, prefix_matches
from neu_model.localisation.methods import LocateParams, localisation_report
from neu_model.localisation.regions import RegionParams, deviations, evidence, heat_regions, spread_map

POLARITIES = {"Cr": ("dark",), "In": ("dark",), "Pa": ("dark",), "PS": ("dark", "both"), "RS": ("dark",),
              "Sc": ("bright", "both")}  # the shadows each defect casts (bright: scratches catch the light)
COARSE = {"background": (0.0, 12.0, 24.0), "k": (0.0, 0.5, 1.0, 1.5), "sy": (4.0, 8.0, 16.0, 28.0),
          "sx": (4.0, 8.0, 16.0, 28.0), "threshold": (0.1, 0.17, 0.25, 0.35, 0.5)}
KEEP = (0.0, 0.05, 0.1, 0.25, 0.5)
MAX_REGIONS = (1, 2, 3, 4, 5, 7, 10)
SUBSAMPLE, FINALISTS = 40, 4
CAM_OPTIONS = [(stage, kind, power) for stage in (1, 2, 3) for kind in ("gradcam", "layercam")
               for power in (0.25, 0.5, 1.0)]
CAM_THRESHOLDS = (0.15, 0.3, 0.5)
GRADCAM_STAGES = (2, 3, 4)  # 25, 12 and 6 pixels square: the stages of the calibration
SMOOTH = RegionParams().smooth


def _configs(code: str) -> list[RegionParams]:
    grid = itertools.product(POLARITIES[code], COARSE["background"], COARSE["k"], COARSE["sy"], COARSE["sx"],
                             COARSE["threshold"])
    return [RegionParams(polarity=p, background=b, k=k, spread=(sy, sx), threshold=t, keep=0.0, max_regions=1000)
            for p, b, k, sy, sx, t in grid]


def _score(images, files, truth, configs: list[RegionParams], weights=None) -> pd.DataFrame:
    """One row per (config, image): hit, point and, per keep x max_regions, matched (m) and regions (n)."""
    rows = []
    for j, (image, file) in enumerate(zip(images, files, strict=True)):
        boxes, cache = truth[file], {}
        for index, knobs in enumerate(configs):
            # The same classical_heat as regions.py, its stages cached: configs share them.
            z_key, e_key, h_key = knobs.background, (knobs.background, knobs.polarity, knobs.k), (
                knobs.background, knobs.polarity, knobs.k, knobs.spread)
            if z_key not in cache:
                cache[z_key] = deviations(image, SMOOTH, knobs.background)
            if e_key not in cache:
                cache[e_key] = evidence(cache[z_key], knobs.polarity, knobs.k)
            if h_key not in cache:
                cache[h_key] = spread_map(cache[e_key], knobs.spread)
            regions = heat_regions(cache[h_key], knobs, None if weights is None else weights[j])
            top = regions[0]
            matched = prefix_matches(regions, boxes)
            row = {"config": index, "hit": iou_matrix(regions[:1], boxes).max() >= 0.5,
                   "point": points_inside((top[0] + top[2]) / 2, (top[1] + top[3]) / 2, boxes)}
            for keep in KEEP:
                kept = int((regions[:, 4] >= keep * top[4]).sum())
                for most in MAX_REGIONS:
                    row[f"m{keep}_{most}"], row[f"n{keep}_{most}"] = matched[min(kept, most)], min(kept, most)
            rows.append(row)
    return pd.DataFrame(rows)


def _class_index(data: ImageSet, code: str, truth: dict, limit: int | None = None) -> list[int]:
    idx = [i for i, f in enumerate(data.files) if f.startswith(f"{code}_") and f in truth]
    return sorted(random.Random(0).sample(idx, limit)) if limit is not None and len(idx) > limit else idx


def _options(scores: pd.DataFrame, configs: list[RegionParams], code: str, boxes: int) -> pd.DataFrame:
    summed = scores.groupby("config").sum(numeric_only=True)
    rows = []
    for config, s in summed.iterrows():
        for keep, most in itertools.product(KEEP, MAX_REGIONS):
            rows.append({"class": code, "knobs": dataclasses.replace(configs[config], keep=keep, max_regions=most),
                         "hits": s["hit"], "points": s["point"], "matched": s[f"m{keep}_{most}"],
                         "regions": s[f"n{keep}_{most}"], "boxes": boxes})
    return pd.DataFrame(rows)


def choose_counts(options: pd.DataFrame, images: int, min_precision: float) -> tuple[pd.DataFrame | None, float]:
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
    return best, best_value


def finalists(data: ImageSet, truth: dict, min_precision: float, cache: Path | None) -> dict[str, list[dict]]:
    """Step 1 (model-free; stored in ``cache`` when given, and read from it when it holds this grid)."""
    key = json.dumps({"coarse": COARSE, "pol": POLARITIES, "n": SUBSAMPLE, "f": FINALISTS, "p": min_precision,
                      "files": len(data.files)})
    if cache is not None and cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())["finalists"]
    chosen = {}
    for code in CLASSES:
        configs = _configs(code)
        idx = _class_index(data, code, truth, SUBSAMPLE)
        scores = _score([data.images[i, 0].numpy() for i in idx], [data.files[i] for i in idx], truth, configs)
        by_acc = scores.groupby("config")[["hit", "point"]].mean().sort_values(["hit", "point"], ascending=False)
        summed = scores.groupby("config").sum(numeric_only=True)
        utility = pd.concat([summed[f"m{k}_{m}"] - min_precision * summed[f"n{k}_{m}"]
                             for k, m in itertools.product(KEEP, MAX_REGIONS)], axis=1).max(axis=1)
        best_utility = utility.sort_values(ascending=False).index[:FINALISTS]
        picked = list(dict.fromkeys([*by_acc.index[:FINALISTS], *best_utility]))
        chosen[code] = [dataclasses.asdict(configs[i]) for i in picked]
        print(f"# {code}: {len(configs)} coarse configs on {len(idx)} images -> {len(picked)} finalists", flush=True)
    if cache is not None:
        cache.write_text(json.dumps({"key": key, "finalists": chosen}, indent=1))
    return chosen


def fine(data: ImageSet, truth: dict, picked: dict, weights, min_precision: float) -> tuple[dict | None, float]:
    """Step 2 for one method: the per-class knobs and the objective."""
    options = []
    for code in CLASSES:
        configs = [RegionParams(**{**d, "spread": tuple(d["spread"])}) for d in picked[code]]
        idx = _class_index(data, code, truth)
        scores = _score([data.images[i, 0].numpy() for i in idx], [data.files[i] for i in idx], truth, configs,
                        None if weights is None else [weights[i] for i in idx])
        options.append(_options(scores, configs, code, sum(len(truth[data.files[i]]) for i in idx)))
    chosen, value = choose_counts(pd.concat(options, ignore_index=True), len(data.files), min_precision)
    return (None if chosen is None else dict(zip(chosen["class"], chosen["knobs"], strict=True))), value


def search(model, args, choose_on: str, min_precision: float) -> tuple[LocateParams, str, dict]:
    """All steps; returns the params, the rule in words and a params.yaml ``locate:`` section."""
    parts = ["train", "val"] if choose_on == "trainval" else ["val"]
    loaded = [load_split(p, args.split, args.images) for p in parts]
    data = ImageSet(files=sum((d.files for d in loaded), ()), images=torch.cat([d.images for d in loaded]),
                    labels=torch.cat([d.labels for d in loaded]))
    truth = boxes_by_file(args.boxes_table)
    picked = finalists(data, truth, min_precision, getattr(args, "cache", None))
    knobs, value = fine(data, truth, picked, None, min_precision)
    best = (LocateParams(method="classical", classes=knobs), value)
    print(f"# classical: objective {value:.4f}", flush=True)
    maps = {}
    for stage, kind, power in CAM_OPTIONS:
        if (stage, kind) not in maps:  # the predicted class's map, as locate uses it
            maps = {(stage, kind): class_maps(model, data.images, stage, kind=kind)[0].numpy()}
        knobs, value = fine(data, truth, picked, maps[stage, kind] ** power, min_precision)
        print(f"# combined, {kind} stage {stage} power {power}: objective {value:.4f}", flush=True)
        if knobs is not None and value > best[1]:
            classes = {c: dataclasses.replace(k, cam_power=power) for c, k in knobs.items()}
            best = (LocateParams(method="combined", cam_stage=stage, cam_kind=kind, classes=classes), value)
    params = dataclasses.replace(best[0], **choose_gradcam(model, data, truth))
    chosen = localisation_report(model, data.images, data.labels, data.files, args.boxes_table, params,
                                 [params.method])["methods"][params.method]["overall"]
    print(f"# chosen {params.method} on {choose_on}: {chosen}", flush=True)
    rule = (f"searched on {choose_on} ({len(data.files)} images): coarse grid on {SUBSAMPLE} images a class, "
            f"finalists on all; recall + box accuracy with precision >= {min_precision}; objective {best[1]:.4f}")
    return params, rule, to_section(params)


def choose_gradcam(model, data: ImageSet, truth: dict) -> dict:
    """Step 3: the ``gradcam`` method's stage, kind and cut with the best box accuracy."""
    idx = [i for i, f in enumerate(data.files) if f in truth]
    best, best_hits = {}, -1
    for stage, kind in itertools.product(GRADCAM_STAGES, ("gradcam", "layercam")):
        maps = class_maps(model, data.images[idx], stage, kind=kind)[0].numpy()
        for cut in CAM_THRESHOLDS:
            knobs = RegionParams(threshold=cut)
            hits = sum(iou_matrix(heat_regions(m, knobs)[:1], truth[data.files[i]]).max() >= 0.5
                       for m, i in zip(maps, idx, strict=True))
            if hits > best_hits:
                best, best_hits = {"gradcam_stage": stage, "gradcam_kind": kind, "gradcam_threshold": cut}, hits
    print(f"# gradcam: {best} box accuracy {best_hits / len(idx):.4f}", flush=True)
    return best


def to_section(params: LocateParams) -> dict:
    """A params.yaml ``locate:`` section for ``locate.params_from_dict``."""
    section = {f.name: getattr(params, f.name) for f in dataclasses.fields(LocateParams)
               if f.name not in ("default", "classes")}
    section["classes"] = {}
    for code, knobs in params.classes.items():
        values = dataclasses.asdict(knobs)
        values["spread"] = list(values["spread"])
        section["classes"][code] = values
    return section
