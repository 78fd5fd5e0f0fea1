"""A registered version's files, fetched from MLflow: its pyfunc model and its exported files.

The register stage logs the exported files into
the version's run (``exported/model.pt``, ``model.onnx``, ``model.int8.onnx``, ``export.json``);
``version_artifact`` fetches one of them. MLflow is imported only for a ``models:/`` URI, so
scoring with a local file loads neither MLflow nor any training code. Which runtime runs which
source is decided in ``neu_model.inference.loading``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neu_model.core.config import load_config
from neu_model.core.paths import PARAMS_FILE
from neu_model.core.stage import StageError
from neu_model.core.store import sqlite_file, tracking_uri

MODELS_URI_PREFIX = "models:/"
EXPORTED_FOLDER = "exported"  # the artifact folder of a version's run holding the exported files
CACHE_ENV = "NEU_MODEL_CACHE"
PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
NO_CHAMPION_FIX = "run `make pipeline` to train and register one, or pass --model models/model.pt"
NO_VERSION_FIX = "is a model registered with that alias, and MLFLOW_TRACKING_URI pointing at its registry?"
MISSING_EXPORT_FIX = ("registered before exported artifacts were logged; re-run `make pipeline` or pass "
                      "--model models/model.pt")


class MissingArtifactError(StageError):
    """A registered version whose run lacks one of the exported files."""


def champion_uri(model_name: str | None = None, alias: str = "champion", params: Path = PARAMS_FILE) -> str:
    """``models:/<name>@<alias>``; the name defaults to params.yaml's ``register.model_name``."""
    return f"models:/{model_name or load_config(params).register.model_name}@{alias}"


def checked_store(uri: str, store: str | None, fix: str) -> str:
    """``store``, default MLFLOW_TRACKING_URI else the repository's mlflow.db (as the stages use it).

    Raises:
        StageError: a SQLite store whose file is not there (MLflow would create an empty store
            and then report the model missing).
    """
    store = store or tracking_uri()
    database = sqlite_file(store)
    if database is not None and not database.is_file():
        raise StageError(f"{uri}: no MLflow store at {database}; {fix}")
    return store


class PyfuncPredictor:
    """A registered pyfunc model with the unknown-input threshold it was logged with (None for a
    version logged before the flag, whose pyfunc returns the probabilities alone)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        logged = getattr(model.metadata, "metadata", None) or {}
        self.unknown_threshold = float(logged["unknown_threshold"]) if "unknown_threshold" in logged else None

    def predict(self, batch: Any) -> Any:
        return self.model.predict(batch)


def load_pyfunc_model(uri: str, store: str | None = None, fix: str | None = None) -> PyfuncPredictor:
    """Load a pyfunc model from the MLflow registry (or any MLflow model URI).

    Args:
        store: the tracking URI of the store holding the registry; default MLFLOW_TRACKING_URI,
            else the repository's mlflow.db (as the stages use it).
        fix: what the error message tells the user to do; default: check the alias and
            MLFLOW_TRACKING_URI.

    Raises:
        StageError: the store does not exist, or holds no such model.
    """
    fix = fix or NO_VERSION_FIX
    store = checked_store(uri, store, fix)
    import mlflow

    # models:/ URIs resolve through MLflow's process-global store; point it at ours for this
    # load only, so a caller in the same process (a flow, a test) keeps the store it had.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        return PyfuncPredictor(mlflow.pyfunc.load_model(uri))
    except mlflow.exceptions.MlflowException as exc:
        raise StageError(f"{uri}: cannot load the model ({str(exc).splitlines()[0]}); {fix}") from None
    finally:
        mlflow.set_tracking_uri(previous)


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` as (name, alias, None); ``models:/<name>/<version>`` as (name, None, version).

    Raises:
        StageError: any other form.
    """
    rest = uri[len(MODELS_URI_PREFIX):] if uri.startswith(MODELS_URI_PREFIX) else ""
    name, at, alias = rest.partition("@")
    if at and name and alias and "/" not in alias:
        return name, alias, None
    name, slash, version = rest.rpartition("/")
    if slash and name and version.isdigit():
        return name, None, version
    raise StageError(f"{uri}: not a registered model version; write models:/<name>@<alias> or "
                     "models:/<name>/<version>")


def registry_client(uri: str, store: str | None = None, fix: str = NO_VERSION_FIX):
    """An ``MlflowClient`` of ``store`` (see ``checked_store``) for the registry files of ``uri``."""
    store = checked_store(uri, store, fix)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store, registry_uri=store)


def version_run_id(client, uri: str, fix: str = NO_VERSION_FIX) -> str:
    """The id of the run that a registered version (``models:/<name>@<alias>`` or ``/<version>``) came from."""
    return resolve_version(client, uri, fix)[0]


def resolve_version(client, uri: str, fix: str = NO_VERSION_FIX) -> tuple[str, str]:
    """The run id and the version number of a registered version (an alias resolved once)."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_models_uri(uri)
    try:
        found = (client.get_model_version_by_alias(name, alias) if alias
                 else client.get_model_version(name, version))
    except MlflowException as exc:
        raise StageError(f"{uri}: no such model version ({str(exc).splitlines()[0]}); {fix}") from None
    if not found.run_id:
        raise MissingArtifactError(f"{uri}: version {found.version} has no run to fetch files from; "
                                   f"{MISSING_EXPORT_FIX}")
    return found.run_id, str(found.version)


def cache_root() -> Path:
    """Where fetched registry files are kept: ``$NEU_MODEL_CACHE``, else ``$XDG_CACHE_HOME/neu-model``,
    else ``~/.cache/neu-model``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neu-model"


@dataclass(frozen=True)
class VersionFiles:
    """The exported files of one registered version, fetched on demand into ``folder``.

    Attributes:
        uri: the ``models:/`` URI it was resolved from (for messages).
        run_id: the version's run, resolved once: an alias moving meanwhile cannot mix two versions' files.
        folder: ``<cache>/<run_id>``; a run's artifacts do not change, so a file there is not fetched again.
        version: the version number the URI resolved to ("" when unknown).
    """

    uri: str
    run_id: str
    folder: Path
    client: Any
    version: str = ""

    def fetch(self, name: str) -> Path:
        """``exported/<name>`` of the run, fetched through a temporary folder renamed into place
        (a killed fetch leaves nothing half-written).

        Raises:
            MissingArtifactError: the run has no such file.
        """
        target = self.folder / name
        if target.is_file():
            return target
        logged = {Path(f.path).name for f in self.client.list_artifacts(self.run_id, EXPORTED_FOLDER)}
        if name not in logged:
            raise MissingArtifactError(f"{self.uri}: its run {self.run_id} has no {EXPORTED_FOLDER}/{name}: "
                                       f"{MISSING_EXPORT_FIX}")
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".fetch-") as work, quiet_downloads():
            os.replace(self.client.download_artifacts(self.run_id, f"{EXPORTED_FOLDER}/{name}", work), target)
        return target


def version_files(uri: str, store: str | None = None, cache: Path | None = None,
                  fix: str = NO_VERSION_FIX) -> VersionFiles:
    """The exported files of the version ``uri`` names (``models:/<name>@<alias>`` or ``/<version>``).

    Args:
        store: the tracking URI of the registry; default as ``load_pyfunc_model``.
        cache: the folder of fetched files; default ``cache_root()``.
        fix: what the error message of a missing store or version tells the user to do.

    Raises:
        StageError: no such store or version.
    """
    client = registry_client(uri, store, fix)
    run_id, version = resolve_version(client, uri, fix)
    return VersionFiles(uri, run_id, (cache or cache_root()) / run_id, client, version)


def version_artifact(uri: str, name: str, store: str | None = None, cache: Path | None = None,
                     fix: str = NO_VERSION_FIX) -> Path:
    """A file the register stage logged with a registered version: ``exported/<name>`` of its run,
    fetched once into ``<cache>/<run_id>/<name>`` (see ``version_files``).

    Args:
        uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
        name: ``model.pt``, ``model.onnx``, ``model.int8.onnx`` or ``export.json``.

    Raises:
        StageError: no such store or version; MissingArtifactError (a StageError) when the run lacks
            the file (registered before the exported files were logged).
    """
    return version_files(uri, store, cache, fix).fetch(name)


@contextlib.contextmanager
def quiet_downloads():
    """No MLflow progress bar for the block: stderr carries neu-predict's own lines."""
    previous = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous
