"""The correctness checks of bench/gpu_check.py: the Triton kernels and the serving path against
the reference (the torch path in float64 on the CPU), each returning rows for the report."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from bench.measure import bench_encoder, device_weights, make_profiles, random_bank, random_inputs
from bench.serving import make_jobs, make_texts, slot_bytes
from xpeft.adapters import kernels
from xpeft.adapters.fusion import FusedAdapters, fuse, fuse_gather
from xpeft.adapters.kernels import KernelChoice
from xpeft.adapters.layer import apply_adapters
from xpeft.engine.batcher import Job
from xpeft.engine.cache import FusedCache, VersionFloors
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.worker import ModelWorker
from xpeft.profiles import format as xpm
from xpeft.profiles.kinds import KINDS
from xpeft.profiles.synthetic import random_profile, random_rule
from xpeft.training.train_config import ABSTAIN_SCORES

# (name, B, T, d, r, U): BERT-base and MiniLM shapes, ragged token counts, one profile without rows
APPLY_CASES = [
    ("bert_mixed", 5, 77, 768, 48, 3),
    ("bert_one", 4, 128, 768, 48, 1),
    ("minilm_mixed", 6, 33, 384, 24, 4),
    ("short", 3, 9, 768, 48, 3),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def triton_runs_here(device: torch.device) -> bool:
    return kernels.HAVE_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def adapter_inputs(B: int, T: int, d: int, r: int, U: int, seed: int) -> tuple[torch.Tensor, ...]:
    """fp32 CPU inputs, scaled like a real layer (h ~ 1, adapter output ~ h)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g)
    down = torch.randn(U, d, r, generator=g) * d**-0.5
    down_bias = torch.randn(U, r, generator=g) * 0.5
    up = torch.randn(U, r, d, generator=g) * r**-0.5
    up_bias = torch.randn(U, d, generator=g) * 0.1
    return h, down, down_bias, up, up_bias


def check_apply(device: torch.device, dtypes: list[torch.dtype]) -> list[dict]:
    """Each path's ``out`` and adapter delta ``out - h`` against float64 on the CPU; NaN-poisoned output."""
    results = []
    for seed, (name, B, T, d, r, U) in enumerate(APPLY_CASES):
        cpu = adapter_inputs(B, T, d, r, U, seed)
        rows_cpu = torch.randint(0, U, (B,), generator=torch.Generator().manual_seed(seed)) if U > 1 else None
        for dtype in dtypes:
            # the reference sees the same rounded inputs the device sees
            rounded = [t.to(dtype) for t in cpu]
            ref = apply_adapters(*(t.double() for t in rounded), rows_cpu)
            h64 = rounded[0].double()
            dev = [t.to(device) for t in rounded]
            rows = rows_cpu.to(device) if rows_cpu is not None else None
            paths: dict[str, Callable[[], torch.Tensor]] = {}

            def torch_path(dev=dev, rows=rows) -> torch.Tensor:
                return apply_adapters(*dev, rows, KernelChoice.torch_only())

            paths["torch"] = torch_path
            if triton_runs_here(device) and (device.type == "cuda" or dtype == torch.float32):
                # (Triton's CPU interpreter computes bf16 dots wrongly: float32 only there)
                def triton_path(dev=dev, rows=rows) -> torch.Tensor:
                    out = torch.full_like(dev[0], float("nan"))
                    return kernels.apply_adapters_triton(*dev, rows, out=out)

                paths["triton"] = triton_path
            for path, fn in paths.items():
                row = {
                    "check": "apply",
                    "case": name,
                    "shape": [B, T, d, r, U],
                    "dtype": str(dtype),
                    "path": path,
                }
                try:
                    out = fn()
                    row["rel_err_out"] = rel_err(out, ref)
                    row["rel_err_delta"] = rel_err(out.double().cpu() - h64, ref - h64)
                    row["passed"] = row["rel_err_delta"] < TOLERANCE[dtype]
                except Exception as exc:  # a failed compile or launch is a result, not a crash
                    row.update(passed=False, error=f"{type(exc).__name__}: {exc}"[:500])
                results.append(row)
    return results


def check_dispatch(device: torch.device) -> list[dict]:
    """``layer.apply_adapters`` routes to the kernel when the policy says so, and to torch otherwise."""
    if not triton_runs_here(device) or device.type != "cuda":
        return [{"check": "dispatch", "skipped": "needs CUDA and Triton", "passed": None}]
    h, *weights = (t.to(device, torch.bfloat16) for t in adapter_inputs(4, 40, 768, 48, 2, 99))
    rows = torch.tensor([0, 1, 1, 0], device=device)
    direct = kernels.apply_adapters_triton(h, *weights, rows)
    routed = apply_adapters(h, *weights, rows, KernelChoice.parse("apply"))
    plain = apply_adapters(h, *weights, rows, KernelChoice.torch_only())
    return [
        {
            "check": "dispatch",
            "routed_equals_kernel": bool(torch.equal(routed, direct)),
            "torch_differs_from_kernel": not torch.equal(plain, direct),
            "passed": bool(torch.equal(routed, direct)),
        }
    ]


def check_gather(device: torch.device, dtypes: list[torch.dtype], quick: bool = False) -> list[dict]:
    """Triton gather, torch gather and the GEMM against a float64 CPU gather, BERT-base bank shapes."""
    results = []
    L, N, d, r, U, k = (2, 20, 768, 48, 5, 10) if quick else (12, 100, 768, 48, 5, 10)
    for dtype in dtypes:
        g = torch.Generator().manual_seed(5)
        rounded = random_bank_cpu(L, N, d, r, g).to(dtype=dtype)  # rounded once, then the same everywhere
        index = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(2 * U * L)]).view(2, U, L, k)
        ref = fuse_gather(index[0], index[1], rounded.to(dtype=torch.float64))
        paths = gather_paths(rounded.to(device), index.to(device), device)
        for path, fn in paths.items():
            row = {"check": "gather", "shape": [L, N, d, r, U, k], "dtype": str(dtype), "path": path}
            try:
                fused = fn()
                row["rel_err"] = max(
                    rel_err(a, b) for a, b in zip(fused.tensors(), ref.tensors(), strict=True)
                )
                # the GEMM multiplies by 1/k rounded to the dtype: that rounding is its own error
                row["passed"] = row["rel_err"] < TOLERANCE[dtype] * (2 if path == "gemm" else 1)
            except Exception as exc:
                row.update(passed=False, error=f"{type(exc).__name__}: {exc}"[:500])
            results.append(row)
    return results


def gather_paths(bank, index: torch.Tensor, device: torch.device) -> dict[str, Callable[[], FusedAdapters]]:
    """The fusions to compare: GEMM over k-hot / k weights, torch gather, Triton gather."""
    N, k = bank.num_adapters, index.shape[-1]
    masks = torch.zeros(index.shape[:-1] + (N,), device=device).scatter_(-1, index, 1.0 / k)

    def gather_torch() -> FusedAdapters:
        return fuse_gather(index[0], index[1], bank, choice=KernelChoice.torch_only())

    def gather_triton() -> FusedAdapters:
        return FusedAdapters(
            *(
                kernels.gather_mean_triton(t, index[0 if "down" in n else 1])
                for n, t in bank.tensors().items()
            )
        )

    paths = {"gemm": lambda: fuse(masks[0], masks[1], bank), "gather_torch": gather_torch}
    if triton_runs_here(device):
        paths["gather_triton"] = gather_triton
    return paths


def random_bank_cpu(L: int, N: int, d: int, r: int, g: torch.Generator):
    from xpeft.adapters.bank import AdapterBank

    return AdapterBank(
        torch.randn(L, N, d, r, generator=g) * d**-0.5,
        torch.randn(L, N, r, generator=g) * 0.5,
        torch.randn(L, N, r, d, generator=g) * r**-0.5,
        torch.randn(L, N, d, generator=g) * 0.1,
        model_id="check",
        bank_id="check",
    )


def check_end_to_end(encoder, model_name: str, device: torch.device, seq_len: int) -> list[dict]:
    """Pooled embeddings of a mixed batch, kernels on and off, against the fp32 CPU encoder."""
    B, U = 8, 8
    bank = random_bank(encoder, 100, seed=3)
    profiles = make_profiles(bank, U, seed=3)
    fused = fuse(*device_weights(profiles, device), bank)
    inputs = random_inputs(B, seq_len, device, seed=3)
    rows = torch.arange(B, device=device) % U
    reference_encoder = (
        encoder
        if device.type == "cpu" and encoder.dtype == torch.float32
        else bench_encoder(model_name, "cpu", torch.float32)
    )
    cpu_fused = fused.to("cpu", torch.float32)
    ref = reference_encoder({k: v.cpu() for k, v in inputs.items()}, cpu_fused, rows.cpu()).double()
    results = []
    for path, on in (("torch", False), ("triton", True)):
        if on and not (triton_runs_here(device) and device.type == "cuda"):
            continue
        with encoder.kernels_switched(apply=on):
            pooled = encoder(inputs, fused, rows)
        err = rel_err(pooled, ref)
        results.append(
            {
                "check": "end_to_end",
                "model": model_name,
                "dtype": str(encoder.dtype),
                "path": path,
                "batch": B,
                "distinct": U,
                "rel_err": err,
                "passed": err < TOLERANCE[encoder.dtype],
            }
        )
    return results


# -- the serving path: the server's batch step against the CPU reference ------------------------
def ruled_profiles(bank, seed: int) -> list:
    """A profile of every kind for every rule (none, then each score), each kind with its own
    label count (2 to 6): what the runtime checks serve."""
    out = []
    for r, score in enumerate([None, *ABSTAIN_SCORES]):
        for i, kind in enumerate(KINDS):
            labels = [f"{kind.value}-{j}" for j in range(2 + i)]
            profile = random_profile(bank, kind, seed=seed + 10 * r + i, labels=labels)
            if score is not None:
                profile.abstain = random_rule(
                    len(labels), seed=seed + r, score=score, hidden_size=bank.hidden_size, min_confidence=0.3
                )
            out.append(profile)
    return out


def check_runtime(
    model: MultiProfileModel, reference: MultiProfileModel, graphs: bool, tolerance: float
) -> list[dict]:
    """Predictions through the server's batch step on the device (pool, graphs when on) against the
    fp32 CPU model with the same bank values: a profile of every kind with every abstention rule
    (and none), each stored as ``.xpm`` and decoded as a server does; per-row label probabilities
    (relative error), labels, and the rules' confidences (largest difference per score)."""
    profiles = [xpm.decode(xpm.encode(p), model.bank) for p in ruled_profiles(model.bank, seed=3)]
    rows = 2 * len(profiles)
    jobs = make_jobs(profiles, make_texts(model.encoder.tokenizer, rows, 20, seed=3), rows)
    worker = ModelWorker(FusedCache((len(profiles) + 8) * slot_bytes(model), VersionFloors()))
    worker.executor.shutdown()
    worker.attach(model, graphs, rows)
    want = reference.predict_batch(
        [(xpm.decode(xpm.encode(j.entry.profile), reference.bank), j.inputs) for j in jobs]
    )
    results = []
    for label in ("cold", "warm", "warm again"):
        got = worker.run(jobs)
        results.append(
            {
                "check": "runtime",
                "path": label,
                "graphs": graphs,
                "dtype": str(model.encoder.dtype),
                "profiles": len(profiles),
                **compare_answers(got, want, jobs, tolerance),
            }
        )
    stats = model.graphs.stats() if model.graphs is not None else {}
    if graphs:
        results.append({"check": "graphs", **stats, "passed": stats.get("captured", 0) > 0})
    model.graphs = None
    return results


def compare_answers(got: list, want: list, jobs: list[Job], tolerance: float) -> dict:
    """Device answers against the reference's: relative error of the label probabilities, equal
    labels, and the largest confidence difference per rule score (a confidence moves with the
    score it reads, so bf16 logits move it by about the tolerance times the knots' slope)."""
    a = torch.tensor([s for row in got for p in row for s in p.scores.values()], dtype=torch.float64)
    b = torch.tensor([s for row in want for p in row for s in p.scores.values()], dtype=torch.float64)
    err = float((a - b).norm() / b.norm())
    per_score: dict[str, float] = {}
    missing = 0  # rows of a profile with a rule answered without a confidence, or the reverse
    for job, g_row, w_row in zip(jobs, got, want, strict=True):
        rule = job.entry.profile.abstain
        for g, w in zip(g_row, w_row, strict=True):
            if rule is None:
                missing += g.confidence is not None
                continue
            if g.confidence is None or w.confidence is None:
                missing += 1
                continue
            per_score[rule.score] = max(per_score.get(rule.score, 0.0), abs(g.confidence - w.confidence))
    same_labels = [p.label for row in got for p in row] == [p.label for row in want for p in row]
    confidence_ok = all(v < max(3 * tolerance, 1e-3) for v in per_score.values())
    return {
        "rel_err": err,
        "labels_equal": same_labels,
        "confidence_err": per_score,
        "confidence_missing": missing,
        "passed": err < tolerance
        and missing == 0
        and confidence_ok
        and len(per_score) == len(ABSTAIN_SCORES),
    }
