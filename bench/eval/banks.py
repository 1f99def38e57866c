"""The two banks: a seeded random bank, and a bank trained the way a deployment gets one.

The trained bank is N donor profiles' single adapters: each donor is a seeded random subset of
5-20 CLINC intents whose examples come from CLINC's *test* split (sentences that also occur in
its train or dev files are dropped), trained by the library's own ``train_profile``, then stacked
with ``stack_adapters``. No evaluated profile's train or dev sentence reaches a donor; each run on
this bank checks that again against its own data and records the count.

Built banks are cached under the work dir, keyed by a hash of everything that defines them, so
every worker process and every resumed session uses the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bench.eval.config import EvalConfig, RandomBankSpec, TrainedBankSpec
from bench.eval.tasks import CLINC, TaskData, only_labels, texts
from xpeft.adapters.bank import AdapterBank, create_random_bank, stack_adapters
from xpeft.adapters.encoder import AdapterEncoder
from xpeft.training.data import Dataset
from xpeft.training.train import TrainConfig, train_profile

BankSpec = RandomBankSpec | TrainedBankSpec
CACHE_VERSION = 1  # bump when the way a bank is built changes


def resolve(config: EvalConfig, bank: str, variant: str) -> BankSpec:
    """The bank spec of a run: the config's, with the variant's bank overrides (``none``: the
    default random bank, which a baseline uses only for its shapes)."""
    if bank in ("random", "none"):
        base: BankSpec = config.random_bank
    else:
        base = config.trained_bank
    overrides = config.variant(variant).bank if bank != "none" else {}
    return dataclasses.replace(base, **overrides) if overrides else base


def bank_key(spec: BankSpec, model_id: str) -> str:
    """Stable cache key: the spec's fields, the encoder's content id and the cache version."""
    kind = "random" if isinstance(spec, RandomBankSpec) else "trained"
    blob = json.dumps(
        {"kind": kind, "spec": dataclasses.asdict(spec), "model_id": model_id, "version": CACHE_VERSION},
        sort_keys=True,
    )
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def random_bank(encoder: AdapterEncoder, spec: RandomBankSpec, model_name: str = "") -> AdapterBank:
    return create_random_bank(
        encoder.num_layers,
        encoder.hidden_size,
        encoder.model_id,
        spec.num_adapters,
        spec.reduction_factor,
        spec.seed,
        spec.init_scale,
        model_name=model_name,
    )


@dataclass(frozen=True)
class Donor:
    """One earlier customer whose adapter ends up in the trained bank."""

    index: int
    intents: tuple[str, ...]
    data: Dataset
    dropped: int  # its test-split sentences left out because they occur in CLINC train or dev


def donors(spec: TrainedBankSpec, data: TaskData) -> list[Donor]:
    """The donors' data, deterministic from the spec (every worker derives the same)."""
    pool = data.file(f"{CLINC}/test.tsv")
    evaluated = texts(data.file(f"{CLINC}/train.tsv")) | texts(data.file(f"{CLINC}/dev.tsv"))
    intents = sorted(set(pool.labels))
    out = []
    for i in range(spec.num_adapters):
        rng = random.Random(f"trained_bank:{spec.seed}:{i}")
        chosen = sorted(rng.sample(intents, rng.randint(spec.min_intents, spec.max_intents)))
        mine = only_labels(pool, set(chosen))
        keep = [j for j, x in enumerate(mine.inputs) if x not in evaluated]
        kept = Dataset([mine.inputs[j] for j in keep], [mine.labels[j] for j in keep])
        out.append(Donor(i, tuple(chosen), kept, len(mine) - len(kept)))
    return out


def donor_texts(spec: TrainedBankSpec, data: TaskData) -> set[str]:
    out: set[str] = set()
    for d in donors(spec, data):
        out |= texts(d.data)
    return out


def train_donor(encoder: AdapterEncoder, spec: TrainedBankSpec, donor: Donor) -> dict[str, Any]:
    """One donor's adapter, trained exactly as a ``single_adapter`` profile is."""
    shapes = create_random_bank(
        encoder.num_layers, encoder.hidden_size, encoder.model_id, 1, spec.reduction_factor, seed=0
    )
    config = TrainConfig(
        method="single_adapter",
        seed=spec.seed * 100_003 + donor.index,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        **spec.train,
    )
    result = train_profile(encoder, shapes, donor.data, config, progress=False)
    assert result.profile.adapter is not None
    return {
        "adapter": {k: v.contiguous() for k, v in result.profile.adapter.items()},
        "stats": {
            "index": donor.index,
            "intents": len(donor.intents),
            "examples": len(donor.data),
            "dropped": donor.dropped,
            "train_accuracy": result.history[-1]["train_accuracy"],
            "seconds": round(result.seconds, 3),
        },
    }


class BankStore:
    """Banks and finished donors on disk under ``work_dir`` (safe to share between processes:
    every file is written to a temporary name and renamed)."""

    def __init__(self, work_dir: str | Path) -> None:
        self.root = Path(work_dir)

    def bank_path(self, key: str) -> Path:
        return self.root / "banks" / f"{key}.safetensors"

    def info_path(self, key: str) -> Path:
        return self.root / "banks" / f"{key}.json"

    def donor_path(self, key: str, index: int) -> Path:
        return self.root / "donors" / key / f"{index:04d}.safetensors"

    def has(self, key: str) -> bool:
        return self.bank_path(key).is_file() and self.info_path(key).is_file()

    def info(self, key: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self.info_path(key).read_text())
        return info

    def save_bank(self, key: str, bank: AdapterBank, info: dict[str, Any]) -> None:
        bank.save(self.bank_path(key))
        tmp = self.info_path(key).with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**info, "bank_id": bank.bank_id, "key": key}, indent=1))
        tmp.replace(self.info_path(key))

    def load_donor(self, key: str, index: int) -> dict[str, Any] | None:
        path = self.donor_path(key, index)
        if not path.is_file():
            return None
        meta_path = path.with_suffix(".json")
        return {"adapter": load_file(str(path)), "stats": json.loads(meta_path.read_text())}

    def save_donor(self, key: str, index: int, donor: dict[str, Any]) -> None:
        path = self.donor_path(key, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(donor["stats"]))
        tmp = path.with_name(path.name + ".tmp")
        save_file(donor["adapter"], str(tmp))
        tmp.replace(path)


def stack_donors(
    encoder: AdapterEncoder, spec: TrainedBankSpec, trained: list[dict[str, Any]], model_name: str = ""
) -> tuple[AdapterBank, dict[str, Any]]:
    """The trained bank and what the report says about it."""
    adapters = [{k: v.to(torch.float32) for k, v in d["adapter"].items()} for d in trained]
    bank = stack_adapters(adapters, encoder.model_id, init="trained:clinc-test-donors", model_name=model_name)
    stats = [d["stats"] for d in trained]
    info = {
        "kind": "trained",
        "spec": dataclasses.asdict(spec),
        "donors": len(stats),
        "donor_examples": sum(s["examples"] for s in stats),
        "donor_dropped_overlap": sum(s["dropped"] for s in stats),
        "donor_intents_mean": sum(s["intents"] for s in stats) / len(stats),
        "donor_train_accuracy_mean": sum(s["train_accuracy"] for s in stats) / len(stats),
        "donor_train_seconds": round(sum(s["seconds"] for s in stats), 1),
    }
    return bank, info
