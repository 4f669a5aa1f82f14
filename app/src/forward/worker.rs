//! One destination's worker: its queue, oldest first, sent over as few
//! associations as will carry it.
//!
//! The worker takes a batch of queued entries, proposes one presentation
//! context per (SOP class, transfer syntax) the batch holds, and sends each
//! object from its file while the next one is opened on a blocking thread.
//! Outcomes are written to the index a few dozen at a time, off the send
//! loop; the next batch is read only once they are in, so nothing is sent
//! twice in one run. The association is kept while the next batch fits its
//! contexts and released when the queue is empty.
//!
//! A failure is either the destination's for now (refused or lost
//! connection, A-ASSOCIATE-RJ, A-ABORT, a timeout, an A7xx "out of
//! resources" status): the entry stays queued and the worker pauses
//! ([`crate::backoff`]) before it tries again; or the object's for good (the
//! destination does not take its SOP class or transfer syntax, answers a
//! failure status the standard calls permanent, or the file cannot be
//! read): the entry is marked failed, shown, and not tried again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dimse::scp::{Outgoing, SubOperationFailure};
use dimse::scu::{ScuAssociation, ScuError, ScuOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Shared;
use crate::backoff::Backoff;
use crate::index::queue::{Outcome, Pending};
use crate::index::retrieve::Stored;
use crate::logs::ForwardRecord;

/// Entries taken per batch (and so at most this many presentation
/// contexts, one per SOP class and transfer syntax).
const BATCH: usize = 64;
/// How often an idle worker looks at its queue although nothing woke it
/// (an operator's `minipacs queue retry` from another process).
const POLL: Duration = Duration::from_secs(5);
/// Outcomes written to the index together.
const FLUSH_EVERY: usize = 32;
/// Medium priority (PS3.7 9.1.1.1).
const MEDIUM: u16 = 0x0000;
/// While the queue is not drained, storage commitment is asked once this
/// many delivered objects wait for it.
const COMMIT_AT_LEAST: usize = 512;
/// Objects named in one storage commitment request at most (well within
/// the 1 MiB a request may take: about 100 bytes each).
const COMMIT_AT_MOST: usize = 2000;
/// How long the worker waits for a report on its own association after a
/// request, before it goes on (the destination may open one to our port
/// instead, as Orthanc does).
const COMMIT_WAIT: Duration = Duration::from_secs(2);

type Association = ScuAssociation<Box<dyn dimse::scp::Transport>>;

/// An open association and the (SOP class, transfer syntax) pairs it
/// proposed.
struct Open {
    association: Association,
    proposed: HashSet<(String, String)>,
}

/// How a batch ended.
enum BatchEnd {
    /// every entry has an outcome
    Done,
    /// the destination failed for now: pause, then try again
    Transient {
        why: String,
        /// the association cannot go on (abort it)
        broken: bool,
    },
    /// the service is stopping
    Stopped,
}

/// Works `destination`'s queue until `stop`.
pub(super) async fn run(shared: Arc<Shared>, destination: String, stop: CancellationToken) {
    let mut backoff = Backoff::default();
    let mut open: Option<Open> = None;
    while !stop.is_cancelled() {
        let changed = shared.index.queue_changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let batch = match next_batch(&shared, &destination).await {
            Ok(batch) => batch,
            Err(e) => {
                warn!(destination, error = %e, "forwarding queue unreadable; trying again");
                if pause(POLL, &stop).await {
                    break;
                }
                continue;
            }
        };
        let commit = shared.commit_of(&destination);
        let to_ask = match commit {
            Some(timeout_s) if batch.is_empty() => {
                let index = Arc::clone(&shared.index);
                let name = destination.clone();
                tokio::task::spawn_blocking(move || {
                    crate::commitment::waiting(&index, &name, timeout_s, 1)
                })
                .await
                .unwrap_or(0)
            }
            _ => 0,
        };
        if batch.is_empty() && to_ask == 0 {
            if let Some(idle) = open.take() {
                release(idle).await;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.cancelled() => break,
            }
            continue;
        }
        let pairs: HashSet<(String, String)> = batch
            .iter()
            .map(|e| (e.sop_class.clone(), e.transfer_syntax.clone()))
            .collect();
        if open.as_ref().is_some_and(|o| !pairs.is_subset(&o.proposed)) {
            if let Some(old) = open.take() {
                release(old).await;
            }
        }
        if open.is_none() {
            match associate(&shared, &destination, pairs, commit.is_some()).await {
                Ok(new) => open = Some(new),
                Err(why) => {
                    match batch.first() {
                        Some(oldest) => transient(&shared, &destination, oldest, &why).await,
                        None => mark_retrying(&shared, &destination, &why),
                    }
                    if retry_pause(&shared, backoff.failed(), &stop).await {
                        break;
                    }
                    continue;
                }
            }
        }
        let Some(current) = open.as_mut() else {
            continue;
        };
        let sent = if batch.is_empty() {
            BatchEnd::Done
        } else {
            send_batch(
                &shared,
                &destination,
                &mut current.association,
                &batch,
                &stop,
            )
            .await
        };
        let sent = match (sent, commit) {
            (BatchEnd::Done, Some(timeout_s)) => {
                // Ask about what was delivered once the queue is drained
                // (or many wait): one request for many objects.
                let how = crate::commitment::Asking {
                    timeout_s,
                    at_least: if batch.len() < BATCH {
                        1
                    } else {
                        COMMIT_AT_LEAST
                    },
                    at_most: COMMIT_AT_MOST,
                    wait: COMMIT_WAIT,
                };
                match crate::commitment::ask(
                    &shared.service,
                    &shared.index,
                    shared.audit.as_ref(),
                    &mut current.association,
                    &destination,
                    &how,
                )
                .await
                {
                    Ok(_) => BatchEnd::Done,
                    Err(why) => BatchEnd::Transient { why, broken: true },
                }
            }
            (sent, _) => sent,
        };
        match sent {
            BatchEnd::Done => {
                if backoff.is_failing() {
                    info!(destination, "forward destination back: sending again");
                }
                backoff.succeeded();
                shared.update(&destination, |s| s.retrying_since = None);
            }
            BatchEnd::Transient { why, broken } => {
                if let Some(failed) = open.take() {
                    if broken {
                        failed.association.abort().await;
                    } else {
                        release(failed).await;
                    }
                }
                mark_retrying(&shared, &destination, &why);
                if retry_pause(&shared, backoff.failed(), &stop).await {
                    break;
                }
            }
            BatchEnd::Stopped => break,
        }
    }
    if let Some(last) = open {
        release(last).await;
    }
}

/// The pause before the next attempt after a transient failure: `d`, but
/// at most [`crate::retention::URGENT_PAUSE`] while retention waits for
/// the queue to make room (and cut short when it starts to). Returns
/// whether `stop` came.
async fn retry_pause(shared: &Shared, d: Duration, stop: &CancellationToken) -> bool {
    let urgent = crate::retention::URGENT_PAUSE;
    if shared.room.is_wanted() {
        return pause(d.min(urgent), stop).await;
    }
    let wanted = shared.room.changed().notified();
    tokio::select! {
        stopped = pause(d, stop) => stopped,
        _ = wanted => pause(urgent.min(d), stop).await,
    }
}

/// Waits `d`, or until `stop`; returns whether it was `stop`.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.cancelled() => true,
    }
}

async fn next_batch(shared: &Arc<Shared>, destination: &str) -> anyhow::Result<Vec<Pending>> {
    let index = Arc::clone(&shared.index);
    let destination = destination.to_string();
    Ok(tokio::task::spawn_blocking(move || index.next_to_forward(&destination, BATCH)).await??)
}

/// Opens an association to `destination` proposing `pairs`, and storage
/// commitment with `commit`.
async fn associate(
    shared: &Shared,
    destination: &str,
    pairs: HashSet<(String, String)>,
    commit: bool,
) -> Result<Open, String> {
    let peer = shared
        .peers
        .find(destination)
        .ok_or_else(|| format!("{destination} is not a [[peer]]"))?;
    let timeout = shared.timeout();
    let transport = crate::retrieve::connect(&peer, &shared.peers, timeout)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let options = ScuOptions {
        calling_ae: shared.calling_ae(),
        called_ae: peer.aetitle.clone(),
        timeout,
    };
    let mut proposals: Vec<(String, String)> = pairs.iter().cloned().collect();
    if commit {
        proposals.extend(crate::commitment::proposals());
    }
    let association = ScuAssociation::request(transport, &options, &proposals)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Open {
        association,
        proposed: pairs,
    })
}

async fn release(open: Open) {
    if let Err(e) = open.association.release().await {
        tracing::debug!(error = %e, "forward association release");
    }
}

/// Sends `batch` on `association`, recording each outcome.
async fn send_batch(
    shared: &Arc<Shared>,
    destination: &str,
    association: &mut Association,
    batch: &[Pending],
    stop: &CancellationToken,
) -> BatchEnd {
    let mut outcomes: Vec<(Pending, Outcome)> = Vec::with_capacity(FLUSH_EVERY);
    let mut flushing: Option<JoinHandle<()>> = None;
    let mut next = batch.first().map(|e| open_file(shared, e));
    let mut end = BatchEnd::Done;
    for (i, entry) in batch.iter().enumerate() {
        if stop.is_cancelled() {
            end = BatchEnd::Stopped;
            break;
        }
        let opened = match next.take() {
            Some(handle) => handle.await,
            None => break,
        };
        next = batch.get(i + 1).map(|e| open_file(shared, e));
        let started = Instant::now();
        let received_before = shared.received();
        let Some(context) = association.context_for(&entry.sop_class, &entry.transfer_syntax)
        else {
            let reason = format!(
                "{destination} does not take SOP class {} in transfer syntax {} \
                 (nothing is transcoded)",
                entry.sop_class, entry.transfer_syntax
            );
            outcomes.push((
                entry.clone(),
                Outcome::Failed {
                    status: None,
                    reason,
                },
            ));
            continue;
        };
        let mut outgoing = match opened {
            Ok(Ok(outgoing)) => outgoing,
            Ok(Err(failure)) => {
                outcomes.push((entry.clone(), unreadable(&failure.failure.comment)));
                continue;
            }
            Err(e) => {
                outcomes.push((entry.clone(), unreadable(&e.to_string())));
                continue;
            }
        };
        let sent = association
            .store_streamed(
                context,
                &outgoing.sop_class,
                &outgoing.sop_instance,
                MEDIUM,
                None,
                &mut outgoing.data,
                outgoing.length,
            )
            .await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match sent {
            Ok((status, comment)) => {
                let comment = comment.unwrap_or_default();
                match classify(status) {
                    Class::Delivered => {
                        info!(destination, sop_instance = %entry.sop_instance,
                            bytes = outgoing.length, ms = format_args!("{ms:.1}"),
                            status = format_args!("{status:04X}"), "forwarded");
                        outcomes.push((entry.clone(), Outcome::Delivered { status }));
                    }
                    Class::Permanent => {
                        let reason = format!("{destination} refused it: {status:04X} {comment}");
                        warn!(destination, sop_instance = %entry.sop_instance,
                            status = format_args!("{status:04X}"), reason = %comment,
                            "forward refused for good: the entry is marked failed");
                        outcomes.push((
                            entry.clone(),
                            Outcome::Failed {
                                status: Some(status),
                                reason: reason.trim().to_string(),
                            },
                        ));
                    }
                    Class::Transient => {
                        let why = format!("{status:04X} {comment}").trim().to_string();
                        outcomes.push((
                            entry.clone(),
                            Outcome::Retry {
                                status: Some(status),
                                reason: why.clone(),
                            },
                        ));
                        end = BatchEnd::Transient { why, broken: false };
                        break;
                    }
                }
            }
            Err(ScuError::DataSet {
                sent: false,
                source,
            }) => {
                outcomes.push((entry.clone(), unreadable(&source.to_string())));
            }
            Err(ScuError::DataSet { sent: true, source }) => {
                // Part of it went: the association cannot go on.
                outcomes.push((entry.clone(), unreadable(&source.to_string())));
                end = BatchEnd::Transient {
                    why: format!("reading the stored file: {source}"),
                    broken: true,
                };
                break;
            }
            Err(e) => {
                let why = e.to_string();
                outcomes.push((
                    entry.clone(),
                    Outcome::Retry {
                        status: None,
                        reason: why.clone(),
                    },
                ));
                end = BatchEnd::Transient { why, broken: true };
                break;
            }
        }
        // Receiving comes first: objects arrived during this send, so the
        // next one waits (see `super::GIVE_WAY`).
        if shared.received() != received_before {
            let pause = started.elapsed() * super::GIVE_WAY;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => {}
            }
        }
        if outcomes.len() >= FLUSH_EVERY {
            if let Some(previous) = flushing.take() {
                let _ = previous.await;
            }
            flushing = Some(flush(shared, destination, std::mem::take(&mut outcomes)));
        }
    }
    if let Some(previous) = flushing.take() {
        let _ = previous.await;
    }
    if !outcomes.is_empty() {
        let _ = flush(shared, destination, outcomes).await;
    }
    end
}

/// The outcome of an object whose stored file cannot be read.
fn unreadable(why: &str) -> Outcome {
    Outcome::Failed {
        status: None,
        reason: format!("the stored file cannot be read: {why}"),
    }
}

/// Opens an entry's file on a blocking thread.
fn open_file(
    shared: &Arc<Shared>,
    entry: &Pending,
) -> JoinHandle<Result<Outgoing, SubOperationFailure>> {
    let root = Arc::clone(&shared.root);
    let stored = Stored {
        path: entry.path.clone(),
        sop_class: entry.sop_class.clone(),
        sop_instance: entry.sop_instance.clone(),
        transfer_syntax: entry.transfer_syntax.clone(),
    };
    tokio::task::spawn_blocking(move || crate::retrieve::open(&root, &stored))
}

/// Writes outcomes to the index and the audit trail, on a blocking thread.
fn flush(
    shared: &Arc<Shared>,
    destination: &str,
    outcomes: Vec<(Pending, Outcome)>,
) -> JoinHandle<()> {
    let service = shared.service.clone();
    let shared = Arc::clone(shared);
    let destination = destination.to_string();
    service.spawn_blocking(move || {
        let ids: Vec<(i64, Outcome)> = outcomes
            .iter()
            .map(|(entry, outcome)| (entry.id, outcome.clone()))
            .collect();
        if let Err(e) = shared.index.record_forwarded(&ids) {
            // Not recorded: the entries stay queued and are sent again
            // (at least once).
            warn!(destination, error = %e, "forward outcomes not recorded; they will be sent again");
            return;
        }
        let (mut delivered, mut failed) = (0, 0);
        for (entry, outcome) in &outcomes {
            let (what, status, reason) = match outcome {
                Outcome::Delivered { status } => {
                    delivered += 1;
                    ("delivered", Some(*status), "")
                }
                Outcome::Failed { status, reason } => {
                    failed += 1;
                    ("failed", *status, reason.as_str())
                }
                Outcome::Retry { .. } => continue,
            };
            if let Some(audit) = &shared.audit {
                audit.forward(&ForwardRecord {
                    time: SystemTime::now(),
                    destination: &destination,
                    outcome: what,
                    sop_class_uid: &entry.sop_class,
                    sop_instance_uid: &entry.sop_instance,
                    path: &entry.path,
                    status,
                    reason: (!reason.is_empty()).then_some(reason),
                    attempts: entry.attempts + 1,
                });
            }
        }
        shared.update(&destination, |s| {
            s.delivered += delivered;
            s.failed += failed;
        });
    })
}

/// Records a failure to reach the destination against its oldest entry
/// (so `minipacs queue list` shows why it waits) and in its state.
async fn transient(shared: &Arc<Shared>, destination: &str, oldest: &Pending, why: &str) {
    mark_retrying(shared, destination, why);
    let outcome = Outcome::Retry {
        status: None,
        reason: why.to_string(),
    };
    let _ = flush(shared, destination, vec![(oldest.clone(), outcome)]).await;
}

/// The destination failed for now: say so once when it starts failing.
fn mark_retrying(shared: &Shared, destination: &str, why: &str) {
    let mut first = false;
    shared.update(destination, |s| {
        first = s.retrying_since.is_none();
        s.retrying_since.get_or_insert_with(SystemTime::now);
        s.last_error = why.to_string();
    });
    if first {
        warn!(
            destination,
            error = why,
            "forward destination unavailable: its queue waits and is retried"
        );
    }
}

/// What a C-STORE-RSP status means for the entry.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// stored (success or a warning)
    Delivered,
    /// not stored, and sending it again later may succeed
    Transient,
    /// not stored, and sending it again will not change that
    Permanent,
}

/// Classifies a C-STORE-RSP status (PS3.4 B.2.3, PS3.7 C): success and
/// warnings (0000, Bxxx, 0001, 0107, 0116) are delivered; "Refused: out of
/// resources" (A7xx), resource limitation (0213), duplicate invocation
/// (0210) and cancel (FE00) are the destination's for now; every other
/// failure (0122 SOP class not supported, 0124 not authorized, A9xx data
/// set does not match, Cxxx cannot understand, 01xx/02xx errors) is the
/// object's for good.
fn classify(status: u16) -> Class {
    match status {
        0x0000 | 0x0001 | 0x0107 | 0x0116 => Class::Delivered,
        s if s & 0xF000 == 0xB000 => Class::Delivered,
        s if s & 0xFF00 == 0xA700 => Class::Transient,
        0x0210 | 0x0213 | 0xFE00 => Class::Transient,
        _ => Class::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_the_standard_says() {
        for s in [0x0000, 0xB000, 0xB007, 0xB006, 0x0001] {
            assert_eq!(classify(s), Class::Delivered, "{s:04X}");
        }
        for s in [0xA700, 0xA7FF, 0x0213, 0x0210, 0xFE00] {
            assert_eq!(classify(s), Class::Transient, "{s:04X}");
        }
        for s in [0x0122, 0x0124, 0xA900, 0xC000, 0xC123, 0x0211, 0x0117] {
            assert_eq!(classify(s), Class::Permanent, "{s:04X}");
        }
    }
}
