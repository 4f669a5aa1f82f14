//! Retention: deleting whole studies so that the card never fills, and
//! never a study with anything not yet delivered.
//!
//! Off unless `[retention]` is set. Four times a second, and at once when
//! an object begins or grows while free space is short (the store checks
//! it then anyway, for its reserve), the store's free space is
//! read (one statvfs); below `keep_free_percent`, studies are deleted least
//! recently received first until it is above again, and with
//! `max_age_days`, every study last received longer ago than that. What
//! may be deleted is the index's to say ([`crate::index::retention`]):
//! with `[[forward]]` rules, only studies whose every object is delivered
//! (and committed, where asked) to every destination that matched it.
//! When nothing may be deleted, nothing is: the store's free-space reserve
//! then refuses new objects with A700, as without retention, and the
//! status line says why.
//!
//! A study's files go first, then its rows, each deletion with an audit
//! line; a crash in between leaves rows without files, which the next
//! start's catch-up drops.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::RetentionConfig;
use crate::index::retention::Candidate;
use crate::index::Index;
use crate::logs::{Audit, DeletionRecord};
use crate::store::Store;

/// How often free space is looked at (one statvfs; the index is read only
/// when space is short): often enough that a sender streaming at disk
/// speed fills little of the margin between `keep_free_percent` and the
/// reserve before room is made.
const TICK: Duration = Duration::from_millis(250);
/// Candidates read per query.
const CANDIDATES: usize = 32;

/// Whether retention needs the queue to move: set while free space is
/// short and nothing may be deleted because everything waits for
/// forwarding. The forwarder's workers then pause at most [`URGENT_PAUSE`]
/// between attempts instead of up to five minutes, and are woken when it
/// is set, so that a destination that comes back is found within seconds
/// while the store refuses objects.
#[derive(Default)]
pub struct RoomWanted {
    wanted: std::sync::atomic::AtomicBool,
    changed: tokio::sync::Notify,
}

/// The longest pause between a forward worker's attempts while
/// [`RoomWanted`] is set.
pub const URGENT_PAUSE: Duration = Duration::from_secs(5);

impl RoomWanted {
    /// Whether room is wanted now.
    pub fn is_wanted(&self) -> bool {
        self.wanted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Signalled when room becomes wanted.
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    fn set(&self, wanted: bool) {
        let was = self
            .wanted
            .swap(wanted, std::sync::atomic::Ordering::Relaxed);
        if wanted && !was {
            self.changed.notify_waiters();
        }
    }
}

/// Retention for one store.
pub struct Retention {
    index: Arc<Index>,
    store: Arc<Store>,
    audit: Option<Arc<Audit>>,
    policy: Mutex<Option<RetentionConfig>>,
    /// why the last sweep could not make room, for the status line
    blocked: Mutex<Option<String>>,
    /// told whether the queue must move for room to be made
    room: Arc<RoomWanted>,
}

impl Retention {
    /// Retention over `store` and its `index`, with `policy` (None: off).
    pub fn new(
        index: Arc<Index>,
        store: Arc<Store>,
        audit: Option<Arc<Audit>>,
        policy: Option<RetentionConfig>,
        room: Arc<RoomWanted>,
    ) -> Retention {
        store.watch_free_space(policy.as_ref().map_or(0, |p| p.keep_free_percent));
        Retention {
            index,
            store,
            audit,
            policy: Mutex::new(policy),
            blocked: Mutex::default(),
            room,
        }
    }

    /// Takes a new policy (a live configuration change).
    pub fn set_policy(&self, policy: Option<RetentionConfig>) {
        self.store
            .watch_free_space(policy.as_ref().map_or(0, |p| p.keep_free_percent));
        *self.policy.lock().unwrap_or_else(PoisonError::into_inner) = policy;
    }

    /// A clause for the status line when retention cannot make room.
    pub fn status_suffix(&self) -> String {
        self.blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|why| format!("; retention: {why}"))
            .unwrap_or_default()
    }

    /// Deletes what the policy says should go now. Blocking (SQLite,
    /// unlink): call it on a blocking thread.
    pub fn sweep(&self) {
        let policy = self
            .policy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(policy) = policy else {
            self.set_blocked(None);
            return;
        };
        if let Some(days) = policy.max_age_days {
            let before = crate::index::queue::unix_now() - i64::from(days) * 86_400;
            let reason = format!("received over {days} days ago");
            loop {
                match self.index.retention_candidates(Some(before), CANDIDATES) {
                    Ok(candidates) if candidates.is_empty() => break,
                    Ok(candidates) => {
                        if self.delete_all(&candidates, &reason) == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "retention: the index cannot be read");
                        return;
                    }
                }
            }
        }
        let keep = f64::from(policy.keep_free_percent);
        let mut blocked = None;
        'room: while let Some(free) = self.free_percent() {
            if free >= keep {
                break;
            }
            let candidates = match self.index.retention_candidates(None, CANDIDATES) {
                Ok(candidates) => candidates,
                Err(e) => {
                    warn!(error = %e, "retention: the index cannot be read");
                    return;
                }
            };
            if candidates.is_empty() {
                blocked = Some(format!(
                    "free space {free:.1} % is below {keep} % and no study may be deleted: \
                     everything stored waits for forwarding (or nothing is stored)"
                ));
                break;
            }
            let mut deleted_any = false;
            for candidate in &candidates {
                let reason = format!("free space below {keep} %");
                if self.delete(candidate, &reason) {
                    deleted_any = true;
                }
                match self.free_percent() {
                    Some(now) if now < keep => {}
                    _ => break 'room,
                }
            }
            if !deleted_any {
                break;
            }
        }
        self.set_blocked(blocked);
    }

    fn set_blocked(&self, why: Option<String>) {
        let mut blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
        if why.is_some() && blocked.is_none() {
            warn!(
                reason = why.as_deref().unwrap_or(""),
                "retention cannot make room"
            );
        }
        self.room.set(why.is_some());
        *blocked = why;
    }

    fn free_percent(&self) -> Option<f64> {
        match self.store.free_space() {
            Ok((_, percent)) => Some(percent),
            Err(e) => {
                warn!(error = %e, "retention: free space unknown");
                None
            }
        }
    }

    /// Deletes each candidate; returns how many went.
    fn delete_all(&self, candidates: &[Candidate], reason: &str) -> usize {
        candidates.iter().filter(|c| self.delete(c, reason)).count()
    }

    /// Deletes one study, files first, if it may still be deleted.
    fn delete(&self, candidate: &Candidate, reason: &str) -> bool {
        let objects = match self.index.study_objects_if_deletable(candidate.id) {
            Ok(Some(objects)) => objects,
            Ok(None) => return false,
            Err(e) => {
                warn!(study = %candidate.study_instance_uid, error = %e, "retention: study not deleted");
                return false;
            }
        };
        let root = self.store.root();
        let mut gone = Vec::with_capacity(objects.len());
        let mut bytes = 0;
        for object in &objects {
            match root.remove_file(&object.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %object.path, error = %e, "retention: file not deleted; its row stays");
                    continue;
                }
            }
            remove_empty_parents(root, &object.path);
            bytes += object.size;
            gone.push(object.id);
        }
        if let Err(e) = self.index.forget_instances(&gone) {
            // The files are gone: the next start's catch-up drops the rows.
            warn!(study = %candidate.study_instance_uid, error = %e,
                "retention: files deleted, rows left for the next start");
        }
        info!(study = %candidate.study_instance_uid, patient = %candidate.patient_id,
            objects = gone.len(), bytes, reason, "retention deleted a study");
        if let Some(audit) = &self.audit {
            audit.deletion(&DeletionRecord {
                time: SystemTime::now(),
                study_instance_uid: &candidate.study_instance_uid,
                patient_id: &candidate.patient_id,
                objects: gone.len() as u64,
                bytes,
                last_received: SystemTime::UNIX_EPOCH
                    + Duration::from_secs(candidate.last_received.max(0) as u64),
                reason,
            });
        }
        !gone.is_empty()
    }
}

/// Removes the folders a deleted file leaves empty (the study layout's
/// series and study folders), up to the store's root.
fn remove_empty_parents(root: &crate::dirfd::Folder, path: &str) {
    let mut parent = std::path::Path::new(path).parent();
    while let Some(dir) = parent.filter(|p| !p.as_os_str().is_empty()) {
        if root.remove_dir(dir).is_err() {
            // not empty (or not ours to remove): the folders above are not
            // empty either
            return;
        }
        parent = dir.parent();
    }
}

/// Sweeps every [`TICK`] until `stop`.
pub async fn run(retention: Arc<Retention>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The store's signal wakes a sweep at once, unless the last one
        // found nothing it may delete: then the next tick is soon enough
        // (each new object would otherwise cost a look at every study).
        let blocked = retention
            .blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = retention.store.low_space().notified(), if !blocked => {}
        }
        let sweeper = Arc::clone(&retention);
        if tokio::task::spawn_blocking(move || sweeper.sweep())
            .await
            .is_err()
        {
            warn!("retention sweep did not finish");
        }
    }
}
