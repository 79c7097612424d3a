#!/usr/bin/env python3
"""The official `openai` SDK's Responses API through carpool, deferred.

    python tests/sdk_responses.py CARPOOL_BASE SIM_BASE

CARPOOL_BASE is carpool in front of the simulator, SIM_BASE the simulator
itself (the synchronous answer to compare with); neither carries /v1.
Every call to carpool sends `Carpool-Mode: wait`, so each is answered by a
batch job and must equal what the simulator answers synchronously.
CARPOOL_SDK_KEY is the bearer key (default "sk-sdk-check").

Prints one line per check and `sdk_responses: N passed, M failed`; exits
non-zero if anything failed. Driven by tests/responses.rs.
"""

import os
import sys
import traceback

from openai import OpenAI

CARPOOL, SIM = (a.rstrip("/") for a in sys.argv[1:3])
KEY = os.environ.get("CARPOOL_SDK_KEY", "sk-sdk-check")
MODEL = "gpt-4o-mini"
TOOLS = [
    {
        "type": "function",
        "name": "lookup_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]

deferred = OpenAI(
    base_url=CARPOOL + "/v1",
    api_key=KEY,
    default_headers={"Carpool-Mode": "wait"},
    max_retries=0,
    timeout=60,
)
direct = OpenAI(base_url=SIM + "/v1", api_key="sk-direct", max_retries=0, timeout=30)

results = []


def check(name):
    def run(fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - every failure is reported
            results.append(False)
            print(f"FAIL {name}: {type(err).__name__}: {err}")
            traceback.print_exc(limit=4)
        else:
            results.append(True)
            print(f"ok   {name}")
        return fn

    return run


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


@check("responses.create in wait mode is served by batch with the synchronous answer")
def _():
    kwargs = dict(model=MODEL, input="What is a carpool, in one line?")
    raw = deferred.responses.with_raw_response.create(**kwargs)
    expect(raw.headers.get("carpool-served-by") == "batch", dict(raw.headers))
    expect(raw.headers.get("carpool-request-id", "").startswith("cpr_"), dict(raw.headers))
    got = raw.parse()
    want = direct.responses.create(**kwargs)
    expect(got.output_text == want.output_text, (got.output_text, want.output_text))
    expect(got.output_text.endswith("What is a carpool, in one line?"), got.output_text)
    expect(got.model_dump() == want.model_dump(), "the parsed responses differ")
    expect(got.usage.input_tokens == want.usage.input_tokens > 0, got.usage)


@check("a function_call output item survives the batch")
def _():
    kwargs = dict(
        model=MODEL,
        instructions="Use the tool.",
        input=[{"role": "user", "content": "Weather in Lyon?"}],
        tools=TOOLS,
        reasoning={"effort": "low"},
    )
    got = deferred.responses.create(**kwargs)
    want = direct.responses.create(**kwargs)
    types = [item.type for item in got.output]
    expect(types == ["reasoning", "function_call", "message"], types)
    call = got.output[1]
    expect(call.name == "lookup_weather" and call.call_id, call)
    expect(got.model_dump() == want.model_dump(), "the parsed responses differ")


def dedup(types):
    """The event types with runs of one type (deltas) counted once."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def read_stream(events):
    """Types, sequence numbers and text deltas of a raw event stream."""
    types, numbers, text, last = [], [], "", None
    for event in events:
        types.append(event.type)
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            text += event.delta
        last = event
    return types, numbers, text, last


@check("responses.create(stream=True) reads the re-emitted event stream")
def _():
    kwargs = dict(model=MODEL, input="Stream a short answer, please.", tools=TOOLS)
    want = direct.responses.create(**kwargs)
    types, numbers, text, last = read_stream(deferred.responses.create(stream=True, **kwargs))
    expect(types[0] == "response.created" and types[1] == "response.in_progress", types)
    expect(types[-1] == "response.completed", types)
    expect(numbers == sorted(set(numbers)) and numbers[0] == 0, numbers)
    expect("response.output_item.added" in types and "response.content_part.done" in types, types)
    expect(text == want.output_text, (text, want.output_text))
    expect(last.response.model_dump() == want.model_dump(), "completed response differs")
    # The simulator's own stream reads the same way (its deltas cut the
    # text in other places).
    types2, _, text2, _ = read_stream(direct.responses.create(stream=True, **kwargs))
    expect(dedup(types2) == dedup(types) and text2 == text, (types2, types))


@check("responses.stream(...) accumulates to the final response")
def _():
    kwargs = dict(
        model=MODEL,
        input=[{"role": "user", "content": "Weather in Rome, streamed?"}],
        tools=TOOLS,
        reasoning={"effort": "low"},
    )
    want = direct.responses.create(**kwargs)
    deltas = ""
    with deferred.responses.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas += event.delta
        final = stream.get_final_response()
    expect(deltas == want.output_text, (deltas, want.output_text))
    expect(final.output_text == want.output_text, final.output_text)
    expect([i.type for i in final.output] == ["reasoning", "function_call", "message"], final.output)
    expect(final.output[1].arguments == want.output[1].arguments, final.output[1])


@check("background=True is refused with a 400 naming the parameter")
def _():
    import openai

    try:
        deferred.responses.create(model=MODEL, input="later", background=True)
    except openai.BadRequestError as err:
        expect(err.status_code == 400, err)
        expect(err.param == "background", err.body)
    else:
        raise AssertionError("background=True was accepted")


passed = sum(results)
failed = len(results) - passed
print(f"sdk_responses: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
