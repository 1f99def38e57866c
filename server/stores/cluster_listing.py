"""One page of ids in id order, merged from the per-group indexes of the cluster store.

Each group's index is read a chunk at a time; ids up to the smallest last-read id of the groups
that may hold more are known completely, so the merged prefix up to it is exactly the global
order. Ids spread uniformly over the groups, so a chunk of about twice a group's share of a page
almost always answers in one round; otherwise the open groups are read further.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

Fetch = Callable[[dict[int, bytes], int], Awaitable[dict[int, list[bytes]]]]


async def merged_page(fetch: Fetch, groups: int, start: bytes, limit: int) -> tuple[list[bytes], bool]:
    """The first ``limit`` ids after ``start`` (a ZRANGEBYLEX bound) over all groups, and whether
    more follow. ``fetch(starts, num)`` reads up to ``num`` ids after each group's start."""
    chunk = min(limit + 1, 2 * (limit + 1) // groups + 8)
    known: list[bytes] = []
    last: dict[int, bytes] = {}
    open_groups = dict.fromkeys(range(groups), start)
    while True:
        for group, ids in (await fetch(open_groups, chunk)).items():
            known.extend(ids)
            if len(ids) < chunk:
                del open_groups[group]
                last.pop(group, None)
            else:
                last[group] = ids[-1]
                open_groups[group] = b"(" + ids[-1]
        bound = min(last.values()) if open_groups else None
        merged = sorted(i for i in known if bound is None or i <= bound)
        if bound is None or len(merged) > limit:
            return merged[:limit], len(merged) > limit
        chunk = min(limit + 1, chunk * 2)
