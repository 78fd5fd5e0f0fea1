"""The evaluate stage's unknown-input part: how the model's flag separates NEU steel from the rest.

On the test images (steel), the non-steel sets of ``neu_model.data.foreign`` derived from them
and the generated ones, and the test images under the robustness suite (steel a camera
degraded: they should mostly not be unknown): AUROC, FPR@95 and the share flagged at the
model's own threshold, per set and over every non-steel tile (``unknown_metrics.set_figures``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from neu_model.data import corruptions
from neu_model.data.dataset import ImageSet, to_float
from neu_model.data.foreign import foreign_sets
from neu_model.evaluation.unknown_metrics import set_figures
from neu_model.inference.unknown import UnknownScorer, network_outputs

SKIPPED = {"skipped": "the model carries no unknown-input statistics: retrain it (dvc repro train)"}


def scores_of(net: nn.Module, scorer: UnknownScorer, images: torch.Tensor | np.ndarray, batch_size: int) -> np.ndarray:
    """Unknown scores of uint8 images (N, 1, H, W)."""
    with torch.no_grad():
        outputs = network_outputs(net, torch.as_tensor(images), batch_size, scorer.method == "layers")
        return scorer(*outputs).numpy()


def corrupted_flagged(net: nn.Module, scorer: UnknownScorer, images: torch.Tensor, batch_size: int) -> dict:
    """The share of ``images`` flagged under each case of the robustness suite, and their mean."""
    clean, shares = to_float(images), {}
    for name, (_, severities) in corruptions.SUITE.items():
        for severity in severities:
            corrupted = (corruptions.corrupt(clean, name, severity) * 255).round().to(torch.uint8)
            shares[f"{name} {severity:g}"] = float((scores_of(net, scorer, corrupted, batch_size)
                                                   > scorer.threshold).mean())
    return {"mean": round(float(np.mean(list(shares.values()))), 6),
            "cases": {k: round(v, 6) for k, v in shares.items()}}


def unknown_report(net: nn.Module, stats: Mapping[str, Any] | None, test: ImageSet, image_dir: Path,
                   batch_size: int = 64, robustness: bool = True) -> dict:
    """The ``unknown`` entry of metrics.json for the network ``net`` and its statistics ``stats``."""
    if not stats:
        return dict(SKIPPED)
    scorer = UnknownScorer(stats)
    steel = scores_of(net, scorer, test.images, batch_size)
    files = [(Path(image_dir) / f).read_bytes() for f in test.files]
    sets = {name: scores_of(net, scorer, images, batch_size)
            for name, images in foreign_sets(test.images.numpy(), files).items()}
    every = np.concatenate(list(sets.values()))
    overall = set_figures(steel, every, scorer.threshold)
    report = {"method": scorer.method, "threshold": round(scorer.threshold, 6),
              "threshold_on": stats.get("threshold_on", "validation"), "test_images": len(steel),
              "test_flagged_share": round(float((steel > scorer.threshold).mean()), 6),
              "non_steel_tiles": len(every), "auroc": overall["auroc"], "fpr95": round(overall["fpr95_%"] / 100, 6),
              "non_steel_flagged_share": round(overall["flagged_%"] / 100, 6),
              "sets": {name: {"tiles": len(s), **set_figures(steel, s, scorer.threshold)} for name, s in sets.items()}}
    if robustness:
        corrupted = corrupted_flagged(net, scorer, test.images, batch_size)
        report["corrupted_flagged_share"] = corrupted["mean"]
        report["corrupted_cases"] = corrupted["cases"]
    return report


def mlflow_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The report's headline figures as MLflow metrics (``unknown_*``); none when it was skipped."""
    keys = ("auroc", "fpr95", "test_flagged_share", "non_steel_flagged_share", "corrupted_flagged_share", "threshold")
    return {f"unknown_{k}": float(report[k]) for k in keys if k in report}
