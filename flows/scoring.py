"""Batch scoring: classify a folder or archive of images with the registry's champion.

    python -m flows.scoring IMAGES_OR_ARCHIVE ... [--out reports/scores.csv] [--alias champion]

Writes the predictions CSV (file, predicted, confidence, needs_review, p_<class>) and leaves a
summary artifact: images per predicted class, how many need review and the least confident
images, for a person to check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.report import scoring_markdown
from neu_model.cli import add_review_arg, disable_telemetry, review_threshold, tracking_uri
from neu_model.model_source import champion_uri
from tasks.scoring import load_champion, score_images

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_KEY = "neu-scoring-summary"


@flow(name="neu-batch-scoring", timeout_seconds=2 * 3600)
def scoring_flow(inputs: list[str], out: str = "reports/scores.csv", model_name: str | None = None,
                 alias: str = "champion", project: str | None = None, review_below: float | None = None) -> dict:
    """Score ``inputs`` (image files, folders, .zip/.tar.gz archives) with ``models:/<name>@<alias>``.

    Args:
        inputs: what to score.
        out: the predictions CSV; relative paths are inside ``project``.
        model_name: the registered model; default params.yaml's ``register.model_name``.
        alias: the registry alias to score with.
        project: the workspace whose params.yaml names the model; default this checkout.
            MLFLOW_TRACKING_URI says which registry (the Makefile's default: mlflow.db there).
        review_below: flag predictions less confident than this; default the project's
            ``review.below_confidence``.

    Returns:
        The summary: ``n``, ``counts`` per class, ``needs_review``, ``least_confident`` rows,
        ``out`` and ``model_uri``.
    """
    root = Path(project or ROOT).resolve()
    uri = champion_uri(model_name, alias, root / "params.yaml")
    target = str(root / out) if not Path(out).is_absolute() else out
    # The registry the stages write to: MLFLOW_TRACKING_URI, else mlflow.db in the workspace.
    store = tracking_uri(root)
    review_below = review_threshold(review_below, root / "params.yaml")
    summary = score_images(list(inputs), load_champion(uri, store), target, review_below)
    create_markdown_artifact(scoring_markdown(summary, uri, target), key=SUMMARY_KEY,
                             description="Batch scoring: images per class, images to review")
    return summary | {"out": target, "model_uri": uri}


def main(argv: list[str] | None = None) -> int:
    disable_telemetry()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", default="reports/scores.csv")
    parser.add_argument("--model-name")
    parser.add_argument("--alias", default="champion")
    add_review_arg(parser)
    args = parser.parse_args(argv)
    state = scoring_flow([str(Path(p).resolve()) for p in args.inputs], args.out, args.model_name, args.alias,
                         review_below=args.review_below, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
