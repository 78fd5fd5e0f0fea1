"""Heat maps cut into scored regions ``[x0, y0, x1, y1, score]`` (pixel edges of the image), and
the inspection system's original heat map: the image's own dark and bright shadows.

The original design: remove the uneven light (the least-squares quadric surface of the model's
``Detrend`` layer, here at full resolution), express every pixel's deviation in robust standard
deviations (1.4826 median absolute deviation) after a light smoothing, keep the dark and/or
bright deviations beyond ``k`` (the binarisation, kept graded), and spread them with an
anisotropic Gaussian: a soft closing that turns the many small shadows of crazing, rolled-in
scale or pits into one region. The heat map is thresholded at a share of its maximum and
labelled into 8-connected components with ``scipy.ndimage.label``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from neu_model.model.layers import surface_basis

POLARITIES = ("dark", "bright", "both")


@dataclass(frozen=True)
class RegionParams:
    """How one class's heat map is made and cut into regions.

    Attributes:
        polarity: which deviations are defect evidence: ``dark``, ``bright`` or ``both``.
        k: deviations up to ``k`` robust standard deviations are background (the binarisation).
        smooth: Gaussian sigma (pixels) against pixel noise before the deviations are measured.
        background: Gaussian sigma (pixels) of a local background also subtracted after the surface
            (0: none). It removes shading the quadric cannot follow, such as dark strip edges,
            at the cost of the inside of defects wider than about twice the sigma.
        spread: Gaussian sigmas (rows, columns) that merge nearby shadows into one region.
        threshold: a region's pixels exceed this share of the heat map's maximum.
        min_area: smaller regions (pixels) are dropped.
        keep: regions whose score (heat summed over the region) is below this share of the top
            region's are dropped.
        max_regions: at most this many regions, best first.
        cam_power: exponent of the Grad-CAM map in ``combined`` (0: image evidence only).
    """

    polarity: str = "dark"
    k: float = 1.0
    smooth: float = 1.5
    background: float = 0.0
    spread: tuple[float, float] = (16.0, 6.0)
    threshold: float = 0.25
    min_area: int = 30
    keep: float = 0.5
    max_regions: int = 5
    cam_power: float = 1.0

    def __post_init__(self) -> None:
        if self.polarity not in POLARITIES:
            raise ValueError(f"polarity {self.polarity!r}: choose one of {POLARITIES}")
        if not 0 < self.threshold < 1 or not 0 <= self.keep <= 1:
            raise ValueError(f"threshold {self.threshold} must be in (0, 1) and keep {self.keep} in [0, 1]")


_BASIS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def detrend(image: np.ndarray) -> np.ndarray:
    """The image minus its least-squares quadric surface (the model's ``Detrend``, at full resolution)."""
    shape = image.shape
    if shape not in _BASIS:
        basis = surface_basis(2, *shape).double().numpy()
        _BASIS[shape] = (basis, basis / (basis * basis).sum(0))
    basis, projector = _BASIS[shape]
    flat = image.astype(np.float64).ravel()
    return (flat - basis @ (flat @ projector)).reshape(image.shape)


def deviations(image: np.ndarray, smooth: float, background: float = 0.0) -> np.ndarray:
    """Each pixel's deviation from the detrended surface in robust standard deviations (1.4826 MAD)."""
    flat = detrend(image)
    if background > 0:
        flat = flat - ndimage.gaussian_filter(flat, background, mode="nearest")
    if smooth > 0:
        flat = ndimage.gaussian_filter(flat, smooth)
    median = np.median(flat)
    sigma = 1.4826 * np.median(np.abs(flat - median))
    return (flat - median) / max(sigma, 1e-6)


def evidence(z: np.ndarray, polarity: str, k: float) -> np.ndarray:
    """The binarised deviations, kept graded: how far beyond ``k`` each pixel is (0 where it is not)."""
    signed = {"dark": -z, "bright": z, "both": np.abs(z)}[polarity]
    return np.clip(signed - k, 0.0, None)


def spread_map(evidence_map: np.ndarray, spread: tuple[float, float]) -> np.ndarray:
    """Evidence density: the evidence blurred by an anisotropic Gaussian, computed at half
    resolution (the spreads are several pixels, and it quarters the cost) and upsampled back.

    Blurring the graded binary map and cutting it at a share of its maximum (``heat_regions``)
    acts as a closing (nearby shadows merge) and an opening (isolated specks fall below the cut).
    """
    h, w = evidence_map.shape
    even = np.pad(evidence_map, ((0, h % 2), (0, w % 2)), mode="edge")
    half = even.reshape(even.shape[0] // 2, 2, even.shape[1] // 2, 2).mean((1, 3))
    blurred = ndimage.gaussian_filter(half, (spread[0] / 2, spread[1] / 2), mode="nearest")
    return np.kron(blurred, np.ones((2, 2)))[:h, :w]


def classical_heat(image: np.ndarray, params: RegionParams) -> np.ndarray:
    """The original design's heat map of one uint8 (H, W) image: detrend, binarise, spread."""
    z = deviations(image, params.smooth, params.background)
    return spread_map(evidence(z, params.polarity, params.k), params.spread)


def heat_regions(heat: np.ndarray, params: RegionParams, weights: np.ndarray | None = None) -> np.ndarray:
    """Cut a heat map into scored boxes: (n, 5) ``[x0, y0, x1, y1, score]``, best first.

    Pixels above ``threshold`` times the maximum are labelled into 8-connected components; each
    scores the heat (times ``weights``, e.g. a Grad-CAM map, where given) summed over it: large,
    strong regions first. With no heat at all the whole image is the one region, scored 0.
    """
    h, w = heat.shape
    top = float(heat.max())
    if not np.isfinite(top) or top <= 0:
        return np.array([[0, 0, w, h, 0.0]])
    labels, count = ndimage.label(heat >= params.threshold * top, structure=np.ones((3, 3)))
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count + 1)[1:]
    score = np.bincount(flat, (heat if weights is None else heat * weights).ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(labels)
    rows = [[s[1].start, s[0].start, s[1].stop, s[0].stop, sc]
            for s, a, sc in zip(slices, area, score, strict=True) if a >= params.min_area]
    if not rows:  # every region was too small: keep the strongest anyway rather than say nothing
        best = int(score.argmax())
        rows = [[slices[best][1].start, slices[best][0].start, slices[best][1].stop, slices[best][0].stop,
                 score[best]]]
    boxes = np.array(sorted(rows, key=lambda r: -r[4]), float)
    return boxes[boxes[:, 4] >= params.keep * boxes[0, 4]][: params.max_regions]
