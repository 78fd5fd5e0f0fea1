"""What running a trained model needs, and nothing of training: device, layout, saved model, batches.

``predict``, ``score``, ``evaluate``, ``register`` and the MLflow export all run a model through
these functions, so every caller sees the same predictions. Nothing here imports the training
code, MLflow or matplotlib: a process that only classifies images loads none of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from neu_model.cli import StageError
from neu_model.config import CLASSES
from neu_model.data import to_float
from neu_model.model import build_model, fuse_batchnorm

MODEL_FILE = Path("models/model.pt")
UNREADABLE = "unreadable: cut short, or not written by torch.save"

__all__ = ["MODEL_FILE", "MirrorAverage", "Predictor", "ProbabilityModel", "fuse_batchnorm", "load_torch_model",
           "memory_format", "predict_batched", "predict_logits", "probability_model", "pyfunc_probabilities",
           "select_device"]


class Predictor(Protocol):
    """A model with MLflow's pyfunc interface: float32 (N, 1, H, W) in [0, 1] in, probabilities out."""

    def predict(self, data: np.ndarray) -> Any: ...


class ProbabilityModel(nn.Module):
    """The trained network followed by softmax: what the registry serves (probabilities, not logits)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(dim=1)


class MirrorAverage(nn.Module):
    """Test-time mirror averaging (``inference.mirror``): ``net`` run on each image and on its
    left-right mirror image, the two class probabilities averaged.

    The output is the log of the averaged probabilities: logits whose softmax is the average, so
    it stands wherever the network did (``ProbabilityModel``, ``predict_logits(...).softmax(1)``).
    The two views run as one batch of 2N: one call into the network, and every per-image step
    (standardisation, detrending) still sees one image at a time.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        log_probs = self.net(torch.cat([x, x.flip(-1)])).log_softmax(dim=1)
        # log((p + q) / 2) without leaving log space: no log(0) for a vanishing probability.
        return torch.logaddexp(log_probs[:n], log_probs[n:]) - math.log(2)


def probability_model(net: nn.Module, mirror: bool = False) -> nn.Module:
    """``net`` to probabilities, averaged over the mirror image or not, in eval mode."""
    return ProbabilityModel(MirrorAverage(net) if mirror else net).eval()


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA and CPU: oneDNN's convolutions run 1.4x faster on it for seed_cnn
    here (20 -> 28 train img/s, 2 threads); MPS gains nothing from it."""
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


def load_torch_model(path: Path = MODEL_FILE, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Load a ``models/model.pt`` file.

    The network is rebuilt from the saved ``model_name`` and ``model_args`` (constructor keyword
    arguments; files written before they were saved have none).

    Returns:
        The network in eval mode with its batch norms folded, and the file's metadata (every
        key but the weights).

    Raises:
        StageError: the file is missing or is not a model saved by the train stage.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: no trained model; run the pipeline first (make pipeline)")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - torch's own advice here (weights_only=False) would run the file's code
        raise StageError(f"{path}: not a model saved by neu_model.train ({UNREADABLE}); retrain it") from None
    try:
        model = build_model(saved["model_name"], **saved.get("model_args", {}))
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        # One line: torch lists every mismatched tensor, one per line.
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 200 else reason[:200] + " ..."
        raise StageError(f"{path}: not a model saved by neu_model.train ({reason}); retrain it") from None
    meta = {k: v for k, v in saved.items() if k != "state_dict"}
    return fuse_batchnorm(model.to(device).eval()), meta


def predict_batched(predict_batch: Callable[[Any], torch.Tensor], items: torch.Tensor | Sequence,
                    batch_size: int = 64) -> torch.Tensor:
    """``predict_batch`` over consecutive slices of ``items``, concatenated.

    Batches bound the memory of the float32 copies: 1,800 images at once would be 290 MB.

    Args:
        predict_batch: one slice of ``items`` to a (n, classes) tensor on the CPU.
        items: images (a uint8 tensor) or files, anything that slices.

    Returns:
        (len(items), classes); (0, classes) for no items.
    """
    out = [predict_batch(items[i: i + batch_size]) for i in range(0, len(items), batch_size)]
    return torch.cat(out) if out else torch.empty(0, len(CLASSES))


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Logits for uint8 images (N, 1, H, W), computed in batches, returned on the CPU."""
    # Here rather than in load_torch_model: the model it loads is also exported to MLflow, and
    # torch.export warns on (and stores) channels-last weights.
    layout = memory_format(device)
    model.eval().to(memory_format=layout)

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return model(to_float(batch).to(device).contiguous(memory_format=layout)).float().cpu()

    return predict_batched(logits, images, batch_size)


def pyfunc_probabilities(model: Predictor, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities of a pyfunc model for uint8 images (N, 1, H, W), as a CPU tensor.

    Raises:
        StageError: the model answers with another shape than (N, classes).
    """
    probs = np.asarray(model.predict(to_float(images).numpy()), dtype=np.float32)
    if probs.shape != (len(images), len(CLASSES)):
        raise StageError(f"the model returned shape {probs.shape}, expected ({len(images)}, {len(CLASSES)}) "
                         f"probabilities in class order {', '.join(CLASSES)}")
    return torch.from_numpy(probs)
