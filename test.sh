#!/usr/bin/env bash
# The one test command (see README): formatting, lints, then every Rust test.
set -euo pipefail
cd "$(dirname "$0")"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
