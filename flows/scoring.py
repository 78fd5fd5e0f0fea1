"""Batch scoring: classify a folder or archive of images with the registry's champion.

    python -m flows.scoring IMAGES_OR_ARCHIVE ... [--out reports/scores.csv] [--alias champion]
    python -m flows.scoring IMAGES_OR_ARCHIVE ... --workers 4        # in 4 shards on a local Dask cluster

Writes the predictions CSV (file, predicted, confidence, needs_review, p_<class>) and leaves a
summary artifact: images per predicted class, how many need review and the least confident
images, for a person to check. With ``--workers N`` (or ``--address`` of a Dask scheduler) the
inputs are cut into N contiguous shards (folders into their images; an archive stays whole),
scored side by side with the version the alias names at the start, and the CSV is the shards'
rows in input order: the same file as with one worker.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.report import scoring_markdown
from flows.runners import dask_runner, workers_report_here
from neu_model.core.stage import disable_telemetry
from neu_model.core.store import tracking_uri
from neu_model.inference.predict import add_review_arg, review_threshold
from neu_model.inference.registry_files import champion_uri
from neu_model.ops.sweep import expand_inputs, merge_shards, shard
from tasks.scoring import load_champion, pin_model_version, score_images, score_shard, write_scores

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_KEY = "neu-scoring-summary"


@flow(name="neu-batch-scoring", timeout_seconds=2 * 3600)
def scoring_flow(inputs: list[str], out: str = "reports/scores.csv", model_name: str | None = None,
                 alias: str = "champion", project: str | None = None, review_below: float | None = None,
                 workers: int = 1) -> dict:
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
        workers: shards to score side by side on the flow's task runner (``run`` gives it a Dask
            cluster); 1 scores everything in one task, in this process.

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
    if workers > 1:
        summary = _score_in_shards(list(inputs), uri, store, target, review_below, workers)
    else:
        summary = score_images(list(inputs), load_champion(uri, store), target, review_below)
    create_markdown_artifact(scoring_markdown(summary, uri, target), key=SUMMARY_KEY,
                             description="Batch scoring: images per class, images to review")
    return summary | {"out": target, "model_uri": uri}


def _score_in_shards(inputs: list[str], uri: str, store: str, target: str, review_below: float,
                     workers: int) -> dict:
    """Score contiguous shards of ``inputs`` as parallel tasks, then write their rows in input order."""
    pinned = pin_model_version(uri, store)
    items = expand_inputs(inputs)
    # Balanced by bytes: an archive of many images weighs as much as those images.
    shards = shard([str(p) for p in items], workers, [p.stat().st_size for p in items])
    with workers_report_here():
        futures = [score_shard.with_options(task_run_name=f"score-shard-{i}").submit(part, pinned, store, review_below)
                   for i, part in enumerate(shards)]
        frames = {i: future.result() for i, future in enumerate(futures)}
    return write_scores(merge_shards(frames), target, inputs) | {"model_version_uri": pinned, "shards": len(shards)}


def run(inputs: list[str], workers: int = 1, address: str | None = None, **kwargs):
    """``scoring_flow`` with ``workers`` shards: in this process for 1, else on a Dask task runner (a
    local cluster of ``workers`` processes, or the scheduler at ``address``); returns the final state."""
    if workers <= 1:
        return scoring_flow(inputs, return_state=True, **kwargs)
    runner = dask_runner(workers, address)
    return scoring_flow.with_options(task_runner=runner)(inputs, workers=workers, return_state=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    disable_telemetry()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", default="reports/scores.csv")
    parser.add_argument("--model-name")
    parser.add_argument("--alias", default="champion")
    add_review_arg(parser)
    parser.add_argument("--workers", type=int, default=1, help="shards scored side by side (default 1: one process)")
    parser.add_argument("--address", help="run the --workers shards on this Dask scheduler (tcp://host:8786)")
    args = parser.parse_args(argv)
    state = run([str(Path(p).resolve()) for p in args.inputs], args.workers, args.address, out=args.out,
                model_name=args.model_name, alias=args.alias, review_below=args.review_below)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
