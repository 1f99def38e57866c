"""Markdown pieces of the report: tables, and numbers formatted the same way everywhere."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from bench.eval.stats import Interval, Summary

NOT_RUN = "not run"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(summary: Summary | None, partial: int = 0) -> str:
    if summary is None:
        return NOT_RUN
    note = f", {partial} partial left out" if partial else ""
    return f"{summary.mean * 100:.2f} ± {summary.std * 100:.2f} [{summary.n}{note}]"


def interval(i: Interval | None) -> str:
    if i is None:
        return NOT_RUN
    if i.n < 2:
        return f"{i.mean:+.2f} (n=1, no interval)"
    return f"{i.mean:+.2f} [{i.low:+.2f}, {i.high:+.2f}] (n={i.n})"


def cell_name(method: str, bank: str) -> str:
    return f"`{method}`" + ("" if bank == "none" else f" {bank}")


def hardware_words(session: dict[str, Any]) -> str:
    hw = session.get("hardware", {})
    cpu = f"{hw.get('cpu_cores', '?')} CPU cores ({hw.get('cpu_model', 'unknown CPU')})"
    gpu = f"1 {hw['device_name']} GPU, " if hw.get("device_name", "CPU") != "CPU" else ""
    jobs = session.get("jobs", 1)
    workers = f"{jobs} worker process{'es' if jobs > 1 else ''} × {session.get('threads_per_job', 1)} torch thread(s)"
    return f"{gpu}{cpu}, torch {hw.get('torch', '?')}; {workers}"
