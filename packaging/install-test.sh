#!/usr/bin/env bash
# The packages, installed and run as users would (CI runs this after
# scripts/test). As root, on a Debian 12 machine:
#
#  1. packaging/build.sh builds the debs and rpms;
#  2. lintian on the debs: no errors;
#  3. the rpms: rpm -K, rpm -qpl, rpm -qp --scripts (user creation, the
#     units stopped on erase and restarted on upgrade), the %config files,
#     and their file lists against the debs';
#  4. dpkg -i both debs; dpkg -L, the conffiles (agent.toml,
#     coordinator.toml), the system user pgfleet, neither unit enabled,
#     systemd-analyze verify on both units, man pages, completions, the
#     installed agent config passes --check-config;
#  5. the polkit rule, in a real polkitd on a private bus: postgres may start
#     postgresql@15-main.service, not ssh.service, and may not enable units;
#  6. a throwaway PostgreSQL 15 (initdb, pg_ctl, socket only, as postgres),
#     the installed pgfleet-agent run as postgres the way the unit runs it
#     (with NOTIFY_SOCKET: READY=1 once listening, STOPPING=1 on SIGTERM)
#     from a copy of the installed agent.toml pointed at that server, with
#     mutual TLS and certificates made by the installed `pgfleet certs`;
#     the installed `pgfleet status --json` reports it primary;
#  7. the installed `pgfleet serve` run as pgfleet the way its unit runs it
#     (NOTIFY_SOCKET) from a copy of the installed coordinator.toml, with
#     that inventory and certificates by `pgfleet certs`: READY=1, then
#     `pgfleet --coordinator https://...` status through it sees the node,
#     STOPPING=1 and exit 0 on SIGTERM;
#  8. modified conffiles survive reinstalling the packages;
#  9. dpkg -r: configs, data directory, the pgfleet user and /var/lib/pgfleet
#     stay; dpkg -P: configs gone, the rest still there.
#
# Everything it starts is stopped by PID and its temporary directory
# removed, also on failure; packages it installed are purged, and the
# pgfleet user and /var/lib/pgfleet removed if they were not there before.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ "$(id -u)" -ne 0 ]; then
  echo "packaging/install-test.sh installs packages and must run as root" >&2
  exit 1
fi

step() { printf '\n==> %s\n' "$*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }
t0=$SECONDS

# --- tools --------------------------------------------------------------
# PostgreSQL 15 and runuser as for the tests; lintian; systemd-analyze;
# polkitd and a D-Bus daemon for the rule; socat receives sd_notify datagrams.
bash scripts/setup
need=()
command -v lintian >/dev/null || need+=(lintian)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v man >/dev/null || need+=(man-db)
[ -x /usr/lib/polkit-1/polkitd ] || need+=(polkitd)
command -v dbus-daemon >/dev/null || need+=(dbus-daemon)
command -v socat >/dev/null || need+=(socat)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- build ----------------------------------------------------------------
step "packaging/build.sh"
bash packaging/build.sh
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
out=${PGFLEET_PKG_OUT:-$target/packages}
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
agent_deb=$(ls "$out"/pgfleet-agent_"$version"-1_*.deb)
cli_deb=$(ls "$out"/pgfleet_"$version"-1_*.deb)
agent_rpm=$(ls "$out"/pgfleet-agent-"$version"-1.*.rpm)
cli_rpm=$(ls "$out"/pgfleet-"$version"-1.*.rpm)
t_build=$SECONDS

# --- state, cleanup -------------------------------------------------------
tmp=$(mktemp -d /tmp/pgfleet-install-test.XXXXXX)
chmod 755 "$tmp"
pids=()         # processes we started, stopped by PID
pg_started=""
installed=""
# The pgfleet package's postinst creates a user and its home; removed again
# at the end only if they were not there before.
user_was_there=""
getent passwd pgfleet >/dev/null && user_was_there=yes
home_was_there=""
[ -e /var/lib/pgfleet ] && home_was_there=yes
cleanup() {
  local rc=$?
  set +e
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  if [ -n "$pg_started" ]; then
    runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$tmp/pgdata-parent/data" -m immediate stop >/dev/null 2>&1
  fi
  if [ -n "$installed" ]; then
    dpkg -P pgfleet-agent pgfleet >/dev/null 2>&1
  fi
  if [ -z "$user_was_there" ] && getent passwd pgfleet >/dev/null; then
    userdel pgfleet
    getent group pgfleet >/dev/null && groupdel pgfleet
  fi
  [ -z "$home_was_there" ] && rm -rf /var/lib/pgfleet
  if [ $rc -ne 0 ]; then
    for f in "$tmp"/*.log "$tmp"/pgdata-parent/*.log; do
      [ -f "$f" ] && { echo "--- $f" >&2; tail -n 40 "$f" >&2; }
    done
    echo "install test FAILED (exit $rc)" >&2
  fi
  rm -rf "$tmp"
  exit $rc
}
trap cleanup EXIT

# --- lintian ----------------------------------------------------------------
step "lintian"
lintian --display-info "$agent_deb" "$cli_deb" 2>&1 | grep -v '^running with root privileges' | tee "$tmp/lintian.out" >&2 || true
if grep -q '^E:' "$tmp/lintian.out"; then
  fail "lintian reports errors"
fi
echo "lintian: $(grep -c '^E:' "$tmp/lintian.out") errors, $(grep -c '^W:' "$tmp/lintian.out") warnings" >&2

# --- rpm ----------------------------------------------------------------------
step "rpm -K, -qpl, --scripts"
rpm -K "$agent_rpm" "$cli_rpm"
rpm -qpl "$agent_rpm" "$cli_rpm"
rpm -qp --scripts "$agent_rpm" | tee "$tmp/rpm-scripts.out"
grep -q 'systemctl --no-reload disable --now pgfleet-agent.service' "$tmp/rpm-scripts.out" || fail "rpm preun does not stop the unit"
grep -q 'try-restart pgfleet-agent.service' "$tmp/rpm-scripts.out" || fail "rpm postun does not restart on upgrade"
[ "$(rpm -qpc "$agent_rpm")" = /etc/pgfleet/agent.toml ] || fail "rpm: agent.toml is not the only %config file"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$agent_rpm" | grep -qx 'cn /etc/pgfleet/agent.toml' \
  || fail "rpm: agent.toml is not %config(noreplace)"
rpm -qp --scripts "$cli_rpm" | tee "$tmp/rpm-cli-scripts.out"
grep -q 'useradd -r -g pgfleet' "$tmp/rpm-cli-scripts.out" || fail "rpm pgfleet: no system user created before install"
grep -q 'systemctl --no-reload disable --now pgfleet.service' "$tmp/rpm-cli-scripts.out" || fail "rpm pgfleet: preun does not stop the unit"
grep -q 'try-restart pgfleet.service' "$tmp/rpm-cli-scripts.out" || fail "rpm pgfleet: postun does not restart on upgrade"
grep -Eq 'systemctl( --[a-z-]+)* (enable|start|restart) ' "$tmp/rpm-cli-scripts.out" && fail "rpm pgfleet: a scriptlet enables or starts the unit"
[ "$(rpm -qpc "$cli_rpm")" = /etc/pgfleet/coordinator.toml ] || fail "rpm pgfleet: coordinator.toml is not the only %config file"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$cli_rpm" | grep -qx 'cn /etc/pgfleet/coordinator.toml' \
  || fail "rpm pgfleet: coordinator.toml is not %config(noreplace)"

step "rpm and deb ship the same files"
# Files only (not directories); the distributions' own places aside: zsh
# completions (Debian vendor-completions, Fedora/RHEL site-functions) and
# Debian's copyright and changelog.Debian.gz.
deb_files() {
  dpkg-deb --fsys-tarfile "$1" | tar -t | grep -v '/$' | sed 's|^\./|/|' \
    | sed 's|/usr/share/zsh/vendor-completions/|/usr/share/zsh/site-functions/|' \
    | grep -vE '^/usr/share/doc/[^/]+/(copyright|changelog\.Debian\.gz)$' | sort
}
rpm_files() {
  rpm -qp --qf '[%{FILEMODES:perms} %{FILENAMES}\n]' "$1" | grep -v '^d' | cut -d' ' -f2- | sort
}
for pair in "$agent_deb:$agent_rpm" "$cli_deb:$cli_rpm"; do
  deb=${pair%%:*} rpmf=${pair#*:}
  if ! diff <(deb_files "$deb") <(rpm_files "$rpmf"); then
    fail "file lists differ: $(basename "$deb") vs $(basename "$rpmf")"
  fi
  echo "$(basename "$deb") = $(basename "$rpmf"): $(deb_files "$deb" | wc -l) files" >&2
done

# --- install --------------------------------------------------------------
step "dpkg -i"
for p in pgfleet-agent pgfleet; do
  if dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^[ic]'; then
    fail "$p is already installed here; remove it first (dpkg -P $p)"
  fi
done
for f in /etc/pgfleet/agent.toml /etc/pgfleet/coordinator.toml; do
  [ -e "$f" ] && fail "$f exists but no package owns it; move it away first"
done
installed=yes
dpkg -i "$agent_deb" "$cli_deb"

step "dpkg -L"
expect_files() {
  local pkg=$1; shift
  local list; list=$(dpkg -L "$pkg")
  for f in "$@"; do
    grep -qx "$f" <<<"$list" || fail "$pkg does not ship $f"
    [ -e "$f" ] || fail "$f is listed but not on disk"
  done
}
expect_files pgfleet-agent \
  /usr/bin/pgfleet-agent \
  /usr/lib/systemd/system/pgfleet-agent.service \
  /etc/pgfleet/agent.toml \
  /usr/share/polkit-1/rules.d/50-pgfleet-agent.rules \
  /usr/share/man/man8/pgfleet-agent.8.gz \
  /usr/share/bash-completion/completions/pgfleet-agent \
  /usr/share/zsh/vendor-completions/_pgfleet-agent \
  /usr/share/fish/vendor_completions.d/pgfleet-agent.fish \
  /usr/share/doc/pgfleet-agent/copyright
expect_files pgfleet \
  /usr/bin/pgfleet \
  /usr/share/man/man1/pgfleet.1.gz \
  /usr/share/man/man1/pgfleet-status.1.gz \
  /usr/share/man/man1/pgfleet-sync-set.1.gz \
  /usr/share/bash-completion/completions/pgfleet \
  /usr/share/zsh/vendor-completions/_pgfleet \
  /usr/share/fish/vendor_completions.d/pgfleet.fish \
  /usr/share/doc/pgfleet/examples/inventory.toml \
  /usr/lib/systemd/system/pgfleet.service \
  /etc/pgfleet/coordinator.toml \
  /usr/share/man/man1/pgfleet-serve.1.gz
[ "$(dpkg-query -W -f='${Conffiles}' pgfleet-agent | awk 'NF {print $1}')" = /etc/pgfleet/agent.toml ] \
  || fail "agent.toml is not the package's conffile"
[ "$(dpkg-query -W -f='${Conffiles}' pgfleet | awk 'NF {print $1}')" = /etc/pgfleet/coordinator.toml ] \
  || fail "coordinator.toml is not the pgfleet package's conffile"
echo "pgfleet-agent: $(dpkg -L pgfleet-agent | wc -l) paths; pgfleet: $(dpkg -L pgfleet | wc -l) paths" >&2

step "the pgfleet system user; neither unit enabled"
IFS=: read -r _ _ pgfleet_uid _ _ pgfleet_home pgfleet_shell < <(getent passwd pgfleet) \
  || fail "dpkg -i pgfleet created no user pgfleet"
getent group pgfleet >/dev/null || fail "no group pgfleet"
[ "$(id -gn pgfleet)" = pgfleet ] || fail "pgfleet's primary group is $(id -gn pgfleet), not pgfleet"
[ "$pgfleet_uid" -lt 1000 ] || fail "pgfleet is not a system user (uid $pgfleet_uid)"
[ "$pgfleet_home" = /var/lib/pgfleet ] || fail "pgfleet's home is $pgfleet_home, not /var/lib/pgfleet"
case "$pgfleet_shell" in */nologin|*/false) ;; *) fail "pgfleet may log in (shell $pgfleet_shell)" ;; esac
[ -d /var/lib/pgfleet ] || fail "no /var/lib/pgfleet, the home of pgfleet"
echo "user pgfleet: uid $pgfleet_uid, home $pgfleet_home, shell $pgfleet_shell" >&2
for unit in pgfleet-agent.service pgfleet.service; do
  if compgen -G "/etc/systemd/system/*.wants/$unit" >/dev/null; then
    fail "$unit was enabled on install"
  fi
done

step "systemd-analyze verify"
for unit in pgfleet-agent.service pgfleet.service; do
  systemd-analyze verify "/usr/lib/systemd/system/$unit" 2>&1 | tee "$tmp/verify.out"
  [ -s "$tmp/verify.out" ] && fail "systemd-analyze verify has something to say about $unit"
  grep -qx 'Type=notify' "/usr/lib/systemd/system/$unit" || fail "$unit is not Type=notify"
done
grep -qx 'User=postgres' /usr/lib/systemd/system/pgfleet-agent.service || fail "pgfleet-agent.service does not run as postgres"
grep -qx 'User=pgfleet' /usr/lib/systemd/system/pgfleet.service || fail "pgfleet.service does not run as pgfleet"
grep -qx 'ExecStart=/usr/bin/pgfleet serve --config /etc/pgfleet/coordinator.toml' /usr/lib/systemd/system/pgfleet.service \
  || fail "pgfleet.service does not run pgfleet serve with the installed coordinator.toml"
for unit in pgfleet-agent.service pgfleet.service; do
  echo "$unit: $(systemd-analyze security --offline=true "/usr/lib/systemd/system/$unit" 2>/dev/null | tail -n 1)" >&2 || true
done

step "man pages, completions"
man -w pgfleet-agent pgfleet pgfleet-rebuild pgfleet-serve >/dev/null
man pgfleet-agent 2>/dev/null | grep -q -- '--check-config' || fail "man pgfleet-agent lacks --check-config"
bash -n /usr/share/bash-completion/completions/pgfleet
bash -c 'source /usr/share/bash-completion/completions/pgfleet && complete -p pgfleet' >/dev/null \
  || fail "bash completion does not register for pgfleet"
grep -q 'switchover' /usr/share/fish/vendor_completions.d/pgfleet.fish || fail "fish completion lacks subcommands"

step "the installed config is valid"
/usr/bin/pgfleet-agent --config /etc/pgfleet/agent.toml --check-config
grep -q '^\[tls\]' /etc/pgfleet/agent.toml || fail "TLS is not on in the shipped config"
grep -q '^\[tls\]' /etc/pgfleet/coordinator.toml || fail "TLS is not on in the shipped coordinator.toml"
grep -q '^insecure' /etc/pgfleet/coordinator.toml && fail "the shipped coordinator.toml sets insecure"
runuser -u postgres -- /usr/bin/pgfleet-agent --version

# --- polkit ------------------------------------------------------------------
step "polkit rule (polkitd on a private bus)"
cat >"$tmp/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$tmp/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
  </policy>
</busconfig>
EOF
dbus-daemon --config-file="$tmp/bus.conf" --nofork --nopidfile >"$tmp/dbus.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -S "$tmp/bus" ] && break; sleep 0.1; done
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$tmp/bus
/usr/lib/polkit-1/polkitd --no-debug >"$tmp/polkitd.log" 2>&1 &
pids+=($!)
runuser -u postgres -- sleep 300 2>/dev/null &
subject_runuser=$!
pids+=($subject_runuser)
subject=""
for _ in $(seq 50); do
  subject=$(pgrep -u postgres -P "$subject_runuser" sleep || true)
  [ -n "$subject" ] && break
  sleep 0.1
done
[ -n "$subject" ] || fail "no process of postgres to ask polkit about"
may() {  # may VERB UNIT: does polkit let postgres do it?
  timeout 10 pkcheck --action-id org.freedesktop.systemd1.manage-units --process "$subject" \
    --detail unit "$2" --detail verb "$1" >/dev/null 2>&1
}
ok=""
for _ in $(seq 25); do may start postgresql@15-main.service && { ok=yes; break; }; sleep 0.2; done
[ -n "$ok" ] || fail "polkit does not let postgres start postgresql@15-main.service"
may stop postgresql@15-main.service || fail "polkit does not let postgres stop postgresql@15-main.service"
may restart postgresql-15.service || fail "polkit does not let postgres restart postgresql-15.service (PGDG)"
may start ssh.service && fail "polkit lets postgres start ssh.service"
may enable postgresql@15-main.service && fail "polkit lets postgres enable units"
echo "polkit: postgres may start/stop/restart PostgreSQL units, not other units, not enable" >&2
unset DBUS_SYSTEM_BUS_ADDRESS

# --- the installed agent against a real PostgreSQL ----------------------
step "throwaway PostgreSQL 15 as postgres"
bin=/usr/lib/postgresql/15/bin
pgport=54329   # names the socket in our own socket directory; no TCP
install -d -o postgres -g postgres -m 700 "$tmp/run" "$tmp/pgdata-parent"
data=$tmp/pgdata-parent/data
pglog=$tmp/pgdata-parent/postgres.log   # postgres writes it
runuser -u postgres -- "$bin/initdb" --no-sync -D "$data" -U postgres --auth-local=peer --auth-host=reject >"$tmp/initdb.log"
runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$pglog" -w \
  -o "-c listen_addresses='' -c unix_socket_directories='$tmp/run' -c port=$pgport" start >/dev/null
pg_started=yes

step "certificates by the installed pgfleet certs"
pki=$tmp/pki
/usr/bin/pgfleet certs init "$pki"
/usr/bin/pgfleet certs issue --dir "$pki" --role agent testhost --san 127.0.0.1
/usr/bin/pgfleet certs issue --dir "$pki" --role admin ci
# For pgfleet serve: its server certificate (issued like an agent's, for the
# address clients use) and a person's admin certificate to call it with.
/usr/bin/pgfleet certs issue --dir "$pki" --role agent coordinator --san 127.0.0.1
/usr/bin/pgfleet certs issue --dir "$pki" --role admin operator
# As on a coordinator host: the service's keys (its server key, and ci.key,
# the inventory's identity towards the agents) belong to pgfleet; root, who
# runs the CLI here, reads them all the same.
chmod 755 "$pki"
chown pgfleet:pgfleet "$pki/coordinator.key" "$pki/ci.key"
install -d -o postgres -g postgres -m 700 "$tmp/agent-tls"
install -o postgres -g postgres -m 644 "$pki/ca.crt" "$pki/testhost.crt" "$tmp/agent-tls/"
install -o postgres -g postgres -m 600 "$pki/testhost.key" "$tmp/agent-tls/"

# A free TCP port on loopback for the agent.
agent_port=""
for p in $(seq 17420 17520); do
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then agent_port=$p; break; fi
done
[ -n "$agent_port" ] || fail "no free port for the agent"

step "agent.toml: the installed one, pointed at the throwaway server"
# Each line of the installed file that must change is replaced; anything
# else (comments, defaults) stays as shipped.
sed -e "s|^listen = .*|listen = \"127.0.0.1:$agent_port\"|" \
    -e "s|^audit_log = .*|audit_log = \"$tmp/audit.log\"|" \
    -e "s|^ca = .*|ca = \"$tmp/agent-tls/ca.crt\"|" \
    -e "s|^cert = .*|cert = \"$tmp/agent-tls/testhost.crt\"|" \
    -e "s|^key = .*|key = \"$tmp/agent-tls/testhost.key\"|" \
    -e "s|^data_dir = .*|data_dir = \"$data\"|" \
    -e "s|^socket_dir = .*|socket_dir = \"$tmp/run\"|" \
    -e "s|^port = .*|port = $pgport|" \
    -e "s|^backend = \"systemd\"|backend = \"pg_ctl\"|" \
    -e "s|^unit = .*|log_file = \"$pglog\"|" \
    /etc/pgfleet/agent.toml >"$tmp/agent.toml"
diff /etc/pgfleet/agent.toml "$tmp/agent.toml" >&2 || true
[ "$(diff /etc/pgfleet/agent.toml "$tmp/agent.toml" | grep -c '^>')" -eq 10 ] || fail "not every line to change was found in the installed agent.toml"
touch "$tmp/audit.log"
chown postgres:postgres "$tmp/audit.log"
chmod 644 "$tmp/agent.toml"

step "pgfleet-agent as postgres, with NOTIFY_SOCKET"
# Like systemd's, a datagram socket the agent's user may send to.
install -d -o postgres -g postgres -m 700 "$tmp/notify"
runuser -u postgres -- socat -u "UNIX-RECV:$tmp/notify/notify.sock" STDOUT >"$tmp/notify.out" 2>"$tmp/socat.log" &
pids+=($!)
for _ in $(seq 50); do [ -S "$tmp/notify/notify.sock" ] && break; sleep 0.1; done
runuser -u postgres -- env NOTIFY_SOCKET="$tmp/notify/notify.sock" \
  /usr/bin/pgfleet-agent --config "$tmp/agent.toml" >"$tmp/agent.log" 2>&1 &
agent_pid=$!
pids+=($agent_pid)
ready=""
for _ in $(seq 100); do
  grep -q 'READY=1' "$tmp/notify.out" && { ready=yes; break; }
  kill -0 "$agent_pid" 2>/dev/null || fail "the agent exited before it was ready"
  sleep 0.1
done
[ -n "$ready" ] || fail "the agent sent no READY=1 within 10 s"
(exec 3<>"/dev/tcp/127.0.0.1/$agent_port") 2>/dev/null || fail "READY=1 sent but nothing listens on $agent_port"
echo "READY=1 received; the agent listens on 127.0.0.1:$agent_port" >&2
# runuser stays as the parent; the agent is its child.
agent_real=$(pgrep -P "$agent_pid" -x pgfleet-agent) || fail "no pgfleet-agent under runuser $agent_pid"
ps -o user=,pid=,args= -p "$agent_real" >&2

step "pgfleet status (installed CLI, mutual TLS)"
cat >"$tmp/inventory.toml" <<EOF
state_dir = "$tmp/state"

[tls]
ca = "$pki/ca.crt"
cert = "$pki/ci.crt"
key = "$pki/ci.key"

[[clusters]]
name = "ci"

[[clusters.nodes]]
name = "node1"
agent = "https://127.0.0.1:$agent_port"
host = "127.0.0.1"
port = $pgport
EOF
/usr/bin/pgfleet --inventory "$tmp/inventory.toml" status
/usr/bin/pgfleet --inventory "$tmp/inventory.toml" status --json >"$tmp/status.json"
grep -q '"role": "primary"' "$tmp/status.json" || { cat "$tmp/status.json" >&2; fail "status --json does not show node1 primary"; }
grep -q '"all_reachable": true' "$tmp/status.json" || fail "status --json: agent not reachable"
echo "status --json: node1 primary" >&2

step "pgfleet serve as pgfleet, with NOTIFY_SOCKET"
coord_port=""
for p in $(seq 17400 17419); do
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then coord_port=$p; break; fi
done
[ -n "$coord_port" ] || fail "no free port for pgfleet serve"
# What the unit gives the service: StateDirectory= (the inventory's
# state_dir) and LogsDirectory= (the audit log), owned by pgfleet.
install -d -o pgfleet -g pgfleet -m 750 "$tmp/state" "$tmp/coordinator-log"
# The installed coordinator.toml, each line that must change replaced.
sed -e "s|^listen = .*|listen = \"127.0.0.1:$coord_port\"|" \
    -e "s|^inventory = .*|inventory = \"$tmp/inventory.toml\"|" \
    -e "s|^audit_log = .*|audit_log = \"$tmp/coordinator-log/audit.jsonl\"|" \
    -e "s|^ca = .*|ca = \"$pki/ca.crt\"|" \
    -e "s|^cert = .*|cert = \"$pki/coordinator.crt\"|" \
    -e "s|^key = .*|key = \"$pki/coordinator.key\"|" \
    /etc/pgfleet/coordinator.toml >"$tmp/coordinator.toml"
diff /etc/pgfleet/coordinator.toml "$tmp/coordinator.toml" >&2 || true
[ "$(diff /etc/pgfleet/coordinator.toml "$tmp/coordinator.toml" | grep -c '^>')" -eq 6 ] \
  || fail "not every line to change was found in the installed coordinator.toml"
chmod 644 "$tmp/coordinator.toml" "$tmp/inventory.toml"
install -d -o pgfleet -g pgfleet -m 700 "$tmp/coordinator-notify"
runuser -u pgfleet -- socat -u "UNIX-RECV:$tmp/coordinator-notify/notify.sock" STDOUT \
  >"$tmp/coordinator-notify.out" 2>"$tmp/coordinator-socat.log" &
pids+=($!)
for _ in $(seq 50); do [ -S "$tmp/coordinator-notify/notify.sock" ] && break; sleep 0.1; done
runuser -u pgfleet -- env NOTIFY_SOCKET="$tmp/coordinator-notify/notify.sock" \
  /usr/bin/pgfleet serve --config "$tmp/coordinator.toml" >"$tmp/coordinator.log" 2>&1 &
coord_pid=$!
pids+=($coord_pid)
ready=""
for _ in $(seq 100); do
  grep -q 'READY=1' "$tmp/coordinator-notify.out" && { ready=yes; break; }
  kill -0 "$coord_pid" 2>/dev/null || fail "pgfleet serve exited before it was ready"
  sleep 0.1
done
[ -n "$ready" ] || fail "pgfleet serve sent no READY=1 within 10 s"
(exec 3<>"/dev/tcp/127.0.0.1/$coord_port") 2>/dev/null || fail "READY=1 sent but nothing listens on $coord_port"
coord_real=$(pgrep -P "$coord_pid" -x pgfleet) || fail "no pgfleet under runuser $coord_pid"
[ "$(stat -c %U "/proc/$coord_real")" = pgfleet ] || fail "pgfleet serve does not run as pgfleet"
ps -o user=,pid=,args= -p "$coord_real" >&2
[ "$(stat -c %U "$tmp/coordinator-log/audit.jsonl")" = pgfleet ] || fail "pgfleet serve opened no audit log of its own"
echo "READY=1 received; pgfleet serve listens on 127.0.0.1:$coord_port as pgfleet" >&2

step "pgfleet --coordinator status (installed CLI, through the service)"
coordinator_cli=(/usr/bin/pgfleet --coordinator "https://127.0.0.1:$coord_port"
  --tls-ca "$pki/ca.crt" --tls-cert "$pki/operator.crt" --tls-key "$pki/operator.key")
"${coordinator_cli[@]}" status | tee "$tmp/coordinator-status.out" >&2
grep -qw node1 "$tmp/coordinator-status.out" || fail "status through pgfleet serve does not name node1"
"${coordinator_cli[@]}" status --json >"$tmp/coordinator-status.json"
grep -q '"role": "primary"' "$tmp/coordinator-status.json" || fail "status --json through pgfleet serve does not show node1 primary"
echo "status through pgfleet serve: node1 primary" >&2

step "pgfleet serve, SIGTERM: STOPPING=1 and a clean exit"
kill -TERM "$coord_real"
coord_rc=0
wait "$coord_pid" || coord_rc=$?
[ "$coord_rc" -eq 0 ] || fail "pgfleet serve exited $coord_rc on SIGTERM"
grep -q 'STOPPING=1' "$tmp/coordinator-notify.out" || fail "pgfleet serve sent no STOPPING=1 on shutdown"
echo "STOPPING=1 received, exit 0" >&2

step "SIGTERM: STOPPING=1 and a clean exit"
kill -TERM "$agent_real"
agent_rc=0
wait "$agent_pid" || agent_rc=$?
[ "$agent_rc" -eq 0 ] || fail "the agent exited $agent_rc on SIGTERM"
grep -q 'STOPPING=1' "$tmp/notify.out" || fail "no STOPPING=1 on shutdown"
echo "STOPPING=1 received, exit 0" >&2

runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast stop >/dev/null
pg_started=""
fingerprint() { (cd "$data" && find . -printf '%p %s %T@ %m\n' | sort | md5sum); }
before=$(fingerprint)

# --- conffile kept on upgrade, remove, purge -----------------------------
conffiles=(/etc/pgfleet/agent.toml /etc/pgfleet/coordinator.toml)
step "conffiles: local changes survive reinstalling"
for f in "${conffiles[@]}"; do echo '# local change by install-test' >>"$f"; done
dpkg -i "$agent_deb" "$cli_deb" >/dev/null
for f in "${conffiles[@]}"; do
  grep -q '^# local change by install-test$' "$f" || fail "reinstall overwrote the modified $f"
done
getent passwd pgfleet >/dev/null || fail "reinstalling lost the pgfleet user"

step "dpkg -r: configs, data, the pgfleet user and /var/lib/pgfleet stay"
dpkg -r pgfleet-agent pgfleet
for f in "${conffiles[@]}"; do
  [ -f "$f" ] || fail "dpkg -r removed $f"
  grep -q '^# local change by install-test$' "$f" || fail "dpkg -r changed $f"
done
[ -e /usr/bin/pgfleet-agent ] && fail "dpkg -r left /usr/bin/pgfleet-agent"
[ -e /usr/bin/pgfleet ] && fail "dpkg -r left /usr/bin/pgfleet"
for p in pgfleet-agent pgfleet; do
  [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p")" = "rc " ] || fail "$p is not in state rc"
done
getent passwd pgfleet >/dev/null || fail "dpkg -r removed the pgfleet user"
[ -d /var/lib/pgfleet ] || fail "dpkg -r removed /var/lib/pgfleet"
[ "$(fingerprint)" = "$before" ] || fail "the data directory changed on dpkg -r"
echo "removed; ${conffiles[*]}, the pgfleet user and $data untouched" >&2

step "dpkg -P: configs gone, data, the pgfleet user and /var/lib/pgfleet stay"
dpkg -P pgfleet-agent pgfleet
installed=""
dpkg-query -W pgfleet-agent pgfleet 2>/dev/null | grep -q . && fail "a package is still known to dpkg after purge"
for f in "${conffiles[@]}"; do
  [ -e "$f" ] && fail "dpkg -P left $f"
done
getent passwd pgfleet >/dev/null || fail "dpkg -P removed the pgfleet user"
[ -d /var/lib/pgfleet ] || fail "dpkg -P removed /var/lib/pgfleet"
[ "$(fingerprint)" = "$before" ] || fail "the data directory changed on dpkg -P"
[ -f "$data/PG_VERSION" ] || fail "the data directory is gone"
echo "purged; configs gone, $data, the pgfleet user and /var/lib/pgfleet untouched" >&2

printf '\ninstall test passed: build %ss, checks %ss\n' "$((t_build - t0))" "$((SECONDS - t_build))" >&2
