#!/usr/bin/env bash
# Build .carry-gpu/ (git-ignored) with what bench/gpu_run.sh needs on a GPU machine with no network:
#   .carry-gpu/tokenizer  the MiniLM wheel's tokenizer (the BERT uncased vocabulary): the random
#                         BERT-base that gpu_check serves there tokenizes real text with it
#   .carry-gpu/commit     the commit the run measures (with "-dirty" when the code has uncommitted
#                         changes): the GPU machine gets the tree without its history
#   .carry-gpu/whl        CPython 3.12 x86-64 wheels of what `xpeft serve` imports and that GPU image
#                         lacks, at the versions installed here (pydantic and pydantic-core must match)
# Usage: bench/gpu_prepare.sh   (from anywhere, with the project's virtual environment active)
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file, not a folder
mkdir -p "$(dirname "$exclude")"
grep -qx '/.carry-gpu/' "$exclude" 2>/dev/null || echo '/.carry-gpu/' >> "$exclude"
mkdir -p .carry-gpu/whl .carry-gpu/tokenizer
commit=$(git rev-parse --short HEAD)
[ -z "$(git status --porcelain -- adapters profiles engine server cli bench)" ] || commit="$commit-dirty"
echo "$commit" > .carry-gpu/commit
python - <<'PY'
from transformers import AutoTokenizer

from xpeft.adapters.encoder import default_model_dir

AutoTokenizer.from_pretrained(str(default_model_dir())).save_pretrained(".carry-gpu/tokenizer")
PY
# distributions the server needs beyond what the GPU image holds (torch, transformers, numpy, httpx, ...)
NEEDED="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv uvicorn httptools
  annotated-types typing-inspection bitarray redis tenacity huey python-json-logger fastapi-offline
  prometheus-client click h11"
pins=$(python -m pip list --format=freeze 2>/dev/null | python -c '
import sys
wanted = {n.lower().replace("_", "-") for n in sys.argv[1].split()}
for line in sys.stdin:
    name, _, version = line.strip().partition("==")
    if name.lower().replace("_", "-") in wanted:
        print(f"{name}=={version}")
' "$NEEDED")
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry-gpu/whl $pins
ls .carry-gpu/whl
du -sh .carry-gpu
