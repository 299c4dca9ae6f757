"""Embed the same sentences with tierd's /v1/classify, ONNX Runtime and sentence-transformers.

Run by scripts/bench-classify-vs-python.sh, which builds the virtual environment and starts
tierd. All three stacks run all-minilm-l6-v2 from the same safetensors file on the same
number of threads. The script first checks that they agree, then times one sentence per call
(one client, calls in sequence) and one sentence per call from several concurrent clients, in
alternating rounds, and prints sentences/s and p50 latency with ratios against tierd.

tierd's figures include HTTP, JSON and the intent head; the Python stacks are called in
process and stop at the embedding. Their concurrent clients are threads calling the model at
the same time, which is what a Python server without batching does under that load.
"""

import argparse
import http.client
import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

# Minimum cosine similarity between two stacks' embeddings of the same sentence.
MIN_COSINE = 0.999
# Largest difference between tierd's intent probabilities and the head applied in NumPy to
# sentence-transformers' embeddings. An embedding that differs by 1e-3 moves them by more.
MAX_PROBABILITY_DIFFERENCE = 1e-3


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="tierd's base URL, on 127.0.0.1")
    parser.add_argument("--task", default="intent", help="embedding-head task to call")
    parser.add_argument("--model-dir", type=Path, required=True, help="folder of all-minilm-l6-v2")
    parser.add_argument("--head", type=Path, required=True, help="the task's head.safetensors")
    parser.add_argument("--golden", type=Path, required=True, help="tests/golden/minilm.json")
    parser.add_argument("--sentences", type=Path, required=True, help="JSONL file with a `text` per line")
    parser.add_argument("--count", type=int, default=200, help="sentences per measurement")
    parser.add_argument("--threads", type=int, default=2, help="threads of each Python runtime")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in the concurrent runs")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--onnx", type=Path, required=True, help="where to write the exported ONNX model")
    return parser.parse_args()


def load_sentences(path, count):
    sentences = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            text = json.loads(line)["text"].strip()
            if text:
                sentences.append(text)
            if len(sentences) == count:
                break
    if len(sentences) < count:
        raise SystemExit(f"{path} has only {len(sentences)} sentences, {count} requested")
    return sentences


def normalize(vectors):
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class SentenceTransformersStack:
    name = "sentence-transformers"

    def __init__(self, model_dir, threads):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        # A folder without modules.json gets a Transformer and mean pooling, the MiniLM recipe.
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        self.model.eval()

    def embed(self, sentences):
        return self.model.encode(sentences, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)


class OnnxStack:
    name = "onnxruntime"

    def __init__(self, model_dir, onnx_path, threads, torch_model):
        import onnxruntime
        from tokenizers import Tokenizer

        if not onnx_path.is_file():
            export_onnx(torch_model, onnx_path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json truncates at 128 tokens; tierd does not, and the sentences are shorter.
        self.tokenizer.no_truncation()
        self.tokenizer.enable_padding()

    def embed(self, sentences):
        encodings = self.tokenizer.encode_batch(sentences)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        weights = mask[:, :, None].astype(np.float32)
        mean = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
        return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def export_onnx(torch_model, path):
    """Exports the BERT body of the sentence-transformers model, with dynamic batch and length."""
    import torch

    class Body(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    body = Body(torch_model[0].auto_model).eval()
    sample = torch.ones((2, 8), dtype=torch.int64)
    arguments = (sample, sample, torch.zeros_like(sample))
    axes = {0: "batch", 1: "sequence"}
    path.parent.mkdir(parents=True, exist_ok=True)
    names = dict(
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "last_hidden_state": axes},
        opset_version=17,
    )
    with torch.no_grad():
        try:
            torch.onnx.export(body, arguments, str(path), dynamo=False, **names)
        except Exception as error:  # noqa: BLE001: any failure of the old exporter falls through
            print(f"the TorchScript ONNX exporter failed ({error}); trying the dynamo exporter")
            torch.onnx.export(body, arguments, str(path), dynamo=True, **names)
    print(f"exported {path}")


class TierdStack:
    name = "tierd"

    def __init__(self, url, task):
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        self.host, self.port, self.task = host, int(port), task
        self.local = threading.local()

    def classify(self, sentences):
        # One keep-alive connection per client thread, as an HTTP client pool would keep.
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        body = json.dumps({"task": self.task, "input": sentences})
        connection.request("POST", "/v1/classify", body, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        text = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"tierd returned {reply.status}: {text[:300]!r}")
        return json.loads(text)["results"]

    def embed(self, sentences):
        return self.classify(sentences)

    def batch_totals(self):
        """Returns the requests embedded and the encoder runs so far, from /metrics."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        connection.request("GET", "/metrics")
        values = {}
        for line in connection.getresponse().read().decode().splitlines():
            name, _, value = line.partition(" ")
            values[name.split("{")[0]] = value
        connection.close()
        return float(values["tierd_encoder_batch_requests_sum"]), float(values["tierd_encoder_batch_requests_count"])


def check_agreement(st, onnx, tierd, sentences, golden_path, head_path):
    """Fails unless the three stacks embed the sentences alike."""
    from safetensors import safe_open

    reference = st.embed(sentences)
    onnx_cosine = (normalize(reference) * normalize(onnx.embed(sentences))).sum(axis=1)
    print(f"cosine sentence-transformers vs onnxruntime: min {onnx_cosine.min():.6f}")

    # tests/encoder.rs holds tierd's encoder to these reference embeddings within 5e-5.
    golden = json.loads(golden_path.read_text())["cases"]
    golden_embeddings = normalize([case["embedding"] for case in golden])
    st_golden = normalize(st.embed([case["text"] for case in golden]))
    golden_cosine = (golden_embeddings * st_golden).sum(axis=1)
    print(f"cosine sentence-transformers vs tierd's reference embeddings: min {golden_cosine.min():.6f}")

    # The served tierd: its intent probabilities against the same head over these embeddings.
    with safe_open(str(head_path), framework="numpy") as head:
        weight, bias = head.get_tensor("weight"), head.get_tensor("bias")
        labels = json.loads(head.metadata()["labels"])
    logits = normalize(reference) @ weight.T.astype(np.float64) + bias
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    results = tierd.classify(sentences)
    served = np.array([[result["scores"][label] for label in labels] for result in results])
    probability_difference = np.abs(served - expected).max()
    same_labels = sum(r["label"] == labels[i] for r, i in zip(results, expected.argmax(axis=1)))
    print(
        f"tierd intent probabilities vs the head over sentence-transformers embeddings: "
        f"largest difference {probability_difference:.2e}, same label {same_labels}/{len(results)}"
    )

    failures = []
    if onnx_cosine.min() < MIN_COSINE:
        failures.append(f"onnxruntime's cosine {onnx_cosine.min():.6f} is under {MIN_COSINE}")
    if golden_cosine.min() < MIN_COSINE:
        failures.append(f"the reference cosine {golden_cosine.min():.6f} is under {MIN_COSINE}")
    if probability_difference > MAX_PROBABILITY_DIFFERENCE:
        failures.append(f"tierd's probabilities differ by {probability_difference:.2e}")
    if failures:
        raise SystemExit("the stacks disagree, so timing them would compare different work: " + "; ".join(failures))


def measure(stack, sentences, clients):
    """Embeds every sentence, one per call, from `clients` threads; returns (sentences/s, p50 ms)."""
    latencies = []
    lock = threading.Lock()
    next_index = [0]

    def client():
        own = []
        while True:
            with lock:
                index = next_index[0]
                next_index[0] += 1
            if index >= len(sentences):
                break
            started = time.perf_counter()
            stack.embed([sentences[index]])
            own.append(time.perf_counter() - started)
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return len(sentences) / elapsed, statistics.median(latencies) * 1000


def main():
    args = parse_args()
    sentences = load_sentences(args.sentences, args.count)
    st = SentenceTransformersStack(args.model_dir, args.threads)
    onnx = OnnxStack(args.model_dir, args.onnx, args.threads, st.model)
    tierd = TierdStack(args.url, args.task)
    check_agreement(st, onnx, tierd, sentences, args.golden, args.head)

    stacks = [tierd, onnx, st]
    modes = [("batch 1", 1), (f"{args.concurrency} clients", args.concurrency)]
    # Warm-up: the first calls of each stack allocate buffers and fill caches.
    for stack in stacks:
        measure(stack, sentences[:16], 1)

    figures = {(stack.name, mode): [] for stack in stacks for mode, _ in modes}
    # Requests embedded and encoder runs of tierd, by mode.
    merged = {mode: [0.0, 0.0] for mode, _ in modes}
    for round_index in range(args.rounds):
        # The order rotates each round, so drift on a shared machine spreads over all stacks.
        order = stacks[round_index % len(stacks):] + stacks[:round_index % len(stacks)]
        for mode, clients in modes:
            for stack in order:
                before = tierd.batch_totals() if stack is tierd else None
                throughput, p50 = measure(stack, sentences, clients)
                if before:
                    after = tierd.batch_totals()
                    merged[mode][0] += after[0] - before[0]
                    merged[mode][1] += after[1] - before[1]
                figures[(stack.name, mode)].append((throughput, p50))
                print(f"round {round_index + 1} {mode:>10} {stack.name:<22} {throughput:8.1f} sentences/s  p50 {p50:7.2f} ms")

    print()
    for mode, (requests, runs) in merged.items():
        print(f"tierd, {mode}: {requests / runs:.2f} requests per encoder run")
    print(f"{len(sentences)} sentences, {args.threads} threads, medians of {args.rounds} rounds")
    print("| stack | mode | sentences/s | p50 ms | throughput vs tierd | p50 vs tierd |")
    print("|---|---|---|---|---|---|")
    for mode, _ in modes:
        base_throughput = statistics.median(t for t, _ in figures[("tierd", mode)])
        base_p50 = statistics.median(p for _, p in figures[("tierd", mode)])
        for stack in stacks:
            throughput = statistics.median(t for t, _ in figures[(stack.name, mode)])
            p50 = statistics.median(p for _, p in figures[(stack.name, mode)])
            print(
                f"| {stack.name} | {mode} | {throughput:.1f} | {p50:.2f} | "
                f"{throughput / base_throughput:.2f} | {p50 / base_p50:.2f} |"
            )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
