//! Connections to agents: one gRPC channel per node, with a connect deadline
//! and a per-call deadline, and errors that say which node and why.

use std::time::Duration;


use pgfleet_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

use crate::inventory::Node;

/// Why a call to an agent failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentCallError {
    #[error("agent of {node} at {endpoint} is unreachable: {reason}")]
    Unreachable {
        node: String,
        endpoint: String,
        reason: String,
    },
    #[error("{node}: {message} (agent at {endpoint} answered {code:?})")]
    Status {
        node: String,
        endpoint: String,
        code: tonic::Code,
        message: String,
    },
}

impl AgentCallError {
    pub fn from_status(node: &Node, s: tonic::Status) -> Self {
        // A transport failure or client-side deadline comes back as a Status
        // with the underlying error as its source; an agent's own answer has
        // none. Keep "unreachable" wording for the former.
        if std::error::Error::source(&s).is_some() {
            return AgentCallError::Unreachable {
                node: node.name.to_string(),
                endpoint: node.agent.clone(),
                reason: error_chain(&s),
            };
        }
        AgentCallError::Status {
            node: node.name.to_string(),
            endpoint: node.agent.clone(),
            code: s.code(),
            // An agent's message on one line: it ends up in tables, logs
            // and the journal.
            message: pgfleet_proto::one_line(s.message(), 2000),
        }
    }

    /// The agent's own message, or the reason it could not be reached.
    pub fn reason(&self) -> &str {
        match self {
            AgentCallError::Unreachable { reason, .. } => reason,
            AgentCallError::Status { message, .. } => message,
        }
    }

    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, AgentCallError::Status { code: tonic::Code::InvalidArgument, .. })
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, AgentCallError::Unreachable { .. })
    }

    /// The gRPC code to pass on: an unreachable agent is UNAVAILABLE, an
    /// agent's own answer keeps its code.
    pub fn code(&self) -> tonic::Code {
        match self {
            AgentCallError::Unreachable { .. } => tonic::Code::Unavailable,
            AgentCallError::Status { code, .. } => *code,
        }
    }
}

/// Deadlines for talking to agents.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub connect: Duration,
    pub call: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            connect: Duration::from_secs(3),
            call: Duration::from_secs(10),
        }
    }
}

/// Opens a channel to a node's agent (or reuses the kept one; tonic
/// reconnects a kept channel whose agent restarted).
pub async fn connect(node: &Node, d: Deadlines) -> Result<AgentClient<Channel>, AgentCallError> {
    if let Some(ch) = node.link.kept(&node.agent) {
        return Ok(AgentClient::new(ch));
    }
    let ch = connect_new(node, d).await?;
    node.link.keep(&node.agent, &ch);
    Ok(AgentClient::new(ch))
}

async fn connect_new(node: &Node, d: Deadlines) -> Result<Channel, AgentCallError> {
    let unreachable = |reason: String| AgentCallError::Unreachable {
        node: node.name.to_string(),
        endpoint: node.agent.clone(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(node.agent.clone())
        .map_err(|e| unreachable(format!("invalid endpoint: {e}")))?
        .connect_timeout(d.connect)
        .timeout(d.call)
        .tcp_nodelay(true);
    if node.agent.starts_with("https://") {
        let tls = node.link.tls().ok_or_else(|| {
            unreachable(
                "it is an https:// endpoint but no client TLS identity is loaded: the inventory needs a [tls] section (ca, cert, key)".into(),
            )
        })?;
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| unreachable(format!("TLS setup: {}", error_chain(&e))))?;
    }
    let channel = match tokio::time::timeout(d.connect, endpoint.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(unreachable(error_chain(&e))),
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {}",
                humantime::format_duration(d.connect)
            )));
        }
    };
    Ok(channel)
}

/// An error and its sources on one line: tonic's "transport error" alone
/// tells an operator nothing; "Connection refused (os error 111)" does.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(inner) = src {
        let s = inner.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        src = inner.source();
    }
    parts.join(": ")
}

/// Connects to `node`'s agent and makes one call, mapping its failure.
pub async fn call<T>(
    node: &Node,
    d: Deadlines,
    f: impl AsyncFnOnce(&mut AgentClient<Channel>) -> Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, AgentCallError> {
    let mut c = connect(node, d).await?;
    Ok(f(&mut c)
        .await
        .map_err(|s| AgentCallError::from_status(node, s))?
        .into_inner())
}
