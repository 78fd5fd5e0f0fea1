"""The test part's two sets, and the images on which two models can be compared fairly.

The test part holds the public set's test images (``origin`` public) and the plant's labelled
test images (``origin`` plant, ``neu_model.data.labels``). Evaluate and the register gate report
accuracy on each (``figures``): the public figure is comparable with the published protocol, the
plant figure says how the model does on the plant's own tiles.

Two models trained under the same split rule (seed and fractions, ``split_rule``) never trained
on a test image of today's split: parts never move (``neu_model.data.split``). A model trained
under another rule may have trained on some of them; ``fair_test_files`` keeps the images that
are test under both rules.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from neu_model.core.config import Config, SplitConfig
from neu_model.data.split import public_parts, split_frame

ORIGINS = ("public", "plant")


def split_rule(cfg: Config) -> str:
    """The settings an image's part depends on, as the JSON text a version's tag keeps."""
    return json.dumps({"seed": cfg.seed, "test_fraction": cfg.split.test_fraction,
                       "val_fraction": cfg.split.val_fraction}, sort_keys=True)


def origins(table: pd.DataFrame) -> pd.Series:
    """Each row's origin; a split table from before origins were kept is the public set."""
    return table["origin"] if "origin" in table else pd.Series("public", index=table.index)


def figures(table: pd.DataFrame) -> dict:
    """Accuracy on all test rows and per origin.

    Args:
        table: one row per test image with ``label``, ``predicted`` and, optionally, ``origin``.

    Returns:
        ``{"all": {...}, "public": {...}, "plant": {...}}``, each ``{"images": n, "accuracy": a}``
        with ``a`` None for no images.
    """
    correct = table["label"] == table["predicted"]
    where = origins(table)
    result = {}
    for name, mask in (("all", pd.Series(True, index=table.index)),
                       *((o, where == o) for o in ORIGINS)):
        n = int(mask.sum())
        result[name] = {"images": n, "accuracy": round(float(correct[mask].mean()), 6) if n else None}
    return result


def fair_test_files(split_table: pd.DataFrame, manifest: Callable[[], pd.DataFrame], rule_now: str,
                    rule_then: str | None, checksums: Path) -> list[str]:
    """Test files of today's split that were also test files under ``rule_then`` (another
    model's split rule; None: a model from before rules were recorded, which had today's parts
    for the public set). ``manifest`` gives the images with their sha256, read only when the
    rules differ."""
    test = split_table[split_table["split"] == "test"]
    if rule_then is None or json.loads(rule_then) == json.loads(rule_now):
        return sorted(test["file"])
    then = json.loads(rule_then)
    cfg = SplitConfig(test_fraction=then["test_fraction"], val_fraction=then["val_fraction"])
    parts = split_frame(manifest(), cfg, then["seed"], public_parts(checksums, cfg, then["seed"]))
    earlier = set(parts.loc[parts["split"] == "test", "file"])
    return sorted(f for f in test["file"] if f in earlier)
