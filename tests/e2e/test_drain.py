"""SIGTERM drains: readiness turns false and new requests get 503 while the streams in flight run
to their end, then the process exits 0."""

import json
import signal
import threading
import time
import urllib.error
import urllib.request

from conftest import FIXTURES, Server


def status_of(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


def test_sigterm_finishes_streams_refuses_new_work_and_exits_cleanly():
    server = Server("--model", str(FIXTURES / "v3"), "--shutdown-grace", "60")
    body = {
        "messages": [{"role": "user", "content": "a long story"}],
        "max_tokens": 1000,
        "temperature": 1.0,
        "seed": 3,
        "ignore_eos": True,
        "stream": True,
    }
    req = urllib.request.Request(
        server.url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    stream = urllib.request.urlopen(req, timeout=120)
    first = stream.readline()
    assert first.startswith(b"data: ")

    server.proc.send_signal(signal.SIGTERM)
    rest = []
    reader = threading.Thread(target=lambda: rest.append(stream.read()))
    reader.start()
    # While the stream still runs: not ready, and new work is refused with 503 + Retry-After.
    deadline = time.time() + 5
    while (ready := status_of(server.url + "/ready")[0]) == 200 and time.time() < deadline:
        time.sleep(0.01)
    refused, headers = status_of(
        server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    reader.join(timeout=120)
    assert ready == 503
    assert refused == 503 and headers.get("retry-after") == "1"
    assert rest and rest[0].rstrip().endswith(b"data: [DONE]"), "the stream in flight was cut"
    assert server.proc.wait(timeout=30) == 0
    server.log.close()
