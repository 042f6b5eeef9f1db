#!/usr/bin/env bash
# The README's two set-up commands on a fresh Debian 12 machine with Rust:
# a debootstrapped bookworm (minbase: what every Debian system has, so a
# package scripts/setup forgets is missing here too) run with systemd-nspawn,
# where
#   - bash scripts/test                 (scripts/setup, build, every test)
#   - bash scripts/demo; bash scripts/demo stop
# must pass. Catches an install step scripts/setup lacks.
#
#   sudo bash packaging/fresh-machine-test.sh [--only-setup] [--keep] [--refresh]
#
#   --only-setup  only scripts/setup and `cargo --version` inside, then a
#                 hello-world crate built (the linker) and a check that the
#                 container lets the tests make network namespaces: about a
#                 minute instead of a full build and test run
#   --keep        keep the container's directory (and logs) afterwards
#   --refresh     debootstrap again instead of using the cached base system
#                 (or PGFLEET_FRESH_REFRESH=1)
#
# Environment:
#   PGFLEET_SRC               copy this working tree (tracked and untracked,
#                             not ignored, files) instead of a clone of the
#                             committed HEAD, to try uncommitted changes
#   PGFLEET_FRESH_CACHE       where the base system is cached
#                             (/var/tmp/pgfleet-fresh-machine)
#   PGFLEET_DEBIAN_MIRROR     (http://deb.debian.org/debian)
#   PGFLEET_DEBIAN_SECURITY_MIRROR  (http://deb.debian.org/debian-security)
#   PGFLEET_FRESH_PROXY_PORT  the registry proxy's port inside (3128)
#
# Not part of CI: run by hand as root. It downloads a Debian base system (once,
# cached), the Debian packages scripts/setup installs, every crate from
# crates.io and the Python client's wheels from PyPI; a full run builds the
# workspace and runs the whole test suite, so it takes as long as
# `sudo bash scripts/test` on a cold machine and more.
#
# Rust: rustup cannot be downloaded here, so "a machine with Rust" is this
# host's rustup installation, bound read-only at the same paths
# (/root/.rustup, /root/.cargo/bin); CARGO_HOME stays the container's own
# /root/.cargo, so crates are downloaded afresh.
#
# Network: the container has a network namespace of its own (the tests make
# bridges and veths named pft<N>..., and purge what they take for their own
# leftovers; in the host's namespace they would collide with, and delete,
# those of a test run on the host; the demo's ports would collide too). It
# has only loopback: apt, cargo and pip reach the registries through a small
# HTTP proxy on the host whose listening socket sits in the container's
# namespace (127.0.0.1:3128 inside). Only those three are told about it
# (apt.conf, CARGO_HTTP_PROXY, PIP_PROXY), not http_proxy: the Python gRPC
# client would send the tests' own connections to it.
set -euo pipefail
src=""
if [ -n "${PGFLEET_SRC:-}" ]; then src=$(cd "$PGFLEET_SRC" && pwd); fi
cd "$(dirname "$0")/.."

only_setup=""
keep=""
refresh=${PGFLEET_FRESH_REFRESH:-}
for arg in "$@"; do
  case $arg in
    --only-setup) only_setup=1 ;;
    --keep) keep=1 ;;
    --refresh) refresh=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "packaging/fresh-machine-test.sh must run as root" >&2
  exit 1
fi
for d in /root/.rustup /root/.cargo/bin; do
  if [ ! -d "$d" ]; then
    echo "$d missing: the container borrows this host's rustup installation (rustup.rs)" >&2
    exit 1
  fi
done
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v unshare >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
[ -x /usr/bin/python3 ] || need+=(python3-minimal)   # the registry proxy
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

repo=$(pwd)
mirror=${PGFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${PGFLEET_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
port=${PGFLEET_FRESH_PROXY_PORT:-3128}
cache=${PGFLEET_FRESH_CACHE:-/var/tmp/pgfleet-fresh-machine}
# ca-certificates is the one addition to minbase: cargo reaches crates.io
# over TLS with the system's CA store, and `curl https://sh.rustup.rs` needed
# it too, so no machine that installed Rust with rustup lacks it.
include=ca-certificates
arch=$(dpkg --print-architecture)
key=$(printf '%s\n' bookworm minbase "$mirror" "$include" "$arch" | sha256sum | cut -c1-12)
rootfs=$cache/bookworm-$key

mkdir -p "$cache"
work=$(mktemp -d "$cache/run.XXXXXX")
root=$work/root
holder_pid=""
proxy_pid=""
nspawn_pid=""
current=""
failed=()
results=()

stop_pid() { # PID: TERM, then KILL after 10 s; reaped
  local pid=$1
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # nspawn takes the container's processes (and its mounts, made in the
  # container's own mount namespace) down with it.
  if [ -n "$nspawn_pid" ]; then
    stop_pid "$nspawn_pid"
    failed+=("$current (interrupted)")
  fi
  [ -n "$proxy_pid" ] && stop_pid "$proxy_pid"
  [ -n "$holder_pid" ] && stop_pid "$holder_pid"
  if [ ${#results[@]} -gt 0 ]; then
    echo >&2
    printf '  %s\n' "${results[@]}" >&2
  fi
  if [ $rc -ne 0 ]; then
    echo "fresh-machine test FAILED (exit $rc)${failed:+: ${failed[*]}}; logs in $work" >&2
  fi
  if [ -n "$keep" ]; then
    echo "kept $root (enter it: systemd-nspawn -D $root)" >&2
  elif grep -q " $work/" /proc/self/mountinfo; then
    # Never rm -rf through a mount (the read-only toolchain, were it bound
    # here on the host by mistake).
    echo "something is mounted below $work; not removing it" >&2
  elif [ $rc -eq 0 ]; then
    rm -rf --one-file-system "$work"
  else
    rm -rf --one-file-system "$root"   # several GB; the logs stay
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The base system, cached: debootstrap into a temporary directory renamed at
# the end, so an interrupted run never leaves a half system as the cache.
if [ -n "$refresh" ] && [ -d "$rootfs" ]; then
  echo "==> removing the cached base system $rootfs" >&2
  rm -rf --one-file-system "$rootfs"
fi
if [ ! -d "$rootfs" ]; then
  echo "==> debootstrap bookworm (minbase + $include) into $rootfs" >&2
  rm -rf --one-file-system "$rootfs.tmp"
  start=$SECONDS
  if ! debootstrap --variant=minbase --include="$include" bookworm "$rootfs.tmp" "$mirror" \
    >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    failed+=(debootstrap)
    exit 1
  fi
  mv "$rootfs.tmp" "$rootfs"
  results+=("debootstrap: ok ($((SECONDS - start)) s)")
else
  echo "==> cached base system $rootfs (from $(date -r "$rootfs" +%F); --refresh for a new one)" >&2
fi

echo "==> copying the base system and the project" >&2
cp -a --reflink=auto "$rootfs" "$root"
# What the Debian installer writes: updates and security besides the release.
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
# The container's only way out (see the top).
echo "Acquire::http::Proxy \"http://127.0.0.1:$port\";" >"$root/etc/apt/apt.conf.d/00proxy"
# A network that intercepts TLS (as this host's egress does, or a corporate
# proxy) has its own CA, which every machine on it trusts: the host's local
# CAs go into the container's store (update-ca-certificates below), and
# pip, which ignores the system store, gets the host's /etc/pip.conf (there:
# cert = the system bundle).
local_cas=(/usr/local/share/ca-certificates/*.crt)
if [ -e "${local_cas[0]}" ]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp "${local_cas[@]}" "$root/usr/local/share/ca-certificates/"
  echo "    the host's local CAs: ${local_cas[*]##*/}" >&2
else
  local_cas=()
fi
if [ -f /etc/pip.conf ]; then
  cp /etc/pip.conf "$root/etc/pip.conf"
  echo "    the host's /etc/pip.conf" >&2
fi
mkdir -p "$root/root/pgfleet" "$root/root/.cargo"
if [ -n "$src" ]; then
  if git -c safe.directory="$src" -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
    # Tracked and untracked files that exist (not a deleted tracked one),
    # without what .gitignore leaves out (target/).
    git -c safe.directory="$src" -C "$src" ls-files -z -co --exclude-standard \
      | while IFS= read -r -d '' f; do
          if [ -e "$src/$f" ] || [ -L "$src/$f" ]; then printf '%s\0' "$f"; fi
        done \
      | tar -C "$src" --null -T - -cf - | tar -C "$root/root/pgfleet" -xf -
  else
    tar -C "$src" --exclude=./target -cf - . | tar -C "$root/root/pgfleet" -xf -
  fi
  echo "    the working tree of $src" >&2
else
  # A clone, so only what is committed goes in (no uncommitted or ignored
  # files, no target/); --no-local copies objects through the transport.
  head=$(git -c safe.directory="$repo" rev-parse HEAD)
  git -c safe.directory="$repo" clone --quiet --no-local --no-checkout "$repo" "$root/root/pgfleet"
  git -c safe.directory="$root/root/pgfleet" -C "$root/root/pgfleet" checkout --quiet --detach "$head"
  echo "    a clone of $repo at $(git -c safe.directory="$repo" log -1 --format='%h %s' "$head")" >&2
fi

# The container's network namespace, held by a sleeping process, with
# loopback up; the proxy binds there before the container starts.
unshare --net -- sleep infinity &
holder_pid=$!
netns=/proc/$holder_pid/ns/net
for _ in $(seq 100); do
  [ "$(readlink "$netns" 2>/dev/null)" != "$(readlink /proc/self/ns/net)" ] && break
  sleep 0.05
done
[ "$(readlink "$netns")" != "$(readlink /proc/self/ns/net)" ] || { echo "no network namespace" >&2; exit 1; }
nsenter --net="$netns" ip link set lo up

cat >"$work/proxy.py" <<'EOF'
# An HTTP proxy (CONNECT, and plain http:// requests for apt) whose listening
# socket is made in the container's network namespace and whose upstream
# connections are made in the host's: the socket keeps the namespace it was
# created in.
import ctypes, os, socket, sys, threading, time, urllib.parse

ns_path, port, log_path, ready_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
libc = ctypes.CDLL(None, use_errno=True)

def setns(fd):
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

host_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
setns(os.open(ns_path, os.O_RDONLY))
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(128)
setns(host_ns)

log_lock = threading.Lock()
log = open(log_path, "a", buffering=1)
def say(msg):
    with log_lock:
        log.write(time.strftime("%H:%M:%S ") + msg + "\n")

def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

def handle(client):
    upstream = None
    try:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = client.recv(65536)
            if not data or len(buf) > 65536:
                return
            buf += data
        method, target = buf.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        if method == "CONNECT":
            host, _, p = target.rpartition(":")
            upstream = socket.create_connection((host.strip("[]"), int(p)), timeout=30)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            rest = buf.split(b"\r\n\r\n", 1)[1]
        else:
            # Servers accept the absolute URI apt sends to a proxy: forward as is.
            url = urllib.parse.urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                raise ValueError("not a proxy request: " + target)
            upstream = socket.create_connection((url.hostname, url.port or 80), timeout=30)
            rest = buf
        upstream.settimeout(None)
        say(f"{method} {target}")
        if rest:
            upstream.sendall(rest)
        t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        t.start()
        pipe(client, upstream)
        t.join()
    except Exception as e:
        say(f"error: {e!r}")
        try:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
    finally:
        client.close()
        if upstream is not None:
            upstream.close()

open(ready_path, "w").close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
EOF
/usr/bin/python3 "$work/proxy.py" "$netns" "$port" "$work/proxy.log" "$work/proxy.ready" \
  2>"$work/proxy.err" &
proxy_pid=$!
for _ in $(seq 100); do
  [ -e "$work/proxy.ready" ] && break
  kill -0 "$proxy_pid" 2>/dev/null || break
  sleep 0.05
done
[ -e "$work/proxy.ready" ] || { cat "$work/proxy.err" >&2; echo "the registry proxy did not start" >&2; exit 1; }

# --keep-unit: no transient scope unit (that needs systemd on the host;
# systemd-test.sh does the same). --as-pid2: a stub init reaps what the demo
# leaves running in the background. CAP_NET_ADMIN: the tests make
# namespaces, veths, bridges and qdiscs (CAP_SYS_ADMIN, for their tmpfs
# mounts and `ip netns`, nspawn keeps anyway). /tmp on the container's disk,
# as on a Debian machine, not the tmpfs nspawn mounts by default.
nspawn=(systemd-nspawn --quiet --register=no --keep-unit --as-pid2 --console=pipe
  -D "$root" -M pgfleet-fresh --network-namespace-path="$netns"
  --capability=CAP_NET_ADMIN
  --bind-ro=/root/.rustup:/root/.rustup --bind-ro=/root/.cargo/bin:/root/.cargo/bin
  --setenv=HOME=/root
  --setenv=PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  --setenv=RUSTUP_HOME=/root/.rustup --setenv=CARGO_HOME=/root/.cargo
  --setenv=RUSTUP_AUTO_INSTALL=0
  --setenv=CARGO_HTTP_PROXY="http://127.0.0.1:$port" --setenv=PIP_PROXY="http://127.0.0.1:$port"
  --chdir=/root/pgfleet)
# (On a host whose /run is no tmpfs, nspawn says at exit "Attempted to
# remove disk file system under /run/systemd/nspawn/propagate/...": harmless.)
export SYSTEMD_NSPAWN_TMPFS_TMP=0

step() { # NAME SCRIPT: runs SCRIPT with bash in the container, logged
  local name=$1 script=$2 start=$SECONDS rc=0
  current=$name
  echo >&2
  echo "==> $name" >&2
  "${nspawn[@]}" /bin/bash -euo pipefail -c "$script" </dev/null \
    > >(tee -a "$work/$name.log") 2>&1 &
  nspawn_pid=$!
  wait "$nspawn_pid" || rc=$?
  nspawn_pid=""
  if [ $rc -eq 0 ]; then
    results+=("$name: ok ($((SECONDS - start)) s)")
  else
    results+=("$name: FAILED (exit $rc after $((SECONDS - start)) s, log: $work/$name.log)")
    failed+=("$name")
  fi
  return $rc
}

# The local CAs in place first (cargo --version does not need them).
step toolchain "${local_cas:+update-ca-certificates >/dev/null;} cargo --version; rustc --version" || exit 1

if [ -n "$only_setup" ]; then
  step setup 'bash scripts/setup; cargo --version' || exit 1
  # The first thing cargo build needs after that: a linker (cc) for a crate
  # without dependencies (no download, a second or two).
  step hello-world 'cd /tmp && rm -rf hello && cargo new -q hello && cd hello && cargo build -q && ./target/debug/hello' || true
  # What the tests do as root, tried once (needs iproute2 from scripts/setup):
  # a namespace joined to a bridge by a veth, a qdisc and a route in it, a
  # command in it as postgres, a tmpfs mount.
  step container-check '
    ip netns add pfprobe
    ip link add pfprobebr type bridge
    ip link add pfprobev type veth peer name eth0 netns pfprobe
    ip link set pfprobev master pfprobebr up
    ip -n pfprobe link set lo up
    ip -n pfprobe link set eth0 up
    ip netns exec pfprobe tc qdisc replace dev eth0 root tbf rate 80mbit burst 64kb latency 200ms
    ip -n pfprobe route add unreachable 198.18.0.9
    ip netns exec pfprobe runuser -u postgres -- true
    mkdir -p /tmp/pfprobe && mount -t tmpfs -o size=1m,mode=0700 tmpfs /tmp/pfprobe
    chown postgres: /tmp/pfprobe && umount /tmp/pfprobe && rmdir /tmp/pfprobe
    ip link del pfprobev; ip link del pfprobebr; ip netns del pfprobe
    echo "namespaces, veth, bridge, tc, tmpfs: ok"' || true
  [ ${#failed[@]} -eq 0 ] || exit 1
  echo >&2
  echo "fresh-machine test (--only-setup) passed" >&2
  exit 0
fi

# README: `sudo bash scripts/test` (root already; no sudo on a minbase).
step scripts-test 'bash scripts/test' || true
# The demo and its stop in one container run: the fleet lives as long as
# the container. Stopped means no process of postgres's left and the demo
# directory gone.
# shellcheck disable=SC2016 # expanded inside the container
step scripts-demo '
  bash scripts/demo
  bash scripts/demo stop
  [ ! -e /tmp/pgfleet-demo ] || { echo "scripts/demo stop left /tmp/pgfleet-demo" >&2; exit 1; }
  for _ in $(seq 50); do
    left=$(for p in /proc/[0-9]*; do [ "$(stat -c %U "$p" 2>/dev/null)" = postgres ] && echo "${p#/proc/}"; done || true)
    [ -z "$left" ] && break
    sleep 0.2
  done
  [ -z "$left" ] || { echo "scripts/demo stop left processes of postgres: $left" >&2; exit 1; }' || true

[ ${#failed[@]} -eq 0 ] || exit 1
echo >&2
echo "fresh-machine test passed" >&2
