"""Score a folder or archive of images with the registry's champion model.

    python -m neu_model.score IMAGES_OR_ARCHIVE ... [--out scores.csv] [--model-uri models:/NAME@champion]

Writes one CSV row per image (file, predicted class, confidence, needs_review, probability per
class), the same columns as ``neu_model.predict``. The model is an MLflow pyfunc: float32 (N, 1, H, W)
in [0, 1] in, class probabilities (N, 6) in CLASSES order out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd

from neu_model.cli import StageError, add_review_arg, review_threshold, run_stage, tracking_uri
from neu_model.config import CLASSES, PARAMS_FILE, load_config
from neu_model.download import extract
from neu_model.files import write_csv
from neu_model.inference import Predictor, predict_batched, pyfunc_probabilities
from neu_model.predict import find_images, load_for_model, predictions_frame

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def champion_uri(model_name: str | None = None, alias: str = "champion", params: Path = PARAMS_FILE) -> str:
    """``models:/<name>@<alias>``; the name defaults to params.yaml's ``register.model_name``."""
    return f"models:/{model_name or load_config(params).register.model_name}@{alias}"


def load_pyfunc_model(uri: str, store: str | None = None) -> Predictor:
    """Load a pyfunc model from the MLflow registry (or any MLflow model URI).

    Args:
        store: the tracking URI of the store holding the registry; default MLFLOW_TRACKING_URI,
            else the repository's mlflow.db (as the stages use it).
    """
    import mlflow

    # models:/ URIs resolve through MLflow's process-global store; point it at ours for this
    # load only, so a caller in the same process (a flow, a test) keeps the store it had.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store or tracking_uri())
    try:
        return mlflow.pyfunc.load_model(uri)
    except mlflow.exceptions.MlflowException as exc:
        raise StageError(f"{uri}: cannot load the model ({str(exc).splitlines()[0]}); is a model registered "
                         f"with that alias, and MLFLOW_TRACKING_URI pointing at its registry?") from None
    finally:
        mlflow.set_tracking_uri(previous)


def is_archive(path: Path) -> bool:
    """A zip or tar file, by name (sniffing the bytes could mistake an image for a tar)."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def score(inputs: Sequence[Path], model: Predictor, review_below: float, batch_size: int = 64,
          size: int = 200) -> pd.DataFrame:
    """Classify the images in ``inputs`` (files, folders, .zip/.tar(.gz) archives) with ``model``.

    Archives are extracted (with download.extract's path checks) into a temporary folder;
    their images are named ``<archive>:<member path>`` in the output. ``needs_review`` marks
    the predictions less confident than ``review_below``.

    Raises:
        StageError: no images, an unreadable archive or image, or a wrongly sized image.
    """
    with tempfile.TemporaryDirectory(prefix="neu-score-") as tmp:
        files: list[Path] = []
        shown: list[str] = []
        for i, path in enumerate(map(Path, inputs)):
            if is_archive(path):
                dest = Path(tmp) / str(i)
                extract(path, dest)
                found = find_images([dest])
                shown += [f"{path}:{f.relative_to(dest).as_posix()}" for f in found]
            else:
                found = find_images([path])
                shown += [str(f) for f in found]
            files += found
        # Decoded batch by batch too: a large batch of files need not fit in memory at once.
        probs = predict_batched(lambda chunk: pyfunc_probabilities(model, load_for_model(chunk, size)),
                                files, batch_size)
    return predictions_frame(shown, probs, review_below)


def summarize(frame: pd.DataFrame, n_least: int = 10) -> dict:
    """Counts per predicted class (every class listed), how many need review, and the
    ``n_least`` least confident rows."""
    counts = frame["predicted"].value_counts()
    least = frame.nsmallest(n_least, "confidence")[["file", "predicted", "confidence"]]
    return {"n": len(frame), "counts": {c: int(counts.get(c, 0)) for c in CLASSES},
            "needs_review": int(frame["needs_review"].sum()), "least_confident": least.to_dict("records")}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="image files, folders, .zip or .tar(.gz) archives")
    parser.add_argument("--out", type=Path, default=Path("reports/scores.csv"))
    parser.add_argument("--model-uri", help="default: models:/<register.model_name>@champion")
    add_review_arg(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    uri = args.model_uri or champion_uri()
    frame = score(args.inputs, load_pyfunc_model(uri), review_threshold(args.review_below))
    write_csv(frame, args.out)
    print(f"wrote {len(frame)} predictions by {uri} to {args.out}; {int(frame['needs_review'].sum())} need review",
          file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_stage(main))
