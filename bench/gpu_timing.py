"""The timings of bench/gpu_check.py beyond the grid: the apply kernel's tile sweep and the
launch overhead of one forward, each returning rows for the report."""

from __future__ import annotations

import time

from bench.measure import make_profiles, time_op
from xpeft.adapters import kernels
from xpeft.adapters.kernels import KernelChoice
from xpeft.adapters.layer import apply_adapters


def sweep_apply_tiles(encoder, bank, seq_len: int, deadline: float) -> list[dict]:
    """The SGMV kernel's time per tile shape at 64 distinct profiles, next to torch: picks the default."""
    from bench.measure import apply_case

    if not (kernels.HAVE_TRITON and encoder.device.type == "cuda"):
        return [{"skipped": "needs CUDA and Triton"}]
    h, weights, rows = apply_case(encoder, bank, 64, seq_len, 64)
    rows_out = [
        {"impl": "torch", "ms": time_op(lambda: apply_adapters(h, *weights, rows), encoder.device) * 1e3}
    ]
    for block_t in (16, 32, 64, 128):
        for warps in (4, 8):
            if time.monotonic() > deadline:
                return rows_out
            try:
                ms = (
                    time_op(
                        lambda bt=block_t, w=warps: kernels.apply_adapters_triton(
                            h, *weights, rows, block_t=bt, num_warps=w
                        ),
                        encoder.device,
                    )
                    * 1e3
                )
                rows_out.append({"impl": "triton", "block_t": block_t, "num_warps": warps, "ms": ms})
            except Exception as exc:
                rows_out.append(
                    {
                        "impl": "triton",
                        "block_t": block_t,
                        "num_warps": warps,
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                    }
                )
    return rows_out


def launch_overhead(model, seq_len: int) -> list[dict]:
    """Host cost per adapter call, and each forward's enqueue time against its synchronised time.

    When enqueueing takes as long as finishing, the batch is bound by Python and launches, not
    by the GPU, and every extra launch shows in the throughput.
    """
    from bench.measure import MixedBatch, apply_case, sync
    from bench.offline import with_apply

    encoder, bank, out = model.encoder, model.device_bank, []
    h, weights, rows = apply_case(encoder, bank, 1, 16, 1)
    for impl in ("torch", "triton") if kernels.HAVE_TRITON and encoder.device.type == "cuda" else ("torch",):
        choice = KernelChoice.parse("apply" if impl == "triton" else "off")
        apply_adapters(h, *weights, rows, choice)
        sync(encoder.device)
        start = time.perf_counter()
        for _ in range(200):
            apply_adapters(h, *weights, rows, choice)
        host = (time.perf_counter() - start) / 200
        sync(encoder.device)
        out.append({"what": "apply, host time per call (B=1, T=16)", "impl": impl, "us": host * 1e6})
    mb = MixedBatch(model, make_profiles(bank, 64, seed=11), 64, seq_len)
    for name, fn in (
        ("base", mb.base),
        ("warm torch", with_apply(encoder, mb.warm, "torch")),
        ("warm triton", with_apply(encoder, mb.warm, "triton")),
    ):
        fn()
        enqueue, wall = [], []
        for _ in range(7):
            sync(encoder.device)
            start = time.perf_counter()
            fn()
            enqueue.append(time.perf_counter() - start)
            sync(encoder.device)
            wall.append(time.perf_counter() - start)
        out.append(
            {
                "what": "forward B=64, U=64",
                "impl": name,
                "enqueue_ms": sorted(enqueue)[3] * 1e3,
                "wall_ms": sorted(wall)[3] * 1e3,
            }
        )
    return out


#: the serving steps' sizes: the runtime grid (U, N, batch, tokens, rounds) and the HTTP run
