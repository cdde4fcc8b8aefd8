//! Waiting for something to happen without guessing how long it takes: a probe is polled
//! until it holds or a deadline passes, and the deadline is a failure that names what never
//! happened. Tests poll, they do not sleep.
//!
//! A test that shows something does *not* happen first waits here for a positive event that
//! proves the system had its chance to act (a later request logged, a metric that must move
//! moved; see `Registry::settle`), then checks the absence.

use std::fmt::Display;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// How often a probe is polled unless the caller says otherwise.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// What a probe answers: `bool` (true: done), `Option<T>` (`Some`: done, with the value), or
/// either of them in an `anyhow::Result`, whose error ends the wait at once.
pub trait Outcome {
    type Value;
    fn done(self) -> Result<Option<Self::Value>>;
}

impl Outcome for bool {
    type Value = ();
    fn done(self) -> Result<Option<()>> {
        Ok(self.then_some(()))
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn done(self) -> Result<Option<T>> {
        Ok(self)
    }
}

impl Outcome for Result<bool> {
    type Value = ();
    fn done(self) -> Result<Option<()>> {
        self.map(|done| done.then_some(()))
    }
}

impl<T> Outcome for Result<Option<T>> {
    type Value = T;
    fn done(self) -> Result<Option<T>> {
        self
    }
}

/// Polls `probe` every [`INTERVAL`] until it is done, for at most `timeout`; `what` says what
/// is awaited ("the owner to start the layer") for the error when it never happens. The
/// probe is a closure that returns a future (`|| async { ... }`), not an async closure, whose
/// futures the compiler cannot yet prove `Send` for a spawned task.
pub async fn eventually<O: Outcome, F: Future<Output = O>>(
    timeout: Duration,
    what: impl Display,
    probe: impl FnMut() -> F,
) -> Result<O::Value> {
    eventually_every(INTERVAL, timeout, what, probe).await
}

/// [`eventually`], polling every `every` (short, to catch a state that does not last).
pub async fn eventually_every<O: Outcome, F: Future<Output = O>>(
    every: Duration,
    timeout: Duration,
    what: impl Display,
    mut probe: impl FnMut() -> F,
) -> Result<O::Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await.done().with_context(|| format!("waiting for {what}"))? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// [`eventually`] for code that cannot await (a `Drop`, a sync helper): blocks the thread.
pub fn eventually_blocking<O: Outcome>(
    timeout: Duration,
    what: impl Display,
    mut probe: impl FnMut() -> O,
) -> Result<O::Value> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().done().with_context(|| format!("waiting for {what}"))? {
            return Ok(value);
        }
        if std::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(INTERVAL);
    }
}
