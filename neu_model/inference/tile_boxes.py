"""``neu-predict --locate``: where each tile's defect is, as boxes in its image's pixels.

Each tile is explained for the class the CSV row predicts (whatever runtime classified it), with
that class's knobs of the ``locate:`` params (``neu_model.localisation.methods.DEFAULT_LOCATE`` without them).
The model methods (``combined``, ``gradcam``) need the eager network for Grad-CAM; an exported
file alone has none, so its tiles get the ``classical`` method (the image's own shadows) and
a note says so: boxes from the image alone are still boxes, and refusing would leave users of
the ONNX file with none.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from neu_model.core.config import CLASSES
from neu_model.inference.tiles import LOCATE_COLUMN, Batch
from neu_model.localisation.cam import class_maps
from neu_model.localisation.methods import (
    DEFAULT_LOCATE,
    MODEL_METHODS,
    Located,
    LocateParams,
    locate_one,
    map_of,
    params_from_dict,
)

if TYPE_CHECKING:  # drawing code is loaded only with --overlays
    from neu_model.inference.overlays import OverlayWriter

NO_NETWORK_METHOD = "classical"


def locate_params(cfg: object) -> LocateParams:
    """The ``locate:`` section of a loaded config as ``LocateParams``; ``DEFAULT_LOCATE`` without one.

    The section may be held as ``LocateParams``, a mapping or a dataclass of the same keys.
    """
    section = getattr(cfg, "locate", None)
    if section is None:
        return DEFAULT_LOCATE
    if isinstance(section, LocateParams):
        return section
    if dataclasses.is_dataclass(section):
        section = dataclasses.asdict(section)
    if isinstance(section, Mapping):
        return params_from_dict(section)
    raise TypeError(f"the config's locate section is a {type(section).__name__}, not a mapping")


def tiles_uint8(tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Float tiles in [0, 1] as the uint8 images the localisation works on (8-bit input comes back exact)."""
    pixels = torch.as_tensor(tiles).detach().cpu().float()
    return pixels.mul(255).round_().clamp_(0, 255).to(torch.uint8)


class TileLocator:
    """Boxes of the tiles of a batch for their predicted classes.

    Args:
        network: the eager classifier (Grad-CAM); None: the classical method whatever ``params`` say.
        params: the method and its knobs.

    Attributes:
        method: the method used.
        note: why the method differs from ``params.method`` ("" when it does not).
    """

    def __init__(self, network: nn.Module | None, params: LocateParams = DEFAULT_LOCATE,
                 batch_size: int = 64) -> None:
        self.network, self.params, self.batch_size = network, params, batch_size
        self.method, self.note = params.method, ""
        if network is None and params.method in MODEL_METHODS:
            self.method = NO_NETWORK_METHOD
            self.note = (f"note: an exported file has no network to explain, so --locate uses the "
                         f"{NO_NETWORK_METHOD} method instead of {params.method}; pass --model models/model.pt "
                         "or a models:/ URI for the model's evidence")

    def locate(self, tiles: torch.Tensor | np.ndarray, codes: Sequence[str]) -> list[Located]:
        """Regions of float tiles (B, 1, H, W) in [0, 1], each for its class ``codes[i]``, in tile pixels."""
        images = tiles_uint8(tiles)
        cams = None
        if self.method in MODEL_METHODS:
            stage, kind = map_of(self.params, self.method)
            targets = torch.tensor([CLASSES.index(c) for c in codes])
            cams = class_maps(self.network, images, stage, targets=targets, kind=kind,
                              batch_size=self.batch_size)[0].numpy()
        return [locate_one(images[i, 0].numpy(), self.method, self.params, code, None if cams is None else cams[i])
                for i, code in enumerate(codes)]


def image_boxes(located: Located, x: int, y: int) -> list[list]:
    """A tile's regions in its image's pixels: ``[x0, y0, x1, y1, score]``, edges as whole pixels
    (x1, y1 exclusive), the score rounded to 4 places."""
    return [[int(round(x0)) + x, int(round(y0)) + y, int(round(x1)) + x, int(round(y1)) + y, round(float(score), 4)]
            for x0, y0, x1, y1, score in located.regions]


def add_boxes(batch: Batch, rows: list[dict], locator: TileLocator) -> tuple[list[Located], list[list[list]]]:
    """Fill the ``boxes`` column of a batch's rows (JSON, image pixels).

    Returns:
        Per tile its localisation (tile pixels) and its boxes (image pixels).
    """
    located = locator.locate(batch.tiles, [row["predicted"] for row in rows])
    boxes = [image_boxes(answer, x, y) for answer, x, y in zip(located, batch.xs, batch.ys, strict=True)]
    for row, tile_boxes in zip(rows, boxes, strict=True):
        row[LOCATE_COLUMN] = json.dumps(tile_boxes)
    return located, boxes


def locate_batch(batch: Batch, rows: list[dict], locator: TileLocator, overlays: OverlayWriter | None = None) -> None:
    """The boxes column of a batch's rows, and their part of the overlays."""
    located, boxes = add_boxes(batch, rows, locator)
    if overlays is not None:
        overlays.add(batch, rows, located, boxes)
