"""Figures for people: confusion matrix, misclassified gallery, training curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: the pipeline runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from neu_model.core.config import CLASSES  # noqa: E402
from neu_model.core.files import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def confusion_figure(cm: Sequence[Sequence[int]], path: Path, title: str = "test confusion matrix") -> None:
    """Heat map of counts, rows actual, columns predicted."""
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.imshow(cm, cmap="Blues")
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if i == j and v else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    _save(fig, path)


def gallery_figure(images: torch.Tensor, titles: Sequence[str], path: Path, cols: int = 6) -> None:
    """Grid of uint8 images (N, 1, H, W) with a caption each; says so when there are none."""
    n = len(titles)
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=7)
    if n == 0:
        axes[0, 0].text(0, 0.5, "no misclassified test images", fontsize=12)
    _save(fig, path)


def curves_figure(history: pd.DataFrame, path: Path) -> None:
    """Train/val loss and accuracy per epoch."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    for split in ("train", "val"):
        if history[f"{split}_loss"].isna().all():  # trained without a validation part
            continue
        ax_loss.plot(history["epoch"], history[f"{split}_loss"], label=split)
        ax_acc.plot(history["epoch"], history[f"{split}_accuracy"], label=split)
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.legend()
    _save(fig, path)
