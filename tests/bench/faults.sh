#!/usr/bin/env bash
# The fault suite's long run (not part of CI; root, like the tests: network
# namespaces for three hosts per schedule, removed after). Draws schedules
# of operations and faults from consecutive seeds, runs each on a fresh
# production-shaped fleet with clients committing throughout, and prints a
# summary table; any violation is printed with its seed and schedule.
#   bash tests/bench/faults.sh                       # 200 schedules of 8 events, seeds 1000.., generator v2
#   bash tests/bench/faults.sh --schedules 20 --events 6 --first-seed 1
#   bash tests/bench/faults.sh --seed 1042 --events 8  # replay one
#   --generator v1                                   # the draws before one-way faults (seeds 1, 2, 1000)
# Debug build (the tests' own: no second compile); PROFILE=release for one.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=${PROFILE:-debug}
cargo build --profile "$([ "$profile" = debug ] && echo dev || echo "$profile")" --locked --workspace --bins
exec "./target/$profile/fault-suite" "$@"
