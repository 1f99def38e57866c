"""The METHOD.md diagnostics block: filled from results, the rest of the page untouched."""

from __future__ import annotations

import pytest

from bench.eval.analysis import Results
from bench.eval.method_doc import BEGIN, END, block, fill
from xpeft.adapters.errors import XPeftError


def _run(method: str, seed: int, overlap: float) -> dict:
    diag = {"adapter_ratio_start": [0.1, 0.3], "adapter_ratio_end": [overlap, 2 * overlap]}
    if method == "hard":
        diag |= {"mask_overlap_down": overlap, "mask_overlap_up": overlap, "score_grad_norm_first": 0.5}
    return {
        "type": "run",
        "key": f"t/p/{method}/{seed}",
        "task": "sst2",
        "profile": "sst2",
        "method": method,
        "bank": "random" if method == "hard" else "none",
        "variant": "default",
        "seed": seed,
        "accuracy": 0.8,
        "k": 10 if method == "hard" else None,
        "num_adapters": 100 if method == "hard" else None,
        "loss_curve": [[1, 1.0], [2, 0.5]],
        "diagnostics": diag,
    }


def test_block_reports_the_means_of_the_runs(tmp_path):
    rows = [{"type": "session", "event": "start", "config": {"tasks": [{"kind": "sst2"}]}}]
    rows += [_run("hard", 0, 0.2), _run("hard", 1, 0.4), _run("head_only", 0, 0)]
    text = block(Results(rows), "r.jsonl", "python -m bench.eval report")
    assert "0.300 (chance 0.100)" in text  # mean overlap of the two hard runs, and k/N
    assert "| 0.10 / 0.30 | 0.30 / 0.60 |" in text  # per-layer means at the start and at the end
    assert "| 0.500 | — | 0.500 |" in text  # score gradient first, none last, loss over the last fifth
    assert "| `head_only` | 1 | — |" in text

    doc = tmp_path / "METHOD.md"
    doc.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    fill(doc, text)
    page = doc.read_text()
    assert page.startswith("intro\n") and page.endswith("outro\n") and "old" not in page and text in page


def test_a_page_without_the_markers_is_refused(tmp_path):
    doc = tmp_path / "METHOD.md"
    doc.write_text("no block here\n")
    with pytest.raises(XPeftError, match="block"):
        fill(doc, "x")
    assert doc.read_text() == "no block here\n"


def test_readme_summary_names_gain_cost_and_bytes():
    from bench.eval.summary import block as summary

    rows: list[dict] = [{"type": "session", "event": "start", "config": {"tasks": [{"kind": "sst2"}]}}]
    for seed, (head, single, hard) in enumerate([(0.80, 0.86, 0.84), (0.82, 0.86, 0.83)]):
        for method, acc, size in (
            ("head_only", head, 1700),
            ("single_adapter", single, 227000),
            ("hard", hard, 1900),
        ):
            run = _run(method, seed, 0.1) | {"accuracy": acc, "n_labels": 2, "bytes": {"total": size}}
            rows.append(run)
    # sizes: what `python -m bench.eval sizes` measured of the default files, not the runs' own
    parts = {"selection": 150, "head": 1540, "rule": 1570, "extras": 0, "header": 240}
    measured = {
        "type": "sizes",
        "sizes": [
            {"labels": 2, "method": "hard", "abstain": "cosine", "bytes": {"total": 3500, **parts}},
            {"labels": 2, "method": "single_adapter", "abstain": "cosine", "bytes": {"total": 229500}},
        ],
    }
    text = summary(Results(rows), "r.jsonl", "cmd", shipped_sizes=measured, sizes_path="s.json")
    assert "| SST-2 | 81.0 | 86.0 | 83.5 |" in text  # means over the two seeds
    assert "+2.50 [" in text and "(n=2)" in text  # hard - head_only, paired over seeds
    assert "| 50% |" in text  # (83.5 - 81) / (86 - 81)
    assert "abstention rule: `cosine` scores" in text and "from `s.json`" in text
    wanted = "2 labels: 3,500 bytes (masks/units 150, head 1,540, rule 1,570, header 240) against 229,500"
    assert wanted + " for `single_adapter` (66× smaller)" in text
    assert "1,900 bytes" not in text  # the runs' sizes (abstention off) are not what ships
    assert "python -m bench.eval sizes" in summary(Results(rows), "r.jsonl", "cmd")  # none yet: how to


def test_readme_summary_shows_the_shipped_variant_beside_the_paper_setting():
    from bench.eval.summary import block as summary

    rows: list[dict] = [{"type": "session", "event": "start", "config": {"tasks": [{"kind": "sst2"}]}}]
    for seed in (0, 1):
        for method, variant, acc in (("head_only", "default", 0.80), ("single_adapter", "default", 0.90),
                                     ("hard", "default", 0.82), ("hard", "gain", 0.86 + seed / 100)):  # fmt: skip
            run = _run(method, seed, 0.1) | {
                "accuracy": acc,
                "variant": variant,
                "n_labels": 2,
                "bytes": {"total": 1},
            }
            run["key"] += variant
            rows.append(run)
    from bench.eval.targets import Shipped

    text = summary(Results(rows), "r.jsonl", "cmd", shipped=Shipped("hard", "gain"))
    assert "`hard` (variant `gain`), shipped defaults" in text
    assert "| 86.5 |" in text and "+6.50 [" in text  # the shipped column and its paired gain
    assert "| 65% |" in text  # (86.5 - 80) / (90 - 80)
