"""Classification metrics from predicted and true class indices (no scikit-learn needed)."""

from __future__ import annotations

import torch

from neu_model.config import CLASSES


def confusion_matrix(actual: torch.Tensor, predicted: torch.Tensor, n: int = len(CLASSES)) -> torch.Tensor:
    """Counts, rows = actual class, columns = predicted class."""
    return torch.bincount(actual * n + predicted, minlength=n * n).reshape(n, n)


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
    i_in, i_ps = CLASSES.index("In"), CLASSES.index("PS")
    return {
        "accuracy": round((tp.sum() / cm.sum().clamp(min=1)).item(), 6),
        "macro_f1": round(f1.mean().item(), 6),
        "errors": int(cm.sum().item() - tp.sum().item()),
        "in_ps_errors": int(cm[i_in, i_ps].item() + cm[i_ps, i_in].item()),
        "per_class": {
            c: {"precision": round(precision[i].item(), 6), "recall": round(recall[i].item(), 6),
                "f1": round(f1[i].item(), 6), "support": int(cm[i].sum().item())}
            for i, c in enumerate(CLASSES)
        },
        "confusion_matrix": cm.long().tolist(),
    }
