//! Storage commitment in the index, both ways.
//!
//! As SCP (a modality asks us): each request is kept in `commitment` from
//! its N-ACTION until its N-EVENT-REPORT is delivered, so a restart in
//! between still sends the report; the report says which of the requested
//! instances we hold ([`Index::committed`]: an instance row with that SOP
//! Instance UID and SOP Class UID, recorded only once its file was
//! durable).
//!
//! As SCU (a `[[forward]]` rule with `commit = true`): a delivered entry
//! waits as `sent`; when we ask the destination about it, the entry gets the
//! request's Transaction UID ([`Index::commitment_asked`]); the report for
//! that transaction marks it `done` or `failed`
//! ([`Index::commitment_reported`]); one not answered in time is asked
//! again.

use rusqlite::{params, OptionalExtension};

use super::queue::unix_now;
use super::{Index, IndexError};

/// One instance named in a storage commitment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// (0008,1150) Referenced SOP Class UID
    pub sop_class: String,
    /// (0008,1155) Referenced SOP Instance UID
    pub sop_instance: String,
}

/// A request we answer as SCP whose report is not yet delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReport {
    /// its row
    pub id: i64,
    /// the requester's AE title (the calling AE title of its N-ACTION)
    pub requester: String,
    /// (0008,1195) Transaction UID
    pub transaction_uid: String,
    /// the instances asked about
    pub references: Vec<Reference>,
    /// failed delivery attempts
    pub attempts: u32,
}

/// A forwarded object whose storage commitment is to be asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToCommit {
    /// the queue entry
    pub id: i64,
    /// the object
    pub reference: Reference,
}

fn encode(references: &[Reference]) -> String {
    let mut text = String::new();
    for r in references {
        text.push_str(&r.sop_class);
        text.push('\t');
        text.push_str(&r.sop_instance);
        text.push('\n');
    }
    text
}

fn decode(text: &str) -> Vec<Reference> {
    text.lines()
        .filter_map(|line| {
            let (class, instance) = line.split_once('\t')?;
            Some(Reference {
                sop_class: class.to_string(),
                sop_instance: instance.to_string(),
            })
        })
        .collect()
}

impl Index {
    /// Keeps a request we answer as SCP until its report is delivered;
    /// returns its row.
    pub fn commitment_received(
        &self,
        requester: &str,
        transaction_uid: &str,
        references: &[Reference],
    ) -> Result<i64, IndexError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO commitment (requester, transaction_uid, refs, received)
             VALUES (?1, ?2, ?3, ?4)",
            params![requester, transaction_uid, encode(references), unix_now()],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Which of `references` we hold durably: (committed, failed).
    pub fn committed(
        &self,
        references: &[Reference],
    ) -> Result<(Vec<Reference>, Vec<Reference>), IndexError> {
        let reader = self.reader()?;
        let mut statement = reader.prepare_cached(
            "SELECT 1 FROM instance WHERE sop_instance_uid = ?1 AND sop_class_uid = ?2 LIMIT 1",
        )?;
        let (mut committed, mut failed) = (Vec::new(), Vec::new());
        for r in references {
            let held = statement
                .query_row(params![r.sop_instance, r.sop_class], |_| Ok(()))
                .optional()?
                .is_some();
            if held {
                committed.push(r.clone());
            } else {
                failed.push(r.clone());
            }
        }
        Ok((committed, failed))
    }

    /// The requests whose reports are not yet delivered, oldest first.
    pub fn reports_pending(&self) -> Result<Vec<PendingReport>, IndexError> {
        let reader = self.reader()?;
        let mut statement = reader.prepare_cached(
            "SELECT id, requester, transaction_uid, refs, attempts FROM commitment ORDER BY id",
        )?;
        let rows = statement.query_map([], |r| {
            Ok(PendingReport {
                id: r.get(0)?,
                requester: r.get(1)?,
                transaction_uid: r.get(2)?,
                references: decode(&r.get::<_, String>(3)?),
                attempts: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A request's report was delivered: it is forgotten.
    pub fn report_delivered(&self, id: i64) -> Result<(), IndexError> {
        self.lock()
            .execute("DELETE FROM commitment WHERE id = ?1", [id])?;
        Ok(())
    }

    /// A request's report could not be delivered this time.
    pub fn report_not_delivered(&self, id: i64, reason: &str) -> Result<(), IndexError> {
        self.lock().execute(
            "UPDATE commitment SET attempts = attempts + 1, reason = ?2 WHERE id = ?1",
            params![id, reason],
        )?;
        Ok(())
    }

    /// Delivered entries of `destination` to ask storage commitment for:
    /// never asked, or asked longer than `timeout_s` ago with no report.
    pub fn to_commit(
        &self,
        destination: &str,
        timeout_s: i64,
        limit: usize,
    ) -> Result<Vec<ToCommit>, IndexError> {
        let reader = self.reader()?;
        let mut statement = reader.prepare_cached(
            "SELECT f.id, i.sop_class_uid, i.sop_instance_uid
             FROM forward f JOIN instance i ON i.id = f.instance
             WHERE f.destination = ?1 AND f.state = 'sent'
               AND (f.transaction_uid IS NULL OR f.updated < ?2)
             ORDER BY f.id LIMIT ?3",
        )?;
        let rows = statement.query_map(
            params![destination, unix_now() - timeout_s, limit as i64],
            |r| {
                Ok(ToCommit {
                    id: r.get(0)?,
                    reference: Reference {
                        sop_class: r.get(1)?,
                        sop_instance: r.get(2)?,
                    },
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Entries `ids` were asked about in the request `transaction_uid`.
    pub fn commitment_asked(&self, ids: &[i64], transaction_uid: &str) -> Result<(), IndexError> {
        let now = unix_now();
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        {
            let mut statement = tx.prepare_cached(
                "UPDATE forward SET transaction_uid = ?2, updated = ?3
                 WHERE id = ?1 AND state = 'sent'",
            )?;
            for id in ids {
                statement.execute(params![id, transaction_uid, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The destination's report for `transaction_uid`: the committed
    /// instances' entries become `done`, the failed ones' `failed` (with
    /// the reason). Returns the entries changed, with the destination and
    /// the stored path of each, for the audit trail.
    pub fn commitment_reported(
        &self,
        transaction_uid: &str,
        committed: &[Reference],
        failed: &[(Reference, u16)],
    ) -> Result<Vec<Committed>, IndexError> {
        let now = unix_now();
        let mut changed = Vec::new();
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        {
            let mut find = tx.prepare_cached(
                "SELECT f.id, f.destination, i.path FROM forward f
                 JOIN instance i ON i.id = f.instance
                 WHERE f.transaction_uid = ?1 AND f.state = 'sent'
                   AND i.sop_instance_uid = ?2 AND i.sop_class_uid = ?3",
            )?;
            let mut update = tx.prepare_cached(
                "UPDATE forward SET state = ?2, status = coalesce(?3, status), reason = ?4, updated = ?5
                 WHERE id = ?1",
            )?;
            let all = committed
                .iter()
                .map(|r| (r, None))
                .chain(failed.iter().map(|(r, why)| (r, Some(*why))));
            for (reference, failure) in all {
                let rows: Vec<(i64, String, String)> = find
                    .query_map(
                        params![transaction_uid, reference.sop_instance, reference.sop_class],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )?
                    .collect::<Result<_, _>>()?;
                for (id, destination, path) in rows {
                    let (state, reason) = match failure {
                        None => ("done", String::new()),
                        Some(why) => (
                            "failed",
                            format!("storage commitment failed: reason {why:04X}"),
                        ),
                    };
                    update.execute(params![id, state, failure, reason, now])?;
                    changed.push(Committed {
                        id,
                        destination,
                        path,
                        reference: reference.clone(),
                        failure,
                    });
                }
            }
        }
        tx.commit()?;
        Ok(changed)
    }
}

/// A queue entry a storage commitment report settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// the entry
    pub id: i64,
    /// its destination
    pub destination: String,
    /// the stored file
    pub path: String,
    /// the object
    pub reference: Reference,
    /// None when committed; the Failure Reason (0008,1197) when not
    pub failure: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::queue::{Outcome, Rule};
    use crate::index::{Attributes, Entry};

    fn store(index: &Index, n: u32) {
        let a = Attributes {
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: format!("1.2.3.{n}"),
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.0".into(),
            ..Attributes::default()
        };
        let path = format!("CT.{n}");
        index
            .insert(&Entry {
                path: &path,
                size: 1,
                received: 0,
                attributes: &a,
            })
            .expect("inserts");
    }

    fn ct(n: u32) -> Reference {
        Reference {
            sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance: format!("1.2.3.{n}"),
        }
    }

    #[test]
    fn a_request_is_kept_until_reported_and_checked_against_what_is_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        store(&index, 1);
        let mut wrong_class = ct(1);
        wrong_class.sop_class = "1.2.840.10008.5.1.4.1.1.4".into();
        let asked = [ct(1), ct(2), wrong_class.clone()];
        let (committed, failed) = index.committed(&asked).expect("checks");
        assert_eq!(committed, [ct(1)]);
        assert_eq!(failed, [ct(2), wrong_class]);
        let id = index
            .commitment_received("US1", "1.2.9", &asked)
            .expect("keeps");
        index.report_not_delivered(id, "refused").expect("counts");
        let pending = index.reports_pending().expect("reads");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].references, asked);
        assert_eq!(
            (pending[0].attempts, pending[0].requester.as_str()),
            (1, "US1")
        );
        index.report_delivered(id).expect("forgets");
        assert!(index.reports_pending().expect("reads").is_empty());
    }

    #[test]
    fn forwarded_entries_wait_for_their_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        index.set_forward_rules(vec![Rule {
            destination: "PACS".into(),
            calling: vec![],
            modality: vec![],
            commit: true,
        }]);
        for n in 1..=3 {
            store(&index, n);
        }
        let queued = index.next_to_forward("PACS", 10).expect("reads");
        let delivered: Vec<_> = queued
            .iter()
            .map(|p| (p.id, Outcome::Delivered { status: 0 }))
            .collect();
        index.record_forwarded(&delivered).expect("records");
        let asking = index.to_commit("PACS", 600, 10).expect("reads");
        assert_eq!(asking.len(), 3);
        let ids: Vec<i64> = asking.iter().map(|c| c.id).collect();
        index.commitment_asked(&ids, "1.2.99").expect("asks");
        assert!(index.to_commit("PACS", 600, 10).expect("reads").is_empty());
        // Not answered within the time: asked again.
        assert_eq!(index.to_commit("PACS", -1, 10).expect("reads").len(), 3);
        let changed = index
            .commitment_reported("1.2.99", &[ct(1), ct(2)], &[(ct(3), 0x0110)])
            .expect("records");
        assert_eq!(changed.len(), 3);
        assert_eq!(changed[2].failure, Some(0x0110));
        let counts = index.queue_counts().expect("counts");
        assert_eq!(
            (counts[0].done, counts[0].failed, counts[0].sent),
            (2, 1, 0)
        );
        // A report for another transaction changes nothing.
        assert!(index
            .commitment_reported("1.2.98", &[ct(1)], &[])
            .expect("records")
            .is_empty());
    }
}
