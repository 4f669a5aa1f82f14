//! C-FIND over an in-memory stream, with the peer acting as it reads:
//! pending responses in order (identifiers larger than the peer's PDU cut
//! to fit), C-CANCEL-RQ while matches are sent, an identifier over the cap,
//! C-FIND on a context not accepted for it, and a service that does not
//! answer C-FIND at all.
//!
//! The service here yields made-up identifier bytes: it stands in for the
//! application (the index), not for a peer; the peer's bytes are real PDUs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dimse::command::{self, field, status, Command};
use dimse::negotiation::{AcceptedContext, ContextTable, ServiceClass};
use dimse::pdu::{self, PduReader, PduType};
use dimse::scp::{
    self, AssociationInfo, Ended, Failure, FindOutcome, FindRequest, IncomingObject, Matches,
    Observer, Service, StoreRequest, MAX_IDENTIFIER,
};
use dimse::uid::{self, Uid};
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Notify};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const PEER_MAX_PDU: u32 = 4096;

fn u(s: &str) -> Uid {
    Uid::new(s).expect("valid UID")
}

/// What the service is to answer each C-FIND with.
#[derive(Clone)]
enum Plan {
    /// these identifiers, then success
    Matches(Vec<Vec<u8>>),
    /// these identifiers, then this failure
    FailAfter(Vec<Vec<u8>>, Failure),
    /// one identifier, then (once `gate` is notified) `n` more
    Gated(usize, Arc<Notify>),
}

/// The identifiers a service was asked, with their model.
type Asked = Arc<Mutex<Vec<(Uid, Vec<u8>)>>>;

/// A service that answers C-FIND by its plan and records what it was asked.
#[derive(Clone)]
struct Finder {
    plan: Plan,
    requests: Asked,
    outcomes: Arc<Mutex<Vec<(u64, u16)>>>,
    /// set when the producer saw its receiver dropped
    stopped: Arc<Notify>,
}

impl Finder {
    fn new(plan: Plan) -> Self {
        Finder {
            plan,
            requests: Arc::default(),
            outcomes: Arc::default(),
            stopped: Arc::new(Notify::new()),
        }
    }
}

/// Storage is not exercised here.
struct NoObject;

impl IncomingObject for NoObject {
    type Receipt = ();
    fn write(&mut self, _: &[u8]) -> Result<(), Failure> {
        Ok(())
    }
    async fn commit(self) -> Result<(), Failure> {
        Ok(())
    }
}

impl Service for Finder {
    type Object = NoObject;

    fn store(&self, _: &AssociationInfo, _: &StoreRequest<'_>) -> Result<NoObject, Failure> {
        Ok(NoObject)
    }

    fn find(&self, _: &AssociationInfo, rq: &FindRequest<'_>) -> Result<Matches, Failure> {
        self.requests
            .lock()
            .expect("lock")
            .push((rq.sop_class.clone(), rq.identifier.to_vec()));
        let (tx, rx) = mpsc::channel(2);
        let plan = self.plan.clone();
        let stopped = Arc::clone(&self.stopped);
        tokio::spawn(async move {
            let (items, end) = match plan {
                Plan::Matches(items) => (items, None),
                Plan::FailAfter(items, failure) => (items, Some(failure)),
                Plan::Gated(n, gate) => {
                    if tx.send(Ok(b"first".to_vec())).await.is_err() {
                        return;
                    }
                    gate.notified().await;
                    (
                        (0..n).map(|i| format!("more{i}").into_bytes()).collect(),
                        None,
                    )
                }
            };
            for item in items {
                if tx.send(Ok(item)).await.is_err() {
                    stopped.notify_one();
                    return;
                }
            }
            if let Some(failure) = end {
                let _ = tx.send(Err(failure)).await;
            }
        });
        Ok(rx)
    }
}

impl Observer<()> for Finder {
    fn found(&self, _: &AssociationInfo, outcome: &FindOutcome<'_>) {
        self.outcomes
            .lock()
            .expect("lock")
            .push((outcome.matches, outcome.status));
    }
}

/// A service with no C-FIND of its own: the trait's default refuses.
struct StoreOnly;

impl Service for StoreOnly {
    type Object = NoObject;
    fn store(&self, _: &AssociationInfo, _: &StoreRequest<'_>) -> Result<NoObject, Failure> {
        Ok(NoObject)
    }
}

impl Observer<()> for StoreOnly {}

fn contexts() -> ContextTable {
    let mut table = ContextTable::new();
    let mut add = |id, abs: &str, service| {
        table
            .push(AcceptedContext {
                id,
                abstract_syntax: u(abs),
                transfer_syntax: u(uid::IMPLICIT_VR_LE),
                service,
                peer_scp_role: false,
                peer_may_store: true,
            })
            .expect("room");
    };
    add(1, uid::VERIFICATION, ServiceClass::Verification);
    add(3, CT, ServiceClass::Storage);
    add(5, uid::STUDY_ROOT_FIND, ServiceClass::Find);
    add(7, uid::PATIENT_ROOT_FIND, ServiceClass::Find);
    table
}

fn info() -> AssociationInfo {
    AssociationInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 104)),
        calling_ae: "SCU".into(),
        called_ae: "MINIPACS".into(),
        dimse_timeout: Duration::from_secs(5),
        max_pdu: 16384,
        peer_max_pdu: PEER_MAX_PDU,
    }
}

/// P-DATA-TF PDUs carrying `data` on `context` in PDVs of at most
/// `fragment` bytes, one PDV per PDU.
fn pdatas(context: u8, is_command: bool, data: &[u8], fragment: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = data.chunks(fragment).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        out.extend_from_slice(&pdu::pdata_headers(context, is_command, last, chunk.len()));
        out.extend_from_slice(chunk);
    }
    out
}

/// A C-FIND-RQ and its identifier on `context`.
fn find_rq(context: u8, message_id: u16, class: &str, identifier: &[u8]) -> Vec<u8> {
    let mut out = pdatas(
        context,
        true,
        &command::find_rq(message_id, &u(class), 0),
        4000,
    );
    out.extend_from_slice(&pdatas(context, false, identifier, 4000));
    out
}

/// One DIMSE message the SCP sent: its command, and its data set if any.
#[derive(Debug)]
struct Message {
    command: Command,
    data: Vec<u8>,
    /// the largest PDU body that carried it
    largest_pdu: usize,
}

/// The peer: writes requests and reads whole messages.
struct Peer {
    reader: PduReader<ReadHalf<DuplexStream>>,
    writer: WriteHalf<DuplexStream>,
}

impl Peer {
    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("peer write");
    }

    /// The next message, or `None` when the SCP sent something else (an
    /// A-RELEASE-RP or an A-ABORT) or closed: its PDU type then.
    async fn message(&mut self) -> Result<Message, Option<PduType>> {
        let mut command = Vec::new();
        let mut data = Vec::new();
        let mut largest_pdu = 0;
        let mut cmd: Option<Command> = None;
        loop {
            let header = match self.reader.read_header().await {
                Ok(Some(h)) => h,
                _ => return Err(None),
            };
            if header.pdu_type != PduType::PData {
                let _ = self.reader.read_body(header).await;
                return Err(Some(header.pdu_type));
            }
            let body = self.reader.read_body(header).await.map_err(|_| None)?;
            largest_pdu = largest_pdu.max(body.len());
            for pdv in pdu::pdvs(body) {
                let pdv = pdv.expect("well-formed PDV");
                if pdv.is_command {
                    command.extend_from_slice(pdv.data);
                    if pdv.is_last {
                        let c = Command::decode(&command).expect("a command");
                        if !c.has_data_set {
                            return Ok(Message {
                                command: c,
                                data,
                                largest_pdu,
                            });
                        }
                        cmd = Some(c);
                    }
                } else {
                    data.extend_from_slice(pdv.data);
                    if pdv.is_last {
                        return Ok(Message {
                            command: cmd.take().expect("command before data"),
                            data,
                            largest_pdu,
                        });
                    }
                }
            }
        }
    }

    /// Reads messages until the final C-FIND-RSP: the pending identifiers
    /// and the final command.
    async fn answer(&mut self) -> (Vec<Message>, Command) {
        let mut pending = Vec::new();
        loop {
            let m = self.message().await.expect("a message");
            assert_eq!(m.command.command_field, field::C_FIND_RSP);
            if m.command.status == Some(status::PENDING) {
                assert!(
                    m.command.has_data_set,
                    "a pending response has an identifier"
                );
                pending.push(m);
            } else {
                assert!(!m.command.has_data_set);
                return (pending, m.command);
            }
        }
    }

    /// Releases and checks the release was answered.
    async fn release(&mut self) {
        self.send(&pdu::RELEASE_RQ).await;
        assert_eq!(self.message().await.err(), Some(Some(PduType::ReleaseRp)));
    }
}

/// Runs an association with `service` on one side and `peer` on the other.
async fn with_peer<Sv, F, Fut>(service: Sv, peer: F) -> Ended
where
    Sv: Service + Observer<<Sv::Object as IncomingObject>::Receipt> + 'static,
    F: FnOnce(Peer) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (theirs, ours) = tokio::io::duplex(8192);
    let (r, w) = tokio::io::split(theirs);
    let peer_task = tokio::spawn(peer(Peer {
        reader: PduReader::new(r, 1 << 20),
        writer: w,
    }));
    let table = contexts();
    let association = info();
    let ended = scp::run_association(
        ours,
        &association,
        &table,
        &service,
        &service,
        std::future::pending(),
    )
    .await;
    peer_task.await.expect("the peer's checks pass");
    ended
}

#[tokio::test]
async fn a_find_sends_each_match_as_a_pending_response_then_success() {
    // One identifier larger than the peer's PDU: cut into several.
    let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let items = vec![
        b"one".to_vec(),
        b"two".to_vec(),
        big.clone(),
        b"four".to_vec(),
    ];
    let service = Finder::new(Plan::Matches(items.clone()));
    let seen = service.clone();
    let ended = with_peer(service, move |mut peer| async move {
        peer.send(&find_rq(5, 9, uid::STUDY_ROOT_FIND, b"query"))
            .await;
        let (pending, last) = peer.answer().await;
        let got: Vec<Vec<u8>> = pending.iter().map(|m| m.data.clone()).collect();
        assert_eq!(got, items);
        assert!(pending
            .iter()
            .all(|m| m.largest_pdu <= PEER_MAX_PDU as usize && m.command.message_id == 9));
        assert_eq!((last.status, last.message_id), (Some(status::SUCCESS), 9));
        // The association goes on: a second find on the other model.
        peer.send(&find_rq(7, 10, uid::PATIENT_ROOT_FIND, b"again"))
            .await;
        let (pending, last) = peer.answer().await;
        assert_eq!(pending.len(), 4);
        assert_eq!(last.status, Some(status::SUCCESS));
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    assert_eq!(ended.summary.finds, 2);
    let requests = seen.requests.lock().expect("lock");
    assert_eq!(requests[0], (u(uid::STUDY_ROOT_FIND), b"query".to_vec()));
    assert_eq!(requests[1], (u(uid::PATIENT_ROOT_FIND), b"again".to_vec()));
    assert_eq!(
        *seen.outcomes.lock().expect("lock"),
        vec![(4, status::SUCCESS), (4, status::SUCCESS)]
    );
}

#[tokio::test]
async fn a_cancel_while_matches_are_sent_ends_with_fe00_within_one_response() {
    let gate = Arc::new(Notify::new());
    let service = Finder::new(Plan::Gated(1000, Arc::clone(&gate)));
    let seen = service.clone();
    let ended = with_peer(service, move |mut peer| async move {
        peer.send(&find_rq(5, 3, uid::STUDY_ROOT_FIND, b"q")).await;
        let first = peer.message().await.expect("first pending");
        assert_eq!(first.command.status, Some(status::PENDING));
        assert_eq!(first.data, b"first");
        peer.send(&pdatas(5, true, &command::cancel_rq(3), 4000))
            .await;
        // Only now may the service produce the rest.
        gate.notify_one();
        let (pending, last) = peer.answer().await;
        assert!(
            pending.len() <= 1,
            "{} pending responses after the cancel",
            pending.len()
        );
        assert_eq!((last.status, last.message_id), (Some(status::CANCEL), 3));
        // Still usable.
        peer.send(&pdatas(1, true, &command::echo_rq(4), 4000))
            .await;
        let echo = peer.message().await.expect("echo answered");
        assert_eq!(echo.command.status, Some(status::SUCCESS));
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    // The producer learnt it was cancelled: its receiver is gone.
    tokio::time::timeout(Duration::from_secs(5), seen.stopped.notified())
        .await
        .expect("the producer stopped");
    let outcomes = seen.outcomes.lock().expect("lock");
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].1, status::CANCEL);
    assert!(outcomes[0].0 <= 2);
}

#[tokio::test]
async fn a_cancel_right_behind_the_identifier_gets_fe00_and_no_match() {
    let service = Finder::new(Plan::Matches(vec![b"x".to_vec(); 10]));
    let ended = with_peer(service, move |mut peer| async move {
        let mut both = find_rq(5, 3, uid::STUDY_ROOT_FIND, b"q");
        both.extend_from_slice(&pdatas(5, true, &command::cancel_rq(3), 4000));
        peer.send(&both).await;
        let (pending, last) = peer.answer().await;
        assert!(pending.len() <= 1);
        assert_eq!(last.status, Some(status::CANCEL));
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
}

#[tokio::test]
async fn an_identifier_over_the_cap_gets_a_failure_status_not_an_abort() {
    let service = Finder::new(Plan::Matches(vec![b"never".to_vec()]));
    let seen = service.clone();
    let ended = with_peer(service, move |mut peer| async move {
        let huge = vec![0u8; MAX_IDENTIFIER + 1];
        peer.send(&find_rq(5, 1, uid::STUDY_ROOT_FIND, &huge)).await;
        let (pending, last) = peer.answer().await;
        assert!(pending.is_empty());
        assert_eq!(last.status, Some(status::OUT_OF_RESOURCES));
        // A normal one afterwards is answered.
        peer.send(&find_rq(5, 2, uid::STUDY_ROOT_FIND, b"small"))
            .await;
        let (pending, last) = peer.answer().await;
        assert_eq!(pending.len(), 1);
        assert_eq!(last.status, Some(status::SUCCESS));
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    // The service never saw the oversized identifier.
    assert_eq!(seen.requests.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn a_find_on_a_storage_context_is_refused() {
    let service = Finder::new(Plan::Matches(vec![b"never".to_vec()]));
    let seen = service.clone();
    let ended = with_peer(service, move |mut peer| async move {
        peer.send(&find_rq(3, 1, CT, b"q")).await;
        let (pending, last) = peer.answer().await;
        assert!(pending.is_empty());
        assert_eq!(last.status, Some(status::SOP_CLASS_NOT_SUPPORTED));
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    assert!(seen.requests.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_failure_from_the_service_ends_the_answer_with_its_status() {
    let failure = Failure::new(status::UNABLE_TO_PROCESS, "index unavailable");
    let service = Finder::new(Plan::FailAfter(vec![b"a".to_vec()], failure));
    let ended = with_peer(service, move |mut peer| async move {
        peer.send(&find_rq(5, 1, uid::STUDY_ROOT_FIND, b"q")).await;
        let (pending, last) = peer.answer().await;
        assert_eq!(pending.len(), 1);
        assert_eq!(last.status, Some(status::UNABLE_TO_PROCESS));
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
}

#[tokio::test]
async fn a_service_without_find_refuses_it_by_default() {
    let ended = with_peer(StoreOnly, move |mut peer| async move {
        peer.send(&find_rq(5, 1, uid::STUDY_ROOT_FIND, b"q")).await;
        let (pending, last) = peer.answer().await;
        assert!(pending.is_empty());
        assert_eq!(last.status, Some(status::SOP_CLASS_NOT_SUPPORTED));
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
}
