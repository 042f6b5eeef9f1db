//! The `pgfleet-agent` command line. In the library so that the packaging
//! can generate the man page and shell completions from the same `Command`.

use std::path::PathBuf;

use clap::Parser;

/// pgfleet agent: serves the local PostgreSQL's status and operations to the
/// pgfleet coordinator over gRPC.
#[derive(Debug, Parser)]
#[command(name = "pgfleet-agent", version, about)]
pub struct Args {
    /// Configuration file.
    #[arg(long, short, env = "PGFLEET_AGENT_CONFIG", default_value = "/etc/pgfleet/agent.toml")]
    pub config: PathBuf,
    /// Log format on stderr: "text" for people, "json" for log shippers.
    #[arg(long, env = "PGFLEET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
}
