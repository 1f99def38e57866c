"""The evaluation metrics follow scikit-learn's definitions, edge cases included, without depending on it."""

from __future__ import annotations

import random
import warnings

import pytest

from xpeft.training.evaluate import classification_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _reference(truth: list[str], predicted: list[str], labels: list[str]) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns on single-class inputs
        ref = {
            "accuracy": sklearn_metrics.accuracy_score(truth, predicted),
            "mcc": sklearn_metrics.matthews_corrcoef(truth, predicted),
        }
        if len(labels) == 2:
            ref["f1"] = sklearn_metrics.f1_score(
                truth, predicted, pos_label=labels[1], labels=labels, zero_division=0
            )
        else:
            ref["f1_macro"] = sklearn_metrics.f1_score(
                truth, predicted, average="macro", labels=labels, zero_division=0
            )
    return ref


def test_metrics_equal_scikit_learns_on_random_and_degenerate_cases():
    rng = random.Random(0)
    for _ in range(500):
        labels = [f"label{i}" for i in range(rng.choice([2, 2, 3, 5, 8]))]
        used = rng.sample(labels, rng.randint(1, len(labels)))  # some labels never occur
        n = rng.randint(1, 30)
        truth = [rng.choice(used) for _ in range(n)]
        predicted = [rng.choice(used if rng.random() < 0.7 else labels) for _ in range(n)]
        got = classification_metrics(truth, predicted, labels)
        ref = _reference(truth, predicted, labels)
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (key, truth, predicted, labels)


def test_edge_cases_have_the_documented_values():
    assert classification_metrics(["a", "a"], ["a", "a"], ["a", "b"]) == {
        "accuracy": 1.0,
        "f1": 0.0,
        "mcc": 0.0,
    }
    perfect = classification_metrics(["a", "b", "c"], ["a", "b", "c"], ["a", "b", "c", "d"])
    assert perfect == {"accuracy": 1.0, "f1_macro": 0.75, "mcc": 1.0}  # "d" never occurs: F1 0
