//! Single byte ranges on blobs: `bytes=a-b`, `bytes=a-` and `bytes=-n`.

use crate::error::RequestError;

/// The inclusive byte range to serve, `None` for the whole blob. Ranges in a unit other than
/// bytes are ignored, as RFC 9110 requires; malformed, multiple or unsatisfiable byte ranges
/// are refused.
pub fn parse(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, RequestError> {
    let Some(header) = header else {
        return Ok(None);
    };
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    let invalid = || RequestError::Range {
        range: header.chars().take(100).collect(),
        size,
    };
    let (first, last) = spec.trim().split_once('-').ok_or_else(invalid)?;
    let number = |s: &str| -> Result<u64, RequestError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        s.parse().map_err(|_| invalid())
    };
    let (start, end) = if first.is_empty() {
        let suffix = number(last)?;
        if suffix == 0 || size == 0 {
            return Err(invalid());
        }
        (size.saturating_sub(suffix), size - 1)
    } else {
        let start = number(first)?;
        let end = if last.is_empty() {
            size.saturating_sub(1)
        } else {
            number(last)?.min(size.saturating_sub(1))
        };
        if start >= size || (!last.is_empty() && number(last)? < start) {
            return Err(invalid());
        }
        (start, end)
    };
    Ok(Some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse(None, 10).unwrap(), None);
        assert_eq!(parse(Some("bytes=0-4"), 10).unwrap(), Some((0, 4)));
        assert_eq!(parse(Some("bytes=5-"), 10).unwrap(), Some((5, 9)));
        assert_eq!(parse(Some("bytes=-3"), 10).unwrap(), Some((7, 9)));
        assert_eq!(parse(Some("bytes=-30"), 10).unwrap(), Some((0, 9)));
        assert_eq!(parse(Some("bytes=8-100"), 10).unwrap(), Some((8, 9)));
        assert_eq!(parse(Some("bytes=9-9"), 10).unwrap(), Some((9, 9)));
        assert_eq!(parse(Some("items=0-1"), 10).unwrap(), None);
    }

    #[test]
    fn refusals() {
        for bad in [
            "bytes=10-",
            "bytes=10-20",
            "bytes=5-4",
            "bytes=-0",
            "bytes=abc",
            "bytes=",
            "bytes=1-2,4-5",
            "bytes=--1",
            "bytes= 1-2x",
            "bytes=99999999999999999999999-",
        ] {
            assert!(parse(Some(bad), 10).is_err(), "{bad}");
        }
        assert!(parse(Some("bytes=0-"), 0).is_err());
        assert!(parse(Some("bytes=-1"), 0).is_err());
    }
}
