#!/usr/bin/env bash
# Runs every test of tierd: fetches the real models, builds in release mode (the model tests
# need optimised kernels), runs the Rust tests, the fetch script's test and the official
# OpenAI Python SDK against a live server. Prints a final `N passed, M failed` line.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh

# The PostgreSQL audit store is tested against a throwaway server, which needs PostgreSQL's
# initdb and postgres programs.
if ! command -v initdb >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "installing PostgreSQL for the audit store tests"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "PostgreSQL (initdb, postgres) is missing; install it to run the audit store tests" >&2
        exit 1
    fi
fi

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
