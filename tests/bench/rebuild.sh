#!/usr/bin/env bash
# Rebuild benchmark (not part of CI): `pgfleet rebuild` against plain
# `pg_basebackup -X stream -c fast` on the same data, alternated, median of
# RUNS each, printed as a ratio and as orchestration overhead in seconds.
#
#   bash tests/bench/rebuild.sh            # scale 50 (about 750 MB), 3 runs
#   SCALE=10 RUNS=5 bash tests/bench/rebuild.sh
#
# The fleet is the demo's, on 127.0.0.1 (ports 56432-56434, agents
# 17431-17433), release build, in its own directory; it is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
SCALE=${SCALE:-50}
RUNS=${RUNS:-3}
DIR=/tmp/pgfleet-bench-rebuild
BIN=/usr/lib/postgresql/15/bin
export PGFLEET_DEMO_DIR=$DIR PGFLEET_DEMO_PG_PORT=56432 PGFLEET_DEMO_AGENT_PORT=17431
export PGFLEET_DEMO_SCALE=$SCALE PGFLEET_DEMO_QUIET=1 PGFLEET_DEMO_PROFILE=release
trap 'bash scripts/demo stop >/dev/null 2>&1 || true' EXIT

echo "== building the fleet (pgbench scale $SCALE)" >&2
bash scripts/demo >/dev/null
export PGFLEET_INVENTORY=$DIR/inventory.toml
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
size=$(as_pg "$BIN/psql" -h 127.0.0.1 -p 56432 -U postgres -Atc "select pg_size_pretty(sum(pg_database_size(oid))) from pg_database")
echo "== primary holds $size; $RUNS runs each, alternated" >&2

now() { date +%s.%N; }
base=() ours=() orch=()
for r in $(seq "$RUNS"); do
  as_pg rm -rf "$DIR/baseline"
  t0=$(now)
  as_pg "$BIN/pg_basebackup" -h 127.0.0.1 -p 56432 -U postgres -D "$DIR/baseline" -X stream -c fast
  t1=$(now)
  base+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')")
  as_pg rm -rf "$DIR/baseline"
  # Old copies from earlier runs would only eat disk.
  as_pg bash -c "rm -rf $DIR/node1/data.pgfleet-old-*"
  t0=$(now)
  "$DIR/bin/pgfleet" rebuild node1 --no-progress-bar >/dev/null 2>"$DIR/rebuild-$r.err"
  t1=$(now)
  ours+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')")
  # Everything but the copy itself: the rebuild's total minus its
  # basebackup step, as the agent timed it.
  copy=$(sed -n 's/^\[node1\] basebackup done in \([0-9.]*\)s.*/\1/p' "$DIR/rebuild-$r.err")
  orch+=("$(awk -v t="${ours[-1]}" -v c="${copy:-0}" 'BEGIN {printf "%.3f", t - c}')")
  echo "run $r: pg_basebackup ${base[-1]} s, pgfleet rebuild ${ours[-1]} s (copy ${copy:-?} s, the rest ${orch[-1]} s)" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mb=$(median "${base[@]}")
mo=$(median "${ours[@]}")
ratio=$(awk -v a="$mo" -v b="$mb" 'BEGIN {printf "%.3f", a / b}')
over=$(awk -v a="$mo" -v b="$mb" 'BEGIN {printf "%.3f", a - b}')
morch=$(median "${orch[@]}")
echo
echo "| data | pg_basebackup (median of $RUNS) | pgfleet rebuild (median of $RUNS) | ratio | difference | orchestration (rebuild minus its copy step) |"
echo "|---|---|---|---|---|---|"
echo "| $size (pgbench -s $SCALE) | ${mb} s | ${mo} s | ${ratio} | ${over} s | ${morch} s |"
echo
echo "pgfleet rebuild includes: upstream access (role, pg_hba.conf, reload), checks, stop,"
echo "move aside, pg_basebackup -R -C -S -P -v, start, wait for streaming, confirmation."
