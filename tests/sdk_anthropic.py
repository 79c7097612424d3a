#!/usr/bin/env python3
"""The official `anthropic` SDK through carpool, unchanged but for base_url.

    python tests/sdk_anthropic.py BASE CHECK

BASE is carpool (or the simulator, for `passthrough`), without /v1. CHECK:

- `passthrough`: messages.create and messages.stream() straight through;
  the stream's text adds up to the plain answer.
- `wait`: four deferred wait calls over two models at once
  (`Carpool-Mode: wait`), each answered with what the same body gets
  passed through; then one `max_tokens: 0` refused at intake with a 400 in
  Anthropic's error shape.
- `stream`: one deferred `messages.stream()` (`Carpool-Mode: wait`) whose
  final message equals the passed-through answer.

Env: CARPOOL_SDK_KEY (x-api-key, default "sk-ant-sdk"). Prints one line
per check and `sdk_anthropic: N passed, M failed`; exits non-zero on failure.
"""

import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import anthropic

BASE = sys.argv[1].rstrip("/")
CHECK = sys.argv[2]
KEY = os.environ.get("CARPOOL_SDK_KEY", "sk-ant-sdk")
WAIT = {"Carpool-Mode": "wait"}
NOW = {"Carpool-Mode": "now"}

results = []
client = anthropic.Anthropic(api_key=KEY, base_url=BASE, max_retries=0, timeout=60)


def check(name):
    def run(fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - every failure is reported
            results.append((name, False))
            print(f"FAIL {name}: {type(err).__name__}: {err}")
            traceback.print_exc(limit=4)
        else:
            results.append((name, True))
            print(f"ok   {name}")
        return fn

    return run


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def body(model, text):
    return {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
    }


def passed_through(b):
    return client.messages.create(**b, extra_headers=NOW)


def passthrough():
    b = body("claude-sim-a", "hello through carpool")

    @check("messages.create passes through")
    def _():
        m = client.messages.create(**b)
        expect(m.type == "message" and m.role == "assistant", m)
        expect(m.content[0].text.startswith("Simulated answer"), m.content)

    @check("messages.stream() passes through, text chunk by chunk")
    def _():
        plain = client.messages.create(**b)
        deltas = []
        with client.messages.stream(**b) as stream:
            for text in stream.text_stream:
                deltas.append(text)
            final = stream.get_final_message()
        expect(len(deltas) > 1, f"one chunk only: {deltas}")
        expect("".join(deltas) == plain.content[0].text, (deltas, plain))
        expect(final.id == plain.id and final.stop_reason == "end_turn", final)


def wait():
    bodies = [body(model, f"deferred {model} {i}") for model in ("claude-sim-a", "claude-sim-b") for i in range(2)]

    @check("four deferred wait calls over two models, each its own answer")
    def _():
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: client.messages.with_raw_response.create(**b, extra_headers=WAIT), bodies))
        for b, raw in zip(bodies, answers):
            m = raw.parse()
            expect(raw.headers.get("carpool-served-by") == "batch", dict(raw.headers))
            expect(raw.headers.get("carpool-batch-id", "").startswith("msgbatch_"), dict(raw.headers))
            expect(m.model_dump() == passed_through(b).model_dump(), (b, m))
        batches = {raw.headers.get("carpool-batch-id") for raw in answers}
        expect(len(batches) == 1, f"one batch for both models, got {batches}")

    @check("max_tokens 0 refused at intake in Anthropic's error shape")
    def _():
        bad = dict(bodies[0], max_tokens=0)
        try:
            client.messages.create(**bad, extra_headers=WAIT)
        except anthropic.BadRequestError as err:
            expect(err.status_code == 400, err.status_code)
            expect(err.body["type"] == "error", err.body)
            expect(err.body["error"]["type"] == "invalid_request_error", err.body)
            expect("max_tokens" in err.body["error"]["message"], err.body)
        else:
            raise AssertionError("not refused")


def stream():
    b = body("claude-sim-b", "a streamed deferred call")

    @check("a deferred messages.stream() is read by the SDK")
    def _():
        expected = passed_through(b)
        deltas = []
        with client.messages.stream(**b, extra_headers=WAIT) as s:
            for text in s.text_stream:
                deltas.append(text)
            final = s.get_final_message()
        expect("".join(deltas) == expected.content[0].text, (deltas, expected))
        expect(final.model_dump() == expected.model_dump(), (final, expected))


{"passthrough": passthrough, "wait": wait, "stream": stream}[CHECK]()
failed = sum(1 for _, ok in results if not ok)
print(f"sdk_anthropic: {len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
