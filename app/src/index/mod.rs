//! The index: what the store holds, by patient, study, series and
//! instance, in one SQLite database, for query and retrieve.
//!
//! The files are the truth and the index is derived from them: each row
//! is made from a stored file's header ([`header`]), and anything the
//! index loses can be made again from the files. WAL with
//! `synchronous=NORMAL`: a commit survives the process being killed; one
//! lost to a power cut is found again from its file.

pub mod charset;
pub mod header;
pub mod query;
pub mod schema;

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
    conn: Mutex<Connection>,
    path: PathBuf,
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
        let conn = Connection::open(path)?;
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
                tx.pragma_update(None, "user_version", schema::VERSION)?;
                tx.commit()?;
            }
            schema::VERSION => {}
            other => return Err(IndexError::Unusable(format!("schema version {other}"))),
        }
        Ok(Index {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one stored file, in one transaction (patient, study and
    /// series rows are made or brought up to date with it).
    pub fn insert(&self, entry: &Entry<'_>) -> Result<(), IndexError> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tx = conn.transaction()?;
        insert_in(&tx, entry)?;
        tx.commit()?;
        Ok(())
    }

    /// Whether a row has this path (relative to the store's root).
    pub fn has_path(&self, path: &str) -> Result<bool, IndexError> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(conn
            .query_row("SELECT 1 FROM instance WHERE path = ?1", [path], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

/// The rows of one entry, inside the caller's transaction.
fn insert_in(tx: &rusqlite::Transaction<'_>, e: &Entry<'_>) -> Result<(), IndexError> {
    let a = e.attributes;
    let patient: i64 = tx.query_row(
        "INSERT INTO patient (patient_id, patient_name, patient_birth_date, patient_sex)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (patient_id) DO UPDATE SET patient_name = excluded.patient_name,
             patient_birth_date = excluded.patient_birth_date, patient_sex = excluded.patient_sex
         RETURNING id",
        params![
            a.patient_id,
            a.patient_name,
            a.patient_birth_date,
            a.patient_sex
        ],
        |r| r.get(0),
    )?;
    let study: i64 = tx.query_row(
        "INSERT INTO study (patient, study_instance_uid, study_date, study_time, accession_number,
             study_id, study_description, referring_physician_name)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (study_instance_uid) DO UPDATE SET patient = excluded.patient,
             study_date = excluded.study_date, study_time = excluded.study_time,
             accession_number = excluded.accession_number, study_id = excluded.study_id,
             study_description = excluded.study_description,
             referring_physician_name = excluded.referring_physician_name
         RETURNING id",
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
    let series: i64 = tx.query_row(
        "INSERT INTO series (study, series_instance_uid, modality, series_number,
             series_description, series_date, body_part_examined)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (series_instance_uid) DO UPDATE SET study = excluded.study,
             modality = excluded.modality, series_number = excluded.series_number,
             series_description = excluded.series_description,
             series_date = excluded.series_date, body_part_examined = excluded.body_part_examined
         RETURNING id",
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
    tx.execute(
        "INSERT INTO instance (series, sop_instance_uid, sop_class_uid, instance_number, path,
             transfer_syntax, size, received)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (path) DO UPDATE SET series = excluded.series,
             sop_instance_uid = excluded.sop_instance_uid, sop_class_uid = excluded.sop_class_uid,
             instance_number = excluded.instance_number,
             transfer_syntax = excluded.transfer_syntax, size = excluded.size,
             received = excluded.received",
        params![
            series,
            a.sop_instance_uid,
            a.sop_class_uid,
            a.instance_number,
            e.path,
            a.transfer_syntax,
            e.size as i64,
            e.received
        ],
    )?;
    Ok(())
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
    fn a_file_that_is_not_sqlite_is_unusable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("index.sqlite");
        std::fs::write(&path, vec![0x55; 8192]).expect("write");
        assert!(Index::open(&path).is_err());
    }
}
