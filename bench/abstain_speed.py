"""Serving cost of abstention rules: one batch of many profiles, with and without rules.

``python -m bench.abstain_speed`` writes JSON (``bench/results/abstain-speed.json``, rendered into
docs/BENCHMARKS.md by ``python -m bench.report``): the median seconds of ``predict_batch`` over the
same texts and profiles, without rules, with max-softmax rules and with cosine rules, interleaved
round by round in rotating order so that a busy machine slows all three alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common.runs import hardware
from xpeft.adapters.bank import create_random_bank
from xpeft.adapters.encoder import load_encoder
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles.synthetic import random_profile, random_rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profiles", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8, help="texts per profile")
    parser.add_argument("--labels", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/abstain-speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = load_encoder("minilm", device="cpu")
    bank = create_random_bank(encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters=100)
    model = MultiProfileModel(encoder, bank)
    labels = [f"l{i}" for i in range(args.labels)]
    plain = [
        random_profile(bank, "units", seed=i, labels=labels, max_length=32) for i in range(args.profiles)
    ]
    ruled = {
        score: [
            dataclasses.replace(
                p, abstain=random_rule(args.labels, i, score=score, hidden_size=encoder.hidden_size)
            )
            for i, p in enumerate(plain)
        ]
        for score in ("msp", "cosine")
    }
    texts = [f"query number {j} about something in particular" for j in range(args.rows)]
    sets = {"none": plain, **ruled}
    batches = {name: model.transient_batch(profiles) for name, profiles in sets.items()}
    seconds: dict[str, list[float]] = {name: [] for name in sets}
    names = list(sets)
    for r in range(args.rounds + 1):  # the first round warms up and is dropped
        for name in names[r % len(names) :] + names[: r % len(names)]:
            profiles = sets[name]
            start = time.perf_counter()
            model.predict_batch([(p, texts) for p in profiles], batches[name])
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v[1:]) for name, v in seconds.items()}
    result = {
        "command": "python -m bench.abstain_speed" + "".join(f" {a}" for a in sys.argv[1:]),
        "hardware": hardware(),
        "threads": args.threads,
        "rows_per_batch": args.profiles * args.rows,
        "profiles": args.profiles,
        "labels": args.labels,
        "rounds": args.rounds,
        "median_seconds": {k: round(v, 4) for k, v in medians.items()},
        # throughput against the same batch without rules: above 1 is faster
        "ratio_to_none": {k: round(medians["none"] / v, 3) for k, v in medians.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
