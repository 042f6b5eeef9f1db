//! What the command line prints: results on stdout (text for people, one
//! JSON document with `--json`), an operation's events on stderr as they
//! come, and how the command ended.

use std::io::Write;

use serde::Serialize;

use crate::error::CoordinatorError;
use crate::cli::render;
use crate::cli::view::OperationView;
use crate::ops::OpResult;
use crate::rebuild::Display;

/// How a command ended, beyond success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Some agents could not be reached; the output says which.
    Partial,
}

pub fn print_json<T: Serialize>(v: &T) -> Result<(), CoordinatorError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

pub fn print_text(s: &str) -> Result<(), CoordinatorError> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    Ok(())
}

/// How events are shown for a command with these flags.
pub fn display(json: bool, no_progress_bar: bool) -> Display {
    use std::io::IsTerminal;
    if json {
        Display::Json
    } else if !no_progress_bar && std::io::stderr().is_terminal() {
        Display::Bar
    } else {
        Display::Plain
    }
}

/// Prints an operation's result the way its command does.
pub fn print_result(r: &OpResult, json: bool) -> Result<(), CoordinatorError> {
    print_text(&if json { render::json(r) } else { render::text(r) })
}

/// Shows events until the operation's sender is gone.
pub async fn render_events(mut rx: tokio::sync::mpsc::UnboundedReceiver<pgfleet_proto::coordinator::v1::OperationEvent>, display: Display) {
    let mut view = OperationView::new(display);
    while let Some(ev) = rx.recv().await {
        view.show(&ev);
    }
    view.finish();
}
