"""Unknown input: how unlike the training images a tile is, scored post hoc on the trained network.

Nothing is trained for it: the score comes from the network's logits or its penultimate features
(``embed``), compared with statistics of the training part (``fit_unknown``), and the
threshold is the quantile of the validation part's scores that flags ``unknown.flag_share`` of
them. Methods (docs/experiments.md, "Unknown input", has the measured choice):

- ``msp``: 1 - the largest softmax probability; ``energy``: -logsumexp(logits);
  ``maxlogit``: -max(logits);
- ``mahalanobis``: the smallest squared Mahalanobis distance of the features to a class mean,
  one covariance shared by the classes (Lee et al. 2018);
- ``knn``: 1 - the cosine similarity to the k-th nearest training feature (Sun et al. 2022);
- ``layers``: at every convolution stage, the Mahalanobis distance of the stage's mean and
  standard deviation over the image (per channel) to the class means, standardised by the
  training images' distances, summed over the stages (the feature ensemble of Lee et al. 2018,
  unweighted: nothing is fitted on non-steel images).

The score is taken on the image as given, never mirror-averaged, so one threshold serves
``inference.mirror`` on and off. ``UnknownScorer`` computes it in torch; the export stage puts
it into the ONNX graph as a second output, so every runtime scores the same. The statistics and
threshold travel in ``models/model.pt`` (``saved["unknown"]``, plain tensors and numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from neu_model.core.config import UNKNOWN_METHODS, UnknownConfig
from neu_model.data.dataset import to_float
from neu_model.model.networks import build_model, fuse_batchnorm

METHODS = UNKNOWN_METHODS
FEATURE_METHODS = ("mahalanobis", "knn")
RIDGE = 1e-3  # added to the covariance's diagonal (relative to its mean variance): a stable inverse


def as_buffer(value: Any) -> torch.Tensor:
    """A statistic as a float32 buffer of its own, contiguous: what ``torch.export`` saves whole."""
    return torch.as_tensor(value, dtype=torch.float32).contiguous().clone()


class Trunk(nn.Module):
    """The network up to its penultimate features; with ``taps``, also the mean and standard
    deviation over the image of every convolution stage's output (``layers``: low-level statistics
    a texture or a photo changes, which the last stage may average away)."""

    def __init__(self, net: nn.Module, taps: bool = False) -> None:
        super().__init__()
        for name in ("head", "classifier"):
            part = getattr(net, name, None)
            if isinstance(part, nn.Sequential) and isinstance(part[-1], nn.Linear):
                break
        else:
            raise ValueError(f"{type(net).__name__}: no head or classifier ending in a linear layer to take "
                             "features from")
        self.layers, self.rest, self.last = net.features, nn.Sequential(*part[:-1]), part[-1]
        self.tap_at = [i for i, m in enumerate(self.layers)
                       if taps and any(isinstance(c, nn.Conv2d) for c in m.modules())]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logits, penultimate features, per-stage statistics); the logits are the network's own."""
        taps = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.tap_at:
                taps.append(torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1))
        features = self.rest(x)
        return self.last(features), features, taps


class UnknownScorer(nn.Module):
    """Logits, features and per-stage statistics to one unknown score per image (higher: less like
    the training data)."""

    def __init__(self, stats: Mapping[str, Any]) -> None:
        super().__init__()
        self.method = str(stats["method"])
        self.k = int(stats.get("k", 1))
        self.threshold = float(stats["threshold"])
        for name in ("means", "precision", "bank"):
            value = stats.get(name)
            self.register_buffer(name, as_buffer(value) if value is not None else None)
        self.stages = nn.ModuleList(StageDistance(layer) for layer in stats.get("layers", []))

    def forward(self, logits: torch.Tensor, features: torch.Tensor,
                taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.method == "layers":
            return torch.stack([stage(tap) for stage, tap in zip(self.stages, taps, strict=True)]).sum(0)
        return method_scores(self.method, logits, features, self.means, self.precision, self.bank, self.k)


class StageDistance(nn.Module):
    """One stage's Mahalanobis distance, standardised by its training images' distances."""

    def __init__(self, layer: Mapping[str, Any]) -> None:
        super().__init__()
        for name in ("means", "precision"):
            self.register_buffer(name, as_buffer(layer[name]))
        self.centre, self.scale = float(layer["centre"]), float(layer["scale"])

    def forward(self, tap: torch.Tensor) -> torch.Tensor:
        return (method_scores("mahalanobis", tap, tap, self.means, self.precision) - self.centre) / self.scale


class ScoredModel(nn.Module):
    """Images to (class probabilities, unknown score): the probabilities exactly as
    ``ProbabilityModel(MirrorAverage(net))`` (or without the mirror) computes them, the score on
    the image as given; one pass through the network for both."""

    def __init__(self, net: nn.Module, scorer: UnknownScorer, mirror: bool = False) -> None:
        super().__init__()
        self.trunk = Trunk(net, taps=scorer.method == "layers")
        self.scorer, self.mirror = scorer, mirror

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        logits, features, taps = self.trunk(torch.cat([x, x.flip(-1)]) if self.mirror else x)
        score = self.scorer(logits[:n], features[:n], [tap[:n] for tap in taps])
        if self.mirror:  # as MirrorAverage: the log of the averaged probabilities
            log_probs = logits.log_softmax(dim=1)
            logits = torch.logaddexp(log_probs[:n], log_probs[n:]) - math.log(2)
        return logits.softmax(dim=1), score


def method_scores(method: str, logits: torch.Tensor, features: torch.Tensor, means: torch.Tensor | None = None,
                  precision: torch.Tensor | None = None, bank: torch.Tensor | None = None,
                  k: int = 1) -> torch.Tensor:
    """The unknown score of each image by ``method`` (see the module's docstring)."""
    if method == "msp":
        return 1 - logits.softmax(1).amax(1)
    if method == "energy":
        return -torch.logsumexp(logits, 1)
    if method == "maxlogit":
        return -logits.amax(1)
    if method == "mahalanobis":
        centred = features[:, None, :] - means[None]  # (N, C, D)
        return torch.einsum("ncd,de,nce->nc", centred, precision, centred).amin(1)
    if method == "knn":
        return 1 - torch.topk(unit_length(features) @ bank.T, k, dim=1).values[:, -1]
    raise ValueError(f"unknown.method {method!r}: choose one of {', '.join(METHODS)}")


def class_statistics(features: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    """Class means and the inverse of the covariance they share (training features); a class
    without training images has no mean (the distance is to the classes there are)."""
    present = [c for c in range(classes) if (labels == c).any()]
    means = torch.stack([features[labels == c].mean(0) for c in present])
    centred = features - means[torch.searchsorted(torch.tensor(present), labels)]
    cov = centred.T @ centred / max(len(features) - 1, 1)
    cov += torch.eye(cov.shape[0]) * RIDGE * cov.diagonal().mean().clamp_min(1e-12)
    return {"means": means, "precision": torch.linalg.inv(cov.double()).float().contiguous()}


def unit_length(features: torch.Tensor) -> torch.Tensor:
    """Features scaled to unit length (the training ones are the neighbours of ``knn``)."""
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def threshold_at(scores: torch.Tensor, flag_share: float) -> float:
    """The score above which ``flag_share`` of ``scores`` lie (their (1 - flag_share) quantile)."""
    scores = scores[torch.isfinite(scores)]  # an image no network reads is flagged whatever the threshold
    if not len(scores):
        return math.inf
    return float(torch.quantile(scores.double(), 1 - flag_share))


def fit_statistics(method: str, train_features: torch.Tensor, train_labels: torch.Tensor, classes: int,
                   k: int = 1, train_taps: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """What ``method`` needs of the training part (nothing for the logit methods)."""
    stats: dict[str, Any] = {"method": method, "k": k}
    if method == "mahalanobis":
        stats |= class_statistics(train_features, train_labels, classes)
    elif method == "knn":
        stats["bank"] = unit_length(train_features)
    elif method == "layers":
        stats["layers"] = []
        for tap in train_taps:
            layer = class_statistics(tap, train_labels, classes)
            distances = method_scores("mahalanobis", tap, tap, layer["means"], layer["precision"])
            stats["layers"].append(layer | {"centre": float(distances.mean()),
                                            "scale": float(distances.std().clamp_min(1e-12))})
    elif method not in METHODS:
        raise ValueError(f"unknown.method {method!r}: choose one of {', '.join(METHODS)}")
    return stats


@torch.no_grad()
def network_outputs(net: nn.Module, images: torch.Tensor, batch_size: int = 64,
                    taps: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(logits, features, per-stage statistics when ``taps``) of images (N, 1, H, W), in batches:
    float in [0, 1], or uint8, converted a batch at a time (the training images of a memory-mapped
    set never all at once)."""
    trunk = Trunk(net.eval(), taps)

    def batch(i: int) -> torch.Tensor:
        part = torch.as_tensor(images[i: i + batch_size])
        return to_float(part) if part.dtype == torch.uint8 else part

    parts = [trunk(batch(i)) for i in range(0, len(images), batch_size)]
    if not parts:
        return torch.empty(0, trunk.last.out_features), torch.empty(0, trunk.last.in_features), []
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            [torch.cat([p[2][s] for p in parts]) for s in range(len(parts[0][2]))])


def fit_unknown(net: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                val_images: torch.Tensor, method: str, flag_share: float, k: int = 1,
                batch_size: int = 64) -> dict[str, Any]:
    """The statistics and threshold of ``method`` for a trained ``net``, as ``model.pt`` stores them.

    Args:
        train_images, val_images: (N, 1, H, W), float in [0, 1] or uint8; an empty validation part
            sets the threshold on the training part.
        flag_share: the share of validation images the threshold flags.
    """
    taps = method == "layers"
    train_logits, train_features, train_taps = network_outputs(net, train_images, batch_size, taps)
    stats = fit_statistics(method, train_features, train_labels, train_logits.shape[1], k, train_taps)
    scorer = UnknownScorer(stats | {"threshold": math.inf})
    held_out = val_images if len(val_images) else train_images
    stats["threshold"] = threshold_at(scorer(*network_outputs(net, held_out, batch_size, taps)), flag_share)
    stats["flag_share"] = flag_share
    stats["threshold_on"] = "validation" if len(val_images) else "training"
    return stats


def fit_for_weights(model_name: str, model_args: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                    train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
                    settings: UnknownConfig, batch_size: int = 64) -> dict[str, Any]:
    """``fit_unknown`` for weights as the train stage saves them, on uint8 images, on the CPU: the
    network is rebuilt and its batch norms folded, as every inference path runs it."""
    net = build_model(model_name, **model_args)
    net.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()})
    net = fuse_batchnorm(net.eval())
    return fit_unknown(net, train_images.cpu(), train_labels.cpu(), val_images.cpu(), settings.method,
                       settings.flag_share, settings.k, batch_size)
