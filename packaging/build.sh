#!/usr/bin/env bash
# Builds the packages, in one command:
#   target/packages/pgfleet-agent_VERSION-1_ARCH.deb   pgfleet_VERSION-1_ARCH.deb
#   target/packages/pgfleet-agent-VERSION-1.ARCH.rpm   pgfleet-VERSION-1.ARCH.rpm
#
# pgfleet-agent: the daemon, its systemd unit, /etc/pgfleet/agent.toml
# (conffile), the polkit rule, man page, completions. pgfleet: the CLI, man
# pages, completions, an example inventory, and the coordinator service's
# unit, /etc/pgfleet/coordinator.toml (conffile) and the pgfleet user.
#
# Steps: one release build (the two binaries and gen-assets), gen-assets
# writes man pages and completions from the binaries' clap definitions, then
# cargo-deb (metadata in agent/Cargo.toml and coordinator/Cargo.toml) makes
# the debs and rpmbuild (packaging/rpm/pgfleet.spec) the rpms, from the same
# files. Installs what it lacks: cargo-deb from crates.io, rpmbuild from apt
# (Debian's `rpm` package; needs root when missing).
#
# Environment: PGFLEET_PKG_OUT (default target/packages), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

CARGO_DEB_VERSION=3.8.0

log() { printf '==> %s\n' "$*" >&2; }

need_tools() {
  if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb $CARGO_DEB_VERSION from crates.io"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
  fi
  local apt=()
  command -v rpmbuild >/dev/null || apt+=(rpm)
  command -v dpkg-shlibdeps >/dev/null || apt+=(dpkg-dev)   # cargo-deb's $auto depends
  command -v gzip >/dev/null || apt+=(gzip)
  if [ ${#apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "missing: ${apt[*]}; run as root or: sudo apt-get install ${apt[*]}" >&2
      exit 1
    fi
    log "installing ${apt[*]} from apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt[@]}" >/dev/null
  fi
}

need_tools

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "cannot read the workspace version from Cargo.toml" >&2; exit 1; }
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target" ] || { echo "cannot find cargo's target directory" >&2; exit 1; }
bin=$target/release
assets=$bin/pgfleet-assets   # cargo-deb finds it as target/release/pgfleet-assets
out=${PGFLEET_PKG_OUT:-$target/packages}

log "release build of pgfleet, pgfleet-agent, gen-assets ($version)"
cargo build --profile release --locked -p pgfleet -p pgfleet-agent -p pgfleet-assets --bins

log "man pages and shell completions"
rm -rf "$assets"
"$bin/gen-assets" "$assets"
# -n: no name or time stamp inside, so the same input gives the same .gz.
gzip -9n "$assets"/man/man*/*.[18]

rm -rf "$out"
mkdir -p "$out"

log "deb: pgfleet-agent, pgfleet (cargo-deb)"
for pkg in pgfleet-agent pgfleet; do
  # --strip: the release profile keeps line tables, which cargo-deb would ship.
  cargo deb -p "$pkg" --no-build --profile release --strip --output "$out/"
done

log "rpm: pgfleet-agent, pgfleet (rpmbuild)"
rpmtop=$target/rpmbuild
rm -rf "$rpmtop"
mkdir -p "$rpmtop"
rpmbuild -bb --quiet \
  --define "_topdir $rpmtop" \
  --define "_rpmdir $out" \
  --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
  --define "pgfleet_version $version" \
  --define "pgfleet_root $root" \
  --define "pgfleet_bin $bin" \
  --define "pgfleet_assets $assets" \
  packaging/rpm/pgfleet.spec

log "built:"
ls -l "$out"
