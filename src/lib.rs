//! pullcache: a node-level pull-through cache for container images.
//!
//! The request path, in module order: [`server`] accepts and routes a request; [`manifests`]
//! answers manifests from the [`store`] (tags through the tag index), concurrent misses for one
//! tag or digest sharing a single upstream lookup through [`coalesce`]; blobs come from the
//! [`store`] or a [`flight`], the one download per digest that every client tails; misses go
//! through the [`upstream`] client. [`intercept`] makes the same listener an HTTPS proxy that
//! terminates TLS for registry hosts. [`oci`] holds the grammar everything is validated
//! against, and [`metrics`] the admin listener with `/metrics`, `/healthz` and `/readyz`.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod coalesce;
pub mod config;
pub mod containerd;
pub mod error;
pub mod flight;
pub mod intercept;
pub mod manifests;
pub mod metrics;
pub mod oci;
pub mod server;
pub mod store;
mod sync;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;

/// First wait before opening the cache again after a failure; it doubles up to the maximum.
const STORE_RETRY: Duration = Duration::from_secs(1);
const STORE_RETRY_MAX: Duration = Duration::from_secs(30);

/// The sockets pullcache serves on, bound by the caller (tests bind port 0).
pub struct Listeners {
    /// The registry API containerd talks to.
    pub api: TcpListener,
    /// `/metrics`, `/healthz` and `/readyz`; none to go without.
    pub admin: Option<TcpListener>,
}

/// Serves until `shutdown` resolves. The API answers 503 (and `/readyz` too) until the cache
/// is open; a cache directory that cannot be opened yet is retried, not fatal.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = metrics::registry();
    let readiness = metrics::Readiness::default();
    let store_metrics = Arc::new(store::Metrics::register(&registry)?);
    let upstreams = Arc::new(upstream::Upstreams::new(
        config.upstream.clone(),
        upstream::Metrics::register(&registry)?,
    ));
    let flight_metrics = flight::Metrics::register(&registry)?;
    let server_metrics = Arc::new(server::access::Metrics::register(&registry)?);
    let intercept = match &config.intercept {
        Some(settings) => {
            let dir = settings.ca_dir.clone();
            let ca = tokio::task::spawn_blocking(move || intercept::Ca::load_or_create(&dir)).await??;
            let registries: Vec<_> = config
                .upstream
                .registries
                .keys()
                .chain(&settings.registries)
                .cloned()
                .collect();
            let policy = intercept::Policy::new(&registries, settings.tunnel_allow.clone());
            Some(Arc::new(intercept::Intercept::new(policy, ca, &registry)?))
        }
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let slot: Arc<server::AppSlot> = Arc::default();
    let store_slot: Arc<std::sync::OnceLock<Arc<store::Store>>> = Arc::default();
    let admin_addr = match &listeners.admin {
        Some(admin) => admin.local_addr()?.to_string(),
        None => "none".to_owned(),
    };
    let admin = listeners.admin.map(|listener| {
        let refresh: metrics::Refresh = {
            let (store_slot, store_metrics) = (store_slot.clone(), store_metrics.clone());
            Box::new(move || {
                if let Some(store) = store_slot.get() {
                    store_metrics.refresh(store);
                }
            })
        };
        tokio::spawn(metrics::serve(
            listener,
            registry,
            readiness.clone(),
            vec![refresh],
            stopped(),
        ))
    });
    tracing::info!(
        addr = %listeners.api.local_addr()?,
        metrics_addr = %admin_addr,
        cache_dir = %config.cache_dir.display(),
        tag_ttl = ?config.tag_ttl,
        "serving"
    );
    let api = tokio::spawn(server::serve(
        listeners.api,
        slot.clone(),
        intercept,
        config.limits,
        stopped(),
    ));

    let mut delay = STORE_RETRY;
    let opening = std::time::Instant::now();
    let store = loop {
        let (dir, budget) = (config.cache_dir.clone(), config.budget.clone());
        match tokio::task::spawn_blocking(move || store::Store::open(&dir).map(|s| s.with_budget(budget))).await? {
            Ok(store) => break Arc::new(store),
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?delay, "cannot open the cache; not ready");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped() => return join(api, admin).await,
                }
                delay = (delay * 2).min(STORE_RETRY_MAX);
            }
        }
    };
    let opened_in = opening.elapsed();
    let _ = store_slot.set(store.clone());
    let (bytes, blobs) = store.usage();
    store_metrics.set_budget(store.budget());
    tokio::spawn({
        let (store, stop) = (store.clone(), stopped());
        async move {
            tokio::select! {
                () = store::keep_within_budget(store) => {}
                () = stop => {}
            }
        }
    });
    let _ = slot.set(server::App {
        flights: flight::Flights::new(store.clone(), upstreams.clone(), flight_metrics),
        manifests: manifests::Manifests::new(store.clone(), upstreams.clone(), config.tag_ttl, config.tag_ttls),
        upstreams,
        metrics: server_metrics,
    });
    readiness.set_ready();
    tracing::info!(
        blobs,
        bytes,
        tags = store.tags().len(),
        max_size = ?config.budget.max_size,
        min_free = %config.budget.min_free,
        pins = config.budget.pins.len(),
        ?opened_in,
        "cache open; ready"
    );

    join(api, admin).await
}

async fn join(api: tokio::task::JoinHandle<()>, admin: Option<tokio::task::JoinHandle<()>>) -> anyhow::Result<()> {
    api.await?;
    if let Some(admin) = admin {
        admin.await?;
    }
    Ok(())
}
