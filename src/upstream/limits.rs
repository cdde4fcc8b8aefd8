//! What registries say about their limits. A 429 closes that upstream for its `Retry-After`
//! (no request goes out meanwhile; tag lookups serve stale answers), and Docker Hub's
//! `ratelimit-limit` / `ratelimit-remaining` headers are kept for the metrics to expose.

use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue};

/// Back-off after a 429 that names no `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// A registry may ask for less patience than this, never more: a bad header must not close an
/// upstream for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimit {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
}

#[derive(Default, Clone, Copy)]
struct Entry {
    closed_until: Option<Instant>,
    rate_limit: RateLimit,
}

/// Rate limits per upstream endpoint (`host[:port]`), for the
/// [`MAX_ENDPOINTS`](super::MAX_ENDPOINTS) most used.
pub struct RateLimits {
    entries: moka::sync::Cache<String, Entry>,
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits {
            entries: moka::sync::Cache::new(super::MAX_ENDPOINTS),
        }
    }
}

impl RateLimits {
    /// Records the rate-limit headers of a response, if it has any, and returns them.
    pub fn observe(&self, origin: &str, headers: &HeaderMap) -> Option<RateLimit> {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (limit, remaining) = (number("ratelimit-limit"), number("ratelimit-remaining"));
        if limit.is_none() && remaining.is_none() {
            return None;
        }
        self.update(origin, |e| e.rate_limit = RateLimit { limit, remaining });
        Some(RateLimit { limit, remaining })
    }

    /// Closes an origin after a 429, for its `Retry-After` (seconds or an HTTP date).
    pub fn close(&self, origin: &str, retry_after: Option<&HeaderValue>) -> Duration {
        let wait = retry_after
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
            .unwrap_or(DEFAULT_RETRY_AFTER)
            .min(MAX_RETRY_AFTER);
        self.update(origin, |e| e.closed_until = Some(Instant::now() + wait));
        wait
    }

    /// Two concurrent updates of one origin may lose one: the next response says it again.
    fn update(&self, origin: &str, change: impl FnOnce(&mut Entry)) {
        let mut entry = self.entries.get(origin).unwrap_or_default();
        change(&mut entry);
        self.entries.insert(origin.to_owned(), entry);
    }

    /// How long an origin stays closed, if it is.
    pub fn closed_for(&self, origin: &str) -> Option<Duration> {
        let until = self.entries.get(origin)?.closed_until?;
        until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    pub fn rate_limit(&self, origin: &str) -> Option<RateLimit> {
        self.entries
            .get(origin)
            .map(|e| e.rate_limit)
            .filter(|r| *r != RateLimit::default())
    }
}

fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value.trim()).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_headers_are_recorded() {
        let limits = RateLimits::default();
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-limit", HeaderValue::from_static("100;w=21600"));
        headers.insert("ratelimit-remaining", HeaderValue::from_static("76;w=21600"));
        limits.observe("registry-1.docker.io", &headers);
        assert_eq!(
            limits.rate_limit("registry-1.docker.io"),
            Some(RateLimit {
                limit: Some(100),
                remaining: Some(76)
            })
        );
        limits.observe("registry-1.docker.io", &HeaderMap::new());
        assert_eq!(limits.rate_limit("registry-1.docker.io").unwrap().remaining, Some(76));
        assert_eq!(limits.rate_limit("ghcr.io"), None);
    }

    #[test]
    fn retry_after_closes_for_a_bounded_time() {
        let limits = RateLimits::default();
        assert_eq!(limits.closed_for("r"), None);
        assert_eq!(
            limits.close("r", Some(&HeaderValue::from_static("30"))),
            Duration::from_secs(30)
        );
        assert!(limits.closed_for("r").unwrap() > Duration::from_secs(28));
        assert_eq!(limits.close("r", None), DEFAULT_RETRY_AFTER);
        assert_eq!(
            limits.close("r", Some(&HeaderValue::from_static("999999"))),
            MAX_RETRY_AFTER
        );
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(61));
        let wait = limits.close("r", Some(&HeaderValue::from_str(&in_a_minute).unwrap()));
        assert!(
            wait > Duration::from_secs(55) && wait <= Duration::from_secs(61),
            "{wait:?}"
        );
        assert_eq!(limits.close("r", Some(&HeaderValue::from_static("0"))), Duration::ZERO);
        assert_eq!(limits.closed_for("r"), None);
    }
}
