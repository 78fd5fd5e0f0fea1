"""Review the tiles neu-predict flagged, then commit the labels as a new data version.

    neu-review serve PRED.csv [PRED2.csv ...] [--host 127.0.0.1] [--port 8765] [--token T]
                     [--state .review] [--random-share 0.02] [--seed 0]
    neu-review commit [--state .review] [--labels labels] [--workspace .] [--message-only]
                      [--no-git] [--no-event]

``serve`` shows every tile flagged ``needs_review`` (unknown input first, then least confident)
and a random share of the confident ones (audit) on a local web page, one key per decision,
and appends each decision to ``<state>/audit.jsonl``. ``commit`` writes the final labels as
PNGs with a manifest into ``labels/``, runs ``dvc add labels``, commits ``labels.dvc`` alone,
pushes to a DVC remote when one is configured, and sends the Prefect event
``neu.labels.committed``. See docs/review.md.

Exit status: 0 done, 2 bad input or a failed step (a one-line error naming the fix).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from neu_model.core.config import load_config
from neu_model.core.stage import run_stage
from neu_model.inference.predict import unit_interval_arg

TOKEN_ENV = "NEU_REVIEW_TOKEN"



def labels_folder(workspace: Path) -> str:
    """``data.labels`` of the workspace's params.yaml (``labels`` without one): where the download
    stage looks for the labels."""
    params = workspace / "params.yaml"
    return (load_config(params).data.labels if params.is_file() else None) or "labels"


share_arg = unit_interval_arg("share", "0.02: one in fifty confident tiles")  # --random-share


def port_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neu-review", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,commit}")
    serve = commands.add_parser("serve", help="serve the review page for prediction CSVs")
    serve.add_argument("csvs", nargs="+", type=Path, metavar="PRED.csv", help="CSVs written by neu-predict --out")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                                                           "machine only; any other needs a token)")
    serve.add_argument("--port", type=port_arg, default=8765, help="port (default 8765)")
    serve.add_argument("--token", help=f"the token every request must carry (default ${TOKEN_ENV}, else one made "
                                       "for this start and written into the page; prefer the variable: a "
                                       "command line is visible to other users)")
    serve.add_argument("--state", type=Path, default=Path(".review"),
                       help="folder of the audit log (default .review in the working folder)")
    serve.add_argument("--random-share", type=share_arg, default=0.02,
                       help="share of the confident tiles shown for audit (default 0.02)")
    serve.add_argument("--seed", type=int, default=0, help="seed of the audit draw (default 0)")
    commit = commands.add_parser("commit", help="write the final labels into labels/ and version them")
    commit.add_argument("--workspace", type=Path, default=Path("."),
                        help="the project checkout: git and DVC run there (default: the working folder)")
    commit.add_argument("--state", type=Path, default=Path(".review"),
                        help="folder of the audit log (default .review in the working folder)")
    commit.add_argument("--labels", type=Path,
                        help="the labelled-images folder (default: data.labels of the workspace's params.yaml)")
    commit.add_argument("--message-only", action="store_true",
                        help="print the git commit message this commit would make; write nothing")
    commit.add_argument("--no-git", action="store_true", help="write the folder only: no dvc add, git commit, "
                                                              "dvc push")
    commit.add_argument("--no-event", action="store_true", help="send no Prefect event")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.command == "serve":
        from neu_model.review.server import serve

        serve(args.csvs, args.host, args.port, args.token or os.environ.get(TOKEN_ENV) or None, args.state,
              args.random_share, args.seed)
        return
    from neu_model.review.commit import commit

    labels = args.labels if args.labels is not None else args.workspace / labels_folder(args.workspace)
    print(commit(args.state, labels, args.workspace, args.message_only, not args.no_git, not args.no_event))


def cli(argv: Sequence[str] | None = None) -> int:
    """The ``neu-review`` console script."""
    return run_stage(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
