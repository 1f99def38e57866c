#!/usr/bin/env bash
# The quality benchmark on a GPU machine without network: writes $OUT/gpu.jsonl.
# Needs .carry/ from bench/eval/prepare_carry.sh (carry it). Resumes .carry/resume.jsonl if present.
# DEADLINE (seconds, default 360): no run starts that would end later.
# CONFIG (default bench/eval/gpu.json), JOBS (worker processes, default 1) and extra arguments
# ("$@", e.g. --only-tasks sst2,rte) go to `python -m bench.eval run`.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?OUT must name the folder for the results}"
DEADLINE=${DEADLINE:-360}
CARRY=${CARRY:-.carry}
CONFIG=${CONFIG:-bench/eval/gpu.json}
JOBS=${JOBS:-1}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# bitarray is the one missing dependency; xpeft is imported from this tree without installing it.
python3 -c "import bitarray" 2>/dev/null ||
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/xpeft-site \
    "$CARRY"/whl/bitarray-*.whl || exit 1
mkdir -p /tmp/xpeft-path/xpeft
for pkg in profiles adapters server; do ln -sfn "$PWD/$pkg" "/tmp/xpeft-path/xpeft/$pkg"; done
export PYTHONPATH="$PWD:/tmp/xpeft-path:/tmp/xpeft-site${PYTHONPATH:+:$PYTHONPATH}"
[ -f "$CARRY/resume.jsonl" ] && cp "$CARRY/resume.jsonl" "$OUT/gpu.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu-info.txt" 2>&1 || true
timeout --signal=TERM --kill-after=15 $((DEADLINE + 40)) \
  python3 -m bench.eval run --config "$CONFIG" --out "$OUT/gpu.jsonl" --jobs "$JOBS" \
    --model "$CARRY/minilm" --data-root "$CARRY/data" --work-dir /tmp/xpeft-eval-work \
    --deadline-seconds "$DEADLINE" --no-progress "$@"
rc=$?
echo "exit status $rc; $(grep -c '"type":"run"' "$OUT/gpu.jsonl" 2>/dev/null || echo 0) run rows in $OUT/gpu.jsonl"
exit $rc
