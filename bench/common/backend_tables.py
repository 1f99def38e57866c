"""The encoder backends' speed and accuracy tables (``python -m bench.eval.backends``), rendered for
``python -m bench.eval.backends report`` and docs/BENCHMARKS.md (``python -m bench.report``)."""

from __future__ import annotations

import json
from pathlib import Path


def backend_tables(speed_path: Path, accuracy_path: Path) -> list[str]:
    """Markdown tables of the two JSON files (those present), for docs/BENCHMARKS.md."""
    lines: list[str] = []
    if speed_path.exists():
        data = json.loads(speed_path.read_text())
        lines += [
            f"Encoder backends, batches of {data['batch']} texts ({data['tokens']} tokens), "
            f"{data['threads']} threads, {data['rounds']} rounds on {data['hardware']['cpu']} "
            f"(`{data.get('command', 'python -m bench.eval.backends speed')}`): seq/s, median (min-max), "
            "the median's ratio to torch in the same case, and to the same backend's plain encoder."
            + (
                f" `cold`: each batch first fuses its {data['batch']} rows' profiles, none of them fused "
                f"before, from a bank of {data['cold_adapters']} adapters."
                if data.get("cold_adapters")
                else ""
            ),
            *_fusion_line(data),
            "",
            "| backend | case | seq/s | ratio to torch | ratio to its plain encoder |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in data["results"]:
            s = r["seq_per_s"]
            ratio = f"{r['ratio_to_torch']:.2f}" if r["ratio_to_torch"] else "-"
            own = f"{r['ratio_to_plain']:.2f}" if r.get("ratio_to_plain") else "-"
            lines.append(
                f"| {r['backend']} | {r['case']} | {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) | {ratio} | {own} |"
            )
        lines.append("")
    if accuracy_path.exists():
        data = json.loads(accuracy_path.read_text())
        trained = f"{data['train_size']} training examples" if data["train_size"] else "the config's data"
        scored = f"{data['dev_size']} scored" if data["dev_size"] else "the config's scored rows"
        sizes = f"{trained}, {scored}"
        lines += [
            f"Units profiles trained on the exact encoder ({sizes}), scored on each backend "
            "(`python -m bench.eval.backends accuracy`): accuracy minus torch's, in points, mean "
            "over the seeds with its 95% t-interval, and the share of labels equal to torch's.",
            "",
            "| task | backend | seeds | accuracy difference | 95% interval | same label |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in data["summary"]:
            low, high = r["interval_95"]
            interval = "-" if low is None else f"{100 * low:+.1f} to {100 * high:+.1f}"
            lines.append(
                f"| {r['group']} | {r['backend']} | {r['seeds']} | {100 * r['accuracy_difference']:+.1f} "
                f"| {interval} | {100 * r['label_agreement']:.1f}% |"
            )
    return lines


def _fusion_line(data: dict, backend: str = "onnx-int8", target: float = 0.85) -> list[str]:
    """The cold case's fusion alone: its time per batch, what it reads, and the time a cold batch
    at ``target`` times the default backend's plain encoder leaves it beyond the warm mixed
    forward (runs before the figure was kept have none)."""
    fusion = data.get("cold_fusion")
    if not fusion:
        return []
    ms = fusion["ms"]
    line = (
        f"The cold case's fusion alone (`fuse_into_pool`, every backend's cold batches): "
        f"{ms['median']:.1f} ms per batch ({ms['min']:.1f}-{ms['max']:.1f}), reading "
        f"{fusion['unit_rows']:,} unit rows ({fusion['bytes_read'] / 1e6:.0f} MB of fp32) from the bank"
    )
    if "page_faults" in fusion:
        kept = "kept" if data.get("retain_host_memory", True) else "glibc's defaults for"
        line += (
            f", with {fusion['page_faults']:,.0f} page faults per batch (median; {kept} freed host memory)"
        )
    line += "."
    rate = {r["case"]: r["seq_per_s"]["median"] for r in data["results"] if r["backend"] == backend}
    if "plain" in rate and "mixed" in rate:
        batch = data["batch"]
        budget = 1000 * batch * (1 / (target * rate["plain"]) - 1 / rate["mixed"])
        line += (
            f" On {backend}, a cold batch at {target}x its plain encoder leaves {budget:.1f} ms for the "
            f"fusion beyond the warm mixed forward ({1000 * batch / rate['mixed']:.1f} ms)."
        )
    return ["", line]
