//! The index's writer: stored objects are recorded on a thread of their
//! own, in batches, off the C-STORE's path.
//!
//! Recording an object costs an open and read of its header and a SQLite
//! transaction (about 90 µs per object with `--no-fsync`, 160 µs durable,
//! plus a WAL checkpoint's two fsyncs every few dozen objects). Done on the
//! object's own commit, before its success status, that was 12-21 % of
//! W1's wall time, because a sender waits for each status before it sends
//! the next object. So a C-STORE's commit, once the file is durable under
//! its final name, only queues the path here ([`Recorder::record`]) and its
//! success goes out; this thread reads the header and commits while the
//! next object arrives. The objects of a few milliseconds ([`GATHER`])
//! share one transaction, whichever associations sent them.
//!
//! What a viewer sees does not change: every C-FIND, C-MOVE and C-GET
//! first waits until everything queued before it began is recorded
//! ([`Recorder::settle`]), so a query made after a C-STORE's success finds
//! that object. The queue is bounded ([`QUEUE_CAP`]): a commit that finds
//! it full waits, so a slow index slows the stores down instead of growing
//! memory. What is queued and not yet recorded when the process dies is a
//! file the index lacks, found by the next start's catch-up
//! ([`super::catchup`]), as after any crash.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::warn;

use super::Index;
use crate::dirfd::Folder;

/// Paths waiting to be recorded, at most.
pub const QUEUE_CAP: usize = 256;
/// Paths recorded in one transaction, at most.
const BATCH_MAX: usize = 64;
/// How long the writer gathers paths after the first before it commits,
/// unless a query is waiting or the batch is full. One association sends
/// an object every millisecond or so; one transaction for the objects of
/// this long writes each shared page (the table's last leaf, the series
/// index) and takes SQLite's locks once instead of per object.
const GATHER: Duration = Duration::from_millis(20);
/// How long a query waits for the writer before it runs anyway (on what
/// the index holds by then, with a warning): only a stuck disk takes this
/// long.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The writer thread and its queue. Dropping it records what is queued,
/// then ends the thread.
pub struct Recorder {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// signalled when a path is queued or the writer should stop
    work: Condvar,
    /// signalled when paths are recorded (room in the queue, progress)
    recorded: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<String>,
    /// paths ever queued
    queued: u64,
    /// paths ever taken off the queue and recorded (or given up on)
    done: u64,
    /// queries waiting in [`Recorder::settle`]: the writer commits at once
    settling: usize,
    stop: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Recorder {
    /// Starts the writer thread for `index`, reading stored files in `root`
    /// (the store's folder).
    pub fn start(index: Arc<Index>, root: Folder) -> std::io::Result<Recorder> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            work: Condvar::new(),
            recorded: Condvar::new(),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("index-writer".into())
                .spawn(move || write_until_stopped(&shared, &index, &root))?
        };
        Ok(Recorder {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues the stored file `path` (relative to the store's root), just
    /// committed, waiting first while the queue is full.
    pub fn record(&self, path: String) {
        let mut state = self.shared.state();
        while state.queue.len() >= QUEUE_CAP && !state.stop {
            state = self
                .shared
                .recorded
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.queue.push_back(path);
        state.queued += 1;
        // The writer waits for the first path, then for a full batch.
        let wake = state.queue.len() == 1 || state.queue.len() >= BATCH_MAX;
        drop(state);
        if wake {
            self.shared.work.notify_one();
        }
    }

    /// Waits until every path queued before this call is recorded (at most
    /// [`SETTLE_TIMEOUT`]). Blocking: call it where the query runs.
    pub fn settle(&self) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut state = self.shared.state();
        let target = state.queued;
        if state.done >= target {
            return;
        }
        state.settling += 1;
        self.shared.work.notify_one();
        while state.done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    waiting = target - state.done,
                    "index writer behind: the query runs without the newest objects"
                );
                break;
            }
            state = self
                .shared
                .recorded
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.settling -= 1;
    }

    /// Paths queued and not yet recorded.
    pub fn pending(&self) -> u64 {
        let state = self.shared.state();
        state.queued - state.done
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shared.state().stop = true;
        self.shared.work.notify_all();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("index writer panicked: the next start's catch-up indexes what it left");
            }
        }
    }
}

/// The writer thread: takes what is queued, a batch at a time, until told
/// to stop and the queue is empty.
fn write_until_stopped(shared: &Shared, index: &Index, root: &Folder) {
    let mut batch: Vec<String> = Vec::with_capacity(BATCH_MAX);
    loop {
        {
            let mut state = shared.state();
            while state.queue.is_empty() && !state.stop {
                state = shared
                    .work
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.queue.is_empty() {
                return;
            }
            let deadline = Instant::now() + GATHER;
            while state.queue.len() < BATCH_MAX && state.settling == 0 && !state.stop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = shared
                    .work
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            let n = state.queue.len().min(BATCH_MAX);
            batch.extend(state.queue.drain(..n));
        }
        // Room in the queue already: a commit waiting for it goes on.
        shared.recorded.notify_all();
        // (A panic here aborts the process, as every panic does in the
        // release build; the next start's catch-up indexes the batch.)
        index.record_batch(root, &batch);
        let n = batch.len() as u64;
        batch.clear();
        shared.state().done += n;
        shared.recorded.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index in `dir`, its recorder, and `n` stored files queued to it.
    fn queued(dir: &std::path::Path, n: usize) -> (Arc<Index>, Recorder) {
        let index = Arc::new(Index::open(&dir.join("index.sqlite")).expect("opens"));
        let root = Folder::open(dir).expect("folder");
        let recorder = Recorder::start(Arc::clone(&index), root).expect("starts");
        for n in 0..n {
            let name = format!("SC.{n}");
            let file = crate::index::testing::part10(&format!("1.2.3.4.{n}"), "1.2.3");
            std::fs::write(dir.join(&name), file).expect("writes");
            recorder.record(name);
        }
        (index, recorder)
    }

    #[test]
    fn queued_objects_are_recorded_and_a_settled_query_sees_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (index, recorder) = queued(dir.path(), 300);
        recorder.settle();
        assert_eq!(recorder.pending(), 0);
        assert_eq!(index.instance_count().expect("counts"), 300);
    }

    #[test]
    fn dropping_the_recorder_records_what_is_queued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (index, recorder) = queued(dir.path(), 50);
        // a file that is not DICOM is given up on, not retried forever
        std::fs::write(dir.path().join("junk"), b"not dicom").expect("writes");
        recorder.record("junk".into());
        drop(recorder);
        assert_eq!(index.instance_count().expect("counts"), 50);
    }
}
