//! The data directory (and tablespace directories) moved aside before a
//! rebuild: renamed to `<dir>.pgfleet-old-<UTC stamp>` in the same parent,
//! never deleted (DESIGN.md invariant 1). A rename within one filesystem is
//! atomic and costs no space or time, whatever the size.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("inspecting {path}: {source}")]
    Inspect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("moving {from} aside to {to}: {source}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("{to} already exists; refusing to overwrite a moved-aside copy")]
    TargetExists { to: PathBuf },
}

/// Where `dir` goes when moved aside with `stamp`.
pub fn moved_aside_path(dir: &Path, stamp: &str) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".pgfleet-old-{stamp}"));
    dir.with_file_name(name)
}

/// What is at a path we are about to fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occupancy {
    Missing,
    Empty,
    /// Has contents: must be moved aside first.
    Occupied,
}

pub fn occupancy(dir: &Path) -> Result<Occupancy, DataDirError> {
    let inspect = |source| DataDirError::Inspect {
        path: dir.to_owned(),
        source,
    };
    match std::fs::read_dir(dir) {
        Ok(mut it) => Ok(if it.next().is_some() {
            Occupancy::Occupied
        } else {
            Occupancy::Empty
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Occupancy::Missing),
        Err(e) => Err(inspect(e)),
    }
}

/// Renames `dir` to its moved-aside path. Refuses to overwrite an existing
/// copy (rename(2) would replace an empty directory silently).
pub fn move_aside(dir: &Path, stamp: &str) -> Result<PathBuf, DataDirError> {
    let to = moved_aside_path(dir, stamp);
    if to.symlink_metadata().is_ok() {
        return Err(DataDirError::TargetExists { to });
    }
    std::fs::rename(dir, &to).map_err(|source| DataDirError::Move {
        from: dir.to_owned(),
        to: to.clone(),
        source,
    })?;
    // Make the rename durable before anything is written in its place.
    if let Some(parent) = dir.parent()
        && let Ok(f) = std::fs::File::open(parent)
    {
        let _ = f.sync_all();
    }
    Ok(to)
}

/// Normalises an absolute path lexically; `None` for a relative path or one
/// with `..` (so it can be checked against allowed roots).
pub fn normalise(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    // A newline or an escape in a path would forge a log line (the paths
    // are logged as they are moved) and reach pg_basebackup's arguments.
    if !path.is_absolute() || p.chars().any(char::is_control) {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            std::path::Component::RootDir | std::path::Component::CurDir => {}
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::ParentDir | std::path::Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_aside_name() {
        assert_eq!(
            moved_aside_path(Path::new("/var/lib/postgresql/15/main"), "20261129T024100Z"),
            Path::new("/var/lib/postgresql/15/main.pgfleet-old-20261129T024100Z")
        );
    }

    #[test]
    fn normalise_refuses_escapes() {
        assert_eq!(normalise("/a/./b//c/").unwrap(), Path::new("/a/b/c"));
        assert_eq!(normalise("/a/b\nFORGED"), None);
        assert!(normalise("a/b").is_none());
        assert!(normalise("/a/../etc").is_none());
    }

    #[test]
    fn move_aside_keeps_contents_and_refuses_overwrite() {
        let base = std::env::temp_dir().join(format!("pgfleet-datadir-{}", std::process::id()));
        let d = base.join("data");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("PG_VERSION"), "15\n").unwrap();
        assert_eq!(occupancy(&d).unwrap(), Occupancy::Occupied);
        let to = move_aside(&d, "S1").unwrap();
        assert_eq!(std::fs::read_to_string(to.join("PG_VERSION")).unwrap(), "15\n");
        assert_eq!(occupancy(&d).unwrap(), Occupancy::Missing);
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(occupancy(&d).unwrap(), Occupancy::Empty);
        assert!(matches!(move_aside(&d, "S1"), Err(DataDirError::TargetExists { .. })));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
