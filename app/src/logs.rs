//! Field logs: everything the appliance leaves on disk for the technician
//! who comes to the bedside and collects one bundle.
//!
//! The device runs unattended, so its disk must never fill with logs and a
//! logging failure must never take the receiver down. Three things live here:
//!
//! - [`LogDir`]: the service log (`minipacs.log`, `minipacs.log.1`, ...),
//!   a [`MakeWriter`] for `tracing_subscriber` backed by a [`RotatingFile`]
//!   that rotates by rename and keeps the family under a byte [`Budget`].
//!   Under systemd the same events also go to journald through stderr; the
//!   files are what survives when nobody can read the journal.
//! - [`Audit`]: one JSON line per association and per object
//!   (`audit.jsonl`, rotated the same way with its own budget), so "was this
//!   study received, from whom, and where is it" has a durable answer.
//! - [`collect_bundle`]: one bounded `.tar.gz` with the logs, the audit
//!   trail, the effective configuration with secrets redacted, versions,
//!   board, disk and status, plus a `MANIFEST.txt` saying what was cut.
//!
//! Writes never panic and never return an error to the caller: a failing
//! disk costs log lines (counted in [`WriterStats`]), not service.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use tracing_subscriber::fmt::MakeWriter;

/// File name of the current service log; rotations append `.1`, `.2`, ...
pub const LOG_FILE: &str = "minipacs.log";
/// File name of the current audit trail; rotations append `.1`, `.2`, ...
pub const AUDIT_FILE: &str = "audit.jsonl";
/// The privileged keeper's own log (when privileges are separated).
pub const KEEPER_LOG_FILE: &str = "keeper.log";

/// Log files may hold peer addresses and AE titles: owner and group only.
const FILE_MODE: u32 = 0o640;
/// The log folder, likewise.
const DIR_MODE: u32 = 0o750;
/// After a failed open or write, wait this long before touching the disk
/// again, so a dead SD card costs one syscall every few seconds, not one
/// per log line.
const REOPEN_BACKOFF: Duration = Duration::from_secs(5);
/// The smallest file a budget may ask for; below this rotation would churn.
const MIN_FILE_BYTES: u64 = 1024;
/// The most rotations a budget may ask for; each rotation renames them all.
const MAX_FILES: u32 = 1000;

/// Why field logging could not be set up or a bundle could not be written.
/// Writing a log line never produces one of these: it counts and drops.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// The configured budget cannot be honoured.
    #[error("log budget: {reason}")]
    Budget {
        /// what is wrong with it
        reason: String,
    },
    /// The bundle budget is too small to hold even the small text members.
    #[error("bundle budget of {max_bytes} bytes is below the minimum of {min} bytes")]
    BundleTooSmall {
        /// the budget asked for
        max_bytes: u64,
        /// the smallest budget accepted
        min: u64,
    },
    /// A file or folder operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// what we were doing
        what: &'static str,
        /// the file or folder concerned
        path: PathBuf,
        /// the operating system's error
        #[source]
        source: io::Error,
    },
}

impl LogsError {
    fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> LogsError + 'p {
        move |source| LogsError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------
// Rotation
// ---------------------------------------------------------------------------

/// How much disk one family of rotated files may use: at most `files` files
/// (the current one included) of at most `max_bytes / files` bytes each, so
/// the family never exceeds `max_bytes` however long the device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Upper bound on the bytes of all files of the family together.
    pub max_bytes: u64,
    /// Number of files kept, the current one included (at least 1).
    pub files: u32,
}

impl Budget {
    /// The default: 20 MiB in 5 files of 4 MiB, small enough for any SD card
    /// and large enough for weeks of normal traffic.
    pub const DEFAULT: Budget = Budget {
        max_bytes: 20 << 20,
        files: 5,
    };

    /// The size at which the current file is rotated.
    pub fn per_file(&self) -> u64 {
        self.max_bytes / u64::from(self.files.max(1))
    }

    fn check(&self) -> Result<(), LogsError> {
        let reason = if self.files == 0 || self.files > MAX_FILES {
            format!("files must be 1 to {MAX_FILES}, not {}", self.files)
        } else if self.per_file() < MIN_FILE_BYTES {
            format!(
                "{} bytes in {} files is under {MIN_FILE_BYTES} bytes per file",
                self.max_bytes, self.files
            )
        } else {
            return Ok(());
        };
        Err(LogsError::Budget { reason })
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::DEFAULT
    }
}

/// Counters of one rotating file, for the status page and the bundle: the
/// writer never reports errors to its caller, so this is where they show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records written in full or truncated.
    pub records_written: u64,
    /// Bytes written to disk.
    pub bytes_written: u64,
    /// Records lost to I/O errors, or too large for one file and not
    /// truncatable (audit lines).
    pub records_dropped: u64,
    /// Records cut to fit one file (service log lines only).
    pub records_truncated: u64,
    /// Rotations performed.
    pub rotations: u64,
    /// Failed opens, renames and writes.
    pub io_errors: u64,
}

/// One family of rotated files (`name`, `name.1`, ... `name.{files-1}`) in
/// one folder, bounded by a [`Budget`].
///
/// Every file stays at or under [`Budget::per_file`]: a record that would
/// push the current file over it rotates first (only at a line boundary,
/// so lines are not split across files), and a record larger than a whole
/// file is cut (or dropped, for JSON). Rotation is by rename: the oldest is
/// removed, the others shift up, the current becomes `.1`. Any I/O error
/// drops the record, counts it, and backs off before the next attempt.
#[derive(Debug)]
pub struct RotatingFile {
    dir: PathBuf,
    name: String,
    files: u32,
    per_file: u64,
    truncate_oversized: bool,
    file: Option<File>,
    len: u64,
    at_line_start: bool,
    retry_at: Option<Instant>,
    stats: WriterStats,
}

impl RotatingFile {
    /// Opens (creating the folder and file if needed) the family `name` in
    /// `dir`. Files left over from a larger budget are removed or shortened
    /// to their newest bytes, so the bound holds from the first write.
    ///
    /// `truncate_oversized` chooses what happens to a single record larger
    /// than one file: cut to fit (plain text) or dropped (JSON lines, where
    /// a cut line would no longer parse).
    pub fn open(
        dir: &Path,
        name: &str,
        budget: Budget,
        truncate_oversized: bool,
    ) -> Result<RotatingFile, LogsError> {
        budget.check()?;
        if name.is_empty() || name.contains('/') {
            return Err(LogsError::Budget {
                reason: format!("bad log file name {name:?}"),
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(LogsError::io("create log folder", dir))?;
        let mut rf = RotatingFile {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            files: budget.files,
            per_file: budget.per_file(),
            truncate_oversized,
            file: None,
            len: 0,
            at_line_start: true,
            retry_at: None,
            stats: WriterStats::default(),
        };
        rf.enforce_budget_on_disk()?;
        let (file, len) = rf
            .open_current()
            .map_err(LogsError::io("open log file", &rf.path(0)))?;
        rf.file = Some(file);
        rf.len = len;
        Ok(rf)
    }

    /// The path of the current file.
    pub fn current_path(&self) -> PathBuf {
        self.path(0)
    }

    /// The counters so far.
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// Forces what was written to the current file onto the disk.
    pub fn sync_data(&self) -> std::io::Result<()> {
        match &self.file {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// Appends one record (normally one or more complete lines) with a
    /// single `write_all`, rotating first if it would not fit. Returns
    /// whether it reached the file; it never panics and never blocks on
    /// anything but the write itself.
    pub fn write_record(&mut self, record: &[u8]) -> bool {
        if record.is_empty() {
            return true;
        }
        if self.file.is_none() && !self.try_reopen() {
            self.stats.records_dropped += 1;
            return false;
        }
        let size = record.len() as u64;
        if self.at_line_start && self.len > 0 && self.len.saturating_add(size) > self.per_file {
            self.rotate();
            if self.file.is_none() {
                self.stats.records_dropped += 1;
                return false;
            }
        }
        let room = self.per_file.saturating_sub(self.len);
        let data: Cow<'_, [u8]> = if size <= room {
            Cow::Borrowed(record)
        } else if !self.truncate_oversized || room == 0 {
            self.stats.records_dropped += 1;
            return false;
        } else {
            // Only reached for a record larger than a whole file (or a
            // continuation of a line that did not end): keep its head.
            let room = usize::try_from(room).unwrap_or(usize::MAX);
            let mut cut = record[..room.min(record.len())].to_vec();
            if record.ends_with(b"\n") {
                if let Some(last) = cut.last_mut() {
                    *last = b'\n';
                }
            }
            self.stats.records_truncated += 1;
            Cow::Owned(cut)
        };
        let Some(file) = self.file.as_mut() else {
            self.stats.records_dropped += 1;
            return false;
        };
        match file.write_all(&data) {
            Ok(()) => {
                self.len += data.len() as u64;
                self.at_line_start = data.ends_with(b"\n");
                self.stats.records_written += 1;
                self.stats.bytes_written += data.len() as u64;
                true
            }
            Err(_) => {
                self.fail();
                self.stats.records_dropped += 1;
                false
            }
        }
    }

    fn path(&self, index: u32) -> PathBuf {
        if index == 0 {
            self.dir.join(&self.name)
        } else {
            self.dir.join(format!("{}.{index}", self.name))
        }
    }

    /// Opens the current file for appending. If it does not end with a
    /// newline (a crash or a failed write mid-line), one is added so the
    /// next record starts on its own line. A file over the per-file size
    /// (written by someone else) is emptied: losing old lines beats
    /// breaking the bound.
    fn open_current(&self) -> io::Result<(File, u64)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(FILE_MODE)
            .open(self.path(0))?;
        let mut len = file.metadata()?.len();
        if len > self.per_file {
            file.set_len(0)?;
            len = 0;
        }
        if len > 0 {
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, len - 1)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                len += 1;
            }
        }
        Ok((file, len))
    }

    fn try_reopen(&mut self) -> bool {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        match self.open_current() {
            Ok((file, len)) => {
                self.file = Some(file);
                self.len = len;
                self.at_line_start = true;
                self.retry_at = None;
                true
            }
            Err(_) => {
                self.fail();
                false
            }
        }
    }

    fn fail(&mut self) {
        self.file = None;
        self.stats.io_errors += 1;
        self.retry_at = Some(Instant::now() + REOPEN_BACKOFF);
    }

    /// Shifts `name.k` to `name.{k+1}` (dropping the oldest) and starts a new
    /// current file. A rename that fails is counted and skipped; the next
    /// rename then replaces the file that did not move, which still keeps
    /// the family within its count. If the current file itself cannot be
    /// moved (say the folder became read-only for the service's user), it
    /// is emptied instead, so logging goes on with the newest lines.
    fn rotate(&mut self) {
        self.file = None;
        self.stats.rotations += 1;
        let last = self.files - 1;
        let mut errors = 0;
        let mut moved = |r: io::Result<()>| match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                errors += 1;
                false
            }
            _ => true,
        };
        let current_moved = if last == 0 {
            moved(fs::remove_file(self.path(0)))
        } else {
            moved(fs::remove_file(self.path(last)));
            for index in (1..last).rev() {
                moved(fs::rename(self.path(index), self.path(index + 1)));
            }
            moved(fs::rename(self.path(0), self.path(1)))
        };
        self.stats.io_errors += errors;
        self.retry_at = None;
        if self.try_reopen() && !current_moved {
            let emptied = self.file.as_ref().map(|f| f.set_len(0));
            if let Some(Err(_)) = emptied {
                self.fail();
            } else {
                self.len = 0;
            }
        }
    }

    /// Makes the files already on disk fit the budget: rotations beyond the
    /// count are removed, and a file larger than one file's share keeps only
    /// its newest bytes (a previous run had a larger budget).
    fn enforce_budget_on_disk(&self) -> Result<(), LogsError> {
        let entries =
            fs::read_dir(&self.dir).map_err(LogsError::io("read log folder", &self.dir))?;
        let stale_shrink = shrink_prefix(&self.path(0));
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let path = entry.path();
            if file_name
                .to_str()
                .is_some_and(|n| n.starts_with(&stale_shrink))
            {
                // Left by a crash while shortening; the original is intact.
                fs::remove_file(&path).map_err(LogsError::io("remove temp file", &path))?;
                continue;
            }
            let Some(index) = file_name
                .to_str()
                .and_then(|n| rotation_index(&self.name, n))
            else {
                continue;
            };
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            if index >= self.files {
                fs::remove_file(&path).map_err(LogsError::io("remove old log file", &path))?;
            } else if entry.metadata().map(|m| m.len()).unwrap_or(0) > self.per_file {
                // The current file is rotated on the next write anyway, but
                // rotation must not carry an oversized file into `.1`.
                keep_tail(&path, self.per_file - 1)
                    .map_err(LogsError::io("shorten old log file", &path))?;
            }
        }
        Ok(())
    }
}

/// Which rotation `file_name` is in the family `name`: 0 for the current
/// file, k for `name.k`, None for anything else.
fn rotation_index(name: &str, file_name: &str) -> Option<u32> {
    if file_name == name {
        return Some(0);
    }
    let digits = file_name.strip_prefix(name)?.strip_prefix('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&k| k > 0)
}

/// Rewrites `path` to hold only (at most) its last `keep` bytes, starting at
/// a line boundary, via a temp file and a rename.
fn keep_tail(path: &Path, keep: u64) -> io::Result<()> {
    let mut src = File::open(path)?;
    let len = src.metadata()?.len();
    let start = line_start_at_or_after(&src, len.saturating_sub(keep), len)?;
    src.seek(SeekFrom::Start(start))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(&shrink_prefix(path))
        .tempfile_in(dir)?;
    io::copy(&mut src.take(len - start), tmp.as_file_mut())?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(FILE_MODE))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Prefix of the temp file [`keep_tail`] uses for `path`, so a crash
/// mid-shrink leaves something [`RotatingFile::open`] can recognise.
fn shrink_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let base = name.split('.').next().unwrap_or_default();
    format!(".{base}.shrink-")
}

/// The first offset at or after `from` that starts a line, looking at most
/// 64 KiB ahead; `from` itself if it already does or no newline is near.
fn line_start_at_or_after(file: &File, from: u64, len: u64) -> io::Result<u64> {
    if from == 0 {
        return Ok(0);
    }
    let mut prev = [0u8; 1];
    file.read_exact_at(&mut prev, from - 1)?;
    if prev[0] == b'\n' {
        return Ok(from);
    }
    let window = usize::try_from((len - from).min(64 << 10)).unwrap_or(64 << 10);
    let mut buf = vec![0u8; window];
    file.read_exact_at(&mut buf, from)?;
    Ok(match buf.iter().position(|&b| b == b'\n') {
        Some(pos) if (pos as u64) + 1 < len - from => from + pos as u64 + 1,
        _ => from,
    })
}

fn lock(file: &Mutex<RotatingFile>) -> MutexGuard<'_, RotatingFile> {
    // A panic while holding the lock cannot leave a RotatingFile in an
    // unsafe state (at worst a short line), so poisoning is ignored.
    file.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Service log
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Audit trail
// ---------------------------------------------------------------------------

/// How an association ended, as recorded in the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AssociationOutcome {
    /// Orderly A-RELEASE.
    Released,
    /// We answered the request with A-ASSOCIATE-RJ.
    Rejected,
    /// The peer sent A-ABORT.
    AbortedByPeer,
    /// We sent A-ABORT (protocol error, shutdown, ...).
    Aborted,
    /// A timer expired (ARTIM, idle, or a stalled transfer).
    TimedOut,
    /// The connection closed or failed without a release.
    ConnectionLost,
    /// The TLS handshake failed; no association was negotiated.
    TlsFailed,
}

/// One association, written when it ends. Borrowed so the caller can record
/// straight from its own state without allocating.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename = "association")]
pub struct AssociationRecord<'a> {
    /// When the association started (the connection was accepted).
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Calling AE title (empty if the request never arrived).
    pub calling_ae: &'a str,
    /// Called AE title (empty if the request never arrived).
    pub called_ae: &'a str,
    /// Negotiated TLS version, e.g. "TLSv1.3"; null on the plain port.
    pub tls_version: Option<&'a str>,
    /// Negotiated cipher suite; null on the plain port.
    pub tls_suite: Option<&'a str>,
    /// Subject of the peer's TLS client certificate, if it sent one.
    pub tls_peer_subject: Option<&'a str>,
    /// How it ended.
    pub outcome: AssociationOutcome,
    /// Objects stored durably.
    pub objects_stored: u64,
    /// Objects answered with a failure status.
    pub objects_failed: u64,
    /// Bytes received (PDU payload).
    pub bytes: u64,
    /// Duration in seconds (millisecond precision in the file).
    #[serde(serialize_with = "ser_seconds")]
    pub seconds: f64,
}

/// One C-STORE, written when its response is sent.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename = "object")]
pub struct ObjectRecord<'a> {
    /// When the response was sent.
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Calling AE title of the association.
    pub calling_ae: &'a str,
    /// Affected SOP Class UID.
    pub sop_class_uid: &'a str,
    /// Affected SOP Instance UID.
    pub sop_instance_uid: &'a str,
    /// Data set bytes received.
    pub bytes: u64,
    /// DIMSE status sent back, written as 4 hex digits ("0000", "A700").
    #[serde(serialize_with = "ser_status")]
    pub status: u16,
    /// Time from the first fragment to the response.
    pub milliseconds: u64,
    /// Where the object was stored; null if it was not.
    #[serde(serialize_with = "ser_opt_path")]
    pub stored_path: Option<&'a Path>,
}

/// The audit trail: `audit.jsonl`, one JSON object per line, rotated and
/// bounded like the service log but with its own budget.
///
/// Each record is serialized before the lock is taken and written with a
/// single `write_all`, so writers on many threads never interleave and
/// hold the lock only for one `write(2)`. Share it with `Arc<Audit>`.
/// serde_json escapes control characters, so a hostile AE title cannot
/// break a line in two.
#[derive(Debug)]
pub struct Audit {
    dir: PathBuf,
    file: Mutex<RotatingFile>,
    failing: AtomicBool,
}

impl Audit {
    /// Opens the audit trail in `dir`, creating it, bounded by `budget`.
    pub fn open(dir: &Path, budget: Budget) -> Result<Audit, LogsError> {
        Ok(Audit {
            dir: dir.to_path_buf(),
            file: Mutex::new(RotatingFile::open(dir, AUDIT_FILE, budget, false)?),
            failing: AtomicBool::new(false),
        })
    }

    /// Records an association. Returns whether the line reached the file.
    pub fn association(&self, record: &AssociationRecord<'_>) -> bool {
        self.append(record)
    }

    /// Records one object. Returns whether the line reached the file.
    pub fn object(&self, record: &ObjectRecord<'_>) -> bool {
        self.append(record)
    }

    /// Makes the records written so far durable. Called before an
    /// association's release is answered, so that a power cut right after a
    /// sender was told its objects are stored cannot take their records.
    /// (Once per association, not per object: each would cost an fsync.)
    pub fn sync(&self) -> bool {
        match lock(&self.file).sync_data() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "audit trail sync failed");
                false
            }
        }
    }

    /// The audit folder, for the bundle.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Lines written and dropped so far.
    pub fn stats(&self) -> WriterStats {
        lock(&self.file).stats()
    }

    fn append<T: Serialize>(&self, record: &T) -> bool {
        let written = match serde_json::to_vec(record) {
            Ok(mut line) => {
                line.push(b'\n');
                lock(&self.file).write_record(&line)
            }
            Err(_) => {
                lock(&self.file).stats.records_dropped += 1;
                false
            }
        };
        // Say so once per outage, outside the audit lock (the service log
        // has its own).
        if self.failing.swap(!written, Ordering::Relaxed) == written {
            if written {
                tracing::info!(dir = %self.dir.display(), "audit trail writable again");
            } else {
                tracing::warn!(dir = %self.dir.display(), "audit trail write failed; dropping records");
            }
        }
        written
    }
}

fn ser_time<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*time))
}

fn ser_seconds<S: Serializer>(seconds: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((seconds * 1000.0).round() / 1000.0)
}

fn ser_status<S: Serializer>(status: &u16, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{status:04X}"))
}

fn ser_opt_path<S: Serializer>(path: &Option<&Path>, s: S) -> Result<S::Ok, S::Error> {
    match path {
        // Lossy rather than failing: a non-UTF-8 name must not cost the line.
        Some(p) => s.serialize_str(&p.to_string_lossy()),
        None => s.serialize_none(),
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-01-31T23:59:59.123Z`.
/// A clock before 1970 (a Pi without RTC before NTP) is shown as the epoch.
pub fn rfc3339(time: SystemTime) -> String {
    let (secs, millis) = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(0), d.subsec_millis()),
        Err(_) => (0, 0),
    };
    let dt =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

// ---------------------------------------------------------------------------
// Field log bundle
// ---------------------------------------------------------------------------

/// What [`collect_bundle`] puts in the bundle. Owned so the caller can build
/// it from a snapshot of the running service.
#[derive(Debug, Clone)]
pub struct BundleInputs {
    /// Folder of `minipacs.log*`.
    pub log_dir: PathBuf,
    /// Folder of `audit.jsonl*` (may be the same as `log_dir`).
    pub audit_dir: PathBuf,
    /// The effective configuration as TOML; secrets are redacted on the way
    /// in.
    pub config_text: String,
    /// The minipacs version string.
    pub version: String,
    /// The board profile's name.
    pub board_name: String,
    /// The board profile's text, if there is one.
    pub board_profile: Option<String>,
    /// Store roots, for free space and entry counts.
    pub store_paths: Vec<PathBuf>,
    /// A recent free-form service status.
    pub status: String,
    /// Upper bound on the size of the `.tar.gz`.
    pub max_bytes: u64,
}

impl BundleInputs {
    /// The default bundle budget: 50 MiB, which fits any USB stick and the
    /// default log and audit budgets several times over.
    pub const DEFAULT_MAX_BYTES: u64 = 50 << 20;
    /// The smallest bundle budget accepted.
    pub const MIN_MAX_BYTES: u64 = 64 << 10;
}

impl Default for BundleInputs {
    fn default() -> Self {
        BundleInputs {
            log_dir: PathBuf::new(),
            audit_dir: PathBuf::new(),
            config_text: String::new(),
            version: String::new(),
            board_name: String::new(),
            board_profile: None,
            store_paths: Vec::new(),
            status: String::new(),
            max_bytes: BundleInputs::DEFAULT_MAX_BYTES,
        }
    }
}

/// What [`collect_bundle`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSummary {
    /// The bundle's final path.
    pub path: PathBuf,
    /// Member names, in archive order (`MANIFEST.txt` first).
    pub members: Vec<String>,
    /// Size of the `.tar.gz` on disk.
    pub compressed_bytes: u64,
    /// Size of the tar stream inside it.
    pub uncompressed_bytes: u64,
    /// One line per file truncated, left out or unreadable (also in
    /// `MANIFEST.txt`); empty when everything fit.
    pub cut: Vec<String>,
}

/// A tar block; headers and padding are counted in whole blocks.
const BLOCK: u64 = 512;
/// The most of any system file (os-release, device tree, ...) we read.
const SYSTEM_FILE_CAP: u64 = 64 << 10;
/// Below this much room a log tail is not worth including.
const MIN_TAIL: u64 = 4 << 10;
/// The most store entries counted before giving up (a flat store can be huge).
const MAX_COUNT: u64 = 1_000_000;

/// One member planned for the archive.
struct Member {
    name: String,
    body: Body,
    mtime: u64,
}

enum Body {
    Text(Vec<u8>),
    /// `len` bytes of `file` from `start`.
    File {
        file: File,
        start: u64,
        len: u64,
    },
}

impl Member {
    fn len(&self) -> u64 {
        match &self.body {
            Body::Text(t) => t.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

/// A log or audit file found on disk, opened before planning so rotations
/// during collection cannot change what we read.
struct Found {
    name: String,
    file: File,
    len: u64,
    modified: SystemTime,
    index: u32,
}

/// Bytes a member of `len` bytes takes in the tar stream.
fn tar_cost(len: u64) -> u64 {
    BLOCK + len.div_ceil(BLOCK) * BLOCK
}

/// Writes one bounded `.tar.gz` field log bundle to `out` (through a temp
/// file beside it and a rename, so a half-written bundle never has the
/// final name) and says what is in it.
///
/// Members: `MANIFEST.txt`, `versions.txt`, `board.txt`, `disk.txt`,
/// `status.txt`, `config.toml` (secrets redacted), then `logs/<file>` for
/// every service log and audit file, newest first. The tar stream is
/// planned to fit `max_bytes` with room for gzip's worst case, so the
/// `.tar.gz` never exceeds it: when the logs do not fit, the newest files
/// go in whole, the next keeps its newest lines, older ones are left out,
/// and `MANIFEST.txt` says so.
pub fn collect_bundle(out: &Path, inputs: &BundleInputs) -> Result<BundleSummary, LogsError> {
    if inputs.max_bytes < BundleInputs::MIN_MAX_BYTES {
        return Err(LogsError::BundleTooSmall {
            max_bytes: inputs.max_bytes,
            min: BundleInputs::MIN_MAX_BYTES,
        });
    }
    let now = SystemTime::now();
    let now_secs = unix_secs(now);
    let mut cut = Vec::new();

    let texts = [
        ("versions.txt", versions_text(&inputs.version)),
        (
            "board.txt",
            board_text(&inputs.board_name, inputs.board_profile.as_deref()),
        ),
        ("disk.txt", disk_text(inputs)),
        (
            "status.txt",
            format!("collected: {}\n\n{}\n", rfc3339(now), inputs.status),
        ),
        ("config.toml", redact_config(&inputs.config_text)),
    ];
    let mut found = find_log_files(&inputs.log_dir, LOG_FILE, &mut cut);
    found.extend(find_log_files(&inputs.log_dir, KEEPER_LOG_FILE, &mut cut));
    found.extend(find_log_files(&inputs.audit_dir, AUDIT_FILE, &mut cut));
    // Newest first: by modification time, then by rotation index.
    found.sort_by(|a, b| b.modified.cmp(&a.modified).then(a.index.cmp(&b.index)));

    // Room for the tar stream: the budget less gzip's worst case (stored
    // blocks cost 5 bytes per 64 KiB, plus header and trailer), less the
    // end-of-archive blocks and a reserve for the manifest, whose size is
    // only known at the end (each of its lines is well under 200 bytes; a
    // manifest longer than its reserve, from thousands of files, is cut).
    let gzip_margin = inputs.max_bytes / 1024 + 1024;
    let tar_budget = inputs.max_bytes - gzip_margin;
    let manifest_estimate = 2048 + 200 * (found.len() as u64 + texts.len() as u64);
    let manifest_reserve = tar_cost(manifest_estimate.min(tar_budget / 4));
    let mut room = tar_budget.saturating_sub(2 * BLOCK + manifest_reserve);

    let mut members = Vec::new();
    for (name, text) in texts {
        let mut bytes = text.into_bytes();
        if tar_cost(bytes.len() as u64) > room {
            if room < 2 * BLOCK {
                cut.push(format!(
                    "{name}: left out, {} bytes (bundle budget)",
                    bytes.len()
                ));
                continue;
            }
            let keep = usize::try_from((room - BLOCK) / BLOCK * BLOCK).unwrap_or(0);
            cut.push(format!(
                "{name}: truncated to its first {keep} of {} bytes (bundle budget)",
                bytes.len()
            ));
            bytes.truncate(keep);
        }
        room = room.saturating_sub(tar_cost(bytes.len() as u64));
        members.push(Member {
            name: name.to_string(),
            body: Body::Text(bytes),
            mtime: now_secs,
        });
    }
    let mut notes = Vec::new();
    for f in found {
        let name = format!("logs/{}", f.name);
        if tar_cost(f.len) <= room {
            room -= tar_cost(f.len);
            notes.push((name.clone(), String::new()));
            members.push(Member {
                name,
                body: Body::File {
                    file: f.file,
                    start: 0,
                    len: f.len,
                },
                mtime: unix_secs(f.modified),
            });
            continue;
        }
        let avail = room.saturating_sub(BLOCK) / BLOCK * BLOCK;
        if avail < MIN_TAIL {
            cut.push(format!("{name}: left out, {} bytes (bundle budget)", f.len));
            continue;
        }
        let start = match line_start_at_or_after(&f.file, f.len - avail, f.len) {
            Ok(start) => start,
            Err(e) => {
                cut.push(format!("{name}: unreadable: {e}"));
                continue;
            }
        };
        let len = f.len - start;
        room = room.saturating_sub(tar_cost(len));
        let note = format!(
            "truncated: kept the newest {len} of {} bytes, cut the oldest {start}",
            f.len
        );
        cut.push(format!("{name}: {note}"));
        notes.push((name.clone(), note));
        members.push(Member {
            name,
            body: Body::File {
                file: f.file,
                start,
                len,
            },
            mtime: unix_secs(f.modified),
        });
    }

    let mut manifest = manifest_text(inputs, now, &members, &notes, &cut).into_bytes();
    let reserve_len = usize::try_from(manifest_reserve - BLOCK).unwrap_or(0);
    manifest.truncate(reserve_len);
    members.insert(
        0,
        Member {
            name: "MANIFEST.txt".to_string(),
            body: Body::Text(manifest),
            mtime: now_secs,
        },
    );
    let uncompressed_bytes = members.iter().map(|m| tar_cost(m.len())).sum::<u64>() + 2 * BLOCK;

    let compressed_bytes = write_bundle(out, &mut members)?;
    Ok(BundleSummary {
        path: out.to_path_buf(),
        members: members.into_iter().map(|m| m.name).collect(),
        compressed_bytes,
        uncompressed_bytes,
        cut,
    })
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Finds and opens `name`, `name.1`, ... in `dir`. Unreadable ones are noted
/// in `cut`; a missing folder simply has no files.
fn find_log_files(dir: &Path, name: &str, cut: &mut Vec<String>) -> Vec<Found> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let Some(index) = rotation_index(name, file_name) else {
            continue;
        };
        let opened = File::open(entry.path()).and_then(|file| {
            let meta = file.metadata()?;
            Ok((file, meta))
        });
        match opened {
            Ok((file, meta)) if meta.is_file() => found.push(Found {
                name: file_name.to_string(),
                file,
                len: meta.len(),
                modified: meta.modified().unwrap_or(UNIX_EPOCH),
                index,
            }),
            Ok(_) => {}
            Err(e) => cut.push(format!("logs/{file_name}: unreadable: {e}")),
        }
    }
    found
}

/// Streams the planned members into `<out>.tmp...`, then renames it to
/// `out`. Returns the compressed size.
fn write_bundle(out: &Path, members: &mut [Member]) -> Result<u64, LogsError> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".minipacs-bundle-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(LogsError::io("create bundle temp file in", dir))?;
    let write_err = LogsError::io("write bundle", tmp.path());
    let gz = flate2::write::GzEncoder::new(
        io::BufWriter::new(tmp.as_file()),
        flate2::Compression::default(),
    );
    let result = (|| -> io::Result<()> {
        let mut tar = tar::Builder::new(gz);
        for member in members.iter_mut() {
            let mut header = tar::Header::new_ustar();
            header.set_size(member.len());
            header.set_mode(0o640);
            header.set_mtime(member.mtime);
            header.set_entry_type(tar::EntryType::Regular);
            match &mut member.body {
                Body::Text(text) => tar.append_data(&mut header, &member.name, text.as_slice())?,
                Body::File { file, start, len } => {
                    file.seek(SeekFrom::Start(*start))?;
                    // Exactly `len` bytes even if the file shrank meanwhile
                    // (the tar header already promised them).
                    let data = (&*file).take(*len).chain(io::repeat(b'\n')).take(*len);
                    tar.append_data(&mut header, &member.name, data)?;
                }
            }
        }
        let gz = tar.into_inner()?;
        let mut buffered = gz.finish()?;
        buffered.flush()?;
        Ok(())
    })();
    result.map_err(write_err)?;
    tmp.as_file()
        .sync_all()
        .map_err(LogsError::io("sync bundle", tmp.path()))?;
    let file = tmp.persist(out).map_err(|e| LogsError::Io {
        what: "rename bundle to",
        path: out.to_path_buf(),
        source: e.error,
    })?;
    if let Ok(d) = File::open(dir) {
        // Best effort: the bundle is a convenience, not patient data.
        let _ = d.sync_all();
    }
    file.metadata()
        .map(|m| m.len())
        .map_err(LogsError::io("stat bundle", out))
}

fn manifest_text(
    inputs: &BundleInputs,
    now: SystemTime,
    members: &[Member],
    notes: &[(String, String)],
    cut: &[String],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "minipacs field log bundle");
    let _ = writeln!(s, "created: {}", rfc3339(now));
    let _ = writeln!(s, "minipacs version: {}", one_line(&inputs.version, 100));
    let _ = writeln!(s, "budget: {} bytes for the .tar.gz", inputs.max_bytes);
    let _ = writeln!(s);
    let _ = writeln!(s, "members (name, bytes in this bundle, note):");
    let _ = writeln!(s, "  MANIFEST.txt  (this file)");
    for m in members {
        let note = notes
            .iter()
            .find(|(name, _)| *name == m.name)
            .map_or("", |(_, note)| note.as_str());
        let _ = write!(s, "  {}  {}", m.name, m.len());
        let _ = if note.is_empty() {
            writeln!(s)
        } else {
            writeln!(s, "  {note}")
        };
    }
    let _ = writeln!(s);
    if cut.is_empty() {
        let _ = writeln!(s, "nothing was cut");
    } else {
        let _ = writeln!(s, "cut to fit the budget, or unreadable:");
        for c in cut {
            let _ = writeln!(s, "  {}", one_line(c, 180));
        }
    }
    s
}

/// First line of `s`, at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    s.lines().next().unwrap_or("").chars().take(max).collect()
}

/// Reads at most [`SYSTEM_FILE_CAP`] bytes of a small system file as text.
fn read_small(path: &str) -> Option<String> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|f| f.take(SYSTEM_FILE_CAP).read_to_end(&mut buf))
        .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn versions_text(version: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "minipacs {version}");
    let _ = writeln!(
        s,
        "target: {}-{}",
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    let kernel = read_small("/proc/version")
        .map(|v| v.trim().to_string())
        .or_else(|| {
            let out = std::process::Command::new("uname")
                .arg("-a")
                .output()
                .ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let _ = writeln!(s, "kernel: {kernel}");
    if let Some(up) = read_small("/proc/uptime") {
        let secs = up.split_whitespace().next().unwrap_or("?");
        let _ = writeln!(s, "uptime seconds: {secs}");
    }
    let _ = writeln!(s);
    match read_small("/etc/os-release").or_else(|| read_small("/usr/lib/os-release")) {
        Some(os) => {
            let _ = writeln!(s, "os-release:\n{}", os.trim_end());
        }
        None => {
            let _ = writeln!(s, "os-release: not found");
        }
    }
    s
}

fn board_text(name: &str, profile: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "board profile: {name}");
    // Through /sys, not /proc/device-tree: the unit's ProcSubset=pid hides
    // all of /proc but the processes.
    if let Some(model) = read_small("/sys/firmware/devicetree/base/model") {
        let _ = writeln!(
            s,
            "device-tree model: {}",
            model.trim_end_matches('\0').trim()
        );
    }
    let _ = writeln!(s);
    match profile {
        Some(text) => {
            let _ = writeln!(s, "profile text:\n{}", text.trim_end());
        }
        None => {
            let _ = writeln!(s, "profile text: none given");
        }
    }
    s
}

fn disk_text(inputs: &BundleInputs) -> String {
    let mut s = String::new();
    let mut seen: Vec<&Path> = Vec::new();
    let stores = inputs.store_paths.iter().map(|p| (p.as_path(), "store"));
    let logs = [
        (inputs.log_dir.as_path(), "logs"),
        (inputs.audit_dir.as_path(), "audit"),
    ];
    for (path, role) in stores.chain(logs) {
        if path.as_os_str().is_empty() || seen.contains(&path) {
            continue;
        }
        seen.push(path);
        let _ = writeln!(s, "{} ({role})", path.display());
        match nix::sys::statvfs::statvfs(path) {
            Ok(st) => {
                let frag = widen(st.fragment_size());
                let total = widen(st.blocks()) * frag;
                let free = widen(st.blocks_available()) * frag;
                let pct = if total == 0 {
                    0.0
                } else {
                    free as f64 * 100.0 / total as f64
                };
                let _ = writeln!(s, "  total: {total} bytes ({:.2} GiB)", gib(total));
                let _ = writeln!(
                    s,
                    "  free: {free} bytes ({:.2} GiB, {pct:.1}%) available to the service",
                    gib(free)
                );
                let _ = writeln!(
                    s,
                    "  inodes: {} total, {} available",
                    widen(st.files()),
                    widen(st.files_available())
                );
            }
            Err(e) => {
                let _ = writeln!(s, "  statvfs failed: {e}");
            }
        }
        if role == "store" {
            match count_entries(path) {
                Ok((visible, hidden, capped)) => {
                    let more = if capped { " (stopped counting)" } else { "" };
                    let _ = writeln!(
                        s,
                        "  top-level entries: {visible} (plus {hidden} hidden){more}"
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "  cannot list: {e}");
                }
            }
        }
        let _ = writeln!(s);
    }
    if s.is_empty() {
        s.push_str("no paths given\n");
    }
    s
}

/// statvfs counts are 64 bits on some targets and 32 on others (32-bit
/// Raspberry Pi OS); a generic widening compiles on both without a cast.
fn widen<T: Into<u64>>(value: T) -> u64 {
    value.into()
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// Counts (visible, hidden, capped) entries directly in `dir`, without
/// listing them: the bundle reports the store's shape, not its contents.
fn count_entries(dir: &Path) -> io::Result<(u64, u64, bool)> {
    let (mut visible, mut hidden) = (0u64, 0u64);
    for entry in fs::read_dir(dir)? {
        if visible + hidden >= MAX_COUNT {
            return Ok((visible, hidden, true));
        }
        let Ok(entry) = entry else { continue };
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            hidden += 1;
        } else {
            visible += 1;
        }
    }
    Ok((visible, hidden, false))
}

// ---------------------------------------------------------------------------
// Secret redaction
// ---------------------------------------------------------------------------

/// What replaces a secret's value in the bundle.
const REDACTED: &str = "<redacted>";
/// Key words that make a key secret, when they are the whole key or one of
/// its `_`/`-` separated words (so `key`, `tls_key`, `key_file`,
/// `admin-password`, `api_token` all match).
const SECRET_WORDS: [&str; 10] = [
    "key",
    "keys",
    "password",
    "passwords",
    "passwd",
    "passphrase",
    "secret",
    "secrets",
    "token",
    "tokens",
];

/// Whether a TOML key names a secret. Broader than "named key, password,
/// secret, token or ending in _key/_password": any word of the key counts,
/// because a leaked secret costs more than a redacted harmless value.
fn is_secret_key(key: &str) -> bool {
    key.to_ascii_lowercase()
        .split(['_', '-', '.'])
        .any(|word| SECRET_WORDS.contains(&word))
}

/// The configuration text for the bundle, with every secret-named value
/// replaced by `"<redacted>"`, whatever its type and however deeply nested
/// (tables, inline tables, arrays of tables).
///
/// The text is parsed and re-serialized rather than edited line by line,
/// so multi-line strings and inline tables cannot smuggle a secret past
/// the redactor; comments and key order are lost, which is acceptable for
/// a diagnostic copy. Text that does not parse is left out entirely, and
/// so is the parser's message, which quotes the offending line.
fn redact_config(text: &str) -> String {
    // `tls.key` is a file path (e.g. Let's Encrypt's privkey.pem), not key
    // material, but it is redacted too: the rule is by name, and a path can
    // tell an attacker where to look.
    let header = "# minipacs effective configuration, for diagnosis.\n\
                  # Values of keys named like key, password, secret or token are\n\
                  # replaced with \"<redacted>\"; this includes file paths such as\n\
                  # [tls] key, redacted to be safe.\n";
    match toml::from_str::<toml::Table>(text) {
        Ok(mut table) => {
            let count = redact_table(&mut table);
            match toml::to_string(&table) {
                Ok(body) => format!("{header}# {count} value(s) redacted.\n\n{body}"),
                Err(_) => format!("{header}# could not re-serialize; left out.\n"),
            }
        }
        Err(e) => {
            let line = e.span().map(|span| {
                let before = &text.as_bytes()[..span.start.min(text.len())];
                before.iter().filter(|&&b| b == b'\n').count() + 1
            });
            let at = line.map_or(String::new(), |l| format!(" (near line {l})"));
            format!("{header}# the configuration text did not parse as TOML{at};\n# left out so that no secret can leak.\n")
        }
    }
}

fn redact_table(table: &mut toml::Table) -> usize {
    let mut count = 0;
    for (key, value) in table.iter_mut() {
        if is_secret_key(key) {
            *value = toml::Value::String(REDACTED.to_string());
            count += 1;
        } else {
            count += redact_value(value);
        }
    }
    count
}

fn redact_value(value: &mut toml::Value) -> usize {
    match value {
        toml::Value::Table(t) => redact_table(t),
        toml::Value::Array(items) => items.iter_mut().map(redact_value).sum(),
        _ => 0,
    }
}

/// The slot for the file log layer, filled once the configuration (and so
/// the log folder) is known: logging starts on stderr before that.
pub type FileLayer =
    Option<Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>>;

/// Handle to fill the [`FileLayer`] slot.
pub type FileLogHandle =
    tracing_subscriber::reload::Handle<FileLayer, tracing_subscriber::Registry>;

/// Starts logging: to stderr (which systemd sends to journald) at once,
/// and to files once [`attach_file_log`] is called. `RUST_LOG` sets the level.
pub fn init_logging() -> FileLogHandle {
    use tracing_subscriber::prelude::*;
    let (file_layer, handle) = tracing_subscriber::reload::Layer::new(None);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(file_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        )
        .with(filter)
        .init();
    handle
}

/// Adds the bounded file log `name` in `dir`. A log folder that cannot be
/// opened is reported and logging goes on to stderr only: logs must never
/// stop the service.
pub fn attach_file_log(handle: &FileLogHandle, dir: &Path, name: &str, max_bytes: u64) {
    use tracing_subscriber::Layer;
    let budget = Budget {
        max_bytes,
        files: Budget::DEFAULT.files,
    };
    match LogDir::open_named(dir, name, budget) {
        Ok(log) => {
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(std::sync::Arc::new(log))
                .with_ansi(false)
                .boxed();
            if let Err(e) = handle.reload(Some(layer)) {
                tracing::warn!(error = %e, "file log not attached");
            }
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "file log unavailable; logging to stderr only")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::sync::Arc;

    fn family_files(dir: &Path, name: &str) -> Vec<(u32, PathBuf, u64)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .expect("read dir")
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.to_string();
                let index = rotation_index(name, &n)?;
                Some((index, e.path(), e.metadata().ok()?.len()))
            })
            .collect();
        files.sort();
        files
    }

    fn lines(path: &Path) -> Vec<String> {
        io::BufReader::new(File::open(path).expect("open"))
            .lines()
            .map(|l| l.expect("line"))
            .collect()
    }

    /// Deterministic, poorly compressible text.
    fn noise(seed: &mut u64, len: usize) -> String {
        let mut s = String::with_capacity(len);
        while s.len() < len {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let _ = write!(s, "{:016x}", *seed);
        }
        s.truncate(len);
        s
    }

    #[test]
    fn rotation_keeps_the_family_bounded_and_the_newest_lines_current() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = Budget {
            max_bytes: 64 << 10,
            files: 4,
        };
        let logs = LogDir::open(dir.path(), budget).expect("open");
        let mut seed = 7;
        let total = 10_000u32;
        for n in 0..total {
            let line = format!("line {n:06} {}\n", noise(&mut seed, 90));
            logs.make_writer()
                .write_all(line.as_bytes())
                .expect("write");
        }
        let files = family_files(dir.path(), LOG_FILE);
        let sum: u64 = files.iter().map(|f| f.2).sum();
        assert!(sum <= budget.max_bytes, "{sum} bytes on disk");
        assert_eq!(files.len(), 4, "{files:?}");
        assert!(files.iter().all(|f| f.2 <= budget.per_file()));
        let current = lines(&dir.path().join(LOG_FILE));
        let last = current.last().expect("a line");
        assert!(
            last.starts_with(&format!("line {:06} ", total - 1)),
            "{last}"
        );
        // Oldest to newest, the surviving lines are consecutive.
        let mut all = Vec::new();
        for (_, path, _) in files.iter().rev() {
            all.extend(lines(path));
        }
        let numbers: Vec<u32> = all
            .iter()
            .map(|l| l[5..11].parse().expect("number"))
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(numbers.len() > 100);
        let stats = logs.stats();
        assert_eq!(stats.records_written, u64::from(total));
        assert_eq!(stats.records_dropped, 0);
        assert!(stats.rotations > 10);
    }

    #[test]
    fn reopening_with_a_smaller_budget_shrinks_what_is_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = Budget {
            max_bytes: 80 << 10,
            files: 8,
        };
        let logs = LogDir::open(dir.path(), big).expect("open");
        for n in 0..5000 {
            logs.make_writer()
                .write_all(format!("entry {n:05} xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n").as_bytes())
                .expect("write");
        }
        drop(logs);
        assert_eq!(family_files(dir.path(), LOG_FILE).len(), 8);
        let small = Budget {
            max_bytes: 8 << 10,
            files: 2,
        };
        let _logs = LogDir::open(dir.path(), small).expect("reopen");
        let files = family_files(dir.path(), LOG_FILE);
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files.iter().map(|f| f.2).sum::<u64>() <= small.max_bytes);
        let current = lines(&dir.path().join(LOG_FILE));
        assert_eq!(
            current.last().map(String::as_str),
            Some("entry 04999 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")
        );
        assert!(current.iter().all(|l| l.starts_with("entry ")));
    }

    #[test]
    fn oversized_records_are_cut_in_logs_and_dropped_in_the_audit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = Budget {
            max_bytes: 4096,
            files: 2,
        };
        let mut rf = RotatingFile::open(dir.path(), "t.log", budget, true).expect("open");
        let big = format!("{}\n", "x".repeat(10_000));
        assert!(rf.write_record(big.as_bytes()));
        assert_eq!(rf.stats().records_truncated, 1);
        let len = fs::metadata(rf.current_path()).expect("stat").len();
        assert_eq!(len, budget.per_file());
        assert!(fs::read(rf.current_path()).expect("read").ends_with(b"x\n"));

        let mut json = RotatingFile::open(dir.path(), "t.jsonl", budget, false).expect("open");
        assert!(!json.write_record(big.as_bytes()));
        assert_eq!(json.stats().records_dropped, 1);
        assert!(json.write_record(b"{}\n"));
    }

    #[test]
    fn a_current_file_that_cannot_be_renamed_is_emptied_instead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = Budget {
            max_bytes: 4096,
            files: 2,
        };
        let mut rf = RotatingFile::open(dir.path(), "t.log", budget, true).expect("open");
        // A non-empty folder where `.1` should go: neither remove nor
        // rename can replace it.
        fs::create_dir_all(dir.path().join("t.log.1/x")).expect("blocker");
        for n in 0..500 {
            assert!(rf.write_record(format!("line {n:04} ....................\n").as_bytes()));
        }
        let stats = rf.stats();
        assert!(stats.rotations > 0 && stats.io_errors > 0, "{stats:?}");
        assert_eq!(stats.records_dropped, 0);
        let current = lines(&rf.current_path());
        assert_eq!(
            current.last().map(String::as_str),
            Some("line 0499 ....................")
        );
        assert!(fs::metadata(rf.current_path()).expect("stat").len() <= budget.per_file());
    }

    #[test]
    fn write_errors_are_counted_and_dropped_without_panicking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs_dir = dir.path().join("logs");
        let budget = Budget {
            max_bytes: 4096,
            files: 2,
        };
        let logs = LogDir::open(&logs_dir, budget).expect("open");
        fs::remove_dir_all(&logs_dir).expect("remove");
        // Writes go to the unlinked file until the first rotation, which
        // cannot rename or reopen; from then on lines are dropped.
        for n in 0..200 {
            logs.make_writer()
                .write_all(format!("line {n} ..............................\n").as_bytes())
                .expect("never an error");
        }
        let stats = logs.stats();
        assert!(stats.records_dropped > 0, "{stats:?}");
        assert!(stats.io_errors > 0, "{stats:?}");
        assert!(!logs_dir.exists());
    }

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
    fn strip_ansi_removes_csi_sequences_only() {
        assert_eq!(
            &*strip_ansi(b"\x1b[2m2025\x1b[0m \x1b[32m INFO\x1b[0m ok\n"),
            b"2025  INFO ok\n"
        );
        assert_eq!(&*strip_ansi(b"plain"), b"plain");
        assert_eq!(&*strip_ansi(b"a\x1b"), b"a");
    }

    fn association(calling: &str) -> AssociationRecord<'_> {
        AssociationRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            peer: "192.0.2.7:40123".parse().expect("addr"),
            calling_ae: calling,
            called_ae: "MINIPACS",
            tls_version: Some("TLSv1.3"),
            tls_suite: Some("TLS13_AES_128_GCM_SHA256"),
            tls_peer_subject: None,
            outcome: AssociationOutcome::Released,
            objects_stored: 3,
            objects_failed: 1,
            bytes: 123_456,
            seconds: 2.345_678,
        }
    }

    fn object(n: u64) -> ObjectRecord<'static> {
        ObjectRecord {
            time: UNIX_EPOCH + Duration::from_secs(1_700_000_001),
            peer: "[2001:db8::1]:104".parse().expect("addr"),
            calling_ae: "MODALITY",
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.7",
            sop_instance_uid: "1.2.3.4.5",
            bytes: n,
            status: 0xA700,
            milliseconds: 42,
            stored_path: None,
        }
    }

    #[test]
    fn audit_lines_are_json_with_the_right_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = Audit::open(dir.path(), Budget::default()).expect("open");
        assert!(audit.association(&association("CT\nSCANNER\"1")));
        assert!(audit.object(&object(1000)));
        let stored = dir.path().join("store/1.2.3.4.5.dcm");
        assert!(audit.object(&ObjectRecord {
            status: 0,
            stored_path: Some(&stored),
            ..object(2000)
        }));
        let got = lines(&dir.path().join(AUDIT_FILE));
        assert_eq!(got.len(), 3);
        let v: Vec<serde_json::Value> = got
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let a = &v[0];
        assert_eq!(a["event"], "association");
        assert_eq!(a["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(a["peer"], "192.0.2.7:40123");
        assert_eq!(a["calling_ae"], "CT\nSCANNER\"1");
        assert_eq!(a["called_ae"], "MINIPACS");
        assert_eq!(a["tls_version"], "TLSv1.3");
        assert_eq!(a["tls_suite"], "TLS13_AES_128_GCM_SHA256");
        assert!(a["tls_peer_subject"].is_null());
        assert_eq!(a["outcome"], "released");
        assert_eq!(a["objects_stored"], 3);
        assert_eq!(a["objects_failed"], 1);
        assert_eq!(a["bytes"], 123_456);
        assert_eq!(a["seconds"], 2.346);
        let o = &v[1];
        assert_eq!(o["event"], "object");
        assert_eq!(o["time"], "2023-11-14T22:13:21.000Z");
        assert_eq!(o["peer"], "[2001:db8::1]:104");
        assert_eq!(o["calling_ae"], "MODALITY");
        assert_eq!(o["sop_class_uid"], "1.2.840.10008.5.1.4.1.1.7");
        assert_eq!(o["sop_instance_uid"], "1.2.3.4.5");
        assert_eq!(o["bytes"], 1000);
        assert_eq!(o["status"], "A700");
        assert_eq!(o["milliseconds"], 42);
        assert!(o["stored_path"].is_null());
        assert_eq!(v[2]["status"], "0000");
        assert_eq!(v[2]["stored_path"], stored.to_str().expect("utf-8"));
        assert_eq!(audit.stats().records_written, 3);
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

    struct Unpacked {
        members: Vec<(String, Vec<u8>)>,
        tar_len: usize,
    }

    fn unpack(path: &Path) -> Unpacked {
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(File::open(path).expect("open"))
            .read_to_end(&mut tar_bytes)
            .expect("gunzip");
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let members = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let name = e.path().expect("path").to_string_lossy().into_owned();
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("data");
                (name, data)
            })
            .collect();
        Unpacked {
            members,
            tar_len: tar_bytes.len(),
        }
    }

    fn member<'u>(u: &'u Unpacked, name: &str) -> &'u [u8] {
        &u.members
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .1
    }

    const SECRET_CONFIG: &str = r#"
port = 104
password = "hunter2"
store = "/var/lib/minipacs"

[tls]
key = "/etc/x/privkey.pem"
cert = "/etc/x/fullchain.pem"

[upstream]
api_token = "tok-abc123"
client = { db-password = "inline-pw", host = "pacs.example" }

[[peers]]
ae = "CT1"
shared_secret = "s3cr3t-peer"
"#;

    fn inputs(dir: &Path) -> BundleInputs {
        let store = dir.join("store");
        fs::create_dir_all(store.join(".incoming")).expect("store");
        for n in 0..3 {
            fs::write(store.join(format!("obj{n}.dcm")), b"DICM").expect("obj");
        }
        BundleInputs {
            log_dir: dir.join("logs"),
            audit_dir: dir.join("logs"),
            config_text: SECRET_CONFIG.to_string(),
            version: "0.1.0 (test)".to_string(),
            board_name: "rpi4-bedside".to_string(),
            board_profile: Some("[board]\nname = \"rpi4-bedside\"\n".to_string()),
            store_paths: vec![store],
            status: "receiving; 3 associations today".to_string(),
            max_bytes: BundleInputs::DEFAULT_MAX_BYTES,
        }
    }

    #[test]
    fn bundle_has_every_member_and_no_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inputs = inputs(dir.path());
        let budget = Budget {
            max_bytes: 16 << 10,
            files: 4,
        };
        let logs = LogDir::open(&inputs.log_dir, budget).expect("logs");
        let audit = Audit::open(&inputs.audit_dir, budget).expect("audit");
        for n in 0..400 {
            logs.make_writer()
                .write_all(format!("log line {n} ..............................\n").as_bytes())
                .expect("write");
            audit.object(&object(n));
        }
        let out = dir.path().join("out/bundle.tar.gz");
        fs::create_dir_all(out.parent().expect("parent")).expect("out dir");
        let summary = collect_bundle(&out, &inputs).expect("bundle");
        assert_eq!(
            summary.compressed_bytes,
            fs::metadata(&out).expect("stat").len()
        );
        assert!(summary.cut.is_empty(), "{:?}", summary.cut);

        let u = unpack(&out);
        let names: Vec<&str> = u.members.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, summary.members);
        assert_eq!(names[0], "MANIFEST.txt");
        for expected in [
            "versions.txt",
            "board.txt",
            "disk.txt",
            "status.txt",
            "config.toml",
            "logs/minipacs.log",
            "logs/minipacs.log.1",
            "logs/minipacs.log.3",
            "logs/audit.jsonl",
            "logs/audit.jsonl.3",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
        // The log members are the files, byte for byte.
        assert_eq!(
            member(&u, "logs/minipacs.log"),
            fs::read(inputs.log_dir.join(LOG_FILE)).expect("read")
        );

        for secret in [
            "hunter2",
            "privkey.pem",
            "tok-abc123",
            "inline-pw",
            "s3cr3t-peer",
        ] {
            for (name, data) in &u.members {
                assert!(
                    !data.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} found in {name}"
                );
            }
        }
        let config = String::from_utf8_lossy(member(&u, "config.toml")).into_owned();
        let parsed: toml::Table = toml::from_str(&config).expect("still TOML");
        assert_eq!(parsed["password"].as_str(), Some(REDACTED));
        assert_eq!(parsed["tls"]["key"].as_str(), Some(REDACTED));
        assert_eq!(parsed["tls"]["cert"].as_str(), Some("/etc/x/fullchain.pem"));
        assert_eq!(parsed["port"].as_integer(), Some(104));
        assert_eq!(
            parsed["upstream"]["client"]["host"].as_str(),
            Some("pacs.example")
        );

        let text = |name| String::from_utf8_lossy(member(&u, name)).into_owned();
        assert!(text("versions.txt").starts_with("minipacs 0.1.0 (test)\n"));
        assert!(text("versions.txt").contains("kernel: "));
        assert!(text("board.txt").contains("rpi4-bedside"));
        assert!(
            text("disk.txt").contains("top-level entries: 3 (plus 1 hidden)"),
            "{}",
            text("disk.txt")
        );
        assert!(text("disk.txt").contains("free: "));
        assert!(text("status.txt").contains("3 associations today"));
        let manifest = text("MANIFEST.txt");
        for (name, data) in &u.members[1..] {
            assert!(
                manifest
                    .lines()
                    .any(|l| l == format!("  {name}  {}", data.len())),
                "{name} in {manifest}"
            );
        }
        assert!(manifest.contains("nothing was cut"));
    }

    #[test]
    fn unparsable_config_is_left_out() {
        let text = redact_config("password = \"hunter2\"\nbroken = [\n");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("did not parse"));
        assert!(
            is_secret_key("tls_key") && is_secret_key("Admin-Password") && is_secret_key("key")
        );
        assert!(!is_secret_key("keepalive") && !is_secret_key("monkey") && !is_secret_key("port"));
    }

    #[test]
    fn bundle_respects_its_budget_with_oversized_logs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut inputs = inputs(dir.path());
        inputs.max_bytes = 256 << 10;
        let budget = Budget {
            max_bytes: 2 << 20,
            files: 5,
        };
        let logs = LogDir::open(&inputs.log_dir, budget).expect("logs");
        let mut seed = 99;
        let mut last = String::new();
        for n in 0..20_000 {
            last = format!("line {n:06} {}", noise(&mut seed, 100));
            logs.make_writer()
                .write_all(format!("{last}\n").as_bytes())
                .expect("write");
        }
        let out = dir.path().join("bundle.tar.gz");
        let summary = collect_bundle(&out, &inputs).expect("bundle");
        let size = fs::metadata(&out).expect("stat").len();
        assert!(size <= inputs.max_bytes, "{size} > {}", inputs.max_bytes);
        assert!(summary.uncompressed_bytes <= inputs.max_bytes);
        assert!(!summary.cut.is_empty());

        let u = unpack(&out);
        assert_eq!(u.tar_len as u64, summary.uncompressed_bytes);
        // The newest lines are always there.
        let current = String::from_utf8_lossy(member(&u, "logs/minipacs.log")).into_owned();
        assert_eq!(current.lines().last(), Some(last.as_str()));
        // A truncated member keeps whole lines from its tail.
        let manifest = String::from_utf8_lossy(member(&u, "MANIFEST.txt")).into_owned();
        assert!(
            manifest.contains("truncated: kept the newest"),
            "{manifest}"
        );
        assert!(manifest.contains("left out"), "{manifest}");
        for (name, data) in u.members.iter().filter(|(n, _)| n.starts_with("logs/")) {
            let text = String::from_utf8_lossy(data);
            assert!(text.ends_with('\n'), "{name}");
            assert!(
                text.lines()
                    .all(|l| l.starts_with("line ") && l.len() == 112),
                "{name}"
            );
        }
        // Bounded but not starved: most of the budget carries log lines.
        assert!(summary.uncompressed_bytes > inputs.max_bytes / 2);
        let leftovers = fs::read_dir(dir.path())
            .expect("read dir")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".minipacs-bundle-")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn bundle_rejects_a_budget_too_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut inputs = inputs(dir.path());
        inputs.max_bytes = 1000;
        let err = collect_bundle(&dir.path().join("b.tar.gz"), &inputs).expect_err("too small");
        assert!(matches!(err, LogsError::BundleTooSmall { .. }));
    }

    #[test]
    fn budgets_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = |max_bytes, files| LogDir::open(dir.path(), Budget { max_bytes, files }).is_err();
        assert!(bad(1 << 20, 0));
        assert!(bad(1000, 1));
        assert!(!bad(1 << 20, 1));
    }
}
