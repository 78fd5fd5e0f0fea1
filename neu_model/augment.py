"""Training augmentation, applied to whole batches in memory.

``robust`` draws from the same corruption family as the robustness suite (at random
severities, never the suite's fixed images), plus the symmetries of a steel texture:
flips, some 90-degree turns and shifted crops.

The corruptions are vectorised over the batch (one call per corruption and batch); the
geometry is a cheap view per image of a once-padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neu_model import corruptions as C

AUGMENTS = ("none", "geometric", "robust", "robust_one")


def geometric(x: torch.Tensor, gen: torch.Generator, pad: int = 16, turn_probability: float = 0.5) -> torch.Tensor:
    """Per image: a crop shifted by up to ``pad`` pixels with reflected borders, then a random
    flip of the rows and of the columns (each at even odds) and, for a ``turn_probability`` share
    of the images, a transpose: with the flips, a 90-degree turn.

    The batch is padded once; each image is then a view of it (slice, flip, transpose) copied
    into the output. 12x faster here than one big index gather (16 vs 188 ms per batch of 64,
    1 thread): the gather's index tensors alone are 20 MB a batch.
    """
    n, c, h, w = x.shape
    odds = torch.tensor([0.5, 0.5, turn_probability])  # flip rows, flip columns, transpose
    flips = (torch.rand(n, 3, generator=gen) < odds).tolist()
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).tolist()
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(x)
    for i, ((row, col), (flip_rows, flip_cols, transpose)) in enumerate(zip(offsets, flips, strict=True)):
        view = padded[i, :, row:row + h, col:col + w]
        dims = [d for d, flip in ((-2, flip_rows), (-1, flip_cols)) if flip]
        if dims:
            view = view.flip(dims)
        if transpose and h == w:
            view = view.transpose(-1, -2)
        out[i] = view
    return out


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


def roll_marks(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """Faint full-length lines along the rolling direction (the image's columns) on a random ``p``
    of the batch: 1-3 lines each, 2-6 px wide with a tent-shaped profile, darkening 4-20 % at
    the centre, the depth varying smoothly along the line. Rolls leave such marks on every kind
    of strip, so they say nothing of the defect."""
    n, _, h, w = x.shape
    x = x.clone()
    cols = torch.arange(w, dtype=x.dtype)
    for i in (torch.rand(n, generator=gen) < p).nonzero().flatten().tolist():
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            half_width = float(_uniform(1, 1.0, 3.0, gen))
            centre = float(_uniform(1, 0, w - 1, gen))
            depth = float(_uniform(1, 0.04, 0.20, gen))
            across = (1 - (cols - centre).abs() / half_width).clamp(min=0).view(1, w)
            knots = _uniform(5, 0.4, 1.0, gen).view(1, 1, 5)
            along = F.interpolate(knots, size=h, mode="linear", align_corners=True).view(h, 1)
            x[i] *= 1 - depth * along * across
    return x


def augment(
    x: torch.Tensor, kind: str, gen: torch.Generator, turn_probability: float = 0.5, roll_mark_share: float = 0.0,
) -> torch.Tensor:
    """Augment a float batch in [0, 1] on the CPU according to the recipe's ``augment`` setting;
    ``turn_probability`` is the share of images turned by 90 degrees (0.5: all eight symmetries
    of the square equally likely) and ``roll_mark_share`` the share given faint roll marks first."""
    if kind not in AUGMENTS:
        raise ValueError(f"unknown augment {kind!r}; choose one of {AUGMENTS}")
    if kind == "none":
        return x
    if roll_mark_share > 0:
        # before the turns, so the marks run along the rolling direction like the defects do
        x = roll_marks(x, gen, roll_mark_share)
    x = geometric(x, gen, turn_probability=turn_probability)
    if kind == "robust":
        return photometric(x, gen)
    if kind == "robust_one":
        return photometric_one(x, gen)
    return x
