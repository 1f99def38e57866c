"""A stand-in for a GPU on a CPU-only build: tensors that say ``device="cuda"`` and hold CPU values.

Why this and not the alternatives:

- ``FakeTensorMode`` (and the ``meta`` device) give tensors without values. The serving path
  reads values on the host on purpose (slot ids with ``.tolist()``, the answer's probabilities and
  confidences, ``nonzero`` on a profile's masks), so under them the path stops at the first
  data-dependent call, long before the abstention rule.
- :class:`DeviceTensor` is a wrapper subclass (the pattern of torch's own ``LoggingTensor``):
  its ``device`` is ``cuda`` and it carries a real CPU tensor. :class:`StandInDevice`, a
  ``TorchDispatchMode``, runs every ATen op on the CPU values and enforces CUDA's rule before it
  does: an op may not take a device tensor and a host tensor together, except the ones CUDA
  accepts (a 0-dim host tensor as a scalar, host indices in advanced indexing, a copy across
  devices). So any host tensor that meets a device tensor fails as it would on a GPU
  (:class:`DeviceMixError`), and the answers still have values that can be compared with the
  CPU reference.

Factories with ``device="cuda"`` (``torch.zeros(..., device=enc.device)``) would make torch
initialise CUDA before any mode sees them; the mode takes the fake-tensor slot of the mode stack,
the one slot for which torch skips that initialisation (``device_lazy_init``), and makes them
device tensors instead. A few Python bindings look for CUDA themselves before dispatching
(``Tensor.to``, ``.cuda()``, ``.contiguous()``, ``.copy_()``, indexing, ``.tolist()``,
``.item()``, ``torch.tensor(device=...)``): a ``TorchFunctionMode`` routes those through ATen ops
the dispatch mode sees. ``Module.to("cuda")`` works with the overwrite-on-conversion switch on
(set while the stand-in is active).

Limits: CUDA graphs, streams and Triton cannot run here (the runtime's graph runner is tested with
``replay="eager"``; the kernels stay off without Triton). Autograd needs a device guard for every
tensor that requires grad, which a CPU-only build lacks for CUDA (the process aborts), so only
``torch.no_grad()`` code runs under the stand-in: serving, not training. Modes are per thread:
the code under test runs on the test's thread.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("cuda")
aten = torch.ops.aten

# Ops CUDA runs with host tensors among device ones: copies across devices, and advanced indexing,
# whose host index tensors CUDA moves to the device itself.
CROSS_DEVICE_OK = {
    aten._to_copy.default,
    aten.copy_.default,
    aten.index.Tensor,
    aten.index_put_.default,
    aten.index_put.default,
    aten._index_put_impl_.default,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
}


class DeviceMixError(RuntimeError):
    """A host tensor met a device tensor in one op: a GPU raises here too."""


class DeviceTensor(torch.Tensor):
    """A tensor on the stand-in device: ``device`` says cuda, ``elem`` holds the CPU values."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> DeviceTensor:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=DEVICE,
            requires_grad=elem.requires_grad,
        )

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    def __repr__(self) -> str:  # type: ignore[override]
        return f"DeviceTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        # reached without the mode (another thread): same rule, same CPU execution
        return run_op(func, args, kwargs or {})


def _describe(t: torch.Tensor) -> str:
    where = "device" if isinstance(t, DeviceTensor) else f"host ({t.device.type})"
    return f"{where} {tuple(t.shape)} {t.dtype}"


def run_op(func, args: tuple, kwargs: dict) -> Any:
    """Check the op's inputs for a host/device mix, run it on the CPU values, wrap what the
    device would hold."""
    leaves, _ = tree_flatten((args, kwargs))
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    lost = [t for t in tensors if t.device.type == DEVICE.type and not isinstance(t, DeviceTensor)]
    if lost:
        raise TypeError(f"{func}: a {type(lost[0]).__name__} on the stand-in device without its values")
    on_device = [t for t in tensors if isinstance(t, DeviceTensor)]
    on_host = [t for t in tensors if not isinstance(t, DeviceTensor) and t.dim() > 0]
    if on_device and on_host and func not in CROSS_DEVICE_OK:
        raise DeviceMixError(
            f"{func}: host and device tensors in one op ("
            + ", ".join(_describe(t) for t in on_device[:1] + on_host[:2])
            + ")"
        )
    target = kwargs.get("device")
    wants_device = target is not None and torch.device(target).type == DEVICE.type
    wants_host = target is not None and not wants_device
    if wants_device:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    if func is aten._to_copy.default and not wants_device and not wants_host:
        wants_device = isinstance(args[0], DeviceTensor)  # a dtype change keeps the device
    unwrapped_args, unwrapped_kwargs = tree_map(_unwrap, (args, kwargs))
    out = func(*unwrapped_args, **unwrapped_kwargs)
    schema = func._schema
    if (
        schema.arguments
        and schema.arguments[0].alias_info is not None
        and schema.arguments[0].alias_info.is_write
    ):
        return args[0]  # in place: the caller's tensor, now holding the new values
    if "out" in kwargs:
        return kwargs["out"]
    if wants_host or not (on_device or wants_device):
        return out
    return tree_map(lambda t: DeviceTensor(t) if isinstance(t, torch.Tensor) else t, out)


def _unwrap(t: object) -> object:
    return t.elem if isinstance(t, DeviceTensor) else t


class _Ops(TorchDispatchMode):
    """Every ATen op: the one-device rule, then the CPU values."""

    def __init__(self) -> None:
        super().__init__()
        # the fake-tensor slot: torch skips CUDA's lazy initialisation for factories under it
        self._mode_key = torch._C._TorchDispatchModeKey.FAKE

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


# Python entry points that check for CUDA before any op is dispatched (a device guard in the
# binding itself, not in the op) are rerouted by :class:`_Moves`: Tensor.to, .cuda, .contiguous,
# .copy_, indexing, the host reads below, and ("not linked with support
# for cuda devices"): they make their tensor on the host, then one copy puts it on the device.
_FACTORIES = {torch.tensor, torch.as_tensor}
# Reading values on the host: CUDA copies them over (a sync), the C++ side here would look for CUDA.
_READS = {
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
}


class _Moves(TorchFunctionMode):
    """``Tensor.to`` / ``.cuda()`` / ``torch.tensor(device=...)`` towards the stand-in device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to or func is torch.Tensor.cuda:
            if func is torch.Tensor.cuda:
                device, dtype = DEVICE, None
            else:
                device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if isinstance(args[0], DeviceTensor) or (device is not None and device.type == DEVICE.type):
                return _move(args[0], device, dtype)
        elif func in _READS and args and isinstance(args[0], DeviceTensor):
            return func(args[0].elem, *args[1:], **kwargs)  # CUDA copies to the host here
        elif func is torch.Tensor.contiguous and isinstance(args[0], DeviceTensor):
            t = args[0]
            return t if t.is_contiguous() else torch.ops.aten.clone(t, memory_format=torch.contiguous_format)
        elif func is torch.Tensor.copy_ and any(isinstance(t, DeviceTensor) for t in args[:2]):
            return torch.ops.aten.copy_(*args[:2], **kwargs)
        elif func is torch.Tensor.__getitem__ or func is torch.Tensor.__setitem__:
            return _indexing(func, args)
        elif func is torch.as_tensor and isinstance(args[0], DeviceTensor):
            return _move(args[0], torch.device(kwargs.get("device") or DEVICE), kwargs.get("dtype"))
        elif func in _FACTORIES:
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == DEVICE.type:
                return _to_device(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


def _indexing(func, args: tuple) -> Any:
    """``t[index]`` and ``t[index] = value``: CUDA moves host indices (and a host value) to the
    device itself, but refuses device indices into a host tensor."""
    if not isinstance(args[0], DeviceTensor):
        if any(isinstance(t, DeviceTensor) for t in tree_flatten(args[1])[0]):
            raise DeviceMixError(f"a host tensor {tuple(args[0].shape)} indexed with device indices")
        return func(*args)
    out = func(*tree_map(_unwrap, args))
    return None if func is torch.Tensor.__setitem__ else DeviceTensor(out)


def _move(t: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    """``t.to(device, dtype)`` by ops the mode sees (the binding of ``Tensor.to`` looks for CUDA)."""
    if dtype is not None and dtype != t.dtype:
        t = torch.ops.aten._to_copy(t, dtype=dtype)
    if device is None or (device.type == DEVICE.type) == isinstance(t, DeviceTensor):
        return t
    return torch.ops.aten._to_copy(t, device=device)


def _to_device(t: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._to_copy(t, device=DEVICE)


class StandInDevice:
    """Within ``with StandInDevice():``, ``device="cuda"`` makes :class:`DeviceTensor` values and
    every op enforces CUDA's one-device rule (on this thread)."""

    def __enter__(self) -> StandInDevice:
        # Module.to(device) then makes new parameters (device tensors) instead of swapping the
        # old ones' data in place, which would keep the Parameter and lose the values behind it
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        self._moves, self._ops = _Moves(), _Ops()
        self._moves.__enter__()
        self._ops.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ops.__exit__(*exc)
        self._moves.__exit__(*exc)
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)


def values(t: torch.Tensor) -> torch.Tensor:
    """The CPU values behind a stand-in device tensor (a host tensor as it is)."""
    return t.elem if isinstance(t, DeviceTensor) else t
