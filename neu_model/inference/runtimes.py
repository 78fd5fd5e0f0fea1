"""Run a trained model in one of several runtimes behind one interface.

Every predictor has ``predict(batch) -> probabilities``: float32 images (N, 1, H, W) with pixels in
[0, 1] in, (N, 6) class probabilities in ``CLASSES`` order out, the contract of the registered
model. A variant names a runtime, the file it reads and its precision:

- ``torch``: the saved network, eager, batch norms folded, channels-last (``torch_model.TorchPredictor``);
- ``onnx``, ``onnx-int8``: ONNX Runtime on ``models/model.onnx`` or its int8 twin;
- ``openvino``, ``openvino-bf16``, ``openvino-int8``: OpenVINO reading the same ONNX files.

The ONNX files carry the preprocessing, the softmax and (when exported with it) the mirror
averaging, so a client only feeds pixels. ONNX Runtime, OpenVINO and torch are imported when
their predictor is built: a process that runs one loads none of the others. Nothing here imports
training code, MLflow or matplotlib.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neu_model.core.paths import INT8_FILE, MODELS_DIR, ONNX_FILE, TORCH_FILE
from neu_model.core.stage import StageError
from neu_model.inference.predictors import Predictor, check_batch, chunks

# Images per call into a runtime for large batches. Per core (one thread, seed-0 model, AVX-512
# host) chunks of 4 to 16 ran within 5 % of each other and 7-20 % faster than 64 images in one
# call (the feature maps of 8 images fit in a core's 2 MB L2 cache). The chunks run one per core,
# so no core waits for another between layers: on a loaded host that was 2.5-3x the throughput.
CHUNK = 8
UNKNOWN_THRESHOLD_KEY = "unknown_threshold"  # ONNX metadata written by the export stage


@dataclass(frozen=True)
class Variant:
    """How one runtime runs the model.

    Attributes:
        runtime: ``torch``, ``onnx`` (ONNX Runtime) or ``openvino``.
        file: the file it reads, in the models folder.
        precision: ``fp32``; ``bf16`` (OpenVINO's inference precision hint); ``int8`` (the
            statically quantised ONNX file).
    """

    runtime: str
    file: str
    precision: str = "fp32"


VARIANTS: dict[str, Variant] = {
    "torch": Variant("torch", TORCH_FILE),
    "onnx": Variant("onnx", ONNX_FILE),
    "openvino": Variant("openvino", ONNX_FILE),
    "openvino-bf16": Variant("openvino", ONNX_FILE, "bf16"),
    "onnx-int8": Variant("onnx", INT8_FILE, "int8"),
    "openvino-int8": Variant("openvino", INT8_FILE, "int8"),
}


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads share one core's arithmetic units, so they add no speed here)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class OnnxPredictor:
    """ONNX Runtime's CPU provider, every graph optimisation on.

    A batch of up to ``chunk`` images runs as one call on all cores (latency); a larger one is
    cut into chunks of ``chunk`` that run one per core in parallel (throughput): a chunk's
    feature maps stay in the core's cache, and no core waits for the others between layers.
    """

    def __init__(self, path: Path, threads: int | None = None, chunk: int = CHUNK) -> None:
        self.cores, self.chunk = threads or physical_cores(), chunk
        self.latency = self.session(path, self.cores)
        self.throughput = self.session(path, 1) if self.cores > 1 else self.latency
        self.input_name = self.latency.get_inputs()[0].name
        self.pool: ThreadPoolExecutor | None = None  # started on the first large batch
        self.unknown_threshold = unknown_threshold(self.latency.get_modelmeta().custom_metadata_map)

    @staticmethod
    def session(path: Path, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one chain of operators: a second pool only competes for the cores
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph for ``batch``: the probabilities, then the unknown score if any."""
        batch = check_batch(batch)
        if len(batch) <= self.chunk:
            return self.latency.run(None, {self.input_name: batch})
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.cores, thread_name_prefix="onnxruntime-chunk")
        # InferenceSession.run is thread-safe and releases the GIL.
        runs = list(self.pool.map(lambda part: self.throughput.run(None, {self.input_name: part}),
                                  chunks(batch, self.chunk)))
        return [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.run(batch)
        return outputs[0], outputs[1] if len(outputs) > 1 else None


def onnx_metadata(path: Path) -> dict[str, str]:
    """The key-value metadata of an ONNX file (OpenVINO does not expose it; ONNX Runtime does)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def unknown_threshold(metadata: Mapping[str, str]) -> float | None:
    """The unknown-input threshold an exported file carries (``unknown_threshold``); None without one."""
    value = metadata.get(UNKNOWN_THRESHOLD_KEY)
    return float(value) if value not in (None, "") else None


def openvino_config(precision: str = "fp32", threads: int | None = None, hint: str = "LATENCY") -> dict[str, Any]:
    """OpenVINO CPU properties: ``LATENCY`` runs one request on all cores, ``THROUGHPUT`` one
    request per core (a stream) at once."""
    cores = threads or physical_cores()
    config = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": cores,
              "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    return config | ({"NUM_STREAMS": cores} if hint == "THROUGHPUT" else {})


def openvino_supports(precision: str) -> bool:
    """Whether this CPU runs ``precision`` natively in OpenVINO (without support it silently runs fp32)."""
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}[precision] in capabilities


class OpenVinoPredictor:
    """OpenVINO's CPU plugin reading the ONNX file.

    Like ``OnnxPredictor``: up to ``chunk`` images run as one request on all cores (the
    ``LATENCY`` hint), a larger batch as chunks of ``chunk``, one per core at once (streams of the
    ``THROUGHPUT`` hint; the last chunk padded to full size). The graph is compiled for each
    input shape it meets (static shapes: the dynamic-shape graph ran 1.5x slower at batch 1
    here); the last ``max_shapes`` are kept.
    """

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None, chunk: int = CHUNK,
                 max_shapes: int = CHUNK + 1) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.precision, self.threads, self.chunk, self.max_shapes = precision, threads, chunk, max_shapes
        self.compiled: OrderedDict[tuple, Any] = OrderedDict()
        self.n_outputs = len(self.model.outputs)
        self.unknown_threshold = unknown_threshold(onnx_metadata(path))

    def compile(self, shape: tuple[int, ...], hint: str) -> Any:
        """The graph compiled for input ``shape`` under ``hint``, with its request(s)."""
        import openvino as ov

        key = (shape, hint)
        if key not in self.compiled:
            model = self.model.clone()
            model.reshape(list(shape))
            compiled = self.core.compile_model(model, "CPU", openvino_config(self.precision, self.threads, hint))
            self.compiled[key] = (compiled.create_infer_request() if hint == "LATENCY"
                                  else ov.AsyncInferQueue(compiled, compiled.get_property("NUM_STREAMS")))
            if len(self.compiled) > self.max_shapes:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(key)
        return self.compiled[key]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph for ``batch``: the probabilities, then the unknown score if any."""
        batch = check_batch(batch)
        if len(batch) <= self.chunk:
            # share_outputs=False (the default) copies: the next call reuses the output buffer.
            result = self.compile(batch.shape, "LATENCY").infer({0: batch})
            return [result[i] for i in range(self.n_outputs)]
        parts = chunks(batch, self.chunk)
        short = self.chunk - len(parts[-1])
        if short:  # padded with blank images: one compiled shape serves every batch size
            parts[-1] = np.concatenate([parts[-1], np.zeros((short, *batch.shape[1:]), np.float32)])
        queue = self.compile(parts[0].shape, "THROUGHPUT")
        out: list[list[np.ndarray] | None] = [None] * len(parts)

        def store(request: Any, index: int) -> None:
            out[index] = [request.get_output_tensor(i).data.copy() for i in range(self.n_outputs)]

        queue.set_callback(store)
        for index, part in enumerate(parts):
            queue.start_async({0: part}, userdata=index)
        queue.wait_all()
        return [np.concatenate([o[i] for o in out])[: len(batch)] for i in range(self.n_outputs)]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.run(batch)
        return outputs[0], outputs[1] if len(outputs) > 1 else None


PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # import name -> pip name


def variant_predictor(name: str, models_dir: Path = MODELS_DIR, mirror: bool = False, threads: int | None = None,
                      file: Path | None = None, device: str = "cpu") -> Predictor:
    """The predictor of variant ``name`` over the files in ``models_dir``, or over ``file`` itself.

    Args:
        mirror: for ``torch``: average over the mirror image, as an ONNX file exported with
            mirror averaging does (the ONNX variants take it from their file).
        threads: ONNX Runtime / OpenVINO threads; default one per physical core.
        device: for ``torch``: where it runs.

    Raises:
        StageError: unknown variant, its file is missing, or its runtime's package is not installed.
    """
    if name not in VARIANTS:
        raise StageError(f"unknown runtime {name!r}; choose one of {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    path = Path(file) if file is not None else Path(models_dir) / variant.file
    if variant.runtime == "torch":
        from neu_model.inference.torch_model import load_torch_predictor  # torch only when torch runs

        return load_torch_predictor(path, device, mirror)
    if not path.is_file():
        raise StageError(f"{path}: not exported; run the export stage (python -m neu_model.inference.export)")
    try:
        if variant.runtime == "onnx":
            return OnnxPredictor(path, threads)
        return OpenVinoPredictor(path, variant.precision, threads)
    except ImportError as exc:
        package = PACKAGES.get((exc.name or "").split(".")[0], exc.name)
        raise StageError(f"runtime {name!r} needs the {package} package, which is not installed here: "
                         f"pip install {package}, or choose another --runtime") from None


def images_per_second(predictor: Predictor, batch_size: int = 64, passes: int = 5, size: int = 200) -> float:
    """Median throughput over ``passes`` calls on one batch of noise (the cost does not depend on
    the pixels), after one warm-up call."""
    batch = np.random.default_rng(0).random((batch_size, 1, size, size), dtype=np.float32)
    predictor.predict(batch)
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        predictor.predict(batch)
        seconds.append(time.perf_counter() - start)
    return batch_size / float(np.median(seconds))


def offered(report: Mapping[str, Any] | None) -> list[str]:
    """The variants an export report kept (passed parity, or accuracy for int8 / bf16)."""
    variants = (report or {}).get("variants", {})
    return [name for name, entry in variants.items() if entry.get("kept") and name in VARIANTS]


def fastest_passing(report: Mapping[str, Any] | None, models_dir: Path = MODELS_DIR,
                    batch_size: int = 64) -> tuple[str, Predictor | None]:
    """The default runtime on this machine: the fastest at ``batch_size``, timed here, of torch
    (the reference) and the variants the export report kept; ``torch`` when none of them loads.

    Returns:
        The name and the very predictor that was timed, so that what runs is what was measured
        (None when nothing loaded).
        A variant whose runtime package or file is missing here is left out, not an error.
    """
    mirror = bool((report or {}).get("mirror", False))
    timed: dict[str, tuple[float, Predictor]] = {}
    for name in ["torch", *offered(report)]:
        try:
            predictor = variant_predictor(name, models_dir, mirror)
            timed[name] = (images_per_second(predictor, batch_size), predictor)
        except (ImportError, StageError, RuntimeError):
            continue
    if not timed:  # nothing loads: torch, whose loading then says why
        return "torch", None
    name = max(timed, key=lambda key: timed[key][0])
    return name, timed[name][1]
