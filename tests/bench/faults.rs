//! The fault suite's long run (outside CI): `bash tests/bench/faults.sh
//! [--schedules N] [--events N] [--first-seed S]` runs N schedules and
//! prints the summary table (schedules, operations by outcome, faults,
//! violations by kind, each violating seed); `--seed S` replays one
//! schedule and prints its report. `--generator v1|v2` picks the draws
//! (default the latest, v2; the seeds recorded before v2 replay with v1).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use pgfleet_tests::faults::{self, Generator, Schedule};

fn main() -> Result<()> {
    let mut schedules = 200u64;
    let mut events = 8usize;
    let mut first = 1000u64;
    let mut only: Option<u64> = None;
    let mut generator = Generator::LATEST;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--schedules" => schedules = value("--schedules")?.parse()?,
            "--events" => events = value("--events")?.parse()?,
            "--first-seed" => first = value("--first-seed")?.parse()?,
            "--seed" => only = Some(value("--seed")?.parse()?),
            "--generator" => {
                let v = value("--generator")?;
                generator = Generator::parse(&v).with_context(|| format!("--generator {v:?}: v1 or v2"))?;
            }
            other => bail!("unknown argument {other:?}; see tests/bench/faults.sh"),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let seeds: Vec<u64> = match only {
        Some(s) => vec![s],
        None => (first..first + schedules).collect(),
    };
    let started = Instant::now();
    let mut runs = Vec::new();
    for seed in seeds {
        let schedule = Schedule::generate_with(generator, seed, 3, events);
        println!("{schedule}");
        // The fleet is driven from this thread: its processes die with it.
        let report = runtime.block_on(faults::run::run(&schedule));
        match &report {
            Ok(r) => {
                println!("  -> {} ops, {} faults, {} acked, converged in {:?}, {} violations", r.ops.values().sum::<usize>(), r.faults, r.acked, r.converged_in, r.violations.len());
                for v in &r.violations {
                    println!("     {v}");
                }
                if only.is_some() {
                    println!("{r:#?}");
                }
            }
            Err(e) => println!("  -> could not run: {e:#}"),
        }
        runs.push((schedule, report));
    }
    println!("\n{} schedules of {events} events in {:.0} s\n", runs.len(), started.elapsed().as_secs_f64());
    println!("{}", faults::summary(&runs));
    Ok(())
}
