#!/usr/bin/env bash
# mypy over the installed packages: xpeft.adapters, xpeft.profiles, xpeft.engine, xpeft.server, xpeft.client, xpeft.cli.
# The folders are mapped to xpeft.* by pyproject.toml; mypy resolves modules from paths, so it
# checks a temporary tree xpeft/<package> -> <folder> of symbolic links (settings: pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
root=$(pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/xpeft"
for folder in adapters profiles engine server client cli; do ln -s "$root/$folder" "$tree/xpeft/$folder"; done
cd "$tree"
# Messages name the repository's paths (adapters/bank.py), not the links (xpeft/adapters/bank.py).
MYPYPATH="$tree" python -m mypy --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" \
  -p xpeft.adapters -p xpeft.profiles -p xpeft.engine -p xpeft.server -p xpeft.client -p xpeft.cli "$@" 2>&1 | sed -E 's#^xpeft/##'

