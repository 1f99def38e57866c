"""The kinds table: each kind's behaviour lives in its own module, and nothing else names a kind."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from xpeft.profiles import format as xpm
from xpeft.profiles.format_header import ProfileInfo
from xpeft.profiles.kinds import HEADER_FIELDS, KINDS, KINDS_BY_WIRE_NAME, ProfileKind
from xpeft.profiles.kinds.base import FUSIONS
from xpeft.profiles.synthetic import random_profile
from xpeft.training.train_config import TrainConfig
from xpeft.training.trainable import Trainable

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("adapters", "profiles", "training", "server", "client", "cli")
KIND_NAMES = {kind.value for kind in ProfileKind} | set(KINDS_BY_WIRE_NAME)


def _is_member(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "ProfileKind"
        and node.attr.isupper()
    )


def kind_branches(path: Path, root: Path = ROOT) -> list[str]:
    """Comparisons against a kind, in one source file: ``is ProfileKind.HARD``, ``== "hard"``,
    ``in ("hard", "units")`` (a default argument or a table key is no branch)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            for item in [side, *getattr(side, "elts", [])]:
                if _is_member(item):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: ProfileKind.{item.attr}")
                elif isinstance(item, ast.Constant) and item.value in KIND_NAMES:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: compares with {item.value!r}")
    return found


def test_no_module_outside_the_kinds_names_a_kind() -> None:
    kinds_dir = ROOT / "profiles" / "kinds"
    files = [
        p for folder in PRODUCT for p in sorted((ROOT / folder).rglob("*.py")) if kinds_dir not in p.parents
    ]
    assert len(files) > 50  # the walk found the product, so the check below is not vacuous
    found = [hit for path in files for hit in kind_branches(path)]
    assert not found, (
        "kind names outside profiles/kinds/ (give the kind an attribute instead):\n" + "\n".join(found)
    )


def test_the_check_sees_a_kind_branch(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text('if kind is ProfileKind.HARD or method in ("units", "x") or "adapter" == m:\n    pass\n')
    hits = sorted(line.split(": ", 1)[1] for line in kind_branches(probe, tmp_path))
    assert hits == ["ProfileKind.HARD", "compares with 'adapter'", "compares with 'units'"]


@pytest.mark.parametrize("kind", list(ProfileKind))
def test_every_kind_declares_a_known_fusion_and_header_fields_once(kind: ProfileKind) -> None:
    spec = KINDS[kind]
    assert spec.fusion in FUSIONS
    for field in spec.header_fields:
        assert HEADER_FIELDS[field.name] is field  # one declaration, which the header check reads
    assert (spec.state_type is None) == (spec.fusion == "none")


def test_the_header_fields_show_in_every_info_by_their_declaration(bank) -> None:
    info = xpm.read_info(xpm.encode(random_profile(bank, ProfileKind.UNITS, k=32, tied=True)))
    shown = info.as_dict()
    common = [f.name for f in dataclasses.fields(ProfileInfo) if f.name != "options"]
    assert list(shown) == common[: common.index("abstain")] + list(HEADER_FIELDS) + ["abstain", "fallback"]
    assert shown["tied"] is True and shown["scale_power"] == HEADER_FIELDS["scale_power"].default
    assert info.tied is True and info.gains is False


@pytest.mark.parametrize("method", [kind.value for kind in ProfileKind])
def test_trainable_owns_its_kinds_parameters_and_moves_them(bank, method: str) -> None:
    trainable = Trainable(method, bank, 3, TrainConfig(method=method, k=4 if method != "units" else 32))
    grouped = [p for group in trainable.param_groups() for p in group["params"]]
    assert {id(p) for p in trainable.parameters()} == {id(p) for p in grouped}  # each trained, once
    own = dict(trainable.params.named_parameters())
    assert all(trainable.get_parameter(name) is p for name, p in own.items())
    before = {name: p for name, p in own.items()}
    trainable.to(torch.float64)
    assert all(p.dtype == torch.float64 and p is before[n] for n, p in trainable.params.named_parameters())
    assert trainable.frozen_features is (method == "head_only")
