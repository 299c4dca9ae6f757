#!/usr/bin/env bash
# Runs every test of tierd: fetches the real models, builds in release mode (the model tests
# need optimised kernels), runs the Rust tests, the fetch script's test and the official
# OpenAI Python SDK against a live server. Prints a final `N passed, M failed` line.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh
cargo build --release

passed=0
failed=0
run() {
    local name=$1
    shift
    echo "=== $name"
    if "$@"; then
        passed=$((passed + 1))
    else
        echo "=== $name FAILED"
        failed=$((failed + 1))
    fi
}

run "cargo tests" cargo test --release --no-fail-fast
run "fetch script" bash tests/fetch_models.sh
if [[ -f tests/openai_sdk.sh ]]; then
    run "openai SDK" bash tests/openai_sdk.sh
fi

echo "suites: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
