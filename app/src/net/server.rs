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
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use dimse::ul::Pdu;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::slots::{NoSlot, SlotLimits, Slots, Tracked};
use super::throttle::Throttle;
use crate::services::{ActiveGuard, Receiver};
use crate::shutdown::Shutdown;
use crate::tls::TlsReloader;
use dimse::error::AssociationError;
use dimse::negotiation::{self, AcceptPolicy, Negotiated};
use dimse::scp::{self, AssociationInfo};

/// Limits and timeouts of the listener.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// concurrent associations
    pub max_associations: usize,
    /// concurrent associations from one address (0: no cap of its own)
    pub max_associations_per_peer: usize,
    /// an association idle this long may be stopped to admit a new one
    /// when every slot is taken (zero: never)
    pub evict_idle_after: Duration,
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

/// What all listeners of one receiver share: association slots and the
/// pending set bound memory for the whole process, not per port; the
/// throttle bounds what connection events write to the logs.
#[derive(Clone)]
pub struct SharedBounds {
    slots: Slots,
    pending: Arc<Mutex<PendingSet>>,
    limits: Arc<RwLock<ServerLimits>>,
    throttle: Arc<Throttle>,
}

impl SharedBounds {
    /// Bounds for a receiver with these limits.
    pub fn new(limits: ServerLimits) -> Self {
        SharedBounds {
            slots: Slots::default(),
            pending: Arc::new(Mutex::new(PendingSet::default())),
            limits: Arc::new(RwLock::new(limits)),
            throttle: Arc::new(Throttle::default()),
        }
    }

    /// The limits now (they can change while serving).
    pub fn limits(&self) -> ServerLimits {
        self.limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes the limits for what comes next: associations beyond a new,
    /// lower cap are not cut, new ones wait until the count is below it.
    pub fn set_limits(&self, limits: ServerLimits) {
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = limits;
    }

    /// True when a connection event from `peer` is to be logged and
    /// audited (see [`Throttle`]).
    fn record(&self, peer: SocketAddr) -> bool {
        self.throttle.allow(peer.ip().to_canonical())
    }

    /// The pending set. A panic while holding the lock cannot leave it
    /// inconsistent (each operation is one queue edit), so a poisoned lock
    /// is simply taken over.
    fn pending(&self) -> std::sync::MutexGuard<'_, PendingSet> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a port negotiates and runs new associations with. A configuration
/// applied live replaces it as a whole; each association keeps the one of
/// its moment.
#[derive(Debug, Clone)]
pub struct PortSettings {
    /// negotiation policy (AE title, max PDU, SOP classes, allowlist)
    pub policy: AcceptPolicy,
    /// silence allowed between PDUs
    pub dimse_timeout: Duration,
}

/// One listener: its port's settings, optional TLS, the shared bounds.
pub struct Listener {
    /// what associations on this port share
    pub shared: Arc<Receiver>,
    /// this port's settings (replaceable while serving)
    pub settings: RwLock<PortSettings>,
    /// TLS, for a TLS port
    pub tls: Option<Arc<TlsReloader>>,
    /// process-wide bounds
    pub bounds: SharedBounds,
}

impl Listener {
    /// Applies new settings to associations that start from now on.
    pub fn set_settings(&self, settings: PortSettings) {
        *self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = settings;
    }
}

/// Serves associations on `listener` until the shutdown's stop, then
/// returns at once: each connection is a task of `shutdown`, which lets
/// objects in flight finish (and drops the rest at its bound).
pub async fn serve(socket: TcpListener, listener: Arc<Listener>, shutdown: Shutdown) {
    // Summaries of throttled connection events, even once a flood stops.
    let mut sweep = tokio::time::interval(super::throttle::WINDOW);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.stopped() => break,
            _ = sweep.tick() => {
                listener.bounds.throttle.sweep();
                continue;
            }
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, addr)) => {
                let listener = Arc::clone(&listener);
                let stop = shutdown.token();
                shutdown.spawn(async move { listener.connection(stream, addr, stop).await });
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    if let Ok(addr) = socket.local_addr() {
        info!(%addr, "stopping: no new connections on this port");
    }
}

/// A connection that has not sent its A-ASSOCIATE-RQ yet: who, over what,
/// its place in the pending set, and until when.
struct Pending<'a> {
    addr: SocketAddr,
    tls: Option<TlsInfo>,
    ticket: PendingTicket<'a>,
    /// fires when the pending set drops this connection for a newer one
    evicted: oneshot::Receiver<()>,
    /// the ACSE timeout's end
    deadline: tokio::time::Instant,
    shutdown: CancellationToken,
}

/// Ends the pending phase of a connection: dropped out of the pending set
/// however the phase ends.
struct PendingTicket<'a> {
    bounds: &'a SharedBounds,
    id: u64,
}

impl Drop for PendingTicket<'_> {
    fn drop(&mut self) {
        self.bounds.pending().leave(self.id);
    }
}

impl Listener {
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) {
        if let Err(e) = stream.set_nodelay(true) {
            debug!(peer = %addr, error = %e, "TCP_NODELAY");
        }
        let limits = self.bounds.limits();
        let deadline = tokio::time::Instant::now() + limits.acse_timeout;
        let (id, mut evicted) = self.bounds.pending().admit(limits.max_pending);
        let ticket = PendingTicket {
            bounds: &self.bounds,
            id,
        };
        let Some(tls) = &self.tls else {
            let pending = Pending {
                addr,
                tls: None,
                ticket,
                evicted,
                deadline,
                shutdown,
            };
            return self.session(stream, pending).await;
        };
        // Plain DICOM on the TLS port shows as an A-ASSOCIATE-RQ (0x01)
        // where a TLS record (0x16) should be: say so rather than report a
        // failed handshake.
        let mut first = [0u8; 1];
        let peeked = tokio::select! {
            biased;
            r = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => r,
            _ = &mut evicted => return self.dropped_to_make_room(addr),
            _ = shutdown.cancelled() => return info!(peer = %addr, "stopping: dropped a connection without A-ASSOCIATE-RQ"),
        };
        match peeked {
            Ok(Ok(1..)) if first[0] == 0x01 => {
                if self.bounds.record(addr) {
                    self.audit_tls_failed(addr, &"plain DICOM (A-ASSOCIATE-RQ) on the TLS port");
                    warn!(peer = %addr, "plain DICOM (A-ASSOCIATE-RQ) received on a TLS port");
                }
                return;
            }
            Ok(Ok(1..)) => {}
            Ok(_) => return,
            Err(_) => {
                if self.bounds.record(addr) {
                    info!(peer = %addr, secs = limits.acse_timeout.as_secs(), "no TLS handshake within the ACSE timeout");
                }
                return;
            }
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let handshake = tokio::select! {
            _ = &mut evicted => return self.dropped_to_make_room(addr),
            _ = shutdown.cancelled() => return info!(peer = %addr, "stopping: dropped a connection in TLS handshake"),
            r = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => r,
        };
        let stream = match handshake {
            Err(_) => {
                if self.bounds.record(addr) {
                    self.audit_tls_failed(
                        addr,
                        &"TLS handshake not finished within the ACSE timeout",
                    );
                    info!(peer = %addr, "TLS handshake not finished within the ACSE timeout");
                }
                return;
            }
            Ok(Err(e)) => {
                // A client certificate "not valid yet" on a device without
                // a real-time clock: say it is the clock, where a
                // technician looks (the status line too).
                if let Some(words) = crate::tls::handshake_clock_behind(&e) {
                    if let Ok(mut last) = self.shared.stats.last_error.lock() {
                        last.clone_from(&words);
                    }
                    if self.bounds.record(addr) {
                        self.audit_tls_failed(addr, &words);
                        warn!(peer = %addr, "TLS handshake failed: {words}");
                    }
                    return;
                }
                if self.bounds.record(addr) {
                    self.audit_tls_failed(addr, &e);
                    warn!(peer = %addr, error = %e, "TLS handshake failed");
                }
                return;
            }
            Ok(Ok(s)) => s,
        };
        let session = stream.get_ref().1;
        let tls_info = TlsInfo {
            version: session
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            suite: session
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
                .unwrap_or_default(),
            peer_subject: crate::tls::peer_subject(session.peer_certificates()),
            common_names: crate::tls::peer_common_names(session.peer_certificates()),
        };
        let pending = Pending {
            addr,
            tls: Some(tls_info),
            ticket,
            evicted,
            deadline,
            shutdown,
        };
        self.session(stream, pending).await
    }

    /// Waits for the A-ASSOCIATE-RQ (still pending), then negotiates and
    /// runs the association.
    async fn session<S>(&self, mut stream: S, pending: Pending<'_>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Pending {
            addr,
            tls,
            ticket,
            mut evicted,
            deadline,
            shutdown,
        } = pending;
        let started = Instant::now();
        let limits = self.bounds.limits();
        // Biased towards the request: a connection whose A-ASSOCIATE-RQ has
        // arrived is a sender, not a silent one, and is not dropped to make
        // room when both are ready (a burst of silent connections evicted
        // such a sender now and then in the load benchmark).
        let rq = tokio::select! {
            biased;
            rq = tokio::time::timeout_at(deadline, scp::read_associate_rq(&mut stream)) => rq,
            _ = &mut evicted => return self.dropped_to_make_room(addr),
            _ = shutdown.cancelled() => {
                info!(peer = %addr, "stopping: dropped a connection without A-ASSOCIATE-RQ");
                return;
            }
        };
        drop(ticket);
        let rq = match rq {
            Err(_) => {
                if self.bounds.record(addr) {
                    info!(peer = %addr, secs = limits.acse_timeout.as_secs(), "no A-ASSOCIATE-RQ within the ACSE timeout");
                }
                return;
            }
            Ok(Err(e)) => {
                if self.bounds.record(addr) {
                    warn!(peer = %addr, error = %e, "association refused before negotiation");
                    if !e.is_connection_lost() {
                        self.audit_rejected(addr, ("", ""), tls.as_ref(), &e.to_string());
                    }
                }
                if let Some(reason) = e.abort_reason() {
                    // Drained, so that no reset destroys the A-ABORT (an
                    // oversized A-ASSOCIATE-RQ leaves most of itself unread).
                    scp::abort_and_drain(&mut stream, reason).await;
                }
                return;
            }
            Ok(Ok(rq)) => rq,
        };
        let calling = rq.calling_ae_title.trim().to_string();
        let called = rq.called_ae_title.trim().to_string();
        let tls_text = tls
            .as_ref()
            .map(|t| format!("{} {}", t.version, t.suite))
            .unwrap_or_else(|| "none".into());
        let peer_cert = tls
            .as_ref()
            .and_then(|t| t.peer_subject.clone())
            .unwrap_or_default();
        let slot_limits = SlotLimits {
            max_associations: limits.max_associations,
            max_per_peer: limits.max_associations_per_peer,
            evict_idle_after: limits.evict_idle_after,
        };
        let slot = match self
            .bounds
            .slots
            .take(addr.ip().to_canonical(), slot_limits, &shutdown)
        {
            Ok((slot, evicted)) => {
                if let Some(evicted) = evicted {
                    warn!(peer = %addr, %calling, %called, evicted_peer = %evicted.peer,
                        idle_secs = evicted.idle.as_secs(), max = limits.max_associations,
                        "association limit reached: the association idle longest is stopped to make room");
                }
                slot
            }
            Err(why) => {
                let reason = match why {
                    NoSlot::Full => "association limit reached",
                    NoSlot::PeerFull => "association limit per peer address reached",
                };
                if self.bounds.record(addr) {
                    warn!(peer = %addr, %calling, %called, max = limits.max_associations,
                        max_per_peer = limits.max_associations_per_peer,
                        "association rejected (transient): {reason}");
                    self.audit_rejected(addr, (&calling, &called), tls.as_ref(), reason);
                }
                let _ = scp::send_pdu(&mut stream, &Pdu::AssociationRJ(negotiation::reject_busy()))
                    .await;
                return;
            }
        };
        let PortSettings {
            policy,
            dimse_timeout,
        } = self
            .settings
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let facts = negotiation::PeerFacts {
            addr: addr.ip().to_canonical(),
            cert_common_names: tls.as_ref().map_or(&[], |t| t.common_names.as_slice()),
        };
        let (ac, contexts, peer_max_pdu) = match negotiation::negotiate(&rq, &policy, &facts) {
            Negotiated::Reject(rj, why) => {
                if self.bounds.record(addr) {
                    let fix = reject_fix(why, (&calling, &called), policy.ae_title.as_str());
                    warn!(peer = %addr, %calling, %called, tls = %tls_text, peer_cert = %peer_cert, reason = %why, "association rejected{fix}");
                    self.audit_rejected(addr, (&calling, &called), tls.as_ref(), &why.to_string());
                }
                let _ = scp::send_pdu(&mut stream, &Pdu::AssociationRJ(rj)).await;
                return;
            }
            Negotiated::Accept {
                ac,
                contexts,
                peer_max_pdu,
            } => (ac, contexts, peer_max_pdu),
        };
        let accepted = contexts.len();
        let proposed = rq.presentation_contexts.len();
        if let Err(e) = scp::send_pdu(&mut stream, &Pdu::AssociationAC(ac)).await {
            warn!(peer = %addr, error = %e, "sending A-ASSOCIATE-AC failed");
            return;
        }
        let _active = ActiveGuard::new(&self.shared.stats);
        let association = AssociationInfo {
            peer: addr,
            calling_ae: calling.clone(),
            called_ae: policy.ae_title.to_string(),
            dimse_timeout,
            max_pdu: policy.max_pdu,
            peer_max_pdu,
        };
        let receiver = &*self.shared;
        // Reads stamp the slot's activity, so that the association idle
        // longest can be found; its stop is the shutdown or an eviction.
        let ended = scp::run_association(
            Tracked::new(stream, Arc::clone(&slot.activity)),
            &association,
            &contexts,
            receiver,
            receiver,
            slot.stop.cancelled(),
        )
        .await;
        let evicted =
            matches!(ended.result, Err(AssociationError::Stopped)) && !shutdown.is_cancelled();
        drop(slot);
        let summary = ended.summary;
        let secs = started.elapsed().as_secs_f64();
        let outcome = match &ended.result {
            Ok(()) => "released".to_string(),
            Err(_) if evicted => "stopped to make room for another association".to_string(),
            Err(e) => e.to_string(),
        };
        if let Some(audit) = &self.shared.audit {
            use crate::logs::AssociationOutcome as O;
            audit.association(&crate::logs::AssociationRecord {
                time: std::time::SystemTime::now() - started.elapsed(),
                peer: addr,
                calling_ae: &calling,
                called_ae: &called,
                tls_version: tls.as_ref().map(|t| t.version.as_str()),
                tls_suite: tls.as_ref().map(|t| t.suite.as_str()),
                tls_peer_subject: tls.as_ref().and_then(|t| t.peer_subject.as_deref()),
                outcome: match &ended.result {
                    Ok(()) => O::Released,
                    Err(AssociationError::PeerAborted) => O::AbortedByPeer,
                    Err(AssociationError::Timeout(_)) => O::TimedOut,
                    Err(_) if evicted => O::Evicted,
                    Err(e) if e.is_connection_lost() => O::ConnectionLost,
                    Err(_) => O::Aborted,
                },
                objects_stored: summary.stored,
                objects_failed: summary.failed,
                bytes: summary.bytes,
                seconds: secs,
            });
        }
        info!(
            peer = %addr, %calling, %called, tls = %tls_text, peer_cert = %peer_cert,
            proposed, accepted,
            stored = summary.stored, failed = summary.failed, bytes = summary.bytes,
            secs = format_args!("{secs:.3}"), outcome = %outcome,
            "association"
        );
    }
}

/// What a TLS session negotiated, for logs.
struct TlsInfo {
    version: String,
    suite: String,
    peer_subject: Option<String>,
    /// the CN values of the client certificate's subject, for the allowlist
    common_names: Vec<String>,
}

/// What the operator of either side can change about a rejected
/// association, for its log line: the titles involved and the options
/// that set them (ours, and the sender's in dcmtk and in minipacs).
fn reject_fix(
    why: negotiation::RejectReason,
    (calling, called): (&str, &str),
    ours: &str,
) -> String {
    use negotiation::RejectReason;
    match why {
        RejectReason::CalledAeTitle => format!(
            ": the sender called \"{called}\", we answer to \"{ours}\"; the sender must call \
             {ours} (storescu/echoscu -aec {ours}, minipacs send --call {ours}), \
             or we answer to it with --aetitle {called} (aetitle in the file)"
        ),
        RejectReason::CallingAeTitle => format!(
            ": the sender's title \"{calling}\" (from this host or certificate) is not in \
             the [[allow]] list; add an [[allow]] entry for it, or the sender calls as an \
             allowed title (storescu/echoscu -aet, minipacs send --aetitle)"
        ),
        _ => String::new(),
    }
}

/// Audit lines for connections turned away (the audit trail's own
/// records; see [`crate::logs::audit`]).
impl Listener {
    /// A connection dropped from the pending set for a newer one.
    fn dropped_to_make_room(&self, addr: SocketAddr) {
        if self.bounds.record(addr) {
            info!(peer = %addr, "dropped a connection without A-ASSOCIATE-RQ to make room");
        }
    }

    fn audit_rejected(
        &self,
        peer: SocketAddr,
        (calling_ae, called_ae): (&str, &str),
        tls: Option<&TlsInfo>,
        reason: &str,
    ) {
        if let Some(audit) = &self.shared.audit {
            audit.rejected(&crate::logs::RejectedRecord {
                time: std::time::SystemTime::now(),
                peer,
                calling_ae,
                called_ae,
                tls_version: tls.map(|t| t.version.as_str()),
                tls_suite: tls.map(|t| t.suite.as_str()),
                tls_peer_subject: tls.and_then(|t| t.peer_subject.as_deref()),
                reason,
            });
        }
    }

    fn audit_tls_failed(&self, peer: SocketAddr, reason: &dyn std::fmt::Display) {
        if let Some(audit) = &self.shared.audit {
            audit.tls_failed_now(peer, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_title_names_both_titles_and_the_options() {
        use negotiation::RejectReason;
        let fix = reject_fix(RejectReason::CalledAeTitle, ("CT1", "PACS"), "MINIPACS");
        for part in [
            "\"PACS\"",
            "\"MINIPACS\"",
            "-aec MINIPACS",
            "--call MINIPACS",
            "--aetitle PACS",
        ] {
            assert!(fix.contains(part), "{part}: {fix}");
        }
        let fix = reject_fix(
            RejectReason::CallingAeTitle,
            ("CT1", "MINIPACS"),
            "MINIPACS",
        );
        assert!(
            fix.contains("\"CT1\"") && fix.contains("[[allow]]") && fix.contains("-aet"),
            "{fix}"
        );
        assert_eq!(reject_fix(RejectReason::Busy, ("A", "B"), "B"), "");
    }

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
