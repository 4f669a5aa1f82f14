//! The SCP state machine over an in-memory stream, read in 1-byte and
//! random-size pieces: release, abort, timeouts, shutdown, every malformed
//! PDU case of the end-to-end tests, and a C-STORE spanning many PDUs.
//!
//! The service here keeps data sets in memory: it stands in for the
//! application (the store), not for a peer; the peer's bytes are real PDUs.

mod common;
use common::Trickle;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dimse::command::{self, field, status, Command};
use dimse::error::{AssociationError, ProtocolViolation};
use dimse::negotiation::{AcceptedContext, ContextTable, ServiceClass};
use dimse::pdu::{self, AbortReason, PduReader, PduType};
use dimse::scp::{
    self, AssociationInfo, Ended, Failure, IncomingObject, ObjectOutcome, Observer, Service,
    StoreRequest,
};
use dimse::uid::{self, Uid};
use tokio::io::AsyncWriteExt;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MAX_PDU: u32 = 4096;

fn u(s: &str) -> Uid {
    Uid::new(s).expect("valid UID")
}

/// What the in-memory service saw.
#[derive(Default)]
struct Seen {
    stored: Vec<(Uid, Vec<u8>)>,
    begun: usize,
    outcomes: Vec<u16>,
    releases: usize,
}

/// A service that keeps data sets in memory; it fails writes past
/// `fail_after` bytes when set.
#[derive(Clone, Default)]
struct Memory {
    seen: Arc<Mutex<Seen>>,
    fail_after: Option<usize>,
}

struct Object {
    instance: Uid,
    bytes: Vec<u8>,
    fail_after: Option<usize>,
    seen: Arc<Mutex<Seen>>,
}

impl Service for Memory {
    type Object = Object;

    fn store(&self, _: &AssociationInfo, rq: &StoreRequest<'_>) -> Result<Object, Failure> {
        self.seen.lock().expect("lock").begun += 1;
        Ok(Object {
            instance: rq.sop_instance.clone(),
            bytes: Vec::new(),
            fail_after: self.fail_after,
            seen: Arc::clone(&self.seen),
        })
    }
}

impl IncomingObject for Object {
    type Receipt = usize;

    fn write(&mut self, fragment: &[u8]) -> Result<(), Failure> {
        self.bytes.extend_from_slice(fragment);
        match self.fail_after {
            Some(limit) if self.bytes.len() > limit => {
                Err(Failure::new(status::OUT_OF_RESOURCES, "disk full"))
            }
            _ => Ok(()),
        }
    }

    async fn commit(self) -> Result<usize, Failure> {
        let len = self.bytes.len();
        self.seen
            .lock()
            .expect("lock")
            .stored
            .push((self.instance, self.bytes));
        Ok(len)
    }
}

impl Observer<usize> for Memory {
    fn object(&self, _: &AssociationInfo, outcome: &ObjectOutcome<'_, usize>) {
        self.seen
            .lock()
            .expect("lock")
            .outcomes
            .push(outcome.status);
    }

    async fn releasing(&self) {
        self.seen.lock().expect("lock").releases += 1;
    }
}

fn contexts() -> ContextTable {
    let mut table = ContextTable::new();
    let add = |table: &mut ContextTable, id, abs: &str, service| {
        table
            .push(AcceptedContext {
                id,
                abstract_syntax: u(abs),
                transfer_syntax: u(uid::EXPLICIT_VR_LE),
                service,
                peer_scp_role: false,
                peer_may_store: true,
            })
            .expect("room");
    };
    add(&mut table, 1, uid::VERIFICATION, ServiceClass::Verification);
    add(&mut table, 3, CT, ServiceClass::Storage);
    table
}

fn info() -> AssociationInfo {
    AssociationInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 104)),
        calling_ae: "SCU".into(),
        called_ae: "MINIPACS".into(),
        dimse_timeout: Duration::from_secs(5),
        max_pdu: MAX_PDU,
        peer_max_pdu: MAX_PDU,
    }
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

fn store_rq_bytes(context: u8, message_id: u16, class: &str, instance: &str) -> Vec<u8> {
    pdatas(
        context,
        true,
        &command::store_rq(message_id, &u(class), &u(instance)),
        4000,
    )
}

/// The peer's side: what it sent is written up front, then it reads what
/// the SCP answered until the SCP closes.
struct Run {
    ended: Ended,
    /// the PDUs the SCP sent: type and body
    answers: Vec<(PduType, Vec<u8>)>,
}

async fn run_with(
    service: Memory,
    input: Vec<u8>,
    max_read: usize,
    close_after_input: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Run {
    let (peer, ours) = tokio::io::duplex(1 << 16);
    let stream = Trickle::new(ours, max_read);
    let (mut peer_read, mut peer_write) = tokio::io::split(peer);
    let writer = tokio::spawn(async move {
        // The peer may be cut off by an abort before it has written all.
        let _ = peer_write.write_all(&input).await;
        if close_after_input {
            let _ = peer_write.shutdown().await;
        } else {
            // Keep the connection open until the test ends.
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    let reader = tokio::spawn(async move {
        let mut reader = PduReader::new(&mut peer_read, 1 << 16);
        let mut answers = Vec::new();
        while let Ok(Some(header)) = reader.read_header().await {
            let Ok(body) = reader.read_body(header).await else {
                break;
            };
            answers.push((header.pdu_type, body.to_vec()));
        }
        answers
    });
    let table = contexts();
    let association = info();
    let ended =
        scp::run_association(stream, &association, &table, &service, &service, shutdown).await;
    let answers = reader.await.expect("reader task");
    writer.abort();
    Run { ended, answers }
}

async fn run(input: Vec<u8>, max_read: usize) -> (Run, Memory) {
    let service = Memory::default();
    let run = run_with(
        service.clone(),
        input,
        max_read,
        true,
        std::future::pending(),
    )
    .await;
    (run, service)
}

/// The commands among the answers (each P-DATA holds one whole command).
fn commands(run: &Run) -> Vec<Command> {
    run.answers
        .iter()
        .filter(|(t, _)| *t == PduType::PData)
        .flat_map(|(_, body)| {
            pdu::pdvs(body)
                .filter_map(Result::ok)
                .filter(|p| p.is_command)
                .map(|p| Command::decode(p.data).expect("a command"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The reason of the A-ABORT the SCP sent, if it sent one.
fn abort_reason(run: &Run) -> Option<u8> {
    run.answers
        .iter()
        .find(|(t, _)| *t == PduType::Abort)
        .map(|(_, body)| body[3])
}

fn released(run: &Run) -> bool {
    run.answers.iter().any(|(t, _)| *t == PduType::ReleaseRp)
}

const READS: [usize; 3] = [1, 7, 5000];

#[tokio::test]
async fn echo_then_release() {
    for max_read in READS {
        let mut input = pdatas(1, true, &command::echo_rq(5), 4000);
        input.extend_from_slice(&pdu::RELEASE_RQ);
        let (run, service) = run(input, max_read).await;
        assert!(run.ended.result.is_ok(), "{:?}", run.ended.result);
        let cmds = commands(&run);
        assert_eq!(cmds.len(), 1);
        assert_eq!(cmds[0].command_field, field::C_ECHO_RSP);
        assert_eq!(cmds[0].message_id, 5);
        assert_eq!(cmds[0].status, Some(status::SUCCESS));
        assert!(released(&run));
        assert_eq!(run.ended.summary.echoes, 1);
        assert_eq!(service.seen.lock().expect("lock").releases, 1);
    }
}

#[tokio::test]
async fn a_store_spanning_many_pdus_arrives_whole() {
    // 100 KB in 1000-byte PDVs (101 PDUs), then a second object in one.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    for max_read in READS {
        let mut input = store_rq_bytes(3, 1, CT, "1.2.3.1");
        input.extend(pdatas(3, false, &data, 1000));
        input.extend(store_rq_bytes(3, 2, CT, "1.2.3.2"));
        input.extend(pdatas(3, false, b"small", 4000));
        input.extend_from_slice(&pdu::RELEASE_RQ);
        let (run, service) = run(input, max_read).await;
        assert!(run.ended.result.is_ok(), "{:?}", run.ended.result);
        let cmds = commands(&run);
        assert_eq!(cmds.len(), 2);
        assert!(cmds
            .iter()
            .all(|c| c.command_field == field::C_STORE_RSP && c.status == Some(status::SUCCESS)));
        assert_eq!(
            cmds[0].sop_instance.as_ref().map(|u| u.as_str()),
            Some("1.2.3.1")
        );
        let seen = service.seen.lock().expect("lock");
        assert_eq!(seen.stored.len(), 2);
        assert_eq!(seen.stored[0].1, data, "bytes exactly as sent");
        assert_eq!(seen.stored[1].1, b"small");
        assert_eq!(run.ended.summary.stored, 2);
        assert_eq!(run.ended.summary.bytes, data.len() as u64 + 5);
    }
}

#[tokio::test]
async fn several_pdvs_in_one_pdu() {
    // Command and data set in one P-DATA-TF, as some SCUs send them.
    let cmd = command::store_rq(9, &u(CT), &u("1.2.3.9"));
    let mut body = Vec::new();
    for (ctl, data) in [(0x03u8, &cmd[..]), (0x02, b"abcd".as_slice())] {
        body.extend_from_slice(&((data.len() + 2) as u32).to_be_bytes());
        body.extend_from_slice(&[3, ctl]);
        body.extend_from_slice(data);
    }
    let mut input = vec![0x04, 0];
    input.extend_from_slice(&(body.len() as u32).to_be_bytes());
    input.extend(body);
    input.extend_from_slice(&pdu::RELEASE_RQ);
    let (run, service) = run(input, 1).await;
    assert!(run.ended.result.is_ok(), "{:?}", run.ended.result);
    assert_eq!(service.seen.lock().expect("lock").stored[0].1, b"abcd");
}

#[tokio::test]
async fn store_on_the_verification_context_is_refused() {
    let mut input = store_rq_bytes(1, 1, uid::VERIFICATION, "1.2.3.4");
    input.extend(pdatas(1, false, b"data", 4000));
    input.extend_from_slice(&pdu::RELEASE_RQ);
    let (run, service) = run(input, 7).await;
    assert!(run.ended.result.is_ok());
    let cmds = commands(&run);
    assert_eq!(cmds[0].status, Some(status::SOP_CLASS_NOT_SUPPORTED));
    let seen = service.seen.lock().expect("lock");
    assert_eq!(seen.begun, 0, "the service never saw it");
    assert_eq!(run.ended.summary.failed, 1);
}

#[tokio::test]
async fn echo_on_a_storage_context_is_refused() {
    let mut input = pdatas(3, true, &command::echo_rq(2), 4000);
    input.extend_from_slice(&pdu::RELEASE_RQ);
    let (run, _) = run(input, 7).await;
    assert_eq!(
        commands(&run)[0].status,
        Some(status::SOP_CLASS_NOT_SUPPORTED)
    );
}

#[tokio::test]
async fn mismatched_sop_class_is_a900_and_the_association_goes_on() {
    let mut input = store_rq_bytes(3, 1, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4");
    input.extend(pdatas(3, false, b"data", 4000));
    input.extend(store_rq_bytes(3, 2, CT, "1.2.3.5"));
    input.extend(pdatas(3, false, b"next", 4000));
    input.extend_from_slice(&pdu::RELEASE_RQ);
    let (run, service) = run(input, 7).await;
    let statuses: Vec<_> = commands(&run).iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        vec![Some(status::DATA_SET_MISMATCH), Some(status::SUCCESS)]
    );
    assert_eq!(service.seen.lock().expect("lock").stored.len(), 1);
}

#[tokio::test]
async fn a_failing_write_is_answered_a700_and_the_association_goes_on() {
    let service = Memory {
        fail_after: Some(10),
        ..Memory::default()
    };
    let mut input = store_rq_bytes(3, 1, CT, "1.2.3.4");
    input.extend(pdatas(3, false, &[7u8; 5000], 100));
    input.extend_from_slice(&pdu::RELEASE_RQ);
    let run = run_with(service.clone(), input, 7, true, std::future::pending()).await;
    assert!(run.ended.result.is_ok(), "{:?}", run.ended.result);
    assert_eq!(commands(&run)[0].status, Some(status::OUT_OF_RESOURCES));
    assert!(service.seen.lock().expect("lock").stored.is_empty());
    assert_eq!(
        service.seen.lock().expect("lock").outcomes,
        vec![status::OUT_OF_RESOURCES]
    );
}

#[tokio::test]
async fn peer_abort_ends_without_an_answer() {
    // The peer announces an object, then aborts instead of sending it.
    let mut input = store_rq_bytes(3, 1, CT, "1.2.3.4");
    input.extend_from_slice(&pdu::abort_pdu(
        pdu::AbortSource::ServiceUser,
        AbortReason::NotSpecified,
    ));
    let (run, service) = run(input, 1).await;
    assert!(matches!(
        run.ended.result,
        Err(AssociationError::PeerAborted)
    ));
    assert_eq!(abort_reason(&run), None, "no A-ABORT answers an A-ABORT");
    assert!(service.seen.lock().expect("lock").stored.is_empty());
}

/// Malformed input, the error it must end in, and the A-ABORT reason the
/// peer must get (PS3.8 Table 9-26).
fn malformed_cases() -> Vec<(&'static str, Vec<u8>, u8)> {
    let cmd = store_rq_bytes(3, 1, CT, "1.2.3.4");
    let mut cases: Vec<(&'static str, Vec<u8>, u8)> = Vec::new();
    cases.push(("unknown PDU type", vec![0x09, 0, 0, 0, 0, 0], 1));
    cases.push((
        "PDU longer than the maximum",
        vec![0x04, 0, 0, 0x10, 0, 1],
        6,
    ));
    cases.push(("empty P-DATA-TF", vec![0x04, 0, 0, 0, 0, 0], 6));
    cases.push((
        "PDV longer than its PDU",
        vec![0x04, 0, 0, 0, 0, 6, 0, 0, 0, 100, 3, 3],
        6,
    ));
    cases.push((
        "PDV shorter than its header",
        vec![0x04, 0, 0, 0, 0, 5, 0, 0, 0, 1, 3],
        6,
    ));
    cases.push((
        "P-DATA on an unaccepted context",
        pdatas(5, true, &command::echo_rq(1), 4000),
        5,
    ));
    cases.push(("data without a command", pdatas(3, false, b"data", 4000), 5));
    cases.push((
        "undecodable command",
        pdatas(3, true, &[1, 2, 3, 4], 4000),
        5,
    ));
    cases.push((
        "command set too long",
        pdatas(3, true, &[0u8; 20_000], 3000),
        5,
    ));
    cases.push((
        "C-FIND is not performed here",
        {
            // A command with an unknown field: (0000,0100) = 0x0020, no data set.
            let mut c = Vec::new();
            for (tag, value) in [(0x0100u16, 0x0020u16), (0x0110, 1), (0x0800, 0x0101)] {
                c.extend_from_slice(&[0, 0]);
                c.extend_from_slice(&tag.to_le_bytes());
                c.extend_from_slice(&2u32.to_le_bytes());
                c.extend_from_slice(&value.to_le_bytes());
            }
            pdatas(1, true, &c, 4000)
        },
        5,
    ));
    cases.push((
        "A-ASSOCIATE-RQ during the association",
        {
            let mut v = vec![0x01, 0, 0, 0, 0, 4];
            v.extend_from_slice(&[0, 1, 0, 0]);
            v
        },
        2,
    ));
    cases.push((
        "A-RELEASE-RQ inside a data set",
        {
            let mut v = cmd.clone();
            let data = pdatas(3, false, &[1u8; 3000], 1000);
            // the first of three data PDUs only
            v.extend_from_slice(&data[..12 + 1000]);
            v.extend_from_slice(&pdu::RELEASE_RQ);
            v
        },
        2,
    ));
    cases.push((
        "command inside a data set",
        {
            let mut v = cmd.clone();
            let data = pdatas(3, false, &[1u8; 3000], 1000);
            v.extend_from_slice(&data[..12 + 1000]);
            v.extend(pdatas(3, true, &command::echo_rq(2), 4000));
            v
        },
        5,
    ));
    cases.push((
        "data set on another context",
        {
            let mut v = cmd.clone();
            v.extend(pdatas(1, false, b"data", 4000));
            v
        },
        5,
    ));
    cases
}

#[tokio::test]
async fn malformed_input_ends_in_the_right_abort() {
    for (name, input, reason) in malformed_cases() {
        for max_read in READS {
            let (run, service) = run(input.clone(), max_read).await;
            assert!(run.ended.result.is_err(), "{name}: not an error");
            assert_eq!(
                abort_reason(&run),
                Some(reason),
                "{name} (reads of {max_read}): {:?}",
                run.ended.result
            );
            assert!(
                service.seen.lock().expect("lock").stored.is_empty(),
                "{name}"
            );
        }
    }
}

#[tokio::test]
async fn a_closed_connection_is_connection_lost_without_abort() {
    let (run, _) = run(store_rq_bytes(3, 1, CT, "1.2.3.4"), 7).await;
    assert_eq!(abort_reason(&run), None);
    let err = run.ended.result.expect_err("the peer went away");
    assert!(err.is_connection_lost(), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn silence_beyond_the_dimse_timeout_aborts() {
    let service = Memory::default();
    let run = run_with(service, Vec::new(), 1, false, std::future::pending()).await;
    assert!(matches!(
        run.ended.result,
        Err(AssociationError::Timeout(5))
    ));
    assert_eq!(abort_reason(&run), Some(0));
}

#[tokio::test]
async fn shutdown_stops_an_idle_association() {
    let service = Memory::default();
    let input = pdatas(1, true, &command::echo_rq(1), 4000);
    let stop = tokio::time::sleep(Duration::from_millis(200));
    let run = run_with(service, input, 1, false, stop).await;
    assert!(matches!(run.ended.result, Err(AssociationError::Stopped)));
    assert_eq!(commands(&run).len(), 1, "the echo before it was answered");
    assert_eq!(abort_reason(&run), Some(0));
}

#[tokio::test]
async fn shutdown_lets_the_object_in_flight_finish() {
    let service = Memory::default();
    let (peer, ours) = tokio::io::duplex(1 << 16);
    let (mut peer_read, mut peer_write) = tokio::io::split(peer);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let data = vec![5u8; 20_000];
    let feeder = {
        let data = data.clone();
        let seen = Arc::clone(&service.seen);
        tokio::spawn(async move {
            peer_write
                .write_all(&store_rq_bytes(3, 1, CT, "1.2.3.4"))
                .await?;
            let pdus = pdatas(3, false, &data, 1000);
            let (first, rest) = pdus.split_at(1012 * 5);
            peer_write.write_all(first).await?;
            // Stop once the object has begun and is half sent, then send
            // the rest.
            while seen.lock().expect("lock").begun == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = stop_tx.send(());
            tokio::time::sleep(Duration::from_millis(100)).await;
            peer_write.write_all(rest).await?;
            tokio::time::sleep(Duration::from_secs(30)).await;
            std::io::Result::Ok(())
        })
    };
    let answers = tokio::spawn(async move {
        let mut reader = PduReader::new(&mut peer_read, 1 << 16);
        let mut answers = Vec::new();
        while let Ok(Some(h)) = reader.read_header().await {
            let Ok(body) = reader.read_body(h).await else {
                break;
            };
            answers.push((h.pdu_type, body.to_vec()));
        }
        answers
    });
    let table = contexts();
    let association = info();
    let stream = Trickle::with_seed(ours, 100, 7);
    let ended = scp::run_association(stream, &association, &table, &service, &service, async {
        let _ = stop_rx.await;
    })
    .await;
    let run = Run {
        ended,
        answers: answers.await.expect("reader"),
    };
    feeder.abort();
    assert!(
        matches!(run.ended.result, Err(AssociationError::Stopped)),
        "{:?}",
        run.ended.result
    );
    assert_eq!(commands(&run)[0].status, Some(status::SUCCESS));
    assert_eq!(service.seen.lock().expect("lock").stored[0].1, data);
}

#[test]
fn violations_name_what_the_peer_did() {
    let v = ProtocolViolation::UnknownContext(5);
    assert!(v.to_string().contains("context 5"));
}

#[tokio::test]
async fn an_oversized_associate_rq_gets_an_abort_not_a_reset() {
    // A 200 KiB A-ASSOCIATE-RQ (over the 128 KiB limit), sent whole.
    let body = vec![0u8; 200 * 1024];
    let mut input = vec![0x01, 0];
    input.extend_from_slice(&(body.len() as u32).to_be_bytes());
    input.extend(body);
    let (peer, mut ours) = tokio::io::duplex(1 << 12);
    let (mut peer_read, mut peer_write) = tokio::io::split(peer);
    let writer = tokio::spawn(async move {
        let _ = peer_write.write_all(&input).await;
        let _ = peer_write.shutdown().await;
    });
    let err = scp::read_associate_rq(&mut ours)
        .await
        .expect_err("too long");
    let reason = err.abort_reason().expect("an abort for the peer");
    assert_eq!(reason, AbortReason::InvalidPduParameter);
    // The rest of the request is still unread: abort, then drain, so the
    // peer (whose writes would otherwise block or be reset) reads the abort.
    let answer = tokio::spawn(async move {
        let mut buf = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut peer_read, &mut buf)
            .await
            .map(|_| buf)
    });
    scp::abort_and_drain(&mut ours, reason).await;
    drop(ours);
    writer.await.expect("writer");
    let got = answer.await.expect("reader").expect("read");
    assert_eq!(
        got,
        pdu::abort_pdu(pdu::AbortSource::ServiceProvider, reason)
    );
}
