"""Classify images with a trained model: ``python -m neu_model.predict IMAGE_OR_FOLDER ...``.

Writes one CSV row per image (file, predicted class, confidence, needs_review, probability per
class) to stdout or ``--out``. ``--model`` takes the local ``models/model.pt`` (default).
``needs_review`` is true below params.yaml's ``review.below_confidence`` (or ``--review-below``).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from neu_model.cli import StageError, run_stage
from neu_model.config import CLASSES, load_config
from neu_model.data import decode_gray
from neu_model.files import write_text
from neu_model.model import build_model, fuse_batchnorm
from neu_model.train import MODEL_FILE, predict_logits, select_device

IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def load_model(path: Path = MODEL_FILE, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Load a ``models/model.pt`` file: the network in eval mode, batch norms folded, and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: no trained model; run the pipeline first (make pipeline)")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        model = build_model(saved["model_name"])
        model.load_state_dict(saved["state_dict"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise StageError(f"{path}: not a model saved by neu_model.train ({exc}); retrain it") from None
    meta = {k: v for k, v in saved.items() if k != "state_dict"}
    return fuse_batchnorm(model.to(device).eval()), meta


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Image files among ``paths``; folders are searched recursively, in sorted order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise StageError(f"{p}: no such file or folder; check the path")
    if not found:
        raise StageError(f"{', '.join(map(str, paths))}: no images found (.bmp, .png, .jpg, .tif)")
    return found


def load_for_model(paths: Sequence[Path], size: int = 200) -> torch.Tensor:
    """Decode images to uint8 (N, 1, size, size); other sizes are an error naming the file."""
    arrays = []
    for p in paths:
        arr = decode_gray(p)
        if arr.shape != (size, size):
            raise StageError(f"{p}: image is {arr.shape[1]}x{arr.shape[0]}, the model takes {size}x{size}; crop or resize it")
        arrays.append(torch.from_numpy(arr))
    return torch.stack(arrays)[:, None]


def predictions_frame(files: Sequence[str], probs: torch.Tensor, review_below: float) -> pd.DataFrame:
    """One row per image: file, predicted, confidence, needs_review, p_<class> for every class.

    Args:
        review_below: ``needs_review`` is true where the confidence is below this.
    """
    conf, idx = probs.max(dim=1)
    frame = pd.DataFrame({"file": list(files), "predicted": [CLASSES[i] for i in idx.tolist()],
                          "confidence": conf.numpy().round(6),
                          "needs_review": (conf < review_below).numpy()})
    for j, c in enumerate(CLASSES):
        frame[f"p_{c}"] = probs[:, j].numpy().round(6)
    return frame


def confidence_arg(text: str) -> float:
    """``argparse`` type of ``--review-below``: a number in [0, 1], else a one-line usage error."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a confidence in [0, 1] (0 flags nothing, 1 everything)")
    return value


def predict_files(paths: Sequence[Path], model_file: Path = MODEL_FILE, device: str = "auto",
                  batch_size: int = 64, review_below: float | None = None) -> pd.DataFrame:
    """Classify image files with a saved model.

    Args:
        review_below: flag predictions less confident than this; default params.yaml's
            ``review.below_confidence``.
    """
    if review_below is None:
        review_below = load_config().review.below_confidence
    dev = select_device(device)
    model, meta = load_model(model_file, dev)
    size = meta.get("config", {}).get("data", {}).get("image_size", 200)
    images = find_images(paths)
    probs = predict_logits(model, load_for_model(images, size), dev, batch_size).softmax(dim=1)
    return predictions_frame([str(p) for p in images], probs, review_below)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--model", type=Path, default=MODEL_FILE, help="saved model (default models/model.pt)")
    parser.add_argument("--out", type=Path, help="write the CSV here instead of stdout")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--review-below", type=confidence_arg, metavar="CONFIDENCE",
                        help="flag predictions less confident than this (default: review.below_confidence)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    frame = predict_files(args.inputs, args.model, args.device, review_below=args.review_below)
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    if args.out:
        write_text(args.out, buf.getvalue())
        print(f"wrote {len(frame)} predictions to {args.out}; {int(frame['needs_review'].sum())} need review",
              file=sys.stderr)
    else:
        sys.stdout.write(buf.getvalue())


if __name__ == "__main__":
    sys.exit(run_stage(main))
