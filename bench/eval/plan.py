"""The grid as an ordered list of runs with stable keys.

Order matters for a run that may stop early (deadline, Ctrl-C): the default variant first, seed by
seed, and inside one (profile, seed) every method and bank back to back, so the runs a paired
difference needs finish close together. Research variants come after the whole default grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.eval.config import BASELINES, ConfigError, EvalConfig
from bench.eval.tasks import TaskData


@dataclass(frozen=True)
class RunSpec:
    task: str
    profile: str
    method: str
    bank: str  # "random", "trained", or "none" for the baselines (they read no bank)
    variant: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.profile}/{self.method}/{self.bank}/{self.variant}/s{self.seed}"


def _cells(methods: Sequence[str], banks: Sequence[str]) -> list[tuple[str, str]]:
    """(method, bank) pairs: baselines once with bank "none", the others once per bank."""
    cells = [(m, "none") for m in methods if m in BASELINES]
    return cells + [(m, b) for b in banks for m in methods if m not in BASELINES]


def build_plan(
    config: EvalConfig,
    data: TaskData,
    only_variants: Sequence[str] | None = None,
    only_tasks: Sequence[str] | None = None,
    only_methods: Sequence[str] | None = None,
) -> list[RunSpec]:
    """Every run of the config, in the order they should run; the ``only_*`` names narrow it
    (``only_methods`` lets a costly method sit out a task group without a config of its own)."""
    for given, known, what in (
        (only_variants, [v.name for v in config.variants], "variant"),
        (only_tasks, [t.name for t in config.tasks], "task"),
        (only_methods, list(config.methods), "method"),
    ):
        unknown = sorted(set(given or ()) - set(known))
        if unknown:
            raise ConfigError(f"no {what} named {unknown} in the config; it has {known}")
    # only the selected tasks' data must be present
    names = {t.name: data.profile_names(t) for t in config.tasks if not only_tasks or t.name in only_tasks}
    plan: list[RunSpec] = []
    for v in config.variants:
        if only_variants and v.name not in only_variants:
            continue
        cells = [
            c for c in _cells(v.methods, v.banks or config.banks) if not only_methods or c[0] in only_methods
        ]
        for seed in v.seeds or config.seeds:
            for task in config.tasks:
                if (v.tasks and task.name not in v.tasks) or (only_tasks and task.name not in only_tasks):
                    continue
                for profile in names[task.name]:
                    plan += [RunSpec(task.name, profile, m, b, v.name, seed) for m, b in cells]
    return plan
