"""Malformed and hostile requests, sent as raw HTTP: each gets the right status with an OpenAI-shaped
error body, and the server keeps answering good requests afterwards.

Every row of BAD is one request. After each row the test waits for the engine to be idle again and
checks that a good request still gets a correct answer; `test_still_serving_after_the_table` checks
once more at the end.
"""

import http.client
import json
import time

import pytest

from conftest import FIXTURES, Server

MODEL = "v3-tiny"
KEY = "sesame"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
ANY = object()  # a `param` or `code` that is not checked


@pytest.fixture(scope="module")
def plain():
    """Default limits (4 MiB body, max-queue 256), no API key."""
    server = Server("--model", str(FIXTURES / "v3"), "--served-model-name", MODEL, "--kv-cache-memory", "16MiB")
    server.errors_at_start = server_errors(server)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed():
    server = Server(
        "--model", str(FIXTURES / "v3"), "--served-model-name", MODEL, "--kv-cache-memory", "16MiB", "--api-key", KEY
    )
    server.errors_at_start = server_errors(server)
    yield server
    server.stop()


def send(port, method, path, body=None, headers=None, timeout=60):
    """(status, headers, body bytes) of one request on a fresh connection.

    A body the server refuses early (413) may hit a closed socket while it is still being sent; the
    response is read all the same, as a client that sends a large body must do."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    try:
        try:
            conn.request(method, path, body=body, headers=hdrs)
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def chat(**fields):
    return {"model": MODEL, "messages": HI, "max_tokens": 4, **fields}


def cmpl(**fields):
    return {"model": MODEL, "prompt": "Once upon", "max_tokens": 4, **fields}


def row(id, body, status=400, param=ANY, *, path=CHAT, method="POST", headers=None, code=ANY, server="plain",
        timeout=30, marks=()):
    return pytest.param(
        dict(method=method, path=path, body=body, headers=headers, status=status, param=param, code=code,
             server=server, timeout=timeout),
        id=id,
        marks=marks,
    )


NESTED = "[" * 100_000
TEN_MB = b'{"model": "v3-tiny", "messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}'

BAD = [
    # --- the body is not a JSON object ---
    row("invalid-json", "not json"),
    row("truncated-json", '{"model": "v3-tiny", "messages": ['),
    row("empty-body", b""),
    row("json-array", [1, 2, 3]),
    row("json-string", '"hello"'),
    row("json-null", "null"),
    row("json-number", "42"),
    row("trailing-garbage", json.dumps(chat()) + "xyz"),
    row("utf8-bom", "\ufeff" + json.dumps(chat())),
    row("invalid-utf8-bytes", b'{"model": "v3-tiny", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}'),
    row("lone-surrogate-escape", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    row("number-out-of-range", '{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}'),
    row("nested-arrays-100k", NESTED),
    row("nested-objects-100k", '{"messages": ' + '{"a": ' * 100_000),
    row("body-10MB", TEN_MB, 413, None, code="request_too_large"),
    # --- messages ---
    row("messages-missing", {"model": MODEL}),
    row("messages-empty", chat(messages=[]), param="messages"),
    row("messages-null", chat(messages=None), param="messages"),
    row("messages-string", chat(messages="hi"), param="messages"),
    row("messages-object", chat(messages={"role": "user", "content": "hi"}), param="messages"),
    row("message-not-object", chat(messages=["hi"]), param="messages[0]"),
    row("message-null", chat(messages=[None]), param="messages[0]"),
    row("role-missing", chat(messages=[{"content": "hi"}]), param="messages[0]"),
    row("role-unknown", chat(messages=[{"role": "wizard", "content": "hi"}]), param="messages[0].role"),
    row("role-empty", chat(messages=[{"role": "", "content": "hi"}]), param="messages[0].role"),
    row("role-number", chat(messages=[{"role": 1, "content": "hi"}]), param="messages[0].role"),
    row("content-number", chat(messages=[{"role": "user", "content": 42}]), param="messages[0].content"),
    row("content-bool", chat(messages=[{"role": "user", "content": True}]), param="messages[0].content"),
    row("content-object", chat(messages=[{"role": "user", "content": {"text": "hi"}}]), param="messages[0].content"),
    row("user-content-missing", chat(messages=[{"role": "user"}]), param="messages[0].content"),
    row(
        "content-part-unknown-type",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
        param="messages[0].content[0]",
    ),
    row("content-part-without-text", chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        param="messages[0].content[0]"),
    row("content-part-text-number", chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        param="messages[0].content"),
    row("name-number", chat(messages=[{"role": "user", "content": "hi", "name": 5}]), param="messages[0].name"),
    row("template-rejects-assistant-without-content", chat(messages=[{"role": "assistant"}]), param="messages"),
    row(
        "tool-calls-garbage",
        chat(messages=[HI[0], {"role": "assistant", "content": None, "tool_calls": "garbage"}, HI[0]]),
        param="messages",
    ),
    row("prompt-over-context", chat(messages=[{"role": "user", "content": "word " * 5000}]), param="messages",
        code="context_length_exceeded"),
    row("chat-template-kwargs-list", chat(chat_template_kwargs=[1]), param="chat_template_kwargs"),
    row("add-generation-prompt-string", chat(add_generation_prompt="yes"), param="add_generation_prompt"),
    # --- model ---
    row("model-unknown", chat(model="gpt-9"), 404, "model", code="model_not_found"),
    row("model-empty", chat(model=""), 404, "model", code="model_not_found"),
    row("model-number", chat(model=5), param="model"),
    # --- max_tokens ---
    row("max-tokens-negative", chat(max_tokens=-5), param="max_tokens"),
    row("max-tokens-zero", chat(max_tokens=0), param="max_tokens"),
    row("max-tokens-huge", chat(max_tokens=10**12), param="messages", code="context_length_exceeded"),
    row("max-tokens-i64-max", chat(max_tokens=2**63 - 1), param="messages", code="context_length_exceeded"),
    row("max-tokens-overflows-i64", chat(max_tokens=2**70), param="max_tokens"),
    row("max-tokens-string", chat(max_tokens="10"), param="max_tokens"),
    row("max-tokens-float", chat(max_tokens=1.5), param="max_tokens"),
    row("max-completion-tokens-negative", chat(max_completion_tokens=-1)),
    # --- sampling ranges and types ---
    row("temperature-negative", chat(temperature=-1), param="temperature"),
    row("temperature-too-high", chat(temperature=2.5), param="temperature"),
    row("temperature-inf-as-f32", chat(temperature=1e39), param="temperature"),
    row("temperature-string", chat(temperature="hot"), param="temperature"),
    row("top-p-above-1", chat(top_p=1.5), param="top_p"),
    row("top-p-negative", chat(top_p=-0.1), param="top_p"),
    row("top-k-negative", chat(top_k=-2), param="top_k"),
    row("min-p-above-1", chat(min_p=1.5), param="min_p"),
    row("presence-penalty-low", chat(presence_penalty=-3), param="presence_penalty"),
    row("frequency-penalty-high", chat(frequency_penalty=2.5), param="frequency_penalty"),
    row("repetition-penalty-zero", chat(repetition_penalty=0), param="repetition_penalty"),
    row("seed-string", chat(seed="42"), param="seed"),
    row("seed-above-i64", chat(seed=2**64), param="seed"),
    row("n-10000", chat(n=10_000), param="n"),
    row("n-zero", chat(n=0), param="n"),
    row("n-negative", chat(n=-1), param="n"),
    row("stream-string", chat(stream="yes"), param="stream"),
    row("stream-options-string", chat(stream=True, stream_options="x"), param="stream_options"),
    # --- logprobs ---
    row("top-logprobs-21", chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    row("top-logprobs-negative", chat(logprobs=True, top_logprobs=-1), param="top_logprobs"),
    row("top-logprobs-without-logprobs", chat(top_logprobs=3), param="top_logprobs"),
    row("logprobs-string", chat(logprobs="yes"), param="logprobs"),
    # --- logit_bias ---
    row("logit-bias-non-numeric-key", chat(logit_bias={"abc": 1}), param="logit_bias"),
    row("logit-bias-negative-key", chat(logit_bias={"-1": 1}), param="logit_bias"),
    row("logit-bias-float-key", chat(logit_bias={"1.5": 1}), param="logit_bias"),
    row("logit-bias-out-of-vocab", chat(logit_bias={"99999999": 1}), param="logit_bias"),
    row("logit-bias-value-high", chat(logit_bias={"5": 500}), param="logit_bias"),
    row("logit-bias-value-low", chat(logit_bias={"5": -101}), param="logit_bias"),
    row("logit-bias-value-string", chat(logit_bias={"5": "x"}), param="logit_bias.5"),
    row("logit-bias-list", chat(logit_bias=[1, 2]), param="logit_bias"),
    # --- stop ---
    row("stop-100-entries", chat(stop=[f"s{i}" for i in range(100)]), param="stop"),
    row("stop-empty-string", chat(stop=""), param="stop"),
    row("stop-list-with-empty-string", chat(stop=["a", ""]), param="stop"),
    row("stop-number", chat(stop=5), param="stop"),
    row("stop-list-of-numbers", chat(stop=[1, 2]), param="stop"),
    row("stop-token-ids-negative", chat(stop_token_ids=[-1]), param="stop_token_ids[0]"),
    # --- text completions ---
    row("completion-prompt-missing", {"model": MODEL}, path=COMPLETIONS),
    row("completion-prompt-empty-string", cmpl(prompt=""), param="prompt", path=COMPLETIONS),
    row("completion-prompt-empty-list", cmpl(prompt=[]), param="prompt", path=COMPLETIONS),
    row("completion-prompt-empty-token-list", cmpl(prompt=[[]]), param="prompt", path=COMPLETIONS),
    row("completion-prompt-list-with-empty-string", cmpl(prompt=["a", ""]), param="prompt", path=COMPLETIONS),
    row("completion-token-out-of-vocab", cmpl(prompt=[100_000]), param="prompt", path=COMPLETIONS),
    row("completion-token-negative", cmpl(prompt=[-1]), param="prompt", path=COMPLETIONS),
    row("completion-token-above-u32", cmpl(prompt=[2**33]), param="prompt", path=COMPLETIONS),
    row("completion-token-float", cmpl(prompt=[1.5]), param="prompt", path=COMPLETIONS),
    row("completion-prompt-mixed-list", cmpl(prompt=["a", 1]), param="prompt", path=COMPLETIONS),
    row("completion-prompt-object", cmpl(prompt={"a": 1}), param="prompt", path=COMPLETIONS),
    row("completion-prompt-null", cmpl(prompt=None), param="prompt", path=COMPLETIONS),
    row("completion-logprobs-6", cmpl(logprobs=6), param="logprobs", path=COMPLETIONS),
    row("completion-logprobs-bool", cmpl(logprobs=True), param="logprobs", path=COMPLETIONS),
    row("completion-echo", cmpl(echo=True), param="echo", path=COMPLETIONS),
    row("completion-n-10000", cmpl(n=10_000), param="n", path=COMPLETIONS),
    row("completion-ids-over-context", cmpl(prompt=[5] * 5000), path=COMPLETIONS, code="context_length_exceeded"),
    row(
        "completion-text-over-context-names-prompt",
        cmpl(prompt="word " * 5000),
        param="prompt",
        path=COMPLETIONS,
        code="context_length_exceeded",
    ),
    row(
        "completion-many-prompts-times-n-flood-the-queue",
        cmpl(prompt=[[5, 6]] * 300, n=128, max_tokens=1),
        param="prompt",
        path=COMPLETIONS,
        timeout=10,
    ),
    # --- API key (server started with --api-key) ---
    row("key-missing", chat(), 401, None, code="invalid_api_key", server="keyed"),
    row("key-wrong", chat(), 401, None, headers={"Authorization": "Bearer wrong"}, code="invalid_api_key",
        server="keyed"),
    row("key-empty-bearer", chat(), 401, None, headers={"Authorization": "Bearer "}, server="keyed"),
    row("key-without-scheme", chat(), 401, None, headers={"Authorization": KEY}, server="keyed"),
    row("key-basic-auth", chat(), 401, None, headers={"Authorization": "Basic c2VzYW1lOg=="}, server="keyed"),
    row("key-prefix-only", chat(), 401, None, headers={"Authorization": "Bearer sesam"}, server="keyed"),
    row("key-in-query-string", chat(), 401, None, path=CHAT + "?api_key=sesame", server="keyed"),
    row("key-missing-on-models", None, 401, None, method="GET", path="/v1/models", server="keyed"),
    row("key-missing-on-completions", cmpl(), 401, None, path=COMPLETIONS, server="keyed"),
    # --- routes and methods ---
    row("unknown-route", None, 404, None, method="GET", path="/v1/nope"),
    row("unknown-route-post", chat(), 404, None, path="/v2/chat/completions"),
    row("path-traversal", None, 404, None, method="GET", path="/v1/../../etc/passwd"),
    row("get-on-chat", None, 405, None, method="GET", path=CHAT),
    row("get-on-completions", None, 405, None, method="GET", path=COMPLETIONS),
    row("delete-on-chat", None, 405, None, method="DELETE", path=CHAT),
    row("put-on-completions", cmpl(), 405, None, method="PUT", path=COMPLETIONS),
    row("post-on-models", {}, 405, None, path="/v1/models"),
    row("post-on-health", {}, 405, None, path="/health"),
]

# Valid if unusual requests: 200 with a well-formed answer.
ODD_BUT_VALID = [
    row("content-type-text-plain", chat(), 200, headers={"Content-Type": "text/plain"}),
    row("content-type-missing", chat(), 200, headers={"Content-Type": ""}),
    row("model-null", chat(model=None), 200),
    row("stop-null", chat(stop=None), 200),
    row("stop-empty-list", chat(stop=[]), 200),
    row("content-parts-empty-list", chat(messages=[{"role": "user", "content": []}]), 200),
    row("jinja-in-content-is-text", chat(messages=[{"role": "user", "content": "{{ raise_exception('x') }}{% for %}"}]),
        200),
    row("nul-character-in-content", chat(messages=[{"role": "user", "content": "a\u0000b"}]), 200),
    row("chat-template-kwargs-cannot-replace-messages",
        chat(chat_template_kwargs={"messages": 5, "add_generation_prompt": "x"}), 200),
    row("tools-not-a-list", chat(tools="x"), 200),
    row("developer-role", chat(messages=[{"role": "developer", "content": "be brief"}, HI[0]]), 200),
    row("duplicate-key-last-wins", '{"model": "v3-tiny", "messages": 5, "max_tokens": 4, "messages": [{"role": "user", '
        '"content": "hi"}]}', 200),
    row("stream-null", chat(stream=None), 200),
    row("key-with-trailing-space", chat(), 200, headers={"Authorization": "Bearer sesame "}, server="keyed"),
]


def metric(server, name):
    try:
        return server.metric(name)
    except KeyError:
        return 0.0


def wait_idle(server, timeout=120.0):
    """Waits until no request runs or waits in the engine (an aborted flood takes a while to drain)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metric(server, "mlaserve_requests_running") + metric(server, "mlaserve_requests_waiting") == 0:
            return
        time.sleep(0.1)
    pytest.fail("the engine did not return to idle")


def assert_good_request_works(server, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, _, body = send(server.port, "POST", CHAT, chat(temperature=0), headers, timeout=60)
    assert status == 200, body[:500]
    answer = json.loads(body)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 4


def assert_error_shape(body: bytes):
    payload = json.loads(body)
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def server_for(case, plain, keyed):
    return (keyed, KEY) if case["server"] == "keyed" else (plain, None)


@pytest.mark.parametrize("case", BAD)
def test_bad_request_is_refused_and_the_server_survives(case, plain, keyed):
    server, key = server_for(case, plain, keyed)
    try:
        status, headers, body = send(
            server.port, case["method"], case["path"], case["body"], case["headers"], case["timeout"]
        )
        assert status == case["status"], (status, body[:500])
        error = assert_error_shape(body)
        if case["param"] is not ANY:
            assert error["param"] == case["param"], error
        if case["code"] is not ANY:
            assert error["code"] == case["code"], error
        if status == 401:
            assert error["type"] == "authentication_error"
        elif status < 500:
            assert error["type"] == "invalid_request_error", error
        assert headers.get("x-request-id")
    finally:
        wait_idle(server)
    assert_good_request_works(server, key)


@pytest.mark.parametrize("case", ODD_BUT_VALID)
def test_odd_but_valid_request_is_answered(case, plain, keyed):
    server, key = server_for(case, plain, keyed)
    status, _, body = send(server.port, case["method"], case["path"], case["body"], case["headers"], 60)
    assert status == 200, body[:500]
    answer = json.loads(body)
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")
    assert answer["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "method, path, headers, status",
    [
        ("GET", "/v1/" + "a" * 100_000, {}, 414),
        ("GET", "/health", {"X-Big": "a" * 1_000_000}, 431),
    ],
    ids=["url-100k", "header-1MB"],
)
def test_oversized_request_heads_are_refused_by_the_http_layer(plain, method, path, headers, status):
    """Refused by hyper before routing, so these answers have no JSON body."""
    got, _, _ = send(plain.port, method, path, None, headers, 30)
    assert got == status
    assert_good_request_works(plain)


def server_errors(server) -> dict[str, float]:
    """The 5xx answers counted so far, by status. A slow start counts one: `/ready` answers 503 while
    the model loads, and the fixture polls it."""
    _, _, text = send(server.port, "GET", "/metrics", timeout=10)
    prefix = 'mlaserve_http_requests_total{status="5'
    return {line.split()[0]: float(line.split()[1]) for line in text.decode().splitlines() if line.startswith(prefix)}


def test_still_serving_after_the_table(plain, keyed):
    """After every row above: both servers answer, nothing is left running and no 5xx was counted."""
    for server, key in [(plain, None), (keyed, KEY)]:
        wait_idle(server)
        assert_good_request_works(server, key)
        assert server.proc.poll() is None
        assert server_errors(server) == server.errors_at_start
