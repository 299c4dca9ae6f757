#!/usr/bin/env python3
"""A simulated frontier model, for measuring escalation without a paid API.

Serves the OpenAI chat completions API (POST /v1/chat/completions, non-streaming) on
127.0.0.1 and answers classification prompts from a labelled JSONL file of {"text", "label"}
lines. For each request it finds the data item whose text, stripped of surrounding
whitespace, occurs in the request's messages (the longest one when several do). It answers
the item's gold label with probability --accuracy, and one of the data's other labels
otherwise. The draw depends only on --seed and the item's text (SHA-256), so every run gives
the same answers in any order.

The usage it reports is an estimate of 4 characters per token, not a tokenizer:
prompt_tokens = ceil(characters of all message contents / 4) and
completion_tokens = ceil(characters of the answer / 4).

A request that contains no item's text gets HTTP 422, and a streaming request HTTP 400.

Usage: scripts/simulated-frontier.py --data FILE.jsonl [--accuracy 0.96] [--seed 1] [--port 0]
The first line on stdout is "listening on 127.0.0.1:PORT"; with --port 0 (the default) the
system picks the port. It serves until it is killed.
"""

import argparse
import hashlib
import json
import math
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def load_items(path):
    """Returns the (text, label) pairs of a JSONL file, with the texts stripped of surrounding
    whitespace, keeping the first label of a text that occurs twice."""
    items = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
            except (ValueError, KeyError, TypeError) as error:
                sys.exit(f"{path}:{number}: not a {{\"text\", \"label\"}} line: {error}")
            if text.strip():
                items.setdefault(text.strip(), label)
    if not items:
        sys.exit(f"{path}: no items")
    # Longest first, so a text that contains another is matched in full.
    return sorted(items.items(), key=lambda item: len(item[0]), reverse=True)


def unit_draw(seed, text, salt):
    """Returns a number in [0, 1) determined by the seed, the text and the salt."""
    digest = hashlib.sha256(f"{seed}\n{salt}\n{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def answer_for(text, gold, labels, accuracy, seed):
    """Returns the gold label with probability `accuracy`, and another label otherwise."""
    if unit_draw(seed, text, "correct") < accuracy:
        return gold
    others = [label for label in labels if label != gold]
    if not others:
        return gold
    return others[int(unit_draw(seed, text, "wrong") * len(others))]


def estimate_tokens(characters):
    """Estimates a token count at 4 characters per token."""
    return math.ceil(characters / 4)


class Handler(BaseHTTPRequestHandler):
    server_version = "simulated-frontier/1"
    # Keep-alive, so that a client reuses its connections. Every reply sets content-length.
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self.reply(404, error_body(f"no route {self.path}; use /v1/chat/completions"))
        try:
            length = int(self.headers.get("content-length", "0"))
            request = json.loads(self.rfile.read(length))
            contents = [message.get("content") or "" for message in request["messages"]]
        except (ValueError, KeyError, TypeError, AttributeError) as problem:
            return self.reply(400, error_body(f"invalid request body: {problem}"))
        if request.get("stream"):
            return self.reply(400, error_body("streaming is not simulated; send stream: false"))

        # Content given as a list of parts is searched and counted as its JSON text.
        contents = [content if isinstance(content, str) else json.dumps(content) for content in contents]
        prompt = "\n".join(contents)
        config = self.server.config
        item = next(((text, label) for text, label in config.items if text in prompt), None)
        if item is None:
            return self.reply(422, error_body("the request contains the text of no item of the data file"))

        text, gold = item
        answer = answer_for(text, gold, config.labels, config.accuracy, config.seed)
        prompt_tokens = estimate_tokens(sum(len(content) for content in contents))
        completion_tokens = estimate_tokens(len(answer))
        self.reply(
            200,
            {
                "id": "chatcmpl-simulated",
                "object": "chat.completion",
                "created": 0,
                "model": request.get("model", "simulated"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def reply(self, status, body):
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        # One line a request would bury the evaluation's own output.
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default listen backlog of 5 drops connections when a client opens more at once,
    # and each dropped one waits a second for the SYN to be resent.
    request_queue_size = 128


def error_body(message):
    return {"error": {"message": message, "type": "invalid_request_error"}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="JSONL file of {\"text\", \"label\"} lines")
    parser.add_argument("--accuracy", type=float, default=0.96, help="probability of the gold label (default 0.96)")
    parser.add_argument("--seed", default="1", help="seed of the answers (default 1)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one (default)")
    args = parser.parse_args()
    if not 0.0 <= args.accuracy <= 1.0:
        parser.error(f"--accuracy must be from 0 to 1, got {args.accuracy}")

    server = Server(("127.0.0.1", args.port), Handler)
    items = load_items(args.data)
    server.config = argparse.Namespace(
        items=items,
        labels=sorted({label for _, label in items}),
        accuracy=args.accuracy,
        seed=args.seed,
    )
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
