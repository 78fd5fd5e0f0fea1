"""What runs a model source in ``neu-predict`` (``--runtime``), and the eager network ``--locate`` explains.

========================  =====================================================  ==========================
source                    ``auto``                                               also
========================  =====================================================  ==========================
``models:/`` URI          the fastest on this machine of torch and the variants  ``pyfunc``, ``torch`` and
                          the export kept (timed once per version and machine,   every variant the export
                          remembered beside the fetched files); ``torch`` on a   kept
                          GPU; ``pyfunc`` for a version without exported files
``models/model.pt``       ``torch``: the file named is the file run              the variants, over the
                                                                                 ``.onnx`` files beside it
an exported ``.onnx``     ``onnx`` (ONNX Runtime)                                ``openvino``,
                                                                                 ``openvino-bf16``
========================  =====================================================  ==========================

The variants are ``neu_model.inference.runtimes.VARIANTS``. A variant the export report dropped (its
parity or accuracy check failed) is refused, naming the reason. The torch predictor averages
over the mirror image when the export did (``export.json``'s ``mirror``) or, for a local file,
when the caller says so (params.yaml ``inference.mirror``); the ONNX files carry their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neu_model.core.files import write_json
from neu_model.core.paths import EXPORT_REPORT, TORCH_FILE
from neu_model.core.stage import StageError
from neu_model.inference import runtimes
from neu_model.inference.predictors import Predictor
from neu_model.inference.registry_files import (
    MODELS_URI_PREFIX,
    NO_VERSION_FIX,
    MissingArtifactError,
    VersionFiles,
    load_pyfunc_model,
    parse_models_uri,
    version_files,
)

if TYPE_CHECKING:  # torch is imported only when a torch model runs or is explained
    from torch import nn

RUNTIME_NAMES = ("auto", "pyfunc", *runtimes.VARIANTS)
EXPORT_REPORT_NAME = EXPORT_REPORT.name  # as logged with a registered version
FASTEST_FILE = "fastest.json"  # the runtime auto chose for one version on one machine


@dataclass
class LoadedModel:
    """A model source ready to score.

    Attributes:
        predictor: float32 (N, 1, 200, 200) in [0, 1] in, (N, 6) probabilities out.
        runtime: what runs it (``pyfunc``, ``torch``, or a variant name).
        load_network: the eager network for Grad-CAM, loaded on first call; None for an
            exported file alone (nothing to explain).
        note: why ``auto`` chose this runtime, or what differs from what was asked ("" when nothing).
        source: what was loaded: ``models:/<name>/<version>`` (an alias resolved) or the file's path.
    """

    predictor: Predictor
    runtime: str
    load_network: Callable[[], nn.Module] | None
    note: str = ""
    source: str = ""


def read_report(path: Path) -> dict:
    """An export report (``export.json``).

    Raises:
        StageError: it is not JSON.
    """
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report, why = None, str(exc)
    else:
        why = f"a JSON {type(report).__name__}, not an object"
    if not isinstance(report, dict):
        raise StageError(f"{path}: not an export report ({why}); re-run the export stage")
    return report


def check_runtime_name(runtime: str) -> None:
    if runtime not in RUNTIME_NAMES:
        raise StageError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIME_NAMES)}")


def check_offered(name: str, report: Mapping[str, Any] | None, source: str) -> None:
    """Refuse a variant that ``report`` (an export report) dropped; no report, no check."""
    if report is None or name == "torch" or name in runtimes.offered(report):
        return
    entry = report.get("variants", {}).get(name, {})
    reason = entry.get("reason", "not in the export report")
    kept = ", ".join(["torch", *runtimes.offered(report)])
    raise StageError(f"{source}: runtime {name!r} did not pass the export's checks ({reason}); choose one of {kept}")


def machine_key() -> str:
    """What makes timings of one machine valid on another: host, architecture, CPU count."""
    return f"{platform.node()}|{platform.machine()}|{os.cpu_count()}"


def fastest_here(report: Mapping[str, Any], folder: Path) -> tuple[str, Predictor | None]:
    """``runtimes.fastest_passing`` over ``folder``, timed once per machine and remembered there.

    Returns:
        The name, and the predictor that was timed (None when the name was remembered).
    """
    remembered = folder / FASTEST_FILE
    with contextlib.suppress(OSError, ValueError, AttributeError):  # unreadable: timed again
        saved = json.loads(remembered.read_text())
        if saved.get("machine") == machine_key() and saved.get("runtime") in ["torch", *runtimes.offered(report)]:
            return saved["runtime"], None
    name, predictor = runtimes.fastest_passing(report, folder)
    write_json(remembered, {"machine": machine_key(), "runtime": name})
    return name, predictor


def torch_network(path: Path, device: str) -> nn.Module:
    """The eager network of a ``model.pt`` file (what Grad-CAM explains); imports torch."""
    from neu_model.inference.torch_model import load_torch_model, select_device

    return load_torch_model(path, select_device(device))[0]


def device_type(device: str) -> str:
    """``cpu``, ``cuda``, ``mps``: where ``device`` (``auto`` included) runs; imports torch unless ``cpu``."""
    if device == "cpu":
        return "cpu"
    from neu_model.inference.torch_model import select_device

    return select_device(device).type


def registry_model(uri: str, runtime: str, device: str, fix: str) -> LoadedModel:
    """A ``models:/`` URI in ``runtime``: pyfunc, torch on ``exported/model.pt``, or a variant of its
    exported files."""
    files = version_files(uri, fix=fix)
    source = f"{MODELS_URI_PREFIX}{parse_models_uri(uri)[0]}/{files.version}" if files.version else uri

    def network() -> nn.Module:
        return torch_network(files.fetch(TORCH_FILE), device)

    if runtime == "pyfunc":
        return LoadedModel(load_pyfunc_model(uri, fix=fix), "pyfunc", network, source=source)
    try:
        report = read_report(files.fetch(EXPORT_REPORT_NAME))
    except MissingArtifactError:
        if runtime != "auto":
            raise
        note = f"runtime pyfunc (auto: {uri} has no exported files to choose from)"
        return LoadedModel(load_pyfunc_model(uri, fix=fix), "pyfunc", network, note, source)
    note, predictor = "", None
    if runtime == "auto":
        runtime, why, predictor = auto_runtime(files, report, device)
        note = f"runtime {runtime} (auto: {why})"
    check_offered(runtime, report, uri)
    files.fetch(runtimes.VARIANTS[runtime].file)
    mirror = bool(report.get("mirror", False))
    predictor = predictor or runtimes.variant_predictor(runtime, files.folder, mirror, device=device)
    if runtime == "torch":
        return LoadedModel(predictor, "torch", lambda: predictor.network, note, source)
    return LoadedModel(predictor, runtime, network, note, source)


def auto_runtime(files: VersionFiles, report: Mapping[str, Any], device: str) -> tuple[str, str, Predictor | None]:
    """The runtime ``auto`` picks for a registered version, why, and the predictor it timed (if it did)."""
    candidates = ["torch", *runtimes.offered(report)]
    if len(candidates) == 1:
        return "torch", "the export kept no other runtime", None
    where = device_type(device)
    if where != "cpu":  # the other runtimes run on the CPU here
        return "torch", f"torch on {where}", None
    for name in candidates:
        files.fetch(runtimes.VARIANTS[name].file)
    name, predictor = fastest_here(report, files.folder)
    return name, f"the fastest here of {', '.join(candidates)}", predictor


def local_report(model_file: Path) -> dict | None:
    """The export report of ``models/model.pt``'s exported files: ``reports/export.json`` beside its
    folder, as the export stage writes it; None when there is none."""
    report = model_file.parent.parent / EXPORT_REPORT
    return read_report(report) if report.is_file() else None


def local_model(path: Path, runtime: str, device: str, mirror: bool) -> LoadedModel:
    """A ``models/model.pt`` file in torch, or a variant over the ``.onnx`` files beside it."""
    if runtime == "pyfunc":
        raise StageError(f"{path}: runtime 'pyfunc' runs registered models (models:/...); use torch here")
    if runtime in ("auto", "torch"):
        predictor = runtimes.variant_predictor("torch", file=path, mirror=mirror, device=device)
        return LoadedModel(predictor, "torch", lambda: predictor.network, source=str(path))
    report = local_report(path)
    check_offered(runtime, report, str(path))
    predictor = runtimes.variant_predictor(runtime, path.parent)
    note = ""
    if report is not None and bool(report.get("mirror", False)) != mirror:
        # The graph carries the mirror averaging it was exported with; torch follows the params.
        exported, asked = ("on" if on else "off" for on in (report.get("mirror"), mirror))
        note = (f"note: runtime {runtime} runs the export's mirror averaging ({exported}), not inference.mirror "
                f"({asked}); re-run the export stage to match")
    return LoadedModel(predictor, runtime, lambda: torch_network(path, device), note, str(path))


def exported_model(path: Path, runtime: str) -> LoadedModel:
    """An exported ``.onnx`` file in ONNX Runtime or OpenVINO, as it is (its precision is its own)."""
    runtime = "onnx" if runtime == "auto" else runtime
    if runtime not in ("onnx", "openvino", "openvino-bf16"):
        raise StageError(f"{path}: an exported file runs in onnx, openvino or openvino-bf16, not {runtime!r} "
                         "(for the int8 variant pass model.int8.onnx itself; torch runs models/model.pt)")
    if not path.is_file():
        raise StageError(f"{path}: no such file; run the export stage (python -m neu_model.inference.export)")
    return LoadedModel(runtimes.variant_predictor(runtime, file=path), runtime, None, source=str(path))


def load_model(spec: str | Path, runtime: str = "auto", device: str = "auto", mirror: bool = False,
               fix: str = NO_VERSION_FIX) -> LoadedModel:
    """The model behind ``spec`` in ``runtime`` (the table in this module's docstring).

    Args:
        spec: a ``models:/`` URI, a ``models/model.pt`` file or an exported ``.onnx`` file.
        runtime: ``auto``, ``pyfunc`` or a name of ``runtimes.VARIANTS``.
        device: for torch: ``auto`` (CUDA, MPS, CPU), ``cpu``, ``cuda``, ...
        mirror: for a local ``.pt`` file: average over the mirror image.
        fix: what an error about a missing store or version tells the user to do.

    Raises:
        StageError: an unknown runtime, one this source or machine cannot run, or a model that
            cannot be loaded.
    """
    check_runtime_name(runtime)
    text = str(spec)
    if text.startswith(MODELS_URI_PREFIX):
        return registry_model(text, runtime, device, fix)
    path = Path(text)
    if path.suffix.lower() == ".onnx":
        return exported_model(path, runtime)
    return local_model(path, runtime, device, mirror)


def load_predictor(spec: str | Path, runtime: str = "auto", device: str = "auto", mirror: bool = False) -> Predictor:
    """``load_model(...).predictor``: the predictor alone."""
    return load_model(spec, runtime, device, mirror).predictor
