"""CUDA graphs for the model worker's forward, one per (batch size, sequence length) bucket.

A served batch has a shape that changes with every request mix; a CUDA graph replays one fixed
shape. So each batch is padded up to a bucket (batch sizes 1, 2, 4, 8, then steps of 8 up to the
largest batch; sequence lengths 16, 32, 48, 64, 96, 128, ... up to the encoder's positions; each
bucket captured when first seen), copied into
that bucket's static buffers (token ids, attention mask, token types, each row's slot id), and the
bucket's graph is replayed; the pooled output is read from a static buffer. Padded rows point at
slot 0 with an all-zero attention mask, padded tokens are masked out: neither changes a real row.
The slot pool's weight tensors never move, so a graph captured once serves every later batch of
that bucket, whatever profiles it holds.

Graph replay needs CUDA. Everything else (bucketing, padding, the static buffers) runs on any
device: with ``replay="eager"`` the bucket runs the forward on its static buffers instead of
replaying, which is how CPU tests check that padding changes no answer. A bucket whose capture
fails (an op that cannot be captured) runs eagerly from then on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from xpeft.adapters.encoder import AdapterEncoder
from xpeft.adapters.fusion import FusedAdapters

log = logging.getLogger("xpeft.graphs")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including ``max_batch``.

    Steps of 8 past 8 rows bound the padding of a batch to 8 rows (powers of two would pad 33
    rows to 64: twice the work), at the cost of more buckets, each captured only when first seen.
    """
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return [*sizes, max_batch]


def seq_buckets(max_tokens: int) -> list[int]:
    """16, 32, 48, 64, 96, 128, 192, 256, 384, 512, ... up to and including ``max_tokens``.

    Each step is at most 1.5 times the last past 32 tokens, so padding adds at most half the tokens.
    """
    sizes, power = [16], 32
    while power < max_tokens:
        sizes += [power, power * 3 // 2]  # 32, 48, 64, 96, 128, 192, ...
        power *= 2
    return [s for s in sizes if s < max_tokens] + [max_tokens]


def bucket_for(size: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds ``size``; ``None`` when it exceeds the largest."""
    for b in buckets:
        if size <= b:
            return b
    return None


@dataclass
class Bucket:
    """One shape's static buffers and, on CUDA, its captured graph."""

    batch: int
    seq: int
    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor
    output: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    eager: bool = False
    replays: int = 0

    def load(self, encodings: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        """Copy a batch into the static buffers; the rest of each buffer is padding."""
        B, T = encodings["input_ids"].shape
        for name, static in self.inputs.items():
            static.zero_()
            static[:B, :T].copy_(encodings[name], non_blocking=True)
        self.rows.zero_()
        self.rows[:B].copy_(rows, non_blocking=True)


class GraphRunner:
    """Pads each batch to a bucket and replays (or, eagerly, runs) that bucket's forward.

    ``replay``: ``"cuda"`` captures CUDA graphs (the encoder must be on CUDA); ``"eager"`` runs the
    same static-buffer path without graphs (tests, and buckets whose capture failed). ``weights``
    ``None`` graphs the plain encoder (benchmarks compare against it).
    """

    def __init__(
        self,
        encoder: AdapterEncoder,
        weights: FusedAdapters | None,
        max_batch: int,
        replay: str = "cuda",
        max_tokens: int | None = None,
    ) -> None:
        if replay not in ("cuda", "eager"):
            raise ValueError(f"replay must be 'cuda' or 'eager', not {replay!r}")
        if replay == "cuda" and encoder.device.type != "cuda":
            raise ValueError("CUDA graphs need the encoder on a CUDA device")
        self.encoder = encoder
        self.weights = weights
        self.replay = replay
        self.batch_sizes = batch_buckets(max_batch)
        self.seq_lens = seq_buckets(max_tokens or encoder.max_tokens)
        self.buckets: dict[tuple[int, int, tuple[str, ...]], Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if replay == "cuda" else None

    def bucket_shape(self, batch: int, seq: int) -> tuple[int, int] | None:
        b, t = bucket_for(batch, self.batch_sizes), bucket_for(seq, self.seq_lens)
        return None if b is None or t is None else (b, t)

    def __call__(self, encodings: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Pooled ``(B, d)`` embeddings of the batch, each row through its slot's adapters."""
        B, T = encodings["input_ids"].shape
        shape = self.bucket_shape(B, T)
        if shape is None:  # larger than any bucket: run it as it is
            return self.encoder(encodings, self.weights, rows)
        key = (shape[0], shape[1], tuple(sorted(encodings)))
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self._make(shape, encodings)
            self.buckets[key] = bucket
        bucket.load(encodings, rows)
        if bucket.graph is not None:
            bucket.graph.replay()
            bucket.replays += 1
        else:
            bucket.output = self._forward(bucket)
        assert bucket.output is not None
        return bucket.output[:B]

    def _forward(self, bucket: Bucket) -> torch.Tensor:
        return self.encoder(bucket.inputs, self.weights, bucket.rows)

    def _make(self, shape: tuple[int, int], encodings: dict[str, torch.Tensor]) -> Bucket:
        b, t = shape
        device = encodings["input_ids"].device
        inputs = {
            name: torch.zeros(b, t, dtype=tensor.dtype, device=device) for name, tensor in encodings.items()
        }
        bucket = Bucket(b, t, inputs, torch.zeros(b, dtype=torch.long, device=device))
        # captured with padding present (first token kept, the rest masked), so the forward takes
        # the general masked-attention path, never a shortcut that a mask of all ones would allow
        if "attention_mask" in inputs:
            inputs["attention_mask"][:, 0] = 1
        if self.replay == "cuda":
            self._capture(bucket)
        return bucket

    def _capture(self, bucket: Bucket) -> None:
        """Warm up on a side stream, then capture one forward into the bucket's graph."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                bucket.output = self._forward(bucket)
            bucket.graph = graph
        except RuntimeError as exc:  # an op that cannot be captured: this bucket runs eagerly
            log.warning("CUDA graph capture failed for bucket %dx%d: %s", bucket.batch, bucket.seq, exc)
            bucket.graph, bucket.output, bucket.eager = None, None, True

    def stats(self) -> dict[str, int]:
        return {
            "buckets": len(self.buckets),
            "captured": sum(b.graph is not None for b in self.buckets.values()),
            "replays": sum(b.replays for b in self.buckets.values()),
        }


def graphs_wanted(setting: bool | None, device: torch.device) -> bool:
    """``XPEFT_CUDA_GRAPHS``: unset means on with CUDA, off elsewhere; on without CUDA is refused."""
    if setting is None:
        return device.type == "cuda"
    if setting and device.type != "cuda":
        raise ValueError("cuda_graphs is on but the model runs on " + device.type)
    return setting
