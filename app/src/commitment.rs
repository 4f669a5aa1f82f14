//! Storage commitment (Storage Commitment Push Model, PS3.4 Annex J), the
//! application's side, both ways.
//!
//! As SCP: a modality's N-ACTION names instances it sent us. The request is
//! kept in the index first (so that a restart does not lose it), then
//! answered at once; the result (what the index holds, SOP class included,
//! each row recorded only once its file was durable) goes back as an
//! N-EVENT-REPORT on the same association right after the N-ACTION-RSP.
//! When the requester does not take it there (it released, or does not
//! answer), [`deliver_reports`] sends it on an association we open to the
//! requester's `[[peer]]` entry, and tries again with a growing pause until
//! it is delivered.
//!
//! As SCU: the forwarder asks a destination about objects a `commit = true`
//! rule delivered ([`ask`]); its N-EVENT-REPORT, on the forwarder's
//! association or on one the destination opens to our port ([`reported`]),
//! settles them in the queue as committed or failed, each with an audit
//! line.
//!
//! The protocol (commands, data sets, roles) is the `dimse` crate's; here
//! is only what to answer and where to keep it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use dimse::commitment::{
    failure_reason, CommitmentRequest, CommitmentResult, Reference, Syntax,
    ACTION_REQUEST_COMMITMENT,
};
use dimse::scp::{
    ActionAnswer, ActionRequest, AssociationInfo, EventReport, EventReportRequest, Failure,
    ReportDelivery,
};
use dimse::scu::{RoleProposal, ScuAssociation, ScuOptions};
use dimse::uid::{self, Uid};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::index::commitment as rows;
use crate::index::writer::Recorder;
use crate::index::Index;
use crate::logs::{Audit, ForwardRecord};
use crate::retrieve::Peers;

/// Processing failure (PS3.7 C.4.2): the N-ACTION could not be taken.
const PROCESSING_FAILURE: u16 = 0x0110;
/// How often [`deliver_reports`] looks for reports to send although
/// nothing woke it.
const POLL: Duration = Duration::from_secs(5);

/// What storage commitment needs, shared by the services (N-ACTION,
/// N-EVENT-REPORT), the forwarder and the report deliverer.
pub struct Commitments {
    index: Arc<Index>,
    recorder: Option<Arc<Recorder>>,
    peers: Arc<Peers>,
    audit: Option<Arc<Audit>>,
    /// our AE title and how long a peer gets for each step (live)
    calling: Mutex<(String, Duration)>,
    /// reports being offered on their request's own association: the
    /// deliverer leaves them alone until that has ended
    on_their_association: Mutex<HashSet<i64>>,
    /// wakes the deliverer
    wake: tokio::sync::Notify,
}

impl Commitments {
    /// Storage commitment over `index` (waiting for `recorder` before it
    /// answers what it holds), reporting to `peers`.
    pub fn new(
        index: Arc<Index>,
        recorder: Option<Arc<Recorder>>,
        peers: Arc<Peers>,
        audit: Option<Arc<Audit>>,
        calling_ae: String,
        timeout: Duration,
    ) -> Commitments {
        Commitments {
            index,
            recorder,
            peers,
            audit,
            calling: Mutex::new((calling_ae, timeout)),
            on_their_association: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Takes our AE title and the DIMSE timeout (a live change).
    pub fn set_calling(&self, calling_ae: String, timeout: Duration) {
        *self.calling.lock().unwrap_or_else(PoisonError::into_inner) = (calling_ae, timeout);
    }

    fn calling(&self) -> (String, Duration) {
        self.calling
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An N-ACTION "request storage commitment" (we are the SCP): kept,
    /// answered, and its report offered on the same association.
    pub async fn requested(
        self: &Arc<Self>,
        association: &AssociationInfo,
        request: &ActionRequest<'_>,
    ) -> ActionAnswer {
        if request.action_type_id != ACTION_REQUEST_COMMITMENT {
            return ActionAnswer::failed(Failure::new(0x0123, "no such action type"));
        }
        let Some(syntax) = Syntax::of(request.transfer_syntax.as_str()) else {
            return ActionAnswer::failed(Failure::new(
                PROCESSING_FAILURE,
                "storage commitment in an unexpected transfer syntax",
            ));
        };
        let asked = match CommitmentRequest::decode(request.data_set, syntax) {
            Ok(asked) => asked,
            Err(e) => {
                warn!(peer = %association.peer, calling = %association.calling_ae, error = %e,
                    "storage commitment request not understood");
                return ActionAnswer::failed(Failure::new(PROCESSING_FAILURE, e.to_string()));
            }
        };
        let requester = association.calling_ae.clone();
        let this = Arc::clone(self);
        let references: Vec<rows::Reference> = asked.references.iter().map(row_of).collect();
        let transaction = asked.transaction_uid.to_string();
        let kept = tokio::task::spawn_blocking(move || {
            // Objects acknowledged before the request are in the index.
            if let Some(recorder) = &this.recorder {
                recorder.settle();
            }
            let id = this
                .index
                .commitment_received(&requester, &transaction, &references)?;
            let result = result_of(&this.index, &transaction, &references)?;
            Ok::<_, crate::index::IndexError>((id, result))
        })
        .await;
        let (id, result) = match kept {
            Ok(Ok(kept)) => kept,
            Ok(Err(e)) => {
                warn!(error = %e, "storage commitment request not kept: refused");
                return ActionAnswer::failed(Failure::new(PROCESSING_FAILURE, e.to_string()));
            }
            Err(e) => {
                return ActionAnswer::failed(Failure::new(PROCESSING_FAILURE, e.to_string()));
            }
        };
        info!(peer = %association.peer, calling = %association.calling_ae,
            transaction = %asked.transaction_uid, asked = asked.references.len(),
            committed = result.committed.len(), failed = result.failed.len(),
            "storage commitment requested");
        self.on_their_association
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = Arc::clone(self);
        let requester = association.calling_ae.clone();
        tokio::spawn(async move {
            let delivery = rx.await.unwrap_or(ReportDelivery::NotDelivered {
                reason: "the association ended first".into(),
            });
            this.settle_offer(id, &requester, delivery).await;
        });
        let report = EventReport {
            sop_class: commitment_class(),
            sop_instance: commitment_instance(),
            event_type_id: result.event_type(),
            data_set: result.encode(syntax),
            delivery: Some(tx),
        };
        ActionAnswer::success(Some(report))
    }

    /// How the offer on the request's own association ended.
    async fn settle_offer(&self, id: i64, requester: &str, delivery: ReportDelivery) {
        match delivery {
            ReportDelivery::Delivered { status, .. }
                if status == 0 || status & 0xF000 == 0xB000 =>
            {
                let index = Arc::clone(&self.index);
                let _ = tokio::task::spawn_blocking(move || index.report_delivered(id)).await;
                info!(
                    requester,
                    "storage commitment report delivered on the request's association"
                );
            }
            ReportDelivery::Delivered { status, comment } => {
                warn!(requester, status = format_args!("{status:04X}"),
                    reason = comment.as_deref().unwrap_or(""),
                    "storage commitment report refused on the request's association; sent again on a new one");
            }
            ReportDelivery::NotDelivered { reason } => {
                info!(requester, reason,
                    "storage commitment report not taken on the request's association; sending it on a new one");
            }
        }
        self.on_their_association
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        self.wake.notify_one();
    }

    /// An N-EVENT-REPORT: a destination's answer to a commitment we asked
    /// for. Settles the queue entries it names.
    pub async fn reported(
        &self,
        association: &AssociationInfo,
        request: &EventReportRequest<'_>,
    ) -> Result<u16, Failure> {
        let syntax = Syntax::of(request.transfer_syntax.as_str()).ok_or_else(|| {
            Failure::new(
                PROCESSING_FAILURE,
                "storage commitment in an unexpected transfer syntax",
            )
        })?;
        let result = CommitmentResult::decode(request.data_set, syntax)
            .map_err(|e| Failure::new(PROCESSING_FAILURE, e.to_string()))?;
        info!(peer = %association.peer, calling = %association.calling_ae,
            transaction = %result.transaction_uid, committed = result.committed.len(),
            failed = result.failed.len(), "storage commitment report");
        let index = Arc::clone(&self.index);
        let audit = self.audit.clone();
        tokio::task::spawn_blocking(move || settle(&index, audit.as_deref(), &result))
            .await
            .map_err(|e| Failure::new(PROCESSING_FAILURE, e.to_string()))?
            .map_err(|e| Failure::new(PROCESSING_FAILURE, e.to_string()))?;
        Ok(0)
    }
}

/// What we answer for a request: each reference committed when the
/// index holds it (SOP class included), failed otherwise. Blocking.
fn result_of(
    index: &Index,
    transaction: &str,
    references: &[rows::Reference],
) -> Result<CommitmentResult, crate::index::IndexError> {
    let (held, missing) = index.committed(references)?;
    let transaction_uid = Uid::new(transaction)
        .ok_or_else(|| crate::index::IndexError::Unusable("a kept Transaction UID".into()))?;
    Ok(CommitmentResult {
        transaction_uid,
        committed: held.iter().filter_map(reference_of).collect(),
        failed: missing
            .iter()
            .filter_map(reference_of)
            .map(|r| (r, failure_reason::NO_SUCH_OBJECT_INSTANCE))
            .collect(),
    })
}

/// Records a destination's report: its entries done or failed, an audit
/// line each. Blocking.
fn settle(
    index: &Index,
    audit: Option<&Audit>,
    result: &CommitmentResult,
) -> Result<(), crate::index::IndexError> {
    let committed: Vec<rows::Reference> = result.committed.iter().map(row_of).collect();
    let failed: Vec<(rows::Reference, u16)> = result
        .failed
        .iter()
        .map(|(r, why)| (row_of(r), *why))
        .collect();
    let settled =
        index.commitment_reported(result.transaction_uid.as_str(), &committed, &failed)?;
    if settled.is_empty() {
        warn!(transaction = %result.transaction_uid,
            "storage commitment report for no entry waiting (answered already, or not ours)");
    }
    for entry in &settled {
        let reason = entry
            .failure
            .map(|why| format!("storage commitment failed: reason {why:04X}"));
        if let Some(audit) = audit {
            audit.forward(&ForwardRecord {
                time: SystemTime::now(),
                destination: &entry.destination,
                outcome: if entry.failure.is_none() {
                    "committed"
                } else {
                    "failed"
                },
                sop_class_uid: &entry.reference.sop_class,
                sop_instance_uid: &entry.reference.sop_instance,
                path: &entry.path,
                status: entry.failure,
                reason: reason.as_deref(),
                attempts: 1,
            });
        }
    }
    Ok(())
}

/// What the forwarder asks a destination about, and how.
pub struct Asking {
    /// re-ask entries asked longer ago than this with no report (seconds)
    pub timeout_s: i64,
    /// ask only when at least this many entries wait (fewer are asked about
    /// with a later batch)
    pub at_least: usize,
    /// ask about at most this many in one request
    pub at_most: usize,
    /// how long to wait for the report on the same association
    pub wait: Duration,
}

/// The entries of `destination` waiting to be asked about (at most
/// `limit`). Blocking.
pub fn waiting(index: &Index, destination: &str, timeout_s: i64, limit: usize) -> usize {
    index
        .to_commit(destination, timeout_s, limit)
        .map_or(0, |e| e.len())
}

/// The forwarder's part (we are the SCU): asks `destination`, on its open
/// association, about the delivered objects waiting for commitment, then
/// waits for the report on the same association (a destination may
/// instead open one to our port). Returns how many it asked about, or why
/// it could not ask.
///
/// Index writes go to `service`'s blocking threads (the caller's runtime
/// may run at a low priority: see `crate::forward`).
pub async fn ask<S>(
    service: &tokio::runtime::Handle,
    index: &Arc<Index>,
    audit: Option<&Arc<Audit>>,
    association: &mut ScuAssociation<S>,
    destination: &str,
    how: &Asking,
) -> Result<usize, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let reader = Arc::clone(index);
    let to_ask = destination.to_string();
    let (timeout_s, limit) = (how.timeout_s, how.at_most);
    let entries = tokio::task::spawn_blocking(move || reader.to_commit(&to_ask, timeout_s, limit))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if entries.is_empty() || entries.len() < how.at_least {
        return Ok(0);
    }
    let (context, syntax) = commitment_context(association)
        .ok_or_else(|| format!("{destination} did not accept Storage Commitment Push Model"))?;
    let transaction_uid = new_uid();
    let request = CommitmentRequest {
        transaction_uid: transaction_uid.clone(),
        references: entries
            .iter()
            .filter_map(|e| reference_of(&e.reference))
            .collect(),
    };
    let (status, comment) = association
        .n_action(
            context,
            &commitment_class(),
            &commitment_instance(),
            ACTION_REQUEST_COMMITMENT,
            &request.encode(syntax),
        )
        .await
        .map_err(|e| e.to_string())?;
    if status != 0 {
        return Err(format!(
            "{destination} refused the storage commitment request: {status:04X} {}",
            comment.unwrap_or_default()
        ));
    }
    let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
    let asked = Arc::clone(index);
    let transaction = transaction_uid.to_string();
    service
        .spawn_blocking(move || asked.commitment_asked(&ids, &transaction))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    info!(destination, transaction = %transaction_uid, objects = entries.len(),
        "storage commitment asked");
    // The report may come right here.
    match association.next_event_report(how.wait).await {
        Ok(Some(report)) => {
            let decoded = Syntax::of(report.transfer_syntax.as_str())
                .ok_or_else(|| "report in an unexpected transfer syntax".to_string())
                .and_then(|s| {
                    CommitmentResult::decode(&report.data_set, s).map_err(|e| e.to_string())
                });
            let status = match decoded {
                Ok(result) => {
                    let index = Arc::clone(index);
                    let audit = audit.cloned();
                    let settled = service
                        .spawn_blocking(move || settle(&index, audit.as_deref(), &result))
                        .await;
                    if matches!(settled, Ok(Ok(()))) {
                        0
                    } else {
                        PROCESSING_FAILURE
                    }
                }
                Err(why) => {
                    warn!(destination, error = %why, "storage commitment report not understood");
                    PROCESSING_FAILURE
                }
            };
            association
                .answer_event_report(&report, status)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(None) => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(entries.len())
}

/// The accepted Storage Commitment context of an association, and its
/// syntax.
fn commitment_context<S>(association: &ScuAssociation<S>) -> Option<(u8, Syntax)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    association
        .contexts()
        .iter()
        .filter(|c| c.accepted && c.abstract_syntax == uid::STORAGE_COMMITMENT_PUSH_MODEL)
        .find_map(|c| Syntax::of(&c.transfer_syntax).map(|s| (c.id, s)))
}

/// The presentation contexts that carry storage commitment, each proposed
/// with one transfer syntax, explicit first.
pub fn proposals() -> [(String, String); 2] {
    [uid::EXPLICIT_VR_LE, uid::IMPLICIT_VR_LE].map(|ts| {
        (
            uid::STORAGE_COMMITMENT_PUSH_MODEL.to_string(),
            ts.to_string(),
        )
    })
}

/// Delivers the reports of requests we answer (as SCP) that their own
/// association did not take, on associations we open to each requester's
/// `[[peer]]` entry, until `stop`.
pub async fn deliver_reports(commitments: Arc<Commitments>, stop: CancellationToken) {
    let mut pauses: HashMap<i64, (Backoff, Instant)> = HashMap::new();
    loop {
        let woken = commitments.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let index = Arc::clone(&commitments.index);
        let pending = match tokio::task::spawn_blocking(move || index.reports_pending()).await {
            Ok(Ok(pending)) => pending,
            Ok(Err(e)) => {
                warn!(error = %e, "storage commitment reports unreadable");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        pauses.retain(|id, _| pending.iter().any(|p| p.id == *id));
        for report in pending {
            if stop.is_cancelled() {
                return;
            }
            let busy = commitments
                .on_their_association
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&report.id);
            let due = pauses
                .get(&report.id)
                .is_none_or(|(_, next)| Instant::now() >= *next);
            if busy || !due {
                continue;
            }
            match commitments.send_report(&report).await {
                Ok(()) => {
                    pauses.remove(&report.id);
                    let index = Arc::clone(&commitments.index);
                    let id = report.id;
                    let _ = tokio::task::spawn_blocking(move || index.report_delivered(id)).await;
                    info!(requester = %report.requester, transaction = %report.transaction_uid,
                        "storage commitment report delivered");
                }
                Err(why) => {
                    let (backoff, next) = pauses
                        .entry(report.id)
                        .or_insert_with(|| (Backoff::default(), Instant::now()));
                    *next = Instant::now() + backoff.failed();
                    warn!(requester = %report.requester, transaction = %report.transaction_uid,
                        error = %why, "storage commitment report not delivered; trying again later");
                    let index = Arc::clone(&commitments.index);
                    let id = report.id;
                    let _ =
                        tokio::task::spawn_blocking(move || index.report_not_delivered(id, &why))
                            .await;
                }
            }
        }
        let next_due = pauses.values().map(|(_, next)| *next).min();
        let sleep = next_due
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(POLL)
            .min(POLL);
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = stop.cancelled() => return,
        }
    }
}

impl Commitments {
    /// Sends one pending report on a new association to its requester.
    async fn send_report(&self, report: &rows::PendingReport) -> Result<(), String> {
        let peer = self.peers.find(&report.requester).ok_or_else(|| {
            format!(
                "{} is not a [[peer]]: add it to send its report",
                report.requester
            )
        })?;
        let (calling_ae, timeout) = self.calling();
        // What we hold now (a report that waited may say more than then).
        let index = Arc::clone(&self.index);
        let (transaction, references) = (report.transaction_uid.clone(), report.references.clone());
        let result =
            tokio::task::spawn_blocking(move || result_of(&index, &transaction, &references))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        let transport = crate::retrieve::connect(&peer, &self.peers, timeout)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let options = ScuOptions {
            calling_ae,
            called_ae: peer.aetitle.clone(),
            timeout,
        };
        let mut association = ScuAssociation::request_with(
            transport,
            &options,
            &proposals(),
            &[RoleProposal::commitment_scp()],
        )
        .await
        .map_err(|e| e.to_string())?;
        let Some((context, syntax)) = commitment_context(&association) else {
            association.abort().await;
            return Err(format!(
                "{} did not accept Storage Commitment Push Model",
                peer.aetitle
            ));
        };
        let sent = association
            .n_event_report(
                context,
                &commitment_class(),
                &commitment_instance(),
                result.event_type(),
                &result.encode(syntax),
            )
            .await;
        match sent {
            Ok((status, comment)) => {
                let _ = association.release().await;
                if status == 0 || status & 0xF000 == 0xB000 {
                    Ok(())
                } else {
                    Err(format!(
                        "{} answered {status:04X} {}",
                        peer.aetitle,
                        comment.unwrap_or_default()
                    ))
                }
            }
            Err(e) => {
                association.abort().await;
                Err(e.to_string())
            }
        }
    }
}

fn commitment_class() -> Uid {
    Uid::new(uid::STORAGE_COMMITMENT_PUSH_MODEL).unwrap_or_else(|| unreachable!("a valid UID"))
}

fn commitment_instance() -> Uid {
    Uid::new(uid::STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        .unwrap_or_else(|| unreachable!("a valid UID"))
}

fn row_of(r: &Reference) -> rows::Reference {
    rows::Reference {
        sop_class: r.sop_class.to_string(),
        sop_instance: r.sop_instance.to_string(),
    }
}

fn reference_of(r: &rows::Reference) -> Option<Reference> {
    Some(Reference {
        sop_class: Uid::new(&r.sop_class)?,
        sop_instance: Uid::new(&r.sop_instance)?,
    })
}

/// A new UID for a transaction: `2.25.` and a random 122-bit UUID as a
/// decimal number (PS3.5 B.2).
fn new_uid() -> Uid {
    let mut bits = fastrand::u128(..);
    // version 4, variant 1 (RFC 9562)
    bits = (bits & !(0xF << 76)) | (0x4 << 76);
    bits = (bits & !(0x3 << 62)) | (0x2 << 62);
    Uid::new(&format!("2.25.{bits}")).unwrap_or_else(|| unreachable!("2.25. and digits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_uids_are_valid_and_differ() {
        let a = new_uid();
        let b = new_uid();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("2.25.") && a.as_str().len() <= 64);
    }
}
