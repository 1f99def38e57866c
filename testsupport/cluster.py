"""A real Redis Cluster on loopback: three masters (redis-server --cluster-enabled yes), optionally
a replica each, our own ports and folders, joined with ``redis-cli --cluster create``; stopped by pid."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free and valid too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 50_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


class LocalCluster:
    """Cluster-mode masters (and ``replicas`` per master); :meth:`owner` says which one holds a key."""

    def __init__(
        self, masters: int = 3, timeout: float = 30.0, replicas: int = 0, node_timeout_ms: int = 2000
    ) -> None:
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise FileNotFoundError(f"{tool} is not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="xpeft-cluster-"))
        self.ports = [cluster_port() for _ in range(masters * (1 + replicas))]
        self.procs: list[subprocess.Popen] = []
        try:
            for port in self.ports:
                folder = self.dir / str(port)
                folder.mkdir()
                self.procs.append(
                    subprocess.Popen(
                        [
                            "redis-server",
                            "--port",
                            str(port),
                            "--bind",
                            "127.0.0.1",
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            "nodes.conf",
                            "--cluster-node-timeout",
                            str(node_timeout_ms),
                            "--save",
                            "",
                            "--appendonly",
                            "no",
                            "--dir",
                            str(folder),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            deadline = time.monotonic() + timeout
            for port in self.ports:
                while not self._answers(port):
                    if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                        raise RuntimeError(f"cluster node {port} did not start")
                    time.sleep(0.05)
            created = subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.ports),
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed: {created.stdout[-2000:]}{created.stderr}"
                )
            while not self._settled(masters, replicas):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=0.5) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def _settled(self, masters: int, replicas: int) -> bool:
        """Every node says ok, and each master has its replicas attached and in sync."""
        if not all(self._state_ok(p) for p in self.ports):
            return False
        serving = self.masters()
        if len(serving) != masters:
            return False
        for port in serving:
            with redis.Redis(port=port) as client:
                info = client.info("replication")
            synced = [k for k, v in info.items() if k.startswith("slave") and v.get("state") == "online"]
            if len(synced) < replicas:
                return False
        return True

    @staticmethod
    def _state_ok(port: int) -> bool:
        with redis.Redis(port=port) as client:
            return client.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") >= 0

    def url(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}/0"

    def slot(self, key: str) -> int:
        with redis.Redis(port=self.ports[0]) as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def owner(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot."""
        slot = self.slot(key)
        with redis.Redis(port=self.ports[0]) as client:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def masters(self) -> list[int]:
        """The ports of the nodes that serve slots now (a promoted replica is one)."""
        for port in self.ports:
            try:
                with redis.Redis(port=port, socket_timeout=2) as client:
                    slots = client.execute_command("CLUSTER", "SLOTS")
                return sorted({int(master[1]) for _, _, master, *_ in slots})
            except (redis.RedisError, OSError):
                continue
        return []

    def delete_matching(self, pattern: str) -> None:
        """Delete every key matching ``pattern`` on every master (a test's namespace)."""
        for port in self.masters():
            with redis.Redis(port=port) as client:
                for key in client.scan_iter(match=pattern, count=1000):
                    client.delete(key)

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crashed host would go."""
        proc = self.procs[self.ports.index(port)]
        proc.kill()
        proc.wait(10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
