"""Concurrent updates: one writer PUTs new versions of a profile while readers on every replica
predict it. Each answer's ``version`` is mapped back to the file that PUT returned it for, and its
scores are compared with the offline model's scores for that file.
"""

from __future__ import annotations

import asyncio

import httpx


async def run_updates(
    writer_url: str,
    reader_urls: list[str],
    admin: dict[str, str],
    reader: dict[str, str],
    profile_id: str,
    files: list[bytes],
    expected: list[list[dict[str, float]]],
    texts: list[str],
    puts: int = 14,
    readers_per_url: int = 6,
    put_gap_s: float = 0.15,
    atol: float = 1e-4,
) -> dict:
    """``expected[i]``: the offline scores of ``files[i]`` for ``texts``. Returns counts and every mismatch."""
    file_of_version: dict[int, int] = {}
    answers: list[tuple[str, dict]] = []
    failures: list[str] = []
    done = asyncio.Event()

    async def writer() -> None:
        async with httpx.AsyncClient(base_url=writer_url, headers=admin, timeout=30) as client:
            for n in range(puts + 1):
                response = await client.put(f"/profiles/{profile_id}", content=files[n % len(files)])
                if not response.is_success:
                    failures.append(f"PUT {n}: {response.status_code} {response.text[:200]}")
                    continue
                file_of_version[response.json()["version"]] = n % len(files)
                await asyncio.sleep(put_gap_s)
        done.set()

    async def read(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers=reader, timeout=30) as client:
            while not file_of_version:  # the first version exists before anyone reads
                await asyncio.sleep(0.01)
            while not done.is_set():
                response = await client.post(f"/profiles/{profile_id}/predict", json={"inputs": texts})
                if response.status_code != 200:
                    failures.append(f"{url}: {response.status_code} {response.text[:200]}")
                    continue
                answers.append((url, response.json()))

    await asyncio.gather(writer(), *(read(url) for url in reader_urls for _ in range(readers_per_url)))

    mismatches = []
    for url, body in answers:
        version = body["version"]
        if version not in file_of_version:
            mismatches.append({"url": url, "version": version, "why": "no PUT returned this version"})
            continue
        want = expected[file_of_version[version]]
        worst = max(
            abs(got["scores"][label] - p)
            for got, scores in zip(body["predictions"], want, strict=True)
            for label, p in scores.items()
        )
        if worst > atol:
            mismatches.append({"url": url, "version": version, "why": f"scores off by {worst:.2e}"})
    return {
        "puts": puts + 1,
        "answers": len(answers),
        "versions_seen": len({b["version"] for _, b in answers}),
        "answers_by_replica": {url: sum(u == url for u, _ in answers) for url in reader_urls},
        "mismatches": mismatches,
        "failures": failures,
    }
