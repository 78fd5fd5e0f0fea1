"""What every ``python -m neu_model.<stage>`` shares: one-line errors and quiet telemetry."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from neu_model.config import ConfigError

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
    """Run a stage's ``main``; print a one-line error (no traceback) and exit 2 on bad input."""
    disable_telemetry()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main(argv)
    except (StageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last complete outputs are kept", file=sys.stderr)
        return 130
    return 0
