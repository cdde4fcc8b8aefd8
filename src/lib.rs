//! pullcache: a node-level pull-through cache for container images.
//!
//! The request path, in module order: [`server`] accepts a connection (through the [`listener`] every port
//! shares: cap, timeouts, drain) and routes each request, after [`authorize`] has let its client in; [`manifests`] answers manifests from
//! the [`store`] (tags through the tag index, concurrent misses sharing one lookup through
//! [`coalesce`]); blobs come from the [`store`] or a [`flight`], the one download per digest
//! that every client tails. Every miss, blob or manifest, `GET` or `HEAD`, goes out through
//! [`sources`]: one chain of the [`peers`] (cluster mode, the digest's owner first) and then
//! the [`upstream`] registries, which resumes a broken body from the next source. [`fetch`]
//! names what is asked for, [`wire`] holds the HTTP plumbing every layer shares, and
//! [`error`] says whose fault a failure is. [`intercept`] makes the listener an HTTPS proxy
//! that terminates TLS for registry hosts; [`ca`] signs its certificates and the peers'.
//! [`oci`] holds the grammar everything is validated against, and [`metrics`] the admin
//! listener with `/metrics`, `/healthz` and `/readyz`. [`layers`] is the rule that keeps
//! these arrows pointing down.
//!
//! The binary (`main.rs`) parses the command line and runs a node; its `bundle` module holds
//! the commands that run a node of their own to fill or empty a cache (`prefetch`, `export`,
//! `import`), using this library as any client would.
#![forbid(unsafe_code)]

pub mod authorize;
pub mod ca;
pub mod coalesce;
pub mod config;
pub mod containerd;
pub mod error;
pub mod fetch;
pub mod flight;
pub mod intercept;
pub mod layers;
pub mod listener;
pub mod listings;
pub mod manifests;
pub mod metrics;
pub mod oci;
pub mod peers;
pub mod server;
pub mod sources;
pub mod store;
mod sync;
pub mod upstream;
pub mod wire;

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
    /// The peer port, in cluster mode (bound on `config.peers.listen`).
    pub peer: Option<TcpListener>,
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
    let authorize_metrics = authorize::Metrics::register(&registry)?;
    let server_metrics = Arc::new(server::access::Metrics::register(&registry)?);
    let intercept = intercept_mode(&config, &registry).await?;
    let stopped = stop_signal(shutdown);
    let slot: Arc<server::AppSlot> = Arc::default();
    let peer_metrics = peers::Metrics::register(&registry)?;
    let peers = cluster_mode(&config, listeners.peer, peer_metrics, &slot, stopped())?;

    let store_slot: Arc<std::sync::OnceLock<Arc<store::Store>>> = Arc::default();
    let admin_addr = match &listeners.admin {
        Some(admin) => admin.local_addr()?.to_string(),
        None => "none".to_owned(),
    };
    let admin = listeners.admin.map(|listener| {
        let refresh = refresh_store_metrics(store_slot.clone(), store_metrics.clone());
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
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let api = tokio::spawn(server::serve(
        listeners.api,
        slot.clone(),
        intercept,
        config.limits,
        stopped(),
    ));

    let opening = std::time::Instant::now();
    let Some(store) = open_store(&config, stopped()).await? else {
        return join(api, admin).await;
    };
    let _ = store_slot.set(store.clone());
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
    let sources = Arc::new(sources::Sources::new(upstreams.clone(), peers));
    let _ = slot.set(server::App {
        authorize: authorize::Authorizer::new(upstreams, config.authorize.clone(), authorize_metrics),
        flights: flight::Flights::new(store.clone(), sources.clone(), flight_metrics),
        manifests: manifests::Manifests::new(store.clone(), sources.clone(), config.tag_ttl, config.tag_ttls.clone()),
        listings: listings::Listings::new(sources.clone(), config.tag_ttl, config.tag_ttls),
        default_registry: config.default_registry.clone(),
        spans: Arc::new(tokio::sync::Semaphore::new(server::MAX_SPANS)),
        sources,
        metrics: server_metrics,
    });
    readiness.set_ready();
    let (bytes, blobs) = store.usage();
    tracing::info!(
        blobs,
        bytes,
        tags = store.tags().len(),
        max_size = %config.budget.max_size.map_or("none".to_owned(), |b| format!("{b} bytes")),
        min_free = %config.budget.min_free,
        // The flag's and those `import --pin` saved in the cache.
        pins = store.pins().len(),
        opened_in = ?opening.elapsed(),
        "cache open; ready"
    );

    join(api, admin).await
}

/// Brings the store's gauges up to date for a scrape, once the store is open.
fn refresh_store_metrics(
    store: Arc<std::sync::OnceLock<Arc<store::Store>>>,
    metrics: Arc<store::Metrics>,
) -> metrics::Refresh {
    Box::new(move || {
        if let Some(store) = store.get() {
            metrics.refresh(store);
        }
    })
}

/// The intercept side, when configured: its CA (created on first start) and policy.
async fn intercept_mode(
    config: &Config,
    registry: &prometheus::Registry,
) -> anyhow::Result<Option<Arc<intercept::Intercept>>> {
    let Some(settings) = &config.intercept else {
        return Ok(None);
    };
    let dir = settings.ca_dir.clone();
    let ca = tokio::task::spawn_blocking(move || ca::Ca::load_or_create(&dir)).await??;
    let registries: Vec<_> = config
        .upstream
        .registries
        .keys()
        .chain(&settings.registries)
        .cloned()
        .collect();
    let policy = intercept::Policy::new(&registries, settings.tunnel_allow.clone());
    Ok(Some(Arc::new(intercept::Intercept::new(policy, ca, registry)?)))
}

/// Cluster mode, when configured: this node's peer certificate, the peers, and the peer port
/// serving `app` on `listener`.
fn cluster_mode(
    config: &Config,
    listener: Option<TcpListener>,
    metrics: peers::Metrics,
    app: &Arc<server::AppSlot>,
    stop: StopFuture,
) -> anyhow::Result<Option<Arc<peers::Peers>>> {
    let Some(settings) = &config.peers else {
        return Ok(None);
    };
    let listener = listener.ok_or_else(|| anyhow::anyhow!("cluster mode needs a peer listener"))?;
    let settings = peers::Settings {
        // Port 0 (tests) becomes the port bound.
        listen: listener.local_addr()?,
        ..settings.clone()
    };
    let identity = peers::tls::Identity::issue(&settings.ca_dir, settings.listen.ip())?;
    let peers = Arc::new(peers::Peers::new(&settings, &identity, metrics));
    tracing::info!(peer_addr = %settings.listen, targets = ?settings.targets, "cluster mode");
    tokio::spawn(server::peer::serve(
        listener,
        app.clone(),
        peers.clone(),
        Arc::new(identity.server_config()?),
        config.limits,
        stop,
    ));
    Ok(Some(peers))
}

/// A maker of futures that all resolve once `shutdown` has.
fn stop_signal(shutdown: impl Future<Output = ()> + Send + 'static) -> impl Fn() -> StopFuture {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    move || {
        let mut rx = stop_rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        })
    }
}

type StopFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Opens the cache, retrying with backoff while it cannot be; `None` when `stop` came first.
async fn open_store(config: &Config, stop: StopFuture) -> anyhow::Result<Option<Arc<store::Store>>> {
    tokio::pin!(stop);
    let mut delay = STORE_RETRY;
    loop {
        let (dir, budget) = (config.cache_dir.clone(), config.budget.clone());
        match tokio::task::spawn_blocking(move || store::Store::open(&dir).map(|s| s.with_budget(budget))).await? {
            Ok(store) => return Ok(Some(Arc::new(store))),
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?delay, "cannot open the cache; not ready");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut stop => return Ok(None),
                }
                delay = (delay * 2).min(STORE_RETRY_MAX);
            }
        }
    }
}

async fn join(api: tokio::task::JoinHandle<()>, admin: Option<tokio::task::JoinHandle<()>>) -> anyhow::Result<()> {
    api.await?;
    if let Some(admin) = admin {
        admin.await?;
    }
    Ok(())
}
