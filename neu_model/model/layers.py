"""The building blocks of the models in ``neu_model.model.networks``: the input stem's parameter-free
layers (trimmed-mean downsampling, detrending, standardisation), fast 2x2 pooling, global
pooling for the head and the conv-BN units."""

from __future__ import annotations

import torch
from torch import nn


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


SCALES = ("std", "mad")


class Standardize(nn.Module):
    """Per-image zero mean, unit variance: removes brightness and contrast shifts of the line's lighting.

    ``scale="mad"`` divides by the mean absolute deviation instead of the standard deviation
    (an ablation: a few extreme pixels weigh less in it).
    """

    def __init__(self, scale: str = "std") -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"standardisation scale {scale!r}: choose one of {SCALES}")
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        if self.scale == "mad":
            spread = (x - mean).abs().mean(dim=(1, 2, 3), keepdim=True)
        else:
            spread = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (spread + 1e-3)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}"


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


GLOBAL_POOLS = ("avg", "avgmax", "catavgmax")


class AvgMaxPool(nn.Module):
    """Global average and max pooling to (N, C, 1, 1), averaged, or concatenated to (N, 2C, 1, 1)."""

    def __init__(self, concat: bool = False) -> None:
        super().__init__()
        self.concat = concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg, top = x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        return torch.cat([avg, top], 1) if self.concat else 0.5 * (avg + top)

    def extra_repr(self) -> str:
        return f"concat={self.concat}"


def global_pool_layer(pool: str) -> nn.Module:
    """Global pooling as timm names it: ``avg``, ``avgmax`` (the mean of average and max pooling)
    or ``catavgmax`` (both, concatenated: twice the channels)."""
    if pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool {pool!r}: choose one of {GLOBAL_POOLS}")
    return nn.AdaptiveAvgPool2d(1) if pool == "avg" else AvgMaxPool(concat=pool == "catavgmax")
