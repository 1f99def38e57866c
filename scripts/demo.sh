#!/usr/bin/env bash
# Install, then run the main job on the embedded MiniLM: random bank, hard profile, predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
xpeft demo "$@"
