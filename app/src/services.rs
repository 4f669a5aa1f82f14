//! The DIMSE services minipacs performs: the application's side of the
//! `dimse` crate's [`Service`] and [`Observer`] traits.
//!
//! The protocol crate knows nothing of disks or logs; here a C-STORE
//! becomes an object in the [`Store`], a C-FIND a query over the index
//! ([`crate::index::query`]), and every answered message becomes an audit
//! record, a log line, counters and a blink of the activity LED.
//! The fsync decision for the audit trail before a release lives here too:
//! it follows the store's durability setting.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dimse::command::status;
use dimse::scp::{
    ActionAnswer, ActionRequest, AssociationInfo, EventReportRequest, Failure, FindOutcome,
    FindRequest, IncomingObject, Matches, MoveRetrieval, ObjectOutcome, Observer, Retrieval,
    RetrieveOperation, RetrieveOutcome, RetrieveRequest, Service, StoreRequest,
    SubOperationOutcome, SubOperationResult,
};
use dimse::uid::Uid;
use tracing::{info, warn};

use crate::index::query::{self, Model, Stopped};
use crate::index::writer::Recorder;
use crate::logs::{Audit, FindRecord, ObjectRecord, RetrieveRecord};
use crate::service::ActivityLed;
use crate::store::{Incoming, ObjectInfo, Store};

/// Counters shared by all associations, for status reports.
#[derive(Debug, Default)]
pub struct Stats {
    /// associations open now
    pub active_associations: AtomicUsize,
    /// objects stored since start
    pub objects_stored: AtomicU64,
    /// objects refused or failed since start
    pub objects_failed: AtomicU64,
    /// data set bytes stored since start
    pub bytes_stored: AtomicU64,
    /// data set bytes received since start, counted as each fragment
    /// arrives (stored or not): the forwarder watches it to give way to
    /// receiving (see `crate::forward`), which holds this counter too
    pub bytes_received: Arc<AtomicU64>,
    /// the last failure, for status reports
    pub last_error: std::sync::Mutex<String>,
}

impl Stats {
    /// One line for systemd's STATUS and the log bundle.
    pub fn summary(&self) -> String {
        let last = self
            .last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        format!(
            "{} association(s); {} object(s) stored, {} failed{}",
            self.active_associations.load(Ordering::Relaxed),
            self.objects_stored.load(Ordering::Relaxed),
            self.objects_failed.load(Ordering::Relaxed),
            if last.is_empty() {
                String::new()
            } else {
                format!("; last error: {last}")
            }
        )
    }
}

/// Keeps the active-association counter right however an association ends.
pub struct ActiveGuard(Arc<Stats>);

impl ActiveGuard {
    /// Counts one more active association until dropped.
    pub fn new(stats: &Arc<Stats>) -> Self {
        stats.active_associations.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(stats))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active_associations.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every association of the receiver shares: the store, the
/// counters, the audit trail and the LED. One per process, behind an `Arc`.
pub struct Receiver {
    /// where objects go
    pub store: Arc<Store>,
    /// counters
    pub stats: Arc<Stats>,
    /// the audit trail, when its folder could be opened
    pub audit: Option<Arc<Audit>>,
    /// the activity LED, when the board has one
    pub led: Option<Arc<ActivityLed>>,
    /// the index of what is stored, when it could be opened
    pub index: Option<Arc<crate::index::Index>>,
    /// the index's writer thread, which records each committed object
    /// (with the index)
    pub recorder: Option<Arc<Recorder>>,
    /// the service's stop: a C-GET or C-MOVE in progress stops offering
    /// objects when it fires (an eviction, which stops one association,
    /// does not)
    pub stop: tokio_util::sync::CancellationToken,
    /// `max_find_results` (live): the most matches one C-FIND answers, 0
    /// for no limit
    pub max_find_results: AtomicUsize,
    /// the known DICOM nodes, C-MOVE's destinations (live)
    pub peers: Arc<crate::retrieve::Peers>,
    /// how long a C-MOVE's destination gets to answer each step
    pub dimse_timeout: std::time::Duration,
    /// storage commitment, both ways (with the index)
    pub commitments: Option<Arc<crate::commitment::Commitments>>,
}

impl Receiver {
    /// What a retrieve reads from, or why it cannot run.
    fn retrieve_source(&self) -> Result<crate::retrieve::Source, Failure> {
        let index = self
            .index
            .as_ref()
            .ok_or_else(|| Failure::new(status::UNABLE_TO_PROCESS, "the index is unavailable"))?;
        let root =
            self.store.root().try_clone().map_err(|e| {
                Failure::new(status::UNABLE_TO_PROCESS, format!("store folder: {e}"))
            })?;
        Ok(crate::retrieve::Source {
            index: Arc::clone(index),
            recorder: self.recorder.clone(),
            stop: self.stop.clone(),
            root: Arc::new(root),
        })
    }
}

/// Matches a C-FIND's query thread may be ahead of the network by.
const FIND_CHANNEL: usize = 4;

impl Service for Receiver {
    type Object = StoreObject;

    fn store(
        &self,
        association: &AssociationInfo,
        request: &StoreRequest<'_>,
    ) -> Result<StoreObject, Failure> {
        let info = ObjectInfo {
            sop_class: request.sop_class,
            sop_instance: request.sop_instance,
            transfer_syntax: request.transfer_syntax,
            calling_ae: &association.calling_ae,
            called_ae: &association.called_ae,
        };
        match self.store.begin(&info) {
            Ok(incoming) => Ok(StoreObject {
                incoming,
                stats: Arc::clone(&self.stats),
                sop_instance: request.sop_instance.clone(),
                recorder: self
                    .recorder
                    .as_ref()
                    .map(|recorder| (Arc::clone(recorder), Arc::clone(&self.store))),
            }),
            Err(e) => Err(Failure::new(status::OUT_OF_RESOURCES, e.to_string())),
        }
    }

    fn find(
        &self,
        association: &AssociationInfo,
        request: &FindRequest<'_>,
    ) -> Result<Matches, Failure> {
        let Some(index) = &self.index else {
            return Err(Failure::new(
                status::UNABLE_TO_PROCESS,
                "the index is unavailable",
            ));
        };
        let model = Model::of(request.sop_class.as_str()).ok_or_else(|| {
            Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                "not a FIND model we answer",
            )
        })?;
        let query = query::parse(model, request.transfer_syntax.as_str(), request.identifier)?;
        let (tx, rx) = tokio::sync::mpsc::channel(FIND_CHANNEL);
        let index = Arc::clone(index);
        let retrieve_ae = association.called_ae.clone();
        let limit = self.max_find_results.load(Ordering::Relaxed);
        let recorder = self.recorder.clone();
        // SQLite blocks: the query reads and sends from a blocking thread,
        // one row at a time, and stops when the receiver is dropped. It
        // first waits for the objects already acknowledged to be indexed.
        tokio::task::spawn_blocking(move || {
            if let Some(recorder) = recorder {
                recorder.settle();
            }
            let sent = query::run(&index, &query, &retrieve_ae, limit, |identifier| {
                tx.blocking_send(Ok(identifier))
                    .map_err(|_| Stopped::Cancelled)
            });
            if let Err(failure) = sent {
                let _ = tx.blocking_send(Err(failure));
            }
        });
        Ok(rx)
    }

    async fn get(
        &self,
        _association: &AssociationInfo,
        request: &RetrieveRequest<'_>,
    ) -> Result<Retrieval, Failure> {
        crate::retrieve::select(&self.retrieve_source()?, request).await
    }

    async fn move_(
        &self,
        association: &AssociationInfo,
        request: &RetrieveRequest<'_>,
    ) -> Result<MoveRetrieval, Failure> {
        crate::retrieve::prepare_move(
            &self.retrieve_source()?,
            &self.peers,
            association.called_ae.as_str(),
            self.dimse_timeout,
            request,
        )
        .await
    }

    async fn n_action(
        &self,
        association: &AssociationInfo,
        request: &ActionRequest<'_>,
    ) -> ActionAnswer {
        match &self.commitments {
            Some(commitments) => commitments.requested(association, request).await,
            None => ActionAnswer::failed(Failure::new(
                status::UNABLE_TO_PROCESS,
                "the index is unavailable",
            )),
        }
    }

    async fn n_event_report(
        &self,
        association: &AssociationInfo,
        request: &EventReportRequest<'_>,
    ) -> Result<u16, Failure> {
        match &self.commitments {
            Some(commitments) => commitments.reported(association, request).await,
            None => Err(Failure::new(
                status::UNABLE_TO_PROCESS,
                "the index is unavailable",
            )),
        }
    }
}

/// A C-STORE's data set on its way into the store.
pub struct StoreObject {
    incoming: Incoming,
    stats: Arc<Stats>,
    sop_instance: Uid,
    /// the index's writer to queue it to, and the store whose root its
    /// path is relative to
    recorder: Option<(Arc<Recorder>, Arc<Store>)>,
}

impl IncomingObject for StoreObject {
    type Receipt = PathBuf;

    fn write(&mut self, fragment: &[u8]) -> Result<(), Failure> {
        self.stats
            .bytes_received
            .fetch_add(fragment.len() as u64, Ordering::Relaxed);
        self.incoming.write(fragment).map_err(|e| {
            warn!(sop_instance = %self.sop_instance, error = %e, "write failed; object dropped");
            Failure::new(status::OUT_OF_RESOURCES, e.to_string())
        })
    }

    async fn commit(self) -> Result<PathBuf, Failure> {
        // fdatasync, rename and folder fsync block: on a blocking thread,
        // so that other associations keep their runtime thread. Once the
        // object is durable, it is queued to the index's writer and its
        // success goes out; a query waits for the writer (so a C-FIND
        // after the success finds it), and indexing's failure is not the
        // object's (see crate::index::writer).
        let (incoming, recorder) = (self.incoming, self.recorder);
        let committed = move || {
            let path = incoming.commit()?;
            if let Some((recorder, store)) = recorder {
                let root = store.options().root;
                match path.strip_prefix(&root).ok().and_then(|p| p.to_str()) {
                    Some(relative) => recorder.record(relative.to_string()),
                    None => {
                        warn!(path = %path.display(), "stored outside the store's root? not indexed")
                    }
                }
            }
            Ok::<_, crate::store::StoreError>(path)
        };
        match tokio::task::spawn_blocking(committed).await {
            Ok(Ok(path)) => Ok(path),
            Ok(Err(e)) => Err(Failure::new(status::OUT_OF_RESOURCES, e.to_string())),
            Err(e) => Err(Failure::new(
                status::OUT_OF_RESOURCES,
                format!("commit did not finish: {e}"),
            )),
        }
    }
}

/// What a C-FIND, C-MOVE or C-GET asked, for its record: the level and
/// the keys. The identifier is parsed once more only for this (it is
/// small); one that does not parse leaves both empty.
fn asked(sop_class: &Uid, transfer_syntax: &Uid, identifier: &[u8]) -> (&'static str, String) {
    let parsed = Model::of(sop_class.as_str())
        .and_then(|model| query::parse(model, transfer_syntax.as_str(), identifier).ok());
    (
        parsed.as_ref().map_or("", |q| q.level.as_str()),
        parsed
            .as_ref()
            .map(query::Query::summary)
            .unwrap_or_default(),
    )
}

impl Observer<PathBuf> for Receiver {
    fn retrieved(&self, association: &AssociationInfo, outcome: &RetrieveOutcome<'_>) {
        let (level, keys) = asked(
            outcome.sop_class,
            outcome.transfer_syntax,
            outcome.identifier,
        );
        let operation = match outcome.operation {
            RetrieveOperation::Get => "C-GET",
            RetrieveOperation::Move => "C-MOVE",
        };
        let destination = outcome.destination.map(|d| d.as_str());
        let counts = &outcome.counts;
        let count = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let ms = outcome.elapsed.as_secs_f64() * 1000.0;
        // A B000 has no comment: its first failed sub-operation says why.
        let why = outcome.comment.or(outcome.first_failure);
        if let Some(audit) = &self.audit {
            audit.retrieve(&RetrieveRecord {
                time: std::time::SystemTime::now(),
                peer: association.peer,
                calling_ae: &association.calling_ae,
                operation,
                sop_class_uid: outcome.sop_class.as_str(),
                level,
                keys: &keys,
                destination,
                completed: count(counts.completed),
                failed: count(counts.failed),
                warning: count(counts.warning),
                remaining: count(counts.remaining),
                status: outcome.status,
                reason: why,
                milliseconds: ms as u64,
            });
        }
        let reason = why.unwrap_or("");
        macro_rules! retrieve_line {
            ($level:ident, $message:literal) => {
                $level!(
                    peer = %association.peer,
                    calling = %association.calling_ae,
                    operation,
                    destination = destination.unwrap_or(""),
                    level,
                    keys = %keys,
                    completed = counts.completed,
                    failed = counts.failed,
                    warning = counts.warning,
                    remaining = counts.remaining,
                    ms = format_args!("{ms:.1}"),
                    status = format_args!("{:04X}", outcome.status),
                    reason,
                    $message
                )
            };
        }
        if outcome.status == status::SUCCESS || outcome.status == status::CANCEL {
            retrieve_line!(info, "retrieve");
        } else {
            retrieve_line!(warn, "retrieve failed or incomplete");
        }
    }

    fn sub_operation(&self, association: &AssociationInfo, outcome: &SubOperationOutcome<'_>) {
        // A refused object gets its own line with the destination's words:
        // the usual cause is a SOP class or transfer syntax it does not take
        // (nothing is transcoded).
        if outcome.result == SubOperationResult::Failed {
            warn!(
                peer = %association.peer,
                calling = %association.calling_ae,
                destination = outcome.destination.map_or("", |d| d.as_str()),
                sop_class = %outcome.sop_class.map_or("", |u| u.as_str()),
                sop_instance = %outcome.sop_instance.map_or("", |u| u.as_str()),
                status = format_args!("{:04X}", outcome.status),
                reason = outcome.comment.unwrap_or(""),
                "retrieve sub-operation failed"
            );
        }
    }

    fn found(&self, association: &AssociationInfo, outcome: &FindOutcome<'_>) {
        let (level, keys) = asked(
            outcome.sop_class,
            outcome.transfer_syntax,
            outcome.identifier,
        );
        let ms = outcome.elapsed.as_secs_f64() * 1000.0;
        if let Some(audit) = &self.audit {
            audit.find(&FindRecord {
                time: std::time::SystemTime::now(),
                peer: association.peer,
                calling_ae: &association.calling_ae,
                sop_class_uid: outcome.sop_class.as_str(),
                level,
                keys: &keys,
                matches: outcome.matches,
                status: outcome.status,
                reason: outcome.comment,
                milliseconds: ms as u64,
            });
        }
        let reason = outcome.comment.unwrap_or("");
        macro_rules! find_line {
            ($level:ident, $message:literal) => {
                $level!(
                    peer = %association.peer,
                    calling = %association.calling_ae,
                    sop_class = %outcome.sop_class,
                    level,
                    keys = %keys,
                    matches = outcome.matches,
                    ms = format_args!("{ms:.1}"),
                    status = format_args!("{:04X}", outcome.status),
                    reason,
                    $message
                )
            };
        }
        if outcome.status == status::SUCCESS || outcome.status == status::CANCEL {
            find_line!(info, "C-FIND");
        } else {
            find_line!(warn, "C-FIND failed");
        }
    }

    fn echoed(&self, association: &AssociationInfo, status: u16) {
        info!(peer = %association.peer, calling = %association.calling_ae,
            status = format_args!("{status:04X}"), "C-ECHO");
    }

    fn object(&self, association: &AssociationInfo, outcome: &ObjectOutcome<'_, PathBuf>) {
        let path = outcome.result.ok();
        let reason = outcome.result.err().map_or("", |f| f.comment.as_str());
        let ms = outcome.elapsed.as_secs_f64() * 1000.0;
        if let Some(audit) = &self.audit {
            audit.object(&ObjectRecord {
                time: std::time::SystemTime::now(),
                peer: association.peer,
                calling_ae: &association.calling_ae,
                sop_class_uid: outcome.sop_class.as_str(),
                sop_instance_uid: outcome.sop_instance.as_str(),
                bytes: outcome.bytes,
                status: outcome.status,
                milliseconds: ms as u64,
                stored_path: path.map(|p| p.as_path()),
            });
        }
        // One line per object: the same fields whatever the outcome, at
        // info level when stored and warn level when not.
        macro_rules! object_line {
            ($level:ident, $message:literal) => {
                $level!(
                    peer = %association.peer,
                    calling = %association.calling_ae,
                    sop_class = %outcome.sop_class,
                    sop_instance = %outcome.sop_instance,
                    bytes = outcome.bytes,
                    ms = format_args!("{ms:.1}"),
                    status = format_args!("{:04X}", outcome.status),
                    path = %path.map(|p| p.display().to_string()).unwrap_or_default(),
                    reason,
                    $message
                )
            };
        }
        let stats = &self.stats;
        if path.is_some() {
            if let Some(led) = &self.led {
                led.blink();
            }
            stats.objects_stored.fetch_add(1, Ordering::Relaxed);
            stats
                .bytes_stored
                .fetch_add(outcome.bytes, Ordering::Relaxed);
            object_line!(info, "C-STORE");
        } else {
            stats.objects_failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = stats.last_error.lock() {
                *last = format!("{:04X} {reason}", outcome.status);
            }
            object_line!(warn, "C-STORE failed");
        }
    }

    async fn releasing(&self) {
        // The records of objects the sender was told are stored must
        // survive a power cut right after the release: when the store is
        // durable, so is its audit trail (one sync per association). And
        // once a sender has its release, the index holds what it sent,
        // for whoever reads the index next, not only for queries (which
        // wait for the writer themselves).
        let audit = self
            .audit
            .as_ref()
            .filter(|_| self.store.options().fsync)
            .map(Arc::clone);
        // (Nothing pending now means everything this sender stored is in.)
        let recorder = self.recorder.clone().filter(|r| r.pending() > 0);
        if audit.is_none() && recorder.is_none() {
            return;
        }
        let finish = move || {
            if let Some(recorder) = recorder {
                recorder.settle();
            }
            if let Some(audit) = audit {
                audit.sync();
            }
        };
        if let Err(e) = tokio::task::spawn_blocking(finish).await {
            warn!(error = %e, "audit trail sync or index settle did not finish");
        }
    }
}
