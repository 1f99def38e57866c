"""Triton kernels for the GPU fast path, behind a dispatch that falls back to the torch reference.

Two kernels, in the pattern of vLLM's ``lora/ops`` and Punica's SGMV:

- :func:`gather_mean_triton`: gather fusion for hard masks. Each output block reads only the
  k bank rows its profile selected and averages them in fp32. The grid runs profiles fastest,
  so the profiles that share a layer and a column block read the same bank slab while it is
  still in L2: the bank comes from device memory about once, like the GEMM, but unselected
  adapters are never read.
- :func:`apply_adapters_triton`: ``h + relu(h A_u + a_u) B_u + b_u`` for a tile of tokens of one
  sequence (every token of a sequence belongs to one profile, so a row is a segment and needs no
  sorting), down projection, bias, ReLU, up projection, bias and residual add in one launch.

Triton is optional: without it, without CUDA, with gradients required, or with the kernel turned
off, :meth:`KernelChoice.enabled` is false and ``layer.apply_adapters`` / ``fusion.fuse_gather``
run their torch code, which stays the reference. Which kernel is on is a :class:`KernelChoice`,
an object built once with the model (``MultiProfileModel``: the server from its ``kernels``
setting, ``XPEFT_KERNELS``; a library caller from that variable as the model is built) and handed
down to the encoder's adapter slots and the fusion; nothing here is a process-wide switch. By
default it turns on what the H200 measured faster (``MEASURED_FASTER``; docs/BENCHMARKS.md); a
setting overrides it: ``off``, ``all``, or a comma list such as ``apply,gather``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from xpeft.adapters.kernel_policy import KERNELS, MEASURED_FASTER, describe, parse_policy

try:  # Triton is only on GPU machines; every import of xpeft must work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

HAVE_TRITON = triton is not None
__all__ = [
    "HAVE_TRITON",
    "KERNELS",
    "MEASURED_FASTER",
    "KernelChoice",
    "apply_adapters_triton",
    "gather_mean_triton",
    "parse_policy",
]
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelChoice:
    """Which Triton kernels may replace the torch path: built once when a model is built, then
    read by every adapter layer of every forward (so it parses nothing there).

    ``setting`` is the ``XPEFT_KERNELS`` value it came from (``/readyz`` and the log show it);
    ``kernels`` maps each of :data:`KERNELS` to whether it may run.
    """

    setting: str = "off"
    kernels: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(KERNELS, False))

    @classmethod
    def parse(cls, setting: str) -> KernelChoice:
        """The choice an ``XPEFT_KERNELS`` value makes (``ValueError`` for an unknown kernel)."""
        return cls(setting.strip().lower(), parse_policy(setting))

    @classmethod
    def from_environment(cls) -> KernelChoice:
        """``XPEFT_KERNELS`` as it is now (unset: the measured defaults)."""
        return cls.parse(os.environ.get("XPEFT_KERNELS", ""))

    @classmethod
    def torch_only(cls) -> KernelChoice:
        """Every kernel off: the torch reference everywhere."""
        return cls.parse("off")

    def allows(self, name: str) -> bool:
        return self.kernels.get(name, False)

    def switched(self, **switches: bool) -> KernelChoice:
        """A copy with some kernels forced on or off (benchmarks compare both paths)."""
        unknown = set(switches) - set(KERNELS)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}; known: {KERNELS}")
        return replace(self, kernels={**self.kernels, **switches})

    def enabled(self, name: str, *tensors: torch.Tensor) -> bool:
        """True when kernel ``name`` should replace the torch path for these tensors.

        Needs Triton, CUDA tensors of a supported dtype, no autograd (the kernels have no
        backward: training keeps the torch path) and this choice's consent.
        """
        first = tensors[0]
        if not (HAVE_TRITON and first.is_cuda and first.dtype in _SUPPORTED_DTYPES):
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False
        return self.allows(name)

    def report(self, device: torch.device) -> dict[str, str]:
        """What ``/readyz``, the start-up log and ``xpeft_kernels_info`` say of the kernels: the
        setting, the kernels it chose, and those that run on ``device`` (CUDA with Triton only)."""
        runs = HAVE_TRITON and device.type == "cuda"
        return {
            "setting": self.setting,
            "chosen": describe(self.kernels),
            "running": describe(self.kernels if runs else {}),
        }


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(1, n) - 1).bit_length())


if HAVE_TRITON:

    @triton.jit
    def _apply_kernel(
        h_ptr,
        out_ptr,
        rows_ptr,
        down_ptr,
        down_bias_ptr,
        up_ptr,
        up_bias_ptr,
        T,
        D,
        R,
        stride_hb,
        stride_ht,
        stride_ob,
        stride_ot,
        HAS_ROWS: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """One program: BLOCK_T tokens of sequence b, through the adapter of profile rows[b]."""
        pid_t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        if HAS_ROWS:  # noqa: SIM108 - a compile-time branch, clearer than a ternary in a kernel
            u = tl.load(rows_ptr + b).to(tl.int64)
        else:
            u = b * 0
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_r = tl.arange(0, BLOCK_R)
        mask_t = offs_t < T
        mask_r = offs_r < R
        h_rows = h_ptr + b * stride_hb + offs_t[:, None] * stride_ht
        o_rows = out_ptr + b * stride_ob + offs_t[:, None] * stride_ot
        down_u = down_ptr + u * D * R  # (U, D, R) contiguous
        up_u = up_ptr + u * R * D  # (U, R, D) contiguous

        # z = relu(h A_u + a_u), (BLOCK_T, BLOCK_R), accumulated in fp32
        z = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            offs_k = k0 + tl.arange(0, BLOCK_D)
            mask_k = offs_k < D
            hk = tl.load(h_rows + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            a = tl.load(
                down_u + offs_k[:, None] * R + offs_r[None, :],
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )
            z = tl.dot(hk, a, z, input_precision=PRECISION)
        z += tl.load(down_bias_ptr + u * R + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
        z = tl.maximum(z, 0.0).to(h_ptr.dtype.element_ty)  # the reference rounds z to h's dtype too

        # out = h + z B_u + b_u, one column block at a time (the h tile is read again, from L2)
        for n0 in range(0, D, BLOCK_D):
            offs_n = n0 + tl.arange(0, BLOCK_D)
            mask_n = offs_n < D
            bw = tl.load(
                up_u + offs_r[:, None] * D + offs_n[None, :],
                mask=mask_r[:, None] & mask_n[None, :],
                other=0.0,
            )
            y = tl.dot(z, bw, input_precision=PRECISION)
            y += tl.load(up_bias_ptr + u * D + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tile = mask_t[:, None] & mask_n[None, :]
            hn = tl.load(h_rows + offs_n[None, :], mask=tile, other=0.0).to(tl.float32)
            tl.store(o_rows + offs_n[None, :], (hn + y).to(out_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _gather_mean_kernel(table_ptr, index_ptr, out_ptr, U, L, N, D, K, BLOCK: tl.constexpr):
        """One program: columns [pid*BLOCK, +BLOCK) of profile u, layer l = mean of its K rows."""
        u = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        layer = tl.program_id(2).to(tl.int64)
        offs = pid_d * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        index_row = index_ptr + (u * L + layer) * K  # index (U, L, K) contiguous
        for j in range(0, K):
            i = tl.load(index_row + j).to(tl.int64)
            acc += tl.load(table_ptr + (layer * N + i) * D + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + (layer * U + u) * D + offs, (acc / K).to(out_ptr.dtype.element_ty), mask=mask)


def _require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed: use the torch path (KernelChoice.enabled() is False)")


def apply_block_t(num_tokens: int) -> tuple[int, int]:
    """(tokens per program, warps). 32 x 4 was fastest or within noise of it in the H200 tile sweep
    (bench/gpu_check.py, 64 rows x 128 tokens); 16 fits sequences that short."""
    return (16, 4) if num_tokens <= 16 else (32, 4)


def apply_adapters_triton(
    h: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    up: torch.Tensor,
    up_bias: torch.Tensor,
    rows: torch.Tensor | None,
    out: torch.Tensor | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Same contract as ``layer.apply_adapters``: ``h (B, T, d)``, ``down (U, d, r)`` ... ``rows (B,)``.

    ``out`` may be given (checks poison it to prove every element is written); ``block_t`` and
    ``num_warps`` override the tile choice for tuning runs. ``rows`` must hold valid profile
    indices: the kernel does not check them (that would need a device sync).
    """
    _require_triton()
    if h.dim() != 3:
        raise ValueError(f"h must be (B, T, d), got {tuple(h.shape)}")
    B, T, D = h.shape
    R = down.shape[-1]
    if rows is None and down.shape[0] != 1:
        raise ValueError("rows must map each row to a profile when U > 1")
    if h.stride(-1) != 1:
        h = h.contiguous()
    down, down_bias, up, up_bias = (t.contiguous() for t in (down, down_bias, up, up_bias))
    if out is None:
        out = torch.empty_like(h)
    if rows is not None:
        rows = rows.contiguous()
    default_t, default_w = apply_block_t(T)
    block_t = block_t or default_t
    precision = "ieee" if h.dtype == torch.float32 else "tf32"  # ignored by Triton for 16-bit inputs
    grid = (triton.cdiv(T, block_t), B)
    _apply_kernel[grid](
        h,
        out,
        rows if rows is not None else h,
        down,
        down_bias,
        up,
        up_bias,
        T,
        D,
        R,
        h.stride(0),
        h.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_ROWS=rows is not None,
        PRECISION=precision,
        BLOCK_T=block_t,
        BLOCK_D=64,
        BLOCK_R=_next_pow2(R),
        num_warps=num_warps or default_w,
    )
    return out


def gather_mean_triton(table: torch.Tensor, index: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``table (L, N, ...)``, ``index (U, L, k)`` -> layer-major ``(L, U, ...)``: the mean of the k rows.

    Same result as ``table[layers, index].mean(dim=2).transpose(0, 1)`` (``fusion.fuse_gather``),
    without materialising the ``(U, L, k, ...)`` copy.
    """
    _require_triton()
    L, N = table.shape[:2]
    U, L2, K = index.shape
    if L2 != L:
        raise ValueError(f"index has {L2} layers, the table {L}")
    flat = table.reshape(L, N, -1).contiguous()
    D = flat.shape[-1]
    out = torch.empty((L, U) + tuple(table.shape[2:]), device=table.device, dtype=table.dtype)
    block = min(block, _next_pow2(D, floor=64))
    grid = (U, triton.cdiv(D, block), L)
    _gather_mean_kernel[grid](flat, index.contiguous(), out, U, L, N, D, K, BLOCK=block, num_warps=4)
    return out
