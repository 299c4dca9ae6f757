"""Checks tierd against the official `openai` Python package.

tests/openai_sdk.sh starts the server and runs this file. Each test prints PASS or FAIL, and
the last line is "N passed, M failed". The exit status is 1 when any test fails.
"""

import argparse
import sys
import traceback

import openai

CAPITAL_PROMPT = "What is the capital of France?"


def greedy_chat(client, model, **extra):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": CAPITAL_PROMPT}],
        temperature=0,
        max_tokens=24,
        **extra,
    )


def test_chat_names_paris(client, model):
    completion = greedy_chat(client, model)
    content = completion.choices[0].message.content
    assert "Paris" in content, f"greedy output does not name Paris: {content!r}"
    assert completion.choices[0].finish_reason in ("stop", "length"), completion.choices[0].finish_reason
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage


def test_stream_matches_non_stream(client, model):
    whole = greedy_chat(client, model)
    expected = whole.choices[0].message.content

    pieces = []
    finish_reasons = []
    usage = None
    stream = greedy_chat(client, model, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)

    streamed = "".join(pieces)
    assert streamed == expected, f"streamed {streamed!r} != non-streamed {expected!r}"
    assert finish_reasons == [whole.choices[0].finish_reason], f"finish reasons {finish_reasons}"
    assert usage is not None, "no usage chunk although stream_options.include_usage was set"
    assert usage.completion_tokens == whole.usage.completion_tokens, (
        f"streamed completion_tokens {usage.completion_tokens} != {whole.usage.completion_tokens}"
    )


def test_legacy_completion(client, model):
    completion = client.completions.create(
        model=model, prompt="def add(a, b):", temperature=0, max_tokens=16
    )
    text = completion.choices[0].text
    assert text.strip(), f"legacy completion returned no text: {completion}"
    assert completion.object == "text_completion", completion.object
    assert completion.usage.completion_tokens <= 16, completion.usage


def test_models_list(client, model):
    ids = [entry.id for entry in client.models.list()]
    assert model in ids, f"{model} not in {ids}"


def test_unknown_model_raises(client, model):
    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    except openai.NotFoundError as error:
        assert error.status_code == 404, error.status_code
        assert error.code == "model_not_found", f"error.code is {error.code!r}"
        return
    raise AssertionError("an unknown model did not raise openai.NotFoundError")


TESTS = [
    test_chat_names_paris,
    test_stream_matches_non_stream,
    test_legacy_completion,
    test_models_list,
    test_unknown_model_raises,
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="tierd's API root, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--model", required=True, help="model id to test")
    parser.add_argument("--server-log", help="server log file, printed when a test fails")
    args = parser.parse_args()

    # tierd needs no key, but the client raises without one. max_retries=0 keeps
    # a failure from being hidden behind the SDK's automatic retries.
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", timeout=120, max_retries=0)

    passed = failed = 0
    for test in TESTS:
        try:
            test(client, args.model)
        except Exception:  # noqa: BLE001 - every failure is reported, then the next test runs
            failed += 1
            print(f"FAIL {test.__name__}")
            traceback.print_exc(file=sys.stdout)
        else:
            passed += 1
            print(f"PASS {test.__name__}")

    if failed and args.server_log:
        print(f"--- server log {args.server_log} ---")
        with open(args.server_log, encoding="utf-8", errors="replace") as log:
            print(log.read())
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
