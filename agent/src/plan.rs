//! Steps as data: an operation is a list of named steps that can be printed
//! (dry run), reported and executed; the plan shown is the plan run.

use pgfleet_proto::agent::v1 as pb;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub description: String,
    /// The argv it runs, if it runs a program (never a secret in it).
    pub argv: Vec<String>,
    /// The SQL it runs, if any (secrets shown as [SECRET]).
    pub sql: Option<String>,
}

impl Step {
    pub fn new(name: &'static str, description: impl Into<String>) -> Self {
        Step {
            name,
            description: description.into(),
            argv: Vec::new(),
            sql: None,
        }
    }

    pub fn sql(mut self, sql: impl Into<String>) -> Self {
        self.sql = Some(sql.into());
        self
    }

    pub fn argv(mut self, argv: Vec<String>) -> Self {
        self.argv = argv;
        self
    }
}

impl From<Step> for pb::PlanStep {
    fn from(s: Step) -> Self {
        pb::PlanStep {
            name: s.name.to_owned(),
            description: s.description,
            argv: s.argv,
            sql: s.sql,
        }
    }
}

/// A UTC timestamp for file names: `20261129T024100Z`.
pub fn file_stamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

/// RFC 3339 UTC with milliseconds, for events.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_compact_utc() {
        let s = file_stamp();
        assert_eq!(s.len(), 16, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[8] == b'T', "{s}");
    }
}
