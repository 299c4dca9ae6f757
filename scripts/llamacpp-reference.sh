#!/usr/bin/env bash
# Build llama.cpp from the llama-cpp-python sdist and write the golden reference
# files under tests/golden/ that tierd's model tests compare against.
#
# Usage: scripts/llamacpp-reference.sh [--build-only | --build-server]
#
#   --build-only   fetch and build llama.cpp (libllama, llama-bench) and the
#                  dumper, then stop without touching tests/golden/
#   --build-server as --build-only, and also build llama-server (without its
#                  web UI) for `tierd bench serve --compare`
#
# Environment:
#   TIERD_CACHE               cache root (default: $HOME/.cache/tierd); the sdist,
#                             the llama.cpp build and the dumper go to
#                             $TIERD_CACHE/llama.cpp-<version>/
#   TIERD_BUILD_JOBS          parallel compile jobs (default: 2)
#   TIERD_MODEL_WAIT_SECONDS  how long to wait for a model file that is still
#                             being downloaded (default: 3600)
#
# Every step is skipped when its output is already present, so a second run only
# re-runs the dumper.
set -euo pipefail

PACKAGE_NAME=llama-cpp-python
PACKAGE_VERSION=0.3.36
THREADS=2
N_PREDICT=32
TOP_K=5

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${TIERD_CACHE:-$HOME/.cache/tierd}
WORK_DIR=$CACHE_ROOT/llama.cpp-$PACKAGE_VERSION
SDIST_DIR=$WORK_DIR/llama_cpp_python-$PACKAGE_VERSION
SRC_DIR=$SDIST_DIR/vendor/llama.cpp
COMMIT_FILE=$WORK_DIR/llama.cpp-commit.txt
BUILD_DIR=$WORK_DIR/build
DUMPER=$WORK_DIR/dump_reference
DUMPER_SRC=$REPO_ROOT/scripts/llamacpp/dump_reference.cpp
GOLDEN_DIR=$REPO_ROOT/tests/golden
MANIFEST=$REPO_ROOT/models/models.toml
JOBS=${TIERD_BUILD_JOBS:-2}
MODEL_WAIT_SECONDS=${TIERD_MODEL_WAIT_SECONDS:-3600}
MODEL_IDS=(qwen2.5-coder-0.5b-instruct smollm2-135m-instruct gemma3-270m)

log() {
    echo "llamacpp-reference: $*" >&2
}

die() {
    log "error: $*"
    exit 1
}

ensure_build_tools() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v ninja >/dev/null || missing+=(ninja-build)
    if ((${#missing[@]} == 0)); then
        return
    fi

    log "${missing[*]} not found; installing with apt-get"
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "installing ${missing[*]} needs root; install them and rerun"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}"
}

# Print the llama.cpp commit that the extracted sdist at $1 vendors, or nothing.
# The sdist keeps the submodule's git directory under .git/modules/vendor/llama.cpp;
# a plain checkout would have vendor/llama.cpp/.git as a directory instead.
find_vendored_commit() {
    local sdist=$1 head_file
    for head_file in "$sdist/.git/modules/vendor/llama.cpp/HEAD" "$sdist/vendor/llama.cpp/.git/HEAD"; do
        if [[ -f $head_file ]] && grep -Eq '^[0-9a-f]{40}$' "$head_file"; then
            cat "$head_file"
            return
        fi
    done
}

fetch_sdist() {
    if [[ -f $COMMIT_FILE && -f $SRC_DIR/CMakeLists.txt ]]; then
        return
    fi

    mkdir -p "$WORK_DIR/download"
    log "downloading the $PACKAGE_NAME $PACKAGE_VERSION sdist"
    python3 -m pip download --quiet --no-deps --no-binary "$PACKAGE_NAME" \
        -d "$WORK_DIR/download" "$PACKAGE_NAME==$PACKAGE_VERSION"
    local archive
    archive=$(find "$WORK_DIR/download" -maxdepth 1 -name "llama_cpp_python-$PACKAGE_VERSION.tar.gz" | head -n 1)
    [[ -n $archive ]] || die "pip download produced no llama_cpp_python-$PACKAGE_VERSION.tar.gz in $WORK_DIR/download"

    log "extracting $archive"
    local staging=$WORK_DIR/extract.tmp
    rm -rf "$staging" "$SDIST_DIR"
    mkdir -p "$staging"
    tar -xzf "$archive" -C "$staging"
    local staged_sdist=$staging/llama_cpp_python-$PACKAGE_VERSION
    [[ -f $staged_sdist/vendor/llama.cpp/CMakeLists.txt ]] || die "the sdist has no vendor/llama.cpp tree"

    local commit
    commit=$(find_vendored_commit "$staged_sdist")
    if [[ -z $commit ]]; then
        log "warning: the sdist records no llama.cpp commit; recording the package version instead"
        commit="unknown ($PACKAGE_NAME $PACKAGE_VERSION sdist)"
    fi

    # A .git entry makes llama.cpp's CMake files watch the git index, and ninja
    # then re-runs cmake on every build. The sdist's own .git is removed too, so
    # that `git rev-parse` in build-info.cmake cannot pick up llama-cpp-python's
    # commit in place of llama.cpp's.
    rm -rf "$staged_sdist/vendor/llama.cpp/.git" "$staged_sdist/.git"
    mv "$staged_sdist" "$SDIST_DIR"
    rm -rf "$staging"
    echo "$commit" >"$COMMIT_FILE"
    log "llama.cpp commit: $commit"
}

# Print whether the CMake cache in $BUILD_DIR enables llama-server: ON or OFF.
server_in_cache() {
    if grep -q '^LLAMA_BUILD_SERVER:BOOL=ON$' "$BUILD_DIR/CMakeCache.txt" 2>/dev/null; then
        echo ON
    else
        echo OFF
    fi
}

build_llama_cpp() {
    local with_server=$1
    local commit short_commit
    commit=$(cat "$COMMIT_FILE")
    short_commit=${commit:0:7}
    [[ $commit =~ ^[0-9a-f]{40}$ ]] || short_commit=unknown

    if [[ ! -f $BUILD_DIR/build.ninja ]]; then
        log "configuring llama.cpp in $BUILD_DIR"
        # Static libraries keep the dumper and llama-bench free of rpath handling.
        # The server is built only when asked for. Its web UI is always left
        # out: the UI step would otherwise run npm or download prebuilt files,
        # and an empty UI still serves the API. OpenSSL is off because nothing
        # here needs HTTPS.
        # GIT_CEILING_DIRECTORIES stops build-info.cmake from finding a git
        # repository above the cache directory.
        GIT_CEILING_DIRECTORIES=$WORK_DIR cmake -S "$SRC_DIR" -B "$BUILD_DIR" -G Ninja \
            -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=OFF \
            -DGGML_NATIVE=ON \
            -DLLAMA_CURL=OFF \
            -DLLAMA_OPENSSL=OFF \
            -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER="$with_server" \
            -DLLAMA_BUILD_UI=OFF \
            -DLLAMA_USE_PREBUILT_UI=OFF \
            -DLLAMA_BUILD_APP=OFF \
            -DLLAMA_BUILD_COMMON=ON \
            -DLLAMA_BUILD_TOOLS=ON \
            -DLLAMA_BUILD_COMMIT="$short_commit" \
            -DLLAMA_BUILD_NUMBER=0
    fi

    local targets=(llama llama-bench)
    if [[ $with_server == ON ]]; then
        if [[ $(server_in_cache) == OFF ]]; then
            # A build configured without the server keeps its objects: only the
            # server's targets are added.
            log "enabling llama-server in $BUILD_DIR"
            GIT_CEILING_DIRECTORIES=$WORK_DIR cmake -S "$SRC_DIR" -B "$BUILD_DIR" \
                -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
        fi
        targets+=(llama-server)
    fi

    log "building ${targets[*]} with $JOBS jobs"
    local start=$SECONDS
    GIT_CEILING_DIRECTORIES=$WORK_DIR cmake --build "$BUILD_DIR" --parallel "$JOBS" --target "${targets[@]}"
    log "build step took $((SECONDS - start)) s"
}

# Print the static libraries the dumper links against, in link order.
find_llama_libraries() {
    local name path
    for name in libllama.a libggml.a libggml-cpu.a libggml-base.a; do
        path=$(find "$BUILD_DIR" -name "$name" -type f | head -n 1)
        [[ -n $path ]] && echo "$path"
    done
}

build_dumper() {
    local libraries=()
    mapfile -t libraries < <(find_llama_libraries)
    ((${#libraries[@]} == 4)) || die "static libraries missing under $BUILD_DIR; the llama.cpp build did not finish"

    local stale=0 input
    [[ -x $DUMPER ]] || stale=1
    for input in "$DUMPER_SRC" "${libraries[@]}"; do
        [[ $input -nt $DUMPER ]] && stale=1
    done
    if ((stale == 0)); then
        return
    fi

    log "compiling $DUMPER_SRC"
    # ggml-cpu uses OpenMP for its thread pool when the compiler supports it.
    g++ -std=c++17 -O2 -Wall -Wextra \
        -I"$SRC_DIR/include" -I"$SRC_DIR/ggml/include" \
        "$DUMPER_SRC" -o "$DUMPER.tmp" \
        "${libraries[@]}" -fopenmp -lpthread -ldl -lm
    mv "$DUMPER.tmp" "$DUMPER"
}

# Print "id<TAB>file<TAB>size<TAB>sha256" for each model in models.toml.
read_manifest() {
    python3 - "$MANIFEST" "${MODEL_IDS[@]}" <<'EOF'
import sys
import tomllib

manifest_path, *model_ids = sys.argv[1:]
with open(manifest_path, "rb") as f:
    manifest = tomllib.load(f)

# models.toml uses [[model]] entries with an `id` key; [models.<id>] tables work too.
models = manifest.get("models", manifest.get("model", {}))
if isinstance(models, list):
    models = {entry["id"]: entry for entry in models}

for model_id in model_ids:
    entry = models.get(model_id)
    if entry is None:
        sys.exit(f"model {model_id!r} not found in {manifest_path}")
    for key in ("file", "size"):
        if key not in entry:
            sys.exit(f"model {model_id!r} in {manifest_path} has no {key!r} key")
    print(f"{model_id}\t{entry['file']}\t{entry['size']}\t{entry.get('sha256', '')}")
EOF
}

# Wait until $1 exists with exactly $2 bytes; another script may still be
# downloading it.
wait_for_model() {
    local path=$1 expected_size=$2 waited=0 size
    while true; do
        size=$(stat -c %s "$path" 2>/dev/null || echo 0)
        if [[ $size -eq $expected_size ]]; then
            return
        fi
        if ((waited >= MODEL_WAIT_SECONDS)); then
            die "$path has $size of $expected_size bytes after ${MODEL_WAIT_SECONDS} s; run scripts/fetch-models.sh and retry"
        fi
        if ((waited % 60 == 0)); then
            log "waiting for $path ($size of $expected_size bytes)"
        fi
        sleep 10
        waited=$((waited + 10))
    done
}

dump_model() {
    local model_id=$1 file=$2 size=$3 expected_sha256=$4
    local path=$REPO_ROOT/models/$model_id/$file
    wait_for_model "$path" "$size"

    local sha256
    sha256=$(sha256sum "$path" | cut -d ' ' -f 1)
    if [[ -n $expected_sha256 && $sha256 != "$expected_sha256" ]]; then
        die "$path has sha256 $sha256 but models.toml expects $expected_sha256"
    fi

    local prompts=("$GOLDEN_DIR"/prompts/*.txt)
    [[ -f ${prompts[0]} ]] || die "no prompts in $GOLDEN_DIR/prompts"

    local output=$GOLDEN_DIR/$model_id.json
    log "dumping $model_id to $output"
    "$DUMPER" \
        --model "$path" \
        --model-id "$model_id" \
        --model-file "$file" \
        --model-sha256 "$sha256" \
        --package "$PACKAGE_NAME $PACKAGE_VERSION" \
        --commit "$(cat "$COMMIT_FILE")" \
        --threads "$THREADS" \
        --n-predict "$N_PREDICT" \
        --top-k "$TOP_K" \
        --output "$output.tmp" \
        "${prompts[@]}"
    mv "$output.tmp" "$output"
}

# Check the golden files for values a broken build or dumper would produce, and
# print a summary per model and prompt.
check_golden_files() {
    python3 - "$GOLDEN_DIR" "$TOP_K" "${MODEL_IDS[@]}" <<'EOF'
import json
import math
import sys

golden_dir, top_k, *model_ids = sys.argv[1:]
top_k = int(top_k)
# tests/golden/prompts/long.txt must reach past gemma3's 512-token sliding window.
min_long_tokens = 600
errors = []

for model_id in model_ids:
    with open(f"{golden_dir}/{model_id}.json") as f:
        golden = json.load(f)
    for case in golden["cases"]:
        name = f"{model_id}/{case['prompt']}"
        steps = [case["top_logits"], *case["greedy_top_logits"]]
        for step in steps:
            if len(step) != top_k:
                errors.append(f"{name}: expected {top_k} top logits, found {len(step)}")
            if not all(math.isfinite(logit) for _, logit in step):
                errors.append(f"{name}: non-finite logit in {step}")
        if case["greedy_top_logits"][0] != case["top_logits"]:
            errors.append(f"{name}: first greedy step differs from top_logits")
        for token, step in zip(case["greedy"], case["greedy_top_logits"]):
            if step[0][0] != token:
                errors.append(f"{name}: greedy token {token} is not the top logit {step[0]}")
        if case["prompt"] == "long" and len(case["tokens"]) < min_long_tokens:
            errors.append(f"{name}: {len(case['tokens'])} prompt tokens, expected at least {min_long_tokens}")
        top = ", ".join(f"{token}:{logit:.3f}" for token, logit in case["top_logits"])
        print(f"{name}: {len(case['tokens'])} prompt tokens, {len(case['greedy'])} generated,"
              f" top [{top}], text {case['greedy_text']!r}")

for error in errors:
    print(f"error: {error}", file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
}

main() {
    local build_only=0 with_server=OFF
    case ${1:-} in
        "") ;;
        --build-only) build_only=1 ;;
        --build-server) build_only=1 with_server=ON ;;
        *) die "unknown argument '$1'; usage: $0 [--build-only | --build-server]" ;;
    esac

    command -v python3 >/dev/null || die "python3 not found"
    command -v g++ >/dev/null || die "g++ not found; install build-essential"
    ensure_build_tools
    fetch_sdist
    # A cache that already has the server keeps building it, so that a later
    # run without --build-server does not turn it off again.
    [[ $(server_in_cache) == ON ]] && with_server=ON
    build_llama_cpp "$with_server"
    build_dumper
    if ((build_only)); then
        log "built $BUILD_DIR/bin/llama-bench and $DUMPER"
        [[ $with_server == ON ]] && log "built $BUILD_DIR/bin/llama-server"
        return
    fi

    [[ -f $MANIFEST ]] || die "$MANIFEST not found"
    local manifest_lines=()
    mapfile -t manifest_lines < <(read_manifest)
    ((${#manifest_lines[@]} == ${#MODEL_IDS[@]})) || die "could not read all models from $MANIFEST"

    local line model_id file size sha256
    for line in "${manifest_lines[@]}"; do
        IFS=$'\t' read -r model_id file size sha256 <<<"$line"
        dump_model "$model_id" "$file" "$size" "$sha256"
    done
    check_golden_files
}

main "$@"
