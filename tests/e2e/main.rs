//! pullcache's end-to-end tests, in one test binary: the real binary and the library against
//! the real distribution registry, the real containerd, podman and skopeo, and misbehaving
//! upstreams (`tests/support/`). One module per concern; each was a test binary of its own,
//! and together they compile `tests/support` once and link once.
//!
//! `cargo test --test e2e` runs them all; `cargo test --test e2e cluster::` one module. They
//! run in parallel threads of one process, so none of them may change process-wide state
//! (environment, current directory) or take a fixed name or port outside a namespace of its
//! own: a cluster's namespaces are named by pid and run, ports are 0 or inside a namespace.
//! The tests of the helpers themselves are `tests/harness`.

#[path = "../support/mod.rs"]
mod support;

/// The containerd matrix: `each_release!(name, |release| async move { ... })` is a module
/// `name` of three tests, `containerd_1_6`, `containerd_1_7` and `containerd_2_1`, each
/// running the body on that [`support::containerd::Release`].
macro_rules! each_release {
    ($name:ident, $run:expr) => {
        mod $name {
            use crate::support::containerd::Release;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn containerd_1_6() -> anyhow::Result<()> {
                ($run)(Release::V1_6).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn containerd_1_7() -> anyhow::Result<()> {
                ($run)(Release::V1_7).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn containerd_2_1() -> anyhow::Result<()> {
                ($run)(Release::V2_1).await
            }
        }
    };
}

mod address_policy;
mod airgap;
mod ca_secret;
mod cli;
mod cluster;
mod cluster_harness;
mod cluster_loopback;
mod config_sources;
mod containerd_config;
mod containerd_pull;
mod discovery;
mod disk;
mod fail_open;
mod faults;
mod herd;
mod hostile;
mod hostile_registry;
mod http_api;
mod image;
mod intercept;
mod lazy_pulls;
mod listings;
mod observability;
mod podman;
mod private_images;
mod private_registry;
mod provenance;
mod readme;
mod secrets;
mod upgraded_connections;
mod upstream_protocol;
