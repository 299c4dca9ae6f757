#!/usr/bin/env bash
# Time all-minilm-l6-v2 sentence embeddings in tierd's /v1/classify against ONNX Runtime and
# sentence-transformers (PyTorch on the CPU), on the same weights, sentences and thread count.
# Each stack embeds one sentence per call, from one client and from several concurrent
# clients, in alternating rounds. The table gives sentences/s, p50 latency and ratios against
# tierd. The run stops before timing anything unless the three stacks produce the same
# embeddings (cosine > 0.999).
#
# Usage: scripts/bench-classify-vs-python.sh [--threads N] [--concurrency N] [--rounds N]
#            [--count N] [--window-us N] [--out DIR]
#
#   --threads      threads of tierd (RAYON_NUM_THREADS), PyTorch and ONNX Runtime (default: 2)
#   --concurrency  clients in the concurrent runs (default: 8)
#   --rounds       alternating rounds; the table gives medians (default: 3)
#   --count        sentences per measurement, from the UCI Amazon review sentences (default: 200)
#   --window-us    tierd's server.encoder_batch_window_us (default: tierd's default)
#   --out          folder for tierd's config and log (default: a new folder under /tmp)
#
# The Python packages go into a virtual environment under $TIERD_CACHE (default:
# $HOME/.cache/tierd), outside the repository, installed once with plain `pip install`. The
# torch wheel of the default package index for Linux x86_64 is built for CUDA and pulls the
# NVIDIA libraries with it (the environment takes about 6 GB), although the benchmark runs on
# the CPU only. The exported ONNX model is cached beside the environment.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

THREADS=2
CONCURRENCY=8
ROUNDS=3
COUNT=200
WINDOW_US=""
OUT=""
while (($#)); do
    case $1 in
        --threads) THREADS=$2; shift 2 ;;
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --count) COUNT=$2; shift 2 ;;
        --window-us) WINDOW_US=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "bench-classify-vs-python: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for value in "$THREADS" "$CONCURRENCY" "$ROUNDS" "$COUNT"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-classify-vs-python: $value is not a positive integer" >&2; exit 2; }
done
[[ -z $WINDOW_US || $WINDOW_US =~ ^[0-9]+$ ]] || { echo "bench-classify-vs-python: --window-us $WINDOW_US is not an integer" >&2; exit 2; }

log() {
    echo "bench-classify-vs-python: $*" >&2
}

CACHE_ROOT=${TIERD_CACHE:-$HOME/.cache/tierd}
VENV=$CACHE_ROOT/classify-bench-venv
if ! "$VENV/bin/python" -c 'import onnx, onnxruntime, sentence_transformers, torch' 2>/dev/null; then
    log "installing onnxruntime, sentence-transformers and torch into $VENV"
    python3 -m venv "$VENV"
    # onnxscript serves torch releases whose ONNX export needs it.
    "$VENV/bin/pip" install --quiet onnx onnxruntime onnxscript sentence-transformers torch >&2
fi
log "installed: $("$VENV/bin/python" -c 'import onnxruntime, sentence_transformers, torch; print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, sentence-transformers {sentence_transformers.__version__}")')"

scripts/fetch-models.sh >&2
cargo build --release >&2
TIERD=$REPO_ROOT/target/release/tierd
MODEL_FILE=$(find models/smollm2-135m-instruct/ -maxdepth 1 -name '*.gguf' | head -n 1)
[[ -n $MODEL_FILE ]] || { log "no GGUF file under models/smollm2-135m-instruct"; exit 1; }

[[ -n $OUT ]] || OUT=$(mktemp -d /tmp/bench-classify-vs-python.XXXXXX)
mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# tierd needs one model to serve; the smallest one loads in a second and takes no requests.
# The task is the built-in intent task: the packaged head over MiniLM.
{
    echo "builtin_tasks = false"
    echo
    echo "[server]"
    [[ -z $WINDOW_US ]] || echo "encoder_batch_window_us = $WINDOW_US"
    cat <<EOF

[[model]]
id = "smollm2-135m-instruct"
path = "$REPO_ROOT/$MODEL_FILE"

[[encoder]]
id = "all-minilm-l6-v2"
path = "$REPO_ROOT/models/all-minilm-l6-v2"

[[task]]
name = "intent"
max_input_tokens = 256
on_overflow = "truncate"
[[task.backend]]
kind = "embedding_head"
encoder = "all-minilm-l6-v2"
head = "$REPO_ROOT/models/heads/intent/head.safetensors"
EOF
} >"$OUT/tierd.toml"

TIERD_PID=""
stop_tierd() {
    if [[ -n $TIERD_PID ]]; then
        kill "$TIERD_PID" 2>/dev/null || true
        wait "$TIERD_PID" 2>/dev/null || true
    fi
}
trap stop_tierd EXIT

log "starting tierd on 127.0.0.1:$PORT"
RAYON_NUM_THREADS=$THREADS "$TIERD" serve --config "$OUT/tierd.toml" --host 127.0.0.1 --port "$PORT" \
    --audit-db "$OUT/tierd-audit.db" >"$OUT/tierd.log" 2>&1 &
TIERD_PID=$!

# /v1/tasks returns 503 until the models and tasks are loaded.
waited=0
until python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:$PORT/v1/tasks', timeout=2).status != 200)" 2>/dev/null; do
    sleep 1
    waited=$((waited + 1))
    if ((waited > 300)); then
        log "tierd did not load its tasks within 300 s; see $OUT/tierd.log"
        exit 1
    fi
done

log "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) logical CPUs"
# HF_HUB_OFFLINE keeps transformers from looking up the local model folder on the Hub.
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false \
    "$VENV/bin/python" scripts/bench_classify_vs_python.py \
    --url "http://127.0.0.1:$PORT" --model-dir models/all-minilm-l6-v2 \
    --head models/heads/intent/head.safetensors --golden tests/golden/minilm.json \
    --sentences models/datasets/uci-sentiment/amazon.jsonl --count "$COUNT" \
    --threads "$THREADS" --concurrency "$CONCURRENCY" --rounds "$ROUNDS" \
    --onnx "$CACHE_ROOT/classify-bench-onnx/all-minilm-l6-v2.onnx"
log "tierd's config and log are in $OUT"
