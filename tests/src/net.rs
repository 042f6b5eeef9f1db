//! Network allocation and plumbing: one /24 per fleet, a bridge in the root
//! namespace, one namespace per host joined to it by a veth pair.
//!
//! Tests run in parallel, both as threads of one process and as separate
//! processes (nextest), so a fleet's network number N is claimed with an
//! exclusive `flock` on a file under [`LOCK_DIR`]. The kernel drops the lock
//! when its holder dies, so a killed test never blocks N; whoever takes N next
//! first removes what the dead holder left (namespaces, their processes, links,
//! the fleet directory). Every name carries N, so purging N can only touch
//! what an earlier harness created for that N.

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, RandomState};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::unistd::Pid;

use crate::process::{describe, kill_and_reap};

/// Where the per-N lock files live.
pub const LOCK_DIR: &str = "/tmp/pgfleet-test-locks";
/// Network numbers handed out: 198.18.N.0/24 for N in this range.
pub const NETS: std::ops::RangeInclusive<u8> = 1..=250;

/// An exclusively held network number N; released when dropped.
#[derive(Debug)]
pub struct NetLease {
    n: u8,
    _lock: Flock<File>,
}

impl NetLease {
    /// Claims a free N (trying every N once, from a random start) and purges
    /// whatever an earlier, killed run left behind for it.
    pub fn acquire() -> Result<NetLease> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let count = u64::from(*NETS.end() - *NETS.start()) + 1;
        let random = RandomState::new().hash_one(std::process::id());
        for k in 0..count {
            let offset = u8::try_from((random % count + k) % count).context("network offset")?;
            let n = *NETS.start() + offset;
            let path = lock_path(n);
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    purge(n).with_context(|| format!("removing leftovers of network {n}"))?;
                    return Ok(NetLease { n, _lock: lock });
                }
                Err((_, Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => bail!("flock {}: {e}", path.display()),
            }
        }
        bail!("all {count} test networks are in use (locks in {LOCK_DIR})")
    }

    pub fn n(&self) -> u8 {
        self.n
    }
}

fn lock_path(n: u8) -> PathBuf {
    PathBuf::from(format!("{LOCK_DIR}/net-{n}.lock"))
}

/// The fleet directory for network N.
pub fn fleet_dir(n: u8) -> PathBuf {
    PathBuf::from(format!("/tmp/pgfleet-test-{n}"))
}

pub fn bridge_name(n: u8) -> String {
    format!("pft{n}br")
}

pub fn netns_name(n: u8, host: usize) -> String {
    format!("pft{n}h{host}")
}

pub fn veth_name(n: u8, host: usize) -> String {
    format!("pft{n}v{host}")
}

/// The bridge's (the root namespace's) address in network N.
pub fn bridge_addr(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, n, 1)
}

/// Host `i`'s address in network N (.2 upwards; .1 is the bridge).
pub fn host_addr(n: u8, host: usize) -> Result<Ipv4Addr> {
    let last = u8::try_from(host + 2)
        .ok()
        .filter(|&b| b < 255)
        .ok_or_else(|| anyhow!("host index {host} does not fit in a /24"))?;
    Ok(Ipv4Addr::new(198, 18, n, last))
}

/// `198.18.N.0/24`, for pg_hba.conf.
pub fn subnet(n: u8) -> String {
    format!("198.18.{n}.0/24")
}

/// Runs `tc ARGS` in the root namespace; see [`ip`].
pub fn tc(args: &[&str]) -> Result<String> {
    tool("tc", args)
}

/// Runs `ip ARGS` (argv, no shell) and returns its stdout; a failure names the
/// command and carries its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    tool("ip", args)
}

fn tool(program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", describe(&cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{} printed non-UTF-8", describe(&cmd)))
}

/// Creates the bridge of network N with its address, up.
pub fn create_bridge(n: u8) -> Result<()> {
    let br = bridge_name(n);
    ip(&["link", "add", &br, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{}/24", bridge_addr(n)), "dev", &br])?;
    ip(&["link", "set", &br, "up"])?;
    Ok(())
}

/// Creates host `i`'s namespace, its veth pair (eth0 inside, enslaved to the
/// bridge outside) and its address; `lo` and `eth0` up.
pub fn create_host(n: u8, host: usize) -> Result<()> {
    let ns = netns_name(n, host);
    let veth = veth_name(n, host);
    let addr = format!("{}/24", host_addr(n, host)?);
    ip(&["netns", "add", &ns])?;
    ip(&[
        "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])?;
    ip(&["link", "set", &veth, "master", &bridge_name(n), "up"])?;
    ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Names of the existing network namespaces.
pub fn list_netns() -> Result<Vec<String>> {
    names_from_json(&ip(&["-j", "netns", "list"])?, "name")
}

/// Names of the links in the root namespace.
fn list_links() -> Result<Vec<String>> {
    names_from_json(&ip(&["-j", "link", "show"])?, "ifname")
}

/// `ip -j` prints a JSON array of objects (or nothing when there is none).
fn names_from_json(json: &str, key: &str) -> Result<Vec<String>> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(json).context("parsing `ip -j` output")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get(key)?.as_str().map(str::to_owned))
        .collect())
}

/// The processes in namespace `ns` (zombies are not listed).
pub fn netns_pids(ns: &str) -> Result<Vec<Pid>> {
    ip(&["netns", "pids", ns])?
        .split_whitespace()
        .map(|p| {
            p.parse()
                .map(Pid::from_raw)
                .with_context(|| format!("`ip netns pids {ns}` printed {p:?}"))
        })
        .collect()
}

/// True if `name` is `{prefix}` followed by a host number.
fn is_numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes everything of network N: kills the processes in its namespaces
/// (only harness-started servers and agents live there), deletes the veths,
/// namespaces and bridge, and the fleet directory. Used both to clear the
/// leftovers of a killed run and to tear a fleet down; keeps going after an
/// error so one stuck piece does not leave the rest behind.
pub fn purge(n: u8) -> Result<()> {
    let mut errors = Vec::new();
    let host_prefix = format!("pft{n}h");
    let namespaces: Vec<String> = list_netns()?
        .into_iter()
        .filter(|ns| is_numbered(ns, &host_prefix))
        .collect();
    for ns in &namespaces {
        let killed = netns_pids(ns).and_then(|pids| kill_and_reap(&pids, Duration::from_secs(10)));
        if let Err(e) = killed {
            errors.push(format!("killing processes in {ns}: {e:#}"));
        }
    }
    // Deleting the root-side veth also removes eth0 inside; done explicitly
    // because a namespace is destroyed asynchronously after `netns del`, and
    // its veth would otherwise linger and clash with a new one of that name.
    let veth_prefix = format!("pft{n}v");
    let bridge = bridge_name(n);
    let links = list_links()?;
    for link in links.iter().filter(|l| is_numbered(l, &veth_prefix)) {
        if let Err(e) = ip(&["link", "del", link]) {
            errors.push(format!("{e:#}"));
        }
    }
    for ns in &namespaces {
        if let Err(e) = ip(&["netns", "del", ns]) {
            errors.push(format!("{e:#}"));
        }
    }
    if links.contains(&bridge)
        && let Err(e) = ip(&["link", "del", &bridge])
    {
        errors.push(format!("{e:#}"));
    }
    let dir = fleet_dir(n);
    // A tmpfs a test mounted inside (Host::mount_tmpfs) and a killed run
    // left behind: remove_dir_all cannot remove a mount point.
    if let Err(e) = unmount_under(&dir) {
        errors.push(format!("{e:#}"));
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("\n"))
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first.
fn unmount_under(dir: &std::path::Path) -> Result<()> {
    let text = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(t) => t,
        Err(e) => bail!("reading /proc/self/mountinfo: {e}"),
    };
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    let mut errors = Vec::new();
    for p in points {
        let mut cmd = Command::new("umount");
        cmd.arg("-l").arg(&p);
        match cmd.output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => errors.push(format!(
                "umount -l {}: {}",
                p.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => errors.push(format!("running umount: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("\n"))
    }
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_interface_limit() {
        for name in [bridge_name(250), veth_name(250, 252), netns_name(250, 252)] {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn purge_matches_only_its_own_network() {
        assert!(is_numbered("pft1h0", "pft1h"));
        assert!(is_numbered("pft1h12", "pft1h"));
        assert!(!is_numbered("pft12h0", "pft1h"));
        assert!(!is_numbered("pft1h", "pft1h"));
        assert!(!is_numbered("pft1hx", "pft1h"));
    }

    #[test]
    fn host_addresses_skip_the_bridge_and_stay_in_the_subnet() {
        assert_eq!(host_addr(7, 0).unwrap(), Ipv4Addr::new(198, 18, 7, 2));
        assert_eq!(host_addr(7, 252).unwrap(), Ipv4Addr::new(198, 18, 7, 254));
        assert!(host_addr(7, 253).is_err());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo("/tmp/plain"), "/tmp/plain");
        assert_eq!(unescape_mountinfo("/x\\"), "/x\\");
    }

    #[test]
    fn ip_json_listing_may_be_empty() {
        assert!(names_from_json("", "name").unwrap().is_empty());
        let names = names_from_json(r#"[{"name":"pft1h0","id":0},{"name":"x"}]"#, "name").unwrap();
        assert_eq!(names, ["pft1h0", "x"]);
    }
}
