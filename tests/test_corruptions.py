"""The robustness suite is fixed, valid, and actually corrupts; augmentation is seeded."""

import pytest
import torch

from neu_model.data import corruptions
from neu_model.training.augment import augment


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 1, 200, 200, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(corruptions.SUITE))
def test_each_suite_corruption_is_deterministic_in_range_and_changes_pixels(images, name):
    severity = corruptions.SUITE[name][1][-1]
    a = corruptions.corrupt(images, name, severity)
    assert torch.equal(a, corruptions.corrupt(images, name, severity))
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    assert (a - images).abs().mean() > 1e-3


def test_augment_is_reproducible_per_seed(images):
    run = lambda seed: augment(images, "robust", torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert torch.equal(augment(images, "none", torch.Generator()), images)


def test_unknown_augment():
    with pytest.raises(ValueError, match="unknown augment"):
        augment(torch.zeros(1, 1, 8, 8), "wild", torch.Generator())


def test_geometric_is_a_symmetry_of_a_reflect_padded_crop():
    import torch.nn.functional as F

    from neu_model.training.augment import geometric

    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    pad = 3
    out = geometric(x, torch.Generator().manual_seed(0), pad=pad)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    for i in range(len(x)):
        candidates = [
            torch.rot90(crop.flip(-1) if flip else crop, turns, dims=(-2, -1))
            for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)
            for crop in [padded[i, :, oy: oy + 12, ox: ox + 12]]
            for flip in (False, True) for turns in range(4)
        ]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_robust_one_leaves_a_share_of_the_batch_clean(images):
    from neu_model.training.augment import photometric_one

    x = torch.rand(400, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = photometric_one(x, torch.Generator().manual_seed(0), p=0.75)
    clean = (out == x).flatten(1).all(1).float().mean().item()
    assert 0.15 < clean < 0.45  # 25 % untouched, plus the few that a mild corruption leaves unchanged
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("turn_probability", [0.0, 0.2, 1.0])
def test_turn_probability_sets_the_share_of_images_turned_90_degrees(turn_probability):
    from neu_model.training.augment import geometric

    x = torch.rand(400, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    out = geometric(x, torch.Generator().manual_seed(0), pad=0, turn_probability=turn_probability)
    flips = [[], [-1], [-2], [-1, -2]]
    kept = [any(torch.equal(out[i], x[i].flip(d) if d else x[i]) for d in flips) for i in range(len(x))]
    turned = [any(torch.equal(out[i], (x[i].flip(d) if d else x[i]).transpose(-1, -2)) for d in flips)
              for i in range(len(x))]
    # each image either keeps its orientation or is turned
    assert all(k != t for k, t in zip(kept, turned, strict=True))
    assert sum(turned) / len(x) == pytest.approx(turn_probability, abs=0.06)


def test_roll_marks_darken_a_few_whole_columns_of_a_share_of_the_batch():
    from neu_model.training.augment import roll_marks

    x = torch.full((400, 1, 40, 50), 0.8)
    out = roll_marks(x, torch.Generator().manual_seed(0), p=0.3)
    marked = (out != x).flatten(1).any(1)
    assert marked.float().mean().item() == pytest.approx(0.3, abs=0.06)
    assert torch.equal(out[~marked], x[~marked])  # the rest untouched
    ratio = out[marked] / 0.8
    assert ratio.max() <= 1 and ratio.min() >= 0.8 ** 3 - 1e-6  # only darker: 20 % at most a line, 3 lines at most
    touched = (ratio < 1).any(dim=-2)  # columns a mark crosses, per image
    assert touched.sum(-1).max().item() <= 3 * 6  # at most 3 lines, each under 6 px wide
    assert ((ratio < 1).all(dim=-2) == touched).all()  # every marked column is marked from top to bottom


@pytest.mark.parametrize("turn_probability", [0.0, 1.0])
def test_roll_marks_are_drawn_before_the_turns(turn_probability):
    x = torch.full((100, 1, 32, 32), 0.5)
    out = augment(x, "geometric", torch.Generator().manual_seed(3), turn_probability, roll_mark_share=1.0)
    along_columns = out.std(dim=-2).mean().item()  # how much a column changes from top to bottom
    along_rows = out.std(dim=-1).mean().item()
    assert along_rows > 0 and along_columns > 0
    # unturned images keep their marks as columns; turned ones (all of them at 1.0) as rows
    assert (along_columns < along_rows) == (turn_probability == 0.0)
