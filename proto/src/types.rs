//! Validated identifiers and positions shared by the agent and coordinator.
//!
//! Each type is built only through `parse`, which names what is wrong in its
//! error, so a value of the type is always safe to hand to SQL (as a bind
//! parameter), to argv, or to a file name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "invalid {what} {value:?}: {reason}"
    )]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl ParseError {
    fn invalid(what: &'static str, value: &str, reason: &'static str) -> Self {
        ParseError::Invalid {
            what,
            value: shown(value),
            reason,
        }
    }
}

/// How a value from a client is echoed in messages, logs and audit lines:
/// control characters escaped (no forged log line), at most 80 characters
/// (no megabyte error message), `…` when cut.
pub fn shown(value: &str) -> String {
    shown_max(value, 80)
}

/// [`shown`] with room for `max` characters: for text from elsewhere that
/// is worth reading whole (a command's stderr line, a server's message).
pub fn shown_max(value: &str, max: usize) -> String {
    let mut out = String::new();
    let mut count = 0;
    for c in value.chars() {
        let piece: String = if c.is_control() { c.escape_debug().collect() } else { c.to_string() };
        count += piece.chars().count();
        if count > max {
            out.push('…');
            return out;
        }
        out.push_str(&piece);
    }
    out
}

/// A message that may span lines (PostgreSQL's ERROR and DETAIL, a
/// program's stderr) as one line for a gRPC status, a log line or a table
/// cell: its lines joined with " / ", other control characters escaped, at
/// most `max` characters.
pub fn one_line(text: &str, max: usize) -> String {
    let joined = text
        .split(['\n', '\r'])
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" / ");
    shown_max(&joined, max)
}

/// The coordinator's operation id a changing call carries, for logs and
/// audit: empty, or up to 80 characters from `A-Za-z0-9._:-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationId(String);

impl OperationId {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let ok = s.len() <= 80
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if ok {
            Ok(OperationId(s.to_owned()))
        } else {
            Err(ParseError::invalid(
                "operation id",
                s,
                "use at most 80 characters from A-Z, a-z, 0-9, '.', '_', ':' and '-'",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_lower_ident(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A replication slot name: `[a-z0-9_]{1,63}`, which is what PostgreSQL
/// accepts for slots (see `ReplicationSlotValidateName`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotName(String);

impl SlotName {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if is_lower_ident(s, 63) {
            Ok(SlotName(s.to_owned()))
        } else {
            Err(ParseError::invalid(
                "slot name",
                s,
                "use 1 to 63 characters from a-z, 0-9 and _",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A PostgreSQL role name pgfleet may create or use for replication:
/// `[a-z_][a-z0-9_]{0,62}`, so it needs no quoting rules beyond double quotes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleName(String);

impl RoleName {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let ok = is_lower_ident(s, 63) && !s.as_bytes()[0].is_ascii_digit();
        // PostgreSQL reserves pg_* for its predefined roles, and "postgres"
        // is the superuser's name on every packaged installation: a
        // replication role is neither (the agent also refuses any role that
        // turns out to be a superuser).
        if ok && (s.starts_with("pg_") || s == "postgres") {
            return Err(ParseError::invalid(
                "role name",
                s,
                "a replication role must not be a predefined pg_* role nor the superuser postgres",
            ));
        }
        if ok {
            Ok(RoleName(s.to_owned()))
        } else {
            Err(ParseError::invalid(
                "role name",
                s,
                "use 1 to 63 characters from a-z, 0-9 and _, not starting with a digit",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier (safe: the character set has no quote).
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

/// A node name from the inventory: `[a-z0-9_-]{1,63}`, starting with a
/// letter or digit. It doubles as the standby's `application_name`, and a
/// slot name can be derived from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
            });
        if ok {
            Ok(NodeName(s.to_owned()))
        } else {
            Err(ParseError::invalid(
                "node name",
                s,
                "use 1 to 63 characters from a-z, 0-9, _ and -, starting with a letter or digit",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The slot name pgfleet uses for this node by default: the name with
    /// `-` turned into `_`, which is always a valid slot name.
    pub fn default_slot(&self) -> SlotName {
        SlotName(self.0.replace('-', "_"))
    }
}

/// A cluster name from the inventory; same rules as a node name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

impl ClusterName {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        NodeName::parse(s)
            .map(|n| ClusterName(n.0))
            .map_err(|_| {
                ParseError::invalid(
                    "cluster name",
                    s,
                    "use 1 to 63 characters from a-z, 0-9, _ and -, starting with a letter or digit",
                )
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_impls {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        // A validated name reads as the text it is, wherever a &str goes.
        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $t {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                Self::parse(s)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        // Read back (e.g. from the journal) through the same check.
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    )*};
}
string_newtype_impls!(SlotName, NodeName, ClusterName, RoleName);

/// A WAL position (`pg_lsn`), written by PostgreSQL as two hexadecimal
/// halves: `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        const REASON: &str = "expected two hexadecimal halves like 16/B374D848";
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| ParseError::invalid("LSN", s, REASON))?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ParseError::invalid("LSN", s, REASON));
            }
            u32::from_str_radix(h, 16).map_err(|_| ParseError::invalid("LSN", s, REASON))
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }

    /// Bytes from `earlier` to `self`, zero when `earlier` is ahead.
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        Lsn::parse(s)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Lsn::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_from_elsewhere_become_one_line() {
        assert_eq!(
            one_line("ERROR:  boom\nDETAIL:  it broke\r\n\n", 200),
            "ERROR:  boom / DETAIL:  it broke"
        );
        assert_eq!(one_line("a\u{1b}[2Jb", 200), "a\\u{1b}[2Jb");
        assert_eq!(one_line(&"y".repeat(5000), 100).chars().count(), 101);
    }

    #[test]
    fn client_values_are_echoed_escaped_and_cut() {
        assert_eq!(shown("node1"), "node1");
        assert_eq!(shown("a\nb"), "a\\nb");
        let long = "x".repeat(3_000_000);
        assert_eq!(shown(&long).chars().count(), 81);
        assert!(OperationId::parse("sync-20261130T101010Z-0").is_ok());
        assert!(OperationId::parse("").is_ok());
        assert!(OperationId::parse("op\nFORGED").is_err());
        assert!(OperationId::parse(&"a".repeat(81)).is_err());
        assert!(RoleName::parse("postgres").is_err());
        assert!(RoleName::parse("pg_monitor").is_err());
        assert!(RoleName::parse("pgfleet_replication").is_ok());
    }
    use proptest::prelude::*;

    #[test]
    fn slot_names_follow_postgres_rules() {
        assert!(SlotName::parse("r1").is_ok());
        assert!(SlotName::parse(&"a".repeat(63)).is_ok());
        for bad in ["", "R1", "r-1", "r 1", "x'); drop table t; --", &"a".repeat(64), "é"] {
            assert!(SlotName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn slot_error_names_the_rule() {
        let e = SlotName::parse("Bad").unwrap_err().to_string();
        assert!(e.contains("slot name") && e.contains("a-z, 0-9 and _"), "{e}");
    }

    #[test]
    fn role_names() {
        assert_eq!(RoleName::parse("repuser").unwrap().quoted(), "\"repuser\"");
        for bad in ["", "1abc", "Rep", "a\"b", "a b", &"a".repeat(64)] {
            assert!(RoleName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn node_names_and_default_slot() {
        let n = NodeName::parse("pg-2").unwrap();
        assert_eq!(n.default_slot().as_str(), "pg_2");
        for bad in ["", "-a", "A", "a/b", "a.b"] {
            assert!(NodeName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn lsn_parses_and_prints_like_postgres() {
        let l = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/0").unwrap().0, 0);
        for bad in ["", "/", "1/", "/1", "1/2/3", "g/0", "123456789/0", "+1/0", "1 /0"] {
            assert!(Lsn::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Lsn(10).bytes_since(Lsn(4)), 6);
        assert_eq!(Lsn(4).bytes_since(Lsn(10)), 0);
    }

    proptest! {
        #[test]
        fn lsn_round_trips(v in any::<u64>()) {
            prop_assert_eq!(Lsn::parse(&Lsn(v).to_string()).unwrap(), Lsn(v));
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,80}") {
            let _ = Lsn::parse(&s);
            let _ = SlotName::parse(&s);
            let _ = NodeName::parse(&s);
            let _ = ClusterName::parse(&s);
            let _ = RoleName::parse(&s);
        }

        #[test]
        fn accepted_slot_names_are_plain(s in "[a-z0-9_]{1,63}") {
            prop_assert!(SlotName::parse(&s).is_ok());
        }
    }
}
