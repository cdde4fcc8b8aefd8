//! Authorization metrics: what was decided for clients, and what the registry was asked.

use prometheus::{IntCounterVec, Opts, Registry};

use crate::upstream::{Answer, UpstreamError};

/// Every `result` label value, so each series exists from the start.
const RESULTS: &[&str] = &[
    "anonymous_cache",
    "public",
    "allowed",
    "denied",
    "challenged",
    "bypassed",
    "shared",
    "not_in_repository",
    "unverified",
];
const ANSWERS: &[&str] = &["readable", "missing", "refused", "error"];

pub struct Metrics {
    decisions: IntCounterVec,
    checks: IntCounterVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "pullcache_authorizations_total",
                "Client requests for manifests and blobs, by what was decided: anonymous_cache (pullcache holds no \
                 credentials for the registry, so all it has is public), public (anyone may read it), \
                 allowed or denied (a private repository, by the client's own credentials), challenged (no \
                 credentials: the registry's 401 relayed), bypassed (mirror mode, private = bypass: 404), \
                 shared (mirror mode, private = share: not checked), not_in_repository, unverified (the registry could not \
                 be asked).",
            ),
            &["result"],
        )?;
        let checks = IntCounterVec::new(
            Opts::new(
                "pullcache_authorization_checks_total",
                "HEAD requests sent upstream to authorize: as a client (its own credentials) or anonymous \
                 (whether a repository is private), by answer.",
            ),
            &["as", "answer"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(checks.clone()))?;
        for result in RESULTS {
            decisions.with_label_values(&[result]);
        }
        for who in ["client", "anonymous"] {
            for answer in ANSWERS {
                checks.with_label_values(&[who, answer]);
            }
        }
        Ok(Metrics { decisions, checks })
    }

    pub(super) fn decided(&self, result: &'static str) {
        debug_assert!(RESULTS.contains(&result));
        self.decisions.with_label_values(&[result]).inc();
    }

    pub(super) fn asked(&self, who: &'static str, answer: &Result<Answer, UpstreamError>) {
        let answer = match answer {
            Ok(Answer::Readable) => "readable",
            Ok(Answer::Missing) => "missing",
            Ok(Answer::Refused { .. }) => "refused",
            Err(_) => "error",
        };
        self.checks.with_label_values(&[who, answer]).inc();
    }
}
