//! A password in memory: `Debug` and `Display` print `[SECRET]`, so no log
//! line, error or event can carry it by accident. `expose()` is the one way
//! out, used where the password must reach PostgreSQL or a passfile.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the replication password is empty")]
    Empty,
    #[error("the replication password contains a line break or NUL byte")]
    BadCharacter,
}

impl Secret {
    pub fn new(s: String) -> Result<Self, SecretError> {
        if s.is_empty() {
            return Err(SecretError::Empty);
        }
        if s.contains(['\n', '\r', '\0']) {
            return Err(SecretError::BadCharacter);
        }
        Ok(Secret(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[SECRET]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[SECRET]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2".into()).unwrap();
        assert_eq!(format!("{s} {s:?}"), "[SECRET] [SECRET]");
        assert!(Secret::new(String::new()).is_err());
        assert!(Secret::new("a\nb".into()).is_err());
    }
}
