//! Storage Commitment Push Model over in-memory streams, read 1 byte (or
//! a few) at a time: an N-ACTION answered at once and its result reported
//! on the same association to this crate's own SCU, which answers it; a
//! report delivered when answered after another request, not delivered
//! when the peer releases first or stays silent past the DIMSE timeout; a
//! commitment SCP's N-EVENT-REPORT on an association that took the SCP
//! role (answered in the A-ASSOCIATE-AC); refusals (wrong context,
//! instance, action or event type, a data set over the cap); and the SCU
//! keeping a report that comes before the N-ACTION-RSP, refusing one over
//! the cap, and seeing the peer release.
//!
//! The service here decodes and answers in memory: it stands in for the
//! application (its index), not for a peer; the peers' bytes are real
//! PDUs, written by hand or by [`ScuAssociation`].

mod common;
use common::Trickle;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dimse::ae::AeTitle;
use dimse::command::{self, field, status, Command};
use dimse::commitment::{failure_reason, CommitmentRequest, CommitmentResult, Reference, Syntax};
use dimse::negotiation::{
    self, AcceptPolicy, AcceptedContext, ContextTable, Negotiated, PeerFacts, ServiceClass,
};
use dimse::pdu::{self, PduReader, PduType};
use dimse::scp::{
    self, ActionAnswer, ActionOutcome, ActionRequest, AssociationInfo, Ended, EventReport,
    EventReportOutcome, EventReportRequest, Failure, IncomingObject, Observer, ReportDelivery,
    Service, StoreRequest, MAX_INFORMATION,
};
use dimse::scu::{RoleProposal, ScuAssociation, ScuError, ScuOptions};
use dimse::uid::{self, Uid};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::oneshot;

const COMMIT: &str = uid::STORAGE_COMMITMENT_PUSH_MODEL;
const INSTANCE: &str = uid::STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE;
const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MAX_PDU: u32 = 4096;
const READS: [usize; 3] = [1, 7, 5000];

fn u(s: &str) -> Uid {
    Uid::new(s).expect("valid UID")
}

fn reference(instance: &str) -> Reference {
    Reference {
        sop_class: u(CT),
        sop_instance: u(instance),
    }
}

/// A request for three instances, the archive lacking the last.
fn request() -> CommitmentRequest {
    CommitmentRequest {
        transaction_uid: u("2.25.77"),
        references: vec![
            reference("1.2.3.1"),
            reference("1.2.3.2"),
            reference("1.2.3.404"),
        ],
    }
}

/// What the archive answers [`request`] with.
fn expected_result() -> CommitmentResult {
    CommitmentResult {
        transaction_uid: u("2.25.77"),
        committed: vec![reference("1.2.3.1"), reference("1.2.3.2")],
        failed: vec![(
            reference("1.2.3.404"),
            failure_reason::NO_SUCH_OBJECT_INSTANCE,
        )],
    }
}

/// What the in-memory archive saw.
#[derive(Default)]
struct Seen {
    /// the requests it was asked to commit
    actions: Vec<CommitmentRequest>,
    /// the delivery of each report it handed over
    deliveries: Vec<oneshot::Receiver<ReportDelivery>>,
    /// results delivered to it: event type, whether the peer took the
    /// SCP role, the result
    results: Vec<(u16, bool, CommitmentResult)>,
    /// the observer's N-ACTIONs: status, report sent, data set length
    actioned: Vec<(u16, bool, usize)>,
    /// the observer's N-EVENT-REPORTs: status
    event_reported: Vec<u16>,
}

/// An archive that holds every instance but those ending in ".404", and
/// reports on the same association when `report` is set.
#[derive(Clone)]
struct Archive {
    seen: Arc<Mutex<Seen>>,
    report: bool,
}

impl Archive {
    fn new(report: bool) -> Self {
        Archive {
            seen: Arc::default(),
            report,
        }
    }

    /// The delivery of the `i`th report, once known.
    async fn delivery(&self, i: usize) -> ReportDelivery {
        let rx = self.seen.lock().expect("lock").deliveries.remove(i);
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("resolved in time")
            .expect("resolved, not dropped")
    }
}

/// Storage is not what these associations exercise.
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
        Err(Failure::new(status::NOT_AUTHORIZED, "not here"))
    }

    async fn n_action(&self, _: &AssociationInfo, rq: &ActionRequest<'_>) -> ActionAnswer {
        assert_eq!(rq.action_type_id, 1);
        assert_eq!(rq.sop_instance.as_str(), INSTANCE);
        let Some(syntax) = Syntax::of(rq.transfer_syntax.as_str()) else {
            return ActionAnswer::failed(Failure::new(status::PROCESSING_FAILURE, "syntax"));
        };
        let request = match CommitmentRequest::decode(rq.data_set, syntax) {
            Ok(request) => request,
            Err(e) => {
                return ActionAnswer::failed(Failure::new(
                    status::PROCESSING_FAILURE,
                    e.to_string(),
                ))
            }
        };
        let (committed, missing): (Vec<_>, Vec<_>) = request
            .references
            .iter()
            .cloned()
            .partition(|r| !r.sop_instance.as_str().ends_with(".404"));
        let result = CommitmentResult {
            transaction_uid: request.transaction_uid.clone(),
            committed,
            failed: missing
                .into_iter()
                .map(|r| (r, failure_reason::NO_SUCH_OBJECT_INSTANCE))
                .collect(),
        };
        let mut seen = self.seen.lock().expect("lock");
        seen.actions.push(request);
        if !self.report {
            return ActionAnswer::success(None);
        }
        let (tx, rx) = oneshot::channel();
        seen.deliveries.push(rx);
        ActionAnswer::success(Some(EventReport {
            sop_class: u(COMMIT),
            sop_instance: u(INSTANCE),
            event_type_id: result.event_type(),
            data_set: result.encode(syntax),
            delivery: Some(tx),
        }))
    }

    async fn n_event_report(
        &self,
        _: &AssociationInfo,
        rq: &EventReportRequest<'_>,
    ) -> Result<u16, Failure> {
        let syntax = Syntax::of(rq.transfer_syntax.as_str())
            .ok_or_else(|| Failure::new(status::PROCESSING_FAILURE, "syntax"))?;
        let result = CommitmentResult::decode(rq.data_set, syntax)
            .map_err(|e| Failure::new(status::PROCESSING_FAILURE, e.to_string()))?;
        self.seen
            .lock()
            .expect("lock")
            .results
            .push((rq.event_type_id, rq.peer_scp_role, result));
        Ok(status::SUCCESS)
    }
}

impl Observer<()> for Archive {
    fn actioned(&self, _: &AssociationInfo, outcome: &ActionOutcome<'_>) {
        self.seen.lock().expect("lock").actioned.push((
            outcome.status,
            outcome.report_sent,
            outcome.data_set.len(),
        ));
    }

    fn event_reported(&self, _: &AssociationInfo, outcome: &EventReportOutcome<'_>) {
        self.seen
            .lock()
            .expect("lock")
            .event_reported
            .push(outcome.status);
    }
}

fn info(dimse_timeout: Duration) -> AssociationInfo {
    AssociationInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 104)),
        calling_ae: "MODALITY".into(),
        called_ae: "MINIPACS".into(),
        dimse_timeout,
        max_pdu: MAX_PDU,
        peer_max_pdu: MAX_PDU,
    }
}

// ---- over negotiation, with this crate's SCU as the peer ----

fn policy() -> AcceptPolicy {
    AcceptPolicy {
        ae_title: AeTitle::new("MINIPACS").expect("valid"),
        max_pdu: MAX_PDU,
        accept_private_sop_classes: false,
        allow: Vec::new(),
        find: false,
        retrieve: false,
        commitment: true,
    }
}

const FACTS: PeerFacts<'static> = PeerFacts {
    addr: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    cert_common_names: &[],
};

/// Runs this crate's SCP on `stream`: negotiates, then serves.
async fn serve(stream: DuplexStream, archive: Archive, max_read: usize) -> Ended {
    let mut stream = Trickle::new(stream, max_read);
    let rq = scp::read_associate_rq(&mut stream)
        .await
        .expect("an A-ASSOCIATE-RQ");
    let Negotiated::Accept {
        ac,
        contexts,
        peer_max_pdu,
    } = negotiation::negotiate(&rq, &policy(), &FACTS)
    else {
        panic!("commitment is accepted");
    };
    scp::send_pdu(&mut stream, &dimse::ul::Pdu::AssociationAC(ac))
        .await
        .expect("A-ASSOCIATE-AC");
    let mut association = info(Duration::from_secs(5));
    association.peer_max_pdu = peer_max_pdu;
    scp::run_association(
        stream,
        &association,
        &contexts,
        &archive,
        &archive,
        std::future::pending(),
    )
    .await
}

fn options() -> ScuOptions {
    ScuOptions {
        calling_ae: "MODALITY".into(),
        called_ae: "MINIPACS".into(),
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn an_n_action_is_answered_and_its_result_reported_on_the_same_association() {
    for (i, max_read) in READS.into_iter().enumerate() {
        // Both syntaxes the context is accepted with.
        let (ts, syntax) = if i % 2 == 0 {
            (uid::EXPLICIT_VR_LE, Syntax::ExplicitLittle)
        } else {
            (uid::IMPLICIT_VR_LE, Syntax::ImplicitLittle)
        };
        let archive = Archive::new(true);
        let (ours, theirs) = tokio::io::duplex(8192);
        let scp = tokio::spawn(serve(ours, archive.clone(), max_read));
        let proposals = [(COMMIT.to_string(), ts.to_string())];
        let mut scu =
            ScuAssociation::request(Trickle::new(theirs, max_read), &options(), &proposals)
                .await
                .expect("associated");
        // No role proposed, none answered.
        assert!(!scu.scp_role_granted(COMMIT));
        let context = scu.context_for(COMMIT, ts).expect("accepted");
        let answer = scu
            .n_action(
                context,
                &u(COMMIT),
                &u(INSTANCE),
                1,
                &request().encode(syntax),
            )
            .await
            .expect("N-ACTION-RSP");
        assert_eq!(answer, (status::SUCCESS, None));

        let report = scu
            .next_event_report(Duration::from_secs(5))
            .await
            .expect("no error")
            .expect("a report");
        assert_eq!(
            (
                report.context_id,
                report.event_type_id,
                report.transfer_syntax.as_str()
            ),
            (context, 2, ts)
        );
        assert_eq!(
            (report.sop_class.as_str(), report.sop_instance.as_str()),
            (COMMIT, INSTANCE)
        );
        assert_eq!(
            CommitmentResult::decode(&report.data_set, syntax),
            Ok(expected_result())
        );
        scu.answer_event_report(&report, status::SUCCESS)
            .await
            .expect("answered");
        scu.release().await.expect("released");

        let ended = scp.await.expect("SCP task");
        assert!(ended.result.is_ok(), "{:?}", ended.result);
        assert_eq!(ended.summary.actions, 1);
        assert_eq!(
            archive.delivery(0).await,
            ReportDelivery::Delivered {
                status: 0,
                comment: None
            }
        );
        let seen = archive.seen.lock().expect("lock");
        assert_eq!(seen.actions, vec![request()]);
        assert_eq!(seen.actioned.len(), 1);
        assert_eq!((seen.actioned[0].0, seen.actioned[0].1), (0, true));
    }
}

#[tokio::test]
async fn a_commitment_scp_delivers_its_report_on_an_association_with_the_scp_role() {
    for max_read in READS {
        let archive = Archive::new(false);
        let (ours, theirs) = tokio::io::duplex(8192);
        let scp = tokio::spawn(serve(ours, archive.clone(), max_read));
        // As a commitment SCP opening an association to report: the SCP
        // role for the class, no SCU role.
        let proposals = [(COMMIT.to_string(), uid::IMPLICIT_VR_LE.to_string())];
        let mut options = options();
        options.calling_ae = "PACS".into();
        let mut scu = ScuAssociation::request_with(
            Trickle::new(theirs, max_read),
            &options,
            &proposals,
            &[RoleProposal::commitment_scp()],
        )
        .await
        .expect("associated");
        assert!(scu.scp_role_granted(COMMIT));
        let context = scu
            .context_for(COMMIT, uid::IMPLICIT_VR_LE)
            .expect("accepted");
        let result = expected_result();
        let answer = scu
            .n_event_report(
                context,
                &u(COMMIT),
                &u(INSTANCE),
                result.event_type(),
                &result.encode(Syntax::ImplicitLittle),
            )
            .await
            .expect("N-EVENT-REPORT-RSP");
        assert_eq!(answer, (status::SUCCESS, None));
        scu.release().await.expect("released");
        let ended = scp.await.expect("SCP task");
        assert!(ended.result.is_ok(), "{:?}", ended.result);
        assert_eq!(ended.summary.event_reports, 1);
        let seen = archive.seen.lock().expect("lock");
        assert_eq!(seen.results, vec![(2, true, expected_result())]);
        assert_eq!(seen.event_reported, vec![0]);
    }
}

#[tokio::test]
async fn an_scu_sees_the_peer_release_instead_of_a_report() {
    let archive = Archive::new(false);
    let (ours, theirs) = tokio::io::duplex(8192);
    let scp = tokio::spawn(async move {
        let mut stream = ours;
        let rq = scp::read_associate_rq(&mut stream).await.expect("RQ");
        let Negotiated::Accept { ac, .. } = negotiation::negotiate(&rq, &policy(), &FACTS) else {
            panic!("accepted");
        };
        scp::send_pdu(&mut stream, &dimse::ul::Pdu::AssociationAC(ac))
            .await
            .expect("AC");
        // The acceptor releases: unusual, but the SCU must not hang.
        stream.write_all(&pdu::RELEASE_RQ).await.expect("RQ sent");
        let mut reader = PduReader::new(stream, 1024);
        let header = reader.read_header().await.expect("read").expect("a PDU");
        header.pdu_type
    });
    let proposals = [(COMMIT.to_string(), uid::IMPLICIT_VR_LE.to_string())];
    let mut scu = ScuAssociation::request(Trickle::new(theirs, 7), &options(), &proposals)
        .await
        .expect("associated");
    assert!(matches!(
        scu.next_event_report(Duration::from_secs(5)).await,
        Err(ScuError::Released)
    ));
    assert_eq!(scp.await.expect("task"), PduType::ReleaseRp);
    drop(archive);
}

#[tokio::test(start_paused = true)]
async fn next_event_report_returns_none_when_nothing_comes() {
    let (ours, theirs) = tokio::io::duplex(8192);
    let archive = Archive::new(false);
    let scp = tokio::spawn(serve(ours, archive, 5000));
    let proposals = [(COMMIT.to_string(), uid::IMPLICIT_VR_LE.to_string())];
    let mut scu = ScuAssociation::request(Trickle::new(theirs, 5000), &options(), &proposals)
        .await
        .expect("associated");
    assert_eq!(
        scu.next_event_report(Duration::from_secs(1))
            .await
            .expect("no error"),
        None
    );
    scu.release().await.expect("released");
    assert!(scp.await.expect("task").result.is_ok());
}

// ---- the SCP alone, its peer's bytes written by hand ----

fn contexts() -> ContextTable {
    let mut table = ContextTable::new();
    let add = |table: &mut ContextTable, id, abs: &str, service| {
        table
            .push(AcceptedContext {
                id,
                abstract_syntax: u(abs),
                transfer_syntax: u(uid::IMPLICIT_VR_LE),
                service,
                peer_scp_role: false,
                peer_may_store: false,
            })
            .expect("room");
    };
    add(&mut table, 1, uid::VERIFICATION, ServiceClass::Verification);
    add(&mut table, 3, CT, ServiceClass::Storage);
    add(&mut table, 5, COMMIT, ServiceClass::Commitment);
    table
}

/// Bytes of P-DATA-TF PDUs carrying `data` on `context` in PDVs of at most
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

/// An N-ACTION-RQ with its data set, cut in small PDVs.
fn n_action(context: u8, message_id: u16, instance: &str, action: u16, data: &[u8]) -> Vec<u8> {
    let rq = command::n_action_rq(message_id, &u(COMMIT), &u(instance), action);
    let mut out = pdatas(context, true, &rq, 50);
    out.extend_from_slice(&pdatas(context, false, data, 4000));
    out
}

/// The messages the SCP sent: command and data set, with their context.
#[derive(Debug)]
struct Message {
    context: u8,
    command: Command,
    data: Vec<u8>,
}

/// The peer's side: what it sent is written up front, then it reads what
/// the SCP answered until the SCP closes.
struct Run {
    ended: Ended,
    messages: Vec<Message>,
    /// the non-P-DATA PDUs the SCP sent
    others: Vec<PduType>,
}

async fn run(
    archive: &Archive,
    input: Vec<u8>,
    max_read: usize,
    close_after_input: bool,
    dimse_timeout: Duration,
) -> Run {
    let (peer, ours) = tokio::io::duplex(1 << 16);
    let stream = Trickle::new(ours, max_read);
    let (mut peer_read, mut peer_write) = tokio::io::split(peer);
    let writer = tokio::spawn(async move {
        let _ = peer_write.write_all(&input).await;
        if close_after_input {
            let _ = peer_write.shutdown().await;
        } else {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
    let reader = tokio::spawn(async move {
        let mut reader = PduReader::new(&mut peer_read, 1 << 16);
        let mut messages = Vec::new();
        let mut others = Vec::new();
        let mut command = Vec::new();
        let mut data = Vec::new();
        let mut pending: Option<(u8, Command)> = None;
        while let Ok(Some(header)) = reader.read_header().await {
            let Ok(body) = reader.read_body(header).await else {
                break;
            };
            if header.pdu_type != PduType::PData {
                others.push(header.pdu_type);
                continue;
            }
            for pdv in pdu::pdvs(body) {
                let pdv = pdv.expect("well-formed PDV");
                if pdv.is_command {
                    command.extend_from_slice(pdv.data);
                    if pdv.is_last {
                        let c = Command::decode(&command).expect("a command");
                        command.clear();
                        if c.has_data_set {
                            pending = Some((pdv.context_id, c));
                        } else {
                            messages.push(Message {
                                context: pdv.context_id,
                                command: c,
                                data: Vec::new(),
                            });
                        }
                    }
                } else {
                    data.extend_from_slice(pdv.data);
                    if pdv.is_last {
                        let (context, command) = pending.take().expect("command first");
                        messages.push(Message {
                            context,
                            command,
                            data: std::mem::take(&mut data),
                        });
                    }
                }
            }
        }
        (messages, others)
    });
    let table = contexts();
    let association = info(dimse_timeout);
    let ended = scp::run_association(
        stream,
        &association,
        &table,
        archive,
        archive,
        std::future::pending(),
    )
    .await;
    let (messages, others) = reader.await.expect("reader task");
    writer.abort();
    Run {
        ended,
        messages,
        others,
    }
}

#[tokio::test]
async fn a_report_is_not_delivered_when_the_peer_releases_right_after_the_n_action_rsp() {
    for max_read in READS {
        let archive = Archive::new(true);
        let data = request().encode(Syntax::ImplicitLittle);
        let mut input = n_action(5, 7, INSTANCE, 1, &data);
        input.extend_from_slice(&pdu::RELEASE_RQ);
        let run = run(&archive, input, max_read, true, Duration::from_secs(5)).await;
        assert!(run.ended.result.is_ok(), "{:?}", run.ended.result);
        // N-ACTION-RSP, then our N-EVENT-REPORT-RQ with the result, then
        // the A-RELEASE-RP.
        let fields: Vec<_> = run
            .messages
            .iter()
            .map(|m| (m.context, m.command.command_field))
            .collect();
        assert_eq!(
            fields,
            vec![(5, field::N_ACTION_RSP), (5, field::N_EVENT_REPORT_RQ)]
        );
        let rsp = &run.messages[0].command;
        assert_eq!(
            (rsp.message_id, rsp.status, rsp.action_type_id),
            (7, Some(0), Some(1))
        );
        assert_eq!(rsp.sop_class.as_ref().map(Uid::as_str), Some(COMMIT));
        assert_eq!(rsp.sop_instance.as_ref().map(Uid::as_str), Some(INSTANCE));
        let report = &run.messages[1];
        assert_eq!(report.command.event_type_id, Some(2));
        assert_eq!(
            CommitmentResult::decode(&report.data, Syntax::ImplicitLittle),
            Ok(expected_result())
        );
        assert_eq!(run.others, vec![PduType::ReleaseRp]);
        match archive.delivery(0).await {
            ReportDelivery::NotDelivered { reason } => {
                assert!(reason.contains("released"), "{reason}")
            }
            other => panic!("expected not delivered, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_report_answered_after_other_requests_is_delivered() {
    for max_read in READS {
        let archive = Archive::new(true);
        let data = request().encode(Syntax::ImplicitLittle);
        let mut input = n_action(5, 7, INSTANCE, 1, &data);
        // A C-ECHO before answering our report (Message ID 1, the SCP's
        // first), then the answer cut in two PDVs, then a stray answer.
        input.extend_from_slice(&pdatas(1, true, &command::echo_rq(8), 4000));
        let rsp = command::n_event_report_rsp(1, &u(COMMIT), Some(&u(INSTANCE)), Some(2), 0, None);
        input.extend_from_slice(&pdatas(5, true, &rsp, rsp.len() / 2 + 1));
        let stray = command::n_event_report_rsp(99, &u(COMMIT), None, None, 0, None);
        input.extend_from_slice(&pdatas(5, true, &stray, 4000));
        input.extend_from_slice(&pdu::RELEASE_RQ);
        let run = run(&archive, input, max_read, true, Duration::from_secs(5)).await;
        assert!(run.ended.result.is_ok(), "{:?}", run.ended.result);
        let fields: Vec<_> = run
            .messages
            .iter()
            .map(|m| m.command.command_field)
            .collect();
        assert_eq!(
            fields,
            vec![
                field::N_ACTION_RSP,
                field::N_EVENT_REPORT_RQ,
                field::C_ECHO_RSP
            ]
        );
        assert_eq!(run.messages[1].command.message_id, 1);
        assert_eq!(
            archive.delivery(0).await,
            ReportDelivery::Delivered {
                status: 0,
                comment: None
            }
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_report_not_answered_within_the_dimse_timeout_is_not_delivered() {
    let archive = Archive::new(true);
    let data = request().encode(Syntax::ImplicitLittle);
    let input = n_action(5, 7, INSTANCE, 1, &data);
    let run = run(&archive, input, 7, false, Duration::from_secs(5)).await;
    // The report timed out first; then the silent association did.
    assert!(matches!(
        run.ended.result,
        Err(dimse::error::AssociationError::Timeout(5))
    ));
    match archive.delivery(0).await {
        ReportDelivery::NotDelivered { reason } => {
            assert_eq!(reason, "no N-EVENT-REPORT-RSP within 5 s")
        }
        other => panic!("expected not delivered, got {other:?}"),
    }
}

#[tokio::test]
async fn n_requests_the_context_or_the_command_make_unusable_are_refused() {
    for max_read in READS {
        let archive = Archive::new(true);
        let data = request().encode(Syntax::ImplicitLittle);
        let result = expected_result().encode(Syntax::ImplicitLittle);
        let mut input = Vec::new();
        // On the storage context, and on the Verification context.
        input.extend_from_slice(&n_action(3, 1, INSTANCE, 1, &data));
        let report = command::n_event_report_rq(2, &u(COMMIT), &u(INSTANCE), 2);
        input.extend_from_slice(&pdatas(1, true, &report, 4000));
        input.extend_from_slice(&pdatas(1, false, &result, 4000));
        // Another instance than the well-known one; another action.
        input.extend_from_slice(&n_action(5, 3, "1.2.3", 1, &data));
        input.extend_from_slice(&n_action(5, 4, INSTANCE, 2, &data));
        // Another event type.
        let report = command::n_event_report_rq(5, &u(COMMIT), &u(INSTANCE), 3);
        input.extend_from_slice(&pdatas(5, true, &report, 4000));
        input.extend_from_slice(&pdatas(5, false, &result, 4000));
        // Still usable: a C-ECHO.
        input.extend_from_slice(&pdatas(1, true, &command::echo_rq(6), 4000));
        input.extend_from_slice(&pdu::RELEASE_RQ);
        let run = run(&archive, input, max_read, true, Duration::from_secs(5)).await;
        assert!(run.ended.result.is_ok(), "{:?}", run.ended.result);
        let answers: Vec<_> = run
            .messages
            .iter()
            .map(|m| {
                (
                    m.context,
                    m.command.command_field,
                    m.command.message_id,
                    m.command.status,
                )
            })
            .collect();
        assert_eq!(
            answers,
            vec![
                (
                    3,
                    field::N_ACTION_RSP,
                    1,
                    Some(status::SOP_CLASS_NOT_SUPPORTED)
                ),
                (
                    1,
                    field::N_EVENT_REPORT_RSP,
                    2,
                    Some(status::SOP_CLASS_NOT_SUPPORTED)
                ),
                (
                    5,
                    field::N_ACTION_RSP,
                    3,
                    Some(status::NO_SUCH_SOP_INSTANCE)
                ),
                (5, field::N_ACTION_RSP, 4, Some(status::NO_SUCH_ACTION)),
                (
                    5,
                    field::N_EVENT_REPORT_RSP,
                    5,
                    Some(status::NO_SUCH_EVENT_TYPE)
                ),
                (1, field::C_ECHO_RSP, 6, Some(status::SUCCESS)),
            ]
        );
        assert!(run.messages[0].command.error_comment.is_some());
        let seen = archive.seen.lock().expect("lock");
        assert!(seen.actions.is_empty() && seen.results.is_empty());
        assert!(seen.deliveries.is_empty(), "no report without an action");
        assert_eq!(seen.actioned.len(), 3);
        assert_eq!(seen.event_reported.len(), 2);
    }
}

#[tokio::test]
async fn an_oversized_action_information_is_read_dropped_and_refused() {
    // 1-byte reads of a megabyte are slow in a debug build; 7 still cuts
    // every header.
    for max_read in [7, 5000] {
        let archive = Archive::new(true);
        let big = vec![0x55u8; MAX_INFORMATION + 1];
        let mut input = n_action(5, 9, INSTANCE, 1, &big);
        input.extend_from_slice(&pdatas(1, true, &command::echo_rq(10), 4000));
        input.extend_from_slice(&pdu::RELEASE_RQ);
        let run = run(&archive, input, max_read, true, Duration::from_secs(5)).await;
        assert!(run.ended.result.is_ok(), "{:?}", run.ended.result);
        let answers: Vec<_> = run
            .messages
            .iter()
            .map(|m| (m.command.command_field, m.command.status))
            .collect();
        assert_eq!(
            answers,
            vec![
                (field::N_ACTION_RSP, Some(status::RESOURCE_LIMITATION)),
                (field::C_ECHO_RSP, Some(0)),
            ]
        );
        let seen = archive.seen.lock().expect("lock");
        assert!(seen.actions.is_empty(), "the service is not asked");
        // What the observer saw of the data set: nothing kept.
        assert_eq!(seen.actioned, vec![(status::RESOURCE_LIMITATION, false, 0)]);
    }
}

#[tokio::test]
async fn an_scu_keeps_an_early_report_and_refuses_an_oversized_one() {
    let (ours, theirs) = tokio::io::duplex(8192);
    let (answered_tx, answered) = oneshot::channel();
    let (done, done_rx) = oneshot::channel::<()>();
    // A commitment SCP by hand: it reports before its N-ACTION-RSP, then
    // sends a report over the cap, then reads what the SCU answered, and
    // stays connected until the test is done.
    let peer = tokio::spawn(async move {
        let mut stream = ours;
        let rq = scp::read_associate_rq(&mut stream).await.expect("RQ");
        let Negotiated::Accept { ac, .. } = negotiation::negotiate(&rq, &policy(), &FACTS) else {
            panic!("accepted");
        };
        scp::send_pdu(&mut stream, &dimse::ul::Pdu::AssociationAC(ac))
            .await
            .expect("AC");
        let result = expected_result().encode(Syntax::ImplicitLittle);
        let report = command::n_event_report_rq(1, &u(COMMIT), &u(INSTANCE), 2);
        let mut out = pdatas(1, true, &report, 4000);
        out.extend_from_slice(&pdatas(1, false, &result, 7));
        let rsp = command::n_action_rsp(1, &u(COMMIT), Some(&u(INSTANCE)), Some(1), 0, None);
        out.extend_from_slice(&pdatas(1, true, &rsp, 4000));
        let report = command::n_event_report_rq(2, &u(COMMIT), &u(INSTANCE), 1);
        out.extend_from_slice(&pdatas(1, true, &report, 4000));
        out.extend_from_slice(&pdatas(1, false, &vec![0; MAX_INFORMATION + 1], 4000));
        let (read_half, mut write_half) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            write_half.write_all(&out).await.expect("written");
            write_half
        });
        let mut reader = PduReader::new(read_half, 1 << 16);
        let mut answers = Vec::new();
        while answers.len() < 3 {
            let header = reader.read_header().await.expect("read").expect("a PDU");
            let body = reader.read_body(header).await.expect("body");
            for pdv in pdu::pdvs(body) {
                let pdv = pdv.expect("PDV");
                if pdv.is_command {
                    let c = Command::decode(pdv.data).expect("command");
                    answers.push((c.command_field, c.message_id, c.status));
                }
            }
        }
        let _ = answered_tx.send(answers);
        let _ = done_rx.await;
        drop(writer.await);
    });
    let proposals = [(COMMIT.to_string(), uid::IMPLICIT_VR_LE.to_string())];
    let mut scu = ScuAssociation::request(Trickle::new(theirs, 7), &options(), &proposals)
        .await
        .expect("associated");
    let answer = scu
        .n_action(
            1,
            &u(COMMIT),
            &u(INSTANCE),
            1,
            &request().encode(Syntax::ImplicitLittle),
        )
        .await
        .expect("N-ACTION-RSP after the report");
    assert_eq!(answer, (0, None));
    let report = scu
        .next_event_report(Duration::from_secs(1))
        .await
        .expect("no error")
        .expect("the early report, kept");
    assert_eq!((report.message_id, report.event_type_id), (1, 2));
    assert_eq!(
        CommitmentResult::decode(&report.data_set, Syntax::ImplicitLittle),
        Ok(expected_result())
    );
    scu.answer_event_report(&report, 0).await.expect("answered");
    // The oversized one is answered here and not returned.
    assert_eq!(
        scu.next_event_report(Duration::from_secs(1))
            .await
            .expect("no error"),
        None
    );
    let answers = answered.await.expect("the peer's answers");
    let _ = done.send(());
    peer.await.expect("peer task");
    assert_eq!(
        answers,
        vec![
            (field::N_ACTION_RQ, 1, None),
            (field::N_EVENT_REPORT_RSP, 1, Some(0)),
            (
                field::N_EVENT_REPORT_RSP,
                2,
                Some(status::RESOURCE_LIMITATION)
            ),
        ]
    );
}
