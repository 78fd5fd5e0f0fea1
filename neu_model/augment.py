"""Training augmentation, applied to whole batches in memory.

``robust`` draws from the same corruption family as the robustness suite (at random
severities, never the suite's fixed images), plus the symmetries of a steel texture:
flips, 90-degree turns and shifted crops.

Everything is vectorised over the batch (one gather for the geometry, one call per
corruption): on a small shared CPU, many tiny per-image tensor ops cost more in thread
synchronisation than in arithmetic.
"""

from __future__ import annotations

import torch

from neu_model import corruptions as C

AUGMENTS = ("none", "geometric", "robust", "robust_one")


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect out-of-range coordinates back into [0, size - 1] (like ``F.pad(mode='reflect')``)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def geometric(x: torch.Tensor, gen: torch.Generator, pad: int = 16) -> torch.Tensor:
    """Per image: a random element of the square's symmetry group (flips, 90-degree turns)
    and a crop shifted by up to ``pad`` pixels with reflected borders, as one gather."""
    n, c, h, w = x.shape
    flips = torch.rand(n, 3, generator=gen) < 0.5  # flip rows, flip columns, transpose
    offsets = torch.randint(-pad, pad + 1, (n, 2), generator=gen)
    rows = torch.arange(h).view(1, h, 1).expand(n, h, w)
    cols = torch.arange(w).view(1, 1, w).expand(n, h, w)
    rows = torch.where(flips[:, 0].view(n, 1, 1), h - 1 - rows, rows)
    cols = torch.where(flips[:, 1].view(n, 1, 1), w - 1 - cols, cols)
    if h == w:  # a transpose with the flips gives all eight symmetries, the 90-degree turns included
        t = flips[:, 2].view(n, 1, 1)
        rows, cols = torch.where(t, cols, rows), torch.where(t, rows, cols)
    rows = _reflect(rows + offsets[:, 0].view(n, 1, 1), h)
    cols = _reflect(cols + offsets[:, 1].view(n, 1, 1), w)
    index = (rows * w + cols).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _severities(gen: torch.Generator) -> tuple:
    """Each corruption of the suite with a sampler of random severities that covers the suite's range."""
    return (
        (C.brightness, lambda k: _uniform(k, -0.25, 0.25, gen)),
        (C.contrast, lambda k: _uniform(k, 0.4, 1.7, gen)),
        (C.gamma, lambda k: torch.exp(_uniform(k, -0.8, 0.8, gen))),
        (C.illumination_gradient, lambda k: _uniform(k, -0.7, 0.7, gen)),
        (C.gaussian_blur, lambda k: float(_uniform(1, 0.3, 2.2, gen))),
        (C.gaussian_noise, lambda k: _uniform(k, 0.0, 0.2, gen)),
        (C.dark_dots, lambda k: _uniform(k, 0.0, 0.06, gen)),
        (C.salt_pepper, lambda k: _uniform(k, 0.0, 0.04, gen)),
    )


def photometric(x: torch.Tensor, gen: torch.Generator, p: float = 0.3) -> torch.Tensor:
    """Each corruption hits a random ``p`` of the batch, each image at its own random severity.

    Only the picked images are computed on, which keeps this cheaper than the model's step.
    """
    n = x.shape[0]
    x = x.clone()
    for corruption, severity in _severities(gen):
        idx = (torch.rand(n, generator=gen) < p).nonzero().flatten()
        if len(idx):
            x[idx] = corruption(x[idx], severity(len(idx)), gen)
    return x


def photometric_one(x: torch.Tensor, gen: torch.Generator, p: float = 0.75) -> torch.Tensor:
    """A random ``p`` of the batch gets exactly one corruption (uniformly chosen, random severity);
    the rest stays clean, so every batch mixes clean and corrupted images."""
    n = x.shape[0]
    steps = _severities(gen)
    pick = torch.randint(0, len(steps), (n,), generator=gen)
    hit = torch.rand(n, generator=gen) < p
    x = x.clone()
    for k, (corruption, severity) in enumerate(steps):
        idx = (hit & (pick == k)).nonzero().flatten()
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
    if kind == "robust_one":
        return photometric_one(geometric(x, gen), gen)
    raise ValueError(f"unknown augment {kind!r}; choose one of {AUGMENTS}")
