//! Authorization metrics: what was decided for clients, and what the registry was asked.

use prometheus::{IntCounterVec, Opts, Registry};

use crate::upstream::{Answer, UpstreamError};

/// Every `result` label value, so each series exists from the start.
const RESULTS: &[&str] = &[
    "anonymous",
    "public",
    "allowed",
    "denied",
    "challenged",
    "bypassed",
    "shared",
    "not_in_repository",
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
                "Checks of client requests for manifests and blobs that could be private (content public by its \
                 provenance is served unchecked), by what was decided: anonymous (mirror mode, no credentials for \
                 the registry: fetched anonymously, so public if it arrives), public (anyone may read the repository), \
                 allowed or denied (a private repository, by the client's own credentials), challenged (no \
                 credentials: the registry's 401 relayed), bypassed (mirror mode, private = bypass: 404), \
                 shared (mirror mode, private = share: not checked), not_in_repository (the registry answered 404 \
                 to the client's credential).",
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
