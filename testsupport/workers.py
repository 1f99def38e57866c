"""Trainer processes and job polling for the training-service tests and benchmark.

Servers are :class:`testsupport.processes.ServerProcess`; a :class:`WorkerProcess` is one
``xpeft worker`` child with its settings as ``XPEFT_*`` variables, signalled by its pid only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class WorkerProcess:
    """One ``xpeft worker`` on the given store; output appended to ``log_path``."""

    env: dict[str, str]
    bank_path: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XPEFT_")}
        env.update({"XPEFT_LOG_LEVEL": "info", **self.env})
        cmd = [sys.executable, "-m", "xpeft.cli", "worker", "--bank", str(self.bank_path)]
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        return self

    def kill(self) -> None:
        """SIGKILL: the worker dies mid-job without a word."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self.log.close()

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")


def job(url: str, job_id: str, headers: dict[str, str]) -> dict:
    response = httpx.get(f"{url}/jobs/{job_id}", headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()


def wait_job(
    url: str,
    job_id: str,
    headers: dict[str, str],
    timeout: float = 240.0,
    until: tuple[str, ...] = TERMINAL,
    step_at_least: int | None = None,
) -> dict:
    """Poll until the job's state is in ``until`` (or, with ``step_at_least``, it ran that far)."""
    deadline = time.monotonic() + timeout
    while True:
        record = job(url, job_id, headers)
        step = (record.get("progress") or {}).get("step") or 0
        if record["state"] in until or (step_at_least is not None and step >= step_at_least):
            return record
        if record["state"] in TERMINAL or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not reach {until}: {record}")
        time.sleep(0.2)
