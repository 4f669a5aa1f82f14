//! Bringing the index level with the store's files: at every start, and
//! from nothing when the index is missing, unusable or asked to be rebuilt.
//!
//! The files are the truth. At start the index may lack files (stored by
//! an earlier version without an index, copied in by hand, or committed by
//! a process killed between the rename and the index commit, or lost with
//! a power cut under `synchronous=NORMAL`) and may have rows whose file is
//! gone (removed by hand). The catch-up walks the instance rows in id
//! order, a batch at a time, and drops those whose file is gone (re-reading
//! one whose size changed: replaced with `overwrite`); then walks the
//! store's folders as they are read, and indexes each final file without a
//! row. A file that has a row is not opened. Memory is a batch of rows or
//! entries and one directory buffer per folder level, whatever the number
//! of objects.
//!
//! The index is opened through the store folder's descriptor
//! (`/proc/self/fd/N/index.sqlite`): the privilege-separated worker holds
//! the store only as a descriptor and may be unable to resolve the store's
//! path (a 0700 parent). SQLite takes only paths; a `/proc/self/fd` path is
//! resolved by this process through its own descriptor, and SQLite derives
//! the `-wal` and `-shm` names from it, so they land beside the database in
//! the same folder. (It takes a VFS that keeps the path as given: see
//! `super::vfs`.)

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rusqlite::params;
use tracing::{debug, info, warn};

use super::{header, record, Entry, Index, IndexError};
use crate::dirfd::Folder;
use crate::store::{INCOMING_DIR, LOCK_FILE};

/// Rows checked, or files indexed, per transaction.
const BATCH: usize = 256;
/// How often a long catch-up says how far it is.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Folders deeper than this are not walked (the study layout is 3 deep).
const MAX_DEPTH: u32 = 8;
/// Suffix of an unusable index moved aside (its `-wal` keeps its own).
pub const UNUSABLE_SUFFIX: &str = ".unusable";

/// What a catch-up did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CatchUp {
    /// files looked at in the store's folders
    pub files_seen: u64,
    /// headers read (files without a row, and rows whose size changed)
    pub headers_read: u64,
    /// files (or changed rows) indexed
    pub indexed: u64,
    /// rows dropped because their file is gone
    pub dropped: u64,
    /// files whose header the index cannot hold (not Part-10, no UIDs)
    pub not_indexable: u64,
}

/// Where the index of the store in `root` is: `index_file` itself when
/// absolute, else the store folder's `/proc/self/fd` path joined with it
/// (see the module's doc for why).
pub fn location(root: &Folder, index_file: &Path) -> PathBuf {
    if index_file.is_absolute() {
        index_file.to_path_buf()
    } else {
        root.proc_path().join(index_file)
    }
}

/// The index's path as people know it (for messages).
pub fn display_location(root: &Folder, index_file: &Path) -> PathBuf {
    root.display_path(index_file)
}

/// Opens the index of the store in `root`. One that is unusable (not
/// SQLite, failing its `quick_check`, of another schema version) is moved
/// aside to `<name>.unusable` (its `-wal` too; its `-shm` removed) and a new
/// one made. Returns the index and, when it was made anew, why.
pub fn open_for_store(
    root: &Folder,
    index_file: &Path,
) -> Result<(Index, Option<String>), IndexError> {
    let path = location(root, index_file);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error("creating its folder", e))?;
    }
    let existed = path.exists();
    let open = || {
        if index_file.is_absolute() {
            Index::open(index_file)
        } else {
            Index::open_in(root, index_file)
        }
    };
    match open() {
        Ok(index) if existed => Ok((index, None)),
        Ok(index) => Ok((index, Some("no index file".to_string()))),
        Err(e) => {
            let why = e.to_string();
            warn!(index = %display_location(root, index_file).display(), error = %why,
                "index unusable: moving it aside and rebuilding it from the store's files");
            move_aside(&path)?;
            Ok((open()?, Some(why)))
        }
    }
}

/// Removes the index files at `path` (database, `-wal`, `-shm`), so that
/// the next open makes a new one (`minipacs index rebuild`).
pub fn remove(path: &Path) -> Result<(), IndexError> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        match std::fs::remove_file(with_suffix(path, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("removing the old index", e)),
        }
    }
    Ok(())
}

/// Moves an unusable index aside (replacing one moved aside before).
fn move_aside(path: &Path) -> Result<(), IndexError> {
    let aside = with_suffix(path, UNUSABLE_SUFFIX);
    for suffix in ["", "-wal"] {
        match std::fs::rename(with_suffix(path, suffix), with_suffix(&aside, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("moving the unusable index aside", e)),
        }
    }
    // The shared-memory index belongs to the old WAL: never reused.
    for suffix in ["-shm", "-journal"] {
        match std::fs::remove_file(with_suffix(path, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("removing the unusable index", e)),
        }
    }
    Ok(())
}

/// The files of the index at `path`: the database, its `-wal` and `-shm`.
pub fn files(path: &Path) -> [PathBuf; 3] {
    ["", "-wal", "-shm"].map(|suffix| with_suffix(path, suffix))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn io_error(what: &str, e: io::Error) -> IndexError {
    IndexError::Unusable(format!("{what}: {e}"))
}

/// Says how far a long catch-up is, every [`PROGRESS_EVERY`].
pub struct Progress<'a> {
    last: Instant,
    every: Duration,
    report: Box<dyn FnMut(&str) + Send + 'a>,
}

impl<'a> Progress<'a> {
    /// Reports with `report` (besides the log line) every [`PROGRESS_EVERY`].
    pub fn new(report: impl FnMut(&str) + Send + 'a) -> Self {
        Progress {
            last: Instant::now(),
            every: PROGRESS_EVERY,
            report: Box::new(report),
        }
    }

    /// Reports only in the log.
    pub fn log_only() -> Progress<'static> {
        Progress::new(|_| {})
    }

    fn tick(&mut self, line: impl FnOnce() -> String) {
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            let line = line();
            info!("{line}");
            (self.report)(&line);
        }
    }
}

/// Which names of the store are not objects: the temp folder, the lock
/// file, and the index's own files (when it is inside the store).
struct Skip {
    index_prefix: Option<Vec<u8>>,
}

impl Skip {
    fn new(root: &Folder, index_file: &Path) -> Skip {
        let inside = if index_file.is_absolute() {
            index_file.strip_prefix(root.path()).ok()
        } else {
            Some(index_file)
        };
        Skip {
            index_prefix: inside.map(|p| p.as_os_str().as_bytes().to_vec()),
        }
    }

    fn skips(&self, relative: &Path) -> bool {
        let first = relative.components().next().map(|c| c.as_os_str());
        if first == Some(OsStr::new(INCOMING_DIR)) || first == Some(OsStr::new(LOCK_FILE)) {
            return true;
        }
        self.index_prefix
            .as_ref()
            .is_some_and(|p| relative.as_os_str().as_bytes().starts_with(p))
    }
}

/// Brings `index` level with the store in `root` (see the module's doc).
pub fn catch_up(
    index: &Index,
    root: &Folder,
    index_file: &Path,
    progress: &mut Progress<'_>,
) -> Result<CatchUp, IndexError> {
    let mut report = CatchUp::default();
    let rows = index.instance_count()?;
    drop_stale_rows(index, root, rows, progress, &mut report)?;
    let skip = Skip::new(root, index_file);
    let estimate = if rows > 0 {
        rows
    } else {
        count_files(root, &skip)?
    };
    let mut batch = Batch::default();
    let mut relative = PathBuf::new();
    let mut each = |dir: &Folder, relative: &Path, name: &OsStr| -> Result<(), IndexError> {
        report.files_seen += 1;
        let seen = report.files_seen;
        let indexed = report.indexed + batch.entries.len() as u64;
        progress.tick(|| format!("indexing: {seen} of ~{estimate} files ({indexed} new)"));
        let Some(path) = relative.to_str() else {
            // Every name the store makes is ASCII; this one is not its.
            report.not_indexable += 1;
            return Ok(());
        };
        if index.has_path(path)? {
            return Ok(());
        }
        report.headers_read += 1;
        match read_in_folder(dir, name) {
            Ok((attributes, size, received)) => {
                batch.push(path.to_string(), size, received, attributes);
                if batch.entries.len() >= BATCH {
                    report.indexed += batch.flush(index)?;
                }
            }
            Err(e) => {
                report.not_indexable += 1;
                debug!(path, error = %e, "not indexed");
            }
        }
        Ok(())
    };
    walk(root, &mut relative, 0, &skip, &mut each)?;
    report.indexed += batch.flush(index)?;
    Ok(report)
}

/// Walks the instance rows in id order, a batch at a time: drops the rows
/// whose file is gone and re-reads those whose file changed size.
fn drop_stale_rows(
    index: &Index,
    root: &Folder,
    total: u64,
    progress: &mut Progress<'_>,
    report: &mut CatchUp,
) -> Result<(), IndexError> {
    let mut after = 0i64;
    let mut checked = 0u64;
    let mut gone: Vec<i64> = Vec::with_capacity(BATCH);
    let mut batch = Batch::default();
    let mut any_dropped = false;
    loop {
        let rows: Vec<(i64, String, i64)> = {
            let conn = index.lock();
            let mut statement = conn.prepare_cached(
                "SELECT id, path, size FROM instance WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = statement
                .query_map(params![after, BATCH as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            rows
        };
        let Some(last) = rows.last() else { break };
        after = last.0;
        for (id, path, size) in rows {
            checked += 1;
            match root.stat_at(&path) {
                Ok(Some(st))
                    if crate::dirfd::is_kind(&st, nix::sys::stat::SFlag::S_IFREG)
                        && u64::try_from(st.st_size).ok() == u64::try_from(size).ok() => {}
                Ok(Some(st)) if crate::dirfd::is_kind(&st, nix::sys::stat::SFlag::S_IFREG) => {
                    // Replaced (overwrite): its row is made again.
                    report.headers_read += 1;
                    match record::read_in(root, &path) {
                        Ok((attributes, size)) => {
                            batch.push(path, size, mtime(&st), attributes);
                        }
                        Err(_) => gone.push(id),
                    }
                }
                Ok(_) => gone.push(id),
                Err(e) => warn!(path, error = %e, "cannot check an indexed file; row kept"),
            }
        }
        report.indexed += batch.flush(index)?;
        if !gone.is_empty() {
            report.dropped += delete_rows(index, &gone)?;
            any_dropped = true;
            gone.clear();
        }
        progress.tick(|| format!("indexing: checked {checked} of {total} rows"));
    }
    if any_dropped {
        drop_childless(index)?;
    }
    Ok(())
}

fn delete_rows(index: &Index, ids: &[i64]) -> Result<u64, IndexError> {
    let mut conn = index.lock();
    let tx = conn.transaction()?;
    let n = super::delete_instances(&tx, ids)?;
    tx.commit()?;
    Ok(n)
}

/// Drops series, studies and patients left without instances.
fn drop_childless(index: &Index) -> Result<(), IndexError> {
    let mut conn = index.lock();
    let tx = conn.transaction()?;
    super::drop_childless_in(&tx)?;
    tx.commit()?;
    Ok(())
}

/// Entries waiting for one transaction.
#[derive(Default)]
struct Batch {
    entries: Vec<(String, u64, i64, header::Attributes)>,
}

impl Batch {
    fn push(&mut self, path: String, size: u64, received: i64, attributes: header::Attributes) {
        self.entries.push((path, size, received, attributes));
    }

    fn flush(&mut self, index: &Index) -> Result<u64, IndexError> {
        if self.entries.is_empty() {
            return Ok(0);
        }
        let entries: Vec<Entry<'_>> = self
            .entries
            .iter()
            .map(|(path, size, received, attributes)| Entry {
                path,
                size: *size,
                received: *received,
                attributes,
            })
            .collect();
        index.insert_all(&entries)?;
        let n = entries.len() as u64;
        drop(entries);
        self.entries.clear();
        Ok(n)
    }
}

/// Calls `each` with every regular file under `dir` (its folder, its path
/// relative to the store, its name), depth first, folders read as they
/// come. A sub-folder that cannot be opened is skipped with a warning.
fn walk(
    dir: &Folder,
    relative: &mut PathBuf,
    depth: u32,
    skip: &Skip,
    each: &mut dyn FnMut(&Folder, &Path, &OsStr) -> Result<(), IndexError>,
) -> Result<(), IndexError> {
    let mut failed: Option<IndexError> = None;
    dir.for_each_entry(|entry| {
        relative.push(&entry.name);
        let result = if skip.skips(relative) {
            Ok(())
        } else if entry.is_file {
            each(dir, relative, &entry.name)
        } else if entry.is_dir && depth < MAX_DEPTH {
            match dir.open_dir(&entry.name) {
                Ok(sub) => walk(&sub, relative, depth + 1, skip, each),
                Err(e) => {
                    warn!(folder = %dir.display_path(&entry.name).display(), error = %e,
                        "cannot read a folder of the store; its files are not indexed");
                    Ok(())
                }
            }
        } else {
            Ok(())
        };
        relative.pop();
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                failed = Some(e);
                Err(io::Error::other("stopped"))
            }
        }
    })
    .map_err(|e| match failed.take() {
        Some(inner) => inner,
        None => io_error("listing the store", e),
    })
}

/// How many files the walk will see (for the progress line of a rebuild).
fn count_files(root: &Folder, skip: &Skip) -> Result<u64, IndexError> {
    let mut n = 0u64;
    let mut relative = PathBuf::new();
    walk(root, &mut relative, 0, skip, &mut |_, _, _| {
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

/// Reads the header, size and modification time of `name` in `dir`.
fn read_in_folder(
    dir: &Folder,
    name: &OsStr,
) -> Result<(header::Attributes, u64, i64), header::HeaderError> {
    use nix::fcntl::OFlag;
    let file = dir.open_file(name, OFlag::O_RDONLY | OFlag::O_NOFOLLOW, 0)?;
    let meta = file.metadata()?;
    let received = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let attributes = header::read(io::BufReader::with_capacity(8192, file))?;
    Ok((attributes, meta.len(), received))
}

#[allow(clippy::unnecessary_cast)] // st_mtime is 32 bits on armv7
fn mtime(st: &nix::sys::stat::FileStat) -> i64 {
    st.st_mtime as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testing::part10;

    fn store_with(dir: &Path, names: &[&str]) {
        for (n, name) in names.iter().enumerate() {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(path, part10(&format!("1.2.3.{n}"), "1.2.3")).expect("write");
        }
    }

    fn paths(index: &Index) -> Vec<String> {
        let conn = index.lock();
        let mut s = conn
            .prepare("SELECT path FROM instance ORDER BY path")
            .expect("prepare");
        s.query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    fn run(index: &Index, root: &Folder) -> CatchUp {
        catch_up(
            index,
            root,
            Path::new("index.sqlite"),
            &mut Progress::log_only(),
        )
        .expect("catches up")
    }

    #[test]
    fn missing_rows_are_made_stale_ones_dropped_and_known_files_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with(dir.path(), &["CT.1", "CT.2", "1.2.3/1.2.3.1/x.dcm"]);
        // Not objects: the lock, a temp file, and a stranger's file.
        std::fs::write(dir.path().join(".lock"), b"").expect("lock");
        std::fs::create_dir(dir.path().join(".incoming")).expect("incoming");
        std::fs::write(dir.path().join(".incoming/obj-1.part"), part10("9.9", "9")).expect("temp");
        std::fs::write(dir.path().join("notes.txt"), b"hello").expect("txt");
        let root = Folder::open(dir.path()).expect("folder");
        let (index, why) = open_for_store(&root, Path::new("index.sqlite")).expect("opens");
        assert!(why.is_some(), "a new index says why");

        let first = run(&index, &root);
        assert_eq!(first.indexed, 3);
        assert_eq!(first.not_indexable, 1, "notes.txt");
        assert_eq!(paths(&index), ["1.2.3/1.2.3.1/x.dcm", "CT.1", "CT.2"]);

        // Nothing changed: nothing is read again (notes.txt is tried again).
        let again = run(&index, &root);
        assert_eq!(
            (again.headers_read, again.indexed, again.dropped),
            (1, 0, 0)
        );

        // A file gone, a file added: one row dropped, one header read.
        std::fs::remove_file(dir.path().join("CT.1")).expect("rm");
        std::fs::remove_file(dir.path().join("notes.txt")).expect("rm");
        std::fs::write(dir.path().join("CT.3"), part10("1.2.3.9", "1.2.4")).expect("write");
        let third = run(&index, &root);
        assert_eq!(
            (third.headers_read, third.indexed, third.dropped),
            (1, 1, 1)
        );
        assert_eq!(paths(&index), ["1.2.3/1.2.3.1/x.dcm", "CT.2", "CT.3"]);

        // Every file of a study gone: its study, series and patient rows go too.
        std::fs::remove_file(dir.path().join("CT.3")).expect("rm");
        run(&index, &root);
        let studies: i64 = index
            .lock()
            .query_row("SELECT count(*) FROM study", [], |r| r.get(0))
            .expect("count");
        assert_eq!(studies, 1);
    }

    #[test]
    fn a_corrupt_index_is_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with(dir.path(), &["CT.1", "CT.2"]);
        std::fs::write(dir.path().join("index.sqlite"), vec![0x55; 8192]).expect("junk");
        let root = Folder::open(dir.path()).expect("folder");
        let (index, why) = open_for_store(&root, Path::new("index.sqlite")).expect("opens");
        assert!(why.is_some());
        assert!(dir.path().join("index.sqlite.unusable").exists());
        assert_eq!(run(&index, &root).indexed, 2);
        drop(index);
        // Reopened: kept, nothing to do.
        let (index, why) = open_for_store(&root, Path::new("index.sqlite")).expect("opens");
        assert_eq!(why, None);
        assert_eq!(run(&index, &root).headers_read, 0);
        assert_eq!(paths(&index), ["CT.1", "CT.2"]);
    }

    #[test]
    fn a_row_of_a_replaced_file_is_made_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with(dir.path(), &["CT.1"]);
        let root = Folder::open(dir.path()).expect("folder");
        let (index, _) = open_for_store(&root, Path::new("index.sqlite")).expect("opens");
        run(&index, &root);
        let longer = part10("1.2.3.77777", "1.2.3");
        std::fs::write(dir.path().join("CT.1"), longer).expect("replace");
        let report = run(&index, &root);
        assert_eq!((report.indexed, report.dropped), (1, 0));
        let uid: String = index
            .lock()
            .query_row("SELECT sop_instance_uid FROM instance", [], |r| r.get(0))
            .expect("row");
        assert_eq!(uid, "1.2.3.77777");
    }

    #[test]
    fn the_commit_hook_indexes_and_keeps_failures_for_a_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with(dir.path(), &["CT.1"]);
        let root = Folder::open(dir.path()).expect("folder");
        let (index, _) = open_for_store(&root, Path::new("index.sqlite")).expect("opens");
        index.record_batch(&root, &["CT.1".into()]);
        assert_eq!(paths(&index), ["CT.1"]);
        // A file that cannot be read yet (vanished) is kept and retried.
        index.record_batch(&root, &["CT.2".into()]);
        assert_eq!(index.retry_len(), 1);
        store_with(dir.path(), &["CT.0", "CT.2"]);
        index.record_batch(&root, &["CT.0".into()]);
        assert_eq!(index.retry_len(), 0);
        assert_eq!(paths(&index), ["CT.0", "CT.1", "CT.2"]);
        // A file that is not DICOM is not kept: reading it again will not help.
        std::fs::write(dir.path().join("junk"), b"junk").expect("junk");
        index.record_batch(&root, &["junk".into()]);
        assert_eq!(index.retry_len(), 0);
    }
}
