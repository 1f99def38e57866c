#!/usr/bin/env bash
# Lint, format and type checks (what CI runs before the tests); non-zero if any of them fails.
#   scripts/lint.sh           install the dev extras first
#   scripts/lint.sh --no-install
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--no-install" ]; then
  scripts/install.sh dev || exit 1
fi
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
rc=0
echo "== ruff check ." && { python -m ruff check . || rc=1; }
echo "== ruff format --check ." && { python -m ruff format --check . || rc=1; }
echo "== mypy (scripts/typecheck.sh)" && { scripts/typecheck.sh || rc=1; }
exit "$rc"
