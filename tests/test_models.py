"""Every registered model: output shape, finite values, gradients, cost figures."""

import pytest
import torch

from neu_model.config import CLASSES
from neu_model.model import MODELS, build_model, count_macs, count_params


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape_finite_and_trainable(name):
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.rand(3, 1, 200, 200)
    out = model(x)
    assert out.shape == (3, len(CLASSES))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cost_is_counted(name):
    model = build_model(name)
    assert count_macs(model) > 1e6 and count_params(model) > 1e4


def test_seed_cnn_matches_the_public_baseline():
    model = build_model("seed_cnn")
    assert model.classifier[1].in_features == 3200  # 128 x 5 x 5 after three 3x3 pools
    assert [m.out_features for m in model.classifier if isinstance(m, torch.nn.Linear)] == [512, 256, 6]


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope")
