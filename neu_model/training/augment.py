"""Training augmentation, applied to whole batches on the batch's device (CPU or GPU).

``robust`` draws from the same corruption family as the robustness suite (at random
severities, never the suite's fixed images), plus the symmetries of a steel texture:
flips, some 90-degree turns and shifted crops.

The corruptions are vectorised over the batch (one call per corruption and batch); the
geometry is a cheap view per image of a once-padded batch on the CPU, one gather on a GPU.

Every random choice (which image, which corruption, how strong, where) is drawn from the CPU
generator ``gen``, whatever the device: a GPU batch gets the same choices as on the CPU, moved
without waiting for the device. Only the pixel noise (Gaussian noise, dots, salt and pepper) is
drawn on the batch's device, from ``noise_gen``; on the CPU that is ``gen`` itself, so the CPU
output is what it was before the GPU path existed, bit for bit (tests/test_augment.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neu_model.data import corruptions as C

AUGMENTS = ("none", "geometric", "robust", "robust_one")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor of random choices on ``device`` without a host synchronisation (a no-op on the CPU)."""
    return t.to(device, non_blocking=True)


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
    flips = torch.rand(n, 3, generator=gen) < odds
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    if x.device.type != "cpu":
        return gather_views(padded, to_device(offsets, x.device), to_device(flips, x.device), h, w)
    out = torch.empty_like(x)
    for i, ((row, col), (flip_rows, flip_cols, transpose)) in enumerate(
            zip(offsets.tolist(), flips.tolist(), strict=True)):
        view = padded[i, :, row:row + h, col:col + w]
        dims = [d for d, flip in ((-2, flip_rows), (-1, flip_cols)) if flip]
        if dims:
            view = view.flip(dims)
        if transpose and h == w:
            view = view.transpose(-1, -2)
        out[i] = view
    return out


def gather_views(padded: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``geometric``'s per-image views as one gather (what a GPU wants: a few kernels instead of
    two per image): output pixel (r, c) of image i is the padded pixel at (row_i + fr(p),
    col_i + fc(q)), with (p, q) = (c, r) when turned, else (r, c), and fr, fc reversing a
    flipped axis. The same pixels as the per-image views, on any device."""
    n = padded.shape[0]
    device = padded.device
    rows = torch.arange(h, device=device).view(1, h, 1).expand(n, h, w)
    cols = torch.arange(w, device=device).view(1, 1, w).expand(n, h, w)
    flip_rows, flip_cols, turn = (flips[:, k].view(n, 1, 1) for k in range(3))
    turn = turn & (h == w)
    p, q = torch.where(turn, cols, rows), torch.where(turn, rows, cols)
    p = torch.where(flip_rows, h - 1 - p, p) + offsets[:, 0].view(n, 1, 1)
    q = torch.where(flip_cols, w - 1 - q, q) + offsets[:, 1].view(n, 1, 1)
    image = torch.arange(n, device=device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[image, p, q].permute(0, 3, 1, 2).contiguous()


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


def _corrupt(x: torch.Tensor, idx: torch.Tensor, corruption, severity, noise_gen: torch.Generator) -> None:
    """Corrupt the images ``idx`` of ``x`` in place, each at a severity drawn now (on the CPU)."""
    strength = severity(len(idx))
    if isinstance(strength, torch.Tensor):
        strength = to_device(strength, x.device)
    idx = to_device(idx, x.device)
    x[idx] = corruption(x[idx], strength, noise_gen)


def photometric(x: torch.Tensor, gen: torch.Generator, p: float = 0.3,
                noise_gen: torch.Generator | None = None) -> torch.Tensor:
    """Each corruption hits a random ``p`` of the batch, each image at its own random severity.

    Only the picked images are computed on, which keeps this cheaper than the model's step.
    """
    n = x.shape[0]
    x = x.clone()
    for corruption, severity in _severities(gen):
        idx = (torch.rand(n, generator=gen) < p).nonzero().flatten()
        if len(idx):
            _corrupt(x, idx, corruption, severity, noise_gen or gen)
    return x


def photometric_one(x: torch.Tensor, gen: torch.Generator, p: float = 0.75,
                    noise_gen: torch.Generator | None = None) -> torch.Tensor:
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
            _corrupt(x, idx, corruption, severity, noise_gen or gen)
    return x


def roll_marks(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """Faint full-length lines along the rolling direction (the image's columns) on a random ``p``
    of the batch: 1-3 lines each, 2-6 px wide with a tent-shaped profile, darkening 4-20 % at
    the centre, the depth varying smoothly along the line. Rolls leave such marks on every kind
    of strip, so they say nothing of the defect."""
    n, _, h, w = x.shape
    x = x.clone()
    cols = torch.arange(w, dtype=x.dtype, device=x.device)
    for i in (torch.rand(n, generator=gen) < p).nonzero().flatten().tolist():
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            half_width = float(_uniform(1, 1.0, 3.0, gen))
            centre = float(_uniform(1, 0, w - 1, gen))
            depth = float(_uniform(1, 0.04, 0.20, gen))
            across = (1 - (cols - centre).abs() / half_width).clamp(min=0).view(1, w)
            knots = to_device(_uniform(5, 0.4, 1.0, gen), x.device).view(1, 1, 5)
            along = F.interpolate(knots, size=h, mode="linear", align_corners=True).view(h, 1)
            x[i] *= 1 - depth * along * across
    return x


def augment(
    x: torch.Tensor, kind: str, gen: torch.Generator, turn_probability: float = 0.5, roll_mark_share: float = 0.0,
    noise_gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment a float batch in [0, 1], on its device, according to the recipe's ``augment`` setting;
    ``turn_probability`` is the share of images turned by 90 degrees (0.5: all eight symmetries
    of the square equally likely) and ``roll_mark_share`` the share given faint roll marks first.

    Args:
        gen: a CPU generator: every random choice.
        noise_gen: a generator on the batch's device for the pixel noise; None: ``gen`` (a CPU batch).
    """
    if kind not in AUGMENTS:
        raise ValueError(f"unknown augment {kind!r}; choose one of {AUGMENTS}")
    if kind == "none":
        return x
    if roll_mark_share > 0:
        # before the turns, so the marks run along the rolling direction like the defects do
        x = roll_marks(x, gen, roll_mark_share)
    x = geometric(x, gen, turn_probability=turn_probability)
    if kind == "robust":
        return photometric(x, gen, noise_gen=noise_gen)
    if kind == "robust_one":
        return photometric_one(x, gen, noise_gen=noise_gen)
    return x
