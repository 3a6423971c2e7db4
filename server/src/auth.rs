//! API keys. Only SHA-256 hashes are kept in memory, and a key's hash also names it in the rate
//! limiter and logs, so the key itself never leaves `Hello` handling.

use std::collections::HashSet;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::ServerError;

/// Identifies an API key by its SHA-256.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 32]);

impl KeyId {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// The first 8 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

/// The set of accepted API keys.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    hashes: HashSet<KeyId>,
}

impl ApiKeys {
    /// Keys given directly.
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            hashes: keys
                .into_iter()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(KeyId::of)
                .collect(),
        }
    }

    /// Parses a keys file: one key per line, blank lines and lines starting with `#` ignored.
    pub fn parse(text: &str) -> Self {
        Self::from_keys(text.lines().filter(|l| !l.trim_start().starts_with('#')))
    }

    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServerError::io(path, e))?;
        Ok(Self::parse(&text))
    }

    /// Adds `other`'s keys.
    pub fn extend(&mut self, other: ApiKeys) {
        self.hashes.extend(other.hashes);
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The key's id if it is accepted.
    pub fn check(&self, key: &str) -> Option<KeyId> {
        let id = KeyId::of(key);
        self.hashes.contains(&id).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_ignoring_comments_and_blank_lines() {
        let keys = ApiKeys::parse("# team a\nalpha\n\n  beta  \n#gamma\n");
        assert_eq!(keys.len(), 2);
        assert!(keys.check("alpha").is_some());
        assert!(keys.check("beta").is_some());
        assert!(keys.check("gamma").is_none());
        assert!(keys.check("").is_none());
        assert!(keys.check("# team a").is_none());
    }
}
