//! The leader watches every cluster's primary (issue #14): a look at each
//! cluster every [`LOOK_EVERY`], fed to its `Detector`, each change of
//! verdict logged (a failure as an error, with what was seen). Only the
//! leader watches: a follower's view would be a second voice with nothing
//! to act on.
//!
//! A cluster with `auto_failover = true` is failed over when its verdict
//! turns to failed: the same operation `pgfleet failover` runs (lock,
//! journal, typed plan, the same checks), begun by this process. It fences
//! the old primary through its agent and promotes only a standby that
//! provably holds every acknowledged commit; what it refuses (the old
//! primary's agent gone in an asynchronous cluster: it can be neither
//! fenced nor isolated; no proof) is logged, and nothing is tried again
//! until the verdict changes.
//!
//! A former primary that the last failover isolated and that comes back
//! still running as a primary, on its old timeline, is made a standby of
//! the new one (`pgfleet rejoin`, begun here): never a second primary.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::{debug, error, info, warn};

use pgfleet_proto::agent::v1 as pb;

use crate::client::{self, Deadlines};
use crate::detect::{Detector, Verdict};
use crate::error::CoordinatorError;
use crate::ops::exec::MoveError;
use crate::fleet_status::{self, ClusterReport, NodeReport, Role};
use crate::serve::lease::Standing;
use pgfleet_proto::sync::SyncSpec;
use crate::inventory::Cluster;
use crate::journal;
use crate::ops::{self, CancelState, OpRequest, OpResult};
use crate::serve::registry::{self, Running};
use pgfleet_proto::ClusterName;
use crate::serve::State;

/// How often each cluster is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// A look does not wait on a dead host for longer than this: its agent's
/// silence is the answer. (Probes too: the agent gives up on the primary
/// after 700 ms, inside it.) The calls themselves use the service's
/// deadlines: an agent's channel is kept and shared with the operations,
/// and its per-call timeout is set when it is made.
const LOOK_LIMIT: Duration = Duration::from_secs(1);

pub fn spawn(state: Arc<State>) {
    tokio::spawn(async move {
        // Per cluster: its detector, the last verdict's kind, and whether
        // this failure was acted on already (once per failure; a pause
        // lifted while it lasts acts then).
        let mut detectors: HashMap<String, (Detector, &'static str, bool)> = HashMap::new();
        // Clusters with an automatic operation running (one at a time), and
        // when each cluster's last one ended.
        let busy: Busy = Arc::default();
        // When a stale primary's rejoin was last tried, so that a refusal
        // is not repeated twice a second.
        let mut rejoin_tried: HashMap<String, Instant> = HashMap::new();
        // Each cluster's primary position at the last look that reached it:
        // what max_lag_on_failover is measured from.
        let mut last_lsn: HashMap<String, pgfleet_proto::Lsn> = HashMap::new();
        // Former primaries left fenced because their failover accepted a
        // loss: said once.
        let mut told: HashSet<String> = HashSet::new();
        // When each node was last restarted in place.
        let mut restarted: HashMap<String, Instant> = HashMap::new();
        // Clusters whose failover waits for the old primary's lease: said
        // once.
        let mut waiting: HashSet<String> = HashSet::new();
        let mut tick = tokio::time::interval(LOOK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Looks since this process became the leader (None: it is not).
        let mut leading: Option<u32> = None;
        loop {
            tick.tick().await;
            if !state.leadership.is_leader() {
                // A new leader starts from what it sees itself.
                detectors.clear();
                leading = None;
                continue;
            }
            let n = leading.map_or(0, |n| n + 1);
            leading = Some(n);
            // At election and twice more, 2 s apart: the dead leader's
            // operation reads interrupted once its lock's lease is gone,
            // which may be a moment after this process was elected.
            if n.is_multiple_of(4) && n <= 8 {
                resume_interrupted(&state, &busy).await;
            }
            // A look counts from when it started: a dead host makes it last
            // its deadlines, which must not delay what it saw.
            let looked_at = Instant::now();
            let clusters = &state.inventory.clusters;
            let d = state.deadlines;
            let looks = join_all(clusters.iter().map(|c| fleet_status::gather_cluster_within(c, d, LOOK_LIMIT))).await;
            for (c, look) in clusters.iter().zip(looks) {
                // Read every look: `pgfleet pause` on any coordinator, or
                // a policy set before this one became the leader, counts.
                let policy = crate::policy::current(&state.inventory.store, c).await;
                if !detectors.contains_key(c.name.as_str()) {
                    let remembered = journal::get_value(&state.inventory.store, "primary", c.name.as_str()).await.ok().flatten();
                    detectors.insert(c.name.to_string(), (Detector::remembering(c.failure_timeout, remembered), "unknown", false));
                }
                let Some((detector, last, acted)) = detectors.get_mut(c.name.as_str()) else { continue };
                let watched = detector.primary().map(str::to_owned);
                // No primary answered: the second opinion, from every
                // standby whose agent answers.
                let opinions = match (&look.primary, detector.primary()) {
                    (None, Some(p)) => opinions(c, &look, p, d).await,
                    _ => Vec::new(),
                };
                let verdict = detector.observe(c, &look, &opinions, looked_at);
                // The primary as the next leader (or this process restarted)
                // will find it, when it changed.
                if let Some(p) = detector.primary()
                    && watched.as_deref() != Some(p)
                    && let Err(e) = journal::put_value(&state.inventory.store, "primary", c.name.as_str(), p).await
                {
                    warn!(cluster = %c.name, "cannot record the primary {p}: {e}");
                }
                // The primary's lease: held while a failover of this cluster
                // may promote without proof and the primary answers; kept
                // (not released) while it does not.
                if !(policy.acts() && c.max_lag_on_failover.is_some()) {
                    state.leases.unwant(c.name.as_str());
                } else if let Some(p) = &look.primary {
                    if look.nodes.iter().find(|r| r.name == *p).is_none_or(needs_lease) {
                        state.leases.want(c, p);
                    } else {
                        state.leases.unwant(c.name.as_str());
                    }
                }
                if let Some(lsn) = look.primary.as_ref().and_then(|p| look.nodes.iter().find(|r| r.name == *p)).and_then(|r| r.current_lsn) {
                    last_lsn.insert(c.name.to_string(), lsn);
                }
                // Restart in place: the primary's postmaster is gone, its
                // agent answers, and it was not restarted in the window.
                if c.restart_in_place
                    && policy.acts()
                    && matches!(verdict, Verdict::Suspect { .. } | Verdict::Failed { .. })
                    && let Some(p) = detector.primary().map(str::to_owned)
                    && look.nodes.iter().any(|r| r.name == p && r.reachable && !r.server_up)
                    && restarted.get(&p).is_none_or(|t| t.elapsed() >= RESTART_WINDOW)
                    && let Ok(node) = pgfleet_proto::NodeName::parse(&p)
                {
                    let req = OpRequest::Restart { node, dry_run: false };
                    if automatic(&state, &busy, c.name.clone(), req, "restart") {
                        restarted.insert(p.clone(), Instant::now());
                        state.decisions.decide(
                            c.name.as_str(),
                            "detected",
                            &format!("the postmaster of primary {p} is gone and its agent answers: restarting it in place"),
                            None,
                        );
                    }
                }
                if verdict.kind() != *last {
                    report(c.name.as_str(), &policy, &verdict, last);
                    *last = verdict.kind();
                    *acted = false;
                    if matches!(verdict, Verdict::Failed { .. }) {
                        state.decisions.decide(c.name.as_str(), "detected", &verdict.describe(), None);
                        if !policy.acts() {
                            state.decisions.decide(c.name.as_str(), "not-acting", &policy.describe(), None);
                        }
                    }
                }
                // A look begun before the cluster's last automatic operation
                // ended (a restart in place, say) says nothing about after.
                let fresh = busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).ended.get(c.name.as_str()).is_none_or(|t| *t < looked_at);
                if !matches!(verdict, Verdict::Failed { .. }) {
                    waiting.remove(c.name.as_str());
                }
                if matches!(verdict, Verdict::Failed { .. }) && policy.acts() && !*acted && fresh {
                    // Its agent gone, a primary under a lease may still take
                    // writes until the lease runs out: nothing is promoted
                    // before.
                    let old = detector.primary().map(str::to_owned);
                    let agent_gone = old.as_deref().is_some_and(|p| look.nodes.iter().any(|r| r.name == p && !r.reachable));
                    let standing = old.as_deref().map_or(Standing::NotHeld, |p| state.leases.standing(c.name.as_str(), p));
                    match standing {
                        Standing::Runs { left } if agent_gone => {
                            if waiting.insert(c.name.to_string()) {
                                state.decisions.decide(
                                    c.name.as_str(),
                                    "waiting",
                                    &format!(
                                        "the agent of {} does not answer and its lease runs out in {:.1}s: it may take \
                                         writes until then (its agent fences it), so nothing is promoted before",
                                        old.as_deref().unwrap_or_default(),
                                        left.as_secs_f64()
                                    ),
                                    None,
                                );
                            }
                        }
                        _ => {
                            let fenced_by_lease = agent_gone && matches!(standing, Standing::RunOut { .. });
                            let req = OpRequest::Failover {
                                cluster: Some(c.name.clone()),
                                to: None,
                                fenced: false,
                                accept_data_loss: false,
                                dry_run: false,
                                last_primary_lsn: last_lsn.get(c.name.as_str()).map(ToString::to_string),
                                fenced_by_lease,
                            };
                            // Tried again at the next look while another
                            // automatic operation holds the cluster.
                            *acted = automatic(&state, &busy, c.name.clone(), req, "failover");
                            if *acted && let (true, Standing::RunOut { ago }) = (fenced_by_lease, standing) {
                                state.decisions.decide(
                                    c.name.as_str(),
                                    "fenced",
                                    &format!(
                                        "the lease on {} ran out {:.1}s ago: its agent fenced it, or its host is gone",
                                        old.as_deref().unwrap_or_default(),
                                        ago.as_secs_f64()
                                    ),
                                    None,
                                );
                            }
                        }
                    }
                }
                if policy.acts()
                    && let Some(p) = look.primary.clone()
                {
                    for r in look.nodes.iter().filter(|r| r.name != p && r.reachable && r.role == Role::Down) {
                        let key = format!("{}/{}", c.name, r.name);
                        if rejoin_tried.get(&key).is_some_and(|t| t.elapsed() < RETRY_REJOIN) {
                            continue;
                        }
                        rejoin_tried.insert(key.clone(), Instant::now());
                        if let Some(detail) = rejoin_former(&state, &busy, c, &r.name, &p, &mut told).await {
                            state.decisions.decide(c.name.as_str(), "detected", &detail, None);
                        } else if busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).running.contains(c.name.as_str()) {
                            rejoin_tried.remove(&key);
                        }
                    }
                }
                if policy.acts() {
                    for stale in stale_primaries(&look) {
                        let key = format!("{}/{stale}", c.name);
                        if rejoin_tried.get(&key).is_some_and(|t| t.elapsed() < RETRY_REJOIN) {
                            continue;
                        }
                        rejoin_tried.insert(key, Instant::now());
                        let Ok(node) = pgfleet_proto::NodeName::parse(&stale) else { continue };
                        let req = OpRequest::Rejoin { node, rebuild_if_needed: false, dry_run: false };
                        if automatic(&state, &busy, c.name.clone(), req, "rejoin") {
                            state.decisions.decide(
                                c.name.as_str(),
                                "detected",
                                &format!("{stale} is back as a primary on an older timeline: making it a standby"),
                                None,
                            );
                        } else {
                            rejoin_tried.remove(&format!("{}/{stale}", c.name));
                        }
                    }
                }
            }
        }
    });
}

/// Whether a failover of this primary could need its lease: it cannot be
/// fenced by isolation when its commits wait for no standby, or for any
/// standby at all (`*`). Unknown settings: held, to be safe.
fn needs_lease(primary: &NodeReport) -> bool {
    match primary.synchronous_standby_names.as_deref().map(SyncSpec::parse) {
        Some(Ok(spec)) => !spec.is_synchronous() || spec.names.iter().any(|n| n == "*"),
        _ => true,
    }
}

/// Each standby whose agent answered the probe of `primary`'s PostgreSQL,
/// and whether it reached it; asked concurrently. A probe the agent did not
/// answer (down, or refused: the probe needs an admin certificate) is no
/// opinion, not a "no".
async fn opinions(c: &Cluster, look: &ClusterReport, primary: &str, d: Deadlines) -> Vec<(String, bool)> {
    let Some(p) = c.nodes.iter().find(|n| n.name.as_str() == primary) else {
        return Vec::new();
    };
    let Some(address) = p.address().await else {
        return Vec::new();
    };
    let asked = c
        .nodes
        .iter()
        .filter(|n| n.name.as_str() != primary && look.nodes.iter().any(|r| r.name == n.name.as_str() && r.reachable))
        .map(|n| async move {
            let req = pb::ProbeRequest { address: address.to_string(), port: u32::from(p.port) };
            match tokio::time::timeout(LOOK_LIMIT, client::call(n, d, async |a| a.probe(req).await)).await {
                Ok(Ok(r)) => Some((n.name.to_string(), r.reachable)),
                Ok(Err(e)) => {
                    tracing::debug!(standby = %n.name, error = %e, "no second opinion from this standby");
                    None
                }
                Err(_) => {
                    tracing::debug!(standby = %n.name, "no second opinion from this standby: its agent did not answer the probe in time");
                    None
                }
            }
        });
    join_all(asked).await.into_iter().flatten().collect()
}

/// A node restarted in place is not restarted again within this: a second
/// death is failed over (a postmaster that keeps dying has a reason).
const RESTART_WINDOW: Duration = Duration::from_secs(600);

/// How long after an automatic rejoin of a stale primary was tried it is
/// tried again.
const RETRY_REJOIN: Duration = Duration::from_secs(10);

/// A former primary back with its agent, its server down (fenced), that
/// the cluster's latest failover fenced and replaced by `primary`: made a
/// standby of it by an automatic rejoin (fence, pg_rewind, follow), unless
/// that failover accepted a loss (its WAL may hold acknowledged commits
/// nobody else has: it stays as it is for the operator, said once). What
/// was started, for the decision.
async fn rejoin_former(
    state: &Arc<State>,
    busy: &Busy,
    c: &Cluster,
    node: &str,
    primary: &str,
    told: &mut HashSet<String>,
) -> Option<String> {
    let f = match crate::ops::store::failed_over_from(&state.inventory.store, c.name.as_str(), node, primary).await {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => {
            warn!(cluster = %c.name, node, "cannot read the journal about {node}: {e}");
            return None;
        }
    };
    if f.loss_accepted {
        if told.insert(format!("{}/{node}/{}", c.name, f.id)) {
            state.decisions.decide(
                c.name.as_str(),
                "not-acting",
                &format!(
                    "{node} is back, but failover {} promoted {primary} accepting a loss: {node}'s WAL may hold \
                     acknowledged commits nobody else has, so it stays fenced; save them, then `pgfleet rejoin {node}`",
                    f.id
                ),
                Some(&f.id),
            );
        }
        return None;
    }
    let n = pgfleet_proto::NodeName::parse(node).ok()?;
    let req = OpRequest::Rejoin { node: n, rebuild_if_needed: false, dry_run: false };
    automatic(state, busy, c.name.clone(), req, "rejoin")
        .then(|| format!("{node}, fenced by failover {}, is back (its agent answers): making it a standby of {primary}", f.id))
}

/// Nodes running as a primary on an older timeline than another primary
/// of the same cluster: former primaries back from a partition or a
/// restart. Whether one may be rejoined is the rejoin plan's to decide
/// (the journal must show pgfleet isolated it).
fn stale_primaries(look: &ClusterReport) -> Vec<String> {
    let primaries: Vec<_> = look.nodes.iter().filter(|n| n.role == Role::Primary).collect();
    let Some(newest) = primaries.iter().filter_map(|n| n.timeline).max() else {
        return Vec::new();
    };
    primaries.iter().filter(|n| n.timeline.is_some_and(|t| t < newest)).map(|n| n.name.clone()).collect()
}

/// The clusters with an automatic operation running, and when each
/// cluster's last one ended.
#[derive(Default)]
struct AutomaticOps {
    running: HashSet<String>,
    ended: HashMap<String, Instant>,
}

type Busy = Arc<std::sync::Mutex<AutomaticOps>>;

/// A new leader (or this process restarted) finishes the automatic
/// operations a dead leader left interrupted: a failover stopped between
/// its fence and its last step would leave standbys unpointed. What an
/// operator started and was interrupted is left to them (`ops resume`).
async fn resume_interrupted(state: &Arc<State>, busy: &Busy) {
    let ops = match crate::ops::store::load(&state.inventory.store).await {
        Ok(o) => o,
        Err(e) => {
            warn!("cannot read the journal for interrupted automatic operations: {e}");
            return;
        }
    };
    for op in ops.iter().filter(|o| o.state == "interrupted") {
        if !op.caller.starts_with(AUTOMATIC) {
            debug!(operation = %op.id, cluster = %op.cluster, "interrupted operation of {}: `pgfleet ops resume {}` or `ops abort`", op.caller, op.id);
            continue;
        }
        let Ok(cluster) = ClusterName::parse(&op.cluster) else { continue };
        warn!(operation = %op.id, cluster = %op.cluster, "resuming the automatic {} a previous leader left interrupted", op.kind);
        let what = if op.kind == "rejoin" { "rejoin" } else { "failover" };
        automatic(state, busy, cluster, Job::Resume(op.id.clone()), what);
    }
}

/// What an automatic operation does: a new one, or one a previous leader
/// left interrupted.
enum Job {
    Start(OpRequest),
    Resume(String),
}

impl From<OpRequest> for Job {
    fn from(r: OpRequest) -> Self {
        Job::Start(r)
    }
}

/// Starts `req` as this process's own operation, unless one runs for the
/// cluster already: the same lock, journal and plan as the CLI's.
/// Whether it started.
fn automatic(state: &Arc<State>, busy: &Busy, cluster: ClusterName, req: impl Into<Job>, what: &'static str) -> bool {
    let req = req.into();
    {
        let mut b = busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !b.running.insert(cluster.to_string()) {
            debug!(cluster = %cluster, "an automatic operation runs for this cluster already: no automatic {what} now");
            return false;
        }
    }
    let (state, busy) = (state.clone(), busy.clone());
    tokio::spawn(async move {
        run_automatic(&state, &cluster, req, what).await;
        let mut b = busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        b.running.remove(cluster.as_str());
        b.ended.insert(cluster.to_string(), Instant::now());
    });
    true
}

async fn run_automatic(state: &Arc<State>, cluster: &ClusterName, job: Job, what: &'static str) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(CancelState::default());
    let who = format!("{AUTOMATIC} (automatic {what})");
    let decide = |kind: &str, detail: &str, op: Option<&str>| state.decisions.decide(cluster.as_str(), kind, detail, op);
    let begun = match job {
        Job::Start(mut req) => ops::begin(&state.inventory, &mut req, &who, Some(tx), cancel.clone())
            .await
            .map(|(ctx, name, summary)| (ctx, name, summary, req, None)),
        Job::Resume(id) => ops::resume::begin(&state.inventory, &id, "resume", &who, Some(tx), cancel.clone())
            .await
            .map(|(ctx, rec, req)| (ctx, rec.cluster.clone(), format!("{} (resumed)", rec.summary), req, Some(rec))),
    };
    let (ctx, name, summary, req, resumed) = match begun {
        Ok(b) => b,
        Err(e) => {
            error!(cluster = %cluster, "automatic {what} refused: {e}");
            decide("refused", &format!("automatic {what}: {e}"), None);
            return;
        }
    };
    let running = Arc::new(Running::new(ctx.id().to_owned(), req.kind(), name, summary.clone(), who, false, cancel));
    registry::collect(running.clone(), rx);
    state.registry.insert(running.clone());
    let id = running.id.clone();
    warn!(cluster = %cluster, operation = %id, "automatic {what} started");
    decide("started", &format!("automatic {what} {summary}"), Some(&id));
    let result = match &resumed {
        None => ops::execute(&state.inventory, &req, state.deadlines, &ctx).await,
        Some(rec) => ops::resume::resume(&state.inventory, rec, &req, state.deadlines, &ctx).await,
    };
    let fin = ops::finish(ctx, &result, false).await;
    match (&result, fin.error) {
        (Ok(OpResult::Resumed { primary, moved, rejoined, .. }), None) => {
            warn!(cluster = %cluster, operation = %id, "automatic {what} resumed and done: {primary} is the primary");
            if let Some(m) = moved {
                decide("promoted", &format!("{} is the primary, timeline {}", m.new_primary, m.timeline), Some(&id));
            }
            for r in rejoined {
                decide("rejoined", &format!("{} is a standby of {} ({})", r.node, r.primary, r.method), Some(&id));
            }
            decide("resumed", &format!("{primary} is the primary of {cluster}"), Some(&id));
        }
        (Ok(OpResult::Moved(m)), None) => {
            warn!(
                cluster = %cluster, operation = %id,
                "automatic failover done: {} promoted (timeline {}), {} fenced", m.new_primary, m.timeline, m.old_primary
            );
            let isolated = m.steps.iter().any(|s| s.step == "isolate");
            let fence = m.steps.iter().find(|s| s.step == "isolate" || s.step == "fence").map(|s| s.detail.clone()).unwrap_or_default();
            decide(if isolated { "isolated" } else { "fenced" }, &format!("{}: {fence}", m.old_primary), Some(&id));
            decide("promoted", &format!("{} is the primary, timeline {}", m.new_primary, m.timeline), Some(&id));
        }
        (Ok(OpResult::Restarted { node }), None) => {
            warn!(cluster = %cluster, operation = %id, "automatic restart done: {node} runs again in place");
            decide("restarted", &format!("{node} runs again in place"), Some(&id));
        }
        (Ok(OpResult::Rejoined(r)), None) => {
            warn!(cluster = %cluster, operation = %id, "automatic rejoin done: {} is a standby of {} ({})", r.node, r.primary, r.method);
            decide("rejoined", &format!("{} is a standby of {} ({})", r.node, r.primary, r.method), Some(&id));
        }
        // Refused before any change (no proof, nothing fenceable): the
        // cluster is as it was.
        (Err(CoordinatorError::Move(MoveError::Refused(_) | MoveError::DataLossRisk { .. })), Some(e)) => {
            error!(cluster = %cluster, operation = %id, "automatic {what} refused: {e}");
            decide("refused", &format!("automatic {what}: {e}"), Some(&id));
        }
        (_, Some(e)) => {
            error!(cluster = %cluster, operation = %id, "automatic {what} did not complete: {e}");
            decide("failed", &format!("automatic {what}: {e}"), Some(&id));
        }
        (_, None) => warn!(cluster = %cluster, operation = %id, "automatic {what} ended"),
    }
}

/// Who the journal names as the caller of an automatic operation, followed
/// by what it does: "pgfleet serve (automatic failover)".
const AUTOMATIC: &str = "pgfleet serve";

fn report(cluster: &str, policy: &crate::policy::Policy, v: &Verdict, was: &str) {
    let what = v.describe();
    match v {
        Verdict::Healthy { .. } if was == "unknown" => info!(cluster, verdict = v.kind(), "watching: {what}"),
        Verdict::Healthy { .. } => info!(cluster, verdict = v.kind(), was, "{what} again"),
        Verdict::Unknown => info!(cluster, verdict = v.kind(), "{what}"),
        Verdict::Partitioned { .. } | Verdict::NoSecondOpinion { .. } | Verdict::Suspect { .. } => {
            warn!(cluster, verdict = v.kind(), "{what}")
        }
        Verdict::Failed { .. } if policy.acts() => error!(cluster, verdict = v.kind(), "{what}; failing over"),
        Verdict::Failed { .. } => error!(
            cluster,
            verdict = v.kind(),
            "{what}; no automatic failover: {}. `pgfleet failover --cluster {cluster}` fails it over",
            policy.describe()
        ),
    }
}
