#!/usr/bin/env bash
# Install the dev extras, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh dev
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
python -m pytest "$@"
