"""How old docs/BENCHMARKS.md's GPU figures are, and what of the serving path they do not cover.

bench/report.py puts :func:`age_note` at the top of the doc: the commit the GPU run measured (the
run's own record; else, for a run on a machine without the repository's history, the commit that
added its results file, found with ``git log``) and its date, and which parts of today's serving
path the GPU run has no figures or checks for, read from what its JSON holds. Nothing in it
depends on the commit the doc is rendered at, so rendering twice gives the same doc.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def measured_commit(data: dict, results: Path) -> tuple[str, str] | None:
    """``(short commit, how it was found)`` of a run, or None when neither the run nor git knows."""
    recorded = data.get("meta", {}).get("git", "")
    if recorded and recorded != "unknown":
        return recorded, "recorded by the run"
    added = _git("log", "-1", "--format=%h %cs", "--", str(results)).split()
    if len(added) != 2:
        return None
    return added[0], f"of {added[1]}, the commit that added its results; the run recorded none"


def uncovered(gpu: dict | None, checks: dict | None) -> list[str]:
    """Parts of the serving path the GPU JSON has neither a check nor a figure for (a gpu_check run
    on a CPU, ``--cpu``, covers nothing of the GPU's)."""
    if checks is not None and checks.get("meta", {}).get("device") != "cuda":
        checks = None
    checks = checks or {}
    kinds = {c.get("check") for c in checks.get("checks", [])}
    runtime = [r for r in checks.get("runtime", []) if "ratio_to_base" in r]
    ruled = [c for c in checks.get("checks", []) if c.get("check") == "runtime" and c.get("confidence_err")]
    missing = []
    if "runtime" not in kinds:
        missing.append(
            "the server's batch step (`ModelWorker.run`: slot pool, per-slot heads, `predict_batch`) "
            "checked against the CPU reference"
        )
    if not ruled:
        missing.append("abstention rules (any score) applied on the GPU")
    if not runtime:
        missing.append("the server's batch step timed (cold and warm slots, the server's CUDA graph runner)")
    if not any(r.get("variant") in ("cold_units", "warm_units") for r in runtime):
        missing.append("units profiles, the default kind (the timed profiles are hard masks)")
    if "http" not in checks:
        missing.append("`xpeft serve` under HTTP load on the GPU")
    if "user_serve" not in kinds:
        missing.append("`xpeft serve` with profiles trained with the defaults, its training service included")
    if gpu is None:
        missing.append("the offline throughput, fusion and adapter application timings")
    return missing


def age_note(gpu: dict | None, checks: dict | None, gpu_path: Path, checks_path: Path) -> list[str]:
    """The doc's opening lines: the GPU run's commit and, where it misses a part of today's serving
    path, a warning that names each part."""
    if gpu is None and checks is None:
        return []
    found = measured_commit(gpu or checks or {}, gpu_path if gpu is not None else checks_path)
    missing = uncovered(gpu, checks)
    where = f"commit `{found[0]}` ({found[1]})" if found else "a commit that neither the run nor git records"
    if not missing:
        return [f"The GPU figures below were measured on {where}.", ""]
    out = [
        f"> **The GPU figures below predate the current serving path.** They were measured on {where}.",
        ">",
        "> They do not cover:",
        ">",
        *[f"> - {m}" for m in missing],
    ]
    out += [
        ">",
        "> The prepared GPU run covers all of these: `bench/gpu_prepare.sh` where the repository and "
        "the package index are, then `bench/gpu_run.sh` on the GPU machine, then `python -m bench.report`.",
        "",
    ]
    return out
