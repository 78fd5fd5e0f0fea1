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

The variants are ``neu_model.runtimes.VARIANTS``. A variant the export report dropped (its
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
from typing import Any

from torch import nn

from neu_model import runtimes
from neu_model.cli import StageError
from neu_model.files import write_json
from neu_model.inference import Predictor, load_torch_model, select_device
from neu_model.model_source import (
    MODELS_URI_PREFIX,
    NO_VERSION_FIX,
    MissingArtifactError,
    VersionFiles,
    load_pyfunc_model,
    load_torch_predictor,
    version_files,
)

RUNTIME_NAMES = ("auto", "pyfunc", *runtimes.VARIANTS)
EXPORT_REPORT = "export.json"
FASTEST_FILE = "fastest.json"  # the runtime auto chose for one version on one machine
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


@dataclass
class LoadedModel:
    """A model source ready to score.

    Attributes:
        predictor: float32 (N, 1, 200, 200) in [0, 1] in, (N, 6) probabilities out.
        runtime: what runs it (``pyfunc``, ``torch``, or a variant name).
        load_network: the eager network for Grad-CAM, loaded on first call; None for an
            exported file alone (nothing to explain).
        note: why ``auto`` chose this runtime, or what differs from what was asked ("" when nothing).
    """

    predictor: Predictor
    runtime: str
    load_network: Callable[[], nn.Module] | None
    note: str = ""


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


def variant_predictor(name: str, folder: Path, file: Path | None = None) -> Predictor:
    """Variant ``name`` (not torch) over ``folder``'s exported files, or over ``file`` itself.

    Raises:
        StageError: its file is missing, or its runtime's package is not installed here.
    """
    variant = runtimes.VARIANTS[name]
    try:
        if file is None:
            return runtimes.load_predictor(name, folder)
        if variant.runtime == "onnx":
            return runtimes.OnnxPredictor(file)
        return runtimes.OpenVinoPredictor(file, variant.precision)
    except ImportError as exc:
        package = PACKAGES.get((exc.name or "").split(".")[0], exc.name)
        raise StageError(f"runtime {name!r} needs the {package} package, which is not installed here: "
                         f"pip install {package}, or choose another --runtime") from None


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


def fastest_here(report: Mapping[str, Any], folder: Path) -> str:
    """``runtimes.fastest_passing`` over ``folder``, timed once per machine and remembered there."""
    remembered = folder / FASTEST_FILE
    with contextlib.suppress(OSError, ValueError, AttributeError):  # unreadable: timed again
        saved = json.loads(remembered.read_text())
        if saved.get("machine") == machine_key() and saved.get("runtime") in ["torch", *runtimes.offered(report)]:
            return saved["runtime"]
    name = runtimes.fastest_passing(report, folder)
    write_json(remembered, {"machine": machine_key(), "runtime": name})
    return name


def registry_model(uri: str, runtime: str, device: str, fix: str) -> LoadedModel:
    """A ``models:/`` URI in ``runtime``: pyfunc, torch on ``exported/model.pt``, or a variant of its
    exported files."""
    files = version_files(uri, fix=fix)

    def network() -> nn.Module:
        return load_torch_model(files.fetch(runtimes.TORCH_FILE), select_device(device))[0]

    if runtime == "pyfunc":
        return LoadedModel(load_pyfunc_model(uri, fix=fix), "pyfunc", network)
    try:
        report = read_report(files.fetch(EXPORT_REPORT))
    except MissingArtifactError:
        if runtime != "auto":
            raise
        note = f"runtime pyfunc (auto: {uri} has no exported files to choose from)"
        return LoadedModel(load_pyfunc_model(uri, fix=fix), "pyfunc", network, note)
    note = ""
    if runtime == "auto":
        runtime, why = auto_runtime(files, report, device)
        note = f"runtime {runtime} (auto: {why})"
    check_offered(runtime, report, uri)
    model_file = files.fetch(runtimes.VARIANTS[runtime].file)
    if runtime == "torch":
        predictor = load_torch_predictor(model_file, device, bool(report.get("mirror", False)))
        return LoadedModel(predictor, "torch", lambda: predictor.network, note)
    return LoadedModel(variant_predictor(runtime, files.folder), runtime, network, note)


def auto_runtime(files: VersionFiles, report: Mapping[str, Any], device: str) -> tuple[str, str]:
    """The runtime ``auto`` picks for a registered version, and why."""
    candidates = ["torch", *runtimes.offered(report)]
    if len(candidates) == 1:
        return "torch", "the export kept no other runtime"
    if select_device(device).type != "cpu":  # the other runtimes run on the CPU here
        return "torch", f"torch on {select_device(device).type}"
    for name in candidates:
        files.fetch(runtimes.VARIANTS[name].file)
    return fastest_here(report, files.folder), f"the fastest here of {', '.join(candidates)}"


def local_report(model_file: Path) -> dict | None:
    """The export report of ``models/model.pt``'s exported files: ``reports/export.json`` beside its
    folder, as the export stage writes it; None when there is none."""
    report = model_file.parent.parent / "reports" / EXPORT_REPORT
    return read_report(report) if report.is_file() else None


def local_model(path: Path, runtime: str, device: str, mirror: bool) -> LoadedModel:
    """A ``models/model.pt`` file in torch, or a variant over the ``.onnx`` files beside it."""
    if runtime == "pyfunc":
        raise StageError(f"{path}: runtime 'pyfunc' runs registered models (models:/...); use torch here")
    if runtime in ("auto", "torch"):
        predictor = load_torch_predictor(path, device, mirror)
        return LoadedModel(predictor, "torch", lambda: predictor.network)
    report = local_report(path)
    check_offered(runtime, report, str(path))
    predictor = variant_predictor(runtime, path.parent)
    note = ""
    if report is not None and bool(report.get("mirror", False)) != mirror:
        # The graph carries the mirror averaging it was exported with; torch follows the params.
        exported, asked = ("on" if on else "off" for on in (report.get("mirror"), mirror))
        note = (f"note: runtime {runtime} runs the export's mirror averaging ({exported}), not inference.mirror "
                f"({asked}); re-run the export stage to match")
    return LoadedModel(predictor, runtime, lambda: load_torch_model(path, select_device(device))[0], note)


def exported_model(path: Path, runtime: str) -> LoadedModel:
    """An exported ``.onnx`` file in ONNX Runtime or OpenVINO, as it is (its precision is its own)."""
    runtime = "onnx" if runtime == "auto" else runtime
    if runtime not in ("onnx", "openvino", "openvino-bf16"):
        raise StageError(f"{path}: an exported file runs in onnx, openvino or openvino-bf16, not {runtime!r} "
                         "(for the int8 variant pass model.int8.onnx itself; torch runs models/model.pt)")
    if not path.is_file():
        raise StageError(f"{path}: no such file; run the export stage (python -m neu_model.export)")
    return LoadedModel(variant_predictor(runtime, path.parent, path), runtime, None)


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
