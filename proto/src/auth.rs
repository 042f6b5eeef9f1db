//! Who is calling, whether they may, and the audit trail of changes
//! (DESIGN.md invariant 10), shared by the agent and `pgfleet serve`.
//!
//! With mutual TLS the caller is the verified client certificate: its common
//! name is the identity, its organizational unit the role (reader, admin).
//! rustls has already checked the chain against the fleet CA and the
//! validity period before a request reaches us. Plaintext is only allowed on
//! loopback, and then the caller is the local admin.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::identity::{Access, CertRole};
use serde_json::json;
use tonic::{Request, Status};
use tracing::warn;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: CertRole,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Reads the caller from the request's verified client certificate.
pub fn caller_of<T>(req: &Request<T>, tls: bool) -> Result<Caller, Status> {
    if !tls {
        return Ok(Caller {
            name: "local".into(),
            role: CertRole::Admin,
        });
    }
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate: present one issued by the fleet CA"))?;
    let der = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate: present one issued by the fleet CA"))?;
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|_| Status::unauthenticated("the client certificate cannot be parsed"))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("unnamed")
        .to_owned();
    let ous: Vec<&str> = subject
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .collect();
    let role = match ous.as_slice() {
        [one] => CertRole::parse(one),
        _ => None,
    };
    let role = role.ok_or_else(|| {
        let name = crate::shown(&name);
        let status = if ous.len() > 1 {
            Status::permission_denied(format!(
                "certificate {name:?} names {} organizational units ({}): a pgfleet certificate carries exactly one role (OU admin or reader)",
                ous.len(),
                crate::shown(&ous.join(", "))
            ))
        } else {
            Status::permission_denied(format!(
                "certificate {name:?} carries no pgfleet role (OU admin or reader); issue one with `pgfleet certs issue`"
            ))
        };
        warn!(certificate = %name, error = %status.message(), "call refused: caller not identified");
        status
    })?;
    Ok(Caller { name, role })
}

/// Whether `caller` may call `method`, which needs `access` (a method the
/// service does not list needs `Change`); PERMISSION_DENIED naming both
/// otherwise (and logged).
pub fn authorize(caller: &Caller, method: &'static str, access: Option<Access>) -> Result<(), Status> {
    let access = access.unwrap_or(Access::Change);
    if caller.role.may(access) {
        return Ok(());
    }
    warn!(caller = %caller, method, "permission denied");
    Err(Status::permission_denied(format!(
        "{caller} may not call {method}: {}",
        match access {
            Access::Change => "it changes the fleet and needs an admin certificate",
            Access::Read => "server certificates are for serving, not calling",
        }
    )))
}

/// One JSON line per changing call, appended and flushed; no secret ever
/// reaches it (targets are names and addresses).
#[derive(Debug)]
pub struct Audit {
    file: Option<Mutex<std::fs::File>>,
    path: Option<PathBuf>,
}

impl Audit {
    pub fn open(path: Option<&std::path::Path>) -> std::io::Result<Self> {
        let Some(p) = path else {
            return Ok(Audit { file: None, path: None });
        };
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(p)?;
        Ok(Audit {
            file: Some(Mutex::new(f)),
            path: Some(p.to_owned()),
        })
    }

    /// A call refused before its caller was known (a certificate of the
    /// fleet CA without exactly one pgfleet role).
    pub fn record_unidentified(&self, method: &str, refusal: &Status) {
        self.write(json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "caller": "(unidentified)",
            "role": null,
            "rpc": method,
            "target": "(refused)",
            "outcome": format!("{:?}", refusal.code()),
            "error": refusal.message(),
        }));
    }

    fn write(&self, line: serde_json::Value) {
        let Some(file) = &self.file else { return };
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writeln!(f, "{line}") {
            warn!(error = %e, path = ?self.path, "cannot write the audit log");
        }
    }

    /// A change the process made on its own, with no caller (the agent's
    /// lease watchdog fencing its server): audited like a call.
    pub fn record_event(&self, action: &str, target: &str, outcome: Result<(), &str>) {
        self.write(json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "caller": "(this process)",
            "role": null,
            "rpc": action,
            "target": target,
            "outcome": if outcome.is_ok() { "ok" } else { "failed" },
            "error": outcome.err(),
        }));
    }

    pub fn record(&self, caller: &Caller, method: &str, target: &str, outcome: Result<(), &Status>) {
        let Some(file) = &self.file else { return };
        let line = json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "caller": caller.name,
            "role": caller.role.as_str(),
            "rpc": method,
            "target": target,
            "outcome": match outcome { Ok(()) => "ok".to_owned(), Err(s) => format!("{:?}", s.code()) },
            "error": outcome.err().map(|s| s.message().to_owned()),
        });
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writeln!(f, "{line}") {
            warn!(error = %e, path = ?self.path, "cannot write the audit log");
        }
    }
}
