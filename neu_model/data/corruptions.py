"""Image corruptions of a steel line: sensor noise, defocus, lighting drift, dust.

The same functions serve two purposes: random augmentation during training
(``neu_model.training.augment``) and the fixed robustness suite of the evaluate stage (``SUITE``),
which is generated with fixed seeds so that every model meets the same corrupted images.
All take and return float tensors of shape (N, 1, H, W) with pixels in [0, 1]; a severity is
a scalar or a per-image tensor of shape (N,).
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

import torch
import torch.nn.functional as F

Severity = float | torch.Tensor


def _per_image(severity: Severity, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (N,) severity to (N, 1, 1, 1)."""
    s = torch.as_tensor(severity, dtype=x.dtype, device=x.device)
    return s.reshape(-1, 1, 1, 1) if s.ndim else s


def gaussian_noise(x: torch.Tensor, sigma: Severity, gen: torch.Generator | None = None) -> torch.Tensor:
    """Additive white Gaussian noise of standard deviation ``sigma``."""
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return (x + noise * _per_image(sigma, x)).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Defocus blur: a separable Gaussian kernel of standard deviation ``sigma`` pixels."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def brightness(x: torch.Tensor, delta: Severity, gen: torch.Generator | None = None) -> torch.Tensor:
    """Add ``delta`` to every pixel."""
    return (x + _per_image(delta, x)).clamp_(0, 1)


def contrast(x: torch.Tensor, factor: Severity, gen: torch.Generator | None = None) -> torch.Tensor:
    """Scale deviations from each image's mean by ``factor``."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * _per_image(factor, x) + mean).clamp_(0, 1)


def gamma(x: torch.Tensor, g: Severity, gen: torch.Generator | None = None) -> torch.Tensor:
    """Gamma curve ``x ** g`` (g < 1 brightens shadows, g > 1 darkens them)."""
    return x.clamp(1e-6, 1).pow(_per_image(g, x))


def illumination_gradient(x: torch.Tensor, strength: Severity, gen: torch.Generator | None = None) -> torch.Tensor:
    """Uneven light: a linear ramp across the strip from ``1 - strength`` to ``1 + strength``."""
    ramp = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype, device=x.device).view(1, 1, 1, -1)
    return (x * (1 + _per_image(strength, x) * ramp)).clamp_(0, 1)


def dark_dots(x: torch.Tensor, fraction: Severity, gen: torch.Generator | None = None) -> torch.Tensor:
    """Set a ``fraction`` of pixels to black: dust, scale flakes, dead sensor pixels."""
    hit = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) < _per_image(fraction, x)
    return x.masked_fill(hit, 0.0)


def salt_pepper(x: torch.Tensor, fraction: Severity, gen: torch.Generator | None = None) -> torch.Tensor:
    """Set a ``fraction`` of pixels to black or white, half each."""
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    f = _per_image(fraction, x)
    return x.masked_fill(u < f / 2, 0.0).masked_fill((u >= f / 2) & (u < f), 1.0)


Corruption = Callable[..., torch.Tensor]

# The fixed evaluation suite: corruption -> severities. Changing it changes every model's score.
SUITE: dict[str, tuple[Corruption, tuple[float, ...]]] = {
    "gaussian_noise": (gaussian_noise, (0.02, 0.05, 0.1, 0.15)),
    "gaussian_blur": (gaussian_blur, (0.5, 1.0, 1.5, 2.0)),
    "brightness": (brightness, (-0.2, -0.1, 0.1, 0.2)),
    "contrast": (contrast, (0.5, 0.7, 1.3, 1.6)),
    "gamma": (gamma, (0.5, 0.7, 1.5, 2.0)),
    "illumination_gradient": (illumination_gradient, (0.2, 0.4, 0.6)),
    "dark_dots": (dark_dots, (0.01, 0.03, 0.05)),
    "salt_pepper": (salt_pepper, (0.01, 0.03)),
}


def suite_seed(name: str, severity: float) -> int:
    """A fixed seed per (corruption, severity), stable across runs and Python versions."""
    return zlib.crc32(f"{name}:{severity}".encode())


def corrupt(x: torch.Tensor, name: str, severity: float) -> torch.Tensor:
    """Apply one suite corruption deterministically (CPU generator, fixed seed)."""
    fn, _ = SUITE[name]
    gen = torch.Generator().manual_seed(suite_seed(name, severity))
    return fn(x.cpu(), severity, gen)
