"""Scoring a stored profile on labelled data, exactly as the server would answer."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles.profile import Profile
from xpeft.training.data import DataError, Dataset


def evaluate(
    model: MultiProfileModel, profile: Profile, data: Dataset, batch_size: int = 64, progress: bool = False
) -> dict:
    """Accuracy and n always; F1 of the second label and Matthews correlation for two labels,
    macro-F1 and Matthews correlation for more; for a profile with an abstention rule, the
    fraction of rows it abstained on (the metrics score its top label regardless).
    ``progress``: a bar, on a terminal only."""
    unknown = sorted(set(data.labels) - set(profile.labels))
    if unknown:
        raise DataError("bad_data", f"labels {unknown[:5]} are not among the profile's {profile.labels}")
    predicted: list[str] = []
    abstained = 0
    with tqdm(total=len(data), desc="eval", unit="input", disable=None if progress else True) as bar:
        for start in range(0, len(data), batch_size):
            chunk = data.inputs[start : start + batch_size]
            answers = model.predict(profile, chunk, batch_size)
            predicted += [p.top_label for p in answers]
            abstained += sum(p.abstained for p in answers)
            bar.update(len(chunk))
    metrics = classification_metrics(data.labels, predicted, profile.labels)
    out = {"accuracy": metrics.pop("accuracy"), "n": len(data), **metrics}
    if profile.abstain is not None:
        out["abstained"] = abstained / max(1, len(data))
    return out


def classification_metrics(truth: list[str], predicted: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy; F1 of ``labels[1]`` for two labels, else macro-F1 over all labels; Matthews correlation.

    The definitions and edge cases of scikit-learn (``zero_division=0``; an undefined correlation
    is 0), computed from one confusion matrix: three numbers do not justify scikit-learn and scipy
    (about 190 MB) in every install, and torchmetrics treats both edge cases differently. Tests
    compare against scikit-learn.
    """
    k = len(labels)
    index = {label: i for i, label in enumerate(labels)}
    target = torch.tensor([index[label] for label in truth], dtype=torch.long)
    preds = torch.tensor([index[label] for label in predicted], dtype=torch.long)
    confusion = torch.bincount(target * k + preds, minlength=k * k).view(k, k).double()
    true_pos, true_count, pred_count = confusion.diag(), confusion.sum(1), confusion.sum(0)
    denominator = true_count + pred_count
    f1 = torch.where(denominator > 0, 2 * true_pos / denominator.clamp_min(1), torch.zeros_like(true_pos))
    total, correct = confusion.sum(), true_pos.sum()
    result = {"accuracy": (correct / total).item()}
    result["f1" if k == 2 else "f1_macro"] = (f1[1] if k == 2 else f1.mean()).item()
    cov_tp = correct * total - true_count @ pred_count
    scale = (total**2 - pred_count @ pred_count) * (total**2 - true_count @ true_count)
    result["mcc"] = (cov_tp / scale.sqrt()).item() if scale > 0 else 0.0
    return result
