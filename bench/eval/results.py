"""Append-only JSON lines: one whole line per finished run, flushed and fsynced.

A killed run leaves at most one partial last line; loading drops it (and rewrites the file
without it, atomically) so the next append starts on a fresh line. Finished keys are skipped.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """Plain JSON values from tensors, numpy scalars and NaN (which strict JSON has no word for)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _parse(text: str) -> tuple[list[dict[str, Any]], int]:
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Every whole row (an unreadable line is skipped; the file is not changed)."""
    return _parse(Path(path).read_text(encoding="utf-8"))[0]


class ResultsFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            self.rows, bad = _parse(text)
            if bad or (text and not text.endswith("\n")):
                print(
                    f"{self.path}: dropping {bad} unreadable line(s) of an interrupted write", file=sys.stderr
                )
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(_line(r) for r in self.rows), encoding="utf-8")
                os.replace(tmp, self.path)

    def done(self) -> set[str]:
        """Keys of finished runs."""
        return {r["key"] for r in self.rows if r.get("type") == "run" and "key" in r}

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, _line(row).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows.append(row)


def _line(row: dict[str, Any]) -> str:
    return json.dumps(jsonable(row), separators=(",", ":"), allow_nan=False) + "\n"
