//! synchronous_standby_names as a structure: written by pgfleet from a
//! validated list of node names, and read back (including values an
//! operator wrote by hand) for `sync show` and failover's choice.
//! <https://www.postgresql.org/docs/15/runtime-config-replication.html#GUC-SYNCHRONOUS-STANDBY-NAMES>

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::types::{NodeName, ParseError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMethod {
    /// Priority: the first `num_sync` connected standbys in list order.
    First,
    /// Quorum: any `num_sync` of the listed standbys.
    Any,
}

/// A synchronous replication setting. `names` empty means asynchronous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SyncSpec {
    pub method: SyncMethod,
    pub num_sync: u32,
    /// Standby names as PostgreSQL matches them against application_name
    /// (case-insensitively); `*` matches any.
    pub names: Vec<String>,
}

impl SyncSpec {
    pub fn asynchronous() -> Self {
        SyncSpec {
            method: SyncMethod::First,
            num_sync: 0,
            names: Vec::new(),
        }
    }

    pub fn is_synchronous(&self) -> bool {
        !self.names.is_empty() && self.num_sync > 0
    }

    /// A spec pgfleet writes: node names only, 1 <= num_sync <= names.
    pub fn from_nodes(method: SyncMethod, num_sync: u32, nodes: &[NodeName]) -> Result<Self, ParseError> {
        if nodes.is_empty() {
            return Err(ParseError::Invalid {
                what: "synchronous standbys",
                value: String::new(),
                reason: "name at least one standby, or use --off",
            });
        }
        if num_sync == 0 || num_sync as usize > nodes.len() {
            return Err(ParseError::Invalid {
                what: "number of synchronous standbys",
                value: num_sync.to_string(),
                reason: "must be between 1 and the number of standbys named",
            });
        }
        let mut names: Vec<String> = Vec::new();
        for n in nodes {
            if names.iter().any(|m| m == n.as_str()) {
                return Err(ParseError::Invalid {
                    what: "synchronous standbys",
                    value: n.to_string(),
                    reason: "a standby is named twice",
                });
            }
            names.push(n.to_string());
        }
        Ok(SyncSpec {
            method,
            num_sync,
            names,
        })
    }

    /// Parses a synchronous_standby_names value.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let bad = |reason| ParseError::Invalid {
            what: "synchronous_standby_names",
            value: s.to_owned(),
            reason,
        };
        let t = s.trim();
        if t.is_empty() {
            return Ok(SyncSpec::asynchronous());
        }
        let (method, rest) = if let Some(r) = strip_word(t, "first") {
            (SyncMethod::First, r)
        } else if let Some(r) = strip_word(t, "any") {
            (SyncMethod::Any, r)
        } else {
            (SyncMethod::First, t)
        };
        let rest = rest.trim_start();
        // "N ( list )" or a bare list (= FIRST 1).
        let (num_sync, list) = match rest.find('(') {
            Some(open) if rest[..open].trim().chars().all(|c| c.is_ascii_digit()) && !rest[..open].trim().is_empty() => {
                let n: u32 = rest[..open].trim().parse().map_err(|_| bad("bad number"))?;
                let close = rest.rfind(')').ok_or(bad("missing ')'"))?;
                (n, &rest[open + 1..close])
            }
            _ if method == SyncMethod::Any => return Err(bad("ANY needs a number and a list")),
            _ => (1, rest),
        };
        let names: Vec<String> = list
            .split(',')
            .map(|n| {
                let n = n.trim();
                n.strip_prefix('"')
                    .and_then(|n| n.strip_suffix('"'))
                    .map(|n| n.replace("\"\"", "\""))
                    .unwrap_or_else(|| n.to_lowercase())
            })
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            return Err(bad("empty standby list"));
        }
        Ok(SyncSpec {
            method,
            num_sync,
            names,
        })
    }

    /// Whether a standby with this application_name is listed.
    pub fn lists(&self, application_name: &str) -> bool {
        self.names
            .iter()
            .any(|n| n == "*" || n.eq_ignore_ascii_case(application_name))
    }

    /// Whether standbys streaming with these application_names meet the
    /// setting: `None` when they do (or it is asynchronous), else the listed
    /// names that do not stream (all of them with `*`: any one would do).
    /// Both FIRST n and ANY n need n listed standbys connected.
    pub fn missing(&self, streaming: &[String]) -> Option<Vec<String>> {
        if !self.is_synchronous() {
            return None;
        }
        let met = streaming.iter().filter(|a| self.lists(a)).count();
        if met >= self.num_sync as usize {
            return None;
        }
        Some(
            self.names
                .iter()
                .filter(|n| n.as_str() == "*" || !streaming.iter().any(|a| a.eq_ignore_ascii_case(n)))
                .cloned()
                .collect(),
        )
    }

    /// The same spec with `old` replaced by `new` (a switchover moves the
    /// promoted standby's place to the old primary).
    pub fn replacing(&self, old: &str, new: &str) -> SyncSpec {
        let mut s = self.clone();
        for n in &mut s.names {
            if n.eq_ignore_ascii_case(old) {
                *n = new.to_owned();
            }
        }
        let mut seen = Vec::new();
        s.names.retain(|n| {
            let dup = seen.contains(n);
            seen.push(n.clone());
            !dup
        });
        s.num_sync = s.num_sync.min(s.names.len() as u32);
        s
    }
}

fn strip_word<'a>(s: &'a str, word: &str) -> Option<&'a str> {
    let head = s.get(..word.len())?;
    let rest = &s[word.len()..];
    (head.eq_ignore_ascii_case(word) && rest.starts_with([' ', '\t', '('])).then_some(rest)
}

/// The value for synchronous_standby_names: names always double-quoted, so
/// PostgreSQL compares them exactly as written.
impl fmt::Display for SyncSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.is_synchronous() {
            return Ok(());
        }
        let method = match self.method {
            SyncMethod::First => "FIRST",
            SyncMethod::Any => "ANY",
        };
        let names: Vec<String> = self
            .names
            .iter()
            .map(|n| if n == "*" { "*".to_owned() } else { format!("\"{}\"", n.replace('"', "\"\"")) })
            .collect();
        write!(f, "{method} {} ({})", self.num_sync, names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: &[&str]) -> Vec<NodeName> {
        n.iter().map(|s| NodeName::parse(s).unwrap()).collect()
    }

    #[test]
    fn renders_and_parses_back() {
        let s = SyncSpec::from_nodes(SyncMethod::Any, 1, &nodes(&["node1", "node-2"])).unwrap();
        assert_eq!(s.to_string(), "ANY 1 (\"node1\", \"node-2\")");
        assert_eq!(SyncSpec::parse(&s.to_string()).unwrap(), s);
        let f = SyncSpec::from_nodes(SyncMethod::First, 2, &nodes(&["a", "b"])).unwrap();
        assert_eq!(SyncSpec::parse(&f.to_string()).unwrap(), f);
        assert_eq!(SyncSpec::parse("").unwrap(), SyncSpec::asynchronous());
        assert_eq!(SyncSpec::asynchronous().to_string(), "");
    }

    #[test]
    fn parses_hand_written_forms() {
        let s = SyncSpec::parse("node1, Node2").unwrap();
        assert_eq!((s.method, s.num_sync), (SyncMethod::First, 1));
        assert_eq!(s.names, vec!["node1", "node2"]);
        let s = SyncSpec::parse("2 (a, b, c)").unwrap();
        assert_eq!((s.method, s.num_sync, s.names.len()), (SyncMethod::First, 2, 3));
        let s = SyncSpec::parse("any 1 (*)").unwrap();
        assert!(s.lists("whatever"));
        assert!(SyncSpec::parse("ANY (a)").is_err());
    }

    #[test]
    fn refuses_bad_counts_and_duplicates() {
        assert!(SyncSpec::from_nodes(SyncMethod::First, 0, &nodes(&["a"])).is_err());
        assert!(SyncSpec::from_nodes(SyncMethod::First, 2, &nodes(&["a"])).is_err());
        assert!(SyncSpec::from_nodes(SyncMethod::First, 1, &nodes(&["a", "a"])).is_err());
        assert!(SyncSpec::from_nodes(SyncMethod::First, 1, &[]).is_err());
    }

    #[test]
    fn switchover_moves_the_promoted_place_to_the_old_primary() {
        let s = SyncSpec::parse("FIRST 1 (\"b\", \"c\")").unwrap();
        assert_eq!(s.replacing("b", "a").to_string(), "FIRST 1 (\"a\", \"c\")");
        let s = SyncSpec::parse("ANY 2 (\"a\", \"b\")").unwrap();
        let r = s.replacing("b", "a");
        assert_eq!((r.names.len(), r.num_sync), (1, 1));
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = SyncSpec::parse(&s);
        }

        #[test]
        fn what_pgfleet_writes_parses_back(
            names in proptest::collection::btree_set("[a-z0-9][a-z0-9_-]{0,20}", 1..5),
            any in any::<bool>(),
            k in 1u32..5,
        ) {
            let nodes: Vec<NodeName> = names.iter().map(|n| NodeName::parse(n).unwrap()).collect();
            let k = k.min(nodes.len() as u32);
            let method = if any { SyncMethod::Any } else { SyncMethod::First };
            let spec = SyncSpec::from_nodes(method, k, &nodes).unwrap();
            prop_assert_eq!(SyncSpec::parse(&spec.to_string()).unwrap(), spec);
        }
    }

    #[test]
    fn missing_names_the_listed_standbys_that_do_not_stream() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let first = SyncSpec::parse(r#"FIRST 1 ("a", "b")"#).unwrap();
        assert_eq!(first.missing(&s(&["b"])), None);
        assert_eq!(first.missing(&s(&["c"])), Some(s(&["a", "b"])));
        let any2 = SyncSpec::parse("ANY 2 (a, b, c)").unwrap();
        assert_eq!(any2.missing(&s(&["a", "c"])), None);
        assert_eq!(any2.missing(&s(&["a"])), Some(s(&["b", "c"])));
        assert_eq!(SyncSpec::parse("").unwrap().missing(&[]), None);
    }
}
