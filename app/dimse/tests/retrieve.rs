//! C-GET and C-MOVE over in-memory streams, the SCP reading its requester
//! 1 byte (or a few) at a time: negotiation with SCP/SCU Role Selection,
//! objects sent byte-identical (larger than several PDUs), pending and
//! final responses with their counts, refused and unsendable
//! sub-operations in the Failed SOP Instance UID List, C-CANCEL-RQ, a
//! C-MOVE to an in-test destination SCP (this crate's own, over a second
//! stream) with the Move Originator fields, and a service that refuses.
//!
//! The service here holds its objects in memory: it stands in for the
//! application (index and files), not for a peer; the peers' bytes are
//! real PDUs.

mod common;
use common::Trickle;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use dimse::ae::AeTitle;
use dimse::command::{self, field, status, Command, MoveOriginator};
use dimse::error::AssociationError;
use dimse::negotiation::{self, AcceptPolicy, ContextTable, Negotiated, PeerFacts};
use dimse::pdu::{self, PduReader, PduType};
use dimse::scp::{
    self, AssociationInfo, Ended, Failure, IncomingObject, MoveDestination, MoveRetrieval,
    Observer, Outgoing, Retrieval, RetrieveOperation, RetrieveOutcome, RetrieveRequest, Service,
    StoreRequest, SubOperationCounts, SubOperationFailure, SubOperationOutcome, SubOperationResult,
};
use dimse::uid::{self, Uid};
use dimse::ul::{
    AssociationRQ, PresentationContextProposed, PresentationContextResultReason, RequestorRoles,
    UserVariableItem,
};
use tokio::io::{AsyncRead, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Notify};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const US: &str = "1.2.840.10008.5.1.4.1.1.6.1";
const JPEG: &str = "1.2.840.10008.1.2.4.50";
const PRIVATE: &str = "1.3.12.2.1107.5.9.1";
/// The requester's receive limit: objects of 10 KB and more span PDUs.
const PEER_MAX_PDU: u32 = 4096;
const IDENTIFIER: &[u8] = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ";

fn u(s: &str) -> Uid {
    Uid::new(s).expect("valid UID")
}

fn ae(s: &str) -> AeTitle {
    AeTitle::new(s).expect("valid AE title")
}

/// A data set that yields `good` bytes, then fails.
struct Broken {
    good: usize,
}

impl AsyncRead for Broken {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.good == 0 {
            return Poll::Ready(Err(std::io::Error::other("disk read error")));
        }
        let n = self.good.min(buf.remaining());
        buf.put_slice(&vec![0x55; n]);
        self.good -= n;
        Poll::Ready(Ok(()))
    }
}

/// One stored object of the in-memory archive.
#[derive(Clone, Debug)]
struct Stored {
    class: Uid,
    instance: Uid,
    ts: Uid,
    bytes: Vec<u8>,
}

/// Data set bytes that differ at every position, so that a lost, doubled
/// or reordered fragment shows.
fn object(class: &str, n: u32, ts: &str, len: usize) -> Stored {
    let bytes = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(n) as u8)
        .collect();
    Stored {
        class: u(class),
        instance: u(&format!("1.2.826.0.1.3680043.9.{n}")),
        ts: u(ts),
        bytes,
    }
}

/// What the archive hands over for one object.
#[derive(Clone, Debug)]
enum Item {
    /// the object, readable
    Object(Stored),
    /// the application's failure for this object
    Fail(Option<Uid>),
    /// the object, whose data set cannot be read past `good` bytes
    Broken(Stored, usize),
}

impl Item {
    fn outgoing(self) -> Result<Outgoing, SubOperationFailure> {
        match self {
            Item::Object(o) => {
                let length = o.bytes.len() as u64;
                Ok(Outgoing {
                    sop_class: o.class,
                    sop_instance: o.instance,
                    transfer_syntax: o.ts,
                    length,
                    data: Box::pin(std::io::Cursor::new(o.bytes)),
                })
            }
            Item::Broken(o, good) => Ok(Outgoing {
                sop_class: o.class,
                sop_instance: o.instance,
                transfer_syntax: o.ts,
                length: o.bytes.len() as u64,
                data: Box::pin(Broken { good }),
            }),
            Item::Fail(instance) => Err(SubOperationFailure::new(
                instance,
                Failure::new(status::UNABLE_TO_PERFORM_SUB_OPERATIONS, "file gone"),
            )),
        }
    }
}

/// One request as the service saw it.
struct Asked {
    operation: RetrieveOperation,
    model: Uid,
    identifier: Vec<u8>,
    destination: Option<AeTitle>,
    priority: u16,
}

/// One retrieve as the observer saw it end.
struct Retrieved {
    operation: RetrieveOperation,
    status: u16,
    counts: SubOperationCounts,
    destination: Option<AeTitle>,
    comment: Option<String>,
    first_failure: Option<String>,
}

/// What the service and the observer saw.
#[derive(Default)]
struct Seen {
    asked: Vec<Asked>,
    /// each sub-operation: instance, result, status
    subs: Vec<(Option<Uid>, SubOperationResult, u16)>,
    retrieved: Vec<Retrieved>,
}

/// A service with objects in memory, answering C-GET and C-MOVE from them.
#[derive(Clone)]
struct Archive {
    items: Vec<Item>,
    /// the number of sub-operations announced (the items' by default)
    announce: Option<u64>,
    /// the items are handed over only once this is notified (when set)
    gate: Option<Arc<Notify>>,
    /// notified when the producer found the channel closed
    stopped: Arc<Notify>,
    /// the connection to the C-MOVE destination, taken by the C-MOVE
    destination: Arc<Mutex<Option<DuplexStream>>>,
    /// calls of `get` and `move_`
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Seen>>,
}

impl Archive {
    fn new(items: Vec<Item>) -> Self {
        Archive {
            items,
            announce: None,
            gate: None,
            stopped: Arc::new(Notify::new()),
            destination: Arc::default(),
            calls: Arc::default(),
            seen: Arc::default(),
        }
    }

    fn retrieval(&self, rq: &RetrieveRequest<'_>) -> Retrieval {
        self.seen.lock().expect("lock").asked.push(Asked {
            operation: rq.operation,
            model: rq.sop_class.clone(),
            identifier: rq.identifier.to_vec(),
            destination: rq.move_destination.cloned(),
            priority: rq.priority,
        });
        let mut presentations: Vec<(Uid, Uid)> = Vec::new();
        for item in &self.items {
            if let Item::Object(o) | Item::Broken(o, _) = item {
                let pair = (o.class.clone(), o.ts.clone());
                if !presentations.contains(&pair) {
                    presentations.push(pair);
                }
            }
        }
        let (tx, rx) = mpsc::channel(2);
        let items = self.items.clone();
        let gate = self.gate.clone();
        let stopped = Arc::clone(&self.stopped);
        tokio::spawn(async move {
            for (i, item) in items.into_iter().enumerate() {
                if i == 1 {
                    if let Some(gate) = &gate {
                        gate.notified().await;
                    }
                }
                if tx.send(item.outgoing()).await.is_err() {
                    stopped.notify_one();
                    return;
                }
            }
        });
        Retrieval {
            sub_operations: self.announce.unwrap_or(self.items.len() as u64),
            presentations,
            objects: rx,
        }
    }
}

/// Storage is not what the requester's association exercises.
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

impl Service for Archive {
    type Object = NoObject;

    fn store(&self, _: &AssociationInfo, _: &StoreRequest<'_>) -> Result<NoObject, Failure> {
        Ok(NoObject)
    }

    async fn get(
        &self,
        _: &AssociationInfo,
        rq: &RetrieveRequest<'_>,
    ) -> Result<Retrieval, Failure> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(self.retrieval(rq))
    }

    async fn move_(
        &self,
        _: &AssociationInfo,
        rq: &RetrieveRequest<'_>,
    ) -> Result<MoveRetrieval, Failure> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if rq.move_destination != Some(&ae("STORESCP")) {
            return Err(Failure::new(
                status::MOVE_DESTINATION_UNKNOWN,
                "unknown Move Destination",
            ));
        }
        let Some(stream) = self.destination.lock().expect("lock").take() else {
            return Err(Failure::new(
                status::UNABLE_TO_PROCESS,
                "no connection to the destination",
            ));
        };
        Ok(MoveRetrieval {
            retrieval: self.retrieval(rq),
            destination: MoveDestination {
                transport: Box::new(stream),
                called_ae: ae("STORESCP"),
                calling_ae: ae("MINIPACS"),
            },
        })
    }
}

impl Observer<()> for Archive {
    fn sub_operation(&self, _: &AssociationInfo, outcome: &SubOperationOutcome<'_>) {
        self.seen.lock().expect("lock").subs.push((
            outcome.sop_instance.cloned(),
            outcome.result,
            outcome.status,
        ));
    }

    fn retrieved(&self, _: &AssociationInfo, outcome: &RetrieveOutcome<'_>) {
        self.seen.lock().expect("lock").retrieved.push(Retrieved {
            operation: outcome.operation,
            status: outcome.status,
            counts: outcome.counts,
            destination: outcome.destination.cloned(),
            comment: outcome.comment.map(str::to_string),
            first_failure: outcome.first_failure.map(str::to_string),
        });
    }
}

/// A service with no C-GET or C-MOVE of its own.
struct Refuser;

impl Service for Refuser {
    type Object = NoObject;
    fn store(&self, _: &AssociationInfo, _: &StoreRequest<'_>) -> Result<NoObject, Failure> {
        Ok(NoObject)
    }
}

impl Observer<()> for Refuser {}

/// The storage contexts a requester proposes: (id, class, syntaxes).
type Proposal = (u8, &'static str, Vec<&'static str>);

/// An A-ASSOCIATE-RQ from "GETSCU": the retrieve models (context 1 Study
/// Root GET, 3 Study Root MOVE, 5 Patient Root GET), `storage`, and a
/// role selection asking for the SCP role for each class in `scp_roles`.
fn associate_rq(storage: &[Proposal], scp_roles: &[&str]) -> AssociationRQ {
    let pc = |id, abs: &str, ts: &[&str]| PresentationContextProposed {
        id,
        abstract_syntax: abs.into(),
        transfer_syntaxes: ts.iter().map(|s| s.to_string()).collect(),
    };
    let mut contexts = vec![
        pc(1, uid::STUDY_ROOT_GET, &[uid::EXPLICIT_VR_LE]),
        pc(3, uid::STUDY_ROOT_MOVE, &[uid::EXPLICIT_VR_LE]),
        pc(5, uid::PATIENT_ROOT_GET, &[uid::IMPLICIT_VR_LE]),
    ];
    for (id, abs, ts) in storage {
        contexts.push(pc(*id, abs, ts));
    }
    let mut user_variables = vec![UserVariableItem::MaxLength(PEER_MAX_PDU)];
    for class in scp_roles {
        user_variables.push(UserVariableItem::ScuScpRoleSelectionSubItem(
            class.to_string(),
            RequestorRoles {
                scu: false,
                scp: true,
            },
        ));
    }
    AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "GETSCU".into(),
        called_ae_title: "MINIPACS".into(),
        application_context_name: uid::APPLICATION_CONTEXT.into(),
        presentation_contexts: contexts,
        user_variables,
    }
}

fn policy(name: &str, retrieve: bool) -> AcceptPolicy {
    AcceptPolicy {
        ae_title: ae(name),
        max_pdu: 16384,
        accept_private_sop_classes: false,
        allow: Vec::new(),
        find: false,
        retrieve,
        commitment: false,
    }
}

const FACTS: PeerFacts<'static> = PeerFacts {
    addr: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    cert_common_names: &[],
};

/// Negotiates `rq` as the SCP would; returns the contexts and the role
/// items of the A-ASSOCIATE-AC.
fn negotiate(rq: &AssociationRQ) -> (Box<ContextTable>, Vec<(String, RequestorRoles)>) {
    let Negotiated::Accept { ac, contexts, .. } =
        negotiation::negotiate(rq, &policy("MINIPACS", true), &FACTS)
    else {
        panic!("expected acceptance");
    };
    let roles = ac
        .user_variables
        .iter()
        .filter_map(|v| match v {
            UserVariableItem::ScuScpRoleSelectionSubItem(class, roles) => {
                Some((class.clone(), *roles))
            }
            _ => None,
        })
        .collect();
    (contexts, roles)
}

fn info(calling: &str, max_pdu: u32, peer_max_pdu: u32) -> AssociationInfo {
    AssociationInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 104)),
        calling_ae: calling.into(),
        called_ae: "MINIPACS".into(),
        dimse_timeout: Duration::from_secs(5),
        max_pdu,
        peer_max_pdu,
    }
}

/// Bytes of P-DATA-TF PDUs carrying `data` on `context`, one PDV each.
fn pdatas(context: u8, is_command: bool, data: &[u8], fragment: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = data.chunks(fragment.max(1)).collect();
    let chunks = if chunks.is_empty() {
        vec![&[][..]]
    } else {
        chunks
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        out.extend_from_slice(&pdu::pdata_headers(context, is_command, last, chunk.len()));
        out.extend_from_slice(chunk);
    }
    out
}

/// A C-GET-RQ or C-MOVE-RQ (its command as given) with the identifier.
fn request(context: u8, rq: &[u8]) -> Vec<u8> {
    let mut out = pdatas(context, true, rq, 4000);
    out.extend_from_slice(&pdatas(context, false, IDENTIFIER, 7));
    out
}

fn get_rq(context: u8, message_id: u16) -> Vec<u8> {
    request(
        context,
        &command::get_rq(message_id, &u(uid::STUDY_ROOT_GET), 0),
    )
}

fn move_rq(context: u8, message_id: u16, destination: &str) -> Vec<u8> {
    request(
        context,
        &command::move_rq(message_id, &u(uid::STUDY_ROOT_MOVE), 2, &ae(destination)),
    )
}

/// One DIMSE message the SCP sent, with the context it came on.
#[derive(Debug)]
struct Message {
    context: u8,
    command: Command,
    data: Vec<u8>,
}

/// The requester: writes requests, reads whole messages (checking every
/// PDU fits its announced maximum), answers C-STOREs.
struct Peer {
    reader: PduReader<ReadHalf<DuplexStream>>,
    writer: WriteHalf<DuplexStream>,
}

impl Peer {
    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("peer write");
    }

    /// The next message, or the PDU type of something else (A-RELEASE-RP,
    /// A-ABORT; `None` when closed).
    async fn message(&mut self) -> Result<Message, Option<PduType>> {
        let mut command = Vec::new();
        let mut data = Vec::new();
        let mut cmd: Option<(u8, Command)> = None;
        loop {
            let header = match self.reader.read_header().await {
                Ok(Some(h)) => h,
                Ok(None) => return Err(None),
                Err(e) => panic!("the SCP's PDUs must fit our maximum: {e}"),
            };
            if header.pdu_type != PduType::PData {
                let _ = self.reader.read_body(header).await;
                return Err(Some(header.pdu_type));
            }
            let body = self.reader.read_body(header).await.map_err(|_| None)?;
            for pdv in pdu::pdvs(body) {
                let pdv = pdv.expect("well-formed PDV");
                if pdv.is_command {
                    command.extend_from_slice(pdv.data);
                    if pdv.is_last {
                        let c = Command::decode(&command).expect("a command");
                        if !c.has_data_set {
                            return Ok(Message {
                                context: pdv.context_id,
                                command: c,
                                data,
                            });
                        }
                        cmd = Some((pdv.context_id, c));
                    }
                } else {
                    data.extend_from_slice(pdv.data);
                    if pdv.is_last {
                        let (context, command) = cmd.take().expect("command before data");
                        return Ok(Message {
                            context,
                            command,
                            data,
                        });
                    }
                }
            }
        }
    }

    /// Answers a C-STORE-RQ with `code`.
    async fn store_rsp(&mut self, m: &Message, code: u16) {
        let rsp = command::store_rsp(
            m.command.message_id,
            m.command.sop_class.as_ref().expect("class"),
            m.command.sop_instance.as_ref().expect("instance"),
            code,
            (code != 0).then_some("refused by the test"),
        );
        // Cut in two PDVs, to be assembled by the SCP.
        let bytes = pdatas(m.context, true, &rsp, rsp.len() / 2 + 1);
        self.send(&bytes).await;
    }

    async fn release(&mut self) {
        self.send(&pdu::RELEASE_RQ).await;
        assert_eq!(self.message().await.err(), Some(Some(PduType::ReleaseRp)));
    }
}

/// What a requester made of a retrieve: the objects it received (with
/// their C-STORE-RQ), the pending responses and the final one.
#[derive(Debug, Default)]
struct Answer {
    stores: Vec<Message>,
    pending: Vec<Command>,
    last: Option<Message>,
}

impl Answer {
    fn last(&self) -> &Command {
        &self.last.as_ref().expect("a final response").command
    }

    /// The Failed SOP Instance UID List of the final response's identifier
    /// (Explicit VR Little Endian).
    fn failed_list(&self) -> Vec<String> {
        let data = &self.last.as_ref().expect("a final response").data;
        assert_eq!(
            &data[..6],
            b"\x08\x00\x58\x00UI",
            "one element: (0008,0058) UI"
        );
        let len = u16::from_le_bytes([data[6], data[7]]) as usize;
        assert_eq!(len, data.len() - 8);
        let text = std::str::from_utf8(&data[8..]).expect("ASCII");
        let text = text.trim_end_matches('\0');
        if text.is_empty() {
            return Vec::new();
        }
        text.split('\\').map(str::to_string).collect()
    }
}

/// Reads a retrieve's messages to its final response, answering each
/// C-STORE-RQ with `answer(index, &message)`; `on_store` runs before the
/// answer (e.g. to send a C-CANCEL-RQ).
async fn collect(
    peer: &mut Peer,
    rsp_field: u16,
    mut answer: impl FnMut(usize) -> u16,
    mut on_store: impl FnMut(usize) -> Option<Vec<u8>>,
) -> Answer {
    let mut out = Answer::default();
    loop {
        let m = peer.message().await.expect("a message");
        match m.command.command_field {
            field::C_STORE_RQ => {
                let i = out.stores.len();
                if let Some(bytes) = on_store(i) {
                    peer.send(&bytes).await;
                }
                peer.store_rsp(&m, answer(i)).await;
                out.stores.push(m);
            }
            f if f == rsp_field => {
                if m.command.status == Some(status::PENDING) {
                    assert!(!m.command.has_data_set, "no identifier when pending");
                    out.pending.push(m.command);
                } else {
                    out.last = Some(m);
                    return out;
                }
            }
            other => panic!("unexpected command 0x{other:04X}"),
        }
    }
}

/// Runs the SCP side over a stream read `max_read` bytes at a time, with
/// `peer` on the other side.
async fn with_peer<Sv, F, Fut>(
    service: Sv,
    contexts: Box<ContextTable>,
    max_read: usize,
    peer: F,
) -> Ended
where
    Sv: Service + Observer<<Sv::Object as IncomingObject>::Receipt> + 'static,
    F: FnOnce(Peer) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (theirs, ours) = tokio::io::duplex(8192);
    let (r, w) = tokio::io::split(theirs);
    let peer_task = tokio::spawn(peer(Peer {
        reader: PduReader::new(r, PEER_MAX_PDU),
        writer: w,
    }));
    let association = info("GETSCU", 16384, PEER_MAX_PDU);
    let ended = scp::run_association(
        Trickle::new(ours, max_read),
        &association,
        &contexts,
        &service,
        &service,
        std::future::pending(),
    )
    .await;
    peer_task.await.expect("the peer's checks pass");
    ended
}

const READS: [usize; 3] = [1, 7, 5000];

fn get_contexts() -> Box<ContextTable> {
    let rq = associate_rq(
        &[
            (7, CT, vec![uid::EXPLICIT_VR_LE, uid::IMPLICIT_VR_LE]),
            (9, MR, vec![uid::IMPLICIT_VR_LE]),
            (11, CT, vec![JPEG]),
            // Proposed without a role selection: not for C-GET.
            (13, US, vec![uid::IMPLICIT_VR_LE]),
        ],
        &[CT, MR],
    );
    negotiate(&rq).0
}

#[test]
fn the_scp_role_is_granted_and_answered_for_storage_classes_only_when_retrieve_is_on() {
    let rq = associate_rq(
        &[
            (7, CT, vec![uid::EXPLICIT_VR_LE]),
            (9, MR, vec![uid::IMPLICIT_VR_LE]),
            (11, US, vec![uid::IMPLICIT_VR_LE]),
        ],
        // A role for a class without a context, and for a non-storage one.
        &[CT, MR, "1.2.840.10008.5.1.4.1.1.7", uid::STUDY_ROOT_FIND],
    );
    let (contexts, roles) = negotiate(&rq);
    let role = |id: u8| {
        contexts
            .iter()
            .find(|c| c.id == id)
            .map(|c| (c.service, c.peer_scp_role))
    };
    use negotiation::ServiceClass::*;
    assert_eq!(role(1), Some((Get, false)));
    assert_eq!(role(3), Some((Move, false)));
    assert_eq!(role(5), Some((Get, false)));
    assert_eq!(role(7), Some((Storage, true)));
    assert_eq!(role(9), Some((Storage, true)));
    // Proposed without a role selection: the peer stays SCU there.
    assert_eq!(role(11), Some((Storage, false)));
    let granted = RequestorRoles {
        scu: false,
        scp: true,
    };
    assert_eq!(
        roles,
        vec![(CT.to_string(), granted), (MR.to_string(), granted)]
    );

    // Retrieve off: the models are refused, no role is granted or answered.
    let Negotiated::Accept { ac, contexts, .. } =
        negotiation::negotiate(&rq, &policy("MINIPACS", false), &FACTS)
    else {
        panic!("storage is still accepted");
    };
    assert!(contexts.iter().all(|c| !c.peer_scp_role));
    assert!(contexts.iter().all(|c| c.service == Storage));
    assert_eq!(
        ac.presentation_contexts[0].reason,
        PresentationContextResultReason::AbstractSyntaxNotSupported
    );
    assert!(!ac
        .user_variables
        .iter()
        .any(|v| matches!(v, UserVariableItem::ScuScpRoleSelectionSubItem(..))));
}

#[tokio::test]
async fn a_get_sends_each_object_byte_identical_on_the_scp_role_contexts() {
    for max_read in READS {
        let objects = vec![
            object(CT, 1, uid::EXPLICIT_VR_LE, 40_000),
            object(MR, 2, uid::IMPLICIT_VR_LE, 3),
            object(CT, 3, JPEG, 4093),
            object(CT, 4, uid::EXPLICIT_VR_LE, 0),
        ];
        let archive = Archive::new(objects.iter().cloned().map(Item::Object).collect());
        let sent = objects.clone();
        let ended = with_peer(
            archive.clone(),
            get_contexts(),
            max_read,
            |mut peer| async move {
                peer.send(&get_rq(1, 9)).await;
                let answer = collect(&mut peer, field::C_GET_RSP, |_| 0, |_| None).await;
                assert_eq!(answer.stores.len(), 4);
                for (m, o) in answer.stores.iter().zip(&sent) {
                    assert_eq!(m.command.sop_instance.as_ref(), Some(&o.instance));
                    assert_eq!(m.command.sop_class.as_ref(), Some(&o.class));
                    assert_eq!(m.data, o.bytes, "byte-identical");
                    // On the context of its class and syntax.
                    let expected_context = match (o.class.as_str(), o.ts.as_str()) {
                        (CT, JPEG) => 11,
                        (CT, _) => 7,
                        _ => 9,
                    };
                    assert_eq!(m.context, expected_context);
                    assert_eq!(m.command.move_originator(), None);
                }
                let remaining: Vec<_> = answer
                    .pending
                    .iter()
                    .map(|c| {
                        (
                            c.sub_operations.remaining,
                            c.sub_operations.completed,
                            c.message_id,
                        )
                    })
                    .collect();
                assert_eq!(
                    remaining,
                    vec![
                        (Some(3), Some(1), 9),
                        (Some(2), Some(2), 9),
                        (Some(1), Some(3), 9)
                    ]
                );
                let last = answer.last();
                assert_eq!(last.status, Some(status::SUCCESS));
                assert!(!last.has_data_set);
                assert_eq!(
                    last.sub_operations,
                    command::SubOperations {
                        remaining: None,
                        completed: Some(4),
                        failed: Some(0),
                        warning: Some(0)
                    }
                );
                peer.release().await;
            },
        )
        .await;
        assert!(ended.result.is_ok(), "{:?}", ended.result);
        assert_eq!(ended.summary.retrieves, 1);
        assert_eq!(ended.summary.sent, 4);
        assert_eq!(ended.summary.sent_bytes, 40_000 + 3 + 4093);
        let seen = archive.seen.lock().expect("lock");
        assert_eq!(seen.asked.len(), 1);
        assert_eq!(seen.asked[0].operation, RetrieveOperation::Get);
        assert_eq!(seen.asked[0].model, u(uid::STUDY_ROOT_GET));
        assert_eq!(seen.asked[0].identifier, IDENTIFIER);
        assert_eq!(seen.subs.len(), 4);
        assert!(seen
            .subs
            .iter()
            .all(|s| s.1 == SubOperationResult::Completed));
        assert_eq!(seen.retrieved.len(), 1);
        assert_eq!(seen.retrieved[0].status, status::SUCCESS);
        assert_eq!(seen.retrieved[0].counts.completed, 4);
    }
}

#[tokio::test]
async fn refused_and_warned_sub_operations_end_with_b000_and_the_failed_list() {
    let objects: Vec<_> = (1..=4)
        .map(|n| object(CT, n, uid::EXPLICIT_VR_LE, 5000))
        .collect();
    let refused = objects[1].instance.to_string();
    let archive = Archive::new(objects.into_iter().map(Item::Object).collect());
    let ended = with_peer(
        archive.clone(),
        get_contexts(),
        7,
        move |mut peer| async move {
            peer.send(&get_rq(1, 3)).await;
            let codes = [0x0000, 0xA700, 0xB007, 0xB000];
            let answer = collect(&mut peer, field::C_GET_RSP, |i| codes[i], |_| None).await;
            assert_eq!(answer.stores.len(), 4);
            let last = answer.last();
            assert_eq!(last.status, Some(status::SUB_OPERATIONS_WARNING));
            assert!(last.has_data_set);
            assert_eq!(
                last.sub_operations,
                command::SubOperations {
                    remaining: None,
                    completed: Some(1),
                    failed: Some(1),
                    warning: Some(2)
                }
            );
            assert_eq!(answer.failed_list(), vec![refused]);
            assert_eq!(answer.pending[2].sub_operations.warning, Some(1));
            peer.release().await;
        },
    )
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    assert_eq!(ended.summary.sent, 3);
    let seen = archive.seen.lock().expect("lock");
    assert_eq!(
        seen.retrieved[0].first_failure.as_deref(),
        Some("A700 refused by the test")
    );
    assert_eq!(seen.retrieved[0].comment, None);
    let results: Vec<_> = seen.subs.iter().map(|s| (s.1, s.2)).collect();
    use SubOperationResult::*;
    assert_eq!(
        results,
        vec![
            (Completed, 0),
            (Failed, 0xA700),
            (Warning, 0xB007),
            (Warning, 0xB000)
        ]
    );
}

#[tokio::test]
async fn objects_without_an_scp_role_context_or_readable_data_fail_unsent() {
    // US has a context, but the peer did not take the SCP role for it; MR
    // in Explicit VR has none (only Implicit was proposed); the third fails in the application; the
    // fourth cannot be read at all. Nothing is sent: A702, all listed.
    let us = object(US, 1, uid::IMPLICIT_VR_LE, 100);
    let mr = object(MR, 2, uid::EXPLICIT_VR_LE, 100);
    let unreadable = object(CT, 4, uid::EXPLICIT_VR_LE, 100);
    let failed = vec![
        us.instance.to_string(),
        mr.instance.to_string(),
        "1.2.3.3".to_string(),
        unreadable.instance.to_string(),
    ];
    let archive = Archive::new(vec![
        Item::Object(us),
        Item::Object(mr),
        Item::Fail(Some(u("1.2.3.3"))),
        Item::Fail(None),
        Item::Broken(unreadable, 0),
    ]);
    let ended = with_peer(
        archive.clone(),
        get_contexts(),
        1,
        move |mut peer| async move {
            peer.send(&get_rq(1, 4)).await;
            let answer = collect(&mut peer, field::C_GET_RSP, |_| 0, |_| None).await;
            assert!(answer.stores.is_empty(), "nothing is sent");
            assert_eq!(answer.pending.len(), 4);
            let last = answer.last();
            assert_eq!(last.status, Some(status::UNABLE_TO_PERFORM_SUB_OPERATIONS));
            assert_eq!(last.sub_operations.failed, Some(5));
            assert_eq!(last.sub_operations.completed, Some(0));
            assert!(last
                .error_comment
                .as_ref()
                .is_some_and(|c| c.starts_with("all 5 sub-operations failed")));
            assert_eq!(answer.failed_list(), failed);
            peer.release().await;
        },
    )
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    let seen = archive.seen.lock().expect("lock");
    assert_eq!(seen.subs[0].2, status::SOP_CLASS_NOT_SUPPORTED);
    assert_eq!(seen.retrieved[0].counts.failed, 5);
}

#[tokio::test]
async fn a_data_set_that_breaks_after_it_began_aborts_the_get() {
    let broken = object(CT, 1, uid::EXPLICIT_VR_LE, 20_000);
    let archive = Archive::new(vec![Item::Broken(broken, 9000)]);
    let ended = with_peer(archive, get_contexts(), 5000, |mut peer| async move {
        peer.send(&get_rq(1, 4)).await;
        // The command and part of the data set, then an A-ABORT.
        match peer.message().await {
            Ok(m) => panic!("no whole message: {m:?}"),
            Err(end) => assert_eq!(end, Some(PduType::Abort)),
        }
    })
    .await;
    assert!(
        matches!(ended.result, Err(AssociationError::SubOperationData { .. })),
        "{:?}",
        ended.result
    );
}

#[tokio::test]
async fn a_cancel_mid_get_ends_with_fe00_after_the_sub_operation_in_progress() {
    let objects: Vec<_> = (1..=6)
        .map(|n| object(CT, n, uid::EXPLICIT_VR_LE, 9000))
        .collect();
    let archive = Archive::new(objects.into_iter().map(Item::Object).collect());
    let stopped = Arc::clone(&archive.stopped);
    let cancel = pdatas(1, true, &command::cancel_rq(5), 4000);
    let ended = with_peer(
        archive.clone(),
        get_contexts(),
        1,
        move |mut peer| async move {
            peer.send(&get_rq(1, 5)).await;
            // The cancel goes out while the second object's C-STORE-RSP is due:
            // that one is still counted, nothing after it is sent.
            let answer = collect(
                &mut peer,
                field::C_GET_RSP,
                |_| 0,
                |i| (i == 1).then(|| cancel.clone()),
            )
            .await;
            assert_eq!(answer.stores.len(), 2);
            let last = answer.last();
            assert_eq!(last.status, Some(status::CANCEL));
            assert_eq!(
                last.sub_operations,
                command::SubOperations {
                    remaining: Some(4),
                    completed: Some(2),
                    failed: Some(0),
                    warning: Some(0)
                }
            );
            assert!(answer.failed_list().is_empty());
            // The association goes on: a second C-GET is answered.
            peer.send(&get_rq(1, 6)).await;
            let again = collect(&mut peer, field::C_GET_RSP, |_| 0, |_| None).await;
            assert_eq!(again.last().status, Some(status::SUCCESS));
            peer.release().await;
        },
    )
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    tokio::time::timeout(Duration::from_secs(5), stopped.notified())
        .await
        .expect("the producer saw the channel close");
    let seen = archive.seen.lock().expect("lock");
    assert_eq!(seen.retrieved[0].status, status::CANCEL);
    assert_eq!(seen.retrieved[0].counts.remaining, 4);
}

#[tokio::test]
async fn a_cancel_while_the_next_object_is_awaited_is_answered_at_once() {
    let mut archive = Archive::new(
        (1..=3)
            .map(|n| Item::Object(object(CT, n, uid::EXPLICIT_VR_LE, 10)))
            .collect(),
    );
    let gate = Arc::new(Notify::new());
    archive.gate = Some(Arc::clone(&gate));
    let ended = with_peer(archive, get_contexts(), 7, move |mut peer| async move {
        peer.send(&get_rq(1, 8)).await;
        let first = peer.message().await.expect("the first object");
        peer.store_rsp(&first, 0).await;
        let pending = peer.message().await.expect("a pending response");
        assert_eq!(pending.command.status, Some(status::PENDING));
        // The archive holds the second object back: the cancel is read.
        peer.send(&pdatas(1, true, &command::cancel_rq(8), 4000))
            .await;
        let last = peer.message().await.expect("the final response");
        assert_eq!(last.command.status, Some(status::CANCEL));
        assert_eq!(last.command.sub_operations.remaining, Some(2));
        gate.notify_one();
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
}

#[tokio::test]
async fn fewer_objects_than_announced_count_as_failed() {
    let mut archive = Archive::new(vec![Item::Object(object(CT, 1, uid::EXPLICIT_VR_LE, 10))]);
    archive.announce = Some(3);
    let ended = with_peer(archive, get_contexts(), 5000, |mut peer| async move {
        peer.send(&get_rq(1, 2)).await;
        let answer = collect(&mut peer, field::C_GET_RSP, |_| 0, |_| None).await;
        let last = answer.last();
        assert_eq!(last.status, Some(status::SUB_OPERATIONS_WARNING));
        assert_eq!(last.sub_operations.completed, Some(1));
        assert_eq!(last.sub_operations.failed, Some(2));
        assert!(answer.failed_list().is_empty(), "their UIDs are unknown");
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
}

/// One object the in-test destination stored.
struct Received {
    class: Uid,
    instance: Uid,
    bytes: Vec<u8>,
    originator: Option<MoveOriginator>,
}

/// What the in-test destination stored.
#[derive(Clone, Default)]
struct Destination {
    stored: Arc<Mutex<Vec<Received>>>,
    /// SOP instances it refuses (A700)
    refuse: Vec<Uid>,
}

struct DestinationObject {
    received: Received,
    refuse: bool,
    stored: Arc<Mutex<Vec<Received>>>,
}

impl IncomingObject for DestinationObject {
    type Receipt = ();
    fn write(&mut self, fragment: &[u8]) -> Result<(), Failure> {
        self.received.bytes.extend_from_slice(fragment);
        Ok(())
    }
    async fn commit(self) -> Result<(), Failure> {
        if self.refuse {
            return Err(Failure::new(status::OUT_OF_RESOURCES, "disk full"));
        }
        self.stored.lock().expect("lock").push(self.received);
        Ok(())
    }
}

impl Service for Destination {
    type Object = DestinationObject;
    fn store(
        &self,
        _: &AssociationInfo,
        rq: &StoreRequest<'_>,
    ) -> Result<DestinationObject, Failure> {
        Ok(DestinationObject {
            received: Received {
                class: rq.sop_class.clone(),
                instance: rq.sop_instance.clone(),
                bytes: Vec::new(),
                originator: rq.move_originator.cloned(),
            },
            refuse: self.refuse.contains(rq.sop_instance),
            stored: Arc::clone(&self.stored),
        })
    }
}

/// Runs the destination SCP (this crate's) on `stream`: storage only, in
/// Explicit and Implicit VR (the first proposed), PDUs of at most 4096.
async fn destination(stream: DuplexStream, service: Destination, max_read: usize) -> Ended {
    let mut stream = Trickle::new(stream, max_read);
    let rq = scp::read_associate_rq(&mut stream)
        .await
        .expect("an A-ASSOCIATE-RQ");
    assert_eq!(rq.calling_ae_title.trim(), "MINIPACS");
    assert_eq!(rq.called_ae_title.trim(), "STORESCP");
    let mut policy = policy("STORESCP", false);
    policy.max_pdu = 4096;
    let Negotiated::Accept {
        ac,
        contexts,
        peer_max_pdu,
    } = negotiation::negotiate(&rq, &policy, &FACTS)
    else {
        panic!("the destination accepts storage");
    };
    scp::send_pdu(&mut stream, &dimse::ul::Pdu::AssociationAC(ac))
        .await
        .expect("A-ASSOCIATE-AC");
    let mut association = info("MINIPACS", 4096, peer_max_pdu);
    association.called_ae = "STORESCP".into();
    scp::run_association(
        stream,
        &association,
        &contexts,
        &service,
        &(),
        std::future::pending(),
    )
    .await
}

#[tokio::test]
async fn a_move_sends_each_object_to_the_destination_with_the_move_originator() {
    for max_read in READS {
        let objects = [
            object(CT, 1, uid::EXPLICIT_VR_LE, 50_000),
            object(MR, 2, uid::IMPLICIT_VR_LE, 4096),
            object(CT, 3, uid::EXPLICIT_VR_LE, 1),
            // A private class: proposed, refused by the destination.
            object(PRIVATE, 4, JPEG, 100),
        ];
        let archive = Archive::new(objects.iter().cloned().map(Item::Object).collect());
        let (to_destination, at_destination) = tokio::io::duplex(8192);
        *archive.destination.lock().expect("lock") = Some(to_destination);
        let store = Destination {
            refuse: vec![objects[2].instance.clone()],
            ..Destination::default()
        };
        let dest_task = tokio::spawn(destination(at_destination, store.clone(), max_read));
        let rq = associate_rq(&[], &[]);
        let (contexts, _) = negotiate(&rq);
        let failed = vec![
            objects[2].instance.to_string(),
            objects[3].instance.to_string(),
        ];
        let ended = with_peer(
            archive.clone(),
            contexts,
            max_read,
            move |mut peer| async move {
                peer.send(&move_rq(3, 21, "STORESCP")).await;
                let answer = collect(&mut peer, field::C_MOVE_RSP, |_| 0, |_| None).await;
                assert!(answer.stores.is_empty(), "objects go to the destination");
                assert_eq!(answer.pending.len(), 3);
                let last = answer.last();
                assert_eq!(last.status, Some(status::SUB_OPERATIONS_WARNING));
                assert_eq!(
                    last.sub_operations,
                    command::SubOperations {
                        remaining: None,
                        completed: Some(2),
                        failed: Some(2),
                        warning: Some(0)
                    }
                );
                assert_eq!(answer.failed_list(), failed);
                peer.release().await;
            },
        )
        .await;
        assert!(ended.result.is_ok(), "{:?}", ended.result);
        // The destination association was released at the end.
        let dest_ended = dest_task.await.expect("destination task");
        assert!(dest_ended.result.is_ok(), "{:?}", dest_ended.result);
        assert_eq!(dest_ended.summary.stored, 2);
        assert_eq!(dest_ended.summary.failed, 1);
        let stored = store.stored.lock().expect("lock");
        assert_eq!(stored.len(), 2);
        for (got, o) in stored.iter().zip([&objects[0], &objects[1]]) {
            assert_eq!((&got.class, &got.instance), (&o.class, &o.instance));
            assert_eq!(got.bytes, o.bytes, "byte-identical");
            assert_eq!(
                got.originator.as_ref(),
                Some(&MoveOriginator {
                    ae_title: ae("GETSCU"),
                    message_id: 21
                })
            );
        }
        let seen = archive.seen.lock().expect("lock");
        assert_eq!(seen.asked[0].destination, Some(ae("STORESCP")));
        assert_eq!(
            seen.asked[0].priority, 2,
            "the priority reaches the service"
        );
        let end = &seen.retrieved[0];
        assert_eq!(end.operation, RetrieveOperation::Move);
        assert_eq!(end.status, status::SUB_OPERATIONS_WARNING);
        assert_eq!((end.counts.completed, end.counts.failed), (2, 2));
        assert_eq!(end.destination, Some(ae("STORESCP")));
    }
}

#[tokio::test]
async fn a_cancel_mid_move_ends_with_fe00_and_releases_the_destination() {
    let objects: Vec<_> = (1..=4)
        .map(|n| object(CT, n, uid::EXPLICIT_VR_LE, 30_000))
        .collect();
    let mut archive = Archive::new(objects.iter().cloned().map(Item::Object).collect());
    let gate = Arc::new(Notify::new());
    archive.gate = Some(Arc::clone(&gate));
    let (to_destination, at_destination) = tokio::io::duplex(8192);
    *archive.destination.lock().expect("lock") = Some(to_destination);
    let store = Destination::default();
    let dest_task = tokio::spawn(destination(at_destination, store.clone(), 7));
    let (contexts, _) = negotiate(&associate_rq(&[], &[]));
    let ended = with_peer(archive, contexts, 1, move |mut peer| async move {
        peer.send(&move_rq(3, 4, "STORESCP")).await;
        let pending = peer.message().await.expect("a pending response");
        assert_eq!(pending.command.status, Some(status::PENDING));
        peer.send(&pdatas(3, true, &command::cancel_rq(4), 4000))
            .await;
        gate.notify_one();
        let last = peer.message().await.expect("the final response");
        assert_eq!(last.command.command_field, field::C_MOVE_RSP);
        assert_eq!(last.command.status, Some(status::CANCEL));
        assert_eq!(last.command.sub_operations.completed, Some(1));
        assert_eq!(last.command.sub_operations.remaining, Some(3));
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    let dest_ended = dest_task.await.expect("destination task");
    assert!(dest_ended.result.is_ok(), "{:?}", dest_ended.result);
    assert_eq!(store.stored.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn a_destination_that_rejects_the_association_fails_every_object() {
    let objects: Vec<_> = (1..=2)
        .map(|n| Item::Object(object(CT, n, uid::EXPLICIT_VR_LE, 10)))
        .collect();
    let archive = Archive::new(objects);
    let (to_destination, mut at_destination) = tokio::io::duplex(8192);
    *archive.destination.lock().expect("lock") = Some(to_destination);
    let dest_task = tokio::spawn(async move {
        let _ = scp::read_associate_rq(&mut at_destination).await;
        let rj = negotiation::reject_busy();
        let _ = scp::send_pdu(&mut at_destination, &dimse::ul::Pdu::AssociationRJ(rj)).await;
    });
    let (contexts, _) = negotiate(&associate_rq(&[], &[]));
    let ended = with_peer(archive.clone(), contexts, 7, |mut peer| async move {
        peer.send(&move_rq(3, 4, "STORESCP")).await;
        let answer = collect(&mut peer, field::C_MOVE_RSP, |_| 0, |_| None).await;
        let last = answer.last();
        assert_eq!(last.status, Some(status::UNABLE_TO_PERFORM_SUB_OPERATIONS));
        assert_eq!(last.sub_operations.failed, Some(2));
        assert_eq!(answer.failed_list().len(), 2);
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    dest_task.await.expect("destination task");
    let seen = archive.seen.lock().expect("lock");
    let comment = seen.retrieved[0].comment.as_deref().unwrap_or_default();
    assert!(comment.contains("rejected"), "{comment}");
}

#[tokio::test]
async fn unknown_or_missing_move_destinations_are_refused_with_a801() {
    let archive = Archive::new(vec![Item::Object(object(CT, 1, uid::EXPLICIT_VR_LE, 10))]);
    let (contexts, _) = negotiate(&associate_rq(&[], &[]));
    let ended = with_peer(archive.clone(), contexts, 1, |mut peer| async move {
        // Unknown to the service: its refusal.
        peer.send(&move_rq(3, 1, "NOWHERE")).await;
        let m = peer.message().await.expect("a response");
        assert_eq!(m.command.command_field, field::C_MOVE_RSP);
        assert_eq!(m.command.status, Some(status::MOVE_DESTINATION_UNKNOWN));
        assert_eq!(m.command.sub_operations, command::SubOperations::default());
        assert!(!m.command.has_data_set);
        // A C-MOVE-RQ without (0000,0600): refused before the service.
        let mut no_destination = command::get_rq(2, &u(uid::STUDY_ROOT_MOVE), 0);
        // C-GET-RQ -> C-MOVE-RQ: the (0000,0100) value.
        let at = no_destination
            .windows(8)
            .position(|w| w == [0, 0, 0, 1, 2, 0, 0, 0])
            .expect("a command field");
        no_destination[at + 8] = 0x21;
        let cmd = Command::decode(&no_destination).expect("decodes");
        assert_eq!(cmd.command_field, field::C_MOVE_RQ);
        peer.send(&request(3, &no_destination)).await;
        let m = peer.message().await.expect("a response");
        assert_eq!(m.command.status, Some(status::MOVE_DESTINATION_UNKNOWN));
        assert_eq!(
            m.command.error_comment.as_deref(),
            Some("Move Destination missing or not a valid AE title")
        );
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    // Only the first reached the service.
    assert_eq!(archive.calls.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn get_and_move_on_the_wrong_context_or_without_a_service_are_refused() {
    // A C-GET on the MOVE context, and a C-MOVE on the GET context.
    let archive = Archive::new(Vec::new());
    let ended = with_peer(archive.clone(), get_contexts(), 7, |mut peer| async move {
        peer.send(&get_rq(3, 1)).await;
        let m = peer.message().await.expect("a response");
        assert_eq!(m.command.command_field, field::C_GET_RSP);
        assert_eq!(m.command.status, Some(status::SOP_CLASS_NOT_SUPPORTED));
        peer.send(&move_rq(1, 2, "STORESCP")).await;
        let m = peer.message().await.expect("a response");
        assert_eq!(m.command.status, Some(status::SOP_CLASS_NOT_SUPPORTED));
        // Nothing matches: success with zero counts.
        peer.send(&get_rq(1, 3)).await;
        let m = peer.message().await.expect("a response");
        assert_eq!(m.command.status, Some(status::SUCCESS));
        assert_eq!(m.command.sub_operations.completed, Some(0));
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    assert_eq!(archive.seen.lock().expect("lock").asked.len(), 1);

    // The default Service methods refuse both with 0122.
    let ended = with_peer(Refuser, get_contexts(), 1, |mut peer| async move {
        peer.send(&get_rq(1, 1)).await;
        let m = peer.message().await.expect("a response");
        assert_eq!(m.command.command_field, field::C_GET_RSP);
        assert_eq!(m.command.status, Some(status::SOP_CLASS_NOT_SUPPORTED));
        assert_eq!(
            m.command.error_comment.as_deref(),
            Some("C-GET not supported")
        );
        peer.send(&move_rq(3, 2, "STORESCP")).await;
        let m = peer.message().await.expect("a response");
        assert_eq!(m.command.command_field, field::C_MOVE_RSP);
        assert_eq!(m.command.status, Some(status::SOP_CLASS_NOT_SUPPORTED));
        assert_eq!(
            m.command.error_comment.as_deref(),
            Some("C-MOVE not supported")
        );
        peer.release().await;
    })
    .await;
    assert!(ended.result.is_ok(), "{:?}", ended.result);
    assert_eq!(ended.summary.retrieves, 2);
}

#[tokio::test]
async fn a_requester_that_never_answers_a_c_store_times_out() {
    let archive = Archive::new(vec![Item::Object(object(CT, 1, uid::EXPLICIT_VR_LE, 10))]);
    let (theirs, ours) = tokio::io::duplex(8192);
    let (r, w) = tokio::io::split(theirs);
    let mut peer = Peer {
        reader: PduReader::new(r, PEER_MAX_PDU),
        writer: w,
    };
    let mut association = info("GETSCU", 16384, PEER_MAX_PDU);
    association.dimse_timeout = Duration::from_millis(200);
    let contexts = get_contexts();
    let scp = scp::run_association(
        ours,
        &association,
        &contexts,
        &archive,
        &archive,
        std::future::pending(),
    );
    let requester = async {
        peer.send(&get_rq(1, 1)).await;
        let m = peer.message().await.expect("the object");
        assert_eq!(m.command.command_field, field::C_STORE_RQ);
        // Silence; then the SCP aborts.
        assert_eq!(peer.message().await.err(), Some(Some(PduType::Abort)));
    };
    let (ended, ()) = tokio::join!(scp, requester);
    assert!(
        matches!(ended.result, Err(AssociationError::Timeout(_))),
        "{:?}",
        ended.result
    );
}
