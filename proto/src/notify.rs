//! systemd readiness: `READY=1` once the gRPC listener is bound, `STOPPING=1`
//! when shutdown begins, so the packaged unit can be `Type=notify` and
//! `systemctl start pgfleet-agent` returns only when the agent accepts
//! connections (or fails).
//!
//! The protocol is one datagram to the Unix socket named by `$NOTIFY_SOCKET`
//! (sd_notify(3)); a name starting with '@' is in the abstract namespace.
//! Without the variable (run by hand, by the test fleet, by another
//! supervisor) every call is a no-op. std's `UnixDatagram` is all it takes,
//! so there is no libsystemd link and no extra crate.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells the service manager the service is ready: its listener is bound.
/// Returns whether a manager was told.
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// Tells the service manager the service is shutting down.
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to
/// `$NOTIFY_SOCKET`; `Ok(false)` when the variable is unset or empty.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(socket) if !socket.is_empty() => notify_socket(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` as one datagram to `socket`: a filesystem path, or an
/// abstract name when it starts with '@'.
pub fn notify_socket(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = socket_addr(socket)?;
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::other(format!(
            "short write to {}: {sent} of {} bytes",
            socket.to_string_lossy(),
            state.len()
        )));
    }
    Ok(())
}

fn socket_addr(socket: &OsStr) -> io::Result<SocketAddr> {
    match socket.as_bytes() {
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        [b'/', ..] => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{NOTIFY_SOCKET}={} is neither an absolute path nor an abstract name (@…)",
                socket.to_string_lossy()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receive(rx: &UnixDatagram) -> String {
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pgfleet-notify-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sends_ready_and_stopping_to_a_path_socket() {
        let dir = temp_dir("path");
        let path = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_socket(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(receive(&rx), "READY=1");
        notify_socket(path.as_os_str(), "STOPPING=1").unwrap();
        assert_eq!(receive(&rx), "STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("pgfleet-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        notify_socket(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        assert_eq!(receive(&rx), "READY=1");
    }

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        // The variable is not set under `cargo test` (setting it would need
        // unsafe env mutation); skip when a supervisor did set it.
        if std::env::var_os(NOTIFY_SOCKET).is_none() {
            assert!(!ready().unwrap());
            assert!(!stopping().unwrap());
        }
    }

    #[test]
    fn a_missing_socket_is_an_error_and_a_relative_name_is_refused() {
        let dir = temp_dir("missing");
        let e = notify_socket(dir.join("absent.sock").as_os_str(), "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = notify_socket(OsStr::new("relative.sock"), "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
