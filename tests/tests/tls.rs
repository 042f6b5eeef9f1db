//! The control channel (DESIGN.md invariant 10): mutual TLS with the fleet
//! CA, reader and admin identities told apart, refusals that change
//! nothing, an audit line per changing call, and plaintext only on loopback.
// Helpers may unwrap like the tests they serve.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::agent::v1::agent_client::AgentClient;
use pgfleet_tests::{TestFleet, bin_path};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn pgfleet(args: &[&str]) -> std::process::Output {
    let out = Command::new(bin_path("pgfleet").unwrap()).args(args).output().unwrap();
    assert!(out.status.success(), "pgfleet {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn chown_postgres(p: &Path) {
    let u = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    nix::unistd::chown(p, Some(u.uid), Some(u.gid)).unwrap();
}

/// CA, agent, admin and reader certificates made by the real CLI, plus a
/// foreign CA's admin.
struct Pki {
    dir: PathBuf,
    other: PathBuf,
}

impl Pki {
    /// The fleet's own CA (node0, test-admin, test-reader: made by the
    /// harness with `pgfleet certs`), plus a foreign CA with an admin.
    fn new(fleet: &TestFleet) -> Pki {
        let dir = fleet.pki_dir();
        let other = fleet.dir().join("other-pki");
        let o = other.to_str().unwrap();
        pgfleet(&["certs", "init", o]);
        pgfleet(&["certs", "issue", "--dir", o, "--role", "admin", "mallory"]);
        Pki { dir, other }
    }

    fn read(&self, f: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(f)).unwrap()
    }

    fn client(&self, cert: Option<(Vec<u8>, Vec<u8>)>) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read("ca.crt")));
        match cert {
            Some((c, k)) => tls.identity(Identity::from_pem(c, k)),
            None => tls,
        }
    }

    fn identity(&self, name: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        Some((self.read(&format!("{name}.crt")), self.read(&format!("{name}.key"))))
    }
}

/// The host's agent configuration with another private key.
fn with_key(host: &pgfleet_tests::Host, key: &Path) -> String {
    let usual = host.pki_dir().join(format!("{}.key", host.node_name()));
    host.agent_config()
        .replace(&format!("key = \"{}\"", usual.display()), &format!("key = \"{}\"", key.display()))
}

/// The host's agent configuration serving plaintext (no [tls]).
fn plaintext(host: &pgfleet_tests::Host) -> String {
    let text = host.agent_config();
    let tls_start = text.find("[tls]\n").unwrap();
    let tls_end = text.find("[postgres]\n").unwrap();
    format!("insecure = true\n{}{}", &text[..tls_start], &text[tls_end..])
}

async fn channel(url: &str, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// Status of a call made with `tls`: Ok, or the failure's code (a refused
/// handshake is Unavailable or Unknown, depending on when it surfaces).
async fn get_status(url: &str, tls: ClientTlsConfig) -> Result<pb::NodeStatus, Code> {
    let ch = channel(url, tls).await.map_err(|_| Code::Unavailable)?;
    AgentClient::new(ch)
        .get_status(pb::GetStatusRequest::default())
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.code())
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_tells_identities_apart_and_refusals_change_nothing() {
    let fleet = TestFleet::new(1).unwrap();
    let host = fleet.host(0);
    host.initdb().unwrap();
    host.start_postgres().unwrap();
    host.query_one_string("SELECT pg_create_physical_replication_slot('keepme')").await.unwrap();

    let pki = Pki::new(&fleet);
    let audit = host.dir().join("audit.jsonl");
    host.start_agent().unwrap();
    let url = format!("https://{}", host.agent_addr());

    // An admin may look and change.
    let st = get_status(&url, pki.client(pki.identity("test-admin"))).await.unwrap();
    assert!(st.server_up);
    let admin = channel(&url, pki.client(pki.identity("test-admin"))).await.unwrap();
    let e = AgentClient::new(admin)
        .drop_slot(pb::DropSlotRequest { slot_name: "nosuch".into(), force: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "an admin passes authorization: {e:?}");

    // A reader may look, not change.
    assert!(get_status(&url, pki.client(pki.identity("test-reader"))).await.is_ok());
    let reader = channel(&url, pki.client(pki.identity("test-reader"))).await.unwrap();
    let e = AgentClient::new(reader.clone())
        .drop_slot(pb::DropSlotRequest { slot_name: "keepme".into(), force: true })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("test-reader") && e.message().contains("DropSlot"), "{e:?}");
    let e = AgentClient::new(reader)
        .start_rebuild(pb::StartRebuildRequest {
            upstream_host: "198.18.0.9".into(),
            upstream_port: 5432,
            replication_role: "r".into(),
            replication_password: "pw-never-used".into(),
            slot_name: "s".into(),
            application_name: "node0".into(),
            expected_system_identifier: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // No client certificate, a foreign CA's admin, plaintext: refused.
    assert!(get_status(&url, pki.client(None)).await.is_err(), "no client certificate accepted");
    let mallory = Some((
        std::fs::read(pki.other.join("mallory.crt")).unwrap(),
        std::fs::read(pki.other.join("mallory.key")).unwrap(),
    ));
    assert!(get_status(&url, pki.client(mallory)).await.is_err(), "foreign CA accepted");
    let plain = format!("http://{}", host.agent_addr());
    let plain_result = async {
        let ch = Endpoint::from_shared(plain).unwrap().timeout(Duration::from_secs(3)).connect().await.ok()?;
        AgentClient::new(ch).get_status(pb::GetStatusRequest::default()).await.ok()
    }
    .await;
    assert!(plain_result.is_none(), "plaintext client accepted by a TLS agent");

    // An expired certificate from the right CA: refused.
    let expired = expired_admin(&pki.dir);
    assert!(get_status(&url, pki.client(Some(expired))).await.is_err(), "expired certificate accepted");
    // Each refused handshake is in the agent's log, with why.
    assert_handshakes_logged(|| std::fs::read_to_string(host.agent_log()).unwrap_or_default());

    // Nothing changed: the slot the reader tried to drop is there.
    assert_eq!(
        host.query_one_string("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'keepme'")
            .await
            .unwrap(),
        "1"
    );

    // Audit: the refusal and the admin's call, no secret.
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["caller"] == "test-reader" && l["rpc"] == "DropSlot" && l["outcome"] == "PermissionDenied"), "{text}");
    assert!(lines.iter().any(|l| l["caller"] == "test-admin" && l["rpc"] == "DropSlot" && l["outcome"] == "NotFound"), "{text}");
    assert!(!text.contains("pw-never-used"), "{text}");

    // The CLI speaks TLS with the inventory's identity.
    let inv = fleet.dir().join("tls-inventory.toml");
    std::fs::write(
        &inv,
        format!(
            "state_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[[clusters]]\nname = \"main\"\n\
             [[clusters.nodes]]\nname = \"node0\"\nagent = \"{url}\"\nhost = \"{}\"\n",
            fleet.dir().join("state").display(),
            pki.dir.join("ca.crt").display(),
            pki.dir.join("test-admin.crt").display(),
            pki.dir.join("test-admin.key").display(),
            host.addr()
        ),
    )
    .unwrap();
    let out = Command::new(bin_path("pgfleet").unwrap())
        .args(["--inventory", inv.to_str().unwrap(), "status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["clusters"][0]["nodes"][0]["role"], "primary");
    // ... and a reader identity cannot drop a slot through it (exit 1).
    let out = Command::new(bin_path("pgfleet").unwrap())
        .args(["--inventory", inv.to_str().unwrap()])
        .args(["--tls-cert", pki.dir.join("test-reader.crt").to_str().unwrap()])
        .args(["--tls-key", pki.dir.join("test-reader.key").to_str().unwrap()])
        .args(["slots", "drop", "node0", "keepme"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not call DropSlot"));

}

/// An admin certificate of the fleet CA whose validity ended yesterday.
/// The server's log names each refused handshake and why: no client
/// certificate, one of a foreign CA, an expired one, plaintext (tonic's
/// own acceptor dropped them silently).
fn assert_handshakes_logged(log: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = log();
        let refused: Vec<&str> = text.lines().filter(|l| l.contains("TLS handshake refused")).collect();
        let said = |why: &str| refused.iter().any(|l| l.contains(why));
        let all = ["peer sent no certificates", "invalid peer certificate", "certificate expired", "InvalidContentType"];
        if all.iter().all(|why| said(why)) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "refused handshakes not logged with why:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn expired_admin(pki: &Path) -> (Vec<u8>, Vec<u8>) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.join("ca.crt")).unwrap(), ca_key).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "old-admin");
    p.distinguished_name.push(DnType::OrganizationalUnitName, "admin");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(30);
    p.not_after = now - time::Duration::days(1);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_unsafe_key_and_plaintext_off_loopback() {
    let fleet = TestFleet::new(1).unwrap();
    let host = fleet.host(0);
    let pki = Pki::new(&fleet);

    // A private key others may read: the agent does not start.
    let loose = pki.dir.join("loose.key");
    std::fs::copy(pki.dir.join("node0.key"), &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    chown_postgres(&loose);
    let cfg = host.dir().join("agent-loose.toml");
    std::fs::write(&cfg, with_key(host, &loose)).unwrap();
    chown_postgres(&cfg);
    let agent = bin_path("pgfleet-agent").unwrap();
    let err = host
        .run(&[agent.to_str().unwrap(), "--config", cfg.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("may be read by other users"), "{err}");

    // Plaintext on a non-loopback address: refused, naming the fix.
    let plain = host.dir().join("agent-plain.toml");
    std::fs::write(&plain, plaintext(host)).unwrap();
    let out = Command::new(&agent)
        .env_clear()
        .args(["--config", plain.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only allowed on a loopback address") && stderr.contains("[tls]"), "{stderr}");
    // On loopback it is allowed.
    std::fs::write(&plain, plaintext(host).replace(&host.agent_addr().to_string(), "127.0.0.1:7499")).unwrap();
    let out = Command::new(&agent)
        .env_clear()
        .args(["--config", plain.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `pgfleet serve` holds the same line as the agents: clients must chain to
/// the fleet CA (no certificate, a foreign CA, an expired one, plaintext:
/// refused), readers only read, and an unsafe key stops it at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_service_accepts_only_fleet_ca_clients_and_readers_only_read() {
    use pgfleet_proto::coordinator::v1 as cpb;
    use pgfleet_proto::coordinator::v1::coordinator_client::CoordinatorClient;

    let fleet = TestFleet::new(1).unwrap();
    let host = fleet.host(0);
    host.initdb().unwrap();
    host.start_postgres().unwrap();
    host.start_agent().unwrap();
    let pki = Pki::new(&fleet);
    let mut c = fleet.start_coordinator().unwrap();
    let status = async |tls: ClientTlsConfig| -> Result<cpb::FleetStatus, Code> {
        let ch = channel(&c.url, tls).await.map_err(|_| Code::Unavailable)?;
        CoordinatorClient::new(ch)
            .get_fleet_status(cpb::GetFleetStatusRequest::default())
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.code())
    };

    let st = status(pki.client(pki.identity("test-reader"))).await.unwrap();
    assert_eq!(st.clusters[0].primary.as_deref(), Some("node0"));
    assert!(status(pki.client(None)).await.is_err(), "no client certificate accepted");
    let mallory = Some((
        std::fs::read(pki.other.join("mallory.crt")).unwrap(),
        std::fs::read(pki.other.join("mallory.key")).unwrap(),
    ));
    assert!(status(pki.client(mallory)).await.is_err(), "foreign CA accepted");
    assert!(status(pki.client(Some(expired_admin(&pki.dir)))).await.is_err(), "expired certificate accepted");
    let plain = c.url.replace("https://", "http://");
    let plain_result = async {
        let ch = Endpoint::from_shared(plain).unwrap().timeout(Duration::from_secs(3)).connect().await.ok()?;
        CoordinatorClient::new(ch).get_fleet_status(cpb::GetFleetStatusRequest::default()).await.ok()
    }
    .await;
    assert!(plain_result.is_none(), "plaintext client accepted by pgfleet serve");
    assert_handshakes_logged(|| c.log_text());

    // A reader cannot start an operation, cancel one or drop a slot.
    let reader = CoordinatorClient::new(channel(&c.url, pki.client(pki.identity("test-reader"))).await.unwrap());
    let e = reader.clone().drop_slot(cpb::DropSlotRequest { node: "node0".into(), slot: "x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("test-reader") && e.message().contains("DropSlot"), "{e:?}");
    let e = reader.clone().cancel_operation(cpb::CancelOperationRequest { operation_id: "x".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Bad input through the API: INVALID_ARGUMENT naming it, nothing journaled.
    let admin = CoordinatorClient::new(channel(&c.url, pki.client(pki.identity("test-admin"))).await.unwrap());
    let e = admin.clone().drop_slot(cpb::DropSlotRequest { node: "node0".into(), slot: "x'); drop table t; --".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(!fleet.state_dir().join("main.journal").exists());
    let audit = std::fs::read_to_string(&c.audit_log).unwrap();
    assert!(audit.lines().any(|l| l.contains("\"caller\":\"test-reader\"") && l.contains("PermissionDenied")), "{audit}");

    // A private key others may read: refused at start-up, naming the file.
    c.kill();
    let key = fleet.pki_dir().join("coordinator.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = c.start().unwrap_err().to_string();
    assert!(e.contains("coordinator.key") && e.contains("chmod 600"), "{e}");
}
