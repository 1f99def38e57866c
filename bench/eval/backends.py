"""Encoder backends on the CPU: their speed, and whether trained profiles score the same on them.

``python -m bench.eval.backends speed`` (writes ``bench/results/backends.json``): seq/s of batches of 32
texts on each backend (``torch``, ``torch-int8``, ``onnx``, ``onnx-int8``), for the plain encoder
and for the encoder with per-row adapters read from a pool of 32 warm slots (``single``: every row
one slot; ``mixed``: each row its own slot); with ``--cold-adapters N``, also ``cold``: each batch
first fuses its rows' profiles (every row its own, none fused before in that round) from a bank of
N adapters into the pool's slots, as a server does for profiles its pool does not hold. Backends and cases take turns round by round, in a
rotating order, so a busy machine slows them alike; each reports the min / median / max of its
rounds and its median's ratio to torch eager's in the same case and run.

``python -m bench.eval.backends report`` prints both as markdown tables.

``python -m bench.eval.backends accuracy`` (writes ``bench/results/backends-accuracy.json``): for the
shipped kind (``units``) on the quality benchmark's discriminating single-profile tasks (SST-2,
TREC-6, MR, SICK-E, CR), train a profile with the exact fp32 torch encoder, using the benchmark's
own training settings (``bench/eval/cpu.json``; ``--train-size`` / ``--dev-size`` cut the data),
then score that same profile on torch and on each fast backend; per task and backend, the mean
accuracy difference over the seeds with its 95% t-interval, and the share of rows whose label
agrees with torch's.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common.backend_tables import backend_tables
from bench.common.runs import hardware, shown_command
from bench.eval.banks import random_bank
from bench.eval.config import load_config
from bench.eval.plan import RunSpec
from bench.eval.stats import t_interval
from bench.eval.worker import Worker
from xpeft.adapters.encoder import AdapterEncoder, load_encoder
from xpeft.engine.backends import BACKENDS, EncoderBackend, build_backend, have_onnxruntime
from xpeft.engine.backends.torch_backend import TorchBackend, TorchInt8Backend
from xpeft.engine.host_memory import retain_freed_memory
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.slots import SlotPool
from xpeft.profiles.synthetic import random_profile
from xpeft.training.train import train_profile

GROUPS = ("sst2", "trec6", "mr", "sick_e", "cr")
CASES = ("plain", "single", "mixed", "cold")
COLD_SETS = 4  # batches of distinct profiles the cold case cycles through
SENTENCE = (
    "the film was a quiet and moving study of grief with a lovely score but the second half drags on "
    "far too long and the ending feels rushed which is a shame given how good the cast is throughout"
)
WORDS = SENTENCE.split()


def available(names: list[str]) -> list[str]:
    """The named backends that can run here (the ONNX ones need the cpu-fast extra)."""
    return [n for n in names if have_onnxruntime() or not n.startswith("onnx")]


def plain_backend(name: str, encoder: AdapterEncoder, threads: int, cache: Path | None) -> EncoderBackend:
    """The backend without adapters: the encoder the served one is compared against."""
    if name == "torch":
        return TorchBackend(encoder)
    if name == "torch-int8":
        return TorchInt8Backend(encoder)
    from xpeft.engine.backends.onnx_backend import OnnxBackend

    return OnnxBackend.build(encoder, name, threads, cache, adapters=False)


def speed(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        retain_freed_memory()  # as the server does on a CPU (XPEFT_RETAIN_HOST_MEMORY)
    encoder = load_encoder(args.model, device="cpu")
    bank = random_bank(encoder, load_config(args.config).random_bank)
    model = MultiProfileModel(encoder, bank)
    pool = SlotPool(args.slots, bank.num_layers, bank.hidden_size, bank.bottleneck)
    profiles = [random_profile(bank, "units", seed=i) for i in range(args.slots)]
    model.fuse_into_pool(pool, range(args.slots), profiles)
    texts = [" ".join(WORDS[i % 7 : i % 7 + args.words]) for i in range(args.batch)]
    encodings = encoder.tokenize(texts, args.max_length)
    rows = {
        "single": torch.full((args.batch,), args.slots // 2, dtype=torch.long),
        "mixed": torch.arange(args.batch) % args.slots,
    }
    names = available(args.backends)
    served = {n: build_backend(n, encoder, args.threads, args.cache) for n in names}
    plain = {n: plain_backend(n, encoder, args.threads, args.cache) for n in names}
    cases = [c for c in CASES if c != "cold" or args.cold_adapters]
    cold = _ColdBatches(encoder, args.cold_adapters, args.batch) if args.cold_adapters else None

    def forward(name: str, case: str) -> None:
        if case == "plain":
            plain[name](encodings, None, None)
        elif case == "cold":
            assert cold is not None
            served[name](encodings, cold.next_pool(), rows["mixed_all"])
        else:
            served[name](encodings, pool.weights, rows[case])

    rows["mixed_all"] = torch.arange(args.batch)
    cells = [(n, c) for n in names for c in cases]
    with torch.no_grad():
        for cell in cells:  # warm-up: first calls allocate and plan
            forward(*cell)
        rates: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
        for r in range(args.rounds):
            for cell in cells[r % len(cells) :] + cells[: r % len(cells)]:
                start = time.perf_counter()
                for _ in range(args.reps):
                    forward(*cell)
                rates[cell].append(args.reps * args.batch / (time.perf_counter() - start))
    results = []
    for name, case in cells:
        values = rates[(name, case)]
        base = statistics.median(rates[("torch", case)]) if "torch" in names else None
        own_plain = statistics.median(rates[(name, "plain")])
        med = statistics.median(values)
        results.append(
            {
                "backend": name,
                "case": case,
                "seq_per_s": {"min": min(values), "median": med, "max": max(values)},
                "ratio_to_torch": med / base if base else None,
                "ratio_to_plain": med / own_plain,
            }
        )
    return {
        "kind": "backends-speed",
        "model": args.model,
        "batch": args.batch,
        "cold_adapters": args.cold_adapters or None,
        "cold_fusion": cold.fusion_summary() if cold else None,
        "retain_host_memory": not args.default_malloc,
        "command": shown_command("bench.eval.backends", sys.argv[1:], {"--cache": None, "--out": None}),
        "tokens": int(encodings["input_ids"].shape[1]),
        "slots": args.slots,
        "rounds": args.rounds,
        "reps": args.reps,
        "threads": args.threads,
        "hardware": hardware(),
        "results": results,
    }


class _ColdBatches:
    """The cold case's work: per batch, fuse ``rows`` new units profiles (one per row) from a
    bank of ``adapters`` into a pool of ``rows`` slots, cycling over :data:`COLD_SETS` sets."""

    def __init__(self, encoder: AdapterEncoder, adapters: int, rows: int) -> None:
        from bench.eval.config import RandomBankSpec

        bank = random_bank(encoder, RandomBankSpec(num_adapters=adapters, seed=1))
        self.model = MultiProfileModel(encoder, bank)
        self.pool = SlotPool(rows, bank.num_layers, bank.hidden_size, bank.bottleneck)
        self.sets = [
            [random_profile(bank, "units", seed=1000 * s + i) for i in range(rows)] for s in range(COLD_SETS)
        ]
        self.turn = 0
        self.fusion_ms: list[float] = []  # each timed batch's fuse_into_pool, alone
        self.faults: list[int] = []  # and the page faults it took

    def next_pool(self) -> torch.Tensor:
        profiles = self.sets[self.turn % COLD_SETS]
        self.turn += 1
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        self.model.fuse_into_pool(self.pool, range(len(profiles)), profiles)
        self.fusion_ms.append(1000 * (time.perf_counter() - start))
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        return self.pool.weights

    def fusion_summary(self) -> dict[str, Any]:
        """The fusion's share of a cold batch: its time (the warm-up calls left out) and the bytes
        of unit rows it reads, ``2 * U * L * k`` rows of d numbers."""
        times = self.fusion_ms[COLD_SETS:] or self.fusion_ms
        faults = self.faults[COLD_SETS:] or self.faults
        profile = self.sets[0][0]
        rows = 2 * len(self.sets[0]) * profile.num_layers * profile.k
        return {
            "ms": {"min": min(times), "median": statistics.median(times), "max": max(times)},
            "page_faults": statistics.median(faults),
            "unit_rows": rows,
            "bytes_read": rows * profile.hidden_size * 4,
        }


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """Seed by seed over the groups, so a run stopped early still covers every group; the JSON is
    rewritten after each profile."""
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    worker = Worker(config, str(args.data_root), args.model, "cpu", {})
    encoder = worker.encoder
    bank = random_bank(encoder, config.random_bank, args.model)
    model = MultiProfileModel(encoder, bank)
    names = [n for n in available(args.backends) if n != "torch"]
    fast = {n: build_backend(n, encoder, args.threads, args.cache) for n in names}
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for seed in args.seeds:
        for group in args.groups:
            ev = worker.evaluated(group, group)
            train = ev.train.subset(args.train_size, seed=0) if args.train_size else ev.train
            dev = ev.dev.subset(args.dev_size, seed=0) if args.dev_size else ev.dev
            train_config = worker.train_config(RunSpec(group, group, "units", "random", "default", seed))
            result = train_profile(encoder, bank, train, train_config, progress=False)
            profile = result.profile
            scores = {"torch": _score(model, None, profile, dev, config.eval_batch_size)}
            for name, backend in fast.items():
                scores[name] = _score(model, backend, profile, dev, config.eval_batch_size)
            ref = scores["torch"]["labels"]
            runs.append(
                {
                    "group": group,
                    "seed": seed,
                    "n_train": len(train),
                    "n_dev": len(dev),
                    "accuracy": {n: s["accuracy"] for n, s in scores.items()},
                    "label_agreement": {
                        n: sum(a == b for a, b in zip(s["labels"], ref, strict=True)) / len(ref)
                        for n, s in scores.items()
                        if n != "torch"
                    },
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr)
            report = _accuracy_report(args, runs)
            _write(args.out, report)
    return report


def _accuracy_report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kind": "backends-accuracy",
        "model": args.model,
        "method": "units",
        "config": str(args.config),
        "train_size": args.train_size,
        "dev_size": args.dev_size,
        "seeds": args.seeds,
        "threads": args.threads,
        "hardware": hardware(),
        "runs": runs,
        "summary": summarize(runs),
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and backend, the accuracy difference to torch over the seeds (mean, 95%
    t-interval, label agreement); then per backend the ``mean`` of the tasks: each seed's mean
    difference over the tasks, and its interval over the seeds."""
    groups = list(dict.fromkeys(r["group"] for r in runs))
    names = [n for n in dict.fromkeys(n for r in runs for n in r["accuracy"]) if n != "torch"]

    def row(group: str, name: str, diffs: list[float], agreement: float) -> dict[str, Any] | None:
        interval = t_interval(diffs)
        if interval is None:
            return None
        return {
            "group": group,
            "backend": name,
            "accuracy_difference": interval.mean,
            # None where one seed gives no interval
            "interval_95": [_finite(interval.low), _finite(interval.high)],
            "seeds": interval.n,
            "label_agreement": agreement,
        }

    summary = []
    for group in groups:
        mine = [r for r in runs if r["group"] == group]
        for name in names:
            diffs = [r["accuracy"][name] - r["accuracy"]["torch"] for r in mine]
            agreement = statistics.fmean(r["label_agreement"][name] for r in mine)
            summary.append(row(group, name, diffs, agreement))
    seeds = [
        s
        for s in dict.fromkeys(r["seed"] for r in runs)
        if {r["group"] for r in runs if r["seed"] == s} == set(groups)
    ]
    for name in names:
        by_seed = [[r for r in runs if r["seed"] == s] for s in seeds]
        diffs = [statistics.fmean(r["accuracy"][name] - r["accuracy"]["torch"] for r in rs) for rs in by_seed]
        agreement = (
            statistics.fmean(r["label_agreement"][name] for rs in by_seed for r in rs) if seeds else 0.0
        )
        summary.append(row("mean of the tasks", name, diffs, agreement))
    return [r for r in summary if r is not None]


def refresh_summary(path: Path) -> None:
    """Recompute a stored accuracy run's summary from its runs (it is derived from them alone), so
    that a change to the summary reaches a report without training again."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    summary = summarize(data["runs"])
    if summary != data.get("summary"):
        _write(path, {**data, "summary": summary})
        print(f"recomputed the summary of {path} from its runs", file=sys.stderr)


def _write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _score(model: MultiProfileModel, backend: EncoderBackend | None, profile, dev, batch_size: int) -> dict:
    """Accuracy and the predicted labels of ``profile`` on ``dev``, the encoder run by ``backend``."""
    model.backend = backend
    try:
        labels = [p.label for p in model.predict(profile, dev.inputs, batch_size)]
    finally:
        model.backend = None
    right = sum(a == b for a, b in zip(labels, dev.labels, strict=True))
    return {"accuracy": right / len(labels), "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["speed", "accuracy", "report"])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--cache", type=Path, default=None, help="export cache (default: the user's)")
    parser.add_argument("--config", type=Path, default=Path("bench/eval/cpu.json"))
    parser.add_argument("--out", type=Path, default=None)
    # speed
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument(
        "--cold-adapters",
        type=int,
        default=0,
        help="also time cold batches from a bank of this many adapters",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc thresholds (the server's XPEFT_RETAIN_HOST_MEMORY=false)",
    )
    parser.add_argument("--words", type=int, default=16, help="words per text")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=5, help="batches per round")
    # accuracy
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--dev-size", type=int, default=None, help="default: the config's")
    args = parser.parse_args()
    if args.mode == "report":
        refresh_summary(Path("bench/results/backends-accuracy.json"))
        print(
            "\n".join(
                backend_tables(
                    Path("bench/results/backends.json"), Path("bench/results/backends-accuracy.json")
                )
            )
        )
        return
    args.out = args.out or Path(f"bench/results/backends{'' if args.mode == 'speed' else '-accuracy'}.json")
    _write(args.out, speed(args) if args.mode == "speed" else accuracy(args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
