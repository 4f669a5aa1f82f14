//! One shutdown for the whole service: how a stop request reaches every
//! task, and how the process knows that every task has ended.
//!
//! A [`Shutdown`] is made once per process by whoever runs the service (the
//! single process, the privilege-separated worker, the keeper) and cloned
//! into everything that runs on its own: listeners, connections and their
//! associations, the TLS and drop-folder watchers, the heartbeat and the
//! status reporter, the channels to the keeper and to systemd. Each of them
//! is spawned with [`Shutdown::spawn`], so the owner can wait for all of
//! them, and none is left running when the process exits.
//!
//! Stopping has two phases:
//! 1. *Stop* ([`Shutdown::stop`], on the first SIGINT or SIGTERM, or on a
//!    restart): listeners stop accepting, connections that have not
//!    associated yet are dropped, idle associations are aborted, watchers
//!    and background tasks end. An association with an object in flight
//!    goes on until that object is stored (and answered), then is aborted.
//! 2. *Abort*, at the end of [`Shutdown::drain`]'s bound or on a second
//!    SIGINT or SIGTERM: every task still running is dropped where it
//!    stands. An object cut off this way leaves no file (its temp file is
//!    removed on drop) and its sender gets no success status, so it sends
//!    again.
//!
//! The bound is the configuration's `shutdown_timeout`: whatever a peer
//! does (a stalled sender, a half-open connection), the service has ended
//! every task within it, plus the time it takes to drop them.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// The shared stop state of one process. Cloning is cheap; every clone is
/// the same shutdown.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// cancelled when the graceful phase begins
    stop: CancellationToken,
    /// cancelled when whatever is left is to be dropped
    abort: CancellationToken,
    /// every task spawned for this service
    tracker: TaskTracker,
}

/// How [`Shutdown::drain`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every task finished on its own within the bound.
    Finished,
    /// The bound passed; the tasks left were dropped.
    TimedOut,
    /// A second stop signal came; the tasks left were dropped.
    Interrupted,
}

impl Shutdown {
    /// A shutdown that has not begun.
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins the graceful phase (idempotent): see the module comment.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Whether the graceful phase has begun.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves once the graceful phase has begun.
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// The stop token alone, for code that only needs to know when to end
    /// (an association, a watcher) and has no business spawning tasks.
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Spawns a task that this shutdown waits for. It should end by itself
    /// once [`Shutdown::stopped`] resolves; if it has not when the graceful
    /// phase ends, it is dropped (its handle then yields `None`).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let abort = self.abort.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                _ = abort.cancelled() => None,
                out = task => Some(out),
            }
        })
    }

    /// How many spawned tasks are still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Stops (if not already stopped) and waits until every spawned task
    /// has ended: at most `bound`, or until `cut_short` resolves (a second
    /// stop signal); then drops whatever is left and waits for that.
    pub async fn drain(&self, bound: Duration, cut_short: impl Future<Output = ()>) -> Drained {
        self.stop();
        self.tracker.close();
        let outcome = tokio::select! {
            _ = self.tracker.wait() => Drained::Finished,
            _ = tokio::time::sleep(bound) => Drained::TimedOut,
            _ = cut_short => Drained::Interrupted,
        };
        if outcome != Drained::Finished {
            warn!(
                tasks = self.tracker.len(),
                ?outcome,
                "stopping: dropping what is still running (objects cut off leave no file)"
            );
            self.abort.cancel();
            self.tracker.wait().await;
        }
        outcome
    }
}

/// SIGTERM and SIGINT, taken over from their default (die at once) as soon
/// as this is made: a stop request during start-up is then seen, not fatal.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Installs the handlers (needs a running tokio runtime).
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT and logs it.
    pub async fn recv(&mut self) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        info!(signal = name, "stop requested");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tasks_that_end_on_stop() {
        let shutdown = Shutdown::new();
        let token = shutdown.token();
        let ended = shutdown.spawn(async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            "finished its object"
        });
        assert!(!shutdown.is_stopping());
        let outcome = shutdown
            .drain(Duration::from_secs(5), std::future::pending())
            .await;
        assert_eq!(outcome, Drained::Finished);
        assert!(shutdown.is_stopping());
        assert_eq!(ended.await.ok().flatten(), Some("finished its object"));
        assert_eq!(shutdown.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_stop_is_dropped_at_the_bound() {
        let shutdown = Shutdown::new();
        let stuck = shutdown.spawn(tokio::time::sleep(LONG));
        let started = tokio::time::Instant::now();
        let outcome = shutdown
            .drain(Duration::from_secs(5), std::future::pending())
            .await;
        assert_eq!(outcome, Drained::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(stuck.await.ok().flatten(), None, "dropped, not finished");
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_request_cuts_the_graceful_phase_short() {
        let shutdown = Shutdown::new();
        let stuck = shutdown.spawn(tokio::time::sleep(LONG));
        let started = tokio::time::Instant::now();
        let outcome = shutdown
            .drain(LONG, tokio::time::sleep(Duration::from_secs(1)))
            .await;
        assert_eq!(outcome, Drained::Interrupted);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(stuck.await.ok().flatten(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_spawned_while_draining_are_waited_for() {
        let shutdown = Shutdown::new();
        let inner = shutdown.clone();
        // A listener that accepts one more connection as the stop comes.
        shutdown.spawn(async move {
            inner.stopped().await;
            inner.spawn(tokio::time::sleep(Duration::from_secs(3)));
        });
        let started = tokio::time::Instant::now();
        let outcome = shutdown.drain(LONG, std::future::pending()).await;
        assert_eq!(outcome, Drained::Finished);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
