//! Indexing an object as it is stored: the commit hook.
//!
//! The index's writer thread ([`super::writer`]) calls
//! [`Index::record_batch`] with the objects committed since its last
//! batch, each durable under its final name. The file is
//! the truth and the index is derived: a header that cannot be read or an
//! insert that fails costs a warning, never the object's success. Such a
//! path is kept in a small capped list and tried again on the next commits;
//! anything that falls off the list, or is lost with the process, is found
//! by the next start's catch-up ([`super::catchup`]).

use std::fs::File;
use std::io::BufReader;
use std::time::SystemTime;

use nix::fcntl::OFlag;
use tracing::warn;

use super::{header, Entry, Index, IndexError};
use crate::dirfd::Folder;

/// Paths kept for a retry; past this the oldest is left to the next start.
pub const RETRY_CAP: usize = 64;
/// Kept paths tried again per commit, so that a broken index (a full disk)
/// costs each commit a bounded amount of work.
const RETRIES_PER_COMMIT: usize = 4;
/// The reader's buffer: a stored header is almost always within it, and
/// the file was just written, so it is read from the page cache.
const READ_BUFFER: usize = 8192;

impl Index {
    /// Indexes the stored files `paths` (relative to the store `root`),
    /// just committed, in one transaction (the writer thread's batches:
    /// see [`super::writer`]), after retrying a few earlier failures. Never
    /// fails: each failure is logged and its path kept for a retry when
    /// one may help.
    pub fn record_batch(&self, root: &Folder, paths: &[String]) {
        self.retry_some(root);
        let received = now();
        let mut read = Vec::with_capacity(paths.len());
        for path in paths {
            match read_in(root, path) {
                Ok((attributes, size)) => read.push((path.as_str(), attributes, size)),
                Err(e) => self.not_recorded(path, &IndexError::Header(e)),
            }
        }
        let entries: Vec<Entry<'_>> = read
            .iter()
            .map(|(path, attributes, size)| Entry {
                path,
                size: *size,
                received,
                attributes,
            })
            .collect();
        if self.insert_all(&entries).is_err() {
            // One entry the database refuses fails the whole transaction:
            // each again on its own, so only the failing ones are kept.
            for entry in &entries {
                if let Err(e) = self.insert(entry) {
                    self.not_recorded(entry.path, &e);
                }
            }
        }
    }

    /// Logs why `path` was not indexed and keeps it for a retry when one
    /// may help.
    fn not_recorded(&self, path: &str, e: &IndexError) {
        if is_permanent(e) {
            // Not a header the index can hold (no Study Instance UID, cut
            // short, ...): the file is final, so reading it again will not
            // change that.
            warn!(path, error = %e, "object stored but not indexed: its header cannot be");
        } else {
            warn!(path, error = %e, "object stored but not indexed (retried later)");
            self.keep_for_retry(path.to_string());
        }
    }

    /// How many stored files wait for a retry.
    pub fn retry_len(&self) -> usize {
        self.retry_list().len()
    }

    /// Reads the header of `path` in `root` and records it.
    pub(super) fn record_file(
        &self,
        root: &Folder,
        path: &str,
        received: i64,
    ) -> Result<(), IndexError> {
        let (attributes, size) = read_in(root, path)?;
        self.insert(&Entry {
            path,
            size,
            received,
            attributes: &attributes,
        })
    }

    fn retry_some(&self, root: &Folder) {
        for _ in 0..RETRIES_PER_COMMIT {
            let Some(path) = self.retry_list().pop_front() else {
                return;
            };
            match self.record_file(root, &path, now()) {
                Ok(()) => {}
                // Gone since (replaced or removed): nothing to index.
                Err(IndexError::Header(header::HeaderError::Io(e)))
                    if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => {
                    // Still failing: keep it for the next start, and stop
                    // trying this commit.
                    self.keep_for_retry(path);
                    return;
                }
            }
        }
    }

    fn keep_for_retry(&self, path: String) {
        let mut list = self.retry_list();
        if list.len() >= RETRY_CAP {
            if let Some(dropped) = list.pop_front() {
                warn!(path = %dropped, cap = RETRY_CAP,
                    "index retry list full: left for the catch-up at the next start");
            }
        }
        list.push_back(path);
    }

    fn retry_list(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<String>> {
        self.retry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether indexing failed because of what the file holds (no retry helps)
/// rather than because of the disk or the database.
fn is_permanent(e: &IndexError) -> bool {
    match e {
        IndexError::Header(header::HeaderError::NotPart10(_))
        | IndexError::Header(header::HeaderError::Missing(_)) => true,
        IndexError::Header(header::HeaderError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::InvalidData
                | std::io::ErrorKind::InvalidInput
        ),
        _ => false,
    }
}

/// Opens `path` in `root` (by descriptor: the worker may not be able to
/// resolve the store's path) and reads its header and size.
pub(super) fn read_in(
    root: &Folder,
    path: &str,
) -> Result<(header::Attributes, u64), header::HeaderError> {
    let file: File = root.open_file(path, OFlag::O_RDONLY | OFlag::O_NOFOLLOW, 0)?;
    let size = file.metadata()?.len();
    let attributes = header::read(BufReader::with_capacity(READ_BUFFER, file))?;
    Ok((attributes, size))
}

/// Unix seconds now.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
