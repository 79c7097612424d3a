#!/usr/bin/env python3
"""Do the official SDKs accept our wire shapes?

Runs the official `openai` and `mistralai` Python clients against a base URL
(the simulated provider, or carpool in front of it) and checks the answers:
chat (plain and streamed), file upload, batch create, poll and result
download, in both dialects.

    python tests/sdk_check.py http://127.0.0.1:9090
    CARPOOL_SDK_BASE=http://127.0.0.1:9090 python tests/sdk_check.py

The base URL carries no /v1: the OpenAI client gets base + "/v1", the
Mistral client gets base (its paths carry /v1). Optional env:
CARPOOL_SDK_KEY (bearer token, default "sk-sdk-check"),
CARPOOL_SDK_TIMEOUT (seconds to wait for a batch, default 120),
CARPOOL_SDK_DEFERRED=1 (BASE is carpool: also check deferred calls made
through the SDKs unchanged, by the /defer prefix and the Carpool-Mode header).

The answer checks rely on the simulator being deterministic: the same
request body always gets the same answer, so a batch result must equal what
the synchronous call returns for the same body.

Prints one line per check and a final `sdk_check: N passed, M failed`;
exits non-zero if anything failed.
"""

import json
import os
import sys
import time
import traceback

from openai import OpenAI

try:
    from mistralai.client import Mistral
except ImportError:  # mistralai 1.x
    from mistralai import Mistral

BASE = (sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CARPOOL_SDK_BASE", "")).rstrip("/")
KEY = os.environ.get("CARPOOL_SDK_KEY", "sk-sdk-check")
TIMEOUT = float(os.environ.get("CARPOOL_SDK_TIMEOUT", "120"))
DEFERRED = os.environ.get("CARPOOL_SDK_DEFERRED") == "1"

OPENAI_MODEL = "gpt-4o-mini"
MISTRAL_MODEL = "mistral-small-latest"

results = []


def check(name):
    """Run the decorated function now as one named check."""

    def run(fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - every failure is reported
            results.append((name, False))
            print(f"FAIL {name}: {type(err).__name__}: {err}")
            traceback.print_exc(limit=3)
        else:
            results.append((name, True))
            print(f"ok   {name}")
        return fn

    return run


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def wait_for(poll, done, what):
    deadline = time.monotonic() + TIMEOUT
    delay = 0.05
    while True:
        obj = poll()
        if done(obj):
            return obj
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not finished after {TIMEOUT}s: {obj}")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def jsonl_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def messages(text):
    return [{"role": "user", "content": text}]


def main():
    if not BASE:
        print("usage: sdk_check.py BASE_URL (or set CARPOOL_SDK_BASE), e.g. http://127.0.0.1:9090")
        return 2
    oai = OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    mis = Mistral(api_key=KEY, server_url=BASE, timeout_ms=int(TIMEOUT * 1000))
    state = {}

    # ------------------------------------------------------------ OpenAI
    @check("openai chat: answer echoes the prompt, same body same answer")
    def _():
        a = oai.chat.completions.create(model=OPENAI_MODEL, messages=messages("hello from openai"))
        b = oai.chat.completions.create(model=OPENAI_MODEL, messages=messages("hello from openai"))
        c = oai.chat.completions.create(model=OPENAI_MODEL, messages=messages("another question"))
        text = a.choices[0].message.content
        expect(text and "hello from openai" in text, f"unexpected content {text!r}")
        expect(a.choices[0].message.content == b.choices[0].message.content, "same body, different answers")
        expect(text != c.choices[0].message.content, "different bodies, same answer")
        expect(a.usage.prompt_tokens > 0 and a.usage.total_tokens >= a.usage.prompt_tokens, f"usage {a.usage}")
        state["openai_plain"] = text

    @check("openai chat stream: several chunks that add up to the plain answer")
    def _():
        stream = oai.chat.completions.create(
            model=OPENAI_MODEL, messages=messages("hello from openai"), stream=True
        )
        parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
        expect(len(parts) >= 3, f"only {len(parts)} chunks")
        expect("".join(parts) == state.get("openai_plain"), f"streamed {''.join(parts)!r}")

    @check("openai embeddings (base64 on the wire) decode to vectors")
    def _():
        e = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        expect(len(e.data) == 2 and len(e.data[0].embedding) > 0, f"embeddings {e}")

    @check("openai file upload")
    def _():
        lines = [
            {
                "custom_id": f"oa-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": OPENAI_MODEL, "messages": messages(f"batch question {i}")},
            }
            for i in range(5)
        ]
        state["openai_lines"] = lines
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        f = oai.files.create(file=("sdk_check.jsonl", data), purpose="batch")
        expect(f.id and f.bytes == len(data), f"file {f}")
        expect(oai.files.retrieve(f.id).id == f.id, "retrieve returned another file")
        state["openai_file"] = f.id

    @check("openai batch create, poll to completed")
    def _():
        b = oai.batches.create(
            input_file_id=state["openai_file"],
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"check": "sdk"},
        )
        expect(b.status == "validating", f"new batch status {b.status}")
        done = wait_for(
            lambda: oai.batches.retrieve(b.id),
            lambda x: x.status in ("completed", "failed", "expired", "cancelled"),
            f"batch {b.id}",
        )
        expect(done.status == "completed", f"batch ended {done.status}: {done.errors}")
        expect(done.request_counts.total == 5 and done.request_counts.completed == 5, f"counts {done.request_counts}")
        expect(any(x.id == b.id for x in oai.batches.list(limit=100).data), "batch missing from list")
        state["openai_batch"] = done

    @check("openai batch results equal the synchronous answers")
    def _():
        done = state["openai_batch"]
        out = jsonl_lines(oai.files.content(done.output_file_id).text)
        expect(len(out) == 5, f"{len(out)} output lines")
        by_id = {line["custom_id"]: line for line in out}
        for line in state["openai_lines"]:
            got = by_id[line["custom_id"]]["response"]
            expect(got["status_code"] == 200, f"status {got['status_code']}")
            sync = oai.chat.completions.create(**line["body"])
            expect(
                got["body"]["choices"][0]["message"]["content"] == sync.choices[0].message.content,
                f"{line['custom_id']}: batch and sync answers differ",
            )

    # ----------------------------------------------------------- Mistral
    @check("mistral chat: answer echoes the prompt")
    def _():
        r = mis.chat.complete(model=MISTRAL_MODEL, messages=messages("bonjour from mistral"))
        text = r.choices[0].message.content
        expect(text and "bonjour from mistral" in text, f"unexpected content {text!r}")
        expect(r.usage.prompt_tokens > 0, f"usage {r.usage}")
        state["mistral_plain"] = text

    @check("mistral chat stream: several chunks that add up to the plain answer")
    def _():
        parts = []
        with mis.chat.stream(model=MISTRAL_MODEL, messages=messages("bonjour from mistral")) as events:
            for event in events:
                choice = event.data.choices[0]
                if isinstance(choice.delta.content, str):
                    parts.append(choice.delta.content)
        expect(len(parts) >= 3, f"only {len(parts)} chunks")
        expect("".join(parts) == state.get("mistral_plain"), f"streamed {''.join(parts)!r}")

    @check("mistral file upload")
    def _():
        lines = [
            {"custom_id": f"mi-{i}", "body": {"messages": messages(f"question mistral {i}")}}
            for i in range(4)
        ]
        state["mistral_lines"] = lines
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        f = mis.files.upload(file={"file_name": "sdk_check.jsonl", "content": data}, purpose="batch")
        expect(f.id and f.size_bytes == len(data), f"file {f}")
        state["mistral_file"] = f.id

    @check("mistral batch job create, poll to SUCCESS")
    def _():
        job = mis.batch.jobs.create(
            input_files=[state["mistral_file"]],
            endpoint="/v1/chat/completions",
            model=MISTRAL_MODEL,
            metadata={"check": "sdk"},
        )
        expect(str(job.status) == "QUEUED", f"new job status {job.status}")
        done = wait_for(
            lambda: mis.batch.jobs.get(job_id=job.id),
            lambda x: str(x.status) in ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"),
            f"job {job.id}",
        )
        expect(str(done.status) == "SUCCESS", f"job ended {done.status}: {done.errors}")
        expect(done.succeeded_requests == 4, f"succeeded {done.succeeded_requests}")
        listed = mis.batch.jobs.list(page_size=100)
        expect(any(j.id == job.id for j in listed.data or []), "job missing from list")
        state["mistral_job"] = done

    @check("mistral batch results equal the synchronous answers")
    def _():
        done = state["mistral_job"]
        raw = mis.files.download(file_id=done.output_file)
        out = jsonl_lines(raw.read().decode())
        by_id = {line["custom_id"]: line for line in out}
        expect(len(by_id) == 4, f"{len(by_id)} output lines")
        for line in state["mistral_lines"]:
            got = by_id[line["custom_id"]]["response"]
            sync = mis.chat.complete(model=MISTRAL_MODEL, messages=line["body"]["messages"])
            expect(
                got["body"]["choices"][0]["message"]["content"] == sync.choices[0].message.content,
                f"{line['custom_id']}: batch and sync answers differ",
            )

    @check("mistral inline batch with outputs on get(inline=True)")
    def _():
        job = mis.batch.jobs.create(
            requests=[{"custom_id": "inline-1", "body": {"messages": messages("inline question")}}],
            endpoint="/v1/chat/completions",
            model=MISTRAL_MODEL,
        )
        done = wait_for(
            lambda: mis.batch.jobs.get(job_id=job.id, inline=True),
            lambda x: str(x.status) in ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"),
            f"inline job {job.id}",
        )
        expect(str(done.status) == "SUCCESS", f"inline job ended {done.status}")
        outputs = done.outputs or []
        expect(len(outputs) == 1, f"outputs {outputs}")
        sync = mis.chat.complete(model=MISTRAL_MODEL, messages=messages("inline question"))
        got = outputs[0]["response"]["body"]["choices"][0]["message"]["content"]
        expect(got == sync.choices[0].message.content, "inline and sync answers differ")

    if DEFERRED:
        deferred_checks(state)

    passed = sum(1 for _, ok in results if ok)
    failed = len(results) - passed
    print(f"sdk_check: {passed} passed, {failed} failed")
    return 1 if failed else 0


def deferred_checks(state):
    """carpool only: SDK calls deferred without changing the calling code."""
    oai_deferred = OpenAI(base_url=BASE + "/defer/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    mis = Mistral(api_key=KEY, server_url=BASE, timeout_ms=int(TIMEOUT * 1000))

    @check("carpool: openai chat through /defer/v1 is served by a batch, same answer")
    def _():
        raw = oai_deferred.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL, messages=messages("hello from openai")
        )
        expect(raw.headers.get("carpool-served-by") == "batch", f"headers {dict(raw.headers)}")
        expect(raw.headers.get("carpool-request-id", "").startswith("cpr_"), "no request id")
        answer = raw.parse()
        expect(answer.choices[0].message.content == state.get("openai_plain"), "deferred answer differs")

    @check("carpool: an openai client with a project defers in a window and job of its own")
    def _():
        # tests/sdk.rs checks that the job's batch calls carried the project.
        scoped = OpenAI(
            base_url=BASE + "/v1",
            api_key=KEY,
            organization="org_sdk",
            project="proj_sdk",
            default_headers={"Carpool-Mode": "wait"},
            max_retries=0,
            timeout=TIMEOUT,
        )
        raw = scoped.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL, messages=messages("hello from openai")
        )
        expect(raw.headers.get("carpool-served-by") == "batch", f"headers {dict(raw.headers)}")
        expect(raw.parse().choices[0].message.content == state.get("openai_plain"), "answer differs")

    @check("carpool: openai streamed chat through /defer/v1 adds up to the plain answer")
    def _():
        stream = oai_deferred.chat.completions.create(
            model=OPENAI_MODEL, messages=messages("hello from openai"), stream=True
        )
        parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
        expect("".join(parts) == state.get("openai_plain"), f"streamed {''.join(parts)!r}")

    @check("carpool: mistral chat with Carpool-Mode: wait is served by a batch, same answer")
    def _():
        plain = mis.chat.complete(model=MISTRAL_MODEL, messages=messages("deferred mistral question"))
        deferred = mis.chat.complete(
            model=MISTRAL_MODEL,
            messages=messages("deferred mistral question"),
            http_headers={"Carpool-Mode": "wait"},
        )
        expect(
            deferred.choices[0].message.content == plain.choices[0].message.content,
            "deferred answer differs",
        )


if __name__ == "__main__":
    sys.exit(main())
