//! Store and forward: the objects the `[[forward]]` rules queued (see
//! [`crate::index::queue`]) go on to their destinations.
//!
//! One worker per destination ([`worker`]), so that a destination that is
//! down, slow or refusing delays nobody else's objects. Each worker takes
//! its queue oldest first, many objects per association, each data set
//! streamed from its file with its bytes as stored, and records every
//! outcome in the index: delivered, failed for good (kept and shown), or
//! to be tried again after a pause that grows ([`crate::backoff`]). Delivery is
//! at least once: an object the destination stored and the process died
//! before recording is sent again, never lost.
//!
//! Receiving comes first: a modality waits for each C-STORE's answer, and
//! the queue can wait. The workers run on a thread of their own at a low
//! CPU priority ([`NICE`]; the threads it starts for file and index work
//! inherit it), and while objects are arriving a worker pauses after each
//! object it sends for [`GIVE_WAY`] times as long as the send took, so
//! that forwarding runs at a quarter of its pace, never stops, and takes
//! up again at full pace as soon as the senders are done. Measured on 2
//! cores (`tests/bench/forward.py`), W1 received while the previous W1 was
//! forwarded took 1.33x (durable) and 1.62x (without fsync) the time it
//! took alone while the workers shared the service's threads at full
//! pace; the low priority alone brought that to 1.20-1.28x and 1.44-1.76x.

mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use crate::dirfd::Folder;
use crate::index::queue::Rule;
use crate::index::Index;
use crate::logs::Audit;
use crate::retrieve::Peers;
use crate::shutdown::Shutdown;

/// How a destination is doing, as its worker last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationState {
    /// since when every attempt has failed (None: the last one succeeded,
    /// or none was made)
    pub retrying_since: Option<SystemTime>,
    /// why the last attempt failed
    pub last_error: String,
    /// objects delivered since start
    pub delivered: u64,
    /// objects refused for good since start
    pub failed: u64,
}

/// What every worker shares.
struct Shared {
    /// the service's runtime: index writes run on its blocking threads, at
    /// the service's priority, so that a low-priority thread never holds
    /// the index's write lock while the receive path's writer waits for it
    service: tokio::runtime::Handle,
    /// retention's word that the store is short of room and waits for the
    /// queue: pauses are kept short then
    room: Arc<crate::retention::RoomWanted>,
    /// data set bytes received so far (the service's counter): when it
    /// moves during a send, objects are arriving
    inbound: Arc<std::sync::atomic::AtomicU64>,
    index: Arc<Index>,
    root: Arc<Folder>,
    peers: Arc<Peers>,
    audit: Option<Arc<Audit>>,
    /// our AE title (live)
    calling_ae: Mutex<String>,
    /// how long a destination gets for each step
    timeout: Mutex<Duration>,
    /// destinations a rule asks storage commitment of, and how long a
    /// request waits for its report before it is asked again (seconds)
    commit: Mutex<(std::collections::HashSet<String>, i64)>,
    states: Mutex<HashMap<String, DestinationState>>,
}

impl Shared {
    fn calling_ae(&self) -> String {
        self.calling_ae
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn timeout(&self) -> Duration {
        *self.timeout.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a rule asks `destination` for storage commitment, and the
    /// timeout for its reports.
    fn commit_of(&self, destination: &str) -> Option<i64> {
        let commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        commit.0.contains(destination).then_some(commit.1)
    }

    /// Data set bytes received by the service so far.
    fn received(&self) -> u64 {
        self.inbound.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn update(&self, destination: &str, change: impl FnOnce(&mut DestinationState)) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        change(states.entry(destination.to_string()).or_default());
    }
}

/// While objects are arriving, a worker pauses this many times as long as
/// its last send took before the next one.
pub const GIVE_WAY: u32 = 3;

/// The nice value of the forwarder's thread (0 is the service's; 19 the
/// lowest priority): the workers get the CPU that receiving leaves.
pub const NICE: i32 = 19;

/// The forwarder: the workers, started as destinations appear.
pub struct Forwarder {
    shared: Arc<Shared>,
    shutdown: Shutdown,
    /// the runtime the workers run on (on the low-priority thread)
    lane: tokio::runtime::Handle,
    /// the workers, for the shutdown to wait for
    tracker: tokio_util::task::TaskTracker,
    /// destinations that have a worker
    running: Mutex<Vec<String>>,
}

/// Starts the forwarder's thread: a runtime of its own at [`NICE`],
/// running until `stop` and then until its workers have ended.
fn start_lane(
    stop: tokio_util::sync::CancellationToken,
    tracker: tokio_util::task::TaskTracker,
) -> std::io::Result<tokio::runtime::Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("forwarder".into())
        .spawn(move || {
            // Per thread on Linux: this thread, and those it starts.
            let tid = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(tid), NICE) {
                tracing::warn!(error = %e, "forwarder: CPU priority not lowered");
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(runtime.handle().clone()));
            runtime.block_on(async {
                stop.cancelled().await;
                tracker.close();
                tracker.wait().await;
            });
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the forwarder's thread ended at its start"))?
}

impl Forwarder {
    /// A forwarder over `index`, reading files in `root`, sending to
    /// `peers` as `calling_ae`; its workers run on a thread of their own
    /// and end with `shutdown`, which waits for them. Called on the
    /// service's runtime.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        room: Arc<crate::retention::RoomWanted>,
        inbound: Arc<std::sync::atomic::AtomicU64>,
        index: Arc<Index>,
        root: Arc<Folder>,
        peers: Arc<Peers>,
        audit: Option<Arc<Audit>>,
        calling_ae: String,
        timeout: Duration,
        shutdown: Shutdown,
    ) -> std::io::Result<Forwarder> {
        let tracker = tokio_util::task::TaskTracker::new();
        let lane = start_lane(shutdown.token(), tracker.clone())?;
        // The service's shutdown waits for the workers too.
        let stopped = shutdown.token();
        let workers = tracker.clone();
        shutdown.spawn(async move {
            stopped.cancelled().await;
            workers.close();
            workers.wait().await;
        });
        Ok(Forwarder {
            shared: Arc::new(Shared {
                service: tokio::runtime::Handle::current(),
                room,
                inbound,
                index,
                root,
                peers,
                audit,
                calling_ae: Mutex::new(calling_ae),
                timeout: Mutex::new(timeout),
                commit: Mutex::default(),
                states: Mutex::default(),
            }),
            shutdown,
            lane,
            tracker,
            running: Mutex::default(),
        })
    }

    /// Takes the rules (at start and on every live change): the index
    /// queues by them from now on, and every destination that a rule names
    /// or that has entries waiting gets its worker.
    pub fn apply(
        &self,
        rules: Vec<Rule>,
        calling_ae: String,
        timeout: Duration,
        commitment_timeout: Duration,
    ) {
        let mut destinations: Vec<String> = rules.iter().map(|r| r.destination.clone()).collect();
        *self
            .shared
            .commit
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (
            rules
                .iter()
                .filter(|r| r.commit)
                .map(|r| r.destination.clone())
                .collect(),
            commitment_timeout.as_secs() as i64,
        );
        self.shared.index.set_forward_rules(rules);
        *self
            .shared
            .calling_ae
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = calling_ae;
        *self
            .shared
            .timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = timeout;
        match self.shared.index.destinations_waiting() {
            Ok(waiting) => destinations.extend(waiting),
            Err(e) => tracing::warn!(error = %e, "forwarding queue unreadable"),
        }
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        for destination in destinations {
            if running.contains(&destination) {
                continue;
            }
            running.push(destination.clone());
            let shared = Arc::clone(&self.shared);
            let stop = self.shutdown.token();
            self.tracker
                .spawn_on(worker::run(shared, destination, stop), &self.lane);
        }
    }

    /// Each destination with a worker and how it is doing, by name.
    pub fn states(&self) -> Vec<(String, DestinationState)> {
        let states = self
            .shared
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = states.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// One clause for the status line: queue depth, the oldest undelivered
    /// object's age, and each destination's state; empty when nothing was
    /// ever queued.
    pub fn summary(&self) -> String {
        let counts = match self.shared.index.queue_counts() {
            Ok(counts) => counts,
            Err(e) => return format!("; forwarding queue unreadable: {e}"),
        };
        let states = self.states();
        if counts.is_empty() && states.is_empty() {
            return String::new();
        }
        let now = crate::index::queue::unix_now();
        let waiting: u64 = counts.iter().map(|c| c.queued + c.sent).sum();
        let oldest = counts.iter().filter_map(|c| c.oldest_undelivered).min();
        let mut line = format!("; forward queue {waiting}");
        if let Some(oldest) = oldest {
            line.push_str(&format!(
                " (oldest {})",
                age(Duration::from_secs((now - oldest).max(0) as u64))
            ));
        }
        let mut names: Vec<&str> = counts.iter().map(|c| c.destination.as_str()).collect();
        names.extend(states.iter().map(|(n, _)| n.as_str()));
        names.sort_unstable();
        names.dedup();
        for name in names {
            let state = states.iter().find(|(n, _)| n == name).map(|(_, s)| s);
            let failed = counts
                .iter()
                .find(|c| c.destination == name)
                .map_or(0, |c| c.failed);
            line.push_str(&format!("; {name} "));
            match state.and_then(|s| s.retrying_since.map(|t| (t, &s.last_error))) {
                Some((since, why)) => line.push_str(&format!(
                    "retrying since {} ({why})",
                    crate::timestamp::rfc3339(since)
                )),
                None => line.push_str("ok"),
            }
            if failed > 0 {
                line.push_str(&format!(", {failed} failed"));
            }
        }
        line
    }
}

/// The `[[forward]]` rules as the index applies them.
pub fn rules_of(forward: &[crate::config::ForwardRule]) -> Vec<Rule> {
    forward
        .iter()
        .map(|rule| Rule {
            destination: rule.to.clone(),
            calling: rule.calling.clone(),
            modality: rule.modality.clone(),
            commit: rule.commit,
        })
        .collect()
}

/// A duration as an operator reads it: "42 s", "7 min", "3 h", "2 d".
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(Duration::from_secs(42)), "42 s");
        assert_eq!(age(Duration::from_secs(7 * 60 + 5)), "7 min");
        assert_eq!(age(Duration::from_secs(3 * 3600)), "3 h");
        assert_eq!(age(Duration::from_secs(2 * 86_400)), "2 d");
    }
}
