//! A cluster's automatic-failover policy at run time (issue #14, control):
//! the inventory's `auto_failover` is the default; `pgfleet
//! failover-policy` overrides it, and `pgfleet pause` puts the cluster in
//! maintenance mode (the leader still watches and logs, and acts on
//! nothing) until `pgfleet resume`. Kept in the coordinator's store (state
//! directory or etcd) so that every coordinator, and the next leader, sees
//! the same; each change is a journaled operation.

use serde::{Deserialize, Serialize};

use crate::inventory::Cluster;
use crate::journal::{self, JournalError, Store};

/// What was changed by hand; absent fields follow the inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Set by `pgfleet failover-policy automatic|manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_failover: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    /// RFC 3339, UTC.
    pub since: String,
    pub by: String,
    #[serde(default)]
    pub reason: String,
}

/// The policy in force, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub auto_failover: bool,
    /// "inventory" or "failover-policy".
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
}

impl Policy {
    /// Whether the leader may act on the cluster by itself now.
    pub fn acts(&self) -> bool {
        self.auto_failover && self.paused.is_none()
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        let auto = format!("automatic failover {} ({})", if self.auto_failover { "on" } else { "off" }, self.source);
        match &self.paused {
            None => auto,
            Some(p) => format!(
                "paused since {} by {}{}: no automatic action; {auto} once resumed",
                p.since,
                p.by,
                if p.reason.is_empty() { String::new() } else { format!(" ({})", p.reason) }
            ),
        }
    }
}

/// A change asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    Pause,
    Resume,
    /// Automatic failover on, whatever the inventory says.
    Automatic,
    /// Off: a failure is logged and waits for `pgfleet failover`.
    Manual,
    /// Back to the inventory's `auto_failover`.
    Inventory,
}

impl Change {
    pub fn describe(self) -> &'static str {
        match self {
            Change::Pause => "pause automatic actions",
            Change::Resume => "resume automatic actions",
            Change::Automatic => "automatic failover on",
            Change::Manual => "automatic failover off",
            Change::Inventory => "automatic failover as the inventory says",
        }
    }
}

const KIND: &str = "policy";

pub async fn stored(store: &Store, cluster: &str) -> Result<Stored, JournalError> {
    match journal::get_value(store, KIND, cluster).await? {
        None => Ok(Stored::default()),
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| JournalError::Corrupt { what: format!("the failover policy of cluster {cluster}"), reason: e.to_string() }),
    }
}

/// The policy in force for `c`. A store that cannot be read makes the
/// cluster count as paused: no automatic action on a guess.
pub async fn current(store: &Store, c: &Cluster) -> Policy {
    match stored(store, c.name.as_str()).await {
        Ok(s) => merge(c, &s),
        Err(e) => Policy {
            auto_failover: c.auto_failover,
            source: "inventory".into(),
            paused: Some(Paused { since: "now".into(), by: "pgfleet".into(), reason: format!("its stored policy cannot be read: {e}") }),
        },
    }
}

fn merge(c: &Cluster, s: &Stored) -> Policy {
    Policy {
        auto_failover: s.auto_failover.unwrap_or(c.auto_failover),
        source: if s.auto_failover.is_some() { "failover-policy" } else { "inventory" }.into(),
        paused: s.paused.clone(),
    }
}

/// `change` applied to what is stored: the new stored value.
pub fn changed(mut s: Stored, change: Change, by: &str, reason: &str, now: &str) -> Stored {
    match change {
        Change::Pause => {
            s.paused = Some(Paused { since: now.to_owned(), by: by.to_owned(), reason: reason.to_owned() });
        }
        Change::Resume => s.paused = None,
        Change::Automatic => s.auto_failover = Some(true),
        Change::Manual => s.auto_failover = Some(false),
        Change::Inventory => s.auto_failover = None,
    }
    s
}

/// Applies `change` (unless `dry_run`) and answers the policy then in
/// force.
pub async fn apply(store: &Store, c: &Cluster, change: Change, by: &str, reason: &str, dry_run: bool) -> Result<Policy, JournalError> {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let s = changed(stored(store, c.name.as_str()).await?, change, by, reason, &now);
    if !dry_run {
        let text = serde_json::to_string(&s)
            .map_err(|e| JournalError::Corrupt { what: format!("the failover policy of cluster {}", c.name), reason: e.to_string() })?;
        journal::put_value(store, KIND, c.name.as_str(), &text).await?;
    }
    Ok(merge(c, &s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_stops_automatic_actions_until_resumed_and_the_override_wins() {
        let inv = crate::inventory::Inventory::parse(
            r#"
            state_dir = "/nonexistent"
            [[clusters]]
            name = "main"
            auto_failover = true
            [[clusters.nodes]]
            name = "node0"
            agent = "http://10.0.0.1:7420"
            host = "10.0.0.1"
            "#,
            std::path::Path::new("i.toml"),
        )
        .unwrap();
        let c = &inv.clusters[0];
        let s = Stored::default();
        assert!(merge(c, &s).acts());
        let s = changed(s, Change::Pause, "dba", "kernel upgrade", "2026-11-30T00:00:00Z");
        let p = merge(c, &s);
        assert!(!p.acts());
        assert!(p.describe().contains("paused since 2026-11-30T00:00:00Z by dba (kernel upgrade)"), "{}", p.describe());
        let s = changed(s, Change::Manual, "dba", "", "t");
        let s = changed(s, Change::Resume, "dba", "", "t");
        let p = merge(c, &s);
        assert!(!p.acts() && p.source == "failover-policy", "{p:?}");
        let p = merge(c, &changed(s, Change::Inventory, "dba", "", "t"));
        assert!(p.acts() && p.source == "inventory", "{p:?}");
    }
}
