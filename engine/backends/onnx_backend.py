"""ONNX Runtime backends: the exported encoder with the per-row adapters inside the graph.

The graph's inputs are the batch's token tensors, the slot pool's four ``(L, S, ...)`` adapter
tensors and each row's slot id; its output is the mean-pooled ``(B, d)`` embedding. The adapters
are applied in the graph exactly as :func:`~xpeft.adapters.layer.apply_adapters` does in torch
(the same module is exported), so a profile's weights never pass through the quantizer.

Every call binds the inputs to the torch tensors' own memory (IOBinding): the pool is never
copied, and a pool that was reallocated (or a transient pool of a few slots) is simply bound
anew on its next call. The output is written straight into a torch tensor.

Export runs once per machine: the graph is kept in a cache folder under a key of the encoder's
``model_id`` (architecture, shapes and weights) and the exporter's versions; a fresh process loads it from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xpeft.adapters.encoder import AdapterEncoder
from xpeft.adapters.fusion import FusedAdapters
from xpeft.engine.backends.base import BackendError, default_cache_dir

log = logging.getLogger("xpeft.engine.backends")

#: Bump when the exported graph changes meaning (inputs, outputs, adapter math): old caches are unused.
GRAPH_VERSION = 1
OPSET = 18
WEIGHT_NAMES = ("down", "down_bias", "up", "up_bias")
_NUMPY_TYPES = {torch.float32: "float32", torch.int64: "int64"}


class _PooledWithAdapters(nn.Module):
    """What is exported: token tensors, the pool's adapter tensors and the slot ids in, pooled out
    (without the adapter inputs: the plain encoder, which benchmarks compare against)."""

    def __init__(self, encoder: AdapterEncoder, token_names: tuple[str, ...]) -> None:
        super().__init__()
        self.encoder = encoder
        self.token_names = token_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        k = len(self.token_names)
        encodings = dict(zip(self.token_names, inputs[:k], strict=True))
        if len(inputs) == k:
            return self.encoder(encodings)
        down, down_bias, up, up_bias, rows = inputs[k:]
        return self.encoder(encodings, FusedAdapters(down, down_bias, up, up_bias), rows)


def _token_names(encoder: AdapterEncoder) -> tuple[str, ...]:
    """The tensors the tokenizer gives (some models take no ``token_type_ids``)."""
    return tuple(sorted(encoder.tokenize(["a"], 8)))


def cache_key(encoder: AdapterEncoder) -> str:
    """The export's folder name: the encoder's content id (its architecture, shapes and weights)
    and every other input that changes the graph. The adapters' bottleneck is a dynamic axis, so
    banks of any reduction factor share one graph."""
    import onnxruntime

    token_names = _token_names(encoder)
    parts = [
        encoder.model_id,
        f"L{encoder.num_layers}",
        f"d{encoder.hidden_size}",
        str(encoder.dtype),
        ",".join(token_names),
        f"torch{torch.__version__}",
        f"ort{onnxruntime.__version__}",
        f"opset{OPSET}",
        f"v{GRAPH_VERSION}",
        json.dumps(QUANTIZER_SETTINGS, sort_keys=True),
    ]
    digest = hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()
    return f"{encoder.model_id}-{digest}"


def export_graph(encoder: AdapterEncoder, path: Path, adapters: bool = True) -> None:
    """Export the encoder with per-row adapters to ``path`` (one ``.onnx`` file, weights inside);
    ``adapters=False``: the plain encoder, token tensors in, pooled out.

    Batch, sequence, slot count and the adapters' bottleneck are dynamic axes. The TorchScript exporter traces the one path
    a pool of several slots takes (``index_select`` + ``baddbmm``), which serves a pool of one slot
    as well; the export uses eager attention, which traces into plain ONNX ops.
    """
    token_names = _token_names(encoder)
    L, d, r, S, T = encoder.num_layers, encoder.hidden_size, max(1, encoder.hidden_size // 16), 3, 8
    g = torch.Generator().manual_seed(0)
    tokens = encoder.tokenize(["an example input", "another one, a little longer"], T)
    pool = (
        torch.randn(L, S, d, r, generator=g) * 0.01,
        torch.randn(L, S, r, generator=g) * 0.01,
        torch.randn(L, S, r, d, generator=g) * 0.01,
        torch.randn(L, S, d, generator=g) * 0.01,
        torch.tensor([2, 0]),  # rows of two slots of three
    )
    example = (*(tokens[n] for n in token_names), *(pool if adapters else ()))
    names = [*token_names, *((*WEIGHT_NAMES, "rows") if adapters else ())]
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in token_names}
    if adapters:
        axes.update(
            {
                "down": {1: "slots", 3: "bottleneck"},
                "down_bias": {1: "slots", 2: "bottleneck"},
                "up": {1: "slots", 2: "bottleneck"},
                "up_bias": {1: "slots"},
            }
        )
        axes["rows"] = {0: "batch"}
    axes["pooled"] = {0: "batch"}
    config: Any = encoder.model.config
    attention = getattr(config, "_attn_implementation", None)
    module = _PooledWithAdapters(encoder, token_names).eval()
    try:
        if attention is not None:
            config._attn_implementation = "eager"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on the branches the trace fixes
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=names,
                output_names=["pooled"],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        if attention is not None:
            config._attn_implementation = attention


#: The int8 schemes, by backend name: ``dynamic`` (ONNX Runtime's ``quantize_dynamic``: weights per
#: output channel, activations per tensor at run time) and ``block`` (``MatMulNBits`` with 8 bits:
#: weights and, at run time, activations in blocks of 128 along the inner dimension).
QUANTIZATIONS = {"onnx": None, "onnx-int8": "dynamic", "onnx-int8-block": "block"}
#: Each scheme's quantizer settings; they are part of the cache key, so a change re-quantizes.
QUANTIZER_SETTINGS: dict[str, dict[str, Any]] = {
    "dynamic": {"weight_type": "QInt8", "per_channel": True},
    "block": {"block_size": 128, "is_symmetric": True, "accuracy_level": 4, "bits": 8},
}


def quantize_graph(source: Path, target: Path, scheme: str = "dynamic") -> None:
    """int8 quantization of the frozen encoder's weight matrices only.

    Only a ``MatMul`` whose second input is a stored weight (an initializer) is quantized: the
    adapters' matrices are graph inputs, and attention's products are of two activations, so
    both stay fp32. Weights are quantized per output channel: per tensor, MiniLM's pooled
    embeddings drift several times further from the fp32 ones. ``block`` quantizes in blocks, so one
    outlier moves the scale of its block only: MiniLM's pooled embeddings drift several times less
    than with ``dynamic``.
    """
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    stored = {t.name for t in model.graph.initializer}
    frozen = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in stored]
    if not frozen:
        raise BackendError("backend_export", "no weight MatMul in the exported encoder to quantize")
    # the quantizers log advice on image models' pre-processing (root) and a line per node skipped
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        if scheme == "block":
            _quantize_blocks(model, target, frozen)
        else:
            _quantize(source, target, frozen)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _quantize(source: Path, target: Path, frozen: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=frozen,
        **{
            **QUANTIZER_SETTINGS["dynamic"],
            "weight_type": getattr(QuantType, QUANTIZER_SETTINGS["dynamic"]["weight_type"]),
        },
    )


def _quantize_blocks(model: Any, target: Path, frozen: list[str]) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # accuracy_level 4: int8 products of the blocks (VNNI where the CPU has it), fp32 accumulation
    settings = QUANTIZER_SETTINGS["block"]
    quantizer = MatMulNBitsQuantizer(
        model, nodes_to_include=frozen, algo_config=DefaultWeightOnlyQuantConfig(**settings), **settings
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), False)


def cached_graph(
    encoder: AdapterEncoder, quantization: str | None, cache_dir: Path | None, adapters: bool = True
) -> Path:
    """The graph file for ``encoder``, exported (and quantized) into the cache on first use.

    Each file is written under a temporary name in its folder and renamed into place, so a reader
    never sees half a graph and two processes exporting at once leave one whole file.
    """
    folder = (cache_dir or default_cache_dir()) / cache_key(encoder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError("backend_cache", f"cannot use the export cache {folder}: {exc.strerror}") from exc
    stem = "encoder" if adapters else "plain"
    fp32 = folder / f"{stem}.onnx"
    if not fp32.exists():
        log.info("exporting the encoder to ONNX: %s", fp32)
        _write_atomically(fp32, lambda tmp: export_graph(encoder, tmp, adapters))
    if quantization is None:
        return fp32
    quantized = folder / f"{stem}.int8-{quantization}.onnx"
    if not quantized.exists():
        log.info("quantizing the exported encoder to int8 (%s): %s", quantization, quantized)
        _write_atomically(quantized, lambda tmp: quantize_graph(fp32, tmp, quantization))
    return quantized


def _write_atomically(path: Path, write: Any) -> None:
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    try:
        tmp = scratch / path.name
        try:
            write(tmp)
        except BackendError:
            raise
        except Exception as exc:  # the exporters raise many types; the caller gets one
            raise BackendError("backend_export", f"cannot build {path.name}: {exc}") from exc
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class OnnxBackend:
    """ONNX Runtime on the CPU: the encoder graph, the pool's tensors bound in place each call."""

    def __init__(
        self, encoder: AdapterEncoder, path: Path, name: str, threads: int | None, adapters: bool = True
    ) -> None:
        import onnxruntime as ort

        self.name = name
        self.path = path
        self.adapters = adapters
        self.encoder = encoder
        self.token_names = _token_names(encoder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Threads that spin between batches would take the cores the tokenizer and server need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @classmethod
    def build(
        cls,
        encoder: AdapterEncoder,
        name: str = "onnx",
        threads: int | None = None,
        cache_dir: Path | None = None,
        adapters: bool = True,
    ) -> OnnxBackend:
        """The backend for ``encoder``: its graph from the cache, exported there on first use.

        ``adapters=False``: the plain encoder, which ignores the weights it
        is given (for benchmarks).
        """
        if encoder.device.type != "cpu" or encoder.dtype != torch.float32:
            raise BackendError(
                "backend_unavailable",
                f"ONNX backends run an fp32 encoder on the CPU, not {encoder.dtype} on {encoder.device}",
            )
        if name not in QUANTIZATIONS:
            raise BackendError(
                "bad_backend", f"{name} is not an ONNX backend; one of {sorted(QUANTIZATIONS)}"
            )
        path = cached_graph(encoder, QUANTIZATIONS[name], cache_dir, adapters)
        return cls(encoder, path, name, threads, adapters)

    def __call__(
        self, encodings: dict[str, torch.Tensor], weights: FusedAdapters | None, rows: torch.Tensor | None
    ) -> torch.Tensor:
        batch = encodings[self.token_names[0]].shape[0]
        inputs = [encodings[n].to(torch.long) for n in self.token_names]
        names = list(self.token_names)
        if self.adapters:
            if weights is None:
                raise BackendError("backend_input", "this graph applies adapters: give it the pool's weights")
            if rows is None:  # one profile: every row reads slot 0
                rows = torch.zeros(batch, dtype=torch.long)
            inputs += [*weights.tensors(), rows.to(torch.long)]
            names += [*WEIGHT_NAMES, "rows"]
        inputs = [t.contiguous() for t in inputs]  # no copy for the pool's tensors: they are contiguous
        out = torch.empty(batch, self.encoder.hidden_size, dtype=torch.float32)
        binding = self.session.io_binding()
        for name, tensor in zip(names, inputs, strict=True):
            _bind(binding.bind_input, name, tensor)
        _bind(binding.bind_output, "pooled", out)
        self.session.run_with_iobinding(binding)
        return out


def _bind(bind: Any, name: str, tensor: torch.Tensor) -> None:
    """Bind ``tensor``'s own memory (it must stay alive until the run returns: the caller holds it)."""
    import numpy as np

    if tensor.dtype not in _NUMPY_TYPES:
        raise BackendError("backend_input", f"{name} is {tensor.dtype}; the graph takes float32 and int64")
    bind(name, "cpu", 0, np.dtype(_NUMPY_TYPES[tensor.dtype]), tuple(tensor.shape), tensor.data_ptr())
