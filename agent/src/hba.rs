//! pg_hba.conf upkeep: the one `host replication ROLE ADDR/32 scram-sha-256`
//! line a replica needs, added when missing, written atomically with the old
//! file kept beside it, and confirmed through `pg_hba_file_rules` before the
//! server reloads it (a file PostgreSQL would reject is put back untouched).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pgfleet_proto::RoleName;

/// The rule a replica at `addr` connecting as `role` needs: database
/// `replication` for streaming, `postgres` for pg_rewind's SQL connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationRule {
    pub database: &'static str,
    pub role: RoleName,
    pub addr: IpAddr,
}

impl ReplicationRule {
    fn cidr(&self) -> String {
        match self.addr {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        }
    }

    pub fn line(&self) -> String {
        format!(
            "host {} {} {} scram-sha-256",
            self.database,
            self.role,
            self.cidr()
        )
    }

    /// True when `line` is this rule (same type, database, role, single
    /// address and method), whatever its spacing.
    fn matches(&self, line: &str) -> bool {
        let line = line.split('#').next().unwrap_or("");
        let t: Vec<&str> = line.split_whitespace().collect();
        let addr_ok = |a: &str, rest: &[&str]| -> (bool, usize) {
            if a == self.cidr() {
                return (true, 1);
            }
            let single_mask = match self.addr {
                IpAddr::V4(_) => "255.255.255.255",
                IpAddr::V6(_) => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            };
            match a.parse::<IpAddr>() {
                Ok(ip) if ip == self.addr && rest.first() == Some(&single_mask) => (true, 2),
                _ => (false, 0),
            }
        };
        if t.len() < 5 || t[0] != "host" || t[1] != self.database || t[2] != self.role.as_str() {
            return false;
        }
        let (ok, used) = addr_ok(t[3], &t[4..]);
        ok && t.get(3 + used) == Some(&"scram-sha-256")
    }
}

/// Whether the file already has the rule.
pub fn has_rule(text: &str, rule: &ReplicationRule) -> bool {
    text.lines().any(|l| rule.matches(l))
}

/// The file with the rule inserted before the first rule line: pg_hba.conf
/// is first-match, so a broader line above it (a `reject`, or `md5` for
/// everyone) would otherwise decide for this replica. The inserted line
/// matches only replication connections of this role from this one address.
pub fn with_rule(text: &str, rule: &ReplicationRule, comment: &str) -> String {
    let mut out = String::with_capacity(text.len() + 128);
    let mut inserted = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if !inserted && !trimmed.is_empty() && !trimmed.starts_with('#') {
            out.push_str(&format!("# {comment}\n{}\n", rule.line()));
            inserted = true;
        }
        out.push_str(line);
    }
    if !inserted {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("# {comment}\n{}\n", rule.line()));
    }
    out
}

/// Writes `text` to `path` atomically (temporary file in the same directory,
/// fsync, rename), with the old file's permissions.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o600);
    let tmp = dir.join(format!(
        ".{}.pgfleet-tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Keeps a copy of the current file as `<path>.pgfleet-<stamp>`.
pub fn back_up(path: &Path, stamp: &str) -> std::io::Result<PathBuf> {
    let backup = PathBuf::from(format!("{}.pgfleet-{stamp}", path.display()));
    std::fs::copy(path, &backup)?;
    Ok(backup)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> ReplicationRule {
        ReplicationRule {
            database: "replication",
            role: RoleName::parse("repuser").unwrap(),
            addr: "198.18.0.3".parse().unwrap(),
        }
    }

    #[test]
    fn recognises_the_rule_in_either_spelling() {
        let r = rule();
        assert_eq!(r.line(), "host replication repuser 198.18.0.3/32 scram-sha-256");
        assert!(has_rule("host  replication repuser 198.18.0.3/32   scram-sha-256 # x\n", &r));
        assert!(has_rule("host replication repuser 198.18.0.3 255.255.255.255 scram-sha-256\n", &r));
        assert!(!has_rule("# host replication repuser 198.18.0.3/32 scram-sha-256\n", &r));
        assert!(!has_rule("host replication repuser 198.18.0.0/24 scram-sha-256\n", &r));
        assert!(!has_rule("host replication other 198.18.0.3/32 scram-sha-256\n", &r));
        assert!(!has_rule("host replication repuser 198.18.0.3/32 trust\n", &r));
    }

    #[test]
    fn inserts_before_the_first_rule_and_keeps_everything() {
        let text = "# comment\n\nlocal all all peer\nhost all all 0.0.0.0/0 reject\n";
        let out = with_rule(text, &rule(), "added by pgfleet");
        assert_eq!(
            out,
            "# comment\n\n# added by pgfleet\nhost replication repuser 198.18.0.3/32 scram-sha-256\n\
             local all all peer\nhost all all 0.0.0.0/0 reject\n"
        );
        assert!(has_rule(&out, &rule()));
        let empty = with_rule("# only comments", &rule(), "c");
        assert!(empty.ends_with("scram-sha-256\n") && empty.starts_with("# only comments\n"));
    }

    #[test]
    fn ipv6_uses_128() {
        let r = ReplicationRule {
            database: "replication",
            role: RoleName::parse("repuser").unwrap(),
            addr: "fd00::3".parse().unwrap(),
        };
        assert!(r.line().contains("fd00::3/128"));
    }
}
