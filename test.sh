#!/usr/bin/env bash
# The one test command (see README): formatting, lints, every Rust test, then the end-to-end
# tests that drive the real binary over HTTP with the official `openai` client.
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
