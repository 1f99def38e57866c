"""What the server is measured against: the plain encoder on each CPU runtime, and Infinity.

Each baseline runs the same texts as the server, in the same rounds (interleaved with them), and
reports sequences per second:

- ``torch``: the plain transformers encoder in torch eager fp32, batches of 32, mean-pooled;
- ``onnx-int8``: the same encoder exported to ONNX and dynamically quantized to int8 (weights per
  output channel), run by ONNX Runtime with spinning threads off: the fastest plain forward a
  CPU offers here, and so the one the server's ratio is taken against;
- ``infinity``: the Infinity embeddings server (``infinity-emb``, ONNX Runtime engine) over HTTP,
  loaded by wrk exactly as the server is: one text per request, embeddings only. It runs from its
  own virtualenv (``--infinity-bin``) on the model exported by optimum (``--infinity-model``,
  a folder holding ``model.onnx``); docs/LOAD_TEST.md gives the setup commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Protocol

import httpx
import torch

from bench.common.server import free_port
from bench.common.wrk import run_wrk

MAX_LENGTH = 128


class Baseline(Protocol):
    name: str

    def run(self, texts: list[str], seconds: float) -> dict: ...


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class _Batches:
    """Batches of ``batch`` texts in order, tokenized as the server would, for about ``seconds``."""

    name = "plain"

    def __init__(self, batch: int) -> None:
        from transformers import AutoTokenizer

        from xpeft.adapters.encoder import default_model_dir

        self.path = default_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.batch = batch

    def forward(self, enc: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def run(self, texts: list[str], seconds: float) -> dict:
        rows, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            chunk = [texts[(i + j) % len(texts)] for j in range(self.batch)]
            i += self.batch
            enc = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
            )
            self.forward(dict(enc))
            rows += len(chunk)
        wall = time.perf_counter() - start
        return {"rows": rows, "wall_s": wall, "sequences_per_s": rows / wall}


class PlainTorch(_Batches):
    """The plain transformers encoder, torch eager fp32 (the server's own runtime before backends)."""

    name = "torch"

    def __init__(self, device: str, batch: int) -> None:
        super().__init__(batch)
        from transformers import AutoModel

        self.device = device
        self.model = AutoModel.from_pretrained(str(self.path)).to(device).eval()

    def forward(self, enc: dict[str, torch.Tensor]) -> None:
        enc = {k: v.to(self.device) for k, v in enc.items()}
        _pool(self.model(**enc).last_hidden_state, enc["attention_mask"]).cpu()


class PlainOnnxInt8(_Batches):
    """The plain encoder exported to ONNX, int8 weights (dynamic, per channel), ONNX Runtime."""

    name = "onnx-int8"

    def __init__(self, batch: int, threads: int, workdir: Path) -> None:
        super().__init__(batch)
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(self.path), attn_implementation="eager").eval()
        fp32, int8 = workdir / "plain.onnx", workdir / "plain.int8.onnx"
        example = self.tokenizer(["an example", "another example text"], padding=True, return_tensors="pt")
        self.names = list(example)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                tuple(example[n] for n in self.names),
                str(fp32),
                input_names=self.names,
                output_names=["hidden"],
                dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*self.names, "hidden"]},
                opset_version=18,
                dynamo=False,
            )
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])

    def forward(self, enc: dict[str, torch.Tensor]) -> None:
        (hidden,) = self.session.run(None, {n: enc[n].numpy() for n in self.names})
        _pool(torch.from_numpy(hidden), enc["attention_mask"])


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
    """The plain-encoder baselines ``names`` asks for (``torch``, ``onnx-int8``)."""
    out: list[Baseline] = []
    for name in names:
        if name == "torch":
            out.append(PlainTorch(device, batch))
        elif name == "onnx-int8":
            out.append(PlainOnnxInt8(batch, threads, Path(tempfile.mkdtemp(prefix="xpeft-plain-onnx-"))))
        else:
            raise SystemExit(f"unknown baseline {name!r} (torch, onnx-int8)")
    return out
