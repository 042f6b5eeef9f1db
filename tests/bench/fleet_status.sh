#!/usr/bin/env bash
# Fleet-status benchmark (not part of CI): GetFleetStatus of `pgfleet serve`
# over 1,000 agents, p50/p99, and the coordinator's RSS; the baseline,
# measured in the same run over the same agents, is the in-process CLI
# `pgfleet status --json`, which opens fresh connections each time.
#
# The agents are simulated (tests/bench/fake_agents.rs): the real agent API
# over mutual TLS from one process on N loopback ports, answering canned
# status for clusters of one primary and two streaming replicas. Everything
# runs on 127.0.0.1 and is removed on exit.
#
#   bash tests/bench/fleet_status.sh
#
# Knobs: PGFLEET_BENCH_AGENTS (1000), PGFLEET_BENCH_CALLS (100 timed calls,
# after PGFLEET_BENCH_WARMUP = 3), PGFLEET_BENCH_CLI_RUNS (5),
# PGFLEET_BENCH_AGENT_NODELAY (1: the simulated agents set TCP_NODELAY on
# accepted connections, as the real agent does; 0 shows what leaving Nagle
# on costs). Builds in
# release mode into CARGO_TARGET_DIR, by default ../target-bench beside the
# repository, so it never waits on (or disturbs) the development target/.
set -euo pipefail
cd "$(dirname "$0")/../.."

AGENTS=${PGFLEET_BENCH_AGENTS:-1000}
CALLS=${PGFLEET_BENCH_CALLS:-100}
WARMUP=${PGFLEET_BENCH_WARMUP:-3}
CLI_RUNS=${PGFLEET_BENCH_CLI_RUNS:-5}
NODELAY_FLAG=()
NODELAY=off
if [ "${PGFLEET_BENCH_AGENT_NODELAY:-1}" = 1 ]; then NODELAY_FLAG=(--tcp-nodelay) NODELAY=on; fi
READY_WITHIN=60 # seconds, for the agents' ports and the coordinator's listener

# N listeners, N connections from the coordinator and N more from each CLI
# run: well past the usual 1024 descriptors.
NOFILE=$((4 * AGENTS + 1024))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$NOFILE" ]; then
    ulimit -Hn "$NOFILE" 2>/dev/null || {
        echo "need ulimit -n $NOFILE (hard limit $(ulimit -Hn)); run as root or lower PGFLEET_BENCH_AGENTS" >&2
        exit 1
    }
fi
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$NOFILE" ]; then ulimit -n "$NOFILE"; fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(cd .. && pwd)/target-bench}
echo "building (release) into $CARGO_TARGET_DIR" >&2
cargo build --release --locked -p pgfleet --bin pgfleet \
    -p pgfleet-tests --bin bench-fake-agents --bin bench-fleet-status >&2
BIN=$CARGO_TARGET_DIR/release

WORK=$(mktemp -d /tmp/pgfleet-bench-fleet.XXXXXX)
FAKE_PID=
COORD_PID=
cleanup() {
    for pid in $COORD_PID $FAKE_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Prints the last lines of a log and stops.
fail() {
    echo "fleet_status.sh: $1" >&2
    if [ -n "${2:-}" ]; then tail -n 20 "$2" >&2; fi
    exit 1
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

# --- The fleet CA and the certificates --------------------------------------
PKI=$WORK/pki
certs() { "$BIN/pgfleet" certs "$@" >/dev/null; }
certs init "$PKI"
certs issue --dir "$PKI" --role agent fake --san 127.0.0.1        # the simulated agents
certs issue --dir "$PKI" --role agent coordinator --san 127.0.0.1 # pgfleet serve
certs issue --dir "$PKI" --role admin coordinator-client          # serve and the CLI, towards agents
certs issue --dir "$PKI" --role reader bench                      # the benchmark client

# --- Simulated agents ---------------------------------------------------------
echo "starting $AGENTS simulated agents" >&2
"$BIN/bench-fake-agents" --agents "$AGENTS" --ca "$PKI/ca.crt" \
    --cert "$PKI/fake.crt" --key "$PKI/fake.key" --ports-file "$WORK/ports" "${NODELAY_FLAG[@]}" \
    >"$WORK/fake-agents.log" 2>&1 &
FAKE_PID=$!
for ((i = 0; i < READY_WITHIN * 10; i++)); do
    [ -f "$WORK/ports" ] && break
    kill -0 "$FAKE_PID" 2>/dev/null || fail "bench-fake-agents exited" "$WORK/fake-agents.log"
    sleep 0.1
done
[ -f "$WORK/ports" ] || fail "the simulated agents did not listen within ${READY_WITHIN}s" "$WORK/fake-agents.log"

# --- Inventory: node i is n{i} in cluster c{i/3} (fake_agents.rs says why) ----
INV=$WORK/inventory.toml
{
    cat <<EOF
state_dir = "$WORK/state"
[tls]
ca = "$PKI/ca.crt"
cert = "$PKI/coordinator-client.crt"
key = "$PKI/coordinator-client.key"
EOF
    awk '{
        i = NR - 1
        if (i % 3 == 0) printf "\n[[clusters]]\nname = \"c%d\"\n", i / 3
        printf "[[clusters.nodes]]\nname = \"n%d\"\nagent = \"https://127.0.0.1:%d\"\nhost = \"127.0.0.1\"\n", i, $1
    }' "$WORK/ports"
} >"$INV"
mkdir -p "$WORK/state"
CLUSTERS=$(grep -c '^\[\[clusters\]\]' "$INV")

# --- pgfleet serve --------------------------------------------------------------
# Port 0: the kernel picks a free port; ss tells which.
cat >"$WORK/coordinator.toml" <<EOF
listen = "127.0.0.1:0"
inventory = "$INV"
[tls]
ca = "$PKI/ca.crt"
cert = "$PKI/coordinator.crt"
key = "$PKI/coordinator.key"
EOF
PGFLEET_LOG=info "$BIN/pgfleet" serve --config "$WORK/coordinator.toml" >"$WORK/serve.log" 2>&1 &
COORD_PID=$!
COORD_PORT=
for ((i = 0; i < READY_WITHIN * 10; i++)); do
    # awk reads to the end: ss lists the agents' thousand listeners too, and
    # an early exit would kill it with SIGPIPE.
    COORD_PORT=$(ss -Hltnp 2>/dev/null | awk -v pid="pid=$COORD_PID," '
        index($0, pid) && !port { n = split($4, a, ":"); port = a[n] } END { print port }')
    [ -n "$COORD_PORT" ] && break
    kill -0 "$COORD_PID" 2>/dev/null || fail "pgfleet serve exited" "$WORK/serve.log"
    sleep 0.1
done
[ -n "$COORD_PORT" ] || fail "pgfleet serve did not listen within ${READY_WITHIN}s" "$WORK/serve.log"
sleep 0.5 # let it settle before its idle RSS is read
COORD_RSS_IDLE=$(rss_kib "$COORD_PID")

# --- Served: GetFleetStatus over kept channels ----------------------------------
echo "GetFleetStatus: 1 cold call, $WARMUP warm-up, $CALLS timed" >&2
SERVED=$("$BIN/bench-fleet-status" --coordinator "https://127.0.0.1:$COORD_PORT" \
    --ca "$PKI/ca.crt" --cert "$PKI/bench.crt" --key "$PKI/bench.key" \
    --expect-nodes "$AGENTS" --calls "$CALLS" --warmup "$WARMUP" \
    --cpu-of coordinator="$COORD_PID" --cpu-of agents="$FAKE_PID" --clock-ticks "$(getconf CLK_TCK)" \
    --json) ||
    fail "bench-fleet-status failed" "$WORK/serve.log"
COORD_RSS=$(rss_kib "$COORD_PID")
field() { jq -r ".$1" <<<"$SERVED"; }
ms1() { printf '%.1f ms' "$(field "$1")"; }

# --- Baseline: the in-process CLI, fresh connections every run -----------------
echo "baseline: pgfleet status --json, $CLI_RUNS runs" >&2
CLI_MS=()
CLI_PEAK_KIB=0
for ((r = 1; r <= CLI_RUNS; r++)); do
    start=$(date +%s%N)
    /usr/bin/time -f %M -o "$WORK/cli.rss" \
        "$BIN/pgfleet" --inventory "$INV" status --json >"$WORK/cli.json" 2>"$WORK/cli.err" ||
        fail "pgfleet status run $r failed (exit $?)" "$WORK/cli.err"
    end=$(date +%s%N)
    CLI_MS+=("$(awk -v ns=$((end - start)) 'BEGIN { printf "%.1f", ns / 1e6 }')")
    jq -e --argjson n "$AGENTS" '.all_reachable and ([.clusters[].nodes[]] | length) == $n' \
        "$WORK/cli.json" >/dev/null || fail "pgfleet status run $r: not all $AGENTS nodes reachable" "$WORK/cli.err"
    kib=$(tail -n 1 "$WORK/cli.rss")
    if [ "$kib" -gt "$CLI_PEAK_KIB" ]; then CLI_PEAK_KIB=$kib; fi
done
CLI_MEDIAN=$(printf '%s\n' "${CLI_MS[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
FAKE_RSS=$(rss_kib "$FAKE_PID")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
cat <<EOF

## GetFleetStatus over $AGENTS agents ($CLUSTERS clusters), $(nproc) cores, agents' TCP_NODELAY $NODELAY

| | p50 | p99 | max |
|---|---|---|---|
| \`pgfleet serve\` GetFleetStatus, kept channels ($CALLS calls) | $(ms1 p50_ms) | $(ms1 p99_ms) | $(ms1 max_ms) |

First call after start-up (opens $AGENTS TLS channels): $(ms1 first_ms).
CPU time per call (both share the cores): coordinator $(ms1 cpu_ms_per_call.coordinator), simulated agents $(ms1 cpu_ms_per_call.agents).

| baseline: \`pgfleet status --json\` in-process, fresh connections | median of $CLI_RUNS | runs |
|---|---|---|
| wall time, process start to exit | $CLI_MEDIAN ms | ${CLI_MS[*]} ms |

Ratio served p50 / CLI median: $(ratio "$(field p50_ms)" "$CLI_MEDIAN")

## Memory

| process | RSS |
|---|---|
| \`pgfleet serve\`, idle before the first call | $(mib "$COORD_RSS_IDLE") |
| \`pgfleet serve\`, after the calls ($AGENTS channels kept) | $(mib "$COORD_RSS") ($(ratio "$COORD_RSS" "$COORD_RSS_IDLE")x idle) |
| \`pgfleet status\` (CLI), peak | $(mib "$CLI_PEAK_KIB") |
| simulated agents, all $AGENTS, one process | $(mib "$FAKE_RSS") |
EOF
