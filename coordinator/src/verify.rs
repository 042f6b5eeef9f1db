//! "It streams", confirmed from both ends and for more than an instant: a
//! standby on a diverged timeline reconnects every few seconds and shows as
//! streaming for a moment each time. A standby counts as streaming when the
//! primary's pg_stat_replication shows it `streaming`, its own WAL receiver
//! streams on the primary's timeline, and both hold over consecutive looks.

use std::time::{Duration, Instant};

use pgfleet_proto::agent::v1 as pb;

use crate::client::{self, Deadlines};
use crate::inventory::Node;

const POLL: Duration = Duration::from_millis(100);
/// Consecutive good looks required.
const STEADY: u32 = 3;

/// Waits until every standby streams steadily from `primary`; the last
/// states seen on success, what was wrong on timeout.
pub async fn streaming(primary: &Node, standbys: &[&Node], d: Deadlines, deadline: Duration) -> Result<String, String> {
    let until = Instant::now() + deadline;
    let mut good = 0;
    let mut last = String::new();
    loop {
        match look(primary, standbys, d).await {
            Ok(states) => {
                good += 1;
                if good >= STEADY {
                    return Ok(states);
                }
            }
            Err(why) => {
                good = 0;
                last = why;
            }
        }
        if Instant::now() >= until {
            return Err(last);
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn look(primary: &Node, standbys: &[&Node], d: Deadlines) -> Result<String, String> {
    let status = client::call(primary, d, async |c| c.get_status(pb::GetStatusRequest { fresh: true }).await)
        .await
        .map_err(|e| e.to_string())?;
    let info = client::call(primary, d, async |c| c.get_replication(pb::GetReplicationRequest {}).await)
        .await
        .map_err(|e| e.to_string())?;
    let mut states = Vec::new();
    for s in standbys {
        let row = info
            .standbys
            .iter()
            .find(|w| w.application_name == s.name.as_str() && w.state == "streaming");
        let own = client::call(s, d, async |c| c.get_status(pb::GetStatusRequest { fresh: true }).await)
            .await
            .map_err(|e| e.to_string())?;
        let Some(row) = row else {
            return Err(format!(
                "{} does not stream from {} (pg_stat_replication){}",
                s.name,
                primary.name,
                why_not(&own)
            ));
        };
        let receiver = own
            .wal_receiver
            .as_ref()
            .ok_or_else(|| format!("{} has no WAL receiver running{}", s.name, why_not(&own)))?;
        if receiver.status != "streaming" {
            return Err(format!("{}'s WAL receiver is {}{}", s.name, receiver.status, why_not(&own)));
        }
        if let (Some(theirs), Some(ours)) = (receiver.received_timeline, status.timeline)
            && theirs != ours
        {
            return Err(format!(
                "{} receives timeline {theirs}, {} is on {ours}",
                s.name, primary.name
            ));
        }
        states.push(format!("{} {} ({})", s.name, row.state, row.sync_state));
    }
    Ok(states.join(", "))
}

/// What a standby's own status says about why it does not stream: its
/// server log's line, or that its server is down.
pub fn why_not(own: &pb::NodeStatus) -> String {
    if let Some(e) = &own.wal_receiver_error {
        return format!("; its server log: {e}");
    }
    if !own.server_up {
        return format!(
            "; its server is down{}",
            own.down_reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
        );
    }
    String::new()
}

/// Waits until the primary's `synchronous_standby_names` is met by
/// standbys that stream (DESIGN.md invariant 12); on timeout, which
/// standbys are missing and why, from each one's own status.
pub async fn sync_met(primary: &Node, cluster: &[Node], d: Deadlines, deadline: Duration) -> Result<String, String> {
    let until = Instant::now() + deadline;
    // The setting the operation just made: read once, not on every look.
    let text = client::call(primary, d, async |c| c.get_settings(pb::GetSettingsRequest {}).await)
        .await
        .map_err(|e| e.to_string())?
        .synchronous_standby_names;
    let spec = pgfleet_proto::sync::SyncSpec::parse(&text).ok();
    loop {
        let info = client::call(primary, d, async |c| c.get_replication(pb::GetReplicationRequest {}).await)
            .await
            .map_err(|e| e.to_string())?;
        let streaming: Vec<String> = info
            .standbys
            .iter()
            .filter(|w| w.state == "streaming")
            .map(|w| w.application_name.clone())
            .collect();
        let missing = spec.as_ref().and_then(|spec| spec.missing(&streaming));
        let Some(missing) = missing else {
            return Ok(if text.is_empty() {
                "asynchronous".to_owned()
            } else {
                format!("synchronous_standby_names = '{text}' is met")
            });
        };
        if Instant::now() >= until {
            let mut why = Vec::new();
            for name in &missing {
                let reason = match cluster.iter().find(|n| n.name.as_str() == name) {
                    Some(n) => match client::call(n, d, async |c| c.get_status(pb::GetStatusRequest { fresh: true }).await).await {
                        Ok(own) => why_not(&own),
                        Err(e) => format!("; its agent: {e}"),
                    },
                    None => "; not a node of the inventory".to_owned(),
                };
                why.push(format!("{name} does not stream{reason}"));
            }
            return Err(format!(
                "commits on {} wait for synchronous replication: synchronous_standby_names = '{text}' \
                 is not met ({})",
                primary.name,
                why.join("; ")
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
