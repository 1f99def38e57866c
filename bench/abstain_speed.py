"""Serving cost of abstention rules: one batch of many profiles, with and without rules.

``python -m bench.abstain_speed`` prints JSON: the median seconds of ``predict_batch`` over the
same texts and profiles, without rules, with max-softmax rules and with cosine rules, interleaved
round by round so that a busy machine slows all three alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from xpeft.adapters.bank import create_random_bank
from xpeft.adapters.encoder import load_encoder
from xpeft.profiles.runtime import MultiProfileModel
from xpeft.profiles.synthetic import random_profile, random_rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profiles", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8, help="texts per profile")
    parser.add_argument("--labels", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
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
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, profiles in sets.items():
            start = time.perf_counter()
            model.predict_batch([(p, texts) for p in profiles], batches[name])
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v[1:]) for name, v in seconds.items()}
    print(
        json.dumps(
            {
                "rows_per_batch": args.profiles * args.rows,
                "profiles": args.profiles,
                "rounds": args.rounds,
                "median_seconds": {k: round(v, 4) for k, v in medians.items()},
                "ratio_to_none": {k: round(v / medians["none"], 3) for k, v in medians.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
