"""``xpeft serve`` started as a user starts it, with profiles trained with the defaults, over HTTP.

Used by bench/gpu_check.py (its ``user_serve`` step). Every step is the ``xpeft`` command in a
process of its own (``python -m xpeft.cli``, what the console script runs), with no setting
beyond the encoder folder and, for the smoke run, fewer epochs:

1. ``xpeft bank create`` for the encoder; labelled data written as a ``.tsv``;
2. ``xpeft train`` offline, with the defaults (a units profile and its abstention rule, the
   default score, fitted on the held-out rows), on the machine's default device;
3. ``xpeft serve`` (SQLite store, its embedded trainer), ``xpeft upload`` of that profile;
4. ``xpeft train --url --id``: a second profile trained by the server's training service;
5. ``POST /profiles/{id}/predict`` for both, with and without a request's ``min_confidence``,
   and ``xpeft predict --url``; each answer compared with the same profile run offline by the
   fp32 CPU reference (``MultiProfileModel`` on the CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import httpx

from bench.common.server import ServerProcess
from xpeft.engine.runtime import MultiProfileModel

# the bundled sentiment example, each row also said four ways: enough rows per label that the
# default holdout leaves an abstention rule its held-out rows
EXAMPLE = files("xpeft.profiles.examples") / "sentiment.tsv"
PREFIXES = ("", "honestly, ", "overall ", "to be fair, ")
QUERIES = ["the concert was lovely", "a painful and boring trip", "what time is it in tokyo", "superb"]
COMMAND_LIMIT_S = 150.0
SCORE_TOLERANCE = 2e-3  # label probabilities, GPU fp32 against CPU fp32
CONFIDENCE_TOLERANCE = 3e-2  # the rule's confidence is piecewise linear in a score


def write_data(path: Path) -> Path:
    """The example's rows, once per prefix, as a ``.tsv`` with its header."""
    header, *rows = EXAMPLE.read_text().strip().splitlines()
    path.write_text("\n".join([header, *(prefix + row for prefix in PREFIXES for row in rows)]) + "\n")
    return path


def xpeft(args: list[str], work: Path, timeout: float) -> str:
    """One ``xpeft`` command; its output, or an error that quotes the end of it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XPEFT_")}
    done = subprocess.run(
        [sys.executable, "-m", "xpeft.cli", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"xpeft {' '.join(args[:2])} exited {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout


def compare(served: list[dict], reference: list, min_confidence: float | None) -> dict:
    """HTTP answers against the CPU reference's :class:`Prediction` objects for the same texts."""
    score_err = max(
        abs(a["scores"][name] - b.scores[name])
        for a, b in zip(served, reference, strict=True)
        for name in b.scores
    )
    conf = [(a.get("confidence"), b.confidence) for a, b in zip(served, reference, strict=True)]
    has_rule = all(a is not None and b is not None for a, b in conf)
    conf_err = max(abs(a - b) for a, b in conf) if has_rule else None
    labels_equal = [a["label"] for a in served] == [b.label for b in reference]
    return {
        "min_confidence": min_confidence,
        "rows": len(served),
        "max_score_err": score_err,
        "max_confidence_err": conf_err,
        "rule_answered": has_rule,
        "labels_equal": labels_equal,
        "passed": has_rule
        and score_err < SCORE_TOLERANCE
        and conf_err is not None
        and conf_err < CONFIDENCE_TOLERANCE
        and labels_equal,
    }


def user_serve(model: str, work: Path, deadline: float, train_args: list[str] | None = None) -> dict:
    """The steps above with encoder ``model`` (a folder, or ``minilm``); a dict for the report."""
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": model, "steps": {}, "checks": []}

    def left() -> float:  # each command's limit: a hung step must leave time for the later ones
        return min(COMMAND_LIMIT_S, max(10.0, deadline - time.monotonic()))

    def timed(name: str, fn):
        start = time.monotonic()
        out = fn()
        result["steps"][name] = round(time.monotonic() - start, 1)
        return out

    bank = work / "bank.safetensors"
    data = write_data(work / "train.tsv")
    extra = train_args or []
    timed(
        "bank_create", lambda: xpeft(["bank", "create", "--model", model, "--out", str(bank)], work, left())
    )
    timed(
        "train_offline",
        lambda: xpeft(
            ["train", "--bank", str(bank), "--data", str(data), "--out", "default.xpm", "--quiet", *extra],
            work,
            left(),
        ),
    )
    reference = MultiProfileModel.load(bank, model, device="cpu")
    server = ServerProcess(bank, "", "", work, {"XPEFT_SQLITE_PATH": str(work / "store.sqlite3")}, "user")
    for name in ("XPEFT_REDIS_URL", "XPEFT_REDIS_PREFIX"):
        server.env.pop(name, None)
    with server:
        timed(
            "upload",
            lambda: xpeft(["upload", "--url", server.url, "--id", "default", "default.xpm"], work, left()),
        )
        timed(
            "train_service",
            lambda: xpeft(
                ["train", "--url", server.url, "--id", "service", "--data", str(data), *extra], work, left()
            ),
        )
        with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
            result["readyz"] = client.get("/readyz").json()
            for pid in ("default", "service"):
                stored = client.get(f"/profiles/{pid}/file")
                stored.raise_for_status()
                profile = reference.load_profile(stored.content)
                result[f"{pid}_rule"] = None if profile.abstain is None else profile.abstain.score
                for point in (None, 0.99):
                    body: dict = {"inputs": QUERIES}
                    if point is not None:
                        body["min_confidence"] = point
                    answer = client.post(f"/profiles/{pid}/predict", json=body)
                    answer.raise_for_status()
                    want = [p.at_operating_point(profile, point) for p in reference.predict(profile, QUERIES)]
                    result["checks"].append(
                        {"profile": pid, **compare(answer.json()["predictions"], want, point)}
                    )
        result["cli_predict"] = timed(
            "cli_predict",
            lambda: xpeft(["predict", "--url", server.url, "--id", "default", *QUERIES[:2]], work, left()),
        )[-600:]
        result["server_log_tail"] = server.log_tail(10)
    result["device"] = result.get("readyz", {}).get("detail", {}).get("device")
    result["passed"] = bool(result["checks"]) and all(c["passed"] for c in result["checks"])
    return result
