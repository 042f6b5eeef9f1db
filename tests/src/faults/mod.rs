//! The randomized fault suite (issue #15): from a seed, a schedule of
//! operations and faults over a production-shaped fleet ([`schedule`]),
//! run with clients committing throughout ([`run`]), and checked from
//! outside pgfleet ([`check`]): no acknowledged synchronous commit lost,
//! never two timelines taking commits at once, every operation ended or
//! resumable, the fleet back to one primary with pgfleet commands only, no
//! orphan slot, no data directory gone, no process left behind.
//!
//! CI runs a few fixed seeds (tests/tests/faults.rs); `bash
//! tests/bench/faults.sh` runs many and prints a summary table, and
//! `--seed N` replays one.

pub mod check;
pub mod run;
pub mod schedule;

use std::collections::BTreeMap;
use std::fmt::Write as _;

pub use run::Report;
pub use schedule::Schedule;

/// The summary of many runs: schedules, operations by outcome, faults,
/// violations by kind, and each violating seed.
pub fn summary(runs: &[(Schedule, anyhow::Result<Report>)]) -> String {
    let mut ops: BTreeMap<String, usize> = BTreeMap::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let (mut faults, mut acked, mut errors) = (0, 0, 0);
    let mut bad = Vec::new();
    let mut converge: Vec<f64> = Vec::new();
    for (s, r) in runs {
        match r {
            Ok(r) => {
                for (k, n) in &r.ops {
                    *ops.entry(k.clone()).or_default() += n;
                }
                faults += r.faults;
                acked += r.acked;
                converge.extend(r.converged_in.map(|d| d.as_secs_f64()));
                for v in &r.violations {
                    *kinds.entry(v.kind.to_string()).or_default() += 1;
                }
                if !r.violations.is_empty() {
                    bad.push(format!("seed {}: {}", s.seed, r.violations.iter().map(|v| v.kind.to_string()).collect::<Vec<_>>().join(", ")));
                }
            }
            Err(e) => {
                errors += 1;
                bad.push(format!("seed {}: the run itself failed: {e:#}", s.seed));
            }
        }
    }
    converge.sort_by(f64::total_cmp);
    let mut t = String::new();
    let _ = writeln!(t, "| | |\n|---|---|");
    let _ = writeln!(t, "| schedules | {} ({} could not run) |", runs.len(), errors);
    let _ = writeln!(t, "| operations | {} |", ops.values().sum::<usize>());
    for (k, n) in &ops {
        let _ = writeln!(t, "| &nbsp; {k} | {n} |");
    }
    let _ = writeln!(t, "| faults | {faults} |");
    let _ = writeln!(t, "| acknowledged commits | {acked} |");
    if let (Some(med), Some(max)) = (converge.get(converge.len() / 2), converge.last()) {
        let _ = writeln!(t, "| convergence after healing | median {med:.1} s, max {max:.1} s |");
    }
    let _ = writeln!(t, "| violations | {} |", kinds.values().sum::<usize>());
    for (k, n) in &kinds {
        let _ = writeln!(t, "| &nbsp; {k} | {n} |");
    }
    for b in bad {
        let _ = writeln!(t, "\n{b}");
    }
    t
}
