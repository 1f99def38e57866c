"""The abstention measurement of one run: every score, both calibrations, one training run.

A ``clinc_oos`` run trains one CLINC domain's profile with the library's abstention on (a part
of its training data held out). Then every row set is scored once (logits and pooled
embeddings) and each score's rule is fitted from those same scores twice: without OOS examples
(the default operating point) and with the dataset's 100 ``oos_train`` queries choosing the point.
The profile is scored on its dev split plus ``oos_dev`` (where the default operating point is
chosen) and on its test split plus ``oos_test`` (what is reported), at a grid of points.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from bench.eval.tasks import CLINC, TaskData
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.profiles.abstain import ABSTAIN_SCORES, AbstainRule, auroc, row_scores
from xpeft.profiles.profile import Profile
from xpeft.training.abstain_fit import Scored, Split, rule_from

POINTS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2)


def _metrics(rule: AbstainRule, point: float, inside: Scored, outside: Scored) -> list[float]:
    """[in-scope accuracy with abstentions counted wrong, OOS recall, OOS precision], in %."""
    conf_in = rule.confidence(inside.logits, inside.pooled)
    conf_out = rule.confidence(outside.logits, outside.pooled)
    assert inside.labels is not None
    kept_right = (conf_in >= point) & (inside.logits.argmax(-1) == inside.labels)
    caught = int((conf_out < point).sum())
    flagged = caught + int((conf_in < point).sum())
    return [
        round(100 * float(kept_right.float().mean()), 3),
        round(100 * caught / max(1, len(conf_out)), 3),
        round(100 * caught / flagged, 3) if flagged else 100.0,
    ]


def measure(
    model: MultiProfileModel, profile: Profile, split: Split, data: TaskData, domain: str, batch: int
) -> dict[str, Any]:
    """The run's ``abstention`` block (see the module docstring)."""
    files = {
        "dev": f"{CLINC}/domains/{domain}/dev.tsv",
        "dev_oos": f"{CLINC}/oos_dev.tsv",
        "test": f"{CLINC}/domains/{domain}/test.tsv",
        "test_oos": f"{CLINC}/oos_test.tsv",
        "oos_train": f"{CLINC}/oos_train.tsv",
    }
    sets = {name: Scored.of(model, profile, data.file(path), batch) for name, path in files.items()}
    held = Scored.of(model, profile, split.held, batch)
    fit = Scored.of(model, profile, split.fit, batch)
    base = {
        s: round(100 * float((sets[s].logits.argmax(-1) == sets[s].labels).float().mean()), 3)
        for s in ("dev", "test")
    }
    scores: dict[str, Any] = {}
    for score in ABSTAIN_SCORES:
        plain = rule_from(profile, score, held, fit)
        sharp = rule_from(profile, score, held, fit, oos=sets["oos_train"])

        def raw(name: str, rule: AbstainRule = plain) -> torch.Tensor:
            return row_scores(rule.score, sets[name].logits, sets[name].pooled, rule.class_means)

        scores[score] = {
            "auroc": {s: round(100 * auroc(raw(s), raw(f"{s}_oos")), 3) for s in ("dev", "test")},
            "points": {
                str(p): {s: _metrics(plain, p, sets[s], sets[f"{s}_oos"]) for s in ("dev", "test")}
                for p in POINTS
            },
            "oos_point": sharp.min_confidence,
            "oos": {
                s: _metrics(sharp, sharp.min_confidence, sets[s], sets[f"{s}_oos"]) for s in ("dev", "test")
            },
            "rule_bytes": plain.nbytes,
            "file_bytes_added": len(xpm.encode(dataclasses.replace(profile, abstain=plain)))
            - len(xpm.encode(dataclasses.replace(profile, abstain=None))),
        }
    return {
        "n": {"held": len(split.held), "fit": len(split.fit), **{k: len(v.logits) for k, v in sets.items()}},
        "base_accuracy": base,
        "scores": scores,
    }
