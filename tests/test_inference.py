"""neu_model.inference.torch_model: loading a saved model, batched logits, the pyfunc check, the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neu_model.core.stage import StageError
from neu_model.data.dataset import to_float
from neu_model.inference.predictors import predict_batched, probabilities
from neu_model.inference.torch_model import TorchPredictor, load_torch_model, predict_logits, select_device
from neu_model.model.networks import build_model


def _save(path, name: str, net: nn.Module, **extra) -> None:
    torch.save({"model_name": name, "state_dict": net.state_dict(), **extra}, path)


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 200, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def test_loads_the_architecture_of_the_saved_model_args(tmp_path):
    args = {"widths": (4, 8, 8, 16, 16, 32), "detrend": 1}
    torch.manual_seed(0)
    net = build_model("defectnet", **args).eval()
    _save(tmp_path / "model.pt", "defectnet", net, model_args=args)
    loaded, meta = load_torch_model(tmp_path / "model.pt")
    x = to_float(_images(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=1e-4, rtol=1e-4)
    assert meta["model_args"] == args and "state_dict" not in meta
    assert not loaded.training and not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())


def test_a_file_without_model_args_gets_the_default_architecture(tmp_path):
    torch.manual_seed(0)
    net = build_model("seed_cnn").eval()
    _save(tmp_path / "model.pt", "seed_cnn", net)
    loaded, _ = load_torch_model(tmp_path / "model.pt")
    x = to_float(_images(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_a_model_that_does_not_fit_is_a_one_line_error(tmp_path):
    _save(tmp_path / "model.pt", "defectnet", build_model("defectnet"), model_args={"widths": (4, 8, 8, 16, 16, 32)})
    not_saved_by_train = "not a model saved by neu_model.training.train"
    with pytest.raises(StageError, match=f"model.pt: {not_saved_by_train} .*size mismatch.*retrain it") as err:
        load_torch_model(tmp_path / "model.pt")
    assert "\n" not in str(err.value)  # torch's message has a line per tensor
    _save(tmp_path / "other.pt", "defectnet", build_model("defectnet"), model_args={"no_such_arg": 1})
    with pytest.raises(StageError, match=f"other.pt: {not_saved_by_train} .*no_such_arg") as err:
        load_torch_model(tmp_path / "other.pt")
    assert "\n" not in str(err.value)
    with pytest.raises(StageError, match="missing.pt: no trained model"):
        load_torch_model(tmp_path / "missing.pt")


def test_batched_logits_equal_one_pass_and_no_images_give_no_rows():
    torch.manual_seed(0)
    net = build_model("defectnet").eval()
    images = _images(5)
    with torch.no_grad():
        expected = net(to_float(images))
    cpu = torch.device("cpu")
    torch.testing.assert_close(predict_logits(net, images, cpu, batch_size=2), expected, atol=1e-4, rtol=1e-4)
    assert predict_logits(net, images[:0], cpu).shape == (0, 6)


class Constant:
    """A pyfunc stand-in that answers ``shape`` whatever it gets."""

    def __init__(self, columns: int) -> None:
        self.columns = columns

    def predict(self, data: np.ndarray) -> np.ndarray:
        assert data.dtype == np.float32 and 0 <= data.min() and data.max() <= 1
        return np.full((len(data), self.columns), 1 / self.columns)


def test_probabilities_checks_the_answer():
    probs = probabilities(Constant(6), to_float(_images(3)).numpy())
    assert probs.dtype == np.float32 and probs.shape == (3, 6)
    with pytest.raises(StageError, match=r"returned shape \(3, 5\), expected \(3, 6\)"):
        probabilities(Constant(5), to_float(_images(3)).numpy())


def test_predict_batched_keeps_order_and_type_and_answers_empty_input():
    items = np.arange(10, dtype=np.float32).reshape(10, 1)
    out = predict_batched(lambda part: np.repeat(part, 6, axis=1), items, batch_size=3)
    assert out.shape == (10, 6) and (out[:, 0] == np.arange(10)).all()
    tensors = predict_batched(lambda part: torch.as_tensor(part).repeat(1, 6), items, batch_size=4)
    assert isinstance(tensors, torch.Tensor) and tensors.shape == (10, 6)
    assert predict_batched(lambda part: part, items[:0]).shape == (0, 6)


def test_the_torch_predictor_is_softmax_of_the_network_and_mirror_averages(tmp_path):
    torch.manual_seed(0)
    net = build_model("defectnet").eval()
    x = to_float(_images(4)).numpy()
    with torch.no_grad():
        plain = net(torch.from_numpy(x)).softmax(1).numpy()
        flipped = net(torch.from_numpy(x[..., ::-1].copy())).softmax(1).numpy()
    np.testing.assert_allclose(TorchPredictor(net).predict(x), plain, atol=1e-5)
    np.testing.assert_allclose(TorchPredictor(net, mirror=True).predict(x), (plain + flipped) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="expected float32"):
        TorchPredictor(net).predict(x[:, 0])


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert select_device("auto").type == "cuda"
    else:
        assert select_device("auto").type in ("cpu", "mps")
