"""wrk against a server (the one-thread, many-connection load of single-text predicts) and the
warm profiles it sends to; the Lua script beside this module sends each line of a file in turn."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx

from bench.common.server import ServerProcess
from xpeft.profiles import format as xpm
from xpeft.profiles.synthetic import random_profile

LUA = Path(__file__).with_name("requests.lua")


def wrk_result(output: str, seconds: float) -> dict:
    """wrk's totals and latency percentiles (``--latency``)."""

    def ms(value: str, unit: str) -> float:
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    requests = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    latency = {
        f"p{q}_ms": ms(v, u)
        for q, v, u in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    }
    count = int(requests.group(1)) if requests else 0
    wall = ms(requests.group(2), requests.group(3)) / 1e3 if requests else seconds
    return {
        "requests": count,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "wall_s": wall,
        "requests_per_s": count / wall if wall else 0.0,
        "latency": latency,
    }


def run_wrk(url: str, lines: Path, clients: int, seconds: float) -> dict:
    command = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "60s"]
    command += ["-s", str(LUA), url, "--", str(lines)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    return wrk_result(out.stdout + out.stderr, seconds)


def store_profiles(server: ServerProcess, bank, count: int, seed: int, kind: str = "hard") -> list[str]:
    ids = [f"s{i:04d}" for i in range(count)]
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
        for i, pid in enumerate(ids):
            data = xpm.encode(random_profile(bank, kind, seed=seed + i))
            response = client.put(
                f"/profiles/{pid}", content=data, headers={"content-type": "application/octet-stream"}
            )
            response.raise_for_status()
        for pid in ids:  # warm: decoded on the host, fused into a slot
            client.post(f"/profiles/{pid}/predict", json={"inputs": ["warm up"]}).raise_for_status()
    return ids
