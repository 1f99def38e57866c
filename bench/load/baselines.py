"""What the server is measured against: the plain encoder on each CPU runtime, and Infinity.

Each baseline runs the same texts as the server, in the same rounds (interleaved with them), and
reports sequences per second:

- ``torch``: the plain encoder in torch eager fp32, batches of 32, mean-pooled;
- ``onnx-int8`` (or any other backend name): the same encoder through that backend of
  xpeft.engine.backends, exported without its adapter inputs: ONNX Runtime with int8 weights is
  the fastest plain forward a CPU offers here, and so the one the server's ratio is taken against;
- ``infinity``: the Infinity embeddings server (``infinity-emb``, ONNX Runtime engine) over HTTP,
  loaded by wrk exactly as the server is: one text per request, embeddings only. It runs from its
  own virtualenv (``--infinity-bin``) on the model exported by optimum (``--infinity-model``,
  a folder holding ``model.onnx``); docs/LOAD_TEST.md gives the setup commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

import httpx
import torch

from bench.common.server import free_port
from bench.common.wrk import run_wrk

MAX_LENGTH = 128


class Baseline(Protocol):
    name: str

    def run(self, texts: list[str], seconds: float) -> dict: ...


class Plain:
    """The plain encoder (no adapters, no heads) on one backend, batches of ``batch`` texts in order,
    tokenized as the server tokenizes them, for about ``seconds``: ``torch`` is torch eager fp32,
    ``onnx-int8`` the server's own ONNX export of the encoder without its adapter inputs, weights
    quantized to int8 per output channel, ONNX Runtime with spinning threads off."""

    def __init__(self, name: str, device: str, batch: int, threads: int) -> None:
        from xpeft.adapters.encoder import load_encoder

        self.name = name
        self.batch = batch
        self.encoder = load_encoder(device=device)
        self.forward: Any = self.encoder
        if name != "torch":
            from xpeft.engine.backends.onnx_backend import OnnxBackend

            self.forward = OnnxBackend.build(self.encoder, name, threads, None, adapters=False)

    @torch.no_grad()
    def run(self, texts: list[str], seconds: float) -> dict:
        rows, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            chunk = [texts[(i + j) % len(texts)] for j in range(self.batch)]
            i += self.batch
            self.forward(self.encoder.tokenize(chunk, MAX_LENGTH), None, None).cpu()
            rows += len(chunk)
        wall = time.perf_counter() - start
        return {"rows": rows, "wall_s": wall, "sequences_per_s": rows / wall}


class Infinity:
    """An Infinity server (ONNX Runtime engine) on loopback, loaded by wrk with one text a request."""

    name = "infinity"

    def __init__(self, binary: Path, model_dir: Path, clients: int, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.clients = clients
        self.lines = workdir / "infinity.tsv"
        self.log = (workdir / "infinity.log").open("w")
        # model id ".": infinity-emb 0.0.78 then names the ONNX file relative to the folder, which
        # the optimum it installs requires
        self.proc = subprocess.Popen(
            [str(binary), "v2", "--model-id", ".", "--engine", "optimum", "--device", "cpu"]
            + ["--host", "127.0.0.1", "--port", str(self.port)],
            cwd=model_dir,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infinity exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            self.stop()
            raise RuntimeError("infinity did not become healthy within 300 s")

    def run(self, texts: list[str], seconds: float) -> dict:
        with self.lines.open("w") as f:
            for text in texts:
                f.write(f"/embeddings\t{json.dumps({'model': '.', 'input': [text]})}\n")
        served = run_wrk(self.url, self.lines, self.clients, seconds)
        served["sequences_per_s"] = served["requests_per_s"]
        return served

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def plain_baselines(device: str, batch: int, threads: int, names: list[str]) -> list[Baseline]:
    """The plain-encoder baselines ``names`` asks for (``torch``, ``onnx``, ``onnx-int8``, ...)."""
    return [Plain(name, device, batch, threads) for name in names]
