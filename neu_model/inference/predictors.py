"""The one interface every model runs behind, and what checks it; no torch is imported here.

A ``Predictor`` has MLflow's pyfunc contract: ``predict(batch) -> probabilities``, float32
images (N, 1, H, W) with pixels in [0, 1] in, (N, 6) class probabilities in ``CLASSES`` order
out. The torch predictor (``torch_model.TorchPredictor``), ONNX Runtime and OpenVINO
(``runtimes``) and a registry's pyfunc model all have it, so a caller never asks which runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from neu_model.core.config import CLASSES
from neu_model.core.stage import StageError


class Predictor(Protocol):
    """Float32 (N, 1, H, W) in [0, 1] in, (N, classes) probabilities out."""

    def predict(self, batch: np.ndarray) -> Any: ...


def check_batch(batch: np.ndarray) -> np.ndarray:
    """``batch`` as a C-contiguous float32 (N, 1, H, W) array; any other shape is an error."""
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1] != 1:
        raise ValueError(f"input of shape {batch.shape}: expected float32 (N, 1, H, W) grayscale in [0, 1]")
    return batch


def check_probabilities(probs: Any, n: int) -> np.ndarray:
    """A model's answer for ``n`` images as a float32 (n, classes) array; a registered pyfunc's two
    unknown-input columns after the classes (``registry.mlflow_model.CONTRACT``) are dropped.

    Raises:
        StageError: the model answered with another shape.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape == (n, len(CLASSES) + 2):
        probs = probs[:, :len(CLASSES)]
    if probs.shape != (n, len(CLASSES)):
        raise StageError(f"the model returned shape {probs.shape}, expected ({n}, {len(CLASSES)}) "
                         f"probabilities in class order {', '.join(CLASSES)}")
    return probs


def probabilities(predictor: Predictor, batch: np.ndarray) -> np.ndarray:
    """``predictor``'s class probabilities for float32 images (N, 1, H, W), checked for shape."""
    return check_probabilities(predictor.predict(batch), len(batch))


def scored_probabilities(predictor: Predictor, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Checked probabilities and, where ``predictor`` scores unknown input (``predict_scored``), the
    unknown score of each image; None for one that does not (a pyfunc model, a file without the
    statistics). A non-finite score (an input no network reads) counts as the most unknown."""
    if hasattr(predictor, "predict_scored"):
        probs, scores = predictor.predict_scored(batch)
    else:
        probs, scores = predictor.predict(batch), None
        wide = np.asarray(probs)
        if wide.shape == (len(batch), len(CLASSES) + 2):  # a registered pyfunc with the unknown columns
            scores = wide[:, len(CLASSES)]
    probs = check_probabilities(probs, len(batch))
    if scores is None:
        return probs, None
    scores = np.asarray(scores, np.float32).reshape(len(batch))
    return probs, np.where(np.isfinite(scores), scores, np.float32(np.inf))


def predict_batched(predict_batch: Callable[[Any], Any], items: Any, batch_size: int = 64) -> Any:
    """``predict_batch`` over consecutive slices of ``items``, concatenated.

    Batches bound the memory of the float32 copies: 1,800 images at once would be 290 MB.

    Args:
        predict_batch: one slice of ``items`` to a (n, classes) array or CPU tensor.
        items: images (an array or tensor) or files, anything that slices.

    Returns:
        (len(items), classes), a tensor when ``predict_batch`` returns tensors; a float32 (0,
        classes) array for no items.
    """
    out = [predict_batch(items[i: i + batch_size]) for i in range(0, len(items), batch_size)]
    if not out:
        return np.empty((0, len(CLASSES)), np.float32)
    if isinstance(out[0], np.ndarray):
        return np.concatenate(out)
    import torch

    return torch.cat(out)


def chunks(batch: np.ndarray | Sequence, size: int) -> list:
    """``batch`` cut into consecutive parts of ``size`` (the last may be shorter)."""
    return [batch[i: i + size] for i in range(0, len(batch), size)]
