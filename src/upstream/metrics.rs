//! Upstream metrics. The `registry` label is the registry's name when the operator configured
//! it or it is a well-known public registry, and `other` otherwise: clients choose `ns`, and
//! must not be able to grow the label set.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Public registries named in labels without being configured.
const WELL_KNOWN: &[&str] = &[
    "docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "mcr.microsoft.com",
    "public.ecr.aws",
    "nvcr.io",
    "registry.gitlab.com",
];

/// Whether a registry name may be a label value as it is.
pub fn well_known(name: &str) -> bool {
    WELL_KNOWN.contains(&name)
}

pub struct Metrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub bytes: IntCounterVec,
    pub tokens: IntCounterVec,
    pub ratelimit_remaining: IntGaugeVec,
    pub ratelimit_limit: IntGaugeVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "pullcache_upstream_requests_total",
                "Requests to upstream registries, by registry, kind and status class (error: no response).",
            ),
            &["registry", "kind", "status_class"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "pullcache_upstream_request_duration_seconds",
                "Time until an upstream registry's response headers.",
            )
            .buckets(vec![0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["registry", "kind"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "pullcache_upstream_bytes_total",
                "Body bytes fetched from upstream registries.",
            ),
            &["registry"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "pullcache_token_fetches_total",
                "Registry tokens fetched, by result (ok, refused, error).",
            ),
            &["registry", "result"],
        )?;
        let ratelimit_remaining = IntGaugeVec::new(
            Opts::new(
                "pullcache_upstream_ratelimit_remaining",
                "Pulls left in the registry's window, from its ratelimit-remaining header (Docker Hub).",
            ),
            &["registry"],
        )?;
        let ratelimit_limit = IntGaugeVec::new(
            Opts::new(
                "pullcache_upstream_ratelimit_limit",
                "The registry's pull limit per window, from its ratelimit-limit header (Docker Hub).",
            ),
            &["registry"],
        )?;
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(bytes.clone()),
            Box::new(tokens.clone()),
            Box::new(ratelimit_remaining.clone()),
            Box::new(ratelimit_limit.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Metrics {
            requests,
            duration,
            bytes,
            tokens,
            ratelimit_remaining,
            ratelimit_limit,
        })
    }

    /// Starts a registry's series at 0, so that dashboards and alert rates see the first
    /// request and error rather than a series appearing with them. The rate-limit gauges are
    /// left out: a remaining count of 0 would be a false alarm, so they appear with the
    /// registry's first header.
    pub fn start(&self, registry: &str) {
        for kind in ["manifest", "manifest_head", "blob"] {
            self.duration.with_label_values(&[registry, kind]);
            for class in ["2xx", "4xx", "5xx", "error"] {
                self.requests.with_label_values(&[registry, kind, class]);
            }
        }
        for result in ["ok", "refused", "error"] {
            self.tokens.with_label_values(&[registry, result]);
        }
        self.bytes.with_label_values(&[registry]);
    }
}
