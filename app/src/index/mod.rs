//! The index: what the store holds, by patient, study, series and
//! instance, in one SQLite database, for query and retrieve.
//!
//! The files are the truth and the index is derived from them: each row
//! is made from a stored file's header ([`header`]), and anything the
//! index loses can be made again from the files. WAL with
//! `synchronous=NORMAL`: a commit survives the process being killed; one
//! lost to a power cut is found again from its file.

pub mod catchup;
pub mod charset;
pub mod commitment;
pub mod header;
pub mod query;
pub mod queue;
pub mod readers;
mod record;
pub mod retention;
pub mod retrieve;
pub mod schema;
mod vfs;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

pub use header::Attributes;

/// SQLite's page cache, capped (KiB): the index's memory does not grow
/// with the number of objects.
const CACHE_KIB: i64 = 2048;

/// Why the index could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// SQLite failed.
    #[error("index database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database exists but is not ours, of another version, or fails
    /// its integrity check.
    #[error("index database unusable: {0}")]
    Unusable(String),
    /// A stored file's header could not be read.
    #[error("header: {0}")]
    Header(#[from] header::HeaderError),
}

/// An open index. One connection, behind a mutex: inserts are short and
/// SQLite takes one writer at a time anyway.
pub struct Index {
    /// read-only connections for queries, kept between them. Declared
    /// first so that they close first: the writer's connection, closing
    /// last, can then checkpoint the WAL and remove `-wal` and `-shm`
    /// (SQLite does that only on the last connection's close).
    readers: std::sync::Arc<readers::ReaderPool>,
    conn: Mutex<Connection>,
    path: PathBuf,
    /// Stored files whose indexing failed, retried on later commits
    /// (capped: the next start's catch-up finds the rest); see [`record`].
    retry: Mutex<std::collections::VecDeque<String>>,
    /// The folder whose `/proc/self/fd` path the database was opened by,
    /// kept open as long as the connection (its descriptor number is in
    /// the paths SQLite keeps for the `-wal` and `-shm` files).
    folder: Option<crate::dirfd::Folder>,
    /// the `[[forward]]` rules each recorded object is queued by
    rules: std::sync::RwLock<std::sync::Arc<Vec<queue::Rule>>>,
    /// signalled when entries are queued (see [`Index::queue_changed`])
    queue_changed: tokio::sync::Notify,
}

/// One stored file, as the index records it.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// path relative to the store's root
    pub path: &'a str,
    /// the file's size in bytes
    pub size: u64,
    /// when it was received (Unix seconds)
    pub received: i64,
    /// its header's attributes
    pub attributes: &'a Attributes,
}

impl Index {
    /// Opens the index at `path`, creating its schema in a new file, and
    /// checks an existing one (`quick_check`, schema version).
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let vfs = vfs::name().map_err(IndexError::Unusable)?;
        let conn = Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), vfs)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(IndexError::Unusable(format!("journal mode {mode}")));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "journal_size_limit", 8i64 << 20)?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(IndexError::Unusable(format!("quick_check: {check}")));
        }
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match version {
            0 => {
                let tx = conn.unchecked_transaction()?;
                tx.execute_batch(schema::CREATE)?;
                tx.execute_batch(schema::CREATE_QUEUE)?;
                tx.pragma_update(None, "user_version", schema::VERSION)?;
                tx.commit()?;
            }
            1 => {
                let tx = conn.unchecked_transaction()?;
                tx.execute_batch(schema::MIGRATE_1_TO_2)?;
                tx.execute_batch(schema::CREATE_QUEUE)?;
                tx.pragma_update(None, "user_version", schema::VERSION)?;
                tx.commit()?;
            }
            schema::VERSION => {}
            other => return Err(IndexError::Unusable(format!("schema version {other}"))),
        }
        Ok(Index {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            retry: Mutex::default(),
            folder: None,
            readers: readers::ReaderPool::new(path.to_path_buf()),
            rules: std::sync::RwLock::default(),
            queue_changed: tokio::sync::Notify::new(),
        })
    }

    /// Opens the index `name` in `folder` through the folder's descriptor
    /// (`/proc/self/fd/N/name`: see [`vfs`] for why), keeping a descriptor
    /// of the folder open with it.
    pub fn open_in(folder: &crate::dirfd::Folder, name: &Path) -> Result<Index, IndexError> {
        let folder = folder
            .try_clone()
            .map_err(|e| IndexError::Unusable(format!("store folder: {e}")))?;
        let mut index = Index::open(&folder.proc_path().join(name))?;
        index.folder = Some(folder);
        Ok(index)
    }

    /// Whether commits are synced at WAL checkpoints (`synchronous=NORMAL`,
    /// the default) or never (`OFF`). OFF follows a store that does not
    /// fsync (`fsync = false`: durability comes from elsewhere): the
    /// checkpoints' fsyncs were most of what indexing added to such a
    /// store's commits. A power cut may then leave the index corrupt, which
    /// the next start's `quick_check` finds and rebuilds from the files.
    pub fn set_synced(&self, synced: bool) -> Result<(), IndexError> {
        self.lock()
            .pragma_update(None, "synchronous", if synced { "NORMAL" } else { "OFF" })?;
        Ok(())
    }

    /// A read-only connection for a query (kept for the next one when it
    /// is dropped).
    pub fn reader(&self) -> Result<readers::Reader, rusqlite::Error> {
        self.readers.get()
    }

    /// The pool of read-only connections.
    pub fn readers(&self) -> &readers::ReaderPool {
        &self.readers
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one stored file, in one transaction (patient, study and
    /// series rows are made or brought up to date with it).
    pub fn insert(&self, entry: &Entry<'_>) -> Result<(), IndexError> {
        self.insert_all(std::slice::from_ref(entry))
    }

    /// Records several stored files in one transaction (the catch-up's
    /// batches: one WAL commit per batch instead of per file).
    /// Each is queued for the `[[forward]]` rules that match it, in the
    /// same transaction.
    pub fn insert_all(&self, entries: &[Entry<'_>]) -> Result<(), IndexError> {
        let rules = self.forward_rules();
        let mut queued = 0;
        {
            let mut conn = self.lock();
            let tx = conn.transaction()?;
            for entry in entries {
                let instance = insert_in(&tx, entry)?;
                queued += queue::enqueue(&tx, instance, entry.attributes, &rules, entry.received)?;
            }
            tx.commit()?;
        }
        if queued > 0 {
            self.queue_changed.notify_waiters();
        }
        Ok(())
    }

    /// Whether a row has this path (relative to the store's root).
    pub fn has_path(&self, path: &str) -> Result<bool, IndexError> {
        let conn = self.lock();
        let mut statement = conn.prepare_cached("SELECT 1 FROM instance WHERE path = ?1")?;
        let found = statement.query_row([path], |_| Ok(())).optional()?;
        Ok(found.is_some())
    }

    /// How many instance rows there are.
    pub fn instance_count(&self) -> Result<u64, IndexError> {
        let n: i64 = self
            .lock()
            .query_row("SELECT count(*) FROM instance", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The connection, whoever panicked while holding it (every write is
    /// one transaction, so a panic leaves nothing half done).
    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The rows of one entry, inside the caller's transaction; returns the
/// instance row's id.
fn insert_in(tx: &rusqlite::Transaction<'_>, e: &Entry<'_>) -> Result<i64, IndexError> {
    let a = e.attributes;
    // Most objects belong to a series the index has, with the same patient
    // and study attributes: then the parent rows are only read (an upsert
    // would rewrite them and their indexes, doubling what each commit
    // writes to the WAL).
    let known: Option<i64> = tx
        .prepare_cached(
            "SELECT se.id FROM series se JOIN study st ON se.study = st.id
             JOIN patient p ON st.patient = p.id
             WHERE se.series_instance_uid = ?1 AND se.modality = ?2
               AND se.series_number IS ?3 AND se.series_description = ?4
               AND se.series_date = ?5 AND se.body_part_examined = ?6
               AND st.study_instance_uid = ?7 AND st.study_date = ?8 AND st.study_time = ?9
               AND st.accession_number = ?10 AND st.study_id = ?11
               AND st.study_description = ?12 AND st.referring_physician_name = ?13
               AND p.patient_id = ?14 AND p.patient_name = ?15
               AND p.patient_birth_date = ?16 AND p.patient_sex = ?17",
        )?
        .query_row(
            params![
                a.series_instance_uid,
                a.modality,
                a.series_number,
                a.series_description,
                a.series_date,
                a.body_part_examined,
                a.study_instance_uid,
                a.study_date,
                a.study_time,
                a.accession_number,
                a.study_id,
                a.study_description,
                a.referring_physician_name,
                a.patient_id,
                a.patient_name,
                a.patient_birth_date,
                a.patient_sex
            ],
            |r| r.get(0),
        )
        .optional()?;
    let series = match known {
        Some(series) => series,
        None => upsert_parents(tx, a)?,
    };
    insert_instance(tx, e, series)
}

/// Deletes the instance rows `ids` and their forwarding queue entries,
/// inside the caller's transaction; returns how many instance rows went.
fn delete_instances(tx: &rusqlite::Transaction<'_>, ids: &[i64]) -> Result<u64, IndexError> {
    let mut n = 0;
    let mut queue = tx.prepare_cached("DELETE FROM forward WHERE instance = ?1")?;
    let mut instance = tx.prepare_cached("DELETE FROM instance WHERE id = ?1")?;
    for id in ids {
        queue.execute([id])?;
        n += instance.execute([id])? as u64;
    }
    Ok(n)
}

/// Drops series, studies and patients left without instances, inside the
/// caller's transaction.
fn drop_childless_in(tx: &rusqlite::Transaction<'_>) -> Result<(), IndexError> {
    tx.execute_batch(
        "DELETE FROM series WHERE NOT EXISTS (SELECT 1 FROM instance WHERE instance.series = series.id);
         DELETE FROM study WHERE NOT EXISTS (SELECT 1 FROM series WHERE series.study = study.id);
         DELETE FROM patient WHERE NOT EXISTS (SELECT 1 FROM study WHERE study.patient = patient.id);",
    )?;
    Ok(())
}

/// Makes or brings up to date the patient, study and series rows of `a`;
/// returns the series row's id.
fn upsert_parents(tx: &rusqlite::Transaction<'_>, a: &Attributes) -> Result<i64, IndexError> {
    let patient: i64 = tx
        .prepare_cached(
            "INSERT INTO patient (patient_id, patient_name, patient_birth_date, patient_sex)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (patient_id) DO UPDATE SET patient_name = excluded.patient_name,
             patient_birth_date = excluded.patient_birth_date, patient_sex = excluded.patient_sex
         RETURNING id",
        )?
        .query_row(
            params![
                a.patient_id,
                a.patient_name,
                a.patient_birth_date,
                a.patient_sex
            ],
            |r| r.get(0),
        )?;
    let study: i64 = tx.prepare_cached(
        "INSERT INTO study (patient, study_instance_uid, study_date, study_time, accession_number,
             study_id, study_description, referring_physician_name)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (study_instance_uid) DO UPDATE SET patient = excluded.patient,
             study_date = excluded.study_date, study_time = excluded.study_time,
             accession_number = excluded.accession_number, study_id = excluded.study_id,
             study_description = excluded.study_description,
             referring_physician_name = excluded.referring_physician_name
         RETURNING id",
    )?
    .query_row(
        params![
            patient,
            a.study_instance_uid,
            a.study_date,
            a.study_time,
            a.accession_number,
            a.study_id,
            a.study_description,
            a.referring_physician_name
        ],
        |r| r.get(0),
    )?;
    let series: i64 = tx
        .prepare_cached(
            "INSERT INTO series (study, series_instance_uid, modality, series_number,
             series_description, series_date, body_part_examined)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (series_instance_uid) DO UPDATE SET study = excluded.study,
             modality = excluded.modality, series_number = excluded.series_number,
             series_description = excluded.series_description,
             series_date = excluded.series_date, body_part_examined = excluded.body_part_examined
         RETURNING id",
        )?
        .query_row(
            params![
                study,
                a.series_instance_uid,
                a.modality,
                a.series_number,
                a.series_description,
                a.series_date,
                a.body_part_examined
            ],
            |r| r.get(0),
        )?;
    Ok(series)
}

/// The instance row of `e`, in the series row `series`; returns its id.
fn insert_instance(
    tx: &rusqlite::Transaction<'_>,
    e: &Entry<'_>,
    series: i64,
) -> Result<i64, IndexError> {
    let a = e.attributes;
    let id = tx
        .prepare_cached(
            "INSERT INTO instance (series, sop_instance_uid, sop_class_uid, instance_number, path,
             transfer_syntax, size, received, source_ae)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (path) DO UPDATE SET series = excluded.series,
             sop_instance_uid = excluded.sop_instance_uid, sop_class_uid = excluded.sop_class_uid,
             instance_number = excluded.instance_number,
             transfer_syntax = excluded.transfer_syntax, size = excluded.size,
             received = excluded.received, source_ae = excluded.source_ae
         RETURNING id",
        )?
        .query_row(
            params![
                series,
                a.sop_instance_uid,
                a.sop_class_uid,
                a.instance_number,
                e.path,
                a.transfer_syntax,
                e.size as i64,
                e.received,
                a.source_ae
            ],
            |r| r.get(0),
        )?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attributes(n: u32) -> Attributes {
        Attributes {
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: format!("1.2.3.{n}"),
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.1".into(),
            patient_name: "Doe^Jane".into(),
            patient_id: "P1".into(),
            modality: "CT".into(),
            ..Attributes::default()
        }
    }

    #[test]
    fn schema_is_created_versioned_and_rows_link_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("index.sqlite");
        let index = Index::open(&path).expect("opens");
        for n in 0..3 {
            let a = attributes(n);
            let p = format!("CT.1.2.3.{n}");
            index
                .insert(&Entry {
                    path: &p,
                    size: 10,
                    received: 0,
                    attributes: &a,
                })
                .expect("inserts");
        }
        assert!(index.has_path("CT.1.2.3.1").expect("query"));
        assert!(!index.has_path("CT.9").expect("query"));
        drop(index);
        let conn = Connection::open(&path).expect("reopens");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, schema::VERSION);
        let (patients, studies, series, instances): (i64, i64, i64, i64) = conn
            .query_row(
                "SELECT (SELECT count(*) FROM patient), (SELECT count(*) FROM study),
                        (SELECT count(*) FROM series), (SELECT count(*) FROM instance)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .expect("counts");
        assert_eq!((patients, studies, series, instances), (1, 1, 1, 3));
        // Reopening an index of this version keeps it.
        assert!(Index::open(&path).is_ok());
    }

    #[test]
    fn parent_rows_follow_the_latest_object_of_their_series() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        for (n, name) in [(0, "Doe^Jane"), (1, "Doe^Jane"), (2, "Roe^Jane")] {
            let a = Attributes {
                patient_name: name.into(),
                ..attributes(n)
            };
            let p = format!("CT.{n}");
            index
                .insert(&Entry {
                    path: &p,
                    size: 1,
                    received: 0,
                    attributes: &a,
                })
                .expect("inserts");
        }
        let conn = index.lock();
        let (patients, name): (i64, String) = conn
            .query_row("SELECT count(*), max(patient_name) FROM patient", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("row");
        assert_eq!((patients, name.as_str()), (1, "Roe^Jane"));
        let instances: i64 = conn
            .query_row("SELECT count(*) FROM instance", [], |r| r.get(0))
            .expect("count");
        assert_eq!(instances, 3);
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_unusable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("index.sqlite");
        std::fs::write(&path, vec![0x55; 8192]).expect("write");
        assert!(Index::open(&path).is_err());
    }
}

/// Helpers for the index's tests.
#[cfg(test)]
pub(crate) mod testing {
    /// A minimal Part-10 file (explicit VR little endian) with the UIDs
    /// the index needs.
    pub fn part10(sop_instance: &str, study: &str) -> Vec<u8> {
        fn element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &str) {
            let mut v = value.as_bytes().to_vec();
            if v.len() % 2 == 1 {
                v.push(if vr == b"UI" { 0 } else { b' ' });
            }
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(vr);
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
            out.extend_from_slice(&v);
        }
        let mut meta = Vec::new();
        element(&mut meta, 0x0002, 0x0010, b"UI", "1.2.840.10008.1.2.1");
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        element(&mut out, 0x0008, 0x0016, b"UI", "1.2.840.10008.5.1.4.1.1.2");
        element(&mut out, 0x0008, 0x0018, b"UI", sop_instance);
        element(&mut out, 0x0008, 0x0060, b"CS", "CT");
        element(&mut out, 0x0010, 0x0010, b"PN", "Doe^Jane");
        element(&mut out, 0x0010, 0x0020, b"LO", "P1");
        element(&mut out, 0x0020, 0x000D, b"UI", study);
        element(&mut out, 0x0020, 0x000E, b"UI", &format!("{study}.1"));
        out
    }
}
