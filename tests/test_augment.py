"""Augmentation on any device: the CPU output is unchanged bit for bit; a GPU makes the same choices."""

import importlib.util

import pytest
import torch

from neu_model.data.dataset import load_images, to_float
from neu_model.training.augment import AUGMENTS, augment, gather_views

from conftest import FIXTURE_IMAGES


def _reference():
    """neu_model/training/augment.py as it was before the GPU path (a frozen copy in tests/fixtures)."""
    spec = importlib.util.spec_from_file_location("augment_cpu_reference",
                                                  FIXTURE_IMAGES.parent / "augment_cpu_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return to_float(load_images(sorted(FIXTURE_IMAGES.glob("*.bmp"))[:16]))


@pytest.mark.parametrize("kind", AUGMENTS)
@pytest.mark.parametrize("seed", [0, 7])
def test_cpu_output_is_the_one_before_the_gpu_path_bit_for_bit(batch, kind, seed):
    reference = _reference()
    for turn, roll in ((0.5, 0.0), (0.2, 0.3), (1.0, 1.0)):
        old = reference.augment(batch, kind, torch.Generator().manual_seed(seed), turn, roll)
        new = augment(batch, kind, torch.Generator().manual_seed(seed), turn, roll)
        assert torch.equal(old, new), (kind, seed, turn, roll)
    if kind != "none":
        assert not torch.equal(new, batch)  # it did augment


@pytest.mark.parametrize("size", [(200, 200), (40, 56)])
@pytest.mark.slow
def test_the_gpu_gather_places_the_same_pixels_as_the_per_image_views(size):
    h, w = size
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(24, 1, h, w, generator=gen)
    pad = 16
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    flips = torch.rand(24, 3, generator=gen) < 0.5
    offsets = torch.randint(0, 2 * pad + 1, (24, 2), generator=gen)
    for i in range(24):
        (row, col), (flip_rows, flip_cols, turn) = offsets[i].tolist(), flips[i].tolist()
        view = padded[i, :, row:row + h, col:col + w]
        view = view.flip(-2) if flip_rows else view
        view = view.flip(-1) if flip_cols else view
        expected = view.transpose(-1, -2) if turn and h == w else view
        assert torch.equal(gather_views(padded, offsets, flips, h, w)[i], expected), i
    assert flips.any(0).all() and (~flips).any(0).all()  # every flip and turn both taken and not


def test_choices_come_from_the_cpu_generator_only(batch):
    """The pixel noise has its own generator; the geometry and roll marks never read it."""
    a = augment(batch, "geometric", torch.Generator().manual_seed(1), 0.5, 0.5, noise_gen=torch.Generator())
    b = augment(batch, "geometric", torch.Generator().manual_seed(1), 0.5, 0.5,
                noise_gen=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    noisy = [augment(batch, "robust", torch.Generator().manual_seed(1), noise_gen=torch.Generator().manual_seed(s))
             for s in (1, 2)]
    assert not torch.equal(*noisy)  # with a noise corruption drawn, the noise generator matters


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_choices_are_the_cpu_ones(batch):
    cuda = torch.device("cuda")
    for roll in (0.0, 0.5):
        cpu = augment(batch, "geometric", torch.Generator().manual_seed(5), 0.5, roll)
        gpu = augment(batch.to(cuda), "geometric", torch.Generator().manual_seed(5), 0.5, roll,
                      noise_gen=torch.Generator(cuda).manual_seed(5))
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    out = augment(batch.to(cuda), "robust_one", torch.Generator().manual_seed(5), 0.2, 0.3,
                  noise_gen=torch.Generator(cuda).manual_seed(5))
    assert out.shape == batch.shape and 0 <= out.min() and out.max() <= 1
