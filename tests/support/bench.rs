//! What the benches (`benches/*.rs`, run by `bench/run`) share: their arguments and medians.

use std::time::Duration;

use anyhow::{Context, Result};

/// The arguments, when run by `cargo bench` (`--bench` among them). `cargo test --all-targets`
/// runs benches without it, only to check they build: then `None`, and the bench returns.
pub fn bench_args() -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench").then_some(args)
}

/// `name N` among `args`, else `default`.
pub fn count_arg(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).with_context(|| format!("{name} N"))?.parse()?),
        None => Ok(default),
    }
}

/// The middle of `samples` (the upper one of an even count).
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
