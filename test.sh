#!/usr/bin/env bash
# The one test command (see README): formatting, lints, every Rust test, then the end-to-end
# tests that drive the real binary over HTTP with the official `openai` client (and through nginx,
# when it is installed), then a one-minute load test.
set -euo pipefail
cd "$(dirname "$0")"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace

# Python side: a local venv with the pinned test requirements.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
cargo build --bin mlaserve
MLASERVE_BIN="$PWD/target/debug/mlaserve" .venv/bin/python -m pytest -q tests/e2e

# Bounded load test on loopback: 200 streaming clients for 60 s against one server with a small
# admission queue (503s with Retry-After, disconnects mid-stream, RSS and cache blocks checked).
MLASERVE_BIN="$PWD/target/debug/mlaserve" .venv/bin/python tests/load/load_test.py --duration 60 --clients 200
