"""What a ``.xpm`` file's bytes are spent on, from its own sections: the breakdown ``xpeft info``,
the demo and the evaluation report show, so every size they print adds up to the file."""

from __future__ import annotations

from xpeft.adapters.bank import TENSOR_NAMES
from xpeft.profiles import format as xpm

SELECTION_SECTIONS = frozenset(
    {"mask_down", "mask_up", "unit_down", "unit_up", "weights_down", "weights_up", *TENSOR_NAMES}
)
HEAD_SECTIONS = frozenset({"head_weight", "head_bias"})
RULE_SECTIONS = frozenset({"abstain_rule", "class_means", "class_signs"})


def size_parts(data: bytes) -> dict[str, int]:
    """``total`` bytes and their parts: ``selection`` (masks, units, soft weights or the whole
    adapter), ``head`` (fp16), ``rule`` (the abstention rule: its knots and, for the class-mean
    scores, ``C x d`` fp16 means; 0 without one), ``extras`` (gains, per-adapter weights, output
    scales) and ``header`` (magic, version, lengths, the JSON header, the checksum)."""
    info = xpm.read_info(data)
    parts = {"selection": 0, "head": 0, "rule": 0, "extras": 0}
    for s in xpm.info_sections(info):
        if s.name in SELECTION_SECTIONS:
            parts["selection"] += s.nbytes
        elif s.name in HEAD_SECTIONS:
            parts["head"] += s.nbytes
        elif s.name in RULE_SECTIONS:
            parts["rule"] += s.nbytes
        else:
            parts["extras"] += s.nbytes
    return {"total": len(data), **parts, "header": len(data) - sum(parts.values())}
