//! pullcache: a node-level pull-through cache for container images.
//!
//! The request path, in module order: [`server`] accepts and routes a request; [`manifests`]
//! answers manifests from the [`store`] (tags through the tag index); blobs come from the
//! [`store`] or a [`flight`], the one download per digest that every client tails; misses go
//! through the [`upstream`] client. [`oci`] holds the grammar everything is validated against.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod flight;
pub mod manifests;
pub mod oci;
pub mod server;
pub mod store;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// Opens the cache and serves on `listener` until `shutdown` resolves. Tests bind port 0 and
/// pass the listener in.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let store = {
        let dir = config.cache_dir.clone();
        let store = tokio::task::spawn_blocking(move || store::Store::open(&dir)).await??;
        Arc::new(store)
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        cache_dir = %config.cache_dir.display(),
        tags = store.tags().len(),
        tag_ttl = ?config.tag_ttl,
        "serving"
    );
    let upstreams = Arc::new(upstream::Upstreams::new(config.upstream));
    let app = Arc::new(server::App {
        flights: flight::Flights::new(store.clone(), upstreams.clone()),
        manifests: manifests::Manifests::new(
            store,
            upstreams.clone(),
            config.tag_ttl,
            config.tag_ttls,
        ),
        upstreams,
    });
    server::serve(listener, app, shutdown).await;
    Ok(())
}
