#!/usr/bin/env python3
"""One chat call through carpool with the official `openai` SDK, as an app
with a short read timeout makes it (the SDK declares it to carpool as
`x-stainless-read-timeout`, its deadline).

    python tests/sdk_deadlines.py CARPOOL_BASE TIMEOUT_SECONDS

Sends `Carpool-Mode: wait` and no retries, and prints one JSON line: how
the call was served, how long it took, its request id and its answer; or
the SDK's error if it gave up. Driven by tests/deadlines.rs.
"""

import json
import sys
import time

from openai import OpenAI

base, timeout = sys.argv[1].rstrip("/"), float(sys.argv[2])
client = OpenAI(
    base_url=base + "/v1",
    api_key="sk-sdk-deadline",
    default_headers={"Carpool-Mode": "wait"},
    max_retries=0,
    timeout=timeout,
)
started = time.monotonic()
try:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"answer within {timeout:g} seconds"}],
    )
except Exception as err:  # noqa: BLE001 - reported to the driving test
    print(json.dumps({"error": f"{type(err).__name__}: {err}",
                      "elapsed": time.monotonic() - started}))
    sys.exit(0)
completion = raw.parse()
print(json.dumps({
    "served_by": raw.headers.get("carpool-served-by"),
    "request_id": raw.headers.get("carpool-request-id"),
    "elapsed": time.monotonic() - started,
    "content": completion.choices[0].message.content,
}))
