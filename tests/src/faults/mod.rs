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
pub use schedule::{Generator, Schedule};

/// The summary of many runs: schedules, operations by outcome, faults,
/// violations by kind, and each violating seed.
pub fn summary(runs: &[(Schedule, anyhow::Result<Report>)]) -> String {
    let mut ops: BTreeMap<String, usize> = BTreeMap::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let (mut faults, mut acked, mut errors) = (0, 0, 0);
    let mut bad = Vec::new();
    let mut converge: Vec<f64> = Vec::new();
    // The largest growth of one agent's resident memory over a schedule,
    // and the largest it ended with (KiB).
    let (mut growth, mut largest) = (0i64, 0u64);
    for (s, r) in runs {
        match r {
            Ok(r) => {
                for (k, n) in &r.ops {
                    *ops.entry(k.clone()).or_default() += n;
                }
                faults += r.faults;
                acked += r.acked;
                converge.extend(r.converged_in.map(|d| d.as_secs_f64()));
                for (_, before, after) in &r.agent_rss_kib {
                    if *before > 0 && *after > 0 {
                        growth = growth.max(*after as i64 - *before as i64);
                        largest = largest.max(*after);
                    }
                }
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
    let _ = writeln!(t, "| agents' memory (RSS) | at most {:.1} MiB at the end, {:.1} MiB more than at the start |", largest as f64 / 1024.0, growth as f64 / 1024.0);
    let _ = writeln!(t, "| violations | {} |", kinds.values().sum::<usize>());
    for (k, n) in &kinds {
        let _ = writeln!(t, "| &nbsp; {k} | {n} |");
    }
    for b in bad {
        let _ = writeln!(t, "\n{b}");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use check::{Kind, Violation};

    #[test]
    fn the_summary_counts_outcomes_and_names_each_violating_seed() {
        let ok = Report { faults: 2, acked: 100, agent_rss_kib: vec![("node0".into(), 10_240, 12_288)], ..Report::default() };
        let mut bad = Report { faults: 1, ..Report::default() };
        bad.ops.insert("switchover exit 0".into(), 2);
        bad.violations.push(Violation { kind: Kind::LostCommit, detail: "x".into() });
        let runs = vec![(Schedule::generate(1, 3, 2), Ok(ok)), (Schedule::generate(2, 3, 2), Ok(bad)), (Schedule::generate(3, 3, 2), Err(anyhow::anyhow!("no namespace")))];
        let t = summary(&runs);
        for line in [
            "| schedules | 3 (1 could not run) |",
            "| &nbsp; switchover exit 0 | 2 |",
            "| faults | 3 |",
            "| acknowledged commits | 100 |",
            "12.0 MiB at the end, 2.0 MiB more",
            "| &nbsp; lost commit | 1 |",
            "seed 2: lost commit",
            "seed 3: the run itself failed: no namespace",
        ] {
            assert!(t.contains(line), "{line:?} missing from:\n{t}");
        }
    }
}
