//! The access log and the request metrics. Each response body carries an [`Access`] guard
//! that counts the bytes actually sent; when the body ends (or the client goes away) the guard
//! writes the one access line and records the request, its duration and the bytes served.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use http_body_util::BodyExt;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use super::response::Body;
use crate::fetch::CacheResult;

pub struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    served_bytes: IntCounterVec,
    /// Blob bytes handed to `sendfile`, which never pass through user space.
    pub sendfile_bytes: IntCounter,
    /// Bounded ranges of blobs not yet verified, fetched from registries on their own, and
    /// their bytes.
    pub spans: IntCounter,
    pub span_bytes: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "pullcache_requests_total",
                "Client requests, by route, method, status class and cache result.",
            ),
            &["route", "method", "status_class", "cache"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "pullcache_request_duration_seconds",
                "Time from a request's arrival to the end of its response body.",
            )
            .buckets(vec![0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 300.0]),
            &["route"],
        )?;
        let served_bytes = IntCounterVec::new(
            Opts::new(
                "pullcache_served_bytes_total",
                "Body bytes sent to clients, by where they came from (cache or upstream) and route.",
            ),
            &["source", "route"],
        )?;
        let sendfile_bytes = IntCounter::new(
            "pullcache_sendfile_bytes_total",
            "Blob bytes sent from the cache's files with sendfile (plain HTTP/1), without a copy through user space.",
        )?;
        let spans = IntCounter::new(
            "pullcache_upstream_spans_total",
            "Bounded ranges of blobs not yet verified (lazy pulls' spans) fetched from registries on their own, beside the blobs' whole downloads.",
        )?;
        let span_bytes = IntCounter::new(
            "pullcache_upstream_span_bytes_total",
            "Bytes of those ranges, relayed to the client and stored nowhere.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(sendfile_bytes.clone()))?;
        registry.register(Box::new(spans.clone()))?;
        registry.register(Box::new(span_bytes.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(served_bytes.clone()))?;
        // The series dashboards and alerts read start at 0: a hit ratio or an error rate
        // then counts its first request rather than starting with it.
        for route in ["manifest", "blob"] {
            for (status_class, cache) in [("2xx", "hit"), ("2xx", "miss"), ("4xx", "none"), ("5xx", "none")] {
                requests.with_label_values(&[route, "GET", status_class, cache]);
            }
            duration.with_label_values(&[route]);
            for source in ["cache", "upstream"] {
                served_bytes.with_label_values(&[source, route]);
            }
        }
        Ok(Metrics {
            requests,
            duration,
            served_bytes,
            sendfile_bytes,
            spans,
            span_bytes,
        })
    }
}

/// One request, logged and counted when its response body is done with.
pub struct Access {
    pub metrics: std::sync::Arc<Metrics>,
    pub method: &'static str,
    pub path: String,
    pub registry: String,
    pub repo: String,
    pub route: &'static str,
    pub status: http::StatusCode,
    pub cache: Option<CacheResult>,
    pub started: Instant,
    pub bytes: u64,
}

impl Access {
    /// Wraps a body so this guard sees every byte of it and outlives it.
    pub fn wrap(self, body: Body) -> Body {
        Counted { body, access: self }.boxed_unsync()
    }
}

/// A body that counts its data into its [`Access`]. It keeps the inner body's size hint, so
/// hyper still sends a `Content-Length` the handler did not set.
struct Counted {
    body: Body,
    access: Access,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.access.bytes += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let status_class = crate::wire::status_class(self.status);
        let cache = self.cache.map_or("none", CacheResult::as_str);
        self.metrics
            .requests
            .with_label_values(&[self.route, self.method, status_class, cache])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[self.route])
            .observe(elapsed.as_secs_f64());
        if let Some(source) = self.cache.and_then(CacheResult::source)
            && matches!(self.route, "manifest" | "blob")
        {
            self.metrics
                .served_bytes
                .with_label_values(&[source, self.route])
                .inc_by(self.bytes);
        }
        tracing::info!(
            method = self.method,
            path = %self.path,
            registry = %self.registry,
            repo = %self.repo,
            kind = self.route,
            status = self.status.as_u16(),
            cache,
            bytes = self.bytes,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}
