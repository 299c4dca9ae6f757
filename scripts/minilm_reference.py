#!/usr/bin/env python3
"""Compute reference sentence embeddings for all-MiniLM-L6-v2 and write tests/golden/minilm.json.

The forward pass is an independent NumPy implementation of the standard BERT
encoder: word, position and token type embeddings, LayerNorm (eps 1e-12),
6 layers of 12-head self-attention and a feed-forward block with exact (erf)
GELU, then mean pooling over the attention mask and L2 normalisation, which
is how sentence-transformers pools this model. It reads the weights from
models/all-minilm-l6-v2/model.safetensors with the small reader below and
tokenizes with the `tokenizers` package and that folder's tokenizer.json.
The model must be fetched first: scripts/fetch-models.sh all-minilm-l6-v2

All arithmetic runs in float64 on the float32 weights, so the values carry
float64 rounding error only and differ slightly from what a float32
implementation computes. Tests should compare with a tolerance.

The script always runs inside a virtual environment at
${XDG_CACHE_HOME:-~/.cache}/tierd/reference-venv with numpy and tokenizers
pinned as in REQUIREMENTS. Started with any other interpreter, it creates
that environment with pip when it is missing or outdated and runs itself
again there.
"""

import argparse
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path

REQUIREMENTS = ["numpy==2.3.5", "tokenizers==0.22.1"]
REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tierd"
VENV_DIR = CACHE_DIR / "reference-venv"
# The venv is reused only while this file inside it lists the same pins and Python version.
VENV_MARKER = VENV_DIR / "tierd-requirements.txt"

MODEL_ID = "all-minilm-l6-v2"
# sentence-transformers truncates this model's input at 256 tokens
# (max_seq_length in its sentence_bert_config.json). The tokenizer.json in the
# same folder sets truncation at 128 and fixed padding to 128, which the
# script replaces with no padding and truncation at 256.
MAX_SEQ_LENGTH = 256
LAYER_NORM_EPS = 1e-12
NUM_LAYERS = 6
NUM_HEADS = 12
DECIMALS = 7

SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    unicodedata.normalize("NFC", "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"),
    "ok",
    "The committee met on a rainy Tuesday afternoon to review the proposal for a new "
    "public library, and its members spent most of the meeting on the budget, the "
    "construction timeline, the accessibility requirements for older visitors, and "
    "whether the children's reading room should face the park or the quiet street "
    "behind the old railway station, before they finally agreed to vote next month.",
]
# Cosine similarities are recorded for every pair of the first SIMILARITY_COUNT sentences.
SIMILARITY_COUNT = 3


def requirements_text():
    return "\n".join([f"python {sys.version_info.major}.{sys.version_info.minor}", *REQUIREMENTS]) + "\n"


def running_in_venv():
    return Path(sys.prefix).resolve() == VENV_DIR.resolve()


def ensure_venv():
    """Create the pinned virtual environment unless an identical one exists."""
    try:
        if VENV_MARKER.read_text(encoding="utf-8") == requirements_text():
            return
    except OSError:
        pass
    print(f"creating {VENV_DIR} with {' '.join(REQUIREMENTS)}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV_DIR)], check=True)
    python = VENV_DIR / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--only-binary=:all:", *REQUIREMENTS],
                   check=True)
    VENV_MARKER.write_text(requirements_text(), encoding="utf-8")


def reexec_in_venv():
    try:
        ensure_venv()
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"minilm_reference.py: error: cannot set up {VENV_DIR}: {error}")
    python = str(VENV_DIR / "bin" / "python")
    os.execv(python, [python, str(Path(__file__).resolve()), *sys.argv[1:]])


SAFETENSORS_DTYPES = {"F32": "<f4", "F64": "<f8", "I64": "<i8"}


def read_safetensors(path):
    """Return {name: array} for the tensors of a safetensors file.

    The format is an 8-byte little-endian header length, a JSON header that
    maps each tensor name to its dtype, shape and [begin, end) byte offsets
    into the data that follows the header, and the raw little-endian data.
    """
    import numpy as np

    data = Path(path).read_bytes()
    (header_length,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + header_length])
    base = 8 + header_length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        count = math.prod(info["shape"])
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes, "
                             f"expected {count * dtype.itemsize} for shape {info['shape']}")
        tensors[name] = np.frombuffer(data, dtype=dtype, count=count, offset=base + begin).reshape(info["shape"])
    return tensors


class MiniLM:
    """BERT encoder with mean pooling, computed in float64."""

    def __init__(self, tensors):
        import numpy as np

        self.np = np
        self.weights = {name: array.astype(np.float64) for name, array in tensors.items()
                        if array.dtype == np.float32}
        self.erf = np.frompyfunc(math.erf, 1, 1)

    def __getitem__(self, name):
        return self.weights[name]

    def linear(self, x, prefix):
        # PyTorch stores a Linear weight as [out_features, in_features].
        return x @ self[f"{prefix}.weight"].T + self[f"{prefix}.bias"]

    def layer_norm(self, x, prefix):
        mean = x.mean(axis=-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        normalized = (x - mean) / self.np.sqrt(variance + LAYER_NORM_EPS)
        return normalized * self[f"{prefix}.weight"] + self[f"{prefix}.bias"]

    def gelu(self, x):
        return 0.5 * x * (1.0 + self.erf(x / math.sqrt(2.0)).astype(self.np.float64))

    def self_attention(self, x, attention_mask, prefix):
        seq_len, hidden = x.shape
        head_dim = hidden // NUM_HEADS

        def split_heads(projection):
            return projection.reshape(seq_len, NUM_HEADS, head_dim).transpose(1, 0, 2)

        query = split_heads(self.linear(x, f"{prefix}.self.query"))
        key = split_heads(self.linear(x, f"{prefix}.self.key"))
        value = split_heads(self.linear(x, f"{prefix}.self.value"))

        scores = query @ key.transpose(0, 2, 1) / math.sqrt(head_dim)
        # Masked key positions get -inf, so softmax gives them weight 0.
        scores = self.np.where(attention_mask[None, None, :] > 0, scores, -self.np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probabilities = self.np.exp(scores)
        probabilities /= probabilities.sum(axis=-1, keepdims=True)

        context = (probabilities @ value).transpose(1, 0, 2).reshape(seq_len, hidden)
        return self.layer_norm(self.linear(context, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")

    def feed_forward(self, x, prefix):
        intermediate = self.gelu(self.linear(x, f"{prefix}.intermediate.dense"))
        return self.layer_norm(self.linear(intermediate, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")

    def encode(self, token_ids, token_type_ids, attention_mask):
        """Return the L2-normalised mean of the last hidden states over the attention mask."""
        np = self.np
        token_ids = np.asarray(token_ids)
        attention_mask = np.asarray(attention_mask, dtype=np.float64)
        positions = np.arange(len(token_ids))

        x = (self["embeddings.word_embeddings.weight"][token_ids]
             + self["embeddings.position_embeddings.weight"][positions]
             + self["embeddings.token_type_embeddings.weight"][np.asarray(token_type_ids)])
        x = self.layer_norm(x, "embeddings.LayerNorm")
        for layer in range(NUM_LAYERS):
            prefix = f"encoder.layer.{layer}"
            x = self.self_attention(x, attention_mask, f"{prefix}.attention")
            x = self.feed_forward(x, prefix)

        pooled = (x * attention_mask[:, None]).sum(axis=0) / attention_mask.sum()
        return pooled / np.linalg.norm(pooled)


def sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def compute_reference(model_dir):
    import numpy as np
    import tokenizers

    weights_path = model_dir / "model.safetensors"
    tokenizer_path = model_dir / "tokenizer.json"
    for path in (weights_path, tokenizer_path):
        if not path.is_file():
            sys.exit(f"minilm_reference.py: error: {path} not found. "
                     f"Fetch it first: scripts/fetch-models.sh {MODEL_ID}")

    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_SEQ_LENGTH)
    model = MiniLM(read_safetensors(weights_path))

    cases = []
    embeddings = []
    for text in SENTENCES:
        encoding = tokenizer.encode(text)
        embedding = model.encode(encoding.ids, encoding.type_ids, encoding.attention_mask)
        embeddings.append(embedding)
        cases.append({
            "text": text,
            "tokens": encoding.tokens,
            "token_ids": encoding.ids,
            "embedding": [round(float(value), DECIMALS) for value in embedding],
        })

    similarities = []
    for first in range(SIMILARITY_COUNT):
        for second in range(first + 1, SIMILARITY_COUNT):
            a, b = embeddings[first], embeddings[second]
            cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            similarities.append({"first": first, "second": second, "cosine": round(cosine, DECIMALS)})

    return {
        "model": MODEL_ID,
        "source": (f"scripts/minilm_reference.py: NumPy {np.__version__} float64 BERT forward pass, "
                   f"tokenizers {tokenizers.__version__}, Python {sys.version.split()[0]}"),
        "model_sha256": sha256_of_file(weights_path),
        "tokenizer_sha256": sha256_of_file(tokenizer_path),
        "max_seq_length": MAX_SEQ_LENGTH,
        "pooling": "mean over attention mask, then L2 normalisation",
        "decimals": DECIMALS,
        "cases": cases,
        "similarities": similarities,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / MODEL_ID,
                        help=f"folder with model.safetensors and tokenizer.json (default: models/{MODEL_ID})")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "tests" / "golden" / "minilm.json",
                        help="JSON file to write (default: tests/golden/minilm.json)")
    arguments = parser.parse_args()

    if not running_in_venv():
        reexec_in_venv()

    reference = compute_reference(arguments.model_dir)
    temporary = arguments.output.with_name(f".{arguments.output.name}.tmp{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as output:
        json.dump(reference, output, ensure_ascii=False, indent=1)
        output.write("\n")
    os.replace(temporary, arguments.output)

    print(f"wrote {arguments.output}")
    for similarity in reference["similarities"]:
        print(f"cosine({similarity['first']}, {similarity['second']}) = {similarity['cosine']:.4f}")


if __name__ == "__main__":
    main()
