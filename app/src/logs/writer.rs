//! The service log (`minipacs.log`): what `tracing` events become on disk.
//!
//! [`LogDir`] is the synchronous writer: one locked, whole-line write per
//! event into a [`RotatingFile`]. [`ServiceLog`] puts a bounded, lossy
//! queue and one writer thread (`tracing-appender`'s non-blocking writer)
//! in front of it, so the runtime threads that carry associations only
//! ever copy a line into memory: a slow or dying SD card stalls the writer
//! thread, and past the queue's bound lines are dropped and counted, never
//! waited for.

use std::borrow::Cow;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;

use super::rotation::{lock, Budget, RotatingFile, WriterStats};
use super::{LogsError, LOG_FILE};
use crate::dirfd::Folder;

/// The service log folder: a bounded, rotating `minipacs.log` that a
/// `tracing_subscriber::fmt` layer writes plain text lines into.
///
/// `LogDir` is a [`MakeWriter`] (each event takes the lock once and is one
/// `write_all`, so lines never interleave), and `Arc<LogDir>` is one too,
/// so the service can keep a handle for [`LogDir::stats`]. ANSI escape
/// sequences are stripped as a safety net; configure the layer with
/// `with_ansi(false)` anyway.
#[derive(Debug)]
pub struct LogDir {
    dir: PathBuf,
    file: Mutex<RotatingFile>,
}

impl LogDir {
    /// Opens the service log in `dir`, creating it, bounded by `budget`.
    pub fn open(dir: &Path, budget: Budget) -> Result<LogDir, LogsError> {
        Self::open_named(dir, LOG_FILE, budget)
    }

    /// Opens a log named `name` in `dir`: each process writes its own set
    /// (two processes rotating one set would race).
    pub fn open_named(dir: &Path, name: &str, budget: Budget) -> Result<LogDir, LogsError> {
        Ok(LogDir {
            dir: dir.to_path_buf(),
            file: Mutex::new(RotatingFile::open(dir, name, budget, true)?),
        })
    }

    /// As [`LogDir::open_named`], in a folder already open (the one the
    /// keeper handed the worker, say).
    pub fn open_in(dir: Folder, name: &str, budget: Budget) -> Result<LogDir, LogsError> {
        Ok(LogDir {
            dir: dir.path().to_path_buf(),
            file: Mutex::new(RotatingFile::open_in(dir, name, budget, true)?),
        })
    }

    /// The log folder, for the bundle.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Lines written, dropped and cut so far.
    pub fn stats(&self) -> WriterStats {
        lock(&self.file).stats()
    }

    fn write_plain(file: &mut RotatingFile, buf: &[u8]) {
        file.write_record(&strip_ansi(buf));
    }
}

/// The writer for one event: holds the log lock until the event is written.
#[derive(Debug)]
pub struct LogWriter<'a> {
    file: MutexGuard<'a, RotatingFile>,
}

impl Write for LogWriter<'_> {
    /// Always reports success: a line that cannot be written is counted and
    /// dropped, never turned into an error for the logging layer.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        LogDir::write_plain(&mut self.file, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogDir {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter {
            file: lock(&self.file),
        }
    }
}

/// Lets `Arc<LogDir>` serve as a [`MakeWriter`] (through the blanket impl
/// for `Arc<W>`): each `write` is one locked record.
impl Write for &LogDir {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        LogDir::write_plain(&mut lock(&self.file), buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Removes ANSI escape sequences (CSI `ESC [ ... final` and lone `ESC x`)
/// so the files stay plain text whatever the formatter was told.
fn strip_ansi(buf: &[u8]) -> Cow<'_, [u8]> {
    const ESC: u8 = 0x1b;
    if !buf.contains(&ESC) {
        return Cow::Borrowed(buf);
    }
    let mut out = Vec::with_capacity(buf.len());
    let mut bytes = buf.iter().copied();
    while let Some(b) = bytes.next() {
        if b != ESC {
            out.push(b);
            continue;
        }
        // A CSI sequence runs to its final byte; any other escape is
        // dropped with the byte after it.
        if bytes.next() == Some(b'[') {
            for c in bytes.by_ref() {
                if (0x40..=0x7e).contains(&c) {
                    break;
                }
            }
        }
    }
    Cow::Owned(out)
}

/// The queue's bound, in lines: about 1 MiB of typical lines, enough to
/// ride out a multi-second stall of the card at a busy moment, small
/// enough for the smallest board.
pub const QUEUE_LINES: usize = 4096;

/// The service log as the running service uses it: a [`LogDir`] written by
/// one background thread from a bounded queue.
///
/// Events are formatted on the caller's thread and queued as one message
/// each (the formatter hands each event to one `write` call), so lines
/// still never interleave. When the queue is full the line is dropped and
/// counted: [`ServiceLog::stats`] adds those to what the file itself could
/// not take. Dropping a `ServiceLog` flushes what is queued (waiting at
/// most about a second for a stalled disk).
pub struct ServiceLog {
    log: Arc<LogDir>,
    writer: NonBlocking,
    queue_dropped: ErrorCounter,
    guard: Mutex<Option<WorkerGuard>>,
}

impl std::fmt::Debug for ServiceLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceLog")
            .field("dir", &self.log.path())
            .field("stats", &self.stats())
            .finish()
    }
}

/// What the background thread writes into: each message is one record.
struct Sink(Arc<LogDir>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ServiceLog {
    /// Starts the writer thread for `log` with a queue of `queue_lines`.
    pub fn start(log: LogDir, queue_lines: usize) -> ServiceLog {
        let log = Arc::new(log);
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(queue_lines.max(1))
            .thread_name("minipacs-log")
            .finish(Sink(Arc::clone(&log)));
        ServiceLog {
            log,
            queue_dropped: writer.error_counter(),
            writer,
            guard: Mutex::new(Some(guard)),
        }
    }

    /// The writer for a `tracing_subscriber::fmt` layer (cheap to clone).
    pub fn writer(&self) -> NonBlocking {
        self.writer.clone()
    }

    /// The file's counters, with the lines the full queue dropped added to
    /// `records_dropped`.
    pub fn stats(&self) -> WriterStats {
        let mut stats = self.log.stats();
        let queued = u64::try_from(self.queue_dropped.dropped_lines()).unwrap_or(u64::MAX);
        stats.records_dropped = stats.records_dropped.saturating_add(queued);
        stats
    }

    /// Writes out what is queued and stops the thread; lines logged after
    /// this are dropped (and counted). For the end of the process.
    pub fn flush(&self) {
        let guard = self
            .guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(guard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::test_util::{family_files, lines, object};
    use crate::logs::{Audit, ObjectRecord, AUDIT_FILE};
    use std::fs;

    #[test]
    fn tracing_events_land_as_plain_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = Arc::new(LogDir::open(dir.path(), Budget::default()).expect("open"));
        // Colours on, to prove the writer strips them anyway.
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Arc::clone(&logs))
            .with_ansi(true)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(peer = "10.0.0.9:4000", "association accepted");
            tracing::warn!("disk nearly full");
        });
        let text = fs::read_to_string(dir.path().join(LOG_FILE)).expect("read");
        assert!(!text.contains('\u{1b}'), "{text:?}");
        let got = lines(&dir.path().join(LOG_FILE));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains("INFO") && got[0].contains("association accepted"));
        assert!(got[0].contains("peer=\"10.0.0.9:4000\"") || got[0].contains("peer=10.0.0.9:4000"));
        assert!(got[1].contains("WARN") && got[1].contains("disk nearly full"));
    }

    #[test]
    fn the_service_log_writes_from_its_own_thread_and_counts_what_it_drops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ServiceLog::start(
            LogDir::open(dir.path(), Budget::default()).expect("open"),
            8,
        );
        let subscriber = tracing_subscriber::fmt()
            .with_writer(log.writer())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(n = 0, "before the stall");
        });
        // Let the thread write that line, then stall the disk: hold the
        // file's lock, as a write stuck on a dying SD card would.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.stats().records_written < 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(log.stats().records_written, 1);
        let total = 200u64;
        {
            // LogDir's own writer, which holds the lock until dropped (not
            // the blanket one of `Arc<LogDir>`, which `log.log.make_writer()`
            // resolves to and which locks per record: the stall was then
            // not one, and the test passed only when the callers outran
            // the writer thread).
            let _stalled = <LogDir as MakeWriter<'_>>::make_writer(&log.log);
            let started = std::time::Instant::now();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(log.writer())
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                for n in 1..=total {
                    tracing::info!(n, "during the stall");
                }
            });
            // The callers never waited for the disk ...
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
        }
        log.flush();
        // ... and every line is either in the file or counted as dropped.
        let stats = log.stats();
        let in_file = lines(&dir.path().join(LOG_FILE)).len() as u64;
        assert_eq!(in_file, stats.records_written);
        assert_eq!(
            stats.records_written + stats.records_dropped,
            total + 1,
            "{stats:?}"
        );
        // What got through is bounded by the queue (8 lines, plus what the
        // writer thread had taken before it stalled), not by the callers.
        assert!(stats.records_dropped > 0, "{stats:?}");
        assert!(stats.records_written <= 1 + 4 * 8, "{stats:?}");
    }

    #[test]
    fn strip_ansi_removes_csi_sequences_only() {
        assert_eq!(
            &*strip_ansi(b"\x1b[2m2025\x1b[0m \x1b[32m INFO\x1b[0m ok\n"),
            b"2025  INFO ok\n"
        );
        assert_eq!(&*strip_ansi(b"plain"), b"plain");
        assert_eq!(&*strip_ansi(b"a\x1b"), b"a");
    }

    #[test]
    fn concurrent_writers_never_interleave_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Small budgets, so rotations happen while threads race.
        let budget = Budget {
            max_bytes: 256 << 10,
            files: 4,
        };
        let logs = Arc::new(LogDir::open(dir.path(), budget).expect("logs"));
        let audit = Arc::new(Audit::open(dir.path(), budget).expect("audit"));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let logs = Arc::clone(&logs);
                let audit = Arc::clone(&audit);
                std::thread::spawn(move || {
                    let ae = format!("AE{t}");
                    for n in 0..400u64 {
                        let body = "y".repeat(((t * 37 + n * 11) % 300) as usize);
                        let line = format!("t{t} n{n} len{} {body} end\n", body.len());
                        logs.make_writer()
                            .write_all(line.as_bytes())
                            .expect("write");
                        assert!(audit.object(&ObjectRecord {
                            calling_ae: &ae,
                            sop_instance_uid: &body,
                            ..object(n)
                        }));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let mut log_lines = 0;
        for (_, path, _) in family_files(dir.path(), LOG_FILE) {
            for l in lines(&path) {
                let mut words = l.split(' ');
                let (_, _, len) = (words.next(), words.next(), words.next());
                let len: usize = len
                    .and_then(|w| w.strip_prefix("len"))
                    .expect("len")
                    .parse()
                    .expect("n");
                let body = words.next().expect("body");
                assert_eq!(body.len(), len, "{l}");
                assert!(body.bytes().all(|b| b == b'y'), "{l}");
                assert_eq!(words.next(), Some("end"), "{l}");
                assert_eq!(words.next(), None, "{l}");
                log_lines += 1;
            }
        }
        assert!(log_lines > 100);
        let mut audit_lines = 0;
        for (_, path, _) in family_files(dir.path(), AUDIT_FILE) {
            for l in lines(&path) {
                let v: serde_json::Value = serde_json::from_str(&l).expect("whole JSON line");
                assert_eq!(v["event"], "object");
                audit_lines += 1;
            }
        }
        assert!(audit_lines > 100);
        assert_eq!(logs.stats().records_dropped, 0);
        assert_eq!(audit.stats().records_written, 8 * 400);
    }
}
