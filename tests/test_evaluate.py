"""Evaluation reports: metrics keys, confusion data, figures, robustness suite."""

import json

import pandas as pd
import pytest
import torch

from neu_model.data import corruptions
from neu_model.evaluation.evaluate import CURVE_THRESHOLDS, evaluate
from neu_model.evaluation.metrics import classification_metrics, review_curve, review_metrics

from conftest import tiny_config


@pytest.mark.slow
def test_reports_on_the_test_part(tiny_data, tiny_model, tmp_path):
    metrics = evaluate(tiny_config("evaluate.robustness=true"), tiny_model, tiny_data.split,
                       tiny_data.images, tmp_path)
    n_test = (pd.read_csv(tiny_data.split)["split"] == "test").sum()
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert {"accuracy", "macro_f1", "per_class", "robustness"} <= set(on_disk)
    assert set(on_disk["per_class"]) == {"Cr", "In", "Pa", "PS", "RS", "Sc"}
    assert set(on_disk["per_class"]["Cr"]) >= {"precision", "recall", "f1"}
    confusion = json.loads((tmp_path / "confusion.json").read_text())
    assert len(confusion) == n_test and set(confusion[0]) == {"actual", "predicted"}
    correct = sum(c["actual"] == c["predicted"] for c in confusion)
    assert on_disk["accuracy"] == round(correct / n_test, 6)
    for png in ("confusion.png", "misclassified.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    robustness = pd.read_csv(tmp_path / "robustness.csv")
    assert len(robustness) == sum(len(s) for _, s in corruptions.SUITE.values())
    assert 0 <= on_disk["robustness"]["mean_accuracy"] <= 1
    # review under corruption: the share flagged and the errors let through, per case and overall
    assert ((robustness["accepted_errors"] >= 0)
            & (robustness["accepted_errors"] <= round((1 - robustness["accuracy"]) * n_test))).all()
    assert on_disk["review"]["suite_flagged_share"] == round(robustness["flagged_share"].mean(), 6)
    assert on_disk["review"]["suite_accepted_error_rate"] == \
        round(robustness["accepted_errors"].sum() / (n_test * len(robustness)), 6)
    unknown = on_disk["unknown"]  # the flag on the test images, the non-steel sets and the corrupted images
    assert unknown["method"] == tiny_config().unknown.method and unknown["test_images"] == n_test
    assert set(unknown["sets"]) == {"photos", "textures", "synthetic", "wrong_scale", "misdecoded"}
    assert unknown["non_steel_tiles"] == sum(s["tiles"] for s in unknown["sets"].values())
    assert 0 <= unknown["auroc"] <= 1 and 0 <= unknown["corrupted_flagged_share"] <= 1
    assert len(unknown["corrupted_cases"]) == len(robustness)


@pytest.mark.slow
def test_review_threshold_reaches_the_corruption_suite(tiny_data, tiny_model, tmp_path):
    n_test = (pd.read_csv(tiny_data.split)["split"] == "test").sum()
    for threshold, flagged in ((0.0, 0.0), (1.0, 1.0)):  # nothing flagged, everything flagged
        evaluate(tiny_config("evaluate.robustness=true", f"review.below_confidence={threshold}"), tiny_model,
                 tiny_data.split, tiny_data.images, tmp_path)
        table = pd.read_csv(tmp_path / "robustness.csv")
        assert (table["flagged_share"] == flagged).all()
        errors = ((1 - table["accuracy"]) * n_test).round().astype(int)
        assert list(table["accepted_errors"]) == (list(errors) if threshold == 0 else [0] * len(table))


@pytest.mark.slow
def test_review_reports_agree_with_the_predictions(tiny_data, tiny_model, tmp_path):
    # 0.4: the 1-epoch tiny model is unsure, so some images fall on each side
    metrics = evaluate(tiny_config("evaluate.robustness=false", "review.below_confidence=0.4"), tiny_model,
                       tiny_data.split, tiny_data.images, tmp_path)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert (predictions["needs_review"] == (predictions["confidence"] < 0.4)).all()
    review, wrong = metrics["review"], predictions["label"] != predictions["predicted"]
    assert review["below_confidence"] == 0.4 and review["flagged"] == predictions["needs_review"].sum()
    assert review["flagged_errors"] == (wrong & predictions["needs_review"]).sum()
    assert review["accepted_errors"] == (wrong & ~predictions["needs_review"]).sum()
    assert review["flagged_errors"] + review["accepted_errors"] == metrics["errors"]
    curve = pd.read_csv(tmp_path / "review_curve.csv")
    assert list(curve["below_confidence"]) == CURVE_THRESHOLDS
    assert curve["flagged_share"].is_monotonic_increasing
    assert curve["accepted_errors"].is_monotonic_decreasing


def test_metrics_by_hand():
    actual = torch.tensor([0, 0, 1, 1, 3, 3])
    predicted = torch.tensor([0, 1, 1, 1, 1, 3])  # one Cr->In, one PS->In
    m = classification_metrics(actual, predicted)
    assert m["accuracy"] == round(4 / 6, 6)
    assert m["errors"] == 2 and m["in_ps_errors"] == 1
    assert m["per_class"]["In"]["precision"] == 0.5 and m["per_class"]["In"]["recall"] == 1.0
    assert m["confusion_matrix"][0][1] == 1


def test_review_metrics_by_hand():
    actual = torch.tensor([1, 3, 3, 0])
    probs = torch.tensor([[0.0, 0.9, 0.0, 0.1, 0.0, 0.0],    # In, sure, right
                          [0.0, 0.8, 0.0, 0.2, 0.0, 0.0],    # PS called In, sure: accepted unseen
                          [0.0, 0.55, 0.0, 0.45, 0.0, 0.0],  # PS called In, unsure: flagged
                          [0.6, 0.0, 0.0, 0.0, 0.4, 0.0]])   # Cr, unsure but right: flagged
    m = review_metrics(actual, probs, 0.7)
    assert m == {"below_confidence": 0.7, "flagged": 2, "flagged_share": 0.5, "flagged_errors": 1,
                 "accepted_errors": 1, "accepted_in_ps_errors": 1, "accepted_accuracy": 0.5}
    assert review_metrics(actual, probs, 0.0)["accepted_errors"] == 2  # 0 flags nothing
    everything = review_metrics(actual, probs, 1.0)
    assert everything["flagged"] == 4 and everything["accepted_accuracy"] == 1.0
    assert [row["accepted_errors"] for row in review_curve(actual, probs, [0.5, 0.6, 0.85])] == [2, 1, 0]
