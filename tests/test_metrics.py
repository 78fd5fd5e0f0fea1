"""Classification metrics through scikit-learn: the same figures as counting by hand."""

import pytest
import torch

from neu_model.core.config import CLASSES
from neu_model.evaluation.metrics import classification_metrics, confusion_matrix, review_metrics

N = len(CLASSES)


def counted(actual: list[int], predicted: list[int]) -> dict:
    """The metrics dict computed by counting pairs, with 0 for a ratio whose denominator is 0."""
    pairs = list(zip(actual, predicted, strict=True))
    cm = [[sum(1 for a, p in pairs if (a, p) == (i, j)) for j in range(N)] for i in range(N)]

    def ratio(num: float, den: float) -> float:
        return num / den if den else 0.0

    per_class, f1s = {}, []
    for i, code in enumerate(CLASSES):
        tp = cm[i][i]
        precision, recall = ratio(tp, sum(cm[r][i] for r in range(N))), ratio(tp, sum(cm[i]))
        f1 = ratio(2 * precision * recall, precision + recall)
        f1s.append(f1)
        per_class[code] = {"precision": round(precision, 6), "recall": round(recall, 6), "f1": round(f1, 6),
                           "support": sum(cm[i])}
    correct = sum(1 for a, p in pairs if a == p)
    i_in, i_ps = CLASSES.index("In"), CLASSES.index("PS")
    return {"accuracy": round(ratio(correct, len(pairs)), 6), "macro_f1": round(sum(f1s) / N, 6),
            "errors": len(pairs) - correct, "in_ps_errors": cm[i_in][i_ps] + cm[i_ps][i_in],
            "per_class": per_class, "confusion_matrix": cm}


CASES = {
    "all right": ([0, 1, 2, 3, 4, 5, 5], [0, 1, 2, 3, 4, 5, 5]),
    "In and PS swapped, Sc never predicted": ([0, 1, 1, 3, 3, 4, 5, 5, 2], [0, 3, 1, 1, 3, 4, 4, 0, 2]),
    "two classes absent, one never predicted": ([0, 0, 1, 1, 1, 3], [0, 1, 1, 1, 0, 1]),
    "everything called Cr": ([0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0]),
    "one image": ([4], [2]),
}


@pytest.mark.parametrize("actual,predicted", CASES.values(), ids=CASES.keys())
def test_metrics_equal_counting_by_hand(actual, predicted):
    assert classification_metrics(torch.tensor(actual), torch.tensor(predicted)) == counted(actual, predicted)


def test_a_class_never_predicted_scores_zero_not_nan():
    m = classification_metrics(torch.tensor([0, 5, 5]), torch.tensor([0, 0, 0]))
    assert m["per_class"]["Sc"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["per_class"]["Cr"]["precision"] == round(1 / 3, 6)
    assert m["macro_f1"] == round(2 * (1 / 3) / (1 + 1 / 3) / N, 6)  # the absent classes count as 0


def test_empty_input_counts_nothing():
    empty = torch.tensor([], dtype=torch.long)
    assert confusion_matrix(empty, empty).equal(torch.zeros(N, N, dtype=torch.long))
    assert classification_metrics(empty, empty) == counted([], [])


def test_review_of_everything_flagged_accepts_nothing():
    probs = torch.full((3, N), 1 / N)
    m = review_metrics(torch.tensor([0, 1, 3]), probs, 0.5)
    assert m["flagged"] == 3 and m["accepted_errors"] == 0 and m["accepted_in_ps_errors"] == 0
    assert m["accepted_accuracy"] == 1.0
