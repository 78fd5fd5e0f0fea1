"""What every ``python -m neu_model.<stage>`` shares: one-line errors, quiet telemetry, logs
without credentials, the default MLflow store and the ``--review-below`` option."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from neu_model.config import PARAMS_FILE, ROOT, ConfigError, load_config
from neu_model.redact import install_log_redaction, redact_url

# Plants are often air-gapped: none of the tools may phone home.
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


MLFLOW_DB = "mlflow.db"  # the default store: this SQLite file at the root of the checkout


class StageError(Exception):
    """Bad input or a failed step; the message names the file or URL and the fix."""


def disable_telemetry() -> None:
    """Turn off MLflow, Prefect and generic telemetry unless the user set them."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def run_stage(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a stage's ``main``; print a one-line error (no traceback) and exit 2 on bad input.

    Every log line and error passes ``redact_url``: a data source's credentials are never shown.
    An MLflow store that stops answering mid-stage is one line too (exit 2, with the words
    "does not answer" that make an orchestrator retry: ``orchestrate.is_transient``).
    """
    disable_telemetry()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    install_log_redaction()
    try:
        main(argv)
    except (StageError, ConfigError) as exc:
        print(f"error: {redact_url(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last complete outputs are kept", file=sys.stderr)
        return 130
    except Exception as exc:
        if not store_stopped_answering(exc):
            raise
        reason = " ".join(str(exc).split())[:200]
        print(f"error: MLflow store {redact_url(tracking_uri())} does not answer ({redact_url(reason)}); the "
              f"last complete outputs are kept: start the store (or point MLFLOW_TRACKING_URI at one) and rerun",
              file=sys.stderr)
        return 2
    return 0


def store_stopped_answering(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is MLflow's client failing to reach its tracking server."""
    seen: BaseException | None = exc
    while seen is not None:
        if "API request to" in str(seen) and "failed with exception" in str(seen):  # mlflow.utils.rest_utils
            return True
        if type(seen).__module__.startswith(("requests.", "urllib3.")) and "Connection" in type(seen).__name__:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def default_tracking_uri(root: Path = ROOT) -> str:
    """The MLflow store of a checkout when ``MLFLOW_TRACKING_URI`` is unset: ``mlflow.db`` at ``root``
    (as the Makefile exports it)."""
    return f"sqlite:///{Path(root).resolve() / MLFLOW_DB}"


def tracking_uri(root: Path = ROOT) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite file at ``root``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def confidence_arg(text: str) -> float:
    """``argparse`` type of ``--review-below``: a number in [0, 1], else a one-line usage error."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a confidence in [0, 1] (0 flags nothing, 1 everything)")
    return value


def add_review_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--review-below CONFIDENCE`` (default None: see ``review_threshold``)."""
    parser.add_argument("--review-below", type=confidence_arg, metavar="CONFIDENCE",
                        help="flag predictions less confident than this (default: review.below_confidence)")


def review_threshold(review_below: float | None, params: Path = PARAMS_FILE) -> float:
    """``review_below`` when given, else ``review.below_confidence`` of ``params``."""
    return load_config(params).review.below_confidence if review_below is None else review_below
