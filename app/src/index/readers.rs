//! The read-only connections queries run on, kept between queries.
//!
//! Opening one costs more than a small query does: the database and its
//! `-wal` and `-shm` files are opened and locked, the schema is parsed and
//! the page cache starts cold (a profile of a series-level C-FIND showed
//! an openat, 14 stats and 12 page reads per query, for a query that
//! itself needs a few pages). So a connection goes back to the pool when
//! its query ends, and the next query starts on a warm one. The pool keeps
//! at most [`MAX_IDLE`] idle connections, each with a page cache of
//! [`CACHE_KIB`], so its memory is bounded whatever the load; more
//! concurrent queries than that open their own and close them after.
//! A kept connection holds no read lock between queries (each query is its
//! own read transaction, which sees every commit made before it began),
//! so it never holds back the writer's checkpoints.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, OpenFlags};

/// Idle connections kept.
pub const MAX_IDLE: usize = 2;
/// Each connection's page cache.
pub const CACHE_KIB: i64 = 1024;

/// The idle read-only connections of one index.
#[derive(Debug)]
pub struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

/// A read-only connection, back to its pool when dropped.
pub struct Reader {
    conn: Option<Connection>,
    pool: Arc<ReaderPool>,
}

impl ReaderPool {
    /// A pool for the database at `path` (opened through the index's VFS).
    pub fn new(path: PathBuf) -> Arc<ReaderPool> {
        Arc::new(ReaderPool {
            path,
            idle: Mutex::default(),
        })
    }

    /// An idle connection, or a new one.
    pub fn get(self: &Arc<Self>) -> Result<Reader, rusqlite::Error> {
        let kept = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match kept {
            Some(conn) => conn,
            None => open(&self.path)?,
        };
        Ok(Reader {
            conn: Some(conn),
            pool: Arc::clone(self),
        })
    }

    /// Idle connections now (for tests).
    pub fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Deref for Reader {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        // Some until dropped.
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only in drop"))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Only a connection that is between transactions, with no
        // statement still stepping, is kept (a query that failed half-way
        // may have left one open); the next query then starts its own read
        // transaction and sees every commit made before it.
        if !conn.is_autocommit() || conn.is_busy() {
            return;
        }
        let mut idle = self
            .pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

/// Opens a read-only connection through the same VFS as the writer (its
/// path may be `/proc/self/fd/N/...`: see [`super::vfs`]), with the
/// functions queries use.
fn open(path: &std::path::Path) -> Result<Connection, rusqlite::Error> {
    let vfs = super::vfs::name().map_err(|e| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(e),
        )
    })?;
    let conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        vfs,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.create_scalar_function(
        "fold",
        1,
        rusqlite::functions::FunctionFlags::SQLITE_UTF8
            | rusqlite::functions::FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| Ok(super::query::fold(&ctx.get::<String>(0)?)),
    )?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;

    #[test]
    fn connections_are_kept_up_to_the_cap_and_see_later_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        let count = |r: &Reader| -> i64 {
            r.query_row("SELECT count(*) FROM instance", [], |row| row.get(0))
                .expect("counts")
        };
        {
            let (a, b, c) = (
                index.reader().expect("a"),
                index.reader().expect("b"),
                index.reader().expect("c"),
            );
            assert_eq!(count(&a) + count(&b) + count(&c), 0);
        }
        assert_eq!(index.readers().idle(), MAX_IDLE);
        let kept = index.reader().expect("kept");
        assert_eq!(index.readers().idle(), MAX_IDLE - 1);
        let attributes = crate::index::Attributes {
            transfer_syntax: dimse::uid::EXPLICIT_VR_LE.into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.2.3.1".into(),
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.0".into(),
            patient_id: "P".into(),
            ..crate::index::Attributes::default()
        };
        index
            .insert(&crate::index::Entry {
                path: "f",
                size: 1,
                received: 0,
                attributes: &attributes,
            })
            .expect("inserts");
        assert_eq!(count(&kept), 1, "a kept connection sees the new row");
    }
}
