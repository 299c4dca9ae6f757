#!/usr/bin/env bash
# Serve one GGUF model with tierd and with llama.cpp's llama-server on 127.0.0.1, with the same
# thread count, and load both with `tierd bench serve --compare`: the same synthetic chat
# requests at each rate, in alternating rounds, with ratios against the first endpoint (tierd).
#
# Usage: scripts/bench-serve-vs-llamacpp.sh [--model ID] [--threads N] [--parallel N]
#            [--rate LIST] [--requests N] [--duration D] [--prompt-tokens N]
#            [--max-tokens N] [--out DIR] [-- EXTRA ARGUMENTS OF tierd bench serve]
#
#   --model          model id of models/models.toml (default: gemma3-270m)
#   --threads        threads of each server (default: 2)
#   --parallel       llama-server slots, -np (default: 1, one request at a time as tierd)
#   --rate           comma-separated request rates, requests per second (default: 0.2,0.4,0.8)
#   --requests       requests per server and rate (default: 16)
#   --duration       longest sending time per server and rate (default: 120s)
#   --prompt-tokens  prompt length, counted by tierd's tokenizer of the model (default: 64)
#   --max-tokens     max_tokens of each request (default: 32)
#   --out            folder for report.json, report.txt, latency.png and both server logs
#                    (default: a new folder under /tmp)
#
# llama-server comes from `scripts/llamacpp-reference.sh --build-server`, which builds it once
# from the llama.cpp tree vendored in the llama-cpp-python sdist and caches it under
# $TIERD_CACHE (default: $HOME/.cache/tierd), outside the repository. It runs with --no-repack,
# as llama-bench does in scripts/bench-vs-llamacpp.sh, because this build's AMX repacking
# crashes on some CPUs.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

MODEL=gemma3-270m
THREADS=2
PARALLEL=1
RATES=0.2,0.4,0.8
REQUESTS=16
DURATION=120s
PROMPT_TOKENS=64
MAX_TOKENS=32
OUT=""
EXTRA=()
while (($#)); do
    case $1 in
        --model) MODEL=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --parallel) PARALLEL=$2; shift 2 ;;
        --rate) RATES=$2; shift 2 ;;
        --requests) REQUESTS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --prompt-tokens) PROMPT_TOKENS=$2; shift 2 ;;
        --max-tokens) MAX_TOKENS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "bench-serve-vs-llamacpp: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for value in "$THREADS" "$PARALLEL" "$REQUESTS" "$PROMPT_TOKENS" "$MAX_TOKENS"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-serve-vs-llamacpp: $value is not a positive integer" >&2; exit 2; }
done

log() {
    echo "bench-serve-vs-llamacpp: $*" >&2
}

scripts/fetch-models.sh >&2
scripts/llamacpp-reference.sh --build-server >&2
CACHE_ROOT=${TIERD_CACHE:-$HOME/.cache/tierd}
LLAMA_SERVER=$(find "$CACHE_ROOT" -path '*/build/bin/llama-server' -type f | head -n 1)
[[ -x $LLAMA_SERVER ]] || { log "llama-server not found under $CACHE_ROOT after the build"; exit 1; }
COMMIT=$(cat "$CACHE_ROOT"/llama.cpp-*/llama.cpp-commit.txt 2>/dev/null | head -n 1 || true)
cargo build --release >&2
TIERD=$REPO_ROOT/target/release/tierd

MODEL_FILE=$(find "models/$MODEL/" -maxdepth 1 -name '*.gguf' | head -n 1)
[[ -n $MODEL_FILE ]] || { log "no GGUF file under models/$MODEL; is $MODEL a model id of models/models.toml?"; exit 1; }

[[ -n $OUT ]] || OUT=$(mktemp -d /tmp/bench-serve-vs-llamacpp.XXXXXX)
mkdir -p "$OUT"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
TIERD_PORT=$(free_port)
LLAMA_PORT=$(free_port)

PIDS=()
stop_servers() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_servers EXIT

# A queue long enough for every request of the fastest rate, so that tierd queues requests as
# llama-server does instead of rejecting them with 429.
cat >"$OUT/tierd.toml" <<EOF
builtin_tasks = false

[server]
queue_capacity = 256

[[model]]
id = "$MODEL"
path = "$REPO_ROOT/$MODEL_FILE"
EOF

log "starting tierd on 127.0.0.1:$TIERD_PORT"
RAYON_NUM_THREADS=$THREADS "$TIERD" serve --config "$OUT/tierd.toml" --host 127.0.0.1 --port "$TIERD_PORT" \
    --audit-db "$OUT/tierd-audit.db" >"$OUT/tierd.log" 2>&1 &
PIDS+=($!)

# Both servers must render a chat into the same tokens. llama-server runs the GGUF's own template
# through its Jinja engine, as tierd does. For a file without one (the gemma3 base model), it
# gets the template tierd falls back to: its own fallback is ChatML, which made each gemma3
# prompt 15 tokens longer than tierd's.
TEMPLATE_ARGS=(--jinja)
if ! grep -aq -m 1 tokenizer.chat_template < <(head -c 16M "$MODEL_FILE"); then
    TEMPLATE_ARGS+=(--chat-template-file "$REPO_ROOT/src/engine/templates/gemma3.jinja")
fi

log "starting llama-server on 127.0.0.1:$LLAMA_PORT"
"$LLAMA_SERVER" -m "$MODEL_FILE" -t "$THREADS" -tb "$THREADS" -np "$PARALLEL" -c $((4096 * PARALLEL)) \
    "${TEMPLATE_ARGS[@]}" --no-repack --no-webui --host 127.0.0.1 --port "$LLAMA_PORT" \
    >"$OUT/llama-server.log" 2>&1 &
PIDS+=($!)

wait_healthy() {
    local name=$1 port=$2 waited=0
    until python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2).status != 200)" 2>/dev/null; do
        sleep 1
        waited=$((waited + 1))
        if ((waited > 300)); then
            log "$name did not become healthy within 300 s; see $OUT"
            exit 1
        fi
    done
}
wait_healthy tierd "$TIERD_PORT"
wait_healthy llama-server "$LLAMA_PORT"

# Prints the prompt tokens that the server on port $1 counts for one chat with a system message.
prompt_tokens() {
    python3 - "$1" "$MODEL" <<'PY'
import json, sys, urllib.request
port, model = sys.argv[1], sys.argv[2]
messages = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Which river flows through Vienna?"},
]
body = json.dumps({"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}).encode()
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/v1/chat/completions", body, {"content-type": "application/json"}
)
with urllib.request.urlopen(request, timeout=120) as response:
    print(json.load(response)["usage"]["prompt_tokens"])
PY
}
TIERD_PROMPT=$(prompt_tokens "$TIERD_PORT")
LLAMA_PROMPT=$(prompt_tokens "$LLAMA_PORT")
if [[ $TIERD_PROMPT != "$LLAMA_PROMPT" ]]; then
    log "the servers render the same chat differently: $TIERD_PROMPT prompt tokens in tierd," \
        "$LLAMA_PROMPT in llama-server; the comparison would not be fair (see $OUT/llama-server.log)"
    exit 1
fi
log "both servers count $TIERD_PROMPT prompt tokens for the same chat"

log "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) logical CPUs; llama.cpp commit ${COMMIT:-unknown}"
"$TIERD" bench serve --compare "http://127.0.0.1:$TIERD_PORT" "http://127.0.0.1:$LLAMA_PORT" \
    --model "$MODEL" --tokenizer "$MODEL" --rate "$RATES" --requests "$REQUESTS" --duration "$DURATION" \
    --prompt-tokens "$PROMPT_TOKENS" --max-tokens "$MAX_TOKENS" \
    --output "$OUT/report.json" --chart "$OUT/latency.png" "${EXTRA[@]}" | tee "$OUT/report.txt"
log "results in $OUT"
