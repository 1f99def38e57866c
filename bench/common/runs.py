"""What every run records and reads: the machine it ran on, the git state, the texts of its
requests, and random hard profiles under ids (bytes made once, or on the fly)."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.profiles import format as xpm
from xpeft.profiles.synthetic import random_profile

REPO = Path(__file__).resolve().parents[2]
SST2_DEV = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
BUNDLED = REPO / "profiles" / "examples" / "sentiment.tsv"


def shown_command(module: str, argv: list[str] | None, hidden: dict[str, str | None]) -> str:
    """``python -m module argv`` as a report shows it, so a doc names no folder of the machine that
    ran it: the value of each flag in ``hidden`` (``--flag value`` or ``--flag=value``) replaced by
    what it is, or the flag left out where that is None."""
    words = []
    for word in argv or []:  # --flag=value as two words, as argparse reads it
        flag = word.split("=", 1)[0]
        words += word.split("=", 1) if "=" in word and flag in hidden else [word]
    for flag, shown in hidden.items():
        while flag in words[:-1]:
            at = words.index(flag)
            if shown is None:
                del words[at : at + 2]
                continue
            words[at + 1] = shown
            break
    return " ".join(["python -m " + module, *words])


# -- inputs -----------------------------------------------------------------------------------
def load_texts(path: str) -> tuple[list[str], str]:
    """Sentences for the requests: SST-2 dev when ../shared/data has it, else the bundled examples."""
    source = Path(path) if path else (SST2_DEV if SST2_DEV.exists() else BUNDLED)
    with source.open(newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        texts = [row["sentence"] for row in rows if row.get("sentence")]
    return texts, str(source.resolve().relative_to(REPO.parent)) if source.is_relative_to(
        REPO.parent
    ) else str(source)


def profile_id(i: int) -> str:
    return f"p{i:06d}"


class Profiles:
    """Profile bytes by index: the first ``keep`` are generated once and kept, the rest on the fly."""

    def __init__(self, bank: AdapterBank, keep: int) -> None:
        self.bank = bank
        self.kept = [self._make(i) for i in range(keep)]

    def _make(self, i: int) -> bytes:
        return xpm.encode(random_profile(self.bank, "hard", seed=i))

    def get(self, i: int) -> bytes:
        return self.kept[i] if i < len(self.kept) else self._make(i)

    def items(self, start: int, stop: int) -> Iterator[tuple[str, bytes]]:
        for i in range(start, stop):
            yield profile_id(i), self.get(i)


# -- machine --------------------------------------------------------------------------------
def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / hz, total / hz


def hardware() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "httpx": httpx.__version__,
    }


def git_state() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(
            git(
                "status",
                "--porcelain",
                "--",
                "server",
                "profiles",
                "adapters",
                "client",
                "bench/common",
                "bench/load",
            )
        ),
    }


def stderr_log(tag: str) -> Callable[[str], None]:
    """A harness's progress lines: ``[tag HH:MM:SS] message`` on stderr, flushed at once."""

    def log(message: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log
