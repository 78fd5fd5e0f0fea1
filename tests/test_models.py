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


def test_trimmed_pool_is_the_mean_of_the_middle_two_and_drops_one_outlier_per_block():
    from neu_model.model import TrimmedPool2d

    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    blocks = x.reshape(2, 1, 3, 2, 3, 2).permute(0, 1, 2, 4, 3, 5).reshape(2, 1, 3, 3, 4).sort(-1).values
    assert torch.allclose(TrimmedPool2d()(x), (blocks[..., 1] + blocks[..., 2]) / 2, atol=1e-6)
    flat = torch.full((1, 1, 4, 4), 0.5)
    dusty = flat.clone()
    dusty[0, 0, ::2, ::2] = 0.0  # one dark pixel in every 2x2 block
    assert torch.allclose(TrimmedPool2d()(dusty), TrimmedPool2d()(flat))


@pytest.mark.parametrize("size", [100, 25])
def test_max_pool_2x2_equals_native_pooling_with_and_without_autograd(size):
    from neu_model.model import MaxPool2x2

    x = torch.randn(3, 8, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(MaxPool2x2()(x), torch.nn.MaxPool2d(2)(x))
    ours, native = x.clone().requires_grad_(), x.clone().requires_grad_()
    MaxPool2x2()(ours).sum().backward()
    torch.nn.MaxPool2d(2)(native).sum().backward()
    assert torch.equal(ours.grad, native.grad)


def test_defectnet_stays_cheap():
    model = build_model("defectnet")
    assert count_macs(model) < 35e6 and count_params(model) < 1e6


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folding_batchnorm_keeps_the_outputs(name):
    from neu_model.model import fuse_batchnorm

    torch.manual_seed(0)
    model = build_model(name)
    for m in model.modules():  # non-trivial statistics, or folding would be a no-op
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0), m.weight.data.normal_()
    model.eval()
    x = torch.rand(2, 1, 200, 200)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_batchnorm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        assert torch.allclose(fused(x), expected, atol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fuse_batchnorm(build_model(name).train())


@pytest.mark.parametrize("degree", [1, 2])
def test_detrend_is_the_least_squares_residual_of_a_polynomial_surface(degree):
    from neu_model.model import Detrend

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 20, 30, generator=gen, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 20, dtype=torch.float64),
                            torch.linspace(-1, 1, 30, dtype=torch.float64), indexing="ij")
    terms = [torch.ones_like(xs), xs, ys] + ([xs * xs, ys * ys, xs * ys] if degree == 2 else [])
    basis = torch.stack([t.flatten() for t in terms], 1)
    flat = x.reshape(3, -1).T
    fit = basis @ torch.linalg.lstsq(basis, flat).solution
    assert torch.allclose(Detrend(degree)(x), (flat - fit).T.reshape(x.shape), atol=1e-10)


def test_detrend_removes_uneven_light_and_keeps_the_defect():
    from neu_model.model import Detrend

    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 40), torch.linspace(-1, 1, 40), indexing="ij")
    defect = torch.zeros(1, 1, 40, 40)
    defect[..., 18:22, 5:35] = -0.2  # a dark streak
    lit = defect + 0.5 + 0.3 * xs - 0.2 * ys + 0.1 * ys * ys  # a gradient and a vignette
    assert torch.allclose(Detrend(2)(lit), Detrend(2)(defect), atol=1e-5)
    assert Detrend(2)(defect)[..., 20, 20] < -0.15  # the streak is still there
    assert not torch.allclose(Detrend(1)(lit), Detrend(1)(defect), atol=1e-3)  # a plane leaves the vignette
    with pytest.raises(ValueError, match="choose 1 or 2"):
        Detrend(3)
