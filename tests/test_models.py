"""Every registered model: output shape, finite values, gradients, cost figures, architecture knobs."""

import inspect

import pytest
import torch

from neu_model.core.config import CLASSES, load_config
from neu_model.model.networks import MODELS, build_model, count_macs, count_params


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


# Multiply-accumulates of one 200x200 image and trainable parameters of each default architecture,
# as docs/experiments.md records them; a change to a network changes these on purpose or not at all.
COSTS = {"defectnet": (14_564_160, 395_454), "defectnet_res": (27_922_176, 274_790),
         "seed_cnn": (275_447_808, 2_028_806)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cost_is_counted_exactly(name):
    model = build_model(name)
    assert (count_macs(model), count_params(model)) == COSTS[name]


def test_seed_cnn_matches_the_public_baseline():
    model = build_model("seed_cnn")
    assert model.classifier[1].in_features == 3200  # 128 x 5 x 5 after three 3x3 pools
    assert [m.out_features for m in model.classifier if isinstance(m, torch.nn.Linear)] == [512, 256, 6]


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope")


def test_unknown_keyword_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'defectnet' takes no argument depth; its arguments are num_classes, widths"):
        build_model("defectnet", depth=3)
    with pytest.raises(ValueError, match="takes no argument widths; its arguments are num_classes$"):
        build_model("seed_cnn", widths=(8, 16))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_params_arch_holds_the_constructor_defaults(name):
    """So the params.yaml default builds exactly the model the constructor builds by itself."""
    arch = load_config().train.recipes[name].arch
    defaults = {k: p.default for k, p in inspect.signature(MODELS[name]).parameters.items() if k != "num_classes"}
    assert dict(arch) == defaults
    torch.manual_seed(0)
    plain = build_model(name).state_dict()
    torch.manual_seed(0)
    configured = build_model(name, **arch).state_dict()
    assert plain.keys() == configured.keys() and all(torch.equal(plain[k], configured[k]) for k in plain)


# Every ablation the README and docs/model.md describe, as arch arguments.
ABLATIONS = [
    ("defectnet", {"detrend": 0}), ("defectnet", {"detrend": 1}), ("defectnet", {"stem": "avg"}),
    ("defectnet", {"standardize": False}), ("defectnet", {"standardize_scale": "mad"}),
    ("defectnet", {"widths": (16, 16, 32, 64, 128, 256)}), ("defectnet", {"pool": "avg"}),
    ("defectnet", {"global_pool": "avgmax"}), ("defectnet", {"global_pool": "catavgmax"}),
    ("defectnet", {"full_resolution": "phases"}), ("defectnet", {"full_resolution": "conv"}),
    ("defectnet_res", {"stem_conv": True}), ("defectnet_res", {"detrend": 2}),
]


@pytest.mark.parametrize("name,kwargs", ABLATIONS, ids=[f"{n}-{k}" for n, k in ABLATIONS])
def test_every_ablation_builds_a_different_working_model(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    x = torch.rand(2, 1, 200, 200, generator=torch.Generator().manual_seed(1))
    out = model(x)
    assert out.shape == (2, len(CLASSES)) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    torch.manual_seed(0)
    default = build_model(name).eval()
    layout = {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        if layout == {k: v.shape for k, v in default.state_dict().items()}:
            default.load_state_dict(model.state_dict())  # the same weights: only the knob differs
        assert not torch.allclose(model(x), default(x))


@pytest.mark.parametrize("kwargs,match", [({"stem": "median"}, "stem 'median'"), ({"pool": "min"}, "pool 'min'"),
                                          ({"detrend": 3}, "choose 1 or 2"), ({"global_pool": "max"}, "global_pool"),
                                          ({"standardize_scale": "iqr"}, "scale 'iqr'"),
                                          ({"full_resolution": "all"}, "full_resolution 'all'")])
def test_a_bad_knob_value_is_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("defectnet", **kwargs)


def test_seed_cnn_macs_counted_by_hand():
    convs = 32 * 1 * 25 * 196**2 + 64 * 32 * 25 * 61**2 + 128 * 64 * 25 * 16**2  # 5x5, no padding; 3x3 pools
    assert count_macs(build_model("seed_cnn")) == convs + 3200 * 512 + 512 * 256 + 256 * len(CLASSES)


def test_macs_include_detrends_two_matrix_products():
    with_detrend, without = count_macs(build_model("defectnet")), count_macs(build_model("defectnet", detrend=0))
    assert with_detrend - without == 2 * 100 * 100 * 6  # (1 x 10^4) @ (10^4 x 6), then (1 x 6) @ (6 x 10^4)
    assert with_detrend - count_macs(build_model("defectnet", detrend=1)) == 2 * 100 * 100 * 3


def test_mad_standardisation_scales_by_the_mean_absolute_deviation():
    from neu_model.model.layers import Standardize

    x = torch.rand(3, 1, 20, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    out = Standardize("mad")(x)
    mad = out.abs().mean(dim=(1, 2, 3))
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(mad, torch.ones(3, dtype=torch.float64), atol=1e-3)  # up to the 1e-3 guard
    assert not torch.allclose(Standardize("std")(x), out)


def test_trimmed_pool_is_the_mean_of_the_middle_two_and_drops_one_outlier_per_block():
    from neu_model.model.networks import TrimmedPool2d

    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    blocks = x.reshape(2, 1, 3, 2, 3, 2).permute(0, 1, 2, 4, 3, 5).reshape(2, 1, 3, 3, 4).sort(-1).values
    assert torch.allclose(TrimmedPool2d()(x), (blocks[..., 1] + blocks[..., 2]) / 2, atol=1e-6)
    flat = torch.full((1, 1, 4, 4), 0.5)
    dusty = flat.clone()
    dusty[0, 0, ::2, ::2] = 0.0  # one dark pixel in every 2x2 block
    assert torch.allclose(TrimmedPool2d()(dusty), TrimmedPool2d()(flat))


@pytest.mark.parametrize("size", [100, 25])
def test_max_pool_2x2_equals_native_pooling_with_and_without_autograd(size):
    from neu_model.model.networks import MaxPool2x2

    x = torch.randn(3, 8, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(MaxPool2x2()(x), torch.nn.MaxPool2d(2)(x))
    ours, native = x.clone().requires_grad_(), x.clone().requires_grad_()
    MaxPool2x2()(ours).sum().backward()
    torch.nn.MaxPool2d(2)(native).sum().backward()
    assert torch.equal(ours.grad, native.grad)


def test_defectnet_widths_scale_its_cost():
    small = build_model("defectnet", widths=(8, 16, 32, 64))
    assert count_macs(small) < COSTS["defectnet"][0] and count_params(small) < COSTS["defectnet"][1]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folding_batchnorm_keeps_the_outputs(name):
    from neu_model.model.networks import fuse_batchnorm

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
    from neu_model.model.networks import Detrend

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
    from neu_model.model.networks import Detrend

    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 40), torch.linspace(-1, 1, 40), indexing="ij")
    defect = torch.zeros(1, 1, 40, 40)
    defect[..., 18:22, 5:35] = -0.2  # a dark streak
    lit = defect + 0.5 + 0.3 * xs - 0.2 * ys + 0.1 * ys * ys  # a gradient and a vignette
    assert torch.allclose(Detrend(2)(lit), Detrend(2)(defect), atol=1e-5)
    assert Detrend(2)(defect)[..., 20, 20] < -0.15  # the streak is still there
    assert not torch.allclose(Detrend(1)(lit), Detrend(1)(defect), atol=1e-3)  # a plane leaves the vignette
    with pytest.raises(ValueError, match="choose 1 or 2"):
        Detrend(3)
