"""The built-in demo model end to end: `mlaserve` with no --model answers held-out arithmetic
questions through the HTTP API, thinking in `reasoning_content` and answering in `content`."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from conftest import ROOT, Server

HELDOUT = ROOT / "tests" / "data" / "demo_heldout.jsonl"
DEMO_MODEL = ROOT / "models" / "mlaserve-demo"
NUMBER = re.compile(r"-?\d[\d,]*")


@pytest.fixture(scope="module")
def demo_server():
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("models/mlaserve-demo is not trained yet (tools/demo/train.py)")
    server = Server()  # no --model: the demo model shipped with the repository
    yield server
    server.stop()


def last_number(text):
    found = NUMBER.findall(text or "")
    return int(found[-1].replace(",", "")) if found else None


def ask(server, question):
    """Streams one question at temperature 0; returns (reasoning, content)."""
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    reasoning, content = "", ""
    stream = client.chat.completions.create(
        model="mlaserve-demo",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=400,
        stream=True,
    )
    for chunk in stream:
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    return reasoning, content


def run_all(server, problems, concurrency):
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda p: ask(server, p["question"]), problems))


def test_demo_model_is_served_under_its_name(demo_server):
    client = OpenAI(base_url=demo_server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["mlaserve-demo"]


def test_heldout_arithmetic_accuracy_and_batch_invariance(demo_server):
    problems = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    assert len(problems) == 200
    alone = run_all(demo_server, problems, concurrency=1)
    batched = run_all(demo_server, problems, concurrency=16)

    for (reasoning, content), p in zip(alone, problems):
        assert reasoning.strip(), f"no reasoning for {p['question']!r}"
        assert content.strip(), f"no answer for {p['question']!r}"
    correct = [last_number(content) == p["answer"] for (_, content), p in zip(alone, problems)]
    accuracy = sum(correct) / len(problems)
    wrong = [(p["question"], p["answer"], c) for ok, p, (_, c) in zip(correct, problems, alone) if not ok]
    print(f"demo model accuracy: {accuracy:.1%}; wrong: {wrong[:10]}")
    assert accuracy >= 0.95, wrong
    assert alone == batched, "answers differ between concurrency 1 and 16"
