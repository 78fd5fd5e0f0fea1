"""The model as MLflow serves it: ``models/model.pt`` logged as a pt2 pyfunc returning probabilities
and, for a model with unknown-input statistics, the unknown score and flag (``PyfuncOutput``).

The train stage logs it as ``model``; with ``inference.mirror`` the register stage logs the
mirror-averaged twin as ``model_mirror`` into the same run and registers that one.

A plain MLflow client needs nothing from this project to use it: the signature and ``CONTRACT``
say what goes in and comes out (docs/mlflow.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from neu_model.core.config import CLASSES
from neu_model.inference.torch_model import load_torch_model, probability_model
from neu_model.inference.unknown import ScoredModel, UnknownScorer

MODEL_ARTIFACT = "model"
MIRROR_MODEL_ARTIFACT = "model_mirror"
# What a plain MLflow client gets: the contract of the logged model (README: docs/mlflow.md).
CONTRACT = (f"input: float32 array (N, 1, H, W), grayscale pixels scaled to [0, 1]; output: float32 (N, "
            f"{len(CLASSES) + 2}): columns 0-{len(CLASSES) - 1} the class probabilities in the order "
            f"{', '.join(CLASSES)}, column {len(CLASSES)} the unknown score, column {len(CLASSES) + 1} the unknown "
            f"flag (1: unlike the training images, do not trust the class; an image with a NaN or infinite "
            f"pixel scores inf); normalisation is inside the model")
OUTPUT_NAME = f"probabilities[{','.join(CLASSES)}],unknown_score,unknown"


class PyfuncOutput(nn.Module):
    """(N, 8): the six probabilities, the unknown score and the flag, as one tensor (MLflow's
    pytorch pyfunc serves one tensor); a non-finite pixel makes its image unknown (score inf)."""

    def __init__(self, net: nn.Module, stats: dict, mirror: bool) -> None:
        super().__init__()
        self.scored, self.threshold = ScoredModel(net, UnknownScorer(stats), mirror), float(stats["threshold"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, score = self.scored(x)
        readable = torch.isfinite(x).flatten(1).all(dim=1)
        score = torch.where(readable, score, torch.full_like(score, float("inf")))
        return torch.cat([probs, score[:, None], (score > self.threshold).to(probs.dtype)[:, None]], dim=1)


def model_signature(image_size: int, unknown: bool = True):
    """Tensor signature of the logged model. The input tensor is unnamed so that a bare ndarray is accepted."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    columns = len(CLASSES) + (2 if unknown else 0)
    name = OUTPUT_NAME if unknown else f"probabilities[{','.join(CLASSES)}]"
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, image_size, image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, columns), name)]),
    )


def log_model(client, experiment_id: str, run_id: str, model_file: Path, image_size: int, mirror: bool = False):
    """Log ``model_file`` (best weights) into run ``run_id`` as a pt2 pyfunc model returning probabilities.

    Args:
        mirror: average each image's probabilities with its mirror image's, inside the model.

    Returns:
        MLflow's ``ModelInfo`` of the logged model (``model_uri``, ``model_id``).
    """
    import mlflow
    import mlflow.pytorch

    net, meta = load_torch_model(model_file, "cpu")
    # A batch of 2: with 1, the export would fix N to one image.
    example = np.random.default_rng(0).random((2, 1, image_size, image_size), dtype=np.float32)
    name = MIRROR_MODEL_ARTIFACT if mirror else MODEL_ARTIFACT
    logged = client.create_logged_model(experiment_id, name, run_id, model_type="image-classifier",
                                        tags={"model": meta["model_name"], "inference.mirror": str(mirror).lower()})
    stats = meta.get("unknown")
    served = PyfuncOutput(net, stats, mirror).eval() if stats else probability_model(net, mirror)
    return mlflow.pytorch.log_model(
        served, name=name, model_id=logged.model_id, run_id=run_id,
        signature=model_signature(image_size, bool(stats)), input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                          f"numpy=={np.__version__}"],
        metadata={"classes": list(CLASSES), "contract": CONTRACT, "architecture": meta["model_name"],
                  "mirror": mirror, **({"unknown_threshold": float(stats["threshold"]),
                                        "unknown_method": stats["method"]} if stats else {})})
