//! The forwarding queue: which stored objects go to which destination, and
//! how far each has got.
//!
//! A row is written in the same transaction as the object's instance row
//! ([`enqueue`], called by the index's insert), so an object acknowledged
//! to its sender and recorded in the index is never missing from the
//! queue; one acknowledged and not yet recorded when the process dies is a
//! file the next start's catch-up indexes, and queues, as any other. The
//! forwarder ([`crate::forward`]) takes rows oldest first per destination
//! and records each outcome here. Rows stay after delivery (`done`), so
//! retention can tell what has left the device; they go with their object.
//!
//! Only the rules change what is queued: a rule added later does not reach
//! back to objects stored before it.

use std::time::SystemTime;

use rusqlite::{params, OptionalExtension, Transaction};

use super::{Attributes, Index, IndexError};

/// One `[[forward]]` rule, as the index applies it to each object it
/// records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// the destination's AE title (a `[[peer]]`)
    pub destination: String,
    /// only objects sent by these calling AE titles (empty: all)
    pub calling: Vec<String>,
    /// only objects of these modalities (empty: all)
    pub modality: Vec<String>,
    /// ask the destination for storage commitment before an object counts
    /// as delivered
    pub commit: bool,
}

impl Rule {
    /// Whether this rule takes the object with attributes `a`.
    pub fn matches(&self, a: &Attributes) -> bool {
        (self.calling.is_empty() || self.calling.contains(&a.source_ae))
            && (self.modality.is_empty()
                || self
                    .modality
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(&a.modality)))
    }
}

/// Where a queue entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// waiting to be sent (again)
    Queued,
    /// stored by the destination; its storage commitment is asked for and
    /// not yet answered
    Sent,
    /// delivered (and committed, when its rule asks)
    Done,
    /// refused for good (SOP class or transfer syntax not taken, a
    /// permanent failure status, the file unreadable): kept and shown until
    /// an operator retries or forgets it
    Failed,
}

impl State {
    /// The word stored in the index and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Sent => "sent",
            State::Done => "done",
            State::Failed => "failed",
        }
    }

    /// The state named `word`.
    pub fn parse(word: &str) -> Option<State> {
        [State::Queued, State::Sent, State::Done, State::Failed]
            .into_iter()
            .find(|s| s.as_str() == word)
    }
}

/// Queues the object just recorded as instance row `instance` for every
/// rule that matches it, inside the caller's transaction. An object stored
/// again under the same name (an overwrite) is queued again. Returns how
/// many entries it queued.
pub(super) fn enqueue(
    tx: &Transaction<'_>,
    instance: i64,
    a: &Attributes,
    rules: &[Rule],
    now: i64,
) -> Result<usize, IndexError> {
    let mut queued = 0;
    for rule in rules.iter().filter(|r| r.matches(a)) {
        tx.prepare_cached(
            "INSERT INTO forward (instance, destination, commit_wanted, state, queued, updated)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?4)
             ON CONFLICT (instance, destination) DO UPDATE SET
                 commit_wanted = excluded.commit_wanted, state = 'queued', attempts = 0,
                 queued = excluded.queued, updated = excluded.updated, status = NULL,
                 reason = '', transaction_uid = NULL",
        )?
        .execute(params![instance, rule.destination, rule.commit, now])?;
        queued += 1;
    }
    Ok(queued)
}

/// A queue entry ready to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// the entry's id
    pub id: i64,
    /// the stored file, relative to the store's root
    pub path: String,
    /// (0008,0016) SOP Class UID
    pub sop_class: String,
    /// (0008,0018) SOP Instance UID
    pub sop_instance: String,
    /// the stored transfer syntax (sent as stored: nothing is transcoded)
    pub transfer_syntax: String,
    /// whether storage commitment is asked for after delivery
    pub commit_wanted: bool,
    /// failed attempts so far
    pub attempts: u32,
}

/// How one attempt to forward an entry ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination stored it (with this status: 0000 or a warning).
    Delivered {
        /// the C-STORE-RSP status
        status: u16,
    },
    /// Refused for good: marked failed, not retried until an operator
    /// says so.
    Failed {
        /// the destination's status, when it answered
        status: Option<u16>,
        /// why
        reason: String,
    },
    /// Not delivered this time (destination away, busy, out of resources):
    /// stays queued, its attempt counted.
    Retry {
        /// the destination's status, when it answered
        status: Option<u16>,
        /// why
        reason: String,
    },
}

/// A destination's queue, for status lines and `minipacs queue`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationCounts {
    /// the destination's AE title
    pub destination: String,
    /// entries waiting
    pub queued: u64,
    /// delivered, commitment pending
    pub sent: u64,
    /// delivered (and committed where asked)
    pub done: u64,
    /// refused for good
    pub failed: u64,
    /// when the oldest entry not yet delivered was queued (Unix seconds)
    pub oldest_undelivered: Option<i64>,
}

/// One queue entry as `minipacs queue list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// the entry's id
    pub id: i64,
    /// destination AE title
    pub destination: String,
    /// `queued`, `sent`, `done` or `failed`
    pub state: String,
    /// failed attempts
    pub attempts: u32,
    /// the last status the destination answered, 4 hex digits
    pub status: Option<String>,
    /// why the last attempt failed
    pub reason: String,
    /// when it was queued (RFC 3339)
    pub queued: String,
    /// when it last changed (RFC 3339)
    pub updated: String,
    /// (0008,0018) SOP Instance UID
    pub sop_instance_uid: String,
    /// (0008,0016) SOP Class UID
    pub sop_class_uid: String,
    /// (0020,000D) Study Instance UID
    pub study_instance_uid: String,
    /// the stored file, relative to the store's root
    pub path: String,
}

/// Which entries an operator's `retry` or `forget` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// one entry, by id
    Entry(i64),
    /// every failed entry of a destination
    Destination(String),
}

impl Index {
    /// Takes the `[[forward]]` rules (at start and on every live change):
    /// objects recorded from now on are queued by them.
    pub fn set_forward_rules(&self, rules: Vec<Rule>) {
        *self
            .rules
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(rules);
    }

    /// The rules in force.
    pub(super) fn forward_rules(&self) -> std::sync::Arc<Vec<Rule>> {
        std::sync::Arc::clone(
            &self
                .rules
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Signalled after every commit that queued something, and after an
    /// operator's `retry`: the forwarder's workers wait on it.
    pub fn queue_changed(&self) -> &tokio::sync::Notify {
        &self.queue_changed
    }

    /// The oldest `limit` entries queued for `destination`.
    pub fn next_to_forward(
        &self,
        destination: &str,
        limit: usize,
    ) -> Result<Vec<Pending>, IndexError> {
        let reader = self.reader()?;
        let mut statement = reader.prepare_cached(
            "SELECT f.id, i.path, i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax,
                    f.commit_wanted, f.attempts
             FROM forward f JOIN instance i ON i.id = f.instance
             WHERE f.destination = ?1 AND f.state = 'queued'
             ORDER BY f.id LIMIT ?2",
        )?;
        let rows = statement.query_map(params![destination, limit as i64], |r| {
            Ok(Pending {
                id: r.get(0)?,
                path: r.get(1)?,
                sop_class: r.get(2)?,
                sop_instance: r.get(3)?,
                transfer_syntax: r.get(4)?,
                commit_wanted: r.get(5)?,
                attempts: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records how attempts ended, in one transaction. A delivered entry
    /// whose rule asks for storage commitment becomes `sent`, any other
    /// `done`.
    pub fn record_forwarded(&self, outcomes: &[(i64, Outcome)]) -> Result<(), IndexError> {
        let now = unix_now();
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        for (id, outcome) in outcomes {
            match outcome {
                Outcome::Delivered { status } => tx
                    .prepare_cached(
                        "UPDATE forward SET state = CASE WHEN commit_wanted THEN 'sent'
                             ELSE 'done' END, status = ?2, reason = '', updated = ?3
                         WHERE id = ?1 AND state = 'queued'",
                    )?
                    .execute(params![id, status, now])?,
                Outcome::Failed { status, reason } => tx
                    .prepare_cached(
                        "UPDATE forward SET state = 'failed', attempts = attempts + 1,
                             status = ?2, reason = ?3, updated = ?4
                         WHERE id = ?1 AND state = 'queued'",
                    )?
                    .execute(params![id, status, reason, now])?,
                Outcome::Retry { status, reason } => tx
                    .prepare_cached(
                        "UPDATE forward SET attempts = attempts + 1, status = ?2, reason = ?3,
                             updated = ?4
                         WHERE id = ?1 AND state = 'queued'",
                    )?
                    .execute(params![id, status, reason, now])?,
            };
        }
        tx.commit()?;
        Ok(())
    }

    /// Every destination that has entries, with its counts, by name.
    pub fn queue_counts(&self) -> Result<Vec<DestinationCounts>, IndexError> {
        let reader = self.reader()?;
        let mut statement = reader.prepare_cached(
            "SELECT destination,
                    sum(state = 'queued'), sum(state = 'sent'), sum(state = 'done'),
                    sum(state = 'failed'),
                    min(CASE WHEN state IN ('queued', 'sent') THEN queued END)
             FROM forward GROUP BY destination ORDER BY destination",
        )?;
        let rows = statement.query_map([], |r| {
            Ok(DestinationCounts {
                destination: r.get(0)?,
                queued: r.get::<_, i64>(1)? as u64,
                sent: r.get::<_, i64>(2)? as u64,
                done: r.get::<_, i64>(3)? as u64,
                failed: r.get::<_, i64>(4)? as u64,
                oldest_undelivered: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The destinations that have entries waiting to be sent (a worker is
    /// needed for each, whether or not a rule still names it).
    pub fn destinations_waiting(&self) -> Result<Vec<String>, IndexError> {
        let reader = self.reader()?;
        let mut statement = reader.prepare_cached(
            "SELECT DISTINCT destination FROM forward WHERE state IN ('queued', 'sent')",
        )?;
        let rows = statement.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Queue entries, oldest first, at most `limit`, of one destination
    /// and one state when given.
    pub fn queue_entries(
        &self,
        destination: Option<&str>,
        state: Option<State>,
        limit: usize,
    ) -> Result<Vec<Entry>, IndexError> {
        let reader = self.reader()?;
        let mut statement = reader.prepare_cached(
            "SELECT f.id, f.destination, f.state, f.attempts, f.status, f.reason, f.queued,
                    f.updated, i.sop_instance_uid, i.sop_class_uid, st.study_instance_uid, i.path
             FROM forward f JOIN instance i ON i.id = f.instance
             JOIN series se ON se.id = i.series JOIN study st ON st.id = se.study
             WHERE (?1 IS NULL OR f.destination = ?1) AND (?2 IS NULL OR f.state = ?2)
             ORDER BY f.id LIMIT ?3",
        )?;
        let time = |t: i64| {
            crate::timestamp::rfc3339(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64),
            )
        };
        let rows = statement.query_map(
            params![destination, state.map(State::as_str), limit as i64],
            |r| {
                Ok(Entry {
                    id: r.get(0)?,
                    destination: r.get(1)?,
                    state: r.get(2)?,
                    attempts: r.get(3)?,
                    status: r.get::<_, Option<u16>>(4)?.map(|s| format!("{s:04X}")),
                    reason: r.get(5)?,
                    queued: time(r.get(6)?),
                    updated: time(r.get(7)?),
                    sop_instance_uid: r.get(8)?,
                    sop_class_uid: r.get(9)?,
                    study_instance_uid: r.get(10)?,
                    path: r.get(11)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Puts failed entries back in the queue (one, or all of a
    /// destination); returns how many.
    pub fn queue_retry(&self, selection: &Selection) -> Result<usize, IndexError> {
        let now = unix_now();
        let n = match selection {
            Selection::Entry(id) => self.lock().execute(
                "UPDATE forward SET state = 'queued', attempts = 0, updated = ?2
                 WHERE id = ?1 AND state = 'failed'",
                params![id, now],
            )?,
            Selection::Destination(ae) => self.lock().execute(
                "UPDATE forward SET state = 'queued', attempts = 0, updated = ?2
                 WHERE destination = ?1 AND state = 'failed'",
                params![ae, now],
            )?,
        };
        if n > 0 {
            self.queue_changed.notify_waiters();
        }
        Ok(n)
    }

    /// Removes one entry from the queue, whatever its state (the operator
    /// gives up on delivering it; retention no longer waits for it).
    /// Returns whether there was one.
    pub fn queue_forget(&self, id: i64) -> Result<bool, IndexError> {
        let n = self
            .lock()
            .execute("DELETE FROM forward WHERE id = ?1", params![id])?;
        Ok(n > 0)
    }

    /// The destination of entry `id`, if there is one.
    pub fn queue_destination_of(&self, id: i64) -> Result<Option<String>, IndexError> {
        let reader = self.reader()?;
        Ok(reader
            .query_row("SELECT destination FROM forward WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Entry;

    fn attributes(n: u32, study: u32, modality: &str, source_ae: &str) -> Attributes {
        Attributes {
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: format!("1.2.3.{study}.{n}"),
            study_instance_uid: format!("1.2.3.{study}"),
            series_instance_uid: format!("1.2.3.{study}.0"),
            patient_id: "P1".into(),
            modality: modality.into(),
            source_ae: source_ae.into(),
            ..Attributes::default()
        }
    }

    fn store(index: &Index, n: u32, study: u32, modality: &str, source_ae: &str) {
        let a = attributes(n, study, modality, source_ae);
        let path = format!("CT.{study}.{n}");
        index
            .insert(&Entry {
                path: &path,
                size: 100,
                received: i64::from(n),
                attributes: &a,
            })
            .expect("inserts");
    }

    fn rule(destination: &str, calling: &[&str], modality: &[&str]) -> Rule {
        Rule {
            destination: destination.into(),
            calling: calling.iter().map(|s| s.to_string()).collect(),
            modality: modality.iter().map(|s| s.to_string()).collect(),
            commit: false,
        }
    }

    #[test]
    fn matching_objects_are_queued_with_their_row_and_taken_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        index.set_forward_rules(vec![
            rule("PACS", &[], &[]),
            rule("US_ARCHIVE", &["US1"], &["US"]),
        ]);
        store(&index, 1, 1, "CT", "CT1");
        store(&index, 2, 1, "US", "US1");
        store(&index, 3, 1, "US", "US2");
        let pacs = index.next_to_forward("PACS", 10).expect("reads");
        assert_eq!(
            pacs.iter()
                .map(|p| p.sop_instance.as_str())
                .collect::<Vec<_>>(),
            ["1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"]
        );
        let us = index.next_to_forward("US_ARCHIVE", 10).expect("reads");
        assert_eq!(us.len(), 1, "only US from US1: {us:?}");
        assert_eq!(us[0].sop_instance, "1.2.3.1.2");
        assert_eq!(index.next_to_forward("PACS", 2).expect("reads").len(), 2);
    }

    #[test]
    fn outcomes_move_entries_and_operators_retry_and_forget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        let mut committed = rule("PACS", &[], &[]);
        committed.commit = true;
        index.set_forward_rules(vec![rule("A", &[], &[]), committed]);
        for n in 1..=3 {
            store(&index, n, 1, "CT", "CT1");
        }
        let a = index.next_to_forward("A", 10).expect("reads");
        let why = "no".to_string();
        index
            .record_forwarded(&[
                (a[0].id, Outcome::Delivered { status: 0 }),
                (
                    a[1].id,
                    Outcome::Failed {
                        status: Some(0x0122),
                        reason: why.clone(),
                    },
                ),
                (
                    a[2].id,
                    Outcome::Retry {
                        status: None,
                        reason: why,
                    },
                ),
            ])
            .expect("records");
        let left = index.next_to_forward("A", 10).expect("reads");
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].id, left[0].attempts), (a[2].id, 1));
        let pacs = index.next_to_forward("PACS", 10).expect("reads");
        index
            .record_forwarded(&[(pacs[0].id, Outcome::Delivered { status: 0 })])
            .expect("records");
        let counts = index.queue_counts().expect("counts");
        let of = |d: &str| counts.iter().find(|c| c.destination == d).cloned();
        let a_counts = of("A").expect("A");
        assert_eq!(
            (
                a_counts.queued,
                a_counts.sent,
                a_counts.done,
                a_counts.failed
            ),
            (1, 0, 1, 1)
        );
        // A delivered entry of a rule that asks for commitment waits as `sent`.
        let pacs_counts = of("PACS").expect("PACS");
        assert_eq!((pacs_counts.queued, pacs_counts.sent), (2, 1));
        assert!(pacs_counts.oldest_undelivered.is_some());

        assert_eq!(
            index
                .queue_retry(&Selection::Destination("A".into()))
                .expect("retries"),
            1
        );
        assert_eq!(index.next_to_forward("A", 10).expect("reads").len(), 2);
        assert_eq!(
            index
                .queue_retry(&Selection::Entry(a[1].id))
                .expect("retries"),
            0,
            "only failed entries are retried"
        );
        assert!(index.queue_forget(a[1].id).expect("forgets"));
        assert!(!index.queue_forget(a[1].id).expect("forgets"));
        let failed = index
            .queue_entries(Some("A"), Some(State::Failed), 10)
            .expect("lists");
        assert!(failed.is_empty());
        let all = index.queue_entries(None, None, 10).expect("lists");
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].study_instance_uid, "1.2.3.1");
    }

    #[test]
    fn an_object_stored_again_under_its_name_is_queued_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.sqlite")).expect("opens");
        index.set_forward_rules(vec![rule("A", &[], &[])]);
        store(&index, 1, 1, "CT", "CT1");
        let a = index.next_to_forward("A", 10).expect("reads");
        index
            .record_forwarded(&[(a[0].id, Outcome::Delivered { status: 0 })])
            .expect("records");
        assert!(index.next_to_forward("A", 10).expect("reads").is_empty());
        store(&index, 1, 1, "CT", "CT1");
        assert_eq!(index.next_to_forward("A", 10).expect("reads").len(), 1);
    }

    #[test]
    fn a_version_1_index_is_migrated_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("index.sqlite");
        {
            let conn = rusqlite::Connection::open(&path).expect("opens");
            let v1 = crate::index::schema::CREATE
                .replace(",\n    source_ae TEXT NOT NULL DEFAULT ''", "");
            conn.execute_batch(&v1).expect("v1 schema");
            conn.execute_batch(
                "INSERT INTO patient VALUES (1, 'P1', '', '', '');
                 INSERT INTO study VALUES (1, 1, '1.2.3', '', '', '', '', '', '');
                 INSERT INTO series VALUES (1, 1, '1.2.3.0', 'CT', NULL, '', '', '');
                 INSERT INTO instance VALUES (1, 1, '1.2.3.0.1', '1.2', NULL, 'CT.1', '1.2.840.10008.1.2.1', 5, 0);
                 PRAGMA user_version = 1;",
            )
            .expect("v1 rows");
        }
        let index = Index::open(&path).expect("migrates");
        assert_eq!(index.instance_count().expect("counts"), 1);
        index.set_forward_rules(vec![rule("A", &[], &[])]);
        store(&index, 2, 3, "CT", "CT1");
        assert_eq!(index.next_to_forward("A", 10).expect("reads").len(), 1);
    }
}
