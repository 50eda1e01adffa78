"""Starts the real `mlaserve` binary on loopback for the end-to-end tests."""

import os
import pathlib
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
BIN = os.environ.get("MLASERVE_BIN", str(ROOT / "target" / "debug" / "mlaserve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `mlaserve` process; `url` is its base URL."""

    def __init__(self, *args: str, ready_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(ROOT / "target" / f"e2e-server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [BIN, "--port", str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlaserve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("mlaserve did not become ready")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def v3_server():
    """The V3-style fixture model (R1 chat template, so the deepseek_r1 parser is on)."""
    server = Server("--model", str(FIXTURES / "v3"), "--served-model-name", "v3-tiny", "--kv-cache-memory", "16MiB")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def keyed_server():
    server = Server("--model", str(FIXTURES / "v2-lite"), "--api-key", "sesame", "--max-body-bytes", "65536")
    yield server
    server.stop()
