"""The ``head_only`` kind (the paper's other baseline): the frozen encoder and a head, no adapter.

It stores nothing besides the head and fuses as an all-zero adapter (the ``none`` fusion): the
defaults of :class:`~xpeft.profiles.kinds.base.Kind` are all it needs.
"""

from __future__ import annotations

from xpeft.profiles.kinds.base import Kind


class HeadOnly(Kind):
    wire = "head_only"
    fusion = "none"
    min_version = 1
