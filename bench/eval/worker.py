"""One run, start to finish, in whichever process executes it.

A run trains with the library's ``train_profile`` and is then scored the way the server would
score it: the profile is encoded to ``.xpm`` bytes, decoded again against the bank, and evaluated
through ``MultiProfileModel``. A worker loads the encoder once and keeps banks and data in memory.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bench.eval import abstention
from bench.eval.banks import Donor, donor_texts, resolve, train_donor
from bench.eval.config import EvalConfig, TrainedBankSpec
from bench.eval.plan import RunSpec
from bench.eval.tasks import EvalProfile, TaskData, texts
from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import AdapterEncoder, load_encoder
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.profiles.format_sizes import size_parts
from xpeft.profiles.profile import Profile
from xpeft.training.evaluate import evaluate
from xpeft.training.train import TrainConfig, train_profile
from xpeft.training.train_config import APPLIES_TO

CURVE_POINTS = 50


def hardware(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, in a form the report can state plainly."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu,
        "cpu_cores": usable,
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "python": platform.python_version(),
    }


def profile_sizes(profile: Profile, blob: bytes) -> dict[str, int]:
    """The ``.xpm`` total and its parts (:func:`~xpeft.profiles.format_sizes.size_parts`); the
    abstention rule's part only where the profile has one, as the results have always recorded."""
    parts = size_parts(blob)
    if not parts["rule"]:
        del parts["rule"]
    return parts


def _curve(history: list[dict[str, Any]]) -> list[list[float]]:
    every = max(1, math.ceil(len(history) / CURVE_POINTS))
    keep = [h for i, h in enumerate(history) if i % every == 0]
    if history and keep[-1] is not history[-1]:
        keep[-1] = history[-1]
    return [[h["step"], round(h["loss"], 5)] for h in keep]


class Worker:
    def __init__(
        self, config: EvalConfig, data_root: str, model: str, device: str, bank_files: dict[str, str]
    ) -> None:
        self.config, self.model_name = config, model
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.data = TaskData(data_root)
        self.bank_files = bank_files  # bank key -> file, filled by the parent before runs start
        self._encoder: AdapterEncoder | None = None
        self._banks: dict[str, AdapterBank] = {}
        self._models: dict[str, MultiProfileModel] = {}
        self._profiles: dict[tuple[str, str], EvalProfile] = {}
        self._donor_texts: dict[str, set[str]] = {}  # bank key -> donor sentences

    @property
    def encoder(self) -> AdapterEncoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.model_name, device=self.device)
        return self._encoder

    def bank(self, key: str) -> AdapterBank:
        if key not in self._banks:
            self._banks[key] = AdapterBank.load(self.bank_files[key])
        return self._banks[key]

    def evaluated(self, task: str, profile: str) -> EvalProfile:
        if (task, profile) not in self._profiles:
            self._profiles[(task, profile)] = self.data.profile(self.config.task(task), profile)
        return self._profiles[(task, profile)]

    def train_config(self, spec: RunSpec) -> TrainConfig:
        t = self.config.task(spec.task)
        c = self.config
        overrides = {
            **c.train,
            **c.method_train.get(spec.method, {}),
            **t.train,
            **c.variant(spec.variant).train,
        }
        # a setting pinned for the masks (say gain=false) is not one the baselines may be given
        overrides = {k: v for k, v in overrides.items() if spec.method in APPLIES_TO.get(k, (spec.method,))}
        return TrainConfig(
            method=spec.method,
            seed=spec.seed,
            epochs=t.epochs,
            batch_size=t.batch_size,
            max_length=t.max_length,
            **overrides,
        )

    def donor(self, spec: TrainedBankSpec, donor: Donor) -> dict[str, Any]:
        return train_donor(self.encoder, spec, donor)

    def run(self, spec: RunSpec, bank_key: str) -> dict[str, Any]:
        """Train, encode, decode, evaluate; the result row (without session fields)."""
        ev = self.evaluated(spec.task, spec.profile)
        bank = self.bank(bank_key)
        config = self.train_config(spec)
        result = train_profile(self.encoder, bank, ev.train, config, progress=False)
        blob = xpm.encode(result.profile)
        served = xpm.decode(blob, bank)
        if bank.bank_id not in self._models:
            self._models[bank.bank_id] = MultiProfileModel(self.encoder, bank)
        start = time.perf_counter()
        metrics = evaluate(self._models[bank.bank_id], served, ev.dev, batch_size=self.config.eval_batch_size)
        history = result.history
        row: dict[str, Any] = {
            "type": "run",
            "key": spec.key,
            "task": spec.task,
            "profile": spec.profile,
            "method": spec.method,
            "bank": spec.bank,
            "variant": spec.variant,
            "seed": spec.seed,
            "accuracy": metrics["accuracy"],
            "f1": metrics.get("f1", metrics.get("f1_macro")),
            "f1_kind": "f1" if "f1" in metrics else "f1_macro",
            "mcc": metrics["mcc"],
            "n_train": len(ev.train),
            "n_dev": len(ev.dev),
            "n_labels": served.num_labels,
            "train_seconds": round(result.seconds, 3),
            "eval_seconds": round(time.perf_counter() - start, 3),
            "steps": len(history),
            "examples_per_second": round(len(ev.train) * config.epochs / result.seconds, 2)
            if result.seconds
            else None,
            "final_train_accuracy": history[-1]["train_accuracy"] if history else None,
            "loss_curve": _curve(history),
            "bytes": profile_sizes(served, blob),
            "bank_key": bank_key if spec.bank != "none" else None,
            "bank_id": bank.bank_id if spec.bank != "none" else None,
            "num_adapters": bank.num_adapters if spec.bank != "none" else None,
            "k": served.k or None,
            # what k selects from: the bank's adapters (hard) or their N*r units (units)
            "pool": served.num_adapters * (served.bottleneck if served.kind.spec.fusion == "units" else 1),
            "train_config": result.config,
        }
        if self.config.task(spec.task).kind == "clinc_oos" and result.split is not None:
            row["abstention"] = abstention.measure(
                self._models[bank.bank_id],
                served,
                result.split,
                self.data,
                spec.profile,
                self.config.eval_batch_size,
            )
        if spec.bank == "trained":
            row["donor_overlap"] = self._overlap(spec, ev, bank_key)
        diagnostics = getattr(result, "diagnostics", None)
        if diagnostics is not None:
            row["diagnostics"] = diagnostics
        return row

    def _overlap(self, spec: RunSpec, ev: EvalProfile, bank_key: str) -> int:
        """Sentences of this profile's train or dev data that a donor of its bank trained on."""
        if bank_key not in self._donor_texts:
            bank_spec = resolve(self.config, spec.bank, spec.variant)
            assert isinstance(bank_spec, TrainedBankSpec)
            self._donor_texts[bank_key] = donor_texts(bank_spec, self.data)
        return len((texts(ev.train) | texts(ev.dev)) & self._donor_texts[bank_key])
