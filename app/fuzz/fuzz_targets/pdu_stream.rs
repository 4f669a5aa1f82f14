//! A whole association's byte stream into the SCP state machine: PDU
//! framing, PDV splitting, command assembly and decoding, C-ECHO and
//! C-STORE, C-FIND refused, C-GET (whose sub-operations' C-STORE-RSPs and
//! C-CANCEL-RQs the input supplies) and C-MOVE (to a destination that is
//! gone), read in pieces of a size the input chooses (the first byte), so
//! that the PDU reader's carry-over runs too. Whatever the bytes, the SCP
//! must end (release, abort or error) without panicking.
#![no_main]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use dimse::ae::AeTitle;
use dimse::negotiation::{AcceptedContext, ContextTable, ServiceClass};
use dimse::scp::{
    self, AssociationInfo, Failure, IncomingObject, MoveDestination, MoveRetrieval, Outgoing,
    Retrieval, RetrieveRequest, Service, StoreRequest, SubOperationFailure,
};
use dimse::uid::{self, Uid};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The peer: its bytes, handed out at most `piece` at a time; what the SCP
/// answers is dropped.
struct Peer<'a> {
    rest: &'a [u8],
    piece: usize,
}

impl AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.piece.min(self.rest.len()).min(buf.remaining());
        let (now, later) = self.rest.split_at(n);
        buf.put_slice(now);
        self.rest = later;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

/// Counts bytes and keeps nothing.
struct Discard;
struct Counted(u64);

/// Two small CT objects (Explicit VR LE), and one the service cannot open.
fn retrieval() -> Retrieval {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let ct = Uid::new(CT).expect("valid");
    let ts = Uid::new(uid::EXPLICIT_VR_LE).expect("valid");
    for (n, len) in [(1u8, 10usize), (2, 3)] {
        let _ = tx.try_send(Ok(Outgoing {
            sop_class: ct.clone(),
            sop_instance: Uid::new(&format!("1.2.3.{n}")).expect("valid"),
            transfer_syntax: ts.clone(),
            length: len as u64,
            data: Box::pin(std::io::Cursor::new(vec![n; len])),
        }));
    }
    let _ = tx.try_send(Err(SubOperationFailure::from(Failure::new(0xA702, "gone"))));
    Retrieval {
        sub_operations: 3,
        presentations: vec![(ct, ts)],
        objects: rx,
    }
}

impl Service for Discard {
    type Object = Counted;
    fn store(&self, _: &AssociationInfo, _: &StoreRequest<'_>) -> Result<Counted, Failure> {
        Ok(Counted(0))
    }

    async fn get(&self, _: &AssociationInfo, _: &RetrieveRequest<'_>) -> Result<Retrieval, Failure> {
        Ok(retrieval())
    }

    async fn move_(
        &self,
        _: &AssociationInfo,
        _: &RetrieveRequest<'_>,
    ) -> Result<MoveRetrieval, Failure> {
        // A destination whose other end is gone: its association fails.
        let (ours, _) = tokio::io::duplex(64);
        Ok(MoveRetrieval {
            retrieval: retrieval(),
            destination: MoveDestination {
                transport: Box::new(ours),
                called_ae: AeTitle::new("DEST").expect("valid"),
                calling_ae: AeTitle::new("MINIPACS").expect("valid"),
            },
        })
    }
}

impl IncomingObject for Counted {
    type Receipt = u64;
    fn write(&mut self, fragment: &[u8]) -> Result<(), Failure> {
        self.0 += fragment.len() as u64;
        Ok(())
    }
    async fn commit(self) -> Result<u64, Failure> {
        Ok(self.0)
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}

fn contexts() -> ContextTable {
    let mut table = ContextTable::new();
    for (id, abs, service) in [
        (1, uid::VERIFICATION, ServiceClass::Verification),
        (3, CT, ServiceClass::Storage),
        (5, uid::STUDY_ROOT_FIND, ServiceClass::Find),
        (7, uid::STUDY_ROOT_GET, ServiceClass::Get),
        (9, uid::STUDY_ROOT_MOVE, ServiceClass::Move),
    ] {
        let _ = table.push(AcceptedContext {
            id,
            abstract_syntax: Uid::new(abs).expect("valid"),
            transfer_syntax: Uid::new(uid::EXPLICIT_VR_LE).expect("valid"),
            service,
            // C-GET sub-operations go to the storage context.
            peer_scp_role: service == ServiceClass::Storage,
            peer_may_store: true,
        });
    }
    table
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let peer = Peer {
        rest: stream,
        piece: usize::from(piece).max(1),
    };
    let association = AssociationInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 104)),
        calling_ae: "FUZZ".into(),
        called_ae: "MINIPACS".into(),
        dimse_timeout: Duration::from_secs(1),
        max_pdu: 16384,
        peer_max_pdu: 16384,
    };
    let table = contexts();
    runtime().block_on(async {
        let ended = scp::run_association(
            peer,
            &association,
            &table,
            &Discard,
            &(),
            std::future::pending(),
        )
        .await;
        // The input always runs out: the association cannot outlive it.
        let _ = ended;
    });
});
