"""The deployment files, checked without a Docker engine (none runs on these machines).

docker-compose.yml is validated by Debian's ``docker-compose config`` (schema and interpolation,
no engine needed; .ci/run installs it) and by structural checks. The Dockerfile must install with
scripts/install.sh (the README's step), build from files that exist, run as a non-root user and
check /healthz; its other commands are run here, so the recipe cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xpeft.cli.main import main
from xpeft.server.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
NGINX = ROOT / "docker" / "nginx.conf"


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    return None


def run_compose_config(path: Path) -> subprocess.CompletedProcess:
    command = compose_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("CI must validate docker-compose.yml: install Debian's docker-compose (see .ci/run)")
        pytest.skip("no docker-compose here (.ci/run installs Debian's package)")
    env = {**os.environ, "XPEFT_ADMIN_TOKEN": "validation-only-token"}
    return subprocess.run(
        [*command, "-f", str(path), "--project-directory", str(ROOT), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_compose_file_passes_docker_compose_config() -> None:
    result = run_compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr


def rendered_compose(tmp_path: Path) -> dict:
    """``docker-compose config`` output (interpolated, anchors merged), with secret files in ``tmp_path``."""
    command = compose_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("CI must validate docker-compose.yml: install Debian's docker-compose (see .ci/run)")
        pytest.skip("no docker-compose here (.ci/run installs Debian's package)")
    env = {**os.environ, "XPEFT_SECRETS_DIR": str(tmp_path)}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "--project-directory", str(ROOT), "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_rendered_compose_keeps_secrets_in_files_and_redis_off_the_public_network(tmp_path: Path) -> None:
    config = rendered_compose(tmp_path)
    services, networks = config["services"], config["networks"]
    redis, lb = services["redis"], services["lb"]
    # Redis: a password from a secret (written to a config file, never on a command line),
    # protected mode on, only on an internal network that nginx is not on.
    assert set(redis["networks"]) == {"backend"} and networks["backend"]["internal"] is True
    assert "backend" not in lb["networks"]
    entry = " ".join(redis["entrypoint"])
    assert "requirepass" in entry and "/run/secrets/redis_password" in entry and "--requirepass" not in entry
    assert "--protected-mode yes" in entry
    assert "/run/secrets/redis_password" in " ".join(redis["healthcheck"]["test"])
    assert {s["source"] for s in redis["secrets"]} == {"redis_password"}
    for name, svc in services.items():
        if "build" not in svc:
            continue
        env = svc["environment"]
        # every secret from a file; no token or password in the environment or the Redis URL
        assert {"XPEFT_ADMIN_TOKEN_FILE", "XPEFT_API_TOKEN_FILE", "XPEFT_REDIS_PASSWORD_FILE"} <= set(env), (
            name
        )
        assert not {"XPEFT_ADMIN_TOKEN", "XPEFT_API_TOKEN", "XPEFT_REDIS_PASSWORD"} & set(env), name
        assert "@" not in env["XPEFT_REDIS_URL"]
        mounted = {f"/run/secrets/{s['source']}" for s in svc["secrets"]}
        assert {v for k, v in env.items() if k.endswith("_FILE")} <= mounted
        assert set(svc["networks"]) == {"backend", "frontend"}
    for secret in config["secrets"].values():
        assert Path(secret["file"]).parent == tmp_path  # XPEFT_SECRETS_DIR moves them all


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restartt: unless-stopped"))
    result = run_compose_config(broken)
    assert result.returncode != 0 and "restartt" in (result.stderr + result.stdout)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _replicas(compose: dict) -> dict[str, dict]:
    """The serving replicas: built from the image, serving HTTP (the trainer runs `xpeft worker`)."""
    services = compose["services"].items()
    return {name: svc for name, svc in services if "build" in svc and "worker" not in svc.get("command", [])}


def test_compose_runs_redis_with_aof_on_a_volume_and_two_replicas_behind_the_lb() -> None:
    compose = _compose()
    redis = compose["services"]["redis"]
    command = " ".join(redis["entrypoint"])
    assert "--appendonly yes" in command and "exec docker-entrypoint.sh redis-server" in command
    volume, target = redis["volumes"][0].split(":")[:2]
    assert target == "/data" and volume in compose["volumes"]
    replicas = _replicas(compose)
    assert len(replicas) >= 2
    for svc in replicas.values():
        assert svc["environment"]["XPEFT_REDIS_URL"].startswith("redis://redis:")
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    lb = compose["services"]["lb"]
    assert any(v.startswith("./docker/") for v in lb["volumes"])
    assert set(replicas) <= set(lb["depends_on"])


def test_compose_settings_are_real_settings() -> None:
    """Every XPEFT_* variable the compose file sets is a field of Settings (a typo would be ignored)."""
    fields = {f"XPEFT_{name.upper()}" for name in Settings.model_fields}
    for name, svc in _replicas(_compose()).items():
        unknown = {k for k in svc["environment"] if k.startswith("XPEFT_")} - fields
        assert not unknown, f"{name} sets unknown settings {unknown}"
        # secrets are files that exist only in the container
        values = {
            k: v for k, v in svc["environment"].items() if "${" not in str(v) and not k.endswith("_FILE")
        }
        settings = Settings(**{k.removeprefix("XPEFT_").lower(): v for k, v in values.items()})
        assert settings.redis_url and settings.max_profile_bytes > 0


def test_nginx_balances_exactly_the_compose_replicas() -> None:
    conf = NGINX.read_text()
    assert conf.count("{") == conf.count("}")
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", conf, re.S)
    assert upstream is not None
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream.group(2), re.M)
    replicas = _replicas(_compose())
    assert {host for host, _ in servers} == set(replicas)
    assert {int(port) for _, port in servers} == {Settings().port}  # the image listens on XPEFT_PORT=8000
    assert f"proxy_pass http://{upstream.group(1)}" in conf
    body_limit = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert body_limit is not None
    for svc in replicas.values():  # nginx must let the server's own JSON 413 through
        assert int(body_limit.group(1)) * 2**20 > int(svc["environment"]["XPEFT_MAX_PROFILE_BYTES"])


def _stages() -> list[list[str]]:
    """Dockerfile instructions (continuations joined), split into stages."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multistage_non_root_with_a_healthcheck() -> None:
    stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    health = [line for line in final if line.upper().startswith("HEALTHCHECK ")]
    assert health and "docker/healthcheck.py" in health[0]
    assert "/healthz" in (ROOT / "docker" / "healthcheck.py").read_text()
    assert any(line.upper().startswith("CMD ") and '"serve"' in line for line in final)
    assert any("COPY --from=build" in line for line in final)
    assert "VARIANT" in DOCKERFILE.read_text() and "cuda)" in DOCKERFILE.read_text()


def test_dockerfile_installs_with_the_readme_install_script() -> None:
    runs = [line for stage in _stages() for line in stage if line.upper().startswith("RUN ")]
    assert any("scripts/install.sh" in line for line in runs)
    readme = (ROOT / "README.md").read_text()
    assert "scripts/install.sh" in readme
    assert "scripts/install.sh" in (ROOT / "scripts" / "test.sh").read_text()  # what CI runs, too
    for stage in _stages():
        for line in stage:
            if line.upper().startswith("COPY ") and "--from" not in line:
                for source in shlex.split(line)[1:-1]:
                    assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_dockerfile_bank_command_runs(tmp_path: Path, capsys) -> None:
    """The image's `xpeft bank create` line, run here with the current CLI."""
    runs = [line for stage in _stages() for line in stage if line.startswith("RUN xpeft ")]
    assert len(runs) == 1
    bank = str(tmp_path / "bank.safetensors")
    words = shlex.split(runs[0])[1:]  # drop RUN
    create = words[1 : words.index("&&")] if "&&" in words else words[1:]
    create[create.index("--out") + 1] = bank
    assert main(create) == 0
    assert "bank_id" in capsys.readouterr().out and Path(bank).stat().st_size > 0
    # the rest of the line (the chmod) makes the bank readable by the runtime user, not only root
    rest = runs[0].split("&&", 1)[1].replace("/opt/xpeft/bank.safetensors", bank)
    subprocess.run(["sh", "-c", rest], check=True)
    assert Path(bank).stat().st_mode & 0o004


def test_healthcheck_script(cluster) -> None:
    script = str(ROOT / "docker" / "healthcheck.py")
    env = {**os.environ, "XPEFT_PORT": str(cluster.a.port)}
    assert subprocess.run([sys.executable, script], env=env, timeout=30).returncode == 0
    env["XPEFT_HEALTHCHECK_URL"] = f"{cluster.a.url}/no-such-page"
    assert subprocess.run([sys.executable, script], env=env, capture_output=True, timeout=30).returncode == 1


def test_every_setting_is_documented() -> None:
    api = (ROOT / "docs" / "API.md").read_text()
    missing = [
        f"XPEFT_{name.upper()}" for name in Settings.model_fields if f"`XPEFT_{name.upper()}`" not in api
    ]
    assert not missing, f"docs/API.md does not document {missing}"


def test_cluster_compose_file_passes_config_and_points_every_xpeft_service_at_the_cluster(
    tmp_path: Path,
) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker-compose here (.ci/run installs Debian's package)")
    for secret in ("admin_token", "api_token", "redis_password"):
        (tmp_path / secret).write_text("x" * 24)
    files = ["-f", str(COMPOSE), "-f", str(ROOT / "docker-compose.cluster.yml")]
    result = subprocess.run(
        [*command, *files, "--project-directory", str(ROOT), "config"],
        capture_output=True,
        text=True,
        env={**os.environ, "XPEFT_SECRETS_DIR": str(tmp_path)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {f"redis-node-{i}" for i in range(6)} <= set(services)
    for name in ("xpeft-1", "xpeft-2", "trainer"):
        env = services[name]["environment"]
        assert env["XPEFT_REDIS_CLUSTER"] == "true" and env["XPEFT_JOBS_REDIS_URL"] == "redis://redis:6379/0"
        settings = Settings(**{k[6:].lower(): v for k, v in env.items() if not k.endswith("_FILE")})
        assert settings.redis_cluster and settings.jobs_url() == "redis://redis:6379/0"
    assert "--cluster-enabled yes" in " ".join(services["redis-node-0"]["entrypoint"])


def test_monitoring_profile_scrapes_every_replica_with_the_repository_files() -> None:
    """`docker compose --profile monitoring`: Prometheus scrapes exactly the serving replicas and
    loads deploy/prometheus/alerts.yml; Grafana gets the dashboard, its password from a secret,
    and a port on loopback only. Nothing of it starts without the profile."""
    compose = _compose()
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    mounts = {}
    for svc in (prometheus, grafana):
        for volume in svc["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
                mounts[target] = source
    assert mounts["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    scrape = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "xpeft"  # what the alert rules select
    (targets,) = [c["targets"] for c in job["static_configs"]]
    assert sorted(targets) == sorted(f"{name}:8000" for name in _replicas(compose))
    assert set(prometheus["networks"]) == {"frontend"}  # reaches the replicas, not Redis
    assert mounts["/var/lib/grafana/dashboards/xpeft.json"] == "./deploy/grafana/xpeft.json"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert all(str(port).startswith("127.0.0.1:") for port in grafana["ports"])
