#!/usr/bin/env bash
# Install, then run the main job: `xpeft serve` on the embedded store, three profiles trained from the
# bundled examples and uploaded over HTTP, one burst of mixed requests answered in shared batches,
# then serving on localhost until Ctrl-C (`--once` stops after the burst).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
xpeft demo "$@"
