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
    let status = client::call(primary, d, async |c| c.get_status(pb::GetStatusRequest {}).await)
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
            .find(|w| w.application_name == s.name.as_str() && w.state == "streaming")
            .ok_or_else(|| format!("{} does not stream from {} (pg_stat_replication)", s.name, primary.name))?;
        let own = client::call(s, d, async |c| c.get_status(pb::GetStatusRequest {}).await)
            .await
            .map_err(|e| e.to_string())?;
        let receiver = own
            .wal_receiver
            .as_ref()
            .ok_or_else(|| format!("{} has no WAL receiver running", s.name))?;
        if receiver.status != "streaming" {
            return Err(format!("{}'s WAL receiver is {}", s.name, receiver.status));
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
