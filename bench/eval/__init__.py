"""The quality benchmark: ``python -m bench.eval run`` writes JSONL, ``report`` renders docs/EVALUATION.md."""
