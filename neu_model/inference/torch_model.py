"""A trained PyTorch model at inference: device, layout, the saved file, mirror averaging, the torch predictor.

``neu-predict``, ``evaluate``, ``export``, ``register`` and the MLflow model all run a network
through these, so every caller sees the same predictions. Nothing here imports the training
code, MLflow or matplotlib: a process that only classifies images loads none of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neu_model.core.paths import MODEL_FILE
from neu_model.core.stage import StageError
from neu_model.data.dataset import to_float
from neu_model.inference.predictors import check_batch, predict_batched
from neu_model.model.networks import build_model, fuse_batchnorm

UNREADABLE = "unreadable: cut short, or not written by torch.save"

__all__ = ["MirrorAverage", "ProbabilityModel", "TorchPredictor", "fuse_batchnorm", "load_torch_model",
           "load_torch_predictor", "memory_format", "predict_logits", "probability_model", "select_device"]


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
        raise StageError(f"{path}: not a model saved by neu_model.training.train ({UNREADABLE}); retrain it") from None
    try:
        model = build_model(saved["model_name"], **saved.get("model_args", {}))
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        # One line: torch lists every mismatched tensor, one per line.
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 200 else reason[:200] + " ..."
        raise StageError(f"{path}: not a model saved by neu_model.training.train ({reason}); retrain it") from None
    meta = {k: v for k, v in saved.items() if k != "state_dict"}
    return fuse_batchnorm(model.to(device).eval()), meta


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Logits for uint8 images (N, 1, H, W), computed in batches, returned on the CPU."""
    # Here rather than in load_torch_model: the model it loads is also exported to MLflow, and
    # torch.export warns on (and stores) channels-last weights.
    layout = memory_format(device)
    model.eval().to(memory_format=layout)

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return model(to_float(batch).to(device).contiguous(memory_format=layout)).float().cpu()

    return torch.as_tensor(predict_batched(logits, images, batch_size))


class TorchPredictor:
    """A network behind the ``Predictor`` contract: softmax of its logits (averaged with the mirror
    image's when ``mirror``), on ``device`` in its fastest layout, no autograd; with the unknown
    statistics of its ``model.pt`` (``meta["unknown"]``) also the unknown score of each image.

    Attributes:
        network: the bare network, batch norms folded (what Grad-CAM explains).
        model: the network with softmax (and mirror averaging).
        meta: the saved file's metadata (model name, config, unknown statistics, ...).
        unknown_threshold: scores above it are unknown; None for a file saved without statistics.
    """

    def __init__(self, network: nn.Module, device: torch.device | str = "cpu", meta: dict | None = None,
                 mirror: bool = False) -> None:
        from neu_model.inference.unknown import ScoredModel, UnknownScorer

        self.device = torch.device(device)
        self.layout, self.meta = memory_format(self.device), meta or {}
        self.network = network.eval().to(self.device, memory_format=self.layout)
        self.model = probability_model(self.network, mirror)
        stats = self.meta.get("unknown")
        self.scored = ScoredModel(self.network, UnknownScorer(stats), mirror).to(self.device) if stats else None
        self.unknown_threshold = float(stats["threshold"]) if stats else None

    def _input(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(check_batch(batch)).to(self.device).contiguous(memory_format=self.layout)

    @torch.no_grad()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.model(self._input(batch)).float().cpu().numpy()

    @torch.no_grad()
    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, unknown scores); the scores are None without statistics."""
        if self.scored is None:
            return self.predict(batch), None
        probs, scores = self.scored(self._input(batch))
        return probs.float().cpu().numpy(), scores.float().cpu().numpy()


def load_torch_predictor(path: Path = MODEL_FILE, device: str = "auto", mirror: bool = False) -> TorchPredictor:
    """A ``models/model.pt`` file as a predictor on ``device`` (``auto``: CUDA, MPS, CPU)."""
    dev = select_device(device)
    network, meta = load_torch_model(path, dev)
    return TorchPredictor(network, dev, meta, mirror)
