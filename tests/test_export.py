"""The ONNX export and the runtimes: the same probabilities as PyTorch in every runtime and client."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from neu_model.core.config import CLASSES, load_config
from neu_model.core.files import sha256_file
from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError
from neu_model.data.dataset import load_images, to_float
from neu_model.inference import export, onnx_graphs, runtimes
from neu_model.inference.torch_model import TorchPredictor, probability_model
from neu_model.model.networks import build_model, fuse_batchnorm

from conftest import FIXTURE_IMAGES, documented_onnx_client

TOLERANCE = 1e-4  # the stage's fp32 parity tolerance (float rounding, scaled up by LOGIT_SCALE)
FILES = sorted(FIXTURE_IMAGES.glob("*.bmp"))
LOGIT_SCALE = 2000


def seeded_net() -> torch.nn.Module:
    """An untrained default model with seeded weights and batch-norm statistics of its own.

    Its head is rescaled and centred on the fixture images so that, as with a trained model,
    probabilities range from near 0 to near 1 and the predicted class varies: an untrained head
    gives every image about 1/6 per class and the same argmax, which would hide errors.
    """
    torch.manual_seed(0)
    net = build_model("defectnet")
    with torch.no_grad():
        net.train()(torch.rand(16, 1, 200, 200))  # running statistics other than 0 and 1
        net = fuse_batchnorm(net.eval())
        net.head[-1].weight.mul_(LOGIT_SCALE)
        net.head[-1].bias.sub_(net(to_float(load_images(FILES))).mean(0))
    return net


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return to_float(load_images(FILES)).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """The seeded model exported plain and mirror-averaged."""
    out = tmp_path_factory.mktemp("onnx")
    paths = {"plain": out / "plain.onnx", "mirror": out / "mirror.onnx"}
    for name, path in paths.items():
        model = probability_model(onnx_graphs.native_pooling(seeded_net()), mirror=name == "mirror")
        onnx_graphs.export_onnx(model, path, metadata={"mirror": str(name == "mirror").lower()})
    return paths


def torch_probs(x: np.ndarray, mirror: bool = False) -> np.ndarray:
    return TorchPredictor(seeded_net(), mirror=mirror).predict(x)


def test_native_pooling_gives_the_same_numbers():
    x = torch.rand(3, 1, 200, 200)
    with torch.no_grad():
        assert (seeded_net()(x) - onnx_graphs.native_pooling(seeded_net())(x)).abs().max() < 1e-6


@pytest.mark.parametrize("n", [1, 5, 30])  # 30: chunks of CHUNK run in parallel
def test_onnx_matches_torch_for_any_batch_size(exported, images, n):
    assert runtimes.CHUNK < 30  # so that the largest batch takes the chunked path
    probs = runtimes.OnnxPredictor(exported["plain"]).predict(images[:n])
    expected = torch_probs(images[:n])
    assert probs.shape == (n, len(CLASSES))
    assert np.abs(probs - expected).max() < TOLERANCE
    assert (probs.argmax(1) == expected.argmax(1)).all()


def test_onnx_rows_are_probabilities(exported, images):
    probs = runtimes.OnnxPredictor(exported["plain"]).predict(images)
    assert (probs >= 0).all() and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_mirror_graph_averages_each_image_with_its_mirror_image(exported, images):
    probs = runtimes.OnnxPredictor(exported["mirror"]).predict(images[:7])
    net = seeded_net()
    with torch.no_grad():
        x = torch.from_numpy(images[:7])
        expected = ((net(x).softmax(1) + net(x.flip(-1)).softmax(1)) / 2).numpy()
    assert np.abs(probs - expected).max() < TOLERANCE
    assert np.abs(probs - torch_probs(images[:7])).max() > 1e-3  # the mirror image does change the answer
    assert np.abs(probs - torch_probs(images[:7], mirror=True)).max() < TOLERANCE


@pytest.mark.parametrize("n", [1, 5, 30])  # 30: chunks of CHUNK run in parallel, the last one padded
@pytest.mark.slow
def test_openvino_fp32_agrees_with_torch(exported, images, n):
    for path, mirror in ((exported["plain"], False), (exported["mirror"], True)):
        probs = runtimes.OpenVinoPredictor(path).predict(images[:n])
        assert probs.shape == (n, len(CLASSES))
        assert np.abs(probs - torch_probs(images[:n], mirror)).max() < TOLERANCE


def test_plain_client_reproduces_the_predictions(exported, images):
    answers = documented_onnx_client()["classify"](exported["plain"], FILES)  # numpy, PIL, onnxruntime only
    expected = torch_probs(images)
    assert [c for c, _ in answers] == [CLASSES[i] for i in expected.argmax(1)]
    assert np.allclose([p for _, p in answers], expected.max(1), atol=TOLERANCE)


def test_int8_calibration_takes_a_count_that_no_batch_size_divides(exported, images, tmp_path):
    assert len(images) % 4  # 30 images in batches of up to 4: the calibrator needs batches of one size
    onnx_graphs.quantize_int8(exported["plain"], tmp_path / "int8.onnx", images, batch_size=4)
    int8 = onnx.load(tmp_path / "int8.onnx")
    assert any(node.op_type == "QuantizeLinear" for node in int8.graph.node)
    probs = runtimes.OnnxPredictor(tmp_path / "int8.onnx").predict(images)
    assert probs.shape == (len(images), len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_the_file_states_its_contract(exported):
    model = onnx.load(exported["mirror"])
    props = {p.key: p.value for p in model.metadata_props}
    assert props["classes"] == ",".join(CLASSES) and props["mirror"] == "true"
    (image,), (output,) = model.graph.input, model.graph.output
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", 1, 200, 200]
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", len(CLASSES)]


def test_predictors_refuse_a_batch_without_channel_axis(exported, images):
    with pytest.raises(ValueError, match=r"expected float32 \(N, 1, H, W\)"):
        runtimes.OnnxPredictor(exported["plain"]).predict(images[:2, 0])


FP32 = {"changed_predictions": 0, "max_prob_diff": 3e-8, "errors": 10, "robustness_mean": 0.9}


@pytest.mark.parametrize(("name", "figures", "kept"), [
    ("onnx", FP32, True),
    ("onnx", FP32 | {"changed_predictions": 1}, False),
    ("openvino", FP32 | {"max_prob_diff": 2e-4}, False),
    ("onnx-int8", FP32 | {"changed_predictions": 4, "errors": 11, "robustness_mean": 0.8975}, True),
    ("onnx-int8", FP32 | {"errors": 12}, False),
    ("openvino-bf16", FP32 | {"errors": 8}, False),
    ("openvino-int8", FP32 | {"robustness_mean": 0.896}, False),
])
def test_verdict_applies_the_rules(name, figures, kept):
    assert export.verdict(name, figures, FP32, load_config().export)[0] is kept


def test_the_stage_takes_its_settings_from_the_config_and_set_overrides(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(export, "export", lambda cfg, files: seen.update(cfg=cfg, files=files) or {"offered": []})
    (tmp_path / "model.pt").write_bytes(b"x")
    export.main(["--model", str(tmp_path / "model.pt"), "--set", "export.tolerance=2e-4", "--set",
                 "inference.mirror=false", "--set", "export.max_accuracy_images=0"])  # as dvc exp run -S writes them
    cfg = seen["cfg"]
    assert (cfg.export.tolerance, cfg.inference.mirror, cfg.export.max_accuracy_images) == (2e-4, False, 0)
    assert seen["files"] == export.ExportFiles(model=tmp_path / "model.pt")
    export.main(["--model", str(tmp_path / "model.pt")])
    assert seen["cfg"].export == load_config().export and seen["cfg"].inference == load_config().inference


@pytest.mark.slow
def test_fastest_passing_falls_back_to_torch_and_returns_what_it_timed(tmp_path, exported):
    from neu_model.inference.torch_model import TorchPredictor

    torch.save({"model_name": "defectnet", "state_dict": build_model("defectnet").state_dict()}, tmp_path / "model.pt")
    name, predictor = runtimes.fastest_passing(None, tmp_path)
    assert name == "torch" and isinstance(predictor, TorchPredictor)
    # kept, but its file is not here: left out
    assert runtimes.fastest_passing({"variants": {"onnx": {"kept": True}}}, tmp_path)[0] == "torch"
    (tmp_path / "model.pt").unlink()
    (tmp_path / "model.onnx").write_bytes(exported["plain"].read_bytes())
    name, predictor = runtimes.fastest_passing({"variants": {"onnx": {"kept": True}}}, tmp_path)
    assert name == "onnx" and isinstance(predictor, runtimes.OnnxPredictor)
    assert runtimes.fastest_passing({"variants": {"onnx": {"kept": False}}}, tmp_path) == ("torch", None)


def test_runtimes_load_no_training_tracking_or_runtime_packages():
    code = ("import sys, neu_model.inference.runtimes; print(sorted(m for m in ('onnxruntime', 'openvino', 'mlflow', "
            "'matplotlib', 'neu_model.training.train', 'neu_model.registry.tracking') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(StageError, match="model.onnx: not exported; run the export stage"):
        runtimes.variant_predictor("onnx", tmp_path)
    with pytest.raises(StageError, match="unknown runtime 'tensorrt'"):
        runtimes.variant_predictor("tensorrt", tmp_path)
    # The test images exist, so the missing model is what fails.
    (tmp_path / "split.csv").write_text(f"file,label,split\n{FILES[0].name},{FILES[0].name[:2]},test\n")
    bad = subprocess.run([sys.executable, "-m", "neu_model.inference.export", "--model", str(tmp_path / "model.pt"),
                          "--split", str(tmp_path / "split.csv"), "--images", str(FIXTURE_IMAGES)], check=False,
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'model.pt'}: no trained model; run the pipeline first (make pipeline)"]


def fixture_split(path: Path) -> list[str]:
    """A split of the fixture images, a third of them test, written to ``path``; returns the names."""
    files = [f.name for f in FILES]
    pd.DataFrame({"file": files, "label": [f.split("_")[0] for f in files],
                  "split": ["test" if i % 3 == 0 else "train" for i in range(len(files))]}).to_csv(path, index=False)
    return files


@pytest.mark.slow
def test_stage_writes_graphs_and_a_report(tmp_path):
    fixture_split(tmp_path / "split.csv")
    torch.manual_seed(0)
    torch.save({"model_name": "defectnet", "state_dict": build_model("defectnet").state_dict()}, tmp_path / "model.pt")
    export.main(["--model", str(tmp_path / "model.pt"), "--split", str(tmp_path / "split.csv"),
                 "--images", str(FIXTURE_IMAGES), "--out-dir", str(tmp_path / "models"),
                 "--report", str(tmp_path / "export.json"), "--set", "inference.mirror=true",
                 "--set", "export.calibration_images=8"])
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["mirror"] is True and report["n_test"] == 10
    models = tmp_path / "models"
    assert report["model_sha256"] == sha256_file(tmp_path / "model.pt")
    assert (report["onnx_sha256"], report["int8_sha256"]) == (sha256_file(models / "model.onnx"),
                                                               sha256_file(models / "model.int8.onnx"))
    for name in ("onnx", "openvino"):
        figures = report["variants"][name]
        assert figures["kept"] and figures["changed_predictions"] == 0 and figures["max_prob_diff"] < 1e-4
        assert figures["accuracy"] == report["reference"]["accuracy"]
    for name in ("openvino-bf16", "onnx-int8", "openvino-int8"):
        assert isinstance(report["variants"][name]["kept"], bool) and report["variants"][name]["reason"]
    assert report["offered"] == [n for n, v in report["variants"].items() if v["kept"]]
    props = {p.key: p.value for p in onnx.load(tmp_path / "models" / "model.onnx").metadata_props}
    assert props["mirror"] == "true"
    int8 = onnx.load(tmp_path / "models" / "model.int8.onnx")
    assert any(node.op_type == "QuantizeLinear" for node in int8.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["knn", "layers"])  # knn: well conditioned on 20 images, unlike one covariance
def test_the_unknown_score_is_a_second_output_with_its_threshold_and_parity(tmp_path, method):
    from neu_model.core.config import UnknownConfig
    from neu_model.inference.unknown import fit_for_weights

    files = fixture_split(tmp_path / "split.csv")
    torch.manual_seed(0)
    state = build_model("defectnet").state_dict()
    images = load_images(FILES)
    labels = torch.tensor([CLASSES.index(f.split("_")[0]) for f in files])
    stats = fit_for_weights("defectnet", {}, state, images[:20], labels[:20], images[20:],
                            UnknownConfig(method, 0.1, 1))
    torch.save({"model_name": "defectnet", "state_dict": state, "unknown": stats}, tmp_path / "model.pt")
    export.main(["--model", str(tmp_path / "model.pt"), "--split", str(tmp_path / "split.csv"),
                 "--images", str(FIXTURE_IMAGES), "--out-dir", str(tmp_path / "models"),
                 "--report", str(tmp_path / "export.json"), "--set", "export.calibration_images=8"])
    graph = onnx.load(tmp_path / "models" / "model.onnx")
    assert [o.name for o in graph.graph.output] == ["probabilities", "unknown_score"]
    assert {p.key: p.value for p in graph.metadata_props}["unknown_threshold"] == repr(stats["threshold"])
    report = json.loads((tmp_path / "export.json").read_text())
    for name in ("onnx", "openvino"):
        entry = report["variants"][name]
        assert entry["kept"] and entry["unknown_changed_flags"] == 0 and entry["unknown_max_rel_diff"] < 1e-4
        assert entry["unknown_tiles"] > len(files) // 3  # the test images and every non-steel set
    x = to_float(images).numpy()
    onnx_model = runtimes.OnnxPredictor(tmp_path / "models" / "model.onnx")
    torch_model = runtimes.variant_predictor("torch", tmp_path, mirror=load_config().inference.mirror)
    probs, scores = onnx_model.predict_scored(x)
    ref_probs, ref_scores = torch_model.predict_scored(x)
    np.testing.assert_allclose(probs, ref_probs, atol=TOLERANCE)
    # as the stage judges it: relative to the threshold (layers' covariances, fitted here on 20 images,
    # magnify float rounding in single scores; the real model's figures are in the export report)
    assert np.abs(scores - ref_scores).max() <= 1e-3 * abs(stats["threshold"]) + 1e-5
    assert ((scores > stats["threshold"]) == (ref_scores > stats["threshold"])).all()
    assert onnx_model.unknown_threshold == torch_model.unknown_threshold == stats["threshold"]
