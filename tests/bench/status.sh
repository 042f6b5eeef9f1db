#!/usr/bin/env bash
# Status benchmark: GetStatus latency and throughput against one agent,
# `pgfleet status` over 1/10/100 agents, agent RSS; each next to a baseline
# measured in the same run. Release build. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" -ne 0 ] || bash scripts/setup
cargo build --release --locked --workspace --bins
exec ./target/release/bench-status
