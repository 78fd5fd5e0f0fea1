"""The model registry: ``build_model(name)`` over a small dict, as timm does.

Every model takes float32 input of shape (N, 1, 200, 200) with pixels in [0, 1] and returns
logits over ``CLASSES``; any normalisation lives inside the model, so a logged model needs no
preprocessing from its caller.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from neu_model.config import CLASSES

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


def surface_basis(degree: int, h: int, w: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The polynomial terms of degree ``degree`` in x and y on an h x w grid over [-1, 1]², as
    columns of an (h*w, k) matrix. On a symmetric grid 1, x, y, x² - mean, y² - mean and xy are
    mutually orthogonal, so projecting onto each column separately is the least-squares fit."""
    ys = torch.linspace(-1, 1, h, dtype=dtype, device=device).view(h, 1).expand(h, w)
    xs = torch.linspace(-1, 1, w, dtype=dtype, device=device).view(1, w).expand(h, w)
    terms = [torch.ones_like(xs), xs, ys]
    if degree == 2:
        terms += [xs * xs - (xs * xs).mean(), ys * ys - (ys * ys).mean(), xs * ys]
    return torch.stack([t.flatten() for t in terms], 1)


class Detrend(nn.Module):
    """Subtract each image's least-squares polynomial surface in x and y (degree 1: a plane; 2: a
    quadric): the uneven light of a line camera, which per-image standardisation cannot remove.

    A gradient across the strip inflates an image's standard deviation, so standardising it
    shrinks the defect's contrast: the faint inclusions that were called pitted surfaces had the
    largest standard deviation of their class, and rank mid-class once the surface is removed.
    Large defects survive: patches are tens of pixels across, the surface spans the image.
    Two small matrix products per batch (about 3 % of the batched inference speed; the same
    projection as elementwise passes cost 9 %). The basis is precomputed for ``size`` x ``size``
    inputs and built on the fly for any other shape or dtype.
    """

    def __init__(self, degree: int = 2, size: int = 100) -> None:
        super().__init__()
        if degree not in (1, 2):
            raise ValueError(f"detrend degree {degree}: choose 1 or 2 (0 in the stem turns it off)")
        self.degree = degree
        # Not persistent: derived from degree and size, and checkpoints stay loadable across versions.
        self.register_buffer("basis", surface_basis(degree, size, size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        basis = self.basis
        if basis.shape[0] != h * w or basis.dtype != x.dtype or basis.device != x.device:
            basis = surface_basis(self.degree, h, w, x.dtype, x.device)
        flat = x.reshape(x.shape[0], -1)
        coef = flat @ (basis / (basis * basis).sum(0))
        return (flat - coef @ basis.T).reshape(x.shape)


class Standardize(nn.Module):
    """Per-image zero mean, unit variance: removes brightness and contrast shifts of the line's lighting."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-3)


def quarters(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four strided views of each 2x2 block (an odd last row or column is dropped, as pooling does)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2], x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]


class TrimmedPool2d(nn.Module):
    """2x2 downsampling by the mean of the middle two of each block's four pixels.

    Like average pooling it halves Gaussian noise's standard deviation (nearly), but one dust
    speck, dead pixel or salt grain per block is dropped instead of smeared into the result.
    Computed as (sum - max - min) / 2 over the four strided views of the input: elementwise ops
    on quarter-size tensors. (Native max-pooling of a one-channel channels-last batch took 40 %
    of the whole model's inference time.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c, d = quarters(x)
        high = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
        low = torch.minimum(torch.minimum(a, b), torch.minimum(c, d))
        return (a + b + c + d - high - low) * 0.5


class MaxPool2x2(nn.Module):
    """2x2 max pooling, the same numbers as ``nn.MaxPool2d(2)``.

    Without autograd it takes the maximum of the four strided views: 1.6x faster than the native
    op on the 8-channel 100x100 maps of a channels-last batch (6.1 vs 10.0 ms for 64 images,
    1 thread, quiet machine). With autograd it is the native op, whose backward is 4x faster
    than the views'.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return nn.functional.max_pool2d(x, 2)
        a, b, c, d = quarters(x)
        return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


STEMS = ("trimmed", "avg")


def input_stem(stem: str, standardize: bool, detrend: int = 0) -> list[nn.Module]:
    """2x downsampling (trimmed mean or plain average), removal of a polynomial surface of degree
    ``detrend`` (0: none) and per-image standardisation."""
    if stem not in STEMS:
        raise ValueError(f"stem {stem!r}: choose one of {STEMS}")
    layers: list[nn.Module] = [TrimmedPool2d() if stem == "trimmed" else nn.AvgPool2d(2)]
    if detrend:
        layers.append(Detrend(detrend))
    return layers + [Standardize()] if standardize else layers


def pooled_head(width: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Global average pool, dropout, linear: the head is independent of where the defect sits."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes))


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
    """

    def __init__(self, num_classes: int = len(CLASSES), widths: tuple[int, ...] = WIDTHS,
                 dropout: float = 0.2, stem: str = "trimmed", standardize: bool = True,
                 detrend: int = 2) -> None:
        super().__init__()
        layers = input_stem(stem, standardize, detrend)
        for i, (c_in, c_out) in enumerate(zip((1, *widths), widths)):
            layers.append(conv_bn(c_in, c_out))
            if i < len(widths) - 1:
                layers.append(MaxPool2x2())
        self.features = nn.Sequential(*layers)
        self.head = pooled_head(widths[-1], num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResidualDefectNet(nn.Module):
    """The previous default, kept for the ablations: stride-2 convolutions, each stage followed
    by a residual block (16-24-48-96 channels, 27.9 M MACs), on the same input stem."""

    def __init__(self, num_classes: int = len(CLASSES), widths: tuple[int, ...] = RESIDUAL_WIDTHS,
                 dropout: float = 0.2, stem: str = "trimmed", standardize: bool = True) -> None:
        super().__init__()
        layers = input_stem(stem, standardize) + [conv_bn(1, widths[0], stride=2)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [conv_bn(c_in, c_out, stride=2), ResidualBlock(c_out)]
        self.features = nn.Sequential(*layers)
        self.head = pooled_head(widths[-1], num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS: dict[str, Callable[[], nn.Module]] = {
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
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return model


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered model by name; ``kwargs`` go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def count_macs(model: nn.Module, image_size: int = 200) -> int:
    """Multiply-accumulates of one forward pass on one image (convolutions and linear layers)."""
    macs = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs += output[0].numel() * k
        elif isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, image_size, image_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return macs


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
