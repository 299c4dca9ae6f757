#!/usr/bin/env bash
# Runs tests/openai_sdk.py, which drives tierd with the official `openai` Python package.
#
# Needs a built server (cargo build --release) and the qwen model under models/. The script
# creates or reuses a virtualenv at <target dir>/openai-venv, starts `tierd serve` on a free
# port of 127.0.0.1 with qwen only, runs the Python tests, and stops the server. Its last
# output line is "N passed, M failed", and it exits non-zero when any test fails.
#
# Environment: CARGO_TARGET_DIR (default: target/ in the repository) locates the server binary
# and the virtualenv, and TIERD_BIN overrides the binary path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TIERD="${TIERD_BIN:-$TARGET_DIR/release/tierd}"
VENV="$TARGET_DIR/openai-venv"
MODEL_ID="qwen2.5-coder-0.5b-instruct"
MODEL_FILE="$ROOT/models/$MODEL_ID/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
HEALTH_TIMEOUT_S=60

fail() {
    echo "openai_sdk.sh: $*" >&2
    echo "0 passed, 1 failed"
    exit 1
}

[[ -x "$TIERD" ]] || fail "server binary $TIERD not found; run 'cargo build --release' first"
[[ -f "$MODEL_FILE" ]] || fail "model file $MODEL_FILE not found; run scripts/fetch-models.sh"

if ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
    echo "creating the virtualenv $VENV and installing openai" >&2
    python3 -m venv "$VENV" || fail "python3 -m venv $VENV failed"
    "$VENV/bin/pip" install --quiet openai || fail "pip install openai failed"
fi
PYTHON="$VENV/bin/python"

WORK_DIR="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK_DIR"
}
trap cleanup EXIT

cat >"$WORK_DIR/config.toml" <<EOF
[server]
queue_capacity = 4
default_max_tokens = 32

[[model]]
id = "$MODEL_ID"
path = "$MODEL_FILE"
EOF

# Binding port 0 picks a free port, which the server binds again a moment later.
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE_URL="http://127.0.0.1:$PORT"
LOG="$WORK_DIR/server.log"
NO_COLOR=1 "$TIERD" serve --config "$WORK_DIR/config.toml" --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER_PID=$!

# Wait until /health returns 200. The check exits 1 when the server dies or the timeout passes.
if ! "$PYTHON" - "$BASE_URL" "$SERVER_PID" "$HEALTH_TIMEOUT_S" <<'EOF'
import os, sys, time, urllib.error, urllib.request

base_url, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"tierd (pid {pid}) exited before /health returned 200")
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=5) as response:
            if response.status == 200:
                sys.exit(0)
    except (urllib.error.URLError, ConnectionError):
        pass
    time.sleep(0.1)
sys.exit(f"/health did not return 200 within {timeout:.0f} s")
EOF
then
    echo "--- server log ---" >&2
    cat "$LOG" >&2
    fail "the server did not become healthy"
fi

# The Python runner prints the server log itself on failure, so its summary stays last.
"$PYTHON" "$ROOT/tests/openai_sdk.py" --base-url "$BASE_URL/v1" --model "$MODEL_ID" --server-log "$LOG"
