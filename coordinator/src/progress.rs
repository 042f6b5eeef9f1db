//! Shows a job's events: a live progress bar on a terminal (bytes, total,
//! rate, ETA, current step), plain lines on stderr otherwise, or one JSON
//! object per event on stdout for programs.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pgfleet_proto::agent::v1 as pb;
use pgfleet_proto::agent::v1::job_event::Event;
use serde_json::json;

use crate::fleet_status::bytes;
use crate::rebuild::Display;

/// Plain mode prints progress at most this often.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct JobView {
    node: String,
    display: Display,
    bar: Option<ProgressBar>,
    last_plain: Option<Instant>,
    complete_shown: bool,
}

impl JobView {
    pub fn new(node: &str, display: Display) -> Self {
        JobView {
            node: node.to_owned(),
            display,
            bar: None,
            last_plain: None,
            complete_shown: false,
        }
    }

    /// The progress bar while one is drawn, to print lines above it.
    pub fn active_bar(&self) -> Option<&ProgressBar> {
        self.bar.as_ref().filter(|b| !b.is_finished())
    }

    fn bar(&mut self) -> &ProgressBar {
        self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix} {msg:12} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(format!("[{}]", self.node));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        })
    }

    fn line(&mut self, text: String) {
        match (&self.bar, self.display) {
            (Some(b), Display::Bar) => b.println(text),
            _ => eprintln!("{text}"),
        }
    }

    pub fn show(&mut self, ev: &pb::JobEvent) {
        let Some(event) = &ev.event else { return };
        if self.display == Display::Json {
            println!("{}", event_json(&self.node, ev, event));
            return;
        }
        let node = self.node.clone();
        match event {
            Event::StepStarted(s) => {
                if self.display == Display::Bar {
                    self.bar().set_message(s.step.clone());
                }
                self.line(format!("[{node}] {}: {}", s.step, s.description));
            }
            Event::StepFinished(s) => {
                self.line(format!("[{node}] {} done in {:.2}s: {}", s.step, s.seconds, s.detail));
            }
            Event::Progress(p) => match self.display {
                Display::Bar => {
                    let b = self.bar();
                    if p.total_bytes > 0 {
                        b.set_length(p.total_bytes);
                    }
                    b.set_position(p.done_bytes);
                }
                _ => {
                    let complete = p.total_bytes > 0 && p.done_bytes >= p.total_bytes;
                    let due = self
                        .last_plain
                        .is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY);
                    if (due || complete) && !self.complete_shown {
                        self.complete_shown = complete;
                        self.last_plain = Some(Instant::now());
                        let pct = (p.done_bytes as f64 * 100.0 / p.total_bytes.max(1) as f64).min(100.0);
                        eprintln!(
                            "[{node}] copied {} of {} ({pct:.0}%)",
                            bytes(p.done_bytes),
                            bytes(p.total_bytes)
                        );
                    }
                }
            },
            Event::Log(l) => {
                // pg_basebackup prefixes its own lines with its name already.
                let prefix = format!("{}: ", l.source);
                let text = l.line.strip_prefix(&prefix).unwrap_or(&l.line);
                self.line(format!("[{node}] {}: {text}", l.source));
            }
            Event::Finished(f) => {
                if let Some(b) = &self.bar {
                    b.finish_and_clear();
                }
                if f.success {
                    self.line(format!("[{node}] job finished"));
                }
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn event_json(node: &str, ev: &pb::JobEvent, event: &Event) -> serde_json::Value {
    let (kind, body) = match event {
        Event::StepStarted(s) => ("step_started", json!({ "step": s.step, "description": s.description })),
        Event::StepFinished(s) => (
            "step_finished",
            json!({ "step": s.step, "seconds": s.seconds, "detail": s.detail }),
        ),
        Event::Progress(p) => (
            "progress",
            json!({ "done_bytes": p.done_bytes, "total_bytes": p.total_bytes }),
        ),
        Event::Log(l) => ("log", json!({ "source": l.source, "line": l.line })),
        Event::Finished(f) => (
            "finished",
            json!({
                "success": f.success,
                "failed_step": f.failed_step,
                "error": f.error,
                "stderr_tail": f.stderr_tail,
                "moved_aside_to": f.moved_aside_to,
                "log_file": f.log_file,
                "slot_created": f.slot_created,
                "node_changed": f.node_changed,
                "replayed_lsn": f.replayed_lsn,
            }),
        ),
    };
    json!({ "node": node, "seq": ev.seq, "time": ev.time, "type": kind, "event": body })
}
