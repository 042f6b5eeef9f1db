//! `pgfleet certs init DIR` and `pgfleet certs issue`: the fleet CA and the
//! certificates of agents (servers), admins and readers (clients), with no
//! openssl command line. Keys are written 0600 and never overwritten.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use pgfleet_proto::identity::CertRole;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite a key or certificate (remove it first if you mean it)")]
    Exists(PathBuf),
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid certificate name {0:?}: use a-z, 0-9, '.', '_' and '-'")]
    BadName(String),
    #[error("no fleet CA in {0}: run `pgfleet certs init {0}` first")]
    NoCa(PathBuf),
    #[error("invalid --san {0:?}: one DNS name (a-z, 0-9, '.', '-') or one IP address per --san")]
    InvalidSan(String),
}

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CertError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists(path.to_owned())
            } else {
                CertError::Io {
                    action: "creating",
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    f.write_all(text.as_bytes()).map_err(|source| CertError::Io {
        action: "writing",
        path: path.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        action: "reading",
        path: path.to_owned(),
        source,
    })
}

/// Creates the fleet CA in `dir`: ca.crt (give it to every agent and
/// client) and ca.key (0600; keep it off the database hosts).
pub fn init(dir: &Path, valid_days: i64) -> Result<Vec<PathBuf>, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertError::Exists(p.clone()));
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "pgfleet fleet CA");
    params.distinguished_name.push(DnType::OrganizationName, "pgfleet");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(valid_days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(vec![cert_path, key_path])
}

/// What `issue` makes.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub role: CertRole,
    pub name: String,
    /// Extra subject alternative names (host names or IP addresses) an
    /// agent is reached by.
    pub sans: Vec<String>,
    pub valid_days: i64,
}

/// Issues `<name>.crt` and `<name>.key` in `dir`, signed by its CA.
pub fn issue(dir: &Path, req: &IssueRequest) -> Result<Vec<PathBuf>, CertError> {
    let ok = !req.name.is_empty()
        && req.name.len() <= 64
        && req
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && !req.name.starts_with('.');
    if !ok {
        return Err(CertError::BadName(req.name.clone()));
    }
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if !ca_cert.exists() || !ca_key.exists() {
        return Err(CertError::NoCa(dir.to_owned()));
    }
    let ca_key = KeyPair::from_pem(&read(&ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert)?, ca_key)?;
    let (cert_path, key_path) = (dir.join(format!("{}.crt", req.name)), dir.join(format!("{}.key", req.name)));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertError::Exists(p.clone()));
        }
    }
    let mut sans = Vec::new();
    if req.role == CertRole::Agent {
        sans.push(req.name.clone());
    }
    for san in &req.sans {
        // One DNS name or IP address each: rcgen would write "x,IP:0.0.0.0"
        // as one odd DNS name rather than refuse it.
        let ok = !san.is_empty()
            && san.len() <= 253
            && (san.parse::<std::net::IpAddr>().is_ok()
                || san.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
        if !ok {
            return Err(CertError::InvalidSan(pgfleet_proto::shown(san)));
        }
    }
    sans.extend(req.sans.iter().cloned());
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, req.name.as_str());
    params.distinguished_name.push(DnType::OrganizationalUnitName, req.role.as_str());
    params.distinguished_name.push(DnType::OrganizationName, "pgfleet");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = match req.role {
        CertRole::Agent => vec![ExtendedKeyUsagePurpose::ServerAuth],
        CertRole::Admin | CertRole::Reader => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(req.valid_days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(vec![cert_path, key_path])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_and_never_overwrite() {
        let dir = std::env::temp_dir().join(format!("pgfleet-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init(&dir, 3650).unwrap();
        assert!(matches!(init(&dir, 3650), Err(CertError::Exists(_))));
        let req = IssueRequest {
            role: CertRole::Agent,
            name: "pg1".into(),
            sans: vec!["198.18.0.2".into()],
            valid_days: 365,
        };
        let files = issue(&dir, &req).unwrap();
        assert_eq!(files.len(), 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("pg1.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(issue(&dir, &req), Err(CertError::Exists(_))));
        let bad = IssueRequest { name: "../x".into(), ..req.clone() };
        assert!(matches!(issue(&dir, &bad), Err(CertError::BadName(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
