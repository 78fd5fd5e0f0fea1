"""Writing the ONNX graphs: the model as ONNX (torch.onnx's dynamo exporter) and its int8 twin.

The graph keeps the registered model's contract: ``images`` float32 (N, 1, H, W) grayscale in
[0, 1] in, any N; ``probabilities`` (N, 6) in class order Cr, In, Pa, PS, RS, Sc out. Used by the
export stage (``neu_model.inference.export``) and the inference benchmark; nothing here runs a model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neu_model.core.config import CLASSES
from neu_model.core.files import atomic_path
from neu_model.model.networks import MaxPool2x2, TrimmedPool2d

OPSET = 18
INPUT_NAME, OUTPUT_NAME, UNKNOWN_OUTPUT = "images", "probabilities", "unknown_score"


class PooledTrimmedMean(nn.Module):
    """``TrimmedPool2d`` from pooling kernels: (4 x mean - max - min) / 2 of each 2x2 block, the
    minimum being minus the max pool of the negated image. The same numbers in PyTorch; in a
    graph three pooling kernels instead of four strided Slice nodes and six elementwise nodes
    (ONNX Runtime spent a third of its time in that stem)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool2d(x, 2) * 4 - F.max_pool2d(x, 2) + F.max_pool2d(-x, 2)) * 0.5


def native_pooling(net: nn.Module) -> nn.Module:
    """``net`` with its strided-view poolings replaced by pooling kernels (in place): each
    ``MaxPool2x2`` by ``nn.MaxPool2d(2)``, each ``TrimmedPool2d`` by ``PooledTrimmedMean``.

    The views are faster in eager PyTorch; in ONNX Runtime and OpenVINO the pooling kernels
    are, and they give the same numbers (parity checks it).
    """
    for name, child in net.named_children():
        if isinstance(child, MaxPool2x2):
            setattr(net, name, nn.MaxPool2d(2))
        elif isinstance(child, TrimmedPool2d):
            setattr(net, name, PooledTrimmedMean())
        else:
            native_pooling(child)
    return net


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the named loggers to WARNING for the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=False):
            logger.setLevel(level)


def export_onnx(model: nn.Module, path: Path, image_size: int = 200, metadata: dict[str, str] | None = None,
                unknown: bool = False) -> None:
    """Write ``model`` (images to probabilities, and with ``unknown`` to (probabilities, unknown
    score)) as ONNX with a dynamic batch dimension.

    torch.export-based exporter (``dynamo=True``): the legacy TorchScript exporter is
    deprecated, warns on Detrend's shape check and writes four times the nodes for the same graph.
    """
    import onnx

    example = torch.rand(2, 1, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    # The exporter prints its progress to stdout, which a stage keeps for results, and logs
    # every rewrite of its optimiser at INFO.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), quiet_loggers("onnxscript", "onnx_ir"):
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=OPSET,
                                    input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME, *([UNKNOWN_OUTPUT] if unknown else [])],
                                    dynamic_shapes=({0: batch},), external_data=False, optimize=True)
    proto = program.model_proto
    proto.doc_string = (f"NEU-CLS surface-defect classifier: {INPUT_NAME} float32 (N, 1, {image_size}, {image_size}) "
                        f"grayscale in [0, 1] -> {OUTPUT_NAME} (N, {len(CLASSES)}) in class order {', '.join(CLASSES)}"
                        + (f", {UNKNOWN_OUTPUT} (N,): above metadata unknown_threshold, unlike the training images"
                           if unknown else ""))
    onnx.helper.set_model_props(proto, {"classes": ",".join(CLASSES), **(metadata or {})})
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray, batch_size: int = 32) -> None:
    """ONNX Runtime static quantisation (QDQ; int8 weights per channel, uint8 activations) of the
    convolutions, poolings and classifier, calibrated on ``calibration`` images.

    The stem's detrending (a MatMul over raw pixels) and standardisation stay fp32. Activation
    ranges are the 99.999th percentiles: on the seed-0 model they changed half as many
    predictions under the corruption suite as the min-max ranges (25 against 45 of 15,660).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Batches of one size: the percentile calibrator stacks every batch's activations and fails
    # on a shorter last batch (100 images in batches of 32, say).
    size = max((d for d in range(1, min(batch_size, len(calibration)) + 1) if len(calibration) % d == 0), default=1)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calibration[i: i + size] for i in range(0, len(calibration), size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    # The percentile calibrator prints its progress to stdout.
    with (tempfile.TemporaryDirectory() as work, atomic_path(int8_path) as tmp,
          quiet_loggers("onnxruntime.quantization"), contextlib.redirect_stdout(io.StringIO())):
        prepared = Path(work) / "prepared.onnx"  # shapes inferred, graph simplified: what the quantiser expects
        try:
            quant_pre_process(str(fp32_path), str(prepared))
        except TypeError:  # ORT's symbolic shape inference fails on some graphs (TopK of the knn score)
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=["Conv", "MaxPool", "GlobalAveragePool", "Gemm"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile)
