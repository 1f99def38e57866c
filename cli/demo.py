"""``xpeft demo``: the whole service on the local machine, from one command.

It starts ``xpeft serve`` on the embedded SQLite store (a free loopback port, an admin token of
its own), trains profiles with different label sets from the bundled examples, uploads them over
HTTP, sends one burst of requests for all of them at once, and reads from ``/metrics`` how many
forward passes answered the burst and how many profiles shared each. Then it keeps serving and
prints a ``curl`` line to try, until Ctrl-C (``--once`` stops after the burst).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpeft.adapters.errors import XPeftError
from xpeft.cli.output import positive_int

if TYPE_CHECKING:
    from xpeft.adapters.bank import AdapterBank
    from xpeft.adapters.encoder import AdapterEncoder

# profile id -> bundled example file; three label sets (2, 3 and 4 labels)
EXAMPLES = {"sentiment": "sentiment.tsv", "topic": "topic.tsv", "support": "support.tsv"}
# one burst: every request its own HTTP call, all sent at once
BURST = [
    ("sentiment", "What a lovely, heartfelt movie."),
    ("topic", "the midfielder scored from a free kick"),
    ("support", "my parcel never arrived"),
    ("sentiment", "The food was cold and the waiter was rude."),
    ("topic", "bake the bread until the crust is golden"),
    ("support", "I was billed for a plan I cancelled"),
    ("sentiment", "Boring, slow and far too long."),
    ("topic", "the new tablet ships with more memory"),
    ("support", "I cannot sign in since I changed my password"),
    ("sentiment", "An inventive and joyful show."),
    ("topic", "a bowl of ramen with a soft egg"),
    ("support", "how do I send these boots back"),
]
STARTUP_TIMEOUT_S = 180.0


def say(line: str = "") -> None:
    print(line, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """The ``xpeft serve`` child process and where it logs."""

    proc: subprocess.Popen
    url: str
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float) -> None:
        """Until ``/readyz`` answers 200 (the client retries refusals and unreached ports), or the
        process ended, or ``timeout``."""
        from xpeft.client import Client, ClientError

        deadline = time.monotonic() + timeout
        with Client(self.url, max_attempts=100, max_retry_seconds=2) as client:
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(ClientError):
                    client.ready()
                    return
        raise XPeftError("server_failed", f"the server did not become ready; {self.log}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (the server drains), then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(bank_path: Path, work: Path, port: int, token: str) -> Server:
    """``xpeft serve`` on loopback with the embedded store; the token travels in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XPEFT_")}  # the demo's own settings only
    env["XPEFT_ADMIN_TOKEN"] = token
    env["XPEFT_EMBEDDED_TRAINER"] = "false"  # the demo trains locally: no trainer process beside the server
    env["XPEFT_TORCH_THREADS"] = "1"  # a burst of 12 short texts; the other cores train meanwhile
    # the parent is the one that prints; the child gets Ctrl-C from the terminal too and drains
    cmd = [sys.executable, "-m", "xpeft.cli", "serve", "--bank", str(bank_path), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--sqlite-path", str(work / "profiles.sqlite3"), "--log-level", "warning"]
    log = work / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Server(proc, f"http://127.0.0.1:{port}", log)


def build_bank(work: Path) -> tuple[AdapterEncoder, AdapterBank, Path]:
    """The bundled MiniLM and a seeded random bank of 100 adapters per layer (reused if present)."""
    from xpeft.adapters.bank import AdapterBank, create_random_bank
    from xpeft.adapters.encoder import load_encoder

    encoder = load_encoder("minilm")
    path = work / "bank.safetensors"
    if path.is_file():
        bank = AdapterBank.load(path)
    else:
        bank = create_random_bank(
            encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters=100, model_name="minilm"
        )
        bank.save(path)
    say(
        f"bank {bank.bank_id}: {bank.num_layers} layers x {bank.num_adapters} random adapters "
        f"(bottleneck {bank.bottleneck}) for MiniLM-L6 -> {path}"
    )
    return encoder, bank, path


def train_examples(encoder: AdapterEncoder, bank: AdapterBank, work: Path) -> dict[str, Path]:
    """One profile of the default kind (units) per bundled example file."""
    from xpeft.profiles import format as xpm
    from xpeft.training.data import load_dataset
    from xpeft.training.train import TrainConfig, train_profile

    # the bundled files are small: holding out 40% of each label gives every profile the
    # abstention rule that `xpeft train` fits by default on real data (10% of it), so the sizes
    # printed are those of what ships, rule included
    config = TrainConfig(epochs=6, batch_size=16, max_length=32, holdout=0.4)
    paths = {}
    for profile_id, name in EXAMPLES.items():
        data = load_dataset(str(files("xpeft.profiles.examples") / name))
        result = train_profile(encoder, bank, data, config)
        paths[profile_id] = work / f"{profile_id}.xpm"
        xpm.save(result.profile, paths[profile_id])
        say(
            f"trained {profile_id!r} on {len(data)} examples, labels {result.profile.labels}: "
            f"{file_bytes(paths[profile_id].read_bytes())}, {result.seconds:.1f} s, "
            f"train accuracy {result.history[-1]['train_accuracy']:.2f}"
            + "".join(f"; {note}" for note in result.notes)
        )
    return paths


def file_bytes(data: bytes) -> str:
    """A profile file's size and what it is spent on (``xpeft info`` shows the same parts)."""
    from xpeft.profiles.format_sizes import size_parts

    parts = size_parts(data)
    names = (("selection", "units"), ("head", "head"), ("rule", "abstention rule"), ("extras", "gains"))
    spent = ", ".join(f"{label} {parts[key]:,}" for key, label in names if parts[key])
    return f"{parts['total']:,} bytes ({spent}, header {parts['header']:,})"


def batch_metrics(url: str) -> dict[str, float]:
    """Totals of the batch histograms: forwards, rows, distinct profiles, forwards of one profile."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in ("xpeft_batch_rows_count", "xpeft_batch_rows_sum", "xpeft_batch_profiles_sum"):
                values[sample.name] = sample.value
            elif sample.name == "xpeft_batch_profiles_bucket" and float(sample.labels["le"]) == 1.0:
                values["single_profile_forwards"] = sample.value
    return values


async def send_burst(url: str) -> list[dict]:
    """Every request of :data:`BURST` at once, each its own HTTP request."""
    from xpeft.client import AsyncClient

    async with AsyncClient(url) as client:
        return list(await asyncio.gather(*(client.predict(pid, [text]) for pid, text in BURST)))


def report_burst(answers: list[dict], before: dict[str, float], after: dict[str, float]) -> None:
    """Print each answer and how the burst was batched (the change of the batch histograms)."""
    for (pid, text), answer in zip(BURST, answers, strict=True):
        best = answer["predictions"][0]
        label = "(none)" if best["label"] is None else best["label"]  # abstained: none of its labels
        say(f"  {pid:>9} v{answer['version']:<3} {label:>9} {best['score']:.2f}  {text}")
    forwards = int(after["xpeft_batch_rows_count"] - before.get("xpeft_batch_rows_count", 0))
    rows = after["xpeft_batch_rows_sum"] - before.get("xpeft_batch_rows_sum", 0)
    profiles = after["xpeft_batch_profiles_sum"] - before.get("xpeft_batch_profiles_sum", 0)
    shared = forwards - int(after["single_profile_forwards"] - before.get("single_profile_forwards", 0))
    say(
        f"{len(BURST)} requests for {len(EXAMPLES)} profiles were answered in {forwards} forward passes "
        f"(from /metrics: {rows / max(forwards, 1):.1f} rows and {profiles / max(forwards, 1):.1f} distinct "
        f"profiles per forward on average; {shared} of the {forwards} forwards mixed rows of several profiles)"
    )


def serve_until_interrupted(server: Server, token: str) -> None:
    url = server.url
    say()
    say(f"Serving on {url} until Ctrl-C. Try:")
    say(
        f"  curl -s -X POST {url}/profiles/topic/predict -H 'Content-Type: application/json' "
        """-d '{"inputs": ["the goalkeeper saved a penalty", "fresh pasta with pesto"]}'"""
    )
    say(f"  xpeft profiles list --url {url}")
    say(f"  XPEFT_ADMIN_TOKEN={token} xpeft upload my.xpm --id mine --url {url}")
    say(f"Metrics: {url}/metrics   API docs: {url}/docs")
    try:
        code = server.proc.wait()
    except KeyboardInterrupt:
        say("stopping")
        return
    if code != 0:  # 0: a signal of its own stopped it, after draining
        raise XPeftError(
            "server_failed", f"the server exited with status {code}; {server.log}:\n{server.log_tail()}"
        )
    say("the server stopped")


def cmd_demo(args: argparse.Namespace) -> None:
    """Serve, train, upload, one mixed burst, then keep serving (or stop, with ``--once``)."""
    from xpeft.client import Client

    own = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="xpeft-demo-")) if own else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        encoder, bank, bank_path = build_bank(work)
        token = secrets.token_hex(24)
        server = start_server(bank_path, work, args.port or free_port(), token)
        say(f"starting xpeft serve on {server.url} (embedded store in {work}); training meanwhile")
        paths = train_examples(encoder, bank, work)
        server.wait_ready(STARTUP_TIMEOUT_S)
        with Client(server.url, token=token) as client:
            for profile_id, path in paths.items():
                meta = client.upload(profile_id, path)
                say(f"uploaded {profile_id!r} over HTTP: version {meta['version']}, {meta['bytes']} bytes")
            for profile_id, _ in EXAMPLES.items():  # a first prediction reads each from the store
                client.predict(profile_id, [BURST[0][1]])
        before = batch_metrics(server.url)
        say(f"one burst of {len(BURST)} concurrent requests, mixing the profiles:")
        report_burst(asyncio.run(send_burst(server.url)), before, batch_metrics(server.url))
        if not args.once:
            serve_until_interrupted(server, token)
    finally:
        if server is not None:
            server.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)


def register(subparsers: Any) -> None:
    """Add ``demo`` to the ``xpeft`` command."""
    p = subparsers.add_parser(
        "demo",
        help="serve, train and upload three profiles, answer one mixed burst in shared batches",
        description=__doc__,
    )
    p.add_argument("--once", action="store_true", help="stop after the burst instead of serving on")
    p.add_argument("--port", type=positive_int, default=None, help="loopback port (default: a free one)")
    p.add_argument(
        "--workdir", default=None, help="keep bank, profiles, store and server log here (default: a temp dir)"
    )
    p.set_defaults(func=cmd_demo)
