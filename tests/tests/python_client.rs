//! A client in another language, as other systems would write one: Python
//! with grpcio, its stubs generated from `proto/` during the test, reads the
//! fleet's status, watches the fleet, and starts and follows a rebuild
//! through `pgfleet serve` over mutual TLS (tests/python/pgfleet_client.py);
//! a reader certificate is refused the rebuild. PostgreSQL then says whether
//! the rebuilt node streams.
//!
//! The Python virtual environment is made once per target directory (in
//! cargo's `CARGO_TARGET_TMPDIR`) with pinned versions, under a file lock so
//! that tests running at the same time wait for one another instead of
//! installing into the same directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{one, senders, start_agents, start_primary};
use nix::fcntl::{Flock, FlockArg};
use pgfleet_tests::TestFleet;
use pgfleet_tests::process::{describe, die_with_parent, failure_message, output_with_timeout};

/// grpcio and grpcio-tools of one release (the generated stubs require at
/// least the grpcio that generated them); protobuf as grpcio-tools 1.85
/// accepts it. All three understand proto3 `optional`.
const PIP_REQUIREMENTS: &[&str] = &["grpcio==1.85.1", "grpcio-tools==1.85.1", "protobuf==7.36.2"];
/// Creating the venv and downloading the wheels.
const VENV_SETUP_TIMEOUT: Duration = Duration::from_secs(600);
const PROTOC_TIMEOUT: Duration = Duration::from_secs(60);
/// The whole client run, a rebuild of an empty node included.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// `/usr/bin/python3` (Debian's, where scripts/setup installs venv support)
/// when present, else whichever `python3` is first on PATH.
fn system_python() -> PathBuf {
    let debian = Path::new("/usr/bin/python3");
    if debian.is_file() {
        debian.to_owned()
    } else {
        PathBuf::from("python3")
    }
}

/// Runs `cmd`, panicking with its command line and output unless it exits 0;
/// `hint` says what to do about a failure.
fn run_checked(mut cmd: Command, timeout: Duration, hint: &str) -> String {
    let line = describe(&cmd);
    die_with_parent(&mut cmd);
    let finished =
        output_with_timeout(&mut cmd, timeout).unwrap_or_else(|e| panic!("{line}: {e:#}\n{hint}"));
    if finished.timed_out || !finished.output.status.success() {
        panic!("{}\n{hint}", failure_message(&line, &finished));
    }
    String::from_utf8_lossy(&finished.output.stdout).into_owned()
}

/// The venv's python, with [`PIP_REQUIREMENTS`] installed: made once and
/// reused while the requirements stay the same. The marker file naming them
/// is written last, so a venv whose setup was interrupted is made again.
fn python_venv() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(tmp).unwrap();
    let venv = tmp.join("python-venv");
    let python = venv.join("bin/python");
    let marker = venv.join("pgfleet-requirements.txt");
    let wanted = PIP_REQUIREMENTS.join("\n") + "\n";

    let lock_file = File::create(tmp.join("python-venv.lock")).unwrap();
    // Held until the end of this function; dropped, it unlocks.
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    if fs::read_to_string(&marker).is_ok_and(|m| m == wanted) && python.is_file() {
        return python;
    }
    if venv.exists() {
        fs::remove_dir_all(&venv).unwrap();
    }
    let setup_hint = "the Python client needs python3 with venv support: run scripts/setup (as root), \
                      which installs python3 and python3-venv";
    let mut cmd = Command::new(system_python());
    cmd.args(["-m", "venv"]).arg(&venv);
    run_checked(cmd, VENV_SETUP_TIMEOUT, setup_hint);
    // pip keeps the environment: the machine's index, certificates and proxy.
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
    ])
    .args(PIP_REQUIREMENTS);
    run_checked(
        cmd,
        VENV_SETUP_TIMEOUT,
        "installing the Python client's packages from PyPI failed",
    );

    let partial = venv.join("pgfleet-requirements.txt.partial");
    fs::write(&partial, &wanted).unwrap();
    fs::rename(&partial, &marker).unwrap();
    python
}

/// A Python command with a clean environment: nothing from the test's
/// environment (a proxy, a PYTHONPATH) changes what the client does.
fn python_command(python: &Path) -> Command {
    let mut cmd = Command::new(python);
    cmd.env_clear()
        .env("LANG", "C.UTF-8")
        // No __pycache__ in the stubs' or the client's directory.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    cmd
}

/// Python stubs of the coordinator API (and the agent API it imports),
/// generated from the repository's proto/ into `out`.
fn generate_stubs(python: &Path, out: &Path) {
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto");
    fs::create_dir_all(out).unwrap();
    let mut cmd = python_command(python);
    cmd.current_dir(&protos)
        .args(["-m", "grpc_tools.protoc", "-I", "."])
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .args([
            "pgfleet/agent/v1/agent.proto",
            "pgfleet/coordinator/v1/coordinator.proto",
        ]);
    run_checked(
        cmd,
        PROTOC_TIMEOUT,
        "generating the Python stubs from proto/ failed",
    );
    assert!(
        out.join("pgfleet/coordinator/v1/coordinator_pb2_grpc.py")
            .is_file()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpc_client_reads_status_and_starts_and_follows_a_rebuild() {
    let python = python_venv();
    let fleet = TestFleet::new(2).unwrap();
    start_primary(&fleet, 0);
    start_agents(&fleet);
    let c = fleet.start_coordinator().unwrap();
    // Generated now, from the proto files of this tree, as a client would.
    let stubs = fleet.dir().join("python-stubs");
    generate_stubs(&python, &stubs);

    let pki = fleet.pki_dir();
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pgfleet_client.py");
    let mut cmd = python_command(&python);
    cmd.arg(&client)
        .args(["--url", c.url.trim_start_matches("https://")])
        .arg("--ca")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("test-admin.crt"))
        .arg("--key")
        .arg(pki.join("test-admin.key"))
        .arg("--reader-cert")
        .arg(pki.join("test-reader.crt"))
        .arg("--reader-key")
        .arg(pki.join("test-reader.key"))
        .arg("--stubs")
        .arg(&stubs)
        .args(["--primary", "node0", "--rebuild", "node1"]);
    let line = describe(&cmd);
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let finished = output_with_timeout(&mut cmd, CLIENT_TIMEOUT).unwrap();
    let report = failure_message(&line, &finished);
    eprintln!("{report}\n(in {:.1?})", started.elapsed());
    assert!(
        !finished.timed_out && finished.output.status.success(),
        "the Python client failed:\n{report}\n===== pgfleet serve =====\n{}",
        c.log_text()
    );
    let stdout = String::from_utf8_lossy(&finished.output.stdout);
    assert!(
        stdout.contains("Rebuild refused: PERMISSION_DENIED"),
        "{report}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("WatchOperation:") && l.contains("basebackup")),
        "{report}"
    );

    // What PostgreSQL itself says: node1 replays node0's WAL, streaming.
    assert_eq!(one(fleet.host(1), "select pg_is_in_recovery()").await, "t");
    let streaming = senders(fleet.host(0)).await;
    assert!(
        streaming
            .iter()
            .any(|(name, state, _)| name == "node1" && state == "streaming"),
        "node0's WAL senders: {streaming:?}"
    );
}
