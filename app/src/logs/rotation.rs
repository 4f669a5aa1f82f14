//! Rotation: one family of files (`name`, `name.1`, ... `name.{files-1}`)
//! bounded by a byte [`Budget`].
//!
//! Both the service log and the audit trail are such a family. What they
//! share is the hard part: the bound must hold from the first write
//! (whatever an earlier run with a larger budget left), lines must never
//! be split across files, and a failing disk must cost a counted record,
//! not a panic or an error the caller has to handle.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{LogsError, DIR_MODE, FILE_MODE};
use crate::dirfd::Folder;
use crate::durable::{Replace, Staged};

/// After a failed open or write, wait this long before touching the disk
/// again, so a dead SD card costs one syscall every few seconds, not one
/// per log line.
const REOPEN_BACKOFF: Duration = Duration::from_secs(5);
/// The smallest file a budget may ask for; below this rotation would churn.
const MIN_FILE_BYTES: u64 = 1024;
/// The most rotations a budget may ask for; each rotation renames them all.
const MAX_FILES: u32 = 1000;

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
    dir: Folder,
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
        let folder =
            Folder::create_all(dir, DIR_MODE).map_err(LogsError::io("create log folder", dir))?;
        RotatingFile::open_in(folder, name, budget, truncate_oversized)
    }

    /// As [`RotatingFile::open`], in a folder already open (the worker's,
    /// handed over by the keeper): every file operation is relative to it.
    pub fn open_in(
        dir: Folder,
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
        let mut rf = RotatingFile {
            dir,
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
            .map_err(LogsError::io("open log file", &rf.current_path()))?;
        rf.file = Some(file);
        rf.len = len;
        Ok(rf)
    }

    /// The path of the current file (for messages and tests).
    pub fn current_path(&self) -> PathBuf {
        self.dir.display_path(self.name_of(0))
    }

    /// The folder the family lives in.
    pub fn folder(&self) -> &Folder {
        &self.dir
    }

    /// The counters so far.
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// Counts a record the caller could not even hand over (it failed to
    /// serialize, say), so the counters tell the whole story.
    pub fn count_dropped(&mut self) {
        self.stats.records_dropped += 1;
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

    /// The name of rotation `index` in the folder.
    fn name_of(&self, index: u32) -> String {
        if index == 0 {
            self.name.clone()
        } else {
            format!("{}.{index}", self.name)
        }
    }

    /// Opens the current file for appending. If it does not end with a
    /// newline (a crash or a failed write mid-line), one is added so the
    /// next record starts on its own line. A file over the per-file size
    /// (written by someone else) is emptied: losing old lines beats
    /// breaking the bound.
    fn open_current(&self) -> io::Result<(File, u64)> {
        let mut file = self.dir.open_file(
            self.name_of(0),
            OFlag::O_RDWR | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_NOFOLLOW,
            FILE_MODE,
        )?;
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
            moved(self.dir.remove_file(self.name_of(0)))
        } else {
            moved(self.dir.remove_file(self.name_of(last)));
            for index in (1..last).rev() {
                moved(self.shift(index));
            }
            moved(self.shift(0))
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

    /// Renames rotation `index` to `index + 1`, replacing it.
    fn shift(&self, index: u32) -> io::Result<()> {
        self.dir.rename(
            self.name_of(index),
            &self.dir,
            self.name_of(index + 1),
            true,
        )
    }

    /// Makes the files already on disk fit the budget: rotations beyond the
    /// count are removed, and a file larger than one file's share keeps only
    /// its newest bytes (a previous run had a larger budget).
    fn enforce_budget_on_disk(&self) -> Result<(), LogsError> {
        let folder = self.dir.path();
        let entries = self
            .dir
            .entries()
            .map_err(LogsError::io("read log folder", folder))?;
        let stale_shrink = shrink_prefix(&self.name);
        for entry in entries {
            let Some(file_name) = entry.name.to_str() else {
                continue;
            };
            let path = self.dir.display_path(file_name);
            if file_name.starts_with(&stale_shrink) {
                // Left by a crash while shortening; the original is intact.
                self.dir
                    .remove_file(file_name)
                    .map_err(LogsError::io("remove temp file", &path))?;
                continue;
            }
            let Some(index) = rotation_index(&self.name, file_name) else {
                continue;
            };
            if !entry.is_file {
                continue;
            }
            if index >= self.files {
                self.dir
                    .remove_file(file_name)
                    .map_err(LogsError::io("remove old log file", &path))?;
                continue;
            }
            let len = self
                .dir
                .stat_at(file_name)
                .ok()
                .flatten()
                .map_or(0, |s| u64::try_from(s.st_size).unwrap_or(0));
            if len > self.per_file {
                // The current file is rotated on the next write anyway, but
                // rotation must not carry an oversized file into `.1`.
                keep_tail(&self.dir, file_name, self.per_file - 1)?;
            }
        }
        Ok(())
    }
}

/// Which rotation `file_name` is in the family `name`: 0 for the current
/// file, k for `name.k`, None for anything else.
pub(super) fn rotation_index(name: &str, file_name: &str) -> Option<u32> {
    if file_name == name {
        return Some(0);
    }
    let digits = file_name.strip_prefix(name)?.strip_prefix('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&k| k > 0)
}

/// Rewrites `name` in `dir` to hold only (at most) its last `keep` bytes,
/// starting at a line boundary, via a durable atomic write
/// ([`crate::durable`]).
fn keep_tail(dir: &Folder, name: &str, keep: u64) -> Result<(), LogsError> {
    let path = dir.display_path(name);
    let shorten = || LogsError::io("shorten old log file", &path);
    let mut src = dir
        .open_file(name, OFlag::O_RDONLY | OFlag::O_NOFOLLOW, 0)
        .map_err(shorten())?;
    let len = src.metadata().map_err(shorten())?.len();
    let start = line_start_at_or_after(&src, len.saturating_sub(keep), len).map_err(shorten())?;
    src.seek(SeekFrom::Start(start)).map_err(shorten())?;
    let folder = dir.try_clone().map_err(shorten())?;
    let staged = Staged::create_in(folder, name.as_ref(), &shrink_prefix(name), Some(FILE_MODE))?;
    io::copy(&mut src.take(len - start), &mut staged.file()).map_err(shorten())?;
    staged.commit(Replace::Allowed)?;
    Ok(())
}

/// Prefix of the temp file [`keep_tail`] uses for the file `name`, so a
/// crash mid-shrink leaves something [`RotatingFile::open`] can recognise.
fn shrink_prefix(name: &str) -> String {
    let base = name.split('.').next().unwrap_or_default();
    format!(".{base}.shrink-")
}

/// The first offset at or after `from` that starts a line, looking at most
/// 64 KiB ahead; `from` itself if it already does or no newline is near.
pub(super) fn line_start_at_or_after(file: &File, from: u64, len: u64) -> io::Result<u64> {
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

pub(super) fn lock(file: &Mutex<RotatingFile>) -> MutexGuard<'_, RotatingFile> {
    // A panic while holding the lock cannot leave a RotatingFile in an
    // unsafe state (at worst a short line), so poisoning is ignored.
    file.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::test_util::{family_files, lines, noise};
    use crate::logs::{LogDir, LOG_FILE};
    use std::fs;
    use tracing_subscriber::fmt::MakeWriter;

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
    fn budgets_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = |max_bytes, files| LogDir::open(dir.path(), Budget { max_bytes, files }).is_err();
        assert!(bad(1 << 20, 0));
        assert!(bad(1000, 1));
        assert!(!bad(1 << 20, 1));
    }
}
