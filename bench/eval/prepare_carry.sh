#!/usr/bin/env bash
# Build .carry/ (git-ignored) with what bench/eval/gpu.sh needs on a machine with no network:
#   .carry/minilm   the default encoder with fp16-stored weights (44 MB: the original 87 MB folder
#                   would not fit a 64 MiB transfer limit; it computes in fp32 again when loaded)
#   .carry/data     copies of the sst2/, rte/ and clinc150/ folders (read there, never committed)
#   .carry/whl      the bitarray wheel for CPython 3.12 (the only dependency missing there)
#   .carry/resume.jsonl  (optional) an earlier results file, so the next call resumes it: RESUME=path
# Usage: bench/eval/prepare_carry.sh   (from anywhere; DATA=../shared/data by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
mkdir -p .carry/data .carry/whl
[ -f .carry/minilm/model.safetensors ] || python -m bench.eval pack-model --out .carry/minilm
for task in sst2 rte; do
  mkdir -p .carry/data/$task
  cp "$DATA/$task/train.tsv" "$DATA/$task/dev.tsv" .carry/data/$task/
done
rm -rf .carry/data/clinc150 && cp -r "$DATA/clinc150" .carry/data/clinc150
if ! ls .carry/whl/bitarray-*.whl >/dev/null 2>&1; then
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .carry/whl "bitarray>=2.8"
fi
if [ -n "${RESUME:-}" ]; then cp "$RESUME" .carry/resume.jsonl; fi
du -sh .carry
total=$(du -sb .carry | cut -f1)
[ "$total" -lt $((60 * 1024 * 1024)) ] || { echo "warning: .carry is over 60 MiB" >&2; exit 1; }
