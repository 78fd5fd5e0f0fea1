"""The evaluate stage's per-image predictions table (``reports/predictions.csv``).

Apart from ``neu_model.inference.predict`` so that the evaluate stage does not depend on the command's
reader, strip maps and model sources (dvc.yaml lists the modules each stage imports).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from neu_model.core.config import CLASSES


def predictions_frame(files: Sequence[str], probs: torch.Tensor, review_below: float) -> pd.DataFrame:
    """One row per whole image: file, predicted, confidence, needs_review, p_<class> for every class.

    Args:
        review_below: ``needs_review`` is true where the confidence is below this.
    """
    conf, idx = probs.max(dim=1)
    frame = pd.DataFrame({"file": list(files), "predicted": [CLASSES[i] for i in idx.tolist()],
                          "confidence": conf.numpy().round(6),
                          "needs_review": (conf < review_below).numpy()})
    for j, c in enumerate(CLASSES):
        frame[f"p_{c}"] = probs[:, j].numpy().round(6)
    return frame
