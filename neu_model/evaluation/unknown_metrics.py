"""How well an unknown score separates steel from non-steel tiles (scikit-learn's ROC tools).

Non-steel is the positive class: AUROC is the chance that a non-steel tile scores above a steel
one; FPR@95 the share of steel tiles flagged at the threshold that flags 95 % of the non-steel
ones; ``flagged_%`` the share of the set above the model's own threshold.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def set_figures(steel: np.ndarray, other: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC, FPR@95 (%) and the share of ``other`` flagged (%) for scores of steel and another set."""
    steel, other = np.asarray(steel, np.float64), np.asarray(other, np.float64)
    # A score of inf or NaN (an input no network can read) is the most unknown there is.
    top = np.finfo(np.float64).max
    steel, other = (np.where(np.isnan(s), top, np.minimum(s, top)) for s in (steel, other))
    flagged = 100 * float((other > threshold).mean()) if len(other) else float("nan")
    if not len(steel) or not len(other):
        return {"auroc": float("nan"), "fpr95_%": float("nan"), "flagged_%": flagged}
    truth = np.r_[np.zeros(len(steel)), np.ones(len(other))]
    scores = np.r_[steel, other]
    fpr, tpr, _ = roc_curve(truth, scores)
    return {"auroc": round(float(roc_auc_score(truth, scores)), 5),
            "fpr95_%": round(100 * float(fpr[np.searchsorted(tpr, 0.95, side="left")]), 3),
            "flagged_%": round(flagged, 3)}
