"""Classification metrics from predicted and true class indices (scikit-learn's), and what a
confidence threshold for human review would flag."""

from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics

from neu_model.core.config import CLASSES

LABELS = list(range(len(CLASSES)))  # every class, also one absent from a small set


def confusion_matrix(actual: torch.Tensor, predicted: torch.Tensor, n: int = len(CLASSES)) -> torch.Tensor:
    """Counts, rows = actual class, columns = predicted class."""
    if not len(actual):  # scikit-learn refuses empty input; nothing to count
        return torch.zeros(n, n, dtype=torch.long)
    return torch.from_numpy(metrics.confusion_matrix(actual.cpu().numpy(), predicted.cpu().numpy(),
                                                     labels=list(range(n))))


def in_ps_errors(cm: torch.Tensor) -> int:
    """Inclusions called pitted surfaces and back: the confusion the first public model made."""
    i_in, i_ps = CLASSES.index("In"), CLASSES.index("PS")
    return int(cm[i_in, i_ps].item() + cm[i_ps, i_in].item())


def per_class_scores(actual: torch.Tensor, predicted: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of each class; 0 where a class is never predicted or never present."""
    if not len(actual):
        return np.zeros(len(LABELS)), np.zeros(len(LABELS)), np.zeros(len(LABELS))
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        actual.cpu().numpy(), predicted.cpu().numpy(), labels=LABELS, zero_division=0)
    return precision, recall, f1


def classification_metrics(actual: torch.Tensor, predicted: torch.Tensor) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the In<->PS confusions.

    Returns:
        ``accuracy``, ``macro_f1``, ``per_class`` {code: {precision, recall, f1, support}},
        ``errors``, ``in_ps_errors`` and ``confusion_matrix`` (rows actual, columns predicted).
    """
    cm = confusion_matrix(actual, predicted)
    precision, recall, f1 = per_class_scores(actual, predicted)
    accuracy = metrics.accuracy_score(actual.cpu().numpy(), predicted.cpu().numpy()) if len(actual) else 0.0
    return {
        "accuracy": round(float(accuracy), 6),
        "macro_f1": round(float(f1.mean()), 6),  # over all six classes, as f1_score(average="macro", labels=...)
        "errors": int(cm.sum() - cm.diag().sum()),
        "in_ps_errors": in_ps_errors(cm),
        "per_class": {
            c: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6), "support": int(cm[i].sum())}
            for i, c in enumerate(CLASSES)
        },
        "confusion_matrix": cm.tolist(),
    }


def review_metrics(actual: torch.Tensor, probs: torch.Tensor, below_confidence: float) -> dict:
    """What flagging predictions less confident than ``below_confidence`` does on a labelled set.

    A flagged image goes to a person; the rest are accepted as the model says.

    Returns:
        ``below_confidence``, ``flagged`` and ``flagged_share`` (images), ``flagged_errors``
        (model errors a person gets to see), ``accepted_errors`` and ``accepted_in_ps_errors``
        (errors nobody sees) and ``accepted_accuracy`` (1.0 when nothing is accepted).
    """
    confidence, predicted = probs.max(dim=1)
    flagged = confidence < below_confidence
    wrong = predicted != actual
    accepted = ~flagged
    n_accepted = int(accepted.sum())
    accepted_errors = int((wrong & accepted).sum())
    return {
        "below_confidence": below_confidence,
        "flagged": int(flagged.sum()),
        "flagged_share": round(flagged.float().mean().item(), 6) if len(actual) else 0.0,
        "flagged_errors": int((wrong & flagged).sum()),
        "accepted_errors": accepted_errors,
        "accepted_in_ps_errors": in_ps_errors(confusion_matrix(actual[accepted], predicted[accepted])),
        "accepted_accuracy": round(1 - accepted_errors / n_accepted, 6) if n_accepted else 1.0,
    }


def review_curve(actual: torch.Tensor, probs: torch.Tensor, thresholds: list[float]) -> list[dict]:
    """``review_metrics`` at each threshold: the trade between people's work and unseen errors."""
    keys = ("below_confidence", "flagged_share", "accepted_errors", "accepted_accuracy")
    return [{k: m[k] for k in keys} for m in (review_metrics(actual, probs, t) for t in thresholds)]
