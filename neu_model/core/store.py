"""Which MLflow store: ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` at the root of the checkout."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from neu_model.core.paths import ROOT

MLFLOW_DB = "mlflow.db"  # the default store: this SQLite file at the root of the checkout
SQLITE_PREFIX = "sqlite:///"


def default_tracking_uri(root: Path = ROOT) -> str:
    """The MLflow store of a checkout when ``MLFLOW_TRACKING_URI`` is unset: ``mlflow.db`` at ``root``
    (as the Makefile exports it)."""
    return f"{SQLITE_PREFIX}{Path(root).resolve() / MLFLOW_DB}"


def tracking_uri(root: Path = ROOT) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite file at ``root``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store.

    As in SQLAlchemy, ``sqlite:///mlflow.db`` is relative and ``sqlite:////abs/mlflow.db`` absolute;
    a query (``?timeout=...``) is not part of the file.
    """
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = unquote(uri[len(SQLITE_PREFIX):].split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None
