"""Box geometry of localisation: boxes as arrays, intersection over union, greedy matching, pointing.

Boxes are ``[x0, y0, x1, y1]`` pixel edges, 0-based (a region found on pixels ``r0..r1`` is
``[r0, r1 + 1)``); a fifth column (a score) is ignored. NEU-DET's 1-based VOC boxes (a box table of
``neu_model.data.neu_det.read_boxes``) become this form in ``boxes_by_file``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

POINTING_TOLERANCE = 15  # pixels: a map's maximum this close to a box still points at it
VOC_CORNERS = ["xmin", "ymin", "xmax", "ymax"]  # the coordinate columns of a box table (neu_model.data.neu_det)


def boxes_by_file(table: Any, own_class: bool = True) -> dict[str, np.ndarray]:
    """{NEU-CLS file: (k, 4) float array of [x0, y0, x1, y1] pixel edges}.

    Args:
        own_class: keep only boxes whose class is the image's label (the boxes localisation is scored on).
    """
    rows = table[table["box_class"] == table["label"]] if own_class else table
    edges = rows[VOC_CORNERS].to_numpy(float) - np.array([1.0, 1.0, 0.0, 0.0])
    return {f: edges[idx] for f, idx in rows.groupby("file").indices.items()}


def as_boxes(boxes: np.ndarray | Sequence) -> np.ndarray:
    """Boxes as a float (n, 4) array of [x0, y0, x1, y1]; extra columns (a score) are dropped."""
    arr = np.asarray(boxes, float)
    return np.zeros((0, 4)) if arr.size == 0 else arr.reshape(len(arr), -1)[:, :4]


def iou_matrix(a: np.ndarray | Sequence, b: np.ndarray | Sequence) -> np.ndarray:
    """Intersection over union of every box of ``a`` with every box of ``b``: an (n, m) array."""
    a, b = as_boxes(a)[:, None], as_boxes(b)[None]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def greedy_matches(regions: np.ndarray | Sequence, boxes: np.ndarray | Sequence, min_iou: float = 0.5) -> int:
    """True positives of a one-to-one greedy matching, as detection benchmarks (VOC) count them.

    Regions are taken in the order given (highest score first); each takes the unmatched box it
    overlaps most, if that overlap is at least ``min_iou``. Recall is the count over the boxes,
    precision the count over the regions.
    """
    return int(prefix_matches(regions, boxes, min_iou)[-1])


def prefix_matches(regions: np.ndarray | Sequence, boxes: np.ndarray | Sequence, min_iou: float = 0.5) -> np.ndarray:
    """``greedy_matches`` of the first 0, 1, ..., n regions: an array of n + 1 counts.

    Greedy matching never revisits a region, so one pass gives every prefix (every "keep the
    best n regions" rule) at once.
    """
    counts = np.zeros(len(regions) + 1, int)
    if len(regions) == 0 or len(boxes) == 0:
        return counts
    overlaps = iou_matrix(regions, boxes)
    free = np.ones(overlaps.shape[1], bool)
    for i, row in enumerate(overlaps):
        candidates = np.where(free & (row >= min_iou), row, -1.0)
        best = int(candidates.argmax())
        hit = candidates[best] >= 0
        free[best] &= not hit
        counts[i + 1] = counts[i] + hit
    return counts


def points_inside(x: float, y: float, boxes: np.ndarray | Sequence, tolerance: float = POINTING_TOLERANCE) -> bool:
    """Pointing game: whether the point (x, y), in pixel-edge coordinates, lies in a box grown by ``tolerance``."""
    b = as_boxes(boxes)
    return bool(((b[:, 0] - tolerance <= x) & (x <= b[:, 2] + tolerance)
                 & (b[:, 1] - tolerance <= y) & (y <= b[:, 3] + tolerance)).any())
