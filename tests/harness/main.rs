//! Tests of the test harness, not of pullcache. The helpers in `tests/support/` stand up the
//! real distribution registry (plain, TLS, basic or token auth), push images, drive the real
//! containerd and record requests; pullcache's end-to-end tests trust what they do. These
//! tests check that trust against the real programs, with no pullcache in the path: when one
//! fails, a helper or a Debian package changed, not pullcache.
//!
//! `cargo test --test harness`; they need what `tests/install-deps.sh` installs.

#[path = "../support/mod.rs"]
mod support;

mod auth;
mod containerd;
mod cri;
mod registry;
