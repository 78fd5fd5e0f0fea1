"""Where ``neu-predict`` gets its model: the registry's champion, a saved ``models/model.pt``, an exported file.

Every source becomes a predictor with one method, ``predict(tiles) -> probabilities``: float32
(N, 1, 200, 200) pixels in [0, 1] in, (N, 6) class probabilities in ``CLASSES`` order out, the
contract of the registered pyfunc model. MLflow is imported only to load a ``models:/`` URI,
so scoring with a local file loads neither MLflow nor any training code.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import numpy as np
import torch
from torch import nn

from neu_model.cli import StageError, tracking_uri
from neu_model.config import CLASSES, PARAMS_FILE, load_config
from neu_model.inference import Predictor, load_torch_model, memory_format, select_device

MODELS_URI_PREFIX = "models:/"
EXPORTED_SUFFIXES = (".onnx",)
# What each kind of model source runs in today. The exported files (ONNX Runtime, OpenVINO)
# get their predictors from neu_model.runtimes once it is wired in (see ``load_predictor``).
RUNTIMES = {"registry": ("auto", "pyfunc"), "torch": ("auto", "torch")}
NO_CHAMPION_FIX = "run `make pipeline` to train and register one, or pass --model models/model.pt"


def champion_uri(model_name: str | None = None, alias: str = "champion", params: Path = PARAMS_FILE) -> str:
    """``models:/<name>@<alias>``; the name defaults to params.yaml's ``register.model_name``."""
    return f"models:/{model_name or load_config(params).register.model_name}@{alias}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store.

    As in SQLAlchemy, ``sqlite:///mlflow.db`` is relative and ``sqlite:////abs/mlflow.db`` absolute.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = unquote(uri[len(prefix):].split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


def load_pyfunc_model(uri: str, store: str | None = None, fix: str | None = None) -> Predictor:
    """Load a pyfunc model from the MLflow registry (or any MLflow model URI).

    Args:
        store: the tracking URI of the store holding the registry; default MLFLOW_TRACKING_URI,
            else the repository's mlflow.db (as the stages use it).
        fix: what the error message tells the user to do; default: check the alias and
            MLFLOW_TRACKING_URI.

    Raises:
        StageError: the store does not exist, or holds no such model.
    """
    store = store or tracking_uri()
    fix = fix or "is a model registered with that alias, and MLFLOW_TRACKING_URI pointing at its registry?"
    database = sqlite_file(store)
    if database is not None and not database.is_file():
        # MLflow would create an empty store here, and then report that the model is missing.
        raise StageError(f"{uri}: no MLflow store at {database}; {fix}")
    import mlflow

    # models:/ URIs resolve through MLflow's process-global store; point it at ours for this
    # load only, so a caller in the same process (a flow, a test) keeps the store it had.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        return mlflow.pyfunc.load_model(uri)
    except mlflow.exceptions.MlflowException as exc:
        raise StageError(f"{uri}: cannot load the model ({str(exc).splitlines()[0]}); {fix}") from None
    finally:
        mlflow.set_tracking_uri(previous)


class TorchPredictor:
    """A ``models/model.pt`` network behind the pyfunc contract: softmax of its logits, no autograd.

    Attributes:
        model: the network, batch norms folded, on ``device`` in its fastest memory layout.
        meta: the saved file's metadata (model name, config, ...).
    """

    def __init__(self, model: nn.Module, device: torch.device, meta: dict | None = None) -> None:
        self.device, self.layout, self.meta = device, memory_format(device), meta or {}
        self.model = model.eval().to(memory_format=self.layout)

    @torch.no_grad()
    def predict(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
        logits = self.model(x.to(self.device).contiguous(memory_format=self.layout)).float()
        return logits.softmax(dim=1).cpu().numpy()


def check_runtime(runtime: str, kind: str, spec: str) -> None:
    if runtime not in RUNTIMES[kind]:
        raise StageError(f"{spec}: runtime {runtime!r} is not supported for this model yet; "
                         f"use {' or '.join(RUNTIMES[kind])}")


def load_predictor(spec: str | Path, runtime: str = "auto", device: str = "auto") -> Predictor:
    """The predictor behind a model source.

    Args:
        spec: a ``models:/`` URI (MLflow registry), a ``.pt`` file saved by the train stage, or
            an exported ``.onnx`` file.
        runtime: ``auto`` picks the source's own runtime (pyfunc, torch).
        device: for ``.pt`` files: ``auto`` (CUDA, MPS, CPU), ``cpu``, ``cuda``, ...

    Raises:
        StageError: the model cannot be loaded, or the runtime does not run it (yet).
    """
    text = str(spec)
    if text.startswith(MODELS_URI_PREFIX):
        check_runtime(runtime, "registry", text)
        return load_pyfunc_model(text)
    path = Path(text)
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        # The hook for neu_model.runtimes: ONNX Runtime and OpenVINO predictors of an exported file.
        raise StageError(f"{path}: exported models are not supported by neu-predict yet; "
                         "pass --model models/model.pt or a models:/ URI")
    check_runtime(runtime, "torch", text)
    dev = select_device(device)
    model, meta = load_torch_model(path, dev)
    return TorchPredictor(model, dev, meta)


def load_default_predictor() -> Predictor:
    """The registry's champion (``models:/<register.model_name>@champion``), with the fix for
    a checkout that has none."""
    uri = champion_uri()
    return load_pyfunc_model(uri, fix=NO_CHAMPION_FIX)


def probabilities(predictor: Predictor, tiles: np.ndarray) -> np.ndarray:
    """``predictor``'s class probabilities for float32 tiles (N, 1, H, W), checked for shape.

    Raises:
        StageError: the model answers with another shape than (N, classes).
    """
    probs = np.asarray(predictor.predict(tiles), dtype=np.float32)
    if probs.shape != (len(tiles), len(CLASSES)):
        raise StageError(f"the model returned shape {probs.shape}, expected ({len(tiles)}, {len(CLASSES)}) "
                         f"probabilities in class order {', '.join(CLASSES)}")
    return probs
