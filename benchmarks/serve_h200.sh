#!/usr/bin/env bash
# Serve load on the H200: danlu (this tree, and a tree to compare given as $1) next to
# `transformers serve --continuous-batching`, Llama-3-8B shape with random weights, bf16.
#
#   PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 bash benchmarks/serve_h200.sh [BEFORE_SRC]
#
# Run from the repository root on the GPU machine, the wheels already in /tmp/site. Writes
# $OUT/serve_load_h200_8b.json (after every level, so a cut-short run still leaves what it
# measured). Sized for one 600 s device call: the model is built and saved once (~1-2 min), each
# server starts in ~1 min, and the levels run 1, then 32 (the target's two numbers), then 8, each
# client sending one request of 64 tokens (2 at one client); the load run is cut at 450 s. Then,
# if 60 s or more are left before 530 s, this tree's engine alone (no HTTP) at 1, 8 and 32 rows
# ($OUT/engine_steps_h200_8b.json): how much of a level's time is the engine's.
set -euo pipefail

OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/tmp/m8b}
TOKENIZER=${TOKENIZER:-.whl/smollm2-tokenizer}
BEFORE=${1:-}
PYTHON=${PYTHON:-python3}

if [[ ! -f "$TOKENIZER/tokenizer_config.json" ]]; then
    echo "serve_h200.sh: no tokenizer at $TOKENIZER: carry .whl/ (make gpu-bundle) or set TOKENIZER=DIR" >&2
    exit 2
fi
if [[ -n "$BEFORE" && ! -d "$BEFORE/danlu" ]]; then
    echo "serve_h200.sh: $BEFORE is not a source tree (no danlu/ in it): give the src folder of the tree to compare" >&2
    exit 2
fi
mkdir -p "$OUT"

args=(--tree after=src)
note="H200, Llama-3-8B shape with random weights (bf16), SmolLM2 tokenizer; after = this tree"
if [[ -n "$BEFORE" ]]; then
    args+=(--tree "before=$BEFORE")
    note+=", before = $BEFORE"
fi
if [[ -f "$MODEL/config.json" ]]; then
    echo "reusing the model in $MODEL"
else
    args+=(--build llama3-8b --tokenizer "$TOKENIZER")
fi
note+="; transformers = transformers serve --continuous-batching; levels 1, 32, 8 in that order; $(git describe --always --dirty 2>/dev/null || echo unknown)"

started=$(date +%s)
# SIGTERM at 450 s: serve_load stops its servers; the JSON holds every level finished by then
timeout -s TERM 450 "$PYTHON" benchmarks/serve_load.py "${args[@]}" --model "$MODEL" --peer transformers \
    --precision bf16 --concurrency 1,32,8 --max-tokens 64 --min-requests 2 --timeout 240 \
    --out "$OUT/serve_load_h200_8b.json" --note "$note" || echo "serve_load ended with status $?"
left=$((530 - ($(date +%s) - started)))
if ((left >= 60)); then
    timeout -s TERM "$left" "$PYTHON" benchmarks/serve_load.py --engine-steps --tree after=src --model "$MODEL" \
        --precision bf16 --concurrency 1,8,32 --max-tokens 64 --out "$OUT/engine_steps_h200_8b.json" \
        --note "H200, Llama-3-8B shape, random weights, bf16; this tree's Engine API, no HTTP" ||
        echo "engine steps ended with status $?"
fi
echo "took $(($(date +%s) - started)) s; results in $OUT"
