"""What every ``python -m neu_model...`` entry shares: one-line errors (``StageError``), quiet
telemetry and logs without credentials (``run_stage``)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from neu_model.core.redact import install_log_redaction, redact_url
from neu_model.core.schema import ConfigError
from neu_model.core.store import tracking_uri

# Plants are often air-gapped: none of the tools may phone home.
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


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
