"""Classification metrics from predicted and true class indices (no scikit-learn needed), and
what a confidence threshold for human review would flag."""

from __future__ import annotations

import torch

from neu_model.config import CLASSES


def confusion_matrix(actual: torch.Tensor, predicted: torch.Tensor, n: int = len(CLASSES)) -> torch.Tensor:
    """Counts, rows = actual class, columns = predicted class."""
    return torch.bincount(actual * n + predicted, minlength=n * n).reshape(n, n)


def in_ps_errors(cm: torch.Tensor) -> int:
    """Inclusions called pitted surfaces and back: the confusion the first public model made."""
    i_in, i_ps = CLASSES.index("In"), CLASSES.index("PS")
    return int(cm[i_in, i_ps].item() + cm[i_ps, i_in].item())


def classification_metrics(actual: torch.Tensor, predicted: torch.Tensor) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the In<->PS confusions.

    Returns:
        ``accuracy``, ``macro_f1``, ``per_class`` {code: {precision, recall, f1, support}},
        ``errors``, ``in_ps_errors`` and ``confusion_matrix`` (rows actual, columns predicted).
    """
    cm = confusion_matrix(actual, predicted).double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {
        "accuracy": round((tp.sum() / cm.sum().clamp(min=1)).item(), 6),
        "macro_f1": round(f1.mean().item(), 6),
        "errors": int(cm.sum().item() - tp.sum().item()),
        "in_ps_errors": in_ps_errors(cm),
        "per_class": {
            c: {"precision": round(precision[i].item(), 6), "recall": round(recall[i].item(), 6),
                "f1": round(f1[i].item(), 6), "support": int(cm[i].sum().item())}
            for i, c in enumerate(CLASSES)
        },
        "confusion_matrix": cm.long().tolist(),
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
