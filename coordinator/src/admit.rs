//! A node becomes anyone's upstream only after it admits every node that
//! will follow it (DESIGN.md invariant 11): the replication role with the
//! cluster's password (made on the primary, replicated to standbys), one
//! `host replication ROLE ADDR/32 scram-sha-256` line per follower in the
//! upstream's own pg_hba.conf, checked through `pg_hba_file_rules` and
//! reloaded, and no slot of a follower's name held by someone else.
//!
//! pg_hba.conf is not replicated: on Debian's layout it lives in
//! /etc/postgresql and pg_basebackup never copies it, elsewhere a standby
//! has the stale copy its base backup took. So switchover, failover and
//! rejoin call [`admit`] on the future upstream as part of their
//! pre-flight: every follower is checked with a dry run first, then
//! admitted, and a refusal leaves nothing changed.

use pgfleet_proto::SlotName;
use pgfleet_proto::secret::Secret;
use pgfleet_proto::agent::v1 as pb;

use crate::client::{self, AgentCallError, Deadlines};
use crate::inventory::{Cluster, Node};

/// Why an upstream cannot admit a follower.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("{upstream} cannot admit {follower}: the address of {follower} ({host}) does not resolve")]
    Address {
        upstream: String,
        follower: String,
        host: String,
    },
    #[error("{upstream} cannot admit {follower} as its standby: {reason}")]
    Refused {
        upstream: String,
        follower: String,
        reason: String,
    },
}

/// One node that will stream from the upstream, through `slot`.
#[derive(Debug, Clone)]
pub struct Follower<'a> {
    pub node: &'a Node,
    pub slot: SlotName,
    /// Its own WAL receiver streams from the upstream through `slot`.
    pub in_use: bool,
}

/// What admitting one follower did.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub follower: String,
    pub hba_line: String,
    pub hba_line_added: bool,
    /// The upstream's whole answer: what a rebuild's job needs to know of it
    /// (its size, tablespaces, whether the follower holds its slot).
    pub response: pb::PrepareUpstreamResponse,
}

impl Admitted {
    pub fn describe(&self) -> String {
        format!(
            "{}: {} ({})",
            self.follower,
            self.hba_line,
            if self.hba_line_added { "added" } else { "present" }
        )
    }
}

/// Makes `upstream` admit every follower: a dry run for each first (an
/// active slot of that name, an unreadable pg_hba.conf, a role missing on a
/// standby refuse here, before anything changed), then the real thing.
pub async fn admit(
    cluster: &Cluster,
    upstream: &Node,
    followers: &[Follower<'_>],
    password: &Secret,
    operation_id: &str,
    d: Deadlines,
) -> Result<Vec<Admitted>, AdmitError> {
    let mut requests = Vec::with_capacity(followers.len());
    for f in followers {
        let address = f.node.address().await.ok_or_else(|| AdmitError::Address {
            upstream: upstream.name.to_string(),
            follower: f.node.name.to_string(),
            host: f.node.host.clone(),
        })?;
        let req = pb::PrepareUpstreamRequest {
            replication_role: cluster.replication_role.to_string(),
            replication_password: password.expose().to_owned(),
            replica_address: address.to_string(),
            slot_name: f.slot.to_string(),
            dry_run: true,
            operation_id: operation_id.to_owned(),
            for_rewind: false,
            replica_name: f.node.name.to_string(),
            replica_streams_through_slot: f.in_use,
        };
        prepare(upstream, f, req.clone(), d).await?;
        requests.push((f, req));
    }
    let mut done = Vec::with_capacity(requests.len());
    for (f, mut req) in requests {
        req.dry_run = false;
        let r = prepare(upstream, f, req, d).await?;
        done.push(Admitted {
            follower: f.node.name.to_string(),
            hba_line: r.hba_line.clone(),
            hba_line_added: r.hba_line_added,
            response: r,
        });
    }
    Ok(done)
}

async fn prepare(
    upstream: &Node,
    f: &Follower<'_>,
    req: pb::PrepareUpstreamRequest,
    d: Deadlines,
) -> Result<pb::PrepareUpstreamResponse, AdmitError> {
    client::call(upstream, d, async |c| c.prepare_upstream(req).await)
        .await
        .map_err(|e: AgentCallError| AdmitError::Refused {
            upstream: upstream.name.to_string(),
            follower: f.node.name.to_string(),
            reason: e.reason().to_owned(),
        })
}
