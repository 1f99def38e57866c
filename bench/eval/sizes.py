"""``python -m bench.eval sizes``: the bytes of what ``xpeft train`` ships by default, per label count.

The evaluation's runs train with abstention off (their protocol scores labels only), so their
``.xpm`` sizes leave out the abstention rule that every default profile carries. This command
trains, with the real encoder, exactly what a user gets: ``xpeft train --bank B --data D --out P``
with no other option (the ``units`` default, its rule included), and the ``single_adapter``
baseline the same way (``--method single_adapter``), on a small generated data set per label
count, and records each file's bytes by part (``xpeft info`` shows the same breakdown). Sizes
depend on the label count and the label names, not on the texts. The report reads the JSON
(``--sizes``) for the README's size line and docs/EVALUATION.md's size section.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.eval.markdown import table
from xpeft.adapters.errors import XPeftError
from xpeft.profiles.constants import CLASS_MEAN_SCORES, SIGN_SCORES

DEFAULT_LABELS = (2, 3, 6, 15)
BASELINE = "single_adapter"  # the paper's baseline, measured beside the shipped default
NUM_ADAPTERS = 100  # the evaluation's random bank (bench/eval/cpu.json)
WORDS = ("alpha", "bravo", "delta", "echo", "gamma", "kilo", "lima", "oscar", "sierra", "tango")


def _examples(labels: int, holdout: float, min_holdout: int) -> list[tuple[str, str]]:
    """Enough rows per label that the default holdout calibrates a rule (at least
    ``min_holdout`` held out in all), labels named ``class1`` ... ``classC``."""
    per_label = math.ceil(math.ceil(min_holdout / labels) / holdout) + 1  # floor(holdout * n) each
    rows = []
    for j in range(labels):
        for i in range(per_label):
            rows.append(
                (f"{WORDS[j % len(WORDS)]} {WORDS[i % len(WORDS)]} message {i} of {j}", f"class{j + 1}")
            )
    return rows


def measure(label_counts: list[int], work: Path, model: str = "minilm", seed: int = 0) -> dict[str, Any]:
    """Train the default profile and the baseline at each label count; their bytes by part."""
    from xpeft.adapters.bank import create_random_bank
    from xpeft.adapters.encoder import load_encoder
    from xpeft.cli.main import main as xpeft
    from xpeft.profiles import format as xpm
    from xpeft.profiles.format_sizes import size_parts
    from xpeft.training.train_config import MIN_HOLDOUT, TrainConfig

    encoder = load_encoder(model)
    bank = create_random_bank(
        encoder.num_layers,
        encoder.hidden_size,
        encoder.model_id,
        num_adapters=NUM_ADAPTERS,
        seed=seed,
        model_name=model,
    )
    bank_path = bank.save(work / "bank.safetensors")
    defaults = TrainConfig()
    rows = []
    for labels in label_counts:
        data = work / f"train-{labels}.tsv"
        examples = _examples(labels, defaults.holdout, MIN_HOLDOUT)
        data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in examples))
        for method in (defaults.method, BASELINE):
            out = work / f"{method}-{labels}.xpm"
            argv = ["train", "--bank", str(bank_path), "--data", str(data), "--out", str(out), "--quiet"]
            argv += [] if method == defaults.method else ["--method", method]
            if xpeft(argv) != 0:
                raise XPeftError("train_failed", f"xpeft {' '.join(argv)} failed")
            blob = out.read_bytes()
            info = xpm.read_info(blob)
            if info.abstain is None:  # the data must be big enough for the default rule
                raise XPeftError("train_failed", f"{out.name} has no abstention rule: more examples needed")
            rows.append(
                {
                    "labels": labels,
                    "method": method,
                    "examples": len(examples),
                    "abstain": info.abstain,
                    "bytes": size_parts(blob),
                }
            )
    return {
        "type": "sizes",
        "time": time.time(),
        "model": model,
        "model_id": encoder.model_id,
        "num_layers": encoder.num_layers,
        "hidden_size": encoder.hidden_size,
        "num_adapters": NUM_ADAPTERS,
        "bottleneck": bank.bottleneck,
        "bank_seed": seed,
        "python": platform.python_version(),
        "train_command": "xpeft train --bank BANK --data DATA --out P.xpm (units); "
        "the same with --method single_adapter",
        "label_names": "class1 ... classC",
        "sizes": rows,
    }


def run(out: str | Path, label_counts: list[int], model: str = "minilm") -> Path:
    with tempfile.TemporaryDirectory(prefix="xpeft-sizes-") as tmp:
        result = measure(label_counts, Path(tmp), model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return out


def read(path: str | Path | None) -> dict[str, Any] | None:
    """The sizes file, or None when there is none (the report then says how to make it)."""
    if path is None or not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("type") != "sizes" or not isinstance(data.get("sizes"), list):
        raise XPeftError("bad_argument", f"{path} is not a sizes file of `python -m bench.eval sizes`")
    return data


def by_labels(sizes: dict[str, Any], method: str) -> dict[int, dict[str, int]]:
    return {row["labels"]: row["bytes"] for row in sizes["sizes"] if row["method"] == method}


def breakdown(parts: dict[str, int]) -> str:
    """``5,141 bytes (units 1,728, head 1,540, rule 1,558, extras 12, header 303)``-style text."""
    named = [
        ("selection", "masks/units"),
        ("head", "head"),
        ("rule", "rule"),
        ("extras", "extras"),
        ("header", "header"),
    ]
    inner = ", ".join(f"{label} {parts[key]:,}" for key, label in named if parts.get(key))
    return f"{parts['total']:,} bytes ({inner})"


SIZES_HINT = "Run `python -m bench.eval sizes --out bench/eval/results/sizes.json`, then the report again."


def readme_line(sizes: dict[str, Any] | None, path: str, method: str = "units") -> str:
    """The README's size sentence: the default file, rule included, against ``single_adapter``."""
    mine = {} if sizes is None else by_labels(sizes, method)
    if sizes is None or not mine:
        return f"No size measurement of the shipped default (`{method}`) yet. {SIZES_HINT}"
    single = by_labels(sizes, BASELINE)
    parts = []
    for labels in sorted(mine):
        text = f"{labels} labels: {breakdown(mine[labels])}"
        if labels in single:
            ratio = single[labels]["total"] / mine[labels]["total"]
            text += f" against {single[labels]['total']:,} for `{BASELINE}` ({ratio:,.0f}× smaller)"
        parts.append(text)
    return (
        f"`.xpm` size of what `xpeft train` writes by default (`{method}`, with its abstention rule: "
        f"`{_rule_names(sizes, method)}` scores, {_rule_stores(sizes, method)}), from `{path}` by "
        f"`python -m bench.eval sizes`: " + "; ".join(parts) + "."
    )


def _rule_stores(sizes: dict[str, Any], method: str) -> str:
    """What the measured rules keep per label, in words."""
    names = {str(row["abstain"]) for row in sizes["sizes"] if row["method"] == method}
    if names & set(SIGN_SCORES):
        return "the signs of the class means, C·d bits"
    if names & set(CLASS_MEAN_SCORES):
        return "class means C·d in fp16"
    return "no class means"


def _rule_names(sizes: dict[str, Any], method: str) -> str:
    return ", ".join(sorted({str(row["abstain"]) for row in sizes["sizes"] if row["method"] == method}))


def section(sizes: dict[str, Any] | None, path: str) -> list[str]:
    """docs/EVALUATION.md's table of the shipped default's bytes by part, per label count."""
    lines = [
        "### What ships by default",
        "",
    ]
    if sizes is None:
        return [*lines, f"Not measured yet. {SIZES_HINT}"]
    lines += [
        f"The runs above train with abstention off, so their files leave out the rule. What a user "
        f"gets from `xpeft train` with no option carries it: `{path}`, written by `python -m bench.eval "
        f"sizes` ({sizes['model']}, a random bank of {sizes['num_adapters']} adapters per layer, "
        f"labels named {sizes['label_names']}; `xpeft info` shows the same breakdown as `bytes_by_part`).",
        "",
    ]
    header = [
        "method",
        "labels",
        ".xpm bytes",
        "masks / units / adapter",
        "head (fp16)",
        "rule",
        "extras",
        "header",
    ]
    rows = []
    for row in sorted(sizes["sizes"], key=lambda r: (r["method"] == BASELINE, r["labels"])):
        b = row["bytes"]
        rows.append(
            [f"`{row['method']}`", str(row["labels"])]
            + [f"{b.get(k, 0):,}" for k in ("total", "selection", "head", "rule", "extras", "header")]
        )
    return [*lines, table(header, rows)]
