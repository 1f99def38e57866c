"""The text boundary, bounded parsers, per-tenant memory and checks before queueing: the classes
of case of the second attack on the server, replayed against one ``xpeft serve`` on loopback.

Each case sends one request (or a few) and names the answer it expects; a case *held* when the
server gave exactly that, and afterwards nothing it stored answers 500 (``GET /profiles`` and
``GET /jobs`` are read after every class). The heads class also reads the server's resident memory
(``/proc/<pid>/status``) around a prediction with a maximal profile (``XPEFT_MAX_LABELS`` labels).
"""

from __future__ import annotations

import json
import socket
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from testsupport.processes import bearer
from xpeft.profiles.format_header import CRC, MAGIC, PREFIX, split

Case = tuple[str, Callable[[], bool]]  # (what it sends, whether the answer was the expected one)


def _relabel(data: bytes, labels: list[str]) -> bytes:
    version, raw, payload, _ = split(data)
    header = {**json.loads(raw), "labels": labels}
    encoded = json.dumps(header).encode()  # escaped: a lone surrogate survives
    body = PREFIX.pack(MAGIC, version, len(encoded)) + encoded + payload
    return body + CRC.pack(zlib.crc32(body))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_boundary(
    url: str,
    port: int,
    pid: int,
    admin: str,
    tenants: tuple[str, str],
    make_profile: Callable[[int, list[str]], bytes],
    redis_url: str,
    prefix: str,
    limits: dict[str, int],
) -> dict:
    """Every case of every class; ``limits``: the server's ``max_pending_jobs``, ``max_labels``,
    ``num_adapters`` and ``head_bound_bytes``."""
    auth, acme, beta = bearer(admin), bearer(tenants[0]), bearer(tenants[1])
    client = httpx.Client(base_url=url, timeout=60)

    def status(expected: int, method: str, path: str, **kw: object) -> Callable[[], bool]:
        return lambda: client.request(method, path, **kw).status_code == expected  # type: ignore[arg-type]

    def train(body: bytes, media: str = "application/json", params: dict | None = None) -> Callable[[], bool]:
        headers = {**acme, "Content-Type": media}
        return status(
            422, "POST", "/profiles/acme-b/train", content=body, headers=headers, params=params or {}
        )

    good = [{"text": f"text {i}", "label": "pos" if i % 2 else "neg"} for i in range(4)]
    valid = make_profile(70, ["neg", "pos"])
    classes: dict[str, list[Case]] = {
        "header text": [
            (
                f"labels {labels!r}",
                status(422, "PUT", f"/profiles/txt-{n}", content=_relabel(valid, labels), headers=auth),
            )
            for n, labels in enumerate(
                [["neg", "\ud800"], ["\udfff", "pos"], ["neg", "p\x00s"], ["neg", "p\x1bs"], ["neg", "\x85"]]
            )
        ],
        "training text": [
            (
                what,
                train(json.dumps({"examples": [{"text": text, "label": label}, *good]}).encode()),
            )
            for what, text, label in [
                ("surrogate label", "good", "\ud800"),
                ("surrogate text", "good \udfff", "pos"),
                ("control label", "good", "p\x07s"),
                ("empty text", " ", "pos"),
            ]
        ],
        "parsers": [
            ("JSON nested 100,000 deep", train(b"[" * 100_000 + b"]" * 100_000)),
            (
                ".jsonl line nested 50,000 deep",
                train(b"[" * 50_000 + b"]" * 50_000, "application/jsonl", {"text_col": "text"}),
            ),
            (".jsonl line not an object", train(b"[1, 2]\n", "application/jsonl", {"text_col": "text"})),
            ("TSV not UTF-8", train(b"sentence\tlabel\n\xff\xfe\tx\n", "text/tab-separated-values")),
            (
                "labels --1 and 2 (train, 202)",
                lambda: (
                    client.post(
                        "/profiles/acme-n/train",
                        content=b"sentence\tlabel\n"
                        + b"".join(b"t %d\t%s\n" % (i, b"--1" if i % 2 else b"2") for i in range(6)),
                        params={"eval_fraction": "0"},
                        headers={**acme, "Content-Type": "text/tab-separated-values"},
                    ).status_code
                    == 202
                ),
            ),
        ],
        "options before queueing": [
            (what, train(json.dumps({"examples": good, **option}).encode()))
            for what, option in [
                (f"k={limits['num_adapters'] + 1}", {"k": limits["num_adapters"] + 1}),
                ("seed=2**64", {"seed": 2**64}),
                ("seed=-1", {"seed": -1}),
                ("epochs=10**6", {"epochs": 10**6}),
            ]
        ],
    }
    # damaged records written into the store as an older version could have: left out, deletable
    store = redis.Redis.from_url(redis_url)
    tag = "{" + prefix + "}"
    assert client.put("/profiles/dmg-x", content=valid, headers=auth).is_success
    store.hset(f"{tag}:profile:dmg-x", "meta", json.dumps({"labels": ["\ud800"]}))
    job_id = "00000000000000000bb1"
    store.set(
        f"{tag}:job:{job_id}",
        json.dumps({"id": job_id, "profile_id": "acme-x", "state": "failed", "l": "\ud800"}),
    )
    store.zadd(f"{tag}:jobs", {job_id: 0})
    store.close()

    def listed(path: str, key: str, gone: str) -> Callable[[], bool]:
        def check() -> bool:
            answer = client.get(path, params={"limit": 1000}, headers=auth)
            return answer.status_code == 200 and gone not in [x["id"] for x in answer.json()[key]]

        return check

    classes["damaged records"] = [
        ("GET /profiles leaves it out", listed("/profiles", "profiles", "dmg-x")),
        ("GET /profiles/{id}: 409", status(409, "GET", "/profiles/dmg-x", headers=auth)),
        ("DELETE /profiles/{id}", status(200, "DELETE", "/profiles/dmg-x", headers=auth)),
        ("GET /jobs leaves it out", listed("/jobs", "jobs", job_id)),
        ("GET /jobs/{id}: 409", status(409, "GET", f"/jobs/{job_id}", headers=auth)),
        (
            "DELETE /jobs/{id}?purge=true",
            status(200, "DELETE", f"/jobs/{job_id}", params={"purge": "true"}, headers=auth),
        ),
    ]
    real = client.post("/profiles/beta-o/train", json={"examples": good}, headers=beta).json()["id"]
    classes["job-id oracle"] = [
        (f"{who} {method} {which}", status(403, method, f"/jobs/{job}", headers=headers))
        for who, headers in (("tenant A", acme), ("bogus token", bearer("a-bogus-token-of-some-length")))
        for method in ("GET", "DELETE")
        for which, job in (("B's real id", real), ("made-up id", "0" * 20))
    ]
    results: dict = {"classes": {}}
    for name, cases in classes.items():
        held = [what for what, check in cases if check()]
        results["classes"][name] = {
            "cases": len(cases),
            "held": len(held),
            "failed": [w for w, _ in cases if w not in held],
        }
    results["pending"] = _pending(client, auth, limits["max_pending_jobs"])
    results["disconnects"] = _disconnects(client, port, admin)
    results["heads"] = _heads(client, auth, pid, make_profile, limits)
    results["never_500"] = all(
        client.get(path, params={"limit": 1000}, headers=auth).status_code == 200
        for path in ("/profiles", "/jobs")
    )
    client.close()
    return results


def _purge_jobs(client: httpx.Client, auth: dict) -> None:
    for job in client.get("/jobs", params={"limit": 1000}, headers=auth).json()["jobs"]:
        client.delete(f"/jobs/{job['id']}", params={"purge": "true"}, headers=auth)


def _pending(client: httpx.Client, auth: dict, bound: int) -> dict:
    """``4 * bound`` concurrent submissions from 24 threads with no trainer running: exactly ``bound`` queued."""
    _purge_jobs(client, auth)
    body = {"examples": [{"text": f"text {i}", "label": "pos" if i % 2 else "neg"} for i in range(4)]}
    with ThreadPoolExecutor(24) as pool:
        statuses = list(
            pool.map(
                lambda n: client.post(f"/profiles/p-{n}/train", json=body, headers=auth).status_code,
                range(4 * bound),
            )
        )
    active = len(client.get("/jobs", params={"limit": 1000}, headers=auth).json()["jobs"])
    _purge_jobs(client, auth)
    return {
        "sent": len(statuses),
        "bound": bound,
        "accepted": statuses.count(202),
        "refused": statuses.count(503),
        "active": active,
    }


def _disconnects(client: httpx.Client, port: int, admin: str, n: int = 10) -> dict:
    """Clients that announce 100 bytes, send 10 and close: how the metrics counted them."""

    def count() -> dict[str, float]:
        out: dict[str, float] = {}
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("xpeft_http_requests_total{") and 'method="PUT"' in line:
                code = line.split('status="')[1].split('"')[0]
                out[code] = out.get(code, 0) + float(line.rsplit(" ", 1)[1])
        return out

    before = count()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"PUT /profiles/gone-1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                + f"Authorization: Bearer {admin}\r\n\r\n0123456789".encode()
            )
    time.sleep(1.0)
    after = count()
    return {
        "sent": n,
        "by_status": {k: int(v - before.get(k, 0)) for k, v in after.items() if v - before.get(k, 0)},
    }


def _heads(
    client: httpx.Client, auth: dict, pid: int, make_profile: Callable[[int, list[str]], bytes], limits: dict
) -> dict:
    texts = [f"a short review, number {i}" for i in range(64)]
    labels = [f"intent-{i}" for i in range(limits["max_labels"])]
    assert client.put("/profiles/heads-wide", content=make_profile(71, labels), headers=auth).is_success
    assert client.put(
        "/profiles/heads-small", content=make_profile(72, ["neg", "pos"]), headers=auth
    ).is_success

    def predict_s(profile_id: str, rounds: int = 5) -> float:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            assert (
                client.post(
                    f"/profiles/{profile_id}/predict", json={"inputs": texts}, headers=auth
                ).status_code
                == 200
            )
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    predict_s("heads-small", 2)
    small_before, rss_before = predict_s("heads-small"), _rss(pid)
    predict_s("heads-wide", 2)
    small_after, rss_after = predict_s("heads-small"), _rss(pid)
    refused = client.put(
        "/profiles/heads-wider", content=make_profile(73, [*labels, "one-more"]), headers=auth
    ).json()["error"]
    return {
        "labels": limits["max_labels"],
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "bound_mib": round(limits["head_bound_bytes"] / 2**20, 1),
        "small_predict_s_before": round(small_before, 3),
        "small_predict_s_after": round(small_after, 3),
        "one_more_label": refused,
    }


def boundary_section(r: dict) -> list[str]:
    """docs/RELIABILITY.md's section of this scenario."""
    total = sum(c["cases"] for c in r["classes"].values())
    held = sum(c["held"] for c in r["classes"].values())
    lines = [
        "## Text boundary, bounded parsers, checks before queueing",
        "",
        "Cases of the second attack, replayed against one replica on Redis with admin, API and two "
        "tenant tokens, no trainer running (bench/reliability/boundary.py). A case holds when the answer "
        "is the expected typed refusal (or, for labels `--1` and `2`, a queued job).",
        "",
        "| class | cases | held | failed |",
        "| --- | --- | --- | --- |",
    ]
    for name, c in r["classes"].items():
        lines.append(f"| {name} | {c['cases']} | {c['held']} | {', '.join(c['failed']) or '-'} |")
    p, d, h = r["pending"], r["disconnects"], r["heads"]
    by_status = ", ".join(f"{n} × {code}" for code, n in sorted(d["by_status"].items()))
    lines += [
        f"| **total** | {total} | {held} | {total - held} |",
        "",
        f"- `GET /profiles` and `GET /jobs` after every class: {'200 each time' if r['never_500'] else 'NOT always 200'}.",
        f"- Pending-jobs bound ({p['bound']}): {p['sent']} concurrent submissions from 24 threads, "
        f"{p['accepted']} accepted, {p['refused']} refused `too_many_jobs`; {p['active']} jobs active afterwards.",
        f"- {d['sent']} clients that announce 100 bytes, send 10 and close: counted {by_status} (no 500).",
        f"- A maximal profile ({h['labels']} labels, `XPEFT_MAX_LABELS`) predicted with 64 inputs: resident "
        f"memory {h['rss_before_mib']:.0f} MiB before, {h['rss_after_mib']:.0f} MiB after (the heads' bound: "
        f"{h['bound_mib']:.0f} MiB above the rest); a 2-label profile's 64-input prediction took "
        f"{h['small_predict_s_before']:.2f} s before and {h['small_predict_s_after']:.2f} s after. "
        f"One label more is refused on upload: `{h['one_more_label']}`.",
        "",
    ]
    return lines
