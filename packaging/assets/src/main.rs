//! `gen-assets OUT_DIR`: the man pages and shell completions that the
//! packages ship, generated from the same clap `Command`s the binaries parse,
//! so they never drift from `--help`. Run by `packaging/build.sh`.
//!
//! Layout written (the packages map it onto /usr/share):
//!
//! ```text
//! OUT_DIR/man/man1/pgfleet.1, pgfleet-status.1, pgfleet-sync-set.1, …
//! OUT_DIR/man/man8/pgfleet-agent.8
//! OUT_DIR/completions/{bash,zsh,fish}/…
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        anyhow::bail!("usage: gen-assets OUT_DIR");
    };
    let out = PathBuf::from(out);
    // The CLI is a user command (section 1); the agent is a daemon run by
    // the system (section 8).
    let cli = pgfleet::cli::Cli::command();
    let agent = pgfleet_agent::cli::Args::command();
    write_man_pages(&cli, "1", &out.join("man/man1"), CLI_EXTRA)?;
    write_man_pages(&agent, "8", &out.join("man/man8"), AGENT_EXTRA)?;
    for cmd in [cli, agent] {
        write_completions(cmd, &out.join("completions"))?;
    }
    Ok(())
}

/// Sections the top page of `pgfleet` gets beyond what clap knows (roff).
const CLI_EXTRA: &str = r#".SH EXIT STATUS
0 success; 1 an operation failed or was refused; 2 bad usage, inventory or
argument (nothing was changed); 3 a fleet view is incomplete because some
agents could not be reached.
.SH FILES
.TP
.I /etc/pgfleet/inventory.toml
The inventory: clusters, nodes, agent endpoints, client TLS identity.
An example is in /usr/share/doc/pgfleet/examples/inventory.toml.
.TP
.I /var/lib/pgfleet
Cluster locks, the operation journal, the last synchronous setting
(state_dir in the inventory).
.SH SEE ALSO
.BR pgfleet\-agent (8)
"#;

/// Sections the page of `pgfleet-agent` gets beyond what clap knows (roff).
const AGENT_EXTRA: &str = r#".SH FILES
.TP
.I /etc/pgfleet/agent.toml
Configuration: listen address, TLS files, the PostgreSQL paths and port,
the service backend and unit, rebuild roots. Commented; kept on upgrade.
.TP
.I /usr/lib/systemd/system/pgfleet\-agent.service
The unit: runs the agent as postgres, Type=notify.
.TP
.I /usr/share/polkit\-1/rules.d/50\-pgfleet\-agent.rules
Lets postgres start, stop, restart and reload PostgreSQL units only.
.SH ENVIRONMENT
.TP
.B NOTIFY_SOCKET
Set by systemd: the agent sends READY=1 once it listens, STOPPING=1 when
it shuts down.
.TP
.B PGFLEET_LOG
Log filter (default info), e.g. debug.
.SH SIGNALS
SIGTERM and SIGINT stop the agent: it stops accepting calls and exits.
.SH SEE ALSO
.BR pgfleet (1),
.BR systemctl (1)
"#;

/// One page for the command and one for every subcommand, named like git's
/// (`pgfleet-sync-set.1`), each listing its own options; `extra` is added to
/// the top page.
fn write_man_pages(
    cmd: &clap::Command,
    section: &str,
    dir: &Path,
    extra: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = cmd.clone();
    // Subcommands inherit the name path (`pgfleet sync set`) only once built.
    cmd.build();
    write_page(&cmd, cmd.get_name(), section, dir)?;
    let top = dir.join(format!("{}.{section}", cmd.get_name()));
    let mut page =
        std::fs::read_to_string(&top).with_context(|| format!("reading {}", top.display()))?;
    page.push_str(extra);
    std::fs::write(&top, page).with_context(|| format!("writing {}", top.display()))
}

fn write_page(cmd: &clap::Command, name: &str, section: &str, dir: &Path) -> anyhow::Result<()> {
    let page = cmd.clone().display_name(name.to_owned());
    let path = dir.join(format!("{name}.{section}"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .section(section)
        .manual("pgfleet")
        .source(format!("pgfleet {}", env!("CARGO_PKG_VERSION")))
        .render(&mut buf)
        .with_context(|| format!("rendering {name}"))?;
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_page(sub, &format!("{name}-{}", sub.get_name()), section, dir)?;
    }
    Ok(())
}

fn write_completions(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    let name = cmd.get_name().to_owned();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let shell_dir = dir.join(shell.to_string());
        std::fs::create_dir_all(&shell_dir)
            .with_context(|| format!("creating {}", shell_dir.display()))?;
        clap_complete::generate_to(shell, &mut cmd, &name, &shell_dir)
            .with_context(|| format!("{shell} completion of {name}"))?;
    }
    Ok(())
}
