#!/usr/bin/env bash
# Evaluate every local sentiment configuration on the IMDB sentences of the UCI "Sentiment
# Labelled Sentences" data, with the head trained on the Amazon and Yelp sentences, and print
# one Markdown table of the results (EVALUATION.md records its output).
#
# Configurations: the MiniLM head alone, qwen2.5-coder label scoring alone, the built-in chain
# (head, then qwen2.5-coder for inputs where the head's confidence is below 0.9), and label
# scoring with gemma3-270m (plain few-shot prompt) and smollm2-135m (chat prompt).
#
# Usage: scripts/evaluate-sentiment.sh [--limit N]
# Needs the models and data of scripts/fetch-models.sh. Takes about 20 minutes on 2 cores;
# the JSON reports are kept in target/eval/.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LIMIT=()
if [[ ${1:-} == --limit ]]; then
    LIMIT=(--limit "${2:?--limit needs a number}")
fi

DATA=models/datasets/uci-sentiment
CONFIG=scripts/eval/sentiment.toml
OUT=target/eval
mkdir -p "$OUT"

cargo build --release --quiet
TIERD=target/release/tierd

# Retrain the head so the figures do not depend on a head file left from an earlier run.
"$TIERD" train --config "$CONFIG" --task sentiment --data "$DATA/amazon.jsonl" --data "$DATA/yelp.jsonl"

run() {
    local name=$1
    shift
    echo "== $name" >&2
    "$TIERD" eval --config "$CONFIG" --data "$DATA/imdb.jsonl" --json "${LIMIT[@]}" "$@" >"$OUT/$name.json"
}

run head --task sentiment --backend 0
run qwen --task sentiment --backend 1
run chain --task sentiment
run gemma --task sentiment_gemma
run smollm --task sentiment_smollm

python3 - "$OUT" <<'PY'
import json
import sys

out = sys.argv[1]
rows = [
    ("head", "MiniLM head (trained on Amazon+Yelp)"),
    ("qwen", "qwen2.5-coder-0.5b label scoring, chat, 2-shot"),
    ("chain", "head, then qwen2.5-coder below 0.9"),
    ("gemma", "gemma3-270m label scoring, plain, 2-shot"),
    ("smollm", "smollm2-135m label scoring, chat, 2-shot"),
]
print("| configuration | accuracy | macro-F1 | ECE | accuracy of the 70 % most confident (threshold) | inputs/s |")
print("|---|---|---|---|---|---|")
for name, title in rows:
    report = json.load(open(f"{out}/{name}.json"))
    top70 = next(r for r in report["by_coverage"] if abs(r["coverage"] - 0.7) < 0.01)
    low, high = top70["interval"]
    print(
        f"| {title} | {report['accuracy']:.3f} | {report['macro_f1']:.3f} "
        f"| {report['expected_calibration_error']:.3f} "
        f"| {top70['accuracy']:.3f} ({low:.3f} to {high:.3f}; >= {top70['threshold']:.3f}) "
        f"| {report['inputs_per_second']:.1f} |"
    )
PY
