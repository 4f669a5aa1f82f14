//! C-MOVE and C-GET answered from the index: which stored files a
//! retrieve identifier names (PS3.4 C.4.2.2.1, C.4.3.2.1).
//!
//! A retrieve identifier carries the Query/Retrieve Level and the unique
//! keys: those of the levels above as single values (checked by
//! [`super::query::parse`], as for a hierarchical C-FIND), and the level's
//! own as a single value or a list (Patient ID at PATIENT, Study Instance
//! UID at STUDY, Series Instance UID at SERIES, SOP Instance UID at
//! IMAGE), which must be present. Other keys are not allowed in a retrieve
//! identifier; they are ignored, as most archives do, rather than failing
//! the request.
//!
//! Selecting happens in two passes over the same read-only connection:
//! first how many instances and which (SOP class, transfer syntax) pairs
//! (the sub-operation count and the presentation contexts the C-MOVE
//! association proposes are both needed before the first object goes),
//! then the instances one row at a time, each handed to the caller as it
//! is read, never all in memory. An instance stored twice (a second copy
//! kept with `overwrite = false`) is sent once, from its first file.

use std::ops::ControlFlow;

use dimse::command::status;
use dimse::scp::Failure;

use super::query::{self, fail, known, Level, Query};

/// (0008,0018) SOP Instance UID
const TAG_SOP_INSTANCE_UID: u32 = 0x0008_0018;

/// One stored instance to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// its file, relative to the store's root
    pub path: String,
    /// (0008,0016) SOP Class UID
    pub sop_class: String,
    /// (0008,0018) SOP Instance UID
    pub sop_instance: String,
    /// the transfer syntax it is stored in
    pub transfer_syntax: String,
}

/// What a retrieve will send, known before the first object goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// how many instances (sub-operations)
    pub count: u64,
    /// the distinct (SOP class, transfer syntax) pairs among them, sorted
    pub pairs: Vec<(String, String)>,
}

/// The unique key of each level, and its name for messages.
fn level_key(level: Level) -> (u32, &'static str) {
    match level {
        Level::Patient => (query::TAG_PATIENT_ID, "Patient ID"),
        Level::Study => (query::TAG_STUDY_INSTANCE_UID, "Study Instance UID"),
        Level::Series => (query::TAG_SERIES_INSTANCE_UID, "Series Instance UID"),
        Level::Image => (TAG_SOP_INSTANCE_UID, "SOP Instance UID"),
    }
}

/// The FROM and WHERE of a retrieve: every instance under the unique keys
/// given, with their bound values.
fn instances_where(query: &Query) -> Result<(String, Vec<String>), Failure> {
    let (own, name) = level_key(query.level);
    let has_own = query
        .keys
        .iter()
        .any(|k| k.tag == own && !k.value.trim().is_empty());
    if !has_own {
        return Err(fail(
            status::IDENTIFIER_MISMATCH,
            format!("{} level needs a {name} to retrieve", query.level.as_str()),
        ));
    }
    let unique = [
        query::TAG_PATIENT_ID,
        query::TAG_STUDY_INSTANCE_UID,
        query::TAG_SERIES_INSTANCE_UID,
        TAG_SOP_INSTANCE_UID,
    ];
    let mut params = Vec::new();
    let mut conditions = Vec::new();
    for k in &query.keys {
        if !unique.contains(&k.tag) || k.value.trim().is_empty() {
            continue;
        }
        let Some(key) = known(k.tag).filter(|key| key.level <= query.level) else {
            continue;
        };
        // Wildcards are not retrieve matching: a unique key is a value or
        // a list of values.
        if k.value.contains(['*', '?']) {
            return Err(fail(
                status::IDENTIFIER_MISMATCH,
                "wildcards in a unique key of a retrieve",
            ));
        }
        if let Some(c) = query::condition(key, &k.value, &mut params) {
            conditions.push(c);
        }
    }
    let mut sql = String::from(
        "FROM instance i JOIN series se ON se.id = i.series JOIN study st ON st.id = se.study \
         JOIN patient p ON p.id = st.patient",
    );
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    Ok((sql, params))
}

fn db(e: rusqlite::Error) -> Failure {
    fail(status::UNABLE_TO_PROCESS, format!("index: {e}"))
}

/// A retrieve over an index (blocking: run it on a blocking
/// thread): [`Retrieve::selection`] first, then [`Retrieve::for_each`].
pub struct Retrieve {
    conn: super::readers::Reader,
    from_where: String,
    params: Vec<String>,
}

impl Retrieve {
    /// Checks the identifier's keys and opens the index for the retrieve.
    pub fn new(index: &super::Index, query: &Query) -> Result<Retrieve, Failure> {
        let (from_where, params) = instances_where(query)?;
        let conn = index.reader().map_err(db)?;
        Ok(Retrieve {
            conn,
            from_where,
            params,
        })
    }

    /// How many instances, and their (SOP class, transfer syntax) pairs.
    pub fn selection(&self) -> Result<Selection, Failure> {
        let params = rusqlite::params_from_iter(self.params.iter());
        let count: i64 = self
            .conn
            .query_row(
                &format!(
                    "SELECT count(DISTINCT i.sop_instance_uid) {}",
                    self.from_where
                ),
                params,
                |r| r.get(0),
            )
            .map_err(db)?;
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT DISTINCT i.sop_class_uid, i.transfer_syntax {} ORDER BY 1, 2",
                self.from_where
            ))
            .map_err(db)?;
        let pairs = stmt
            .query_map(rusqlite::params_from_iter(self.params.iter()), |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(Selection {
            count: u64::try_from(count).unwrap_or(0),
            pairs,
        })
    }

    /// Hands each instance to `each`, one row at a time, in the order they
    /// were stored, until it breaks. Returns how many it was handed.
    pub fn for_each(
        &self,
        mut each: impl FnMut(Stored) -> ControlFlow<()>,
    ) -> Result<u64, Failure> {
        // min() makes SQLite take the other columns from the first file of
        // an instance stored twice.
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT min(i.id), i.path, i.sop_class_uid, i.sop_instance_uid, \
                 i.transfer_syntax {} GROUP BY i.sop_instance_uid ORDER BY 1",
                self.from_where
            ))
            .map_err(db)?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(self.params.iter()))
            .map_err(db)?;
        let mut handed = 0;
        while let Some(row) = rows.next().map_err(db)? {
            let stored = Stored {
                path: row.get(1).map_err(db)?,
                sop_class: row.get(2).map_err(db)?,
                sop_instance: row.get(3).map_err(db)?,
                transfer_syntax: row.get(4).map_err(db)?,
            };
            handed += 1;
            if each(stored).is_break() {
                break;
            }
        }
        Ok(handed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::query::{parse, Model};
    use crate::index::{Attributes, Entry, Index};
    use dimse::uid;

    fn put(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
        let pad = value.len() % 2;
        out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
        out.extend_from_slice(&(tag as u16).to_le_bytes());
        out.extend_from_slice(&((value.len() + pad) as u32).to_le_bytes());
        out.extend_from_slice(value);
        if pad == 1 {
            out.push(b' ');
        }
    }

    fn identifier(elements: &[(u32, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, value) in elements {
            put(&mut out, *tag, value.as_bytes());
        }
        out
    }

    /// Two patients, three studies, four series, a few instances each; one
    /// instance stored twice; one series in another transfer syntax.
    fn index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        let mut n = 0;
        for (patient, study, series, ts, count) in [
            ("P1", "1.1", "1.1.1", uid::EXPLICIT_VR_LE, 3),
            ("P1", "1.1", "1.1.2", uid::IMPLICIT_VR_LE, 2),
            ("P1", "1.2", "1.2.1", uid::EXPLICIT_VR_LE, 1),
            ("P2", "2.1", "2.1.1", uid::EXPLICIT_VR_LE, 4),
        ] {
            for i in 0..count {
                n += 1;
                let attributes = Attributes {
                    transfer_syntax: ts.into(),
                    sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                    sop_instance_uid: format!("{series}.{i}"),
                    study_instance_uid: study.into(),
                    series_instance_uid: series.into(),
                    patient_id: patient.into(),
                    ..Attributes::default()
                };
                let path = format!("f{n}");
                index
                    .insert(&Entry {
                        path: &path,
                        size: 10,
                        received: 0,
                        attributes: &attributes,
                    })
                    .expect("inserts");
            }
        }
        // A second file of 1.1.1.0.
        let attributes = Attributes {
            transfer_syntax: uid::EXPLICIT_VR_LE.into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.1.1.0".into(),
            study_instance_uid: "1.1".into(),
            series_instance_uid: "1.1.1".into(),
            patient_id: "P1".into(),
            ..Attributes::default()
        };
        index
            .insert(&Entry {
                path: "f1_1",
                size: 10,
                received: 0,
                attributes: &attributes,
            })
            .expect("inserts");
        (dir, index)
    }

    fn retrieve(
        index: &Index,
        model: Model,
        keys: &[(u32, &str)],
    ) -> Result<(Selection, Vec<Stored>), Failure> {
        let query = parse(model, uid::IMPLICIT_VR_LE, &identifier(keys))?;
        let r = Retrieve::new(index, &query)?;
        let selection = r.selection()?;
        let mut all = Vec::new();
        r.for_each(|s| {
            all.push(s);
            ControlFlow::Continue(())
        })?;
        Ok((selection, all))
    }

    const LEVEL: u32 = 0x0008_0052;

    #[test]
    fn every_level_selects_the_instances_under_it() {
        let (_dir, index) = index();
        let (sel, all) = retrieve(
            &index,
            Model::StudyRoot,
            &[(LEVEL, "STUDY"), (0x0020_000D, "1.1")],
        )
        .expect("study");
        assert_eq!(sel.count, 5);
        assert_eq!(all.len(), 5);
        assert_eq!(
            sel.pairs,
            vec![
                (
                    "1.2.840.10008.5.1.4.1.1.2".to_string(),
                    uid::IMPLICIT_VR_LE.to_string()
                ),
                (
                    "1.2.840.10008.5.1.4.1.1.2".to_string(),
                    uid::EXPLICIT_VR_LE.to_string()
                ),
            ]
        );
        // The instance stored twice goes once, from its first file.
        assert_eq!(
            all.iter().filter(|s| s.sop_instance == "1.1.1.0").count(),
            1
        );
        assert!(all.iter().any(|s| s.path == "f1"));
        assert!(!all.iter().any(|s| s.path == "f1_1"));

        let (sel, _) = retrieve(
            &index,
            Model::PatientRoot,
            &[(LEVEL, "PATIENT"), (0x0010_0020, "P1")],
        )
        .expect("patient");
        assert_eq!(sel.count, 6);
        let (sel, _) = retrieve(
            &index,
            Model::StudyRoot,
            &[
                (LEVEL, "SERIES"),
                (0x0020_000D, "1.1"),
                (0x0020_000E, "1.1.2\\1.1.1"),
            ],
        )
        .expect("series list");
        assert_eq!(sel.count, 5);
        let (sel, all) = retrieve(
            &index,
            Model::StudyRoot,
            &[
                (LEVEL, "IMAGE"),
                (0x0008_0018, "2.1.1.3"),
                (0x0020_000D, "2.1"),
                (0x0020_000E, "2.1.1"),
            ],
        )
        .expect("image");
        assert_eq!((sel.count, all.len()), (1, 1));
        assert_eq!(all[0].sop_instance, "2.1.1.3");
        // Study list at STUDY level, across patients.
        let (sel, _) = retrieve(
            &index,
            Model::StudyRoot,
            &[(LEVEL, "STUDY"), (0x0020_000D, "1.2\\2.1")],
        )
        .expect("study list");
        assert_eq!(sel.count, 5);
        // Nothing stored under it: an empty selection, not a failure.
        let (sel, all) = retrieve(
            &index,
            Model::StudyRoot,
            &[(LEVEL, "STUDY"), (0x0020_000D, "9.9")],
        )
        .expect("none");
        assert_eq!((sel.count, all.len(), sel.pairs.len()), (0, 0, 0));
    }

    #[test]
    fn a_missing_or_wild_unique_key_is_an_identifier_mismatch() {
        let (_dir, index) = index();
        for keys in [
            &[(LEVEL, "STUDY")][..],
            &[(LEVEL, "STUDY"), (0x0020_000D, "")][..],
            &[(LEVEL, "STUDY"), (0x0020_000D, "1.*")][..],
            &[(LEVEL, "SERIES"), (0x0020_000D, "1.1")][..],
        ] {
            let err = retrieve(&index, Model::StudyRoot, keys).expect_err("refused");
            assert_eq!(err.status, status::IDENTIFIER_MISMATCH, "{keys:?}: {err:?}");
        }
    }

    #[test]
    fn for_each_stops_when_told() {
        let (_dir, index) = index();
        let query = parse(
            Model::PatientRoot,
            uid::IMPLICIT_VR_LE,
            &identifier(&[(LEVEL, "PATIENT"), (0x0010_0020, "P2")]),
        )
        .expect("parses");
        let r = Retrieve::new(&index, &query).expect("opens");
        let mut seen = 0;
        let handed = r
            .for_each(|_| {
                seen += 1;
                if seen == 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .expect("runs");
        assert_eq!((seen, handed), (2, 2));
    }
}
