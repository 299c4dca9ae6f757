#!/usr/bin/env bash
# Measure what escalation buys on the IMDB sentences of the UCI "Sentiment Labelled Sentences":
# the built-in sentiment task (MiniLM head trained on the Amazon and Yelp sentences, then
# qwen2.5-coder below 0.9) answers locally, and results below each confidence threshold go to a
# simulated frontier model (scripts/simulated-frontier.py) of stated accuracy. Prints one
# Markdown table of accuracy, share answered locally and cost per threshold (EVALUATION.md
# records its output).
#
# Usage: scripts/evaluate-escalation.sh [--limit N] [--accuracy P] [--seed S]
#   --accuracy  probability that the simulated model answers the gold label (default 0.96)
#   --seed      seed of the simulated answers (default 1)
# Prices of the simulated model are assumptions set below. Needs the models and data of
# scripts/fetch-models.sh and python3. Takes about 4 minutes on 2 cores, most of it for
# qwen2.5-coder; the JSON report is kept in target/eval/escalation.json.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LIMIT=()
ACCURACY=0.96
SEED=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --limit) LIMIT=(--limit "${2:?--limit needs a number}"); shift 2 ;;
        --accuracy) ACCURACY=${2:?--accuracy needs a probability}; shift 2 ;;
        --seed) SEED=${2:?--seed needs a value}; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

# Assumed prices of the simulated frontier model, in USD per million tokens.
INPUT_PRICE=3.00
OUTPUT_PRICE=15.00

DATA=models/datasets/uci-sentiment
OUT=target/eval
mkdir -p "$OUT"

cargo build --release --quiet
TIERD=${CARGO_TARGET_DIR:-target}/release/tierd

# Retrain the head so the figures do not depend on a head file left from an earlier run.
"$TIERD" train --task sentiment --data "$DATA/amazon.jsonl" --data "$DATA/yelp.jsonl"

WORK=$(mktemp -d)
SIMULATOR_PID=
cleanup() {
    if [[ -n $SIMULATOR_PID ]]; then
        kill "$SIMULATOR_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

mkfifo "$WORK/simulator.out"
python3 scripts/simulated-frontier.py --data "$DATA/imdb.jsonl" --accuracy "$ACCURACY" --seed "$SEED" \
    >"$WORK/simulator.out" &
SIMULATOR_PID=$!
read -r LISTENING <"$WORK/simulator.out" || true
if [[ $LISTENING != "listening on "* ]]; then
    echo "the simulated frontier did not start; its output: $LISTENING" >&2
    exit 1
fi
ADDRESS=${LISTENING#listening on }
echo "simulated frontier on $ADDRESS: accuracy $ACCURACY, seed $SEED" >&2

cat >"$WORK/config.toml" <<EOF
[[provider]]
name = "simulated"
kind = "openai"
base_url = "http://$ADDRESS/v1"
[[provider.model]]
id = "frontier"
tier = 1
input_per_mtok = $INPUT_PRICE
output_per_mtok = $OUTPUT_PRICE
EOF

"$TIERD" eval --config "$WORK/config.toml" --task sentiment --data "$DATA/imdb.jsonl" \
    --escalate-to simulated/frontier --json "${LIMIT[@]}" >"$OUT/escalation.json"

python3 - "$OUT/escalation.json" "$ACCURACY" "$SEED" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
accuracy, seed = sys.argv[2], sys.argv[3]
escalation = report["escalation"]
print(
    f"{report['examples']} examples; simulated frontier accuracy {accuracy}, seed {seed}; "
    f"prices {escalation['input_per_mtok']:.2f} / {escalation['output_per_mtok']:.2f} USD per million "
    f"input / output tokens; {escalation['prompt_tokens']} prompt and {escalation['completion_tokens']} "
    f"completion tokens over {escalation['sent']} requests; {escalation['kept_local_pii']} kept local "
    f"for personal data; {escalation['unparsable']} answers naming no label"
)
print()
print("| threshold | escalated | local share | accuracy | cost USD | saving against frontier only |")
print("|---|---|---|---|---|---|")
for row in escalation["by_threshold"]:
    saving = "-" if row["saving"] is None else f"{row['saving'] * 100:.1f} %"
    print(
        f"| {row['threshold']:.2f} | {row['escalated']} | {row['local_share']:.3f} | {row['accuracy']:.3f} "
        f"| {row['cost_usd']:.4f} | {saving} |"
    )
print(
    f"| frontier only | {escalation['sent']} | {1 - escalation['sent'] / report['examples']:.3f} "
    f"| {escalation['frontier_accuracy']:.3f} | {escalation['frontier_cost_usd']:.4f} | 0.0 % |"
)
PY
