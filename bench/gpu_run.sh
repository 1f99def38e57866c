#!/usr/bin/env bash
# bench/gpu_check.py on a GPU machine without network: writes $OUT/gpu_check.json, $OUT/bench_cuda.json
# and $OUT/gpu-info.txt. Needs .carry-gpu/ from bench/gpu_prepare.sh (carry it). BUDGET: seconds for
# gpu_check (default 400); the whole script ends within BUDGET + 60 s (8 minutes by default).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder for the results}"
CARRY=${CARRY:-.carry-gpu}
BUDGET=${BUDGET:-400}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the results name the commit gpu_prepare.sh saw (no git history travels with the tree)
BENCH_GIT_COMMIT=$(cat "$CARRY/commit" 2>/dev/null || echo unknown)
export BENCH_GIT_COMMIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/xpeft-site \
  "$CARRY"/whl/*.whl || exit 1
# xpeft is imported from this tree without installing it: xpeft.<pkg> -> ./<pkg>
mkdir -p /tmp/xpeft-path/xpeft
for pkg in adapters profiles engine server client cli; do
  [ -d "$pkg" ] && ln -sfn "$PWD/$pkg" "/tmp/xpeft-path/xpeft/$pkg"
done
export PYTHONPATH="$PWD:/tmp/xpeft-path:/tmp/xpeft-site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu-info.txt" 2>&1 || true
timeout --signal=TERM --kill-after=15 $((BUDGET + 45)) \
  python3 bench/gpu_check.py --budget "$BUDGET" --tokenizer "$CARRY/tokenizer" --out "$OUT"
