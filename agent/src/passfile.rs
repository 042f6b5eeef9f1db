//! The replication passfile (libpq's `.pgpass` format).
//!
//! pg_basebackup reads the password from it (never from argv or the
//! environment), and `-R` writes `passfile='<path>'` into the standby's
//! primary_conninfo, so the standby reads it again at every reconnect: it is
//! a lasting file, 0600, owned by the agent's user (DESIGN.md invariant 9).
//! The upstream check uses a throw-away one, so that nothing lasting is
//! written on the replica before its upstream is verified.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pgfleet_proto::RoleName;

use crate::secret::Secret;

/// libpq's escaping inside a passfile field: `\` and `:`.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

/// The line for replication connections to `host:port` as `role`.
pub fn line(host: &str, port: u16, role: &RoleName, password: &Secret) -> String {
    format!(
        "{}:{port}:*:{}:{}",
        escape(host),
        escape(role.as_str()),
        escape(password.expose())
    )
}

fn key(host: &str, port: u16, role: &RoleName) -> String {
    format!("{}:{port}:*:{}:", escape(host), escape(role.as_str()))
}

/// Writes (or updates) the lasting passfile: the line for this upstream
/// replaces an older one for the same host, port and role; other lines stay.
/// Atomic (temporary file, fsync, rename) and 0600 from its first byte.
pub fn store(
    path: &Path,
    host: &str,
    port: u16,
    role: &RoleName,
    password: &Secret,
) -> std::io::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let k = key(host, port, role);
    let mut text: String = old
        .lines()
        .filter(|l| !l.starts_with(&k))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&line(host, port, role, password));
    text.push('\n');
    let tmp = path.with_extension("pgfleet-tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// A passfile that exists only while this value lives.
#[derive(Debug)]
pub struct TempPassfile {
    path: PathBuf,
}

impl TempPassfile {
    pub fn create(host: &str, port: u16, role: &RoleName, password: &Secret) -> std::io::Result<Self> {
        let dir = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = dir.join(format!("pgfleet-check-{}-{nanos}.pgpass", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(line(host, port, role, password).as_bytes())?;
        f.write_all(b"\n")?;
        Ok(TempPassfile { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempPassfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_replaces_only_its_line_and_is_private() {
        let dir = std::env::temp_dir().join(format!("pgfleet-passfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("pgpass");
        std::fs::write(&p, "other:5432:*:x:y\n").unwrap();
        let role = RoleName::parse("repuser").unwrap();
        store(&p, "10.0.0.1", 5432, &role, &Secret::new("a:b\\c".into()).unwrap()).unwrap();
        store(&p, "10.0.0.1", 5432, &role, &Secret::new("new".into()).unwrap()).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text, "other:5432:*:x:y\n10.0.0.1:5432:*:repuser:new\n");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            line("h", 1, &role, &Secret::new("a:b\\c".into()).unwrap()),
            "h:1:*:repuser:a\\:b\\\\c"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temp_passfile_goes_away() {
        let role = RoleName::parse("r").unwrap();
        let t = TempPassfile::create("h", 1, &role, &Secret::new("pw".into()).unwrap()).unwrap();
        let p = t.path().to_owned();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        drop(t);
        assert!(!p.exists());
    }
}
