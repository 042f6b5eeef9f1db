//! Shows an operation's events as they arrive, the same way whether the
//! operation runs in this process or in `pgfleet serve`: steps as lines on
//! stderr, a rebuild's copy as a progress bar on a terminal (plain lines
//! otherwise), and with --json the rebuild's events as JSON lines on stdout.

use std::collections::HashMap;

use pgfleet_proto::coordinator::v1 as pb;
use pgfleet_proto::coordinator::v1::operation_event::Event;

use crate::progress::JobView;
use crate::rebuild::Display;

#[derive(Debug)]
pub struct OperationView {
    display: Display,
    jobs: HashMap<String, JobView>,
}

impl OperationView {
    pub fn new(display: Display) -> Self {
        OperationView {
            display,
            jobs: HashMap::new(),
        }
    }

    pub fn show(&mut self, ev: &pb::OperationEvent) {
        let Some(event) = &ev.event else { return };
        match event {
            Event::Step(s) => {
                let line = match s.phase.as_str() {
                    "start" => format!("[{}] {}: {}", s.host, s.step, s.detail),
                    "done" => format!("[{}] {} done in {:.3}s: {}", s.host, s.step, s.seconds, s.detail),
                    other => format!("[{}] {} {other}: {}", s.host, s.step, s.detail),
                };
                self.line(&line);
            }
            Event::Note(n) if n.warning => self.line(&format!("warning: {}", n.text)),
            Event::Note(n) => {
                if self.display == Display::Json {
                    println!("{}", serde_json::json!({ "node": n.host, "note": n.text }));
                } else {
                    self.line(&format!("[{}] {}", n.host, n.text));
                }
            }
            Event::Job(j) => {
                if let Some(e) = &j.event {
                    let display = self.display;
                    self.jobs
                        .entry(j.node.clone())
                        .or_insert_with(|| JobView::new(&j.node, display))
                        .show(e);
                }
            }
            Event::Finished(_) => self.finish(),
        }
    }

    /// A line above any progress bar.
    fn line(&mut self, text: &str) {
        match self.jobs.values().find_map(|j| j.active_bar()) {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    pub fn finish(&mut self) {
        for j in self.jobs.values_mut() {
            j.finish();
        }
    }
}
