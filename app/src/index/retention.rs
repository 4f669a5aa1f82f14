//! What retention may delete: whole studies, least recently received
//! first, and only those with nothing left to deliver.
//!
//! A study may go when none of its objects has a forwarding queue entry
//! that is not `done` (delivered, and committed where its rule asks). A
//! study with an entry queued, sent and awaiting commitment, or failed is
//! never a candidate; one whose objects no rule matched has no entries and
//! is. The application deletes a candidate's files first and its rows
//! after ([`Index::forget_instances`]): a crash between the two leaves rows
//! whose files are gone, which the next start's catch-up drops.

use rusqlite::params;

use super::{Index, IndexError};

/// A study retention may delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// the study row's id
    pub id: i64,
    /// (0020,000D) Study Instance UID
    pub study_instance_uid: String,
    /// (0010,0020) Patient ID
    pub patient_id: String,
    /// when its newest object was received (Unix seconds)
    pub last_received: i64,
}

/// One stored object of a study being deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// the instance row's id
    pub id: i64,
    /// its file, relative to the store's root
    pub path: String,
    /// its size in bytes
    pub size: u64,
}

/// Studies with an entry not yet done are never candidates.
const UNDELIVERED: &str = "EXISTS (SELECT 1 FROM forward f JOIN instance i2 ON i2.id = f.instance
     JOIN series se2 ON se2.id = i2.series WHERE se2.study = st.id AND f.state != 'done')";

impl Index {
    /// Up to `limit` studies that may be deleted, least recently received
    /// first; with `received_before`, only those whose newest object came
    /// before it (Unix seconds).
    pub fn retention_candidates(
        &self,
        received_before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Candidate>, IndexError> {
        let reader = self.reader()?;
        let sql = format!(
            "SELECT st.id, st.study_instance_uid, p.patient_id, max(i.received) AS last
             FROM study st JOIN patient p ON p.id = st.patient
             JOIN series se ON se.study = st.id JOIN instance i ON i.series = se.id
             WHERE NOT {UNDELIVERED}
             GROUP BY st.id
             HAVING ?1 IS NULL OR last < ?1
             ORDER BY last, st.id LIMIT ?2"
        );
        let mut statement = reader.prepare_cached(&sql)?;
        let rows = statement.query_map(params![received_before, limit as i64], |r| {
            Ok(Candidate {
                id: r.get(0)?,
                study_instance_uid: r.get(1)?,
                patient_id: r.get(2)?,
                last_received: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The objects of study `id`, if it may still be deleted (an object
    /// that arrived since it was chosen may have queued something).
    pub fn study_objects_if_deletable(
        &self,
        id: i64,
    ) -> Result<Option<Vec<StoredObject>>, IndexError> {
        let reader = self.reader()?;
        let tx = reader.unchecked_transaction()?;
        let blocked: bool = tx.query_row(
            &format!("SELECT {UNDELIVERED} FROM study st WHERE st.id = ?1"),
            [id],
            |r| r.get(0),
        )?;
        if blocked {
            return Ok(None);
        }
        let objects = {
            let mut statement = tx.prepare_cached(
                "SELECT i.id, i.path, i.size FROM instance i JOIN series se ON se.id = i.series
                 WHERE se.study = ?1 ORDER BY i.id",
            )?;
            let rows = statement.query_map([id], |r| {
                Ok(StoredObject {
                    id: r.get(0)?,
                    path: r.get(1)?,
                    size: r.get::<_, i64>(2)?.max(0) as u64,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        tx.finish()?;
        Ok(Some(objects))
    }

    /// Removes the rows of objects whose files are deleted (their queue
    /// entries with them), and the series, study and patient rows left
    /// without objects, in one transaction.
    pub fn forget_instances(&self, ids: &[i64]) -> Result<(), IndexError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        super::delete_instances(&tx, ids)?;
        super::drop_childless_in(&tx)?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::queue::{Outcome, Rule};
    use crate::index::{Attributes, Entry};

    fn store(index: &Index, n: u32, study: u32, received: i64) {
        let a = Attributes {
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: format!("1.2.3.{study}.{n}"),
            study_instance_uid: format!("1.2.3.{study}"),
            series_instance_uid: format!("1.2.3.{study}.0"),
            patient_id: "P1".into(),
            modality: "CT".into(),
            ..Attributes::default()
        };
        let path = format!("CT.{study}.{n}");
        index
            .insert(&Entry {
                path: &path,
                size: 10,
                received,
                attributes: &a,
            })
            .expect("inserts");
    }

    #[test]
    fn only_studies_with_everything_delivered_go_least_recently_received_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        // Before any rule: study 1 (received at 100 and 300) has no entries.
        store(&index, 1, 1, 100);
        store(&index, 2, 1, 300);
        index.set_forward_rules(vec![Rule {
            destination: "PACS".into(),
            calling: vec![],
            modality: vec![],
            commit: false,
        }]);
        store(&index, 1, 2, 50);
        store(&index, 2, 2, 60);
        store(&index, 1, 3, 200);
        let uids = |c: Vec<Candidate>| {
            c.into_iter()
                .map(|c| c.study_instance_uid)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            uids(index.retention_candidates(None, 10).expect("reads")),
            ["1.2.3.1"]
        );
        // Study 2 half delivered: still not a candidate; then all of it.
        let pending = index.next_to_forward("PACS", 10).expect("reads");
        let delivered = |ids: &[i64]| {
            let outcomes: Vec<_> = ids
                .iter()
                .map(|id| (*id, Outcome::Delivered { status: 0 }))
                .collect();
            index.record_forwarded(&outcomes).expect("records");
        };
        delivered(&[pending[0].id]);
        assert_eq!(
            uids(index.retention_candidates(None, 10).expect("reads")),
            ["1.2.3.1"]
        );
        delivered(&[pending[1].id, pending[2].id]);
        assert_eq!(
            uids(index.retention_candidates(None, 10).expect("reads")),
            ["1.2.3.2", "1.2.3.3", "1.2.3.1"]
        );
        assert_eq!(
            uids(index.retention_candidates(Some(250), 10).expect("reads")),
            ["1.2.3.2", "1.2.3.3"]
        );
        let study2 = index.retention_candidates(None, 1).expect("reads")[0].id;
        let objects = index
            .study_objects_if_deletable(study2)
            .expect("reads")
            .expect("deletable");
        assert_eq!(objects.len(), 2);
        // A new object of the study, queued meanwhile, makes it stay.
        store(&index, 3, 2, 400);
        assert_eq!(
            index.study_objects_if_deletable(study2).expect("reads"),
            None
        );
        let pending = index.next_to_forward("PACS", 10).expect("reads");
        delivered(&[pending[0].id]);
        let objects = index
            .study_objects_if_deletable(study2)
            .expect("reads")
            .expect("deletable");
        let ids: Vec<i64> = objects.iter().map(|o| o.id).collect();
        index.forget_instances(&ids).expect("forgets");
        assert_eq!(index.instance_count().expect("counts"), 3);
        assert_eq!(
            uids(index.retention_candidates(None, 10).expect("reads")),
            ["1.2.3.3", "1.2.3.1"]
        );
        let queue: i64 = index
            .lock()
            .query_row("SELECT count(*) FROM forward", [], |r| r.get(0))
            .expect("counts");
        assert_eq!(queue, 1, "the deleted objects' entries went with them");
    }
}
