"""The OpenAI API of the real binary, through the official `openai` client and raw HTTP."""

import http.client
import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

MODEL = "v3-tiny"
# What the R1 template renders for one user message (the fixtures ship that template).
R1_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>{}<｜Assistant｜><think>\n"


def client(server, key="unused"):
    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat(server, content="Tell me a story", **kw):
    kw.setdefault("max_tokens", 24)
    return client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw
    )


def collect_stream(stream):
    """(reasoning, content, finish_reason, usage, roles) of a one-choice chat stream."""
    reasoning, content, finish, usage, roles = "", "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            if d.role:
                roles.append(d.role)
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            finish = choice.finish_reason or finish
    return reasoning, content, finish, usage, roles


def test_models_lists_the_served_model(v3_server):
    assert [m.id for m in client(v3_server).models.list().data] == [MODEL]


def test_streaming_matches_non_streaming(v3_server):
    full = chat(v3_server, temperature=0)
    message = full.choices[0].message
    reasoning, content, finish, usage, roles = collect_stream(
        chat(v3_server, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    assert roles == ["assistant"]
    assert reasoning == (message.reasoning_content or "")
    assert content == (message.content or "")
    assert reasoning + content, "the model produced no text"
    assert finish == full.choices[0].finish_reason == "length"
    assert usage.completion_tokens == full.usage.completion_tokens == 24
    assert usage.prompt_tokens == full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 24


def test_reasoning_is_split_at_the_closing_tag(v3_server):
    """The raw completion of the same prompt and seed, split at `</think>`, is what chat returns."""
    c = client(v3_server)
    question = "Explain"
    for seed in range(200):
        raw = c.completions.create(
            model=MODEL, prompt=R1_PROMPT.format(question), max_tokens=40, temperature=1.0, seed=seed
        ).choices[0].text
        if "</think>" in raw and raw.split("</think>", 1)[1].strip():
            break
    else:
        pytest.fail("no seed made the model write </think>")
    want_reasoning, want_content = raw.split("</think>", 1)
    kw = dict(max_tokens=40, temperature=1.0, seed=seed)
    message = chat(v3_server, question, **kw).choices[0].message
    assert message.reasoning_content == want_reasoning
    assert message.content == want_content.lstrip()
    reasoning, content, _, _, _ = collect_stream(chat(v3_server, question, stream=True, **kw))
    assert (reasoning, content) == (want_reasoning, want_content.lstrip())


def test_n_choices_are_indexed_and_counted(v3_server):
    r = chat(v3_server, n=2, temperature=1.0, seed=11, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 24
    texts = [(c.message.reasoning_content or "") + (c.message.content or "") for c in r.choices]
    assert texts[0] != texts[1]
    finished = {}
    for chunk in chat(v3_server, n=2, temperature=1.0, seed=11, max_tokens=12, stream=True):
        for c in chunk.choices:
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert finished == {0: "length", 1: "length"}


def test_seed_reproduces_and_differs(v3_server):
    a = chat(v3_server, temperature=1.0, seed=42).choices[0].message
    b = chat(v3_server, temperature=1.0, seed=42).choices[0].message
    c = chat(v3_server, temperature=1.0, seed=43).choices[0].message
    assert (a.reasoning_content, a.content) == (b.reasoning_content, b.content)
    assert (a.reasoning_content, a.content) != (c.reasoning_content, c.content)


def test_stop_strings_end_the_output_before_them(v3_server):
    c = client(v3_server)
    text = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0).choices[0].text
    stop = text[6:9]
    r = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, temperature=0, stop=stop, stream=True)
        if ch.choices
    )
    assert streamed == r.choices[0].text


def test_completions_take_token_ids(v3_server):
    c = client(v3_server)
    by_text = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0)
    ids = [57, 58, 59]
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.usage.prompt_tokens == 3
    assert by_text.choices[0].text and by_ids.choices[0].finish_reason == "length"


def test_logprobs_with_alternatives(v3_server):
    r = chat(v3_server, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    legacy = client(v3_server).completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=3.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(presence_penalty=-3), "presence_penalty"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(n=10_000), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=1_000_000), "messages"),
        (dict(logit_bias={"99999999": 1}), "logit_bias"),
    ],
)
def test_invalid_parameters_are_400_naming_the_param(v3_server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(v3_server, **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_unknown_role_and_empty_messages(v3_server):
    c = client(v3_server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[])


def test_context_length_exceeded(v3_server):
    with pytest.raises(openai.BadRequestError) as e:
        chat(v3_server, "word " * 5000)
    assert e.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(v3_server):
    with pytest.raises(openai.NotFoundError) as e:
        client(v3_server).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


def test_api_key_and_body_limit(keyed_server):
    name = client(keyed_server, "sesame").models.list().data[0].id
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, "wrong").models.list()
    missing = raw_post(keyed_server, "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status == 401 and json.loads(missing.read())["error"]["type"] == "authentication_error"
    ok = client(keyed_server, "sesame").chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert ok.usage.completion_tokens == 3
    with pytest.raises(openai.APIStatusError) as e:
        client(keyed_server, "sesame").chat.completions.create(
            model=name, messages=[{"role": "user", "content": "x" * 100_000}], max_tokens=3
        )
    assert e.value.status_code == 413


def raw_post(server, path, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})
    return conn.getresponse()


def test_raw_sse_framing(v3_server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = raw_post(v3_server, "/v1/chat/completions", body)
    assert r.status == 200
    assert r.getheader("content-type").startswith("text/event-stream")
    assert r.getheader("x-request-id")
    raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])


def test_errors_have_openai_shape_for_bad_json_routes_and_methods(v3_server):
    r = raw_post(v3_server, "/v1/chat/completions", "not json")
    body = json.loads(r.read())
    assert r.status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    conn = http.client.HTTPConnection("127.0.0.1", v3_server.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=b"{\"messages\": [", headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 400
    for method, path, status in [("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)]:
        conn = http.client.HTTPConnection("127.0.0.1", v3_server.port, timeout=10)
        conn.request(method, path)
        r = conn.getresponse()
        assert r.status == status and "error" in json.loads(r.read())


def test_health_ready_and_metrics(v3_server):
    for path in ["/health", "/ready"]:
        with urllib.request.urlopen(v3_server.url + path) as r:
            assert r.status == 200
    with urllib.request.urlopen(v3_server.url + "/metrics") as r:
        text = r.read().decode()
    for name in [
        "mlaserve_requests_running",
        "mlaserve_requests_waiting",
        "mlaserve_kv_blocks_used",
        "mlaserve_kv_blocks_total",
        "mlaserve_prefix_cache_hit_tokens_total",
        "mlaserve_preemptions_total",
        "mlaserve_prompt_tokens_total",
        "mlaserve_generation_tokens_total",
        "mlaserve_time_to_first_token_seconds_bucket",
        "mlaserve_time_per_output_token_seconds_count",
        "mlaserve_e2e_request_latency_seconds_sum",
        'mlaserve_http_requests_total{status="200"}',
    ]:
        assert name in text, name


def test_disconnect_frees_the_blocks(v3_server):
    idle = v3_server.metric("mlaserve_kv_blocks_used")
    stream = chat(v3_server, "Go on and on", max_tokens=3000, temperature=1.0, seed=1, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert v3_server.metric("mlaserve_requests_running") >= 1
    stream.close()
    deadline = time.time() + 20
    while time.time() < deadline and v3_server.metric("mlaserve_kv_blocks_used") != idle:
        time.sleep(0.05)
    assert v3_server.metric("mlaserve_kv_blocks_used") == idle
    assert v3_server.metric("mlaserve_requests_running") == 0
