#!/usr/bin/env python3
"""Bounded load test of one mlaserve on loopback: many concurrent streaming chat clients for a fixed time.

    .venv/bin/python tests/load/load_test.py --duration 60 --clients 200

Starts `mlaserve` (MLASERVE_BIN, default target/debug/mlaserve) on the tiny tests/fixtures/v3 model with a
small admission queue, so that admission control is exercised. Each client loops until the time is up:
stream a chat with a random max_tokens in 16..128; a third of the streams hang up mid-stream on purpose;
a 503 is answered by waiting its Retry-After. Then it checks:

- no 5xx but 503s from admission control, and every 503 carries Retry-After; no other error status;
- every stream read to the end is well-formed SSE (one `data:` line of JSON per event, one id, one finish
  reason, the usage chunk) and ends in `data: [DONE]`; no request hangs;
- the server's RSS (VmRSS, sampled every second) stays below --max-rss-mib and shows no upward trend
  (after the first quarter of the run, the second half's peak is within 10% or 8 MiB of the first's);
- after the run the engine is idle and `mlaserve_kv_blocks_used` is back at its idle value;
- the server drains and exits 0 on SIGTERM.

It prints a summary (requests, completed, disconnected, 503s, tokens/s, p50/p99 TTFT, max RSS) and exits 1
when a check fails. Traffic goes to 127.0.0.1 only, and the run stops by itself.
"""

import argparse
import asyncio
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

try:  # the HTTP client the pinned `openai` release installs
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases ship httpx itself
    import httpx

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "v3-tiny"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    p.add_argument("--clients", type=int, default=200, help="concurrent streaming clients (default 200)")
    p.add_argument("--bin", default=os.environ.get("MLASERVE_BIN", str(ROOT / "target" / "debug" / "mlaserve")))
    p.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "v3"))
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    # Small enough that the run touches all of it early: the cache's pages count in RSS once written,
    # so a large one would read as growth for as long as new blocks are first used.
    p.add_argument("--kv-cache-memory", default="16MiB")
    p.add_argument("--disconnect-fraction", type=float, default=1 / 3)
    p.add_argument("--max-rss-mib", type=float, default=2048, help="fail above this server RSS")
    p.add_argument("--request-timeout", type=float, default=120, help="a stream taking longer counts as hung")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (ROOT / "target").mkdir(exist_ok=True)
        self.log_path = ROOT / "target" / f"load-server-{self.port}.log"
        self.log = open(self.log_path, "w")
        cmd = [
            args.bin, "--model", args.model, "--served-model-name", MODEL, "--port", str(self.port),
            "--max-queue", str(args.max_queue), "--max-num-seqs", str(args.max_num_seqs),
            "--kv-cache-memory", args.kv_cache_memory, "--shutdown-grace", "20",
        ]
        env = {**os.environ, "RUST_LOG": "warn"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"mlaserve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.proc.kill()
        sys.exit("mlaserve did not become ready")

    def metrics(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            out = {}
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    out[name] = float(value)
            return out

    def rss_kib(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def stop(self, timeout=30):
        """SIGTERM, then the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self.log.close()
        return code


class RssSampler(threading.Thread):
    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.samples, self.stopped = server, [], threading.Event()

    def run(self):
        start = time.time()
        while not self.stopped.is_set():
            kib = self.server.rss_kib()
            if kib is not None:
                self.samples.append((time.time() - start, kib / 1024))
            self.stopped.wait(1.0)


class Stats:
    def __init__(self):
        self.requests = 0
        self.completed = 0
        self.disconnected = 0
        self.unavailable = 0  # 503 from admission control
        self.tokens = 0  # token chunks the clients read
        self.ttft = []
        self.failures = []  # (kind, detail)

    def fail(self, kind, detail):
        if len(self.failures) < 1000:
            self.failures.append((kind, str(detail)[:500]))


def check_stream(raw: bytes, max_tokens: int):
    """Validates a complete SSE body; returns the completion tokens it reports."""
    if not raw.endswith(b"\n\n"):
        raise ValueError(f"the stream does not end with a blank line: {raw[-80:]!r}")
    events = raw.decode().split("\n\n")[:-1]
    if events[-1] != "data: [DONE]":
        raise ValueError(f"the stream does not end in [DONE]: {events[-1][:80]!r}")
    chunks = []
    for e in events[:-1]:
        if e.startswith(":"):  # SSE comment (keep-alive)
            continue
        if not e.startswith("data: ") or "\n" in e:
            raise ValueError(f"malformed event {e[:120]!r}")
        chunks.append(json.loads(e[len("data: "):]))
    if not chunks or chunks[0]["choices"][0]["delta"].get("role") != "assistant":
        raise ValueError("no leading role chunk")
    if {c["object"] for c in chunks} != {"chat.completion.chunk"} or len({c["id"] for c in chunks}) != 1:
        raise ValueError("chunks differ in object or id")
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    if len(finals) != 1 or finals[0] not in ("length", "stop"):
        raise ValueError(f"finish reasons {finals}")
    usage = chunks[-1].get("usage")
    if chunks[-1]["choices"] != [] or not usage:
        raise ValueError("no usage chunk at the end")
    n = usage["completion_tokens"]
    if not (1 <= n <= max_tokens) or (finals[0] == "length" and n != max_tokens):
        raise ValueError(f"completion_tokens {n} with finish {finals[0]} and max_tokens {max_tokens}")
    return n


def token_event(event: bytes) -> bool:
    """Whether an SSE event carries generated text (not the role chunk, not the final ones)."""
    if not event.startswith(b"data: {"):
        return False
    choices = json.loads(event[6:])["choices"]
    if not choices:
        return False
    delta = choices[0]["delta"]
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"))


async def client(i, http, url, deadline, args, stats):
    rng = random.Random(args.seed * 100_003 + i)
    while time.time() < deadline:
        max_tokens = rng.randint(16, 128)
        hang_up_after = rng.randint(1, max_tokens // 2) if rng.random() < args.disconnect_fraction else None
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Client {i} asks for story {rng.randint(0, 10**6)}"}],
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        stats.requests += 1
        start = time.time()
        retry_after = None
        try:
            async with asyncio.timeout(args.request_timeout):
                async with http.stream("POST", url, json=body) as r:
                    if r.status_code == 503:
                        await r.aread()
                        retry_after = r.headers.get("retry-after")
                        stats.unavailable += 1
                        if retry_after is None or not retry_after.isdigit():
                            stats.fail("503 without Retry-After", r.text)
                        retry_after = float(retry_after or 1)
                    elif r.status_code != 200:
                        await r.aread()
                        stats.fail(f"HTTP {r.status_code}", r.text)
                        await asyncio.sleep(1)
                        continue
                    else:
                        raw, pending, tokens = bytearray(), b"", 0
                        hung_up = False
                        async for data in r.aiter_bytes():
                            raw += data
                            pending += data
                            *events, pending = pending.split(b"\n\n")
                            for event in events:
                                if token_event(event):
                                    if tokens == 0:
                                        stats.ttft.append(time.time() - start)
                                    tokens += 1
                            if hang_up_after is not None and tokens >= hang_up_after:
                                hung_up = True
                                break
                        stats.tokens += tokens
                        if hung_up:
                            stats.disconnected += 1
                        else:
                            check_stream(bytes(raw), max_tokens)
                            stats.completed += 1
        except TimeoutError:
            stats.fail("hung", f"no end after {args.request_timeout}s")
        except ValueError as e:
            stats.fail("malformed stream", e)
        except httpx.HTTPError as e:
            stats.fail("transport", repr(e))
            await asyncio.sleep(0.5)
        if retry_after is not None:
            await asyncio.sleep(min(retry_after, 5) * rng.uniform(0.5, 1.5))


async def run_load(server, args, stats):
    url = server.url + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.request_timeout)) as http:
        deadline = time.time() + args.duration
        tasks = [asyncio.create_task(client(i, http, url, deadline, args, stats)) for i in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.duration + args.request_timeout + 30)
        for t in pending:
            t.cancel()
            stats.fail("hung", "client task still running after the run")
        for t in done:
            if t.exception() is not None:
                stats.fail("client crashed", repr(t.exception()))


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    args = parse_args()
    problems = []
    server = Server(args)
    idle_blocks = server.metrics().get("mlaserve_kv_blocks_used", 0.0)
    generated_before = server.metrics().get("mlaserve_generation_tokens_total", 0.0)
    sampler = RssSampler(server)
    sampler.start()
    stats = Stats()
    started = time.time()
    elapsed, server_tokens, statuses = 1.0, 0.0, {}
    try:
        asyncio.run(run_load(server, args, stats))
        elapsed = time.time() - started
        sampler.stopped.set()
        sampler.join()

        # The engine returns to idle and frees every block the streams held.
        deadline = time.time() + 60
        while True:
            m = server.metrics()
            busy = m.get("mlaserve_requests_running", 0) + m.get("mlaserve_requests_waiting", 0)
            if (busy == 0 and m.get("mlaserve_kv_blocks_used") == idle_blocks) or time.time() > deadline:
                break
            time.sleep(0.2)
        if busy:
            problems.append(f"the engine is not idle after the run: {busy} requests running or waiting")
        if m.get("mlaserve_kv_blocks_used") != idle_blocks:
            problems.append(f"mlaserve_kv_blocks_used {m.get('mlaserve_kv_blocks_used')} != idle {idle_blocks}")
        server_tokens = m.get("mlaserve_generation_tokens_total", 0.0) - generated_before
        statuses = {k: v for k, v in m.items() if k.startswith("mlaserve_http_requests_total")}
        for name, count in statuses.items():
            code = name.split('"')[1]
            if code.startswith("5") and code != "503":
                problems.append(f"the server counted {count:.0f} responses with status {code}")
    finally:
        sampler.stopped.set()
        exit_code = server.stop()
    if exit_code != 0:
        problems.append(f"mlaserve exited with {exit_code} after SIGTERM (see {server.log_path})")

    # Memory: bounded, and no upward trend once warmed up.
    rss = [mib for _, mib in sampler.samples]
    max_rss = max(rss) if rss else float("nan")
    if not rss:
        problems.append("no RSS samples")
    elif max_rss > args.max_rss_mib:
        problems.append(f"max RSS {max_rss:.0f} MiB is above {args.max_rss_mib:.0f} MiB")
    warm = rss[len(rss) // 4:]
    if len(warm) >= 6:
        half = len(warm) // 2
        first, second = max(warm[:half]), max(warm[half:])
        if second > first + max(8.0, 0.1 * first):
            problems.append(f"RSS keeps growing: max {first:.0f} MiB in the first half, {second:.0f} MiB in the second")
    for kind in sorted({k for k, _ in stats.failures}):
        examples = [d for k, d in stats.failures if k == kind]
        problems.append(f"{len(examples)} x {kind}; e.g. {examples[0]}")
    if stats.completed == 0:
        problems.append("no stream completed")

    print(f"load test: {args.clients} clients for {args.duration:.0f} s against mlaserve "
          f"(--max-queue {args.max_queue}, --max-num-seqs {args.max_num_seqs})")
    print(f"  requests       {stats.requests}")
    print(f"  completed      {stats.completed}")
    print(f"  disconnected   {stats.disconnected} (on purpose)")
    print(f"  503 (overload) {stats.unavailable}")
    print(f"  failures       {len(stats.failures)}")
    print(f"  tokens/s       {server_tokens / elapsed:.0f} generated by the server, "
          f"{stats.tokens / elapsed:.0f} read by clients")
    p50, p99 = percentile(stats.ttft, 0.5) * 1000, percentile(stats.ttft, 0.99) * 1000
    print(f"  TTFT           p50 {p50:.0f} ms, p99 {p99:.0f} ms ({len(stats.ttft)} streams)")
    print(f"  server RSS     max {max_rss:.0f} MiB, at start {rss[0] if rss else float('nan'):.0f} MiB, "
          f"at end {rss[-1] if rss else float('nan'):.0f} MiB ({len(rss)} samples)")
    step = max(1, len(rss) // 6)
    print(f"  RSS over time  {' '.join(f'{t:.0f}s:{mib:.0f}' for t, mib in sampler.samples[::step])} MiB")
    print(f"  HTTP statuses  {', '.join(f'{k.split(chr(34))[1]}: {v:.0f}' for k, v in sorted(statuses.items()))}")
    if problems:
        print("FAILED:")
        for p in problems:
            print("  - " + p)
        return 1
    print("load test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
