"""Scoring a stored profile on labelled data, exactly as the server would answer."""

from __future__ import annotations

from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from xpeft.profiles.data import DataError, Dataset
from xpeft.profiles.profile import Profile
from xpeft.profiles.runtime import MultiProfileModel


def evaluate(model: MultiProfileModel, profile: Profile, data: Dataset, batch_size: int = 64) -> dict:
    """Accuracy and n always; F1 of the second label and Matthews correlation for two labels,
    macro-F1 and Matthews correlation for more."""
    unknown = sorted(set(data.labels) - set(profile.labels))
    if unknown:
        raise DataError("bad_data", f"labels {unknown[:5]} are not among the profile's {profile.labels}")
    predicted = [p.label for p in model.predict(profile, data.inputs, batch_size)]
    result = {"accuracy": accuracy_score(data.labels, predicted), "n": len(data)}
    if len(profile.labels) == 2:
        result["f1"] = f1_score(
            data.labels, predicted, pos_label=profile.labels[1], labels=profile.labels, zero_division=0
        )
    else:
        result["f1_macro"] = f1_score(
            data.labels, predicted, average="macro", labels=profile.labels, zero_division=0
        )
    result["mcc"] = matthews_corrcoef(data.labels, predicted)
    return {k: (float(v) if k != "n" else v) for k, v in result.items()}
