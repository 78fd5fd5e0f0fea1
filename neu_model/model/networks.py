"""The model registry: ``build_model(name, **kwargs)`` over a small dict, as timm's
``create_model`` does; the keyword arguments are the architecture knobs of params.yaml
(``train.recipes.<model>.arch``).

Every model takes float32 input of shape (N, 1, 200, 200) with pixels in [0, 1] and returns
logits over ``CLASSES``; any normalisation lives inside the model, so a logged model needs no
preprocessing from its caller.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

from neu_model.core.config import CLASSES
from neu_model.model.layers import (
    Detrend,
    MaxPool2x2,
    ResidualBlock,
    Standardize,
    TrimmedPool2d,
    conv_bn,
    global_pool_layer,
    quarters,
)

WIDTHS = (8, 16, 32, 64, 128, 256)  # DefectNet's channels per stage (100x100 down to 3x3): docs/model.md
RESIDUAL_WIDTHS = (16, 24, 48, 96)


class SeedCNN(nn.Module):
    """The first public NEU-CLS model, reproduced faithfully as the reference.

    Three 5x5 convolutions (1→32→64→128), each with ReLU and 3x3 max-pool, then dense layers
    3,200 → 512 → 256 → 6. It was trained with MSE between the softmax output and one-hot
    targets; the loss applies that softmax, so this module returns logits like the others.
    """

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(c_in, c_out, 5), nn.ReLU(inplace=True), nn.MaxPool2d(3)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 5 * 5, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 256), nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


STEMS = ("trimmed", "avg")
POOLS = ("max", "avg")
FULL_RESOLUTION = ("none", "phases", "conv")


def input_stem(stem: str, standardize: bool, detrend: int = 0, standardize_scale: str = "std") -> list[nn.Module]:
    """2x downsampling (trimmed mean or plain average), removal of a polynomial surface of degree
    ``detrend`` (0: none) and per-image standardisation."""
    if stem not in STEMS:
        raise ValueError(f"stem {stem!r}: choose one of {STEMS}")
    layers: list[nn.Module] = [TrimmedPool2d() if stem == "trimmed" else nn.AvgPool2d(2)]
    if detrend:
        layers.append(Detrend(detrend))
    return layers + [Standardize(standardize_scale)] if standardize else layers


class PixelPhases(nn.Module):
    """The stem's output with the four full-resolution pixels of each 2x2 block as four more
    channels (standardised per image like the stem's output, not detrended): what the 2x
    downsampling drops, for the first convolution to use."""

    def __init__(self, stem: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        self.stem, self.norm = nn.Sequential(*stem), norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.stem(x), self.norm(torch.cat(quarters(x), 1))], 1)


class FullResolutionConv(nn.Module):
    """A 3x3 convolution of the stem's output plus a 4x4 stride-2 convolution of the
    full-resolution image (standardised per image like the stem's output): the first layer sees
    both scales at the stem's resolution."""

    def __init__(self, stem: list[nn.Module], norm: nn.Module, width: int) -> None:
        super().__init__()
        self.stem, self.norm = nn.Sequential(*stem), norm
        self.conv = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.full = nn.Conv2d(1, width, 4, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.stem(x)) + self.full(self.norm(x))


def first_stage(stem: list[nn.Module], width: int, full_resolution: str, norm: nn.Module) -> list[nn.Module]:
    """The stem and the first conv-BN-ReLU; ``full_resolution`` adds what the 2x stem drops
    (``phases``: the four pixel phases as input channels, ``conv``: a 4x4 stride-2 convolution
    of the full image), an ablation; ``none`` is the default."""
    if full_resolution == "none":
        return stem + [conv_bn(1, width)]
    if full_resolution == "phases":
        return [PixelPhases(stem, norm), conv_bn(5, width)]
    if full_resolution == "conv":
        return [FullResolutionConv(stem, norm, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    raise ValueError(f"full_resolution {full_resolution!r}: choose one of {FULL_RESOLUTION}")


def pooled_head(width: int, num_classes: int, dropout: float, global_pool: str = "avg") -> nn.Sequential:
    """Global pool, dropout, linear: the head is independent of where the defect sits."""
    pool = global_pool_layer(global_pool)
    features = width * (2 if global_pool == "catavgmax" else 1)
    return nn.Sequential(pool, nn.Flatten(), nn.Dropout(dropout), nn.Linear(features, num_classes))


class DefectNet(nn.Module):
    """The default: a plain conv / max-pool ladder, cheap enough to train in minutes on a CPU.

    The input is first downsampled 2x by a trimmed-mean pool (``stem="trimmed"``; ``"avg"`` is
    plain average pooling), flattened (``Detrend``: uneven light removed) and standardised per
    image: the defects are tens of pixels across, so 100x100 loses nothing useful, quarters the
    cost of every later layer and averages away pixel noise, while isolated dark or bright
    pixels are dropped before they can inflate the image's standard deviation. Then each stage
    is a 3x3 conv-BN-ReLU followed by a 2x2 max pool, doubling the channels as it halves the
    resolution (8 channels at 100x100 up to 256 at 3x3), so every stage costs about the same
    (2.7 M MACs). Max pooling keeps the strongest response of a small, sparse defect (a pit, an
    inclusion) where strided convolutions and average pooling dilute it; global average pooling
    makes the head position-independent.

    Args:
        num_classes: Output logits.
        widths: Channels per stage; one stage per entry, a 2x2 pool between stages.
        dropout: Before the linear layer.
        stem: ``trimmed`` or ``avg`` 2x downsampling of the input.
        standardize: Per-image standardisation after the stem.
        detrend: Degree of the polynomial surface removed after the stem (0: none, 1, 2).
        standardize_scale: ``std`` or ``mad`` (mean absolute deviation) as the divisor.
        pool: ``max`` or ``avg`` 2x2 pooling between stages.
        global_pool: ``avg``, ``avgmax`` or ``catavgmax`` before the head.
        full_resolution: ``none``, ``phases`` or ``conv``: see ``first_stage``.
    """

    def __init__(self, num_classes: int = len(CLASSES), widths: tuple[int, ...] = WIDTHS,
                 dropout: float = 0.2, stem: str = "trimmed", standardize: bool = True,
                 detrend: int = 2, standardize_scale: str = "std", pool: str = "max",
                 global_pool: str = "avg", full_resolution: str = "none") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}: choose one of {POOLS}")
        norm = Standardize(standardize_scale) if standardize else nn.Identity()
        layers = first_stage(input_stem(stem, standardize, detrend, standardize_scale), widths[0],
                             full_resolution, norm)
        for c_in, c_out in itertools.pairwise(widths):
            layers += [MaxPool2x2() if pool == "max" else nn.AvgPool2d(2), conv_bn(c_in, c_out)]
        self.features = nn.Sequential(*layers)
        self.head = pooled_head(widths[-1], num_classes, dropout, global_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResidualDefectNet(nn.Module):
    """The previous default, kept for the ablations: stride-2 convolutions, each stage followed
    by a residual block (16-24-48-96 channels, 27.9 M MACs), on the same input stem.

    Args:
        num_classes, widths, dropout, stem, standardize, detrend, standardize_scale, global_pool:
            As for ``DefectNet`` (no detrending by default).
        stem_conv: A stride-1 conv-BN-ReLU at the stem's 100x100 before the first stride-2
            convolution, so the first layer sees the full stem output.
    """

    def __init__(self, num_classes: int = len(CLASSES), widths: tuple[int, ...] = RESIDUAL_WIDTHS,
                 dropout: float = 0.2, stem: str = "trimmed", standardize: bool = True,
                 detrend: int = 0, standardize_scale: str = "std", global_pool: str = "avg",
                 stem_conv: bool = False) -> None:
        super().__init__()
        layers = input_stem(stem, standardize, detrend, standardize_scale)
        layers += [conv_bn(1, widths[0]), conv_bn(widths[0], widths[0], stride=2)] if stem_conv \
            else [conv_bn(1, widths[0], stride=2)]
        for c_in, c_out in itertools.pairwise(widths):
            layers += [conv_bn(c_in, c_out, stride=2), ResidualBlock(c_out)]
        self.features = nn.Sequential(*layers)
        self.head = pooled_head(widths[-1], num_classes, dropout, global_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed_cnn": SeedCNN,
    "defectnet": DefectNet,
    "defectnet_res": ResidualDefectNet,
}


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each batch norm that follows a convolution in a ``Sequential`` into that convolution.

    For inference only (the model must be in eval mode): the outputs are unchanged up to float
    rounding and one memory pass per layer is saved. The module is changed in place and returned.
    """
    if model.training:
        raise ValueError("fuse_batchnorm needs a model in eval mode")
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return model


def model_kwargs(name: str) -> tuple[str, ...] | None:
    """The keyword arguments the constructor of registered model ``name`` takes; None when it
    takes any (``**kwargs``: it checks them itself)."""
    params = inspect.signature(MODELS[name]).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered model by name; ``kwargs`` go to its constructor, as with timm's
    ``create_model``: ``build_model("defectnet", detrend=0)``.

    Raises:
        ValueError: an unknown name, or a keyword the constructor does not take (the message
            names the ones it takes).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    allowed = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(allowed)) if allowed is not None else []
    if unknown:
        raise ValueError(f"model {name!r} takes no argument {', '.join(unknown)}; "
                         f"its arguments are {', '.join(allowed) or 'none'}")
    return MODELS[name](**kwargs)


def count_macs(model: nn.Module, image_size: int = 200) -> int:
    """Multiply-accumulates of one forward pass on one image: every convolution and matrix
    product (``Detrend``'s too), as ``torch.utils.flop_counter`` counts them (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, 1, image_size, image_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
