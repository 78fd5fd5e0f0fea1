"""Classify images with a trained model: ``python -m neu_model.predict IMAGE_OR_FOLDER ...``.

Writes one CSV row per image (file, predicted class, confidence, needs_review, probability per
class) to stdout or ``--out``. ``--model`` takes the local ``models/model.pt`` (default).
``needs_review`` is true below params.yaml's ``review.below_confidence`` (or ``--review-below``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from neu_model.cli import StageError, add_review_arg, review_threshold, run_stage
from neu_model.config import CLASSES
from neu_model.data import decode_gray
from neu_model.files import write_csv
from neu_model.inference import MODEL_FILE, load_torch_model, predict_logits, select_device

IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}


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
            raise StageError(f"{p}: image is {arr.shape[1]}x{arr.shape[0]}, the model takes {size}x{size}; "
                             "crop or resize it")
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


def predict_files(paths: Sequence[Path], model_file: Path = MODEL_FILE, device: str = "auto",
                  batch_size: int = 64, review_below: float | None = None) -> pd.DataFrame:
    """Classify image files with a saved model.

    Args:
        review_below: flag predictions less confident than this; default params.yaml's
            ``review.below_confidence``.
    """
    review_below = review_threshold(review_below)
    dev = select_device(device)
    model, meta = load_torch_model(model_file, dev)
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
    add_review_arg(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    frame = predict_files(args.inputs, args.model, args.device, review_below=args.review_below)
    if args.out:
        write_csv(frame, args.out)
        print(f"wrote {len(frame)} predictions to {args.out}; {int(frame['needs_review'].sum())} need review",
              file=sys.stderr)
    else:
        sys.stdout.write(frame.to_csv(index=False))


if __name__ == "__main__":
    sys.exit(run_stage(main))
