#!/usr/bin/env bash
# Fetches the models (a no-op when they are present), builds tierd and serves every model in
# models/models.toml on 127.0.0.1:8080. Extra arguments go to `tierd serve`, for example
# `scripts/serve.sh --port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh
cargo build --release
exec target/release/tierd serve "$@"
