"""Measure how much a random bank moves the encoder's embeddings, and write docs/METHOD.md.

    python bench/method/init_effect.py            # MiniLM default, CPU; rewrites docs/METHOD.md

The lottery-ticket setting only works if different selections of random adapters give
different representations. With serving weights ``w = m / k`` the fused adapter's matrices are
means of k random matrices, so its output shrinks roughly like 1/k: this measures by how much.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from importlib.resources import files
from pathlib import Path

import torch

from xpeft.adapters.bank import create_random_bank
from xpeft.adapters.encoder import load_encoder
from xpeft.adapters.fusion import fuse
from xpeft.profiles.masks import khot
from xpeft.training.data import load_dataset

TEMPLATE = Path(__file__).with_name("METHOD.template.md")
if not __package__:  # run as a script: the repository root holds the bench package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def measure(scales: list[float], ks: list[int], num_adapters: int, draws: int) -> list[dict]:
    encoder = load_encoder("minilm", device="cpu")
    texts = load_dataset(str(files("xpeft.profiles.examples") / "sentiment.tsv")).inputs
    enc = encoder.tokenize(texts, 64)
    with torch.no_grad():
        base = encoder(enc)
    rows = []
    for scale in scales:
        bank = create_random_bank(
            encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters, init_scale=scale
        )
        g = torch.Generator().manual_seed(0)
        for k in ks:
            rel, cos, between = [], [], []
            outs = []
            for _ in range(draws):
                masks = khot(torch.randn(2, 1, bank.num_layers, num_adapters, generator=g), k).float() / k
                with torch.no_grad():
                    out = encoder(enc, fuse(masks[0], masks[1], bank))
                outs.append(out)
                rel.append(((out - base).norm(dim=1) / base.norm(dim=1)).mean().item())
                cos.append(torch.nn.functional.cosine_similarity(out, base).mean().item())
            for i in range(draws):
                for j in range(i + 1, draws):
                    between.append(((outs[i] - outs[j]).norm(dim=1) / base.norm(dim=1)).mean().item())
            rows.append(
                {
                    "init_scale": scale,
                    "k": k,
                    "relative_change": sum(rel) / draws,
                    "cosine_to_base": sum(cos) / draws,
                    "between_masks": sum(between) / len(between),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/METHOD.md")
    parser.add_argument("--draws", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = measure([0.5, 1.0, 2.0], [1, 10, 25, 50], num_adapters=100, draws=args.draws)
    table = [
        "| init_scale | k | mean ‖Δe‖/‖e‖ vs no adapter | cosine to no adapter | ‖e_i − e_j‖/‖e‖ between two masks |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    table += [
        f"| {r['init_scale']:g} | {r['k']} | {r['relative_change']:.3f} | {r['cosine_to_base']:.3f} | "
        f"{r['between_masks']:.3f} |"
        for r in rows
    ]
    text = (
        TEMPLATE.read_text()
        .replace("{{INIT_TABLE}}", "\n".join(table))
        .replace(
            "{{HARDWARE}}",
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}",
        )
        .replace("{{DRAWS}}", str(args.draws))
        .replace("{{SECONDS}}", f"{time.perf_counter() - start:.0f}")
    )
    # keep the benchmark's generated diagnostics block (bench.eval report --method-doc) as it is
    from bench.common.docs import BEGIN, END, fill_block

    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    out.write_text(text)
    if BEGIN in old and END in old:
        fill_block(out, old.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n"))
    print("\n".join(table))


if __name__ == "__main__":
    main()
