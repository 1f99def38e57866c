# syntax=docker/dockerfile:1
# The xpeft server image: multi-stage, runs as a non-root user, HEALTHCHECK on /healthz.
#
#   docker build -t xpeft .                                   CPU (the default)
#   docker build -t xpeft:cuda --build-arg VARIANT=cuda .      CUDA (run with --gpus all)
#
# The build runs scripts/install.sh, the README's install step, so image and README cannot drift
# (tests/server/deploy/test_server_deploy.py checks it). docs/DEPLOYMENT.md explains every setting.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment with xpeft, torch and the embedded MiniLM encoder ------------
FROM ${PYTHON_IMAGE} AS build
# cpu: the CPU-only torch wheel; cuda: the default PyPI build, which bundles its CUDA libraries.
ARG VARIANT=cpu
ARG TORCH_SPEC=torch==2.13.0
ARG CPU_WHEELS=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/xpeft/venv \
    PATH=/opt/xpeft/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1
RUN python -m venv /opt/xpeft/venv
WORKDIR /opt/xpeft/src
# constraints.txt: install.sh installs the exact versions CI tested (scripts/update_constraints.sh).
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY scripts/ scripts/
COPY adapters/ adapters/
COPY profiles/ profiles/
COPY engine/ engine/
COPY training/ training/
COPY server/ server/
COPY client/ client/
COPY cli/ cli/
COPY docker/ docker/
RUN case "$VARIANT" in \
      cpu) export PIP_EXTRA_INDEX_URL="$CPU_WHEELS" ;; \
      cuda) ;; \
      *) echo "VARIANT must be cpu or cuda" >&2; exit 1 ;; \
    esac \
 && TORCH_SPEC="$TORCH_SPEC" scripts/install.sh
# A seeded random bank for the embedded encoder, so the image serves out of the box; mount your
# own bank (readable by uid 10001) and set XPEFT_BANK to serve trained profiles. Every replica
# must load the same bank. safetensors writes owner-only files: the runtime user must read it.
RUN xpeft bank create --out /opt/xpeft/bank.safetensors --n 100 --seed 0 \
 && chmod 0644 /opt/xpeft/bank.safetensors

# -- runtime: the same environment, without build leftovers, as an unprivileged user ----------
# It listens on 0.0.0.0, so it refuses to start without XPEFT_ADMIN_TOKEN(_FILE) (protected mode).
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
RUN groupadd --system --gid 10001 xpeft \
 && useradd --system --uid 10001 --gid xpeft --home-dir /var/lib/xpeft --create-home xpeft
COPY --from=build /opt/xpeft /opt/xpeft
ENV VIRTUAL_ENV=/opt/xpeft/venv \
    PATH=/opt/xpeft/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/lib/xpeft/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    XPEFT_BANK=/opt/xpeft/bank.safetensors \
    XPEFT_HOST=0.0.0.0 \
    XPEFT_PORT=8000 \
    XPEFT_SQLITE_PATH=/var/lib/xpeft/profiles.sqlite3
LABEL org.opencontainers.image.title="xpeft" org.opencontainers.image.description="multi-profile X-PEFT inference server (${VARIANT})"
USER xpeft
WORKDIR /var/lib/xpeft
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "/opt/xpeft/src/docker/healthcheck.py"]
CMD ["xpeft", "serve"]
