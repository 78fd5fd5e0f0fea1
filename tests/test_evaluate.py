"""Evaluation reports: metrics keys, confusion data, figures, robustness suite."""

import json

import pandas as pd
import torch

from neu_model import corruptions
from neu_model.evaluate import evaluate
from neu_model.metrics import classification_metrics

from conftest import tiny_config


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


def test_metrics_by_hand():
    actual = torch.tensor([0, 0, 1, 1, 3, 3])
    predicted = torch.tensor([0, 1, 1, 1, 1, 3])  # one Cr->In, one PS->In
    m = classification_metrics(actual, predicted)
    assert m["accuracy"] == round(4 / 6, 6)
    assert m["errors"] == 2 and m["in_ps_errors"] == 1
    assert m["per_class"]["In"]["precision"] == 0.5 and m["per_class"]["In"]["recall"] == 1.0
    assert m["confusion_matrix"][0][1] == 1
