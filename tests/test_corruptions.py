"""The robustness suite is fixed, valid, and actually corrupts; augmentation is seeded."""

import pytest
import torch

from neu_model import corruptions
from neu_model.augment import augment


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
