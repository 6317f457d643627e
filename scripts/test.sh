#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the end-to-end
# tests that boot the real reference cluster under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/host-deps.sh --test
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# Integration test binaries run one at a time: the e2e cluster needs the CPU.
cargo test -- --test-threads=1 --nocapture
