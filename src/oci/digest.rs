//! Content digests. Only `sha256:<64 lowercase hex>` is accepted: it is what every registry
//! serves, and it is the only shape that may become a file name in the store.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

const PREFIX: &str = "sha256:";
const HEX_LEN: usize = 64;

/// A validated `sha256` digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// Always exactly 64 lowercase hex characters.
    hex: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form sha256:<64 lowercase hex>")]
    Invalid(String),
}

/// Bytes that are not what their digest (or announced size) says.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Mismatch {
    #[error("content does not match digest: expected {expected}, got {actual} ({size} bytes)")]
    Digest {
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("content is {actual} bytes, expected {expected}")]
    Size { expected: u64, actual: u64 },
}

impl Mismatch {
    /// `Ok` when `actual` (of `size` bytes) is `expected`, and `size` is `expected_size` if
    /// one was announced.
    pub fn check(expected: &Digest, expected_size: Option<u64>, actual: Digest, size: u64) -> Result<(), Mismatch> {
        if let Some(expected_size) = expected_size
            && expected_size != size
        {
            return Err(Mismatch::Size {
                expected: expected_size,
                actual: size,
            });
        }
        if &actual != expected {
            return Err(Mismatch::Digest {
                expected: expected.clone(),
                actual,
                size,
            });
        }
        Ok(())
    }
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// Finishes a running hash into a digest.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Digest {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 hex characters, safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix(PREFIX)
            .filter(|h| h.len() == HEX_LEN && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| DigestError::Invalid(truncate(s)))?;
        Ok(Digest { hex: hex.to_owned() })
    }
}

/// Keeps error messages bounded when a client sends something huge.
fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_round_trip() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::of(b""));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "sha256:",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            "sha256:../../../../etc/passwd000000000000000000000000000000000000000000",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85%",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} was accepted");
        }
    }
}
