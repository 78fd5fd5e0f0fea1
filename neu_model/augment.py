"""Training augmentation, applied to whole batches in memory.

``robust`` draws from the same corruption family as the robustness suite (at random
severities, never the suite's fixed images), plus the symmetries of a steel texture:
flips, 90-degree turns and shifted crops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neu_model import corruptions as C

AUGMENTS = ("none", "geometric", "robust")


def geometric(x: torch.Tensor, gen: torch.Generator, pad: int = 16) -> torch.Tensor:
    """Random flips, 90-degree turns and a shifted crop (reflect padding) per image."""
    n, _, h, w = x.shape
    flips = torch.rand(n, 2, generator=gen)
    turns = torch.randint(0, 4, (n,), generator=gen)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(x)
    for i in range(n):
        img = padded[i, :, offsets[i, 0]: offsets[i, 0] + h, offsets[i, 1]: offsets[i, 1] + w]
        if flips[i, 0] < 0.5:
            img = img.flip(-1)
        if flips[i, 1] < 0.5:
            img = img.flip(-2)
        out[i] = torch.rot90(img, int(turns[i]), dims=(-2, -1))
    return out


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def photometric(x: torch.Tensor, gen: torch.Generator, p: float = 0.3) -> torch.Tensor:
    """Each corruption hits a random ``p`` of the batch, each image at its own random severity.

    Only the picked images are computed on, which keeps this cheaper than the model's step.
    """
    n = x.shape[0]
    steps = (
        (C.brightness, lambda k: _uniform(k, -0.25, 0.25, gen)),
        (C.contrast, lambda k: _uniform(k, 0.4, 1.7, gen)),
        (C.gamma, lambda k: torch.exp(_uniform(k, -0.8, 0.8, gen))),
        (C.illumination_gradient, lambda k: _uniform(k, -0.7, 0.7, gen)),
        (C.gaussian_blur, lambda k: float(_uniform(1, 0.3, 2.2, gen))),
        (C.gaussian_noise, lambda k: _uniform(k, 0.0, 0.2, gen)),
        (C.dark_dots, lambda k: _uniform(k, 0.0, 0.06, gen)),
        (C.salt_pepper, lambda k: _uniform(k, 0.0, 0.04, gen)),
    )
    x = x.clone()
    for corruption, severity in steps:
        idx = (torch.rand(n, generator=gen) < p).nonzero().flatten()
        if len(idx):
            x[idx] = corruption(x[idx], severity(len(idx)), gen)
    return x


def augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Augment a float batch in [0, 1] on the CPU according to the recipe's ``augment`` setting."""
    if kind == "none":
        return x
    if kind == "geometric":
        return geometric(x, gen)
    if kind == "robust":
        return photometric(geometric(x, gen), gen)
    raise ValueError(f"unknown augment {kind!r}; choose one of {AUGMENTS}")
