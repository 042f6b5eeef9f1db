//! `pgfleet-agent --config /etc/pgfleet/agent.toml`

use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use pgfleet_agent::cli::Args;
use pgfleet_agent::config::AgentConfig;
use pgfleet_agent::{AgentState, notify, server};
use tracing::info;

fn main() -> anyhow::Result<()> {
    // A child the agent must not leave behind runs under the agent binary
    // as its supervisor (agent::supervise).
    if let Some(code) = pgfleet_agent::supervise::run_if_requested() {
        std::process::exit(code);
    }
    let args = Args::parse();
    init_tracing(&args.log_format);
    let config = AgentConfig::load(&args.config)?;
    if args.check_config {
        println!("{}: configuration is valid", args.config.display());
        return Ok(());
    }
    // Before any thread exists: set*id() applies to the calling thread's
    // process only while it is the only thread.
    drop_privileges(&config.run_as)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let state = Arc::new(AgentState::new(config).context("opening the audit log")?);
        let listener = server::bind(&state).await?;
        // A lease a previous process held still counts: fenced on time.
        state.lease.load();
        pgfleet_agent::lease::spawn_watchdog(state.clone());
        // Type=notify: systemd reports the unit started once we listen.
        if let Err(e) = notify::ready() {
            tracing::warn!(error = %e, "cannot notify the service manager of readiness");
        }
        let shutdown = async {
            shutdown_signal().await;
            let _ = notify::stopping();
        };
        server::serve(state, listener, shutdown).await?;
        Ok(())
    })
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGFLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: under systemd stderr goes to the journal,
    // where escape codes are noise.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// PostgreSQL and its tools refuse to run as root; the agent does the same,
/// switching to `run_as` when started as root.
fn drop_privileges(run_as: &str) -> anyhow::Result<()> {
    use nix::unistd::{Uid, User, geteuid, initgroups, setgid, setuid};
    if !geteuid().is_root() {
        return Ok(());
    }
    let user = User::from_name(run_as)
        .with_context(|| format!("looking up user {run_as:?}"))?
        .with_context(|| format!("run_as user {run_as:?} does not exist; create it or set run_as in the config"))?;
    if user.uid == Uid::from_raw(0) {
        bail!("run_as must not be root: PostgreSQL's tools refuse to run as root");
    }
    let cname = std::ffi::CString::new(run_as).context("run_as contains a NUL byte")?;
    initgroups(&cname, user.gid).context("setting supplementary groups")?;
    setgid(user.gid).context("setgid")?;
    setuid(user.uid).context("setuid")?;
    info!(user = run_as, uid = user.uid.as_raw(), "dropped root privileges");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received, shutting down"),
    }
}
