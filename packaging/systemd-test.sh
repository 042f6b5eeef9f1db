#!/usr/bin/env bash
# The packaged agent under its real unit, with systemd as PID 1: a Debian 12
# container (debootstrap + systemd-nspawn --boot, private network) with
# PostgreSQL 15 and polkitd, where
#   - dpkg -i leaves the agent disabled and stopped;
#   - cluster 15/main and a streaming replica 15/replica, each with an agent
#     under the packaged unit (Type=notify, User=postgres, the hardening),
#     certificates by `pgfleet certs`, the shipped agent.toml with only the
#     address, data directory, port and unit changed;
#   - `pgfleet rebuild replica` goes through: the replica's agent stops and
#     starts postgresql@15-replica with systemctl (the polkit rule), moves
#     the data directory aside, runs pg_basebackup; the upstream's agent
#     rewrites /etc/postgresql/15/main/pg_hba.conf;
#   - polkit refuses postgres other units and `enable`;
#   - pgfleet.service (`pgfleet serve` as the user pgfleet, the hardening)
#     from the shipped coordinator.toml with only the address changed:
#     `pgfleet --coordinator` status and a rebuild through it, its journal
#     in /var/lib/pgfleet and audit log in /var/log/pgfleet-coordinator,
#     the agents' /var/log/pgfleet still postgres's;
#   - reinstalling restarts a running agent and keeps a modified agent.toml;
#     dpkg -r stops it, keeps config and data; dpkg -P removes the config and
#     the enablement; the same for pgfleet.service, the pgfleet user kept.
# Not part of CI (it downloads a Debian base system, about 2 minutes); run it
# after changing the unit, the polkit rule or the maintainer scripts. Needs
# root, network access to deb.debian.org, and builds the packages first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "packaging/systemd-test.sh must run as root" >&2
  exit 1
fi
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

bash packaging/build.sh
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
out=${PGFLEET_PKG_OUT:-$target/packages}

work=$(mktemp -d /var/tmp/pgfleet-systemd-test.XXXXXX)
nspawn_pid=""
cleanup() {
  local rc=$?
  if [ -n "$nspawn_pid" ]; then
    kill "$nspawn_pid" 2>/dev/null   # nspawn powers the container off
    wait "$nspawn_pid" 2>/dev/null
  fi
  [ $rc -ne 0 ] && echo "systemd test FAILED (exit $rc); container log: $work/nspawn.log" >&2
  [ $rc -eq 0 ] && rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

echo "==> debootstrap bookworm (PostgreSQL 15, polkitd, systemd)" >&2
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,libpam-systemd,polkitd,postgresql-15,postgresql-client-15,procps \
  bookworm "$work/root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1
# Images forbid service starts with policy-rc.d; a host does not.
rm -f "$work/root/usr/sbin/policy-rc.d"
mkdir -p "$work/root/root/pkgs"
cp "$out"/pgfleet-agent_*.deb "$out"/pgfleet_*.deb "$work/root/root/pkgs/"

cat >"$work/root/root/test.sh" <<'EOF'
#!/bin/bash
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
fail() { echo "FAIL: $*" >&2; exit 1; }
say() { printf '\n--> %s\n' "$*"; }

say "dpkg -i: installed, neither enabled nor started"
dpkg -i /root/pkgs/pgfleet-agent_*.deb /root/pkgs/pgfleet_*.deb >/dev/null
[ "$(systemctl is-enabled pgfleet-agent || true)" = disabled ] || fail "enabled on install"
[ "$(systemctl is-active pgfleet-agent || true)" = inactive ] || fail "started on install"
[ "$(systemctl is-enabled pgfleet || true)" = disabled ] || fail "pgfleet.service enabled on install"
[ "$(systemctl is-active pgfleet || true)" = inactive ] || fail "pgfleet.service started on install"
getent passwd pgfleet >/dev/null || fail "no pgfleet user after install"

say "15/replica: a streaming replica of 15/main"
pg_createcluster 15 replica --port 5433 >/dev/null
rm -rf /var/lib/postgresql/15/replica
runuser -u postgres -- pg_basebackup -D /var/lib/postgresql/15/replica -R -X stream -h /var/run/postgresql -p 5432
systemctl start postgresql@15-replica

say "certificates, configs, units"
pgfleet certs init /etc/pgfleet/pki >/dev/null
for n in main replica; do pgfleet certs issue --dir /etc/pgfleet/pki --role agent $n --san 127.0.0.1 >/dev/null; done
pgfleet certs issue --dir /etc/pgfleet/pki --role admin ci >/dev/null
install -m 644 /etc/pgfleet/pki/replica.crt /etc/pgfleet/pki/agent.crt
install -o postgres -g postgres -m 600 /etc/pgfleet/pki/replica.key /etc/pgfleet/pki/agent.key
chown postgres:postgres /etc/pgfleet/pki/main.key
cp /etc/pgfleet/agent.toml /root/agent.toml.shipped
sed -i -e 's|^listen = .*|listen = "127.0.0.1:7421"|' \
       -e 's|^data_dir = .*|data_dir = "/var/lib/postgresql/15/replica"|' \
       -e 's|^port = .*|port = 5433|' \
       -e 's|^unit = .*|unit = "postgresql@15-replica"|' /etc/pgfleet/agent.toml
# 15/main's agent: the packaged unit, another config.
sed -e 's|^listen = .*|listen = "127.0.0.1:7420"|' \
    -e 's|^audit_log = .*|audit_log = "/var/log/pgfleet/audit-main.jsonl"|' \
    -e 's|pki/agent\.|pki/main.|' /root/agent.toml.shipped >/etc/pgfleet/agent-main.toml
sed -e 's|/etc/pgfleet/agent.toml|/etc/pgfleet/agent-main.toml|g' /usr/lib/systemd/system/pgfleet-agent.service \
  >/etc/systemd/system/pgfleet-agent-main.service
systemctl daemon-reload
systemctl enable --now pgfleet-agent pgfleet-agent-main
systemctl show -p Type,User,ActiveState,SubState pgfleet-agent
[ "$(systemctl show -p SubState --value pgfleet-agent)" = running ] || fail "pgfleet-agent not running"
systemd-analyze security pgfleet-agent --no-pager | tail -n 1

say "pgfleet rebuild replica (systemctl through polkit, pg_basebackup, pg_hba.conf)"
printf 'secret' >/root/repl.pw; chmod 600 /root/repl.pw
# The CLI in-process as root: its own state_dir, not the service's below.
cat >/root/inv.toml <<INV
state_dir = "/root/pgfleet-state"
[tls]
ca = "/etc/pgfleet/pki/ca.crt"
cert = "/etc/pgfleet/pki/ci.crt"
key = "/etc/pgfleet/pki/ci.key"
[[clusters]]
name = "c1"
replication_password_file = "/root/repl.pw"
[[clusters.nodes]]
name = "main"
agent = "https://127.0.0.1:7420"
host = "127.0.0.1"
port = 5432
[[clusters.nodes]]
name = "replica"
agent = "https://127.0.0.1:7421"
host = "127.0.0.1"
port = 5433
INV
pgfleet --inventory /root/inv.toml status
pgfleet --inventory /root/inv.toml rebuild replica
pgfleet --inventory /root/inv.toml status --json | grep -q '"role": "replica"' || fail "replica is not a replica after the rebuild"
ls -d /var/lib/postgresql/15/replica.pgfleet-old-* >/dev/null || fail "nothing moved aside"
grep -q '^host replication pgfleet_replication 127.0.0.1/32 scram-sha-256' /etc/postgresql/15/main/pg_hba.conf \
  || fail "pg_hba.conf not updated"
[ "$(stat -c %U /var/log/pgfleet/audit.jsonl)" = postgres ] || fail "no audit log in /var/log/pgfleet"

say "polkit: only PostgreSQL units, no enable"
runuser -u postgres -- systemctl --no-ask-password restart postgresql@15-replica || fail "postgres cannot restart its unit"
runuser -u postgres -- systemctl --no-ask-password restart systemd-journald 2>/dev/null && fail "postgres may restart journald"
runuser -u postgres -- systemctl --no-ask-password enable postgresql@15-main 2>/dev/null && fail "postgres may enable units"

say "pgfleet.service: pgfleet serve as pgfleet under the packaged unit"
pgfleet certs issue --dir /etc/pgfleet/pki --role agent coordinator --san 127.0.0.1 >/dev/null
pgfleet certs issue --dir /etc/pgfleet/pki --role admin pgfleet-serve >/dev/null
chown pgfleet:pgfleet /etc/pgfleet/pki/coordinator.key /etc/pgfleet/pki/pgfleet-serve.key
# The service's inventory: in /etc/pgfleet (ProtectHome= hides /root), its
# identity towards the agents pgfleet-serve, the default state_dir.
install -o pgfleet -g pgfleet -m 600 /root/repl.pw /etc/pgfleet/c1.password
sed -e 's|^state_dir = .*|state_dir = "/var/lib/pgfleet"|' \
    -e 's|pki/ci\.|pki/pgfleet-serve.|' \
    -e 's|^replication_password_file = .*|replication_password_file = "/etc/pgfleet/c1.password"|' \
    /root/inv.toml >/etc/pgfleet/inventory.toml
sed -i -e 's|^listen = .*|listen = "127.0.0.1:7400"|' /etc/pgfleet/coordinator.toml
systemctl enable --now pgfleet
systemctl show -p Type,User,ActiveState,SubState pgfleet
[ "$(systemctl show -p SubState --value pgfleet)" = running ] || { journalctl -u pgfleet --no-pager | tail -n 20; fail "pgfleet.service not running"; }
[ "$(ps -o user= -p "$(systemctl show -p MainPID --value pgfleet)" | tr -d ' ')" = pgfleet ] || fail "pgfleet serve not running as pgfleet"
systemd-analyze security pgfleet --no-pager | tail -n 1
via=(pgfleet --coordinator https://127.0.0.1:7400 --tls-ca /etc/pgfleet/pki/ca.crt
  --tls-cert /etc/pgfleet/pki/ci.crt --tls-key /etc/pgfleet/pki/ci.key)
"${via[@]}" status | tee /root/via-status.out
grep -qw replica /root/via-status.out || fail "status through pgfleet.service does not name the replica"
"${via[@]}" rebuild replica || { journalctl -u pgfleet --no-pager | tail -n 20; fail "rebuild through pgfleet.service failed"; }
"${via[@]}" status --json | grep -q '"role": "replica"' || fail "replica is not a replica after the rebuild through the service"
[ "$(stat -c %U /var/lib/pgfleet/c1.journal)" = pgfleet ] || fail "no journal of pgfleet's in /var/lib/pgfleet"
[ "$(stat -c %U /var/log/pgfleet-coordinator/audit.jsonl)" = pgfleet ] || fail "no audit log in /var/log/pgfleet-coordinator"
grep -q '"Rebuild"' /var/log/pgfleet-coordinator/audit.jsonl || fail "the rebuild is not in the coordinator's audit log"
[ "$(stat -c %U /var/log/pgfleet/audit.jsonl)" = postgres ] || fail "the agents' /var/log/pgfleet changed owner"
systemctl stop pgfleet
[ "$(systemctl show -p Result --value pgfleet)" = success ] || fail "pgfleet serve did not stop cleanly"

say "reinstall: a running agent is restarted, the modified config kept"
before=$(systemctl show -p MainPID --value pgfleet-agent)
dpkg -i /root/pkgs/pgfleet-agent_*.deb >/dev/null
after=$(systemctl show -p MainPID --value pgfleet-agent)
[ "$before" != "$after" ] && [ "$(systemctl is-active pgfleet-agent)" = active ] || fail "not restarted on upgrade"
grep -q '^listen = "127.0.0.1:7421"' /etc/pgfleet/agent.toml || fail "config overwritten on upgrade"

say "dpkg -r: stopped, config and data kept; dpkg -P: config and enablement gone"
dpkg -r pgfleet-agent >/dev/null
[ "$(systemctl is-active pgfleet-agent || true)" = inactive ] || fail "still running after dpkg -r"
[ -f /etc/pgfleet/agent.toml ] && [ -f /var/lib/postgresql/15/replica/PG_VERSION ] || fail "dpkg -r removed config or data"
dpkg -P pgfleet-agent >/dev/null 2>&1
[ -e /etc/pgfleet/agent.toml ] && fail "dpkg -P left the config"
[ -e /etc/systemd/system/multi-user.target.wants/pgfleet-agent.service ] && fail "dpkg -P left the unit enabled"
[ -f /var/lib/postgresql/15/replica/PG_VERSION ] || fail "data gone after purge"
systemctl start pgfleet
dpkg -r pgfleet >/dev/null
[ "$(systemctl is-active pgfleet || true)" = inactive ] || fail "pgfleet.service still running after dpkg -r"
[ -f /etc/pgfleet/coordinator.toml ] && [ -f /var/lib/pgfleet/c1.journal ] || fail "dpkg -r removed coordinator.toml or the journal"
dpkg -P pgfleet >/dev/null 2>&1
[ -e /etc/pgfleet/coordinator.toml ] && fail "dpkg -P left coordinator.toml"
[ -e /etc/systemd/system/multi-user.target.wants/pgfleet.service ] && fail "dpkg -P left pgfleet.service enabled"
getent passwd pgfleet >/dev/null && [ -f /var/lib/pgfleet/c1.journal ] || fail "dpkg -P removed the pgfleet user or its journal"
echo
echo "systemd test passed"
EOF
chmod +x "$work/root/root/test.sh"

echo "==> boot the container" >&2
systemd-nspawn --boot --register=no --keep-unit --private-network --console=passive \
  -D "$work/root" -M "pgfleet-$$" >"$work/nspawn.log" 2>&1 &
nspawn_pid=$!
leader=""
for _ in $(seq 100); do
  leader=$(pgrep -P "$nspawn_pid" -x systemd || true)
  if [ -n "$leader" ]; then
    state=$(nsenter -t "$leader" -a systemctl is-system-running --wait 2>/dev/null || true)
    case $state in running|degraded) break ;; esac
  fi
  sleep 0.3
done
[ -n "$leader" ] || { echo "the container did not boot" >&2; exit 1; }
nsenter -t "$leader" -a systemctl is-active postgresql@15-main >/dev/null
nsenter -t "$leader" -a /root/test.sh
