#!/usr/bin/env bash
# Compare tierd's engine with llama.cpp's llama-bench on the same GGUF files, prompt length,
# decode length and thread count, and print prefill and decode tokens/s for each, their
# ratio, and decode as a share of the memory bandwidth limit.
#
# Usage: scripts/bench-vs-llamacpp.sh [--models "ID ..."] [--prompt N] [--decode N]
#                                     [--threads N] [--rounds N] [--out FILE]
#
#   --models   model ids of models/models.toml (default: the three default models)
#   --prompt   prompt tokens of the prefill test (default: 512)
#   --decode   tokens of the decode test (default: 128)
#   --threads  threads for both engines (default: 2)
#   --rounds   alternating rounds; each runs llama-bench once and tierd once per model,
#              llama-bench first in odd rounds and tierd first in even ones (default: 3)
#   --out      also write the raw results of every run as JSON to FILE
#
# llama-bench comes from scripts/llamacpp-reference.sh, which builds it once from the
# llama.cpp tree vendored in the llama-cpp-python sdist and caches the build under
# $TIERD_CACHE (default: $HOME/.cache/tierd), outside the repository.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

MODELS="qwen2.5-coder-0.5b-instruct gemma3-270m smollm2-135m-instruct"
PROMPT=512
DECODE=128
THREADS=2
ROUNDS=3
OUT=""
while (($#)); do
    case $1 in
        --models) MODELS=$2; shift 2 ;;
        --prompt) PROMPT=$2; shift 2 ;;
        --decode) DECODE=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "bench-vs-llamacpp: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for value in "$PROMPT" "$DECODE" "$THREADS" "$ROUNDS"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "bench-vs-llamacpp: $value is not a positive integer" >&2; exit 2; }
done

log() {
    echo "bench-vs-llamacpp: $*" >&2
}

scripts/fetch-models.sh >&2
scripts/llamacpp-reference.sh --build-only >&2
CACHE_ROOT=${TIERD_CACHE:-$HOME/.cache/tierd}
LLAMA_BENCH=$(find "$CACHE_ROOT" -path '*/build/bin/llama-bench' -type f | head -n 1)
[[ -x $LLAMA_BENCH ]] || { log "llama-bench not found under $CACHE_ROOT after the build"; exit 1; }
COMMIT=$(cat "$CACHE_ROOT"/llama.cpp-*/llama.cpp-commit.txt 2>/dev/null | head -n 1 || true)
cargo build --release >&2
TIERD=target/release/tierd

RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT

model_file() {
    python3 - "$1" <<'EOF'
import sys
import tomllib

with open("models/models.toml", "rb") as f:
    manifest = tomllib.load(f)
for entry in manifest.get("model", []):
    if entry["id"] == sys.argv[1]:
        print(f"models/{entry['id']}/{entry['file']}")
        break
else:
    sys.exit(f"model {sys.argv[1]!r} is not in models/models.toml")
EOF
}

run_llama() {
    local id=$1 file=$2 round=$3
    log "round $round: llama-bench $id"
    # --repack 0: llama.cpp's AMX repacking crashes on some CPUs with this build; the
    # comparison uses the same kernels llama.cpp picks without it.
    "$LLAMA_BENCH" -m "$file" -p "$PROMPT" -n "$DECODE" -t "$THREADS" -r 1 --repack 0 -o json \
        >"$RUNS/llama-$id-$round.json"
}

run_tierd() {
    local id=$1 round=$2
    log "round $round: tierd $id"
    "$TIERD" bench model --model "$id" --prompt-tokens "$PROMPT" --decode-tokens "$DECODE" \
        --threads "$THREADS" --repetitions 1 --format json >"$RUNS/tierd-$id-$round.json" 2>"$RUNS/tierd-$id-$round.log"
}

for round in $(seq 1 "$ROUNDS"); do
    for id in $MODELS; do
        file=$(model_file "$id")
        if ((round % 2)); then
            run_llama "$id" "$file" "$round"
            run_tierd "$id" "$round"
        else
            run_tierd "$id" "$round"
            run_llama "$id" "$file" "$round"
        fi
    done
done

python3 - "$RUNS" "$PROMPT" "$DECODE" "$THREADS" "$ROUNDS" "$COMMIT" "$OUT" $MODELS <<'EOF'
import glob
import json
import statistics
import sys

runs_dir, prompt, decode, threads, rounds, commit, out, *models = sys.argv[1:]
prompt, decode = int(prompt), int(decode)


def spread(values):
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd


raw = {}
machine = None
rows = []
for model in models:
    llama = {"pp": [], "tg": []}
    for path in sorted(glob.glob(f"{runs_dir}/llama-{model}-*.json")):
        for entry in json.load(open(path)):
            kind = "pp" if entry["n_gen"] == 0 else "tg"
            llama[kind].append(entry["avg_ts"])
    tierd = {"pp": [], "tg": []}
    bandwidths, file_bytes = [], None
    for path in sorted(glob.glob(f"{runs_dir}/tierd-{model}-*.json")):
        report = json.load(open(path))
        machine = report["machine"]
        bandwidths.append(report["read_bandwidth"])
        bench = report["models"][0]
        file_bytes = bench["file_bytes"]
        for test in bench["tests"]:
            tierd["pp" if test["test"].startswith("pp") else "tg"].append(test["tokens_per_second"])
    raw[model] = {"llama.cpp": llama, "tierd": tierd, "read_bandwidth": bandwidths}
    limit = max(bandwidths) / file_bytes
    row = {"model": model, "limit": limit}
    for kind in ("pp", "tg"):
        row[f"tierd_{kind}"] = spread(tierd[kind])
        row[f"llama_{kind}"] = spread(llama[kind])
        row[f"ratio_{kind}"] = row[f"tierd_{kind}"][0] / row[f"llama_{kind}"][0]
    rows.append(row)

print(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs; "
      f"tierd SIMD compiled in: {' '.join(machine['compiled_simd'])}")
print(f"llama.cpp commit {commit or 'unknown'}; {threads} threads; {rounds} alternating rounds; "
      f"read bandwidth {max(max(raw[m]['read_bandwidth']) for m in models) / 1e9:.1f} GB/s (best of tierd's runs)")
print()
print(f"| model | tierd pp{prompt} tok/s | llama.cpp pp{prompt} tok/s | ratio | "
      f"tierd tg{decode} tok/s | llama.cpp tg{decode} tok/s | ratio | decode limit tok/s | tierd / llama.cpp share of limit |")
print("|---|---|---|---|---|---|---|---|---|")
for row in rows:
    fmt = lambda pair: f"{pair[0]:.1f} ± {pair[1]:.1f}"
    print(f"| {row['model']} | {fmt(row['tierd_pp'])} | {fmt(row['llama_pp'])} | {row['ratio_pp']:.2f} | "
          f"{fmt(row['tierd_tg'])} | {fmt(row['llama_tg'])} | {row['ratio_tg']:.2f} | {row['limit']:.0f} | "
          f"{100 * row['tierd_tg'][0] / row['limit']:.0f} % / {100 * row['llama_tg'][0] / row['limit']:.0f} % |")
print()
print("decode limit: read bandwidth / model file size, since each decoded token reads every weight once")
if out:
    with open(out, "w") as f:
        json.dump({"machine": machine, "commit": commit, "threads": int(threads), "runs": raw}, f, indent=2)
EOF
