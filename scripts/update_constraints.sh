#!/usr/bin/env bash
# Regenerate constraints.txt: the exact versions of everything in the dev environment, which CI
# tests. scripts/install.sh and the Docker image install with `-c constraints.txt`, so a user's
# install gets these versions rather than whatever is newest that day.
#   scripts/install.sh dev && scripts/update_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
# Triton is not in the dev environment (.ci/run installs it apart, for the kernel tests under its
# interpreter): its pin is kept as it is, the version torch's CUDA build requires.
triton_pin=$(grep -i '^triton==' constraints.txt || true)
{
  echo "# The versions CI tests: pip install -c constraints.txt ... (regenerate: scripts/update_constraints.sh)."
  echo "# torch is pinned without a build tag, so the same file serves the CPU wheel and a CUDA build."
  python -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v -i -E '^(xpeft|pip|setuptools|wheel)==' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
    | grep -v -i '^triton==' \
    | { cat; [ -z "$triton_pin" ] || echo "$triton_pin"; } \
    | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins"
