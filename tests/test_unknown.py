"""Unknown input: the scores, their threshold, the non-steel sets and where the flag shows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from neu_model.core.config import ConfigError, load_config
from neu_model.data.foreign import foreign_sets, misdecoded_set, synthetic_set, wrong_scale_set
from neu_model.evaluation.unknown_metrics import set_figures
from neu_model.inference.predictors import scored_probabilities
from neu_model.inference.stripmap import UNKNOWN_COLOUR, strip_map
from neu_model.inference.torch_model import TorchPredictor, probability_model
from neu_model.inference.unknown import (
    METHODS,
    ScoredModel,
    UnknownScorer,
    fit_statistics,
    fit_unknown,
    method_scores,
    network_outputs,
    threshold_at,
)
from neu_model.model.networks import build_model, fuse_batchnorm


def seeded_net(name: str = "defectnet") -> torch.nn.Module:
    torch.manual_seed(0)
    return fuse_batchnorm(build_model(name).eval())


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 200, 200, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mirror", [False, True])
def test_scored_model_gives_the_probabilities_of_the_plain_path_and_the_score_of_the_image_as_given(mirror):
    net = seeded_net()
    x = images(5)
    _, features, _ = network_outputs(net, images(24, 1))
    labels = torch.arange(24) % 6
    scorer = UnknownScorer(fit_statistics("mahalanobis", features, labels, 6) | {"threshold": 1.0})
    with torch.no_grad():
        probs, scores = ScoredModel(net, scorer, mirror)(x)
        expected = probability_model(net, mirror)(x)
        plain_logits, plain_features, _ = network_outputs(net, x)
    assert torch.equal(probs, expected)  # bit for bit: the committed predictions stay what they were
    torch.testing.assert_close(scores, scorer(plain_logits, plain_features))


def test_each_method_scores_training_like_features_low_and_far_ones_high():
    torch.manual_seed(0)
    means = torch.eye(6, 16) * 10
    labels = torch.arange(600) % 6
    features = means[labels] + torch.randn(600, 16) * 0.5
    logits = features[:, :6]
    near, far = features[:5], torch.randn(5, 16) * 0.5 + 40
    for method in ("mahalanobis", "knn"):
        stats = fit_statistics(method, features, labels, 6, k=1)
        scorer = UnknownScorer(stats | {"threshold": 0.0})
        assert scorer(logits[:5], near).max() < scorer(far[:, :6], far).min(), method
    assert (method_scores("knn", logits, features, bank=fit_statistics("knn", features, labels, 6)["bank"])
            .abs().max() < 1e-5)  # a training feature is its own nearest neighbour
    confident, flat = torch.tensor([[10.0, 0, 0, 0, 0, 0]]), torch.zeros(1, 6)
    for method in ("msp", "energy", "maxlogit"):
        assert method_scores(method, flat, flat) > method_scores(method, confident, confident), method
    with pytest.raises(ValueError, match="choose one of"):
        method_scores("odin", flat, flat)


def test_threshold_flags_the_share_asked_for():
    scores = torch.arange(1000, dtype=torch.float32)
    threshold = threshold_at(scores, 0.01)
    assert int((scores > threshold).sum()) == 10
    assert threshold_at(torch.empty(0), 0.01) == math.inf


def test_fit_unknown_sets_the_threshold_on_validation_and_falls_back_to_training():
    net = seeded_net()
    train, labels, val = images(30, 1), torch.arange(30) % 6, images(40, 2)
    stats = fit_unknown(net, train, labels, val, "mahalanobis", 0.05)
    scores = UnknownScorer(stats)(*network_outputs(net, val))
    assert stats["threshold_on"] == "validation" and (scores > stats["threshold"]).float().mean() <= 0.05
    assert set(stats) >= {"means", "precision", "threshold", "method", "flag_share"}
    alone = fit_unknown(net, train, labels, val[:0], "energy", 0.1)
    assert alone["threshold_on"] == "training" and math.isfinite(alone["threshold"])


def test_the_torch_predictor_scores_with_the_statistics_of_its_file_and_without_them_says_none():
    net = seeded_net()
    x = images(4).numpy()
    stats = fit_unknown(net, images(30, 1), torch.arange(30) % 6, images(12, 2), "knn", 0.01, k=2)
    scored = TorchPredictor(net, meta={"unknown": stats}, mirror=True)
    probs, scores = scored_probabilities(scored, x)
    np.testing.assert_allclose(probs, TorchPredictor(net, mirror=True).predict(x), atol=1e-6)
    assert scores.shape == (4,) and scored.unknown_threshold == stats["threshold"]
    assert scored_probabilities(TorchPredictor(net), x)[1] is None


def test_the_non_steel_sets_are_tiles_generated_offline_and_the_same_every_time():
    neu = (images(6) * 255).to(torch.uint8).numpy()
    sets = foreign_sets(neu, sample=3)
    assert set(sets) == {"photos", "textures", "synthetic", "wrong_scale", "misdecoded"}
    for name, tiles in sets.items():
        assert tiles.dtype == np.uint8 and tiles.shape[1:] == (1, 200, 200) and len(tiles) >= 6, name
    again = foreign_sets(neu, sample=3)
    assert all(np.array_equal(sets[k], again[k]) for k in sets)
    flats = synthetic_set()[:8, 0]
    assert [int(t.min()) for t in flats] == [int(t.max()) for t in flats] == [0, 1, 32, 64, 128, 192, 254, 255]
    zoomed = wrong_scale_set(neu[:1], (2,))[0, 0]
    assert zoomed[0, 0] == neu[0, 0, 50, 50]  # the centre, enlarged
    assert len(misdecoded_set(neu[:2], [b"BM" + bytes(100)] * 2)) == 8


def test_separation_figures():
    steel, other = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.9, 1.0, np.inf, np.nan])
    figures = set_figures(steel, other, threshold=0.35)
    assert figures == {"auroc": 1.0, "fpr95_%": 0.0, "flagged_%": 100.0}
    mixed = set_figures(steel, np.array([0.15, 0.5]), threshold=0.35)
    assert mixed["flagged_%"] == 50.0 and 0 < mixed["auroc"] < 1 and mixed["fpr95_%"] == 75.0


def test_the_params_name_a_known_method_and_a_share():
    assert load_config().unknown.method in METHODS
    with pytest.raises(ConfigError, match="unknown.method='odin': choose one of msp, energy"):
        load_config(overrides=["unknown.method=odin"])
    with pytest.raises(ConfigError, match="unknown.flag_share=0.0 must be in"):
        load_config(overrides=["unknown.flag_share=0.0"])


def test_the_strip_map_fills_unknown_tiles_with_their_own_colour(tmp_path):
    image = np.full((200, 400), 0.5)
    out = strip_map(image, [(0, 0, "Cr", False, False), (200, 0, "Cr", True, True)], tmp_path / "m.png", tint=1.0)
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert tuple(pixels[100, 60]) != UNKNOWN_COLOUR and tuple(pixels[100, 300]) == UNKNOWN_COLOUR


def test_the_pyfunc_output_holds_the_probabilities_the_score_and_the_flag_and_flags_unreadable_pixels():
    from neu_model.registry.mlflow_model import PyfuncOutput

    net = seeded_net()
    stats = fit_unknown(net, images(30, 1), torch.arange(30) % 6, images(12, 2), "mahalanobis", 0.1)
    x = images(3)
    x[1, 0, 5, 5] = float("nan")
    with torch.no_grad():
        out = PyfuncOutput(net, stats, mirror=True)(x)
        probs, scores = ScoredModel(net, UnknownScorer(stats), True)(x)
    assert out.shape == (3, 8)
    torch.testing.assert_close(out[[0, 2], :6], probs[[0, 2]])
    assert out[1, 6] == math.inf and out[1, 7] == 1.0
    assert torch.equal(out[:, 7], (out[:, 6] > stats["threshold"]).float())
