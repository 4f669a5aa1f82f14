//! The listener: accepts connections, bounds them, and hands each
//! association to the SCP.
//!
//! A connection is not an association until its A-ASSOCIATE-RQ arrives.
//! Until then it holds only a few bytes of buffer and a place in the
//! *pending* set, which has its own cap: when it is full, the oldest pending
//! connection is dropped to make room, so silent connections (port
//! scanners, slow-loris, half-dead modalities) can delay a real sender by
//! no more than the time it takes to send its request. Association slots
//! are taken only by requests; past the cap a request is answered with
//! A-ASSOCIATE-RJ (transient), never left hanging.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dicom_ul::pdu::Pdu;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::dimse::negotiation::{self, AcceptPolicy, Negotiated};
use crate::dimse::scp::{self, ActiveGuard, AssociationSummary, PeerInfo, ScpError, ScpShared};

/// Limits and timeouts of the listener.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// concurrent associations
    pub max_associations: usize,
    /// connections waiting for their A-ASSOCIATE-RQ
    pub max_pending: usize,
    /// time allowed for association negotiation
    pub acse_timeout: Duration,
    /// time objects in flight get after a stop request
    pub shutdown_timeout: Duration,
}

/// Connections waiting for their A-ASSOCIATE-RQ, oldest first, each with
/// the means to drop it.
#[derive(Default)]
struct PendingSet {
    next_id: u64,
    queue: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl PendingSet {
    /// Adds a connection; if the set is full, evicts the oldest first.
    fn admit(&mut self, cap: usize) -> (u64, oneshot::Receiver<()>) {
        while self.queue.len() >= cap {
            if let Some((_, evict)) = self.queue.pop_front() {
                let _ = evict.send(());
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back((id, tx));
        (id, rx)
    }

    fn leave(&mut self, id: u64) {
        if let Some(pos) = self.queue.iter().position(|(i, _)| *i == id) {
            self.queue.remove(pos);
        }
    }
}

/// A running listener's shared state.
struct Server {
    shared: ScpShared,
    policy: AcceptPolicy,
    limits: ServerLimits,
    slots: Arc<Semaphore>,
    pending: Mutex<PendingSet>,
}

/// Serves associations on `listener` until `stop` resolves, then lets
/// objects in flight finish (within the shutdown timeout) and returns.
pub async fn serve(
    listener: TcpListener,
    shared: ScpShared,
    policy: AcceptPolicy,
    limits: ServerLimits,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let server = Arc::new(Server {
        slots: Arc::new(Semaphore::new(limits.max_associations)),
        shared,
        policy,
        limits,
        pending: Mutex::new(PendingSet::default()),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let server = Arc::clone(&server);
                    let shutdown = shutdown_rx.clone();
                    tasks.spawn(async move { server.connection(stream, addr, shutdown).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let in_flight = tasks.len();
    info!(
        connections = in_flight,
        "stopping: no new connections; finishing objects in flight"
    );
    let _ = shutdown_tx.send(true);
    let deadline = tokio::time::sleep(server.limits.shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                warn!(connections = tasks.len(), "shutdown timeout: aborting what is left");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    Ok(())
}

impl Server {
    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        addr: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) {
        if let Err(e) = stream.set_nodelay(true) {
            debug!(peer = %addr, error = %e, "TCP_NODELAY");
        }
        let started = Instant::now();
        let (pending_id, evicted) = self.pending().admit(self.limits.max_pending);
        let rq = tokio::select! {
            _ = evicted => {
                info!(peer = %addr, "dropped a connection without A-ASSOCIATE-RQ to make room");
                return;
            }
            rq = tokio::time::timeout(self.limits.acse_timeout, scp::read_associate_rq(&mut stream)) => rq,
        };
        self.pending().leave(pending_id);
        let rq = match rq {
            Err(_) => {
                info!(peer = %addr, secs = self.limits.acse_timeout.as_secs(), "no A-ASSOCIATE-RQ within the ACSE timeout");
                return;
            }
            Ok(Err(e)) => {
                warn!(peer = %addr, error = %e, "association refused before negotiation");
                if let ScpError::Protocol(_) | ScpError::BadAssociateRq(_) = e {
                    scp::send_abort(&mut stream, crate::dimse::pdu::AbortReason::UnexpectedPdu)
                        .await;
                }
                return;
            }
            Ok(Ok(rq)) => rq,
        };
        let calling = rq.calling_ae_title.trim().to_string();
        let called = rq.called_ae_title.trim().to_string();
        let Ok(_slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            warn!(peer = %addr, %calling, %called, max = self.limits.max_associations,
                "association rejected (transient): association limit reached");
            let _ =
                scp::send_pdu(&mut stream, &Pdu::AssociationRJ(negotiation::reject_busy())).await;
            return;
        };
        let (ac, contexts) = match negotiation::negotiate(&rq, &self.policy) {
            Negotiated::Reject(rj, why) => {
                warn!(peer = %addr, %calling, %called, reason = why, "association rejected");
                let _ = scp::send_pdu(&mut stream, &Pdu::AssociationRJ(rj)).await;
                return;
            }
            Negotiated::Accept { ac, contexts, .. } => (ac, contexts),
        };
        let accepted = contexts.len();
        let proposed = rq.presentation_contexts.len();
        if let Err(e) = scp::send_pdu(&mut stream, &Pdu::AssociationAC(ac)).await {
            warn!(peer = %addr, error = %e, "sending A-ASSOCIATE-AC failed");
            return;
        }
        let _active = ActiveGuard::new(&self.shared.stats);
        let peer = PeerInfo {
            addr,
            calling_ae: calling.clone(),
        };
        let mut summary = AssociationSummary::default();
        let result = scp::run_association(
            stream,
            &self.shared,
            &contexts,
            self.policy.max_pdu,
            &peer,
            shutdown,
            &mut summary,
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        let outcome = match &result {
            Ok(()) => "released".to_string(),
            Err(e) => e.to_string(),
        };
        info!(
            peer = %addr, %calling, %called, proposed, accepted,
            stored = summary.stored, failed = summary.failed, bytes = summary.bytes,
            secs = format_args!("{secs:.3}"), outcome = %outcome,
            "association"
        );
    }

    /// The pending set. A panic while holding the lock cannot leave it
    /// inconsistent (each operation is one queue edit), so a poisoned lock
    /// is simply taken over.
    fn pending(&self) -> std::sync::MutexGuard<'_, PendingSet> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_set_evicts_the_oldest() {
        let mut set = PendingSet::default();
        let (_a, mut rx_a) = set.admit(2);
        let (b, mut rx_b) = set.admit(2);
        let (_c, mut rx_c) = set.admit(2);
        assert!(rx_a.try_recv().is_ok(), "oldest evicted");
        assert!(rx_b.try_recv().is_err());
        set.leave(b);
        let (_d, _rx_d) = set.admit(2);
        assert!(
            rx_c.try_recv().is_err(),
            "room was made by leave, not eviction"
        );
    }
}
