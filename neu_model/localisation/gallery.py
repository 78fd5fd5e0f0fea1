"""Figures of where the defect is: one image's heat map, regions and true boxes, and a gallery.

Kept apart from ``neu_model.localisation.methods`` so that inference never loads matplotlib. Colours: the
method's heat map in translucent colour over the grey image, NEU-DET's boxes of the image's
class in red, the top region in green, the other regions in dashed yellow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the pipeline runs on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from neu_model.core.config import CLASSES
from neu_model.core.files import atomic_path
from neu_model.localisation.geometry import boxes_by_file
from neu_model.localisation.methods import DEFAULT_LOCATE, Located, LocateParams, locate

TRUTH_COLOUR, TOP_COLOUR, OTHER_COLOUR = "red", "lime", "yellow"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def draw_overlay(ax, image: np.ndarray, located: Located, boxes: np.ndarray, title: str) -> None:
    """Draw one uint8 (H, W) image with its heat map, true boxes and regions on ``ax``."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.imshow(located.heat, cmap="jet", alpha=0.35, vmin=0, vmax=1)
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=TRUTH_COLOUR, lw=1.4))
    for rank, (x0, y0, x1, y1, _) in enumerate(located.regions):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2 if rank == 0 else 0.9,
                                   color=TOP_COLOUR if rank == 0 else OTHER_COLOUR, ls="-" if rank == 0 else "--"))
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def gallery_indices(labels: Sequence[int], predicted: Sequence[int], per_class: int = 2) -> list[int]:
    """Every misclassified image, then the first ``per_class`` correct ones of each class."""
    wrong = [i for i, (t, p) in enumerate(zip(labels, predicted, strict=True)) if t != p]
    right = [i for c in range(len(CLASSES))
             for i in [j for j, (t, p) in enumerate(zip(labels, predicted, strict=True)) if t == p == c][:per_class]]
    return wrong + right


def locate_gallery(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int],
                   files: Sequence[str], boxes_table: pd.DataFrame, path: Path,
                   params: LocateParams = DEFAULT_LOCATE, per_class: int = 2, cols: int = 6) -> list[str]:
    """Overlays of every misclassified image and ``per_class`` others of each class; returns their files.

    Titles read ``file  true->predicted``; images without boxes of their class show none.
    """
    labels = [int(c) for c in labels]
    located_all = locate(images, params, model)
    predicted = [CLASSES.index(loc.code) for loc in located_all]
    chosen = gallery_indices(labels, predicted, per_class)
    truth = boxes_by_file(boxes_table)
    rows = max(1, math.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen, strict=False):
        title = f"{files[i]}  {CLASSES[labels[i]]}->{CLASSES[predicted[i]]}"
        draw_overlay(ax, images[i, 0].numpy(), located_all[i], truth.get(files[i], np.zeros((0, 4))), title)
    _save(fig, path)
    return [files[i] for i in chosen]
