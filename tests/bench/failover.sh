#!/usr/bin/env bash
# Failover benchmark (not part of CI; root, like the tests: network
# namespaces 198.18.x.0/24 for three hosts, removed after). node1 and node2
# rebuilt from node0, FIRST 1 (node1, node2), a client committing every
# 10 ms. RUNS (default 10) postmaster kills and RUNS host losses, first with
# `pgfleet failover` run at once (the baseline), then through `pgfleet serve`
# with auto_failover = true and default settings. Release build
# (PROFILE=debug: the tests' build, no second compile).
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=${PROFILE:-release}
cargo build --profile "$([ "$profile" = debug ] && echo dev || echo "$profile")" --locked --workspace --bins
exec "./target/$profile/bench-failover"
