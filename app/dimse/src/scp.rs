//! The SCP side of one association: from the A-ASSOCIATE-AC to release or
//! abort, driving the caller's [`Service`] and reporting to its
//! [`Observer`].
//!
//! Per association there is one PDU buffer (the negotiated max PDU), one
//! small command buffer, and at most one message in flight. Data set PDVs
//! go from the PDU buffer straight into the service's [`IncomingObject`];
//! the next PDU is not read until the current fragment is written, so a slow
//! disk slows the sender down instead of filling memory. Nothing here knows
//! what a file, a log or a configuration is: the service decides where an
//! object goes and when it is durable, the observer what is recorded.
//!
//! Accepting or rejecting the request is the caller's, with the helpers
//! [`read_associate_rq`], [`negotiation::negotiate`](crate::negotiation::negotiate),
//! [`send_pdu`] and [`send_abort`]: it knows which bounds apply (association
//! caps, per-peer limits) and what to record of a rejection.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dicom_ul::pdu::{AssociationRQ, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::command::{self, field, status, Command};
use crate::error::{AssociationError, ProtocolViolation};
use crate::negotiation::{find_context, AcceptedContext, ContextTable, ServiceClass};
use crate::pdu::{self, AbortReason, AbortSource, FramingError, PduReader, PduType};
use crate::uid::Uid;

/// The largest A-ASSOCIATE-RQ we read: 128 presentation contexts with a
/// dozen transfer syntaxes each fit with room to spare.
pub const MAX_ASSOCIATE_RQ: u32 = 128 * 1024;
/// The largest command set we assemble from fragments (the largest a
/// C-STORE-RQ can be is well under 1 KiB; C-FIND identifiers travel as data
/// sets, not commands).
pub const MAX_COMMAND: usize = 16 * 1024;

/// A DIMSE failure status with its Error Comment (0000,0902): what a
/// service answers when it cannot or will not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// the status code (PS3.7 Annex C, PS3.4 Annex B)
    pub status: u16,
    /// why, for the peer (cut to 64 characters on the wire) and the logs
    pub comment: String,
}

impl Failure {
    /// A failure with this status and comment.
    pub fn new(status: u16, comment: impl Into<String>) -> Self {
        Failure {
            status,
            comment: comment.into(),
        }
    }
}

/// What was agreed for one association, fixed when it is accepted: a
/// configuration applied later does not change it.
#[derive(Debug, Clone)]
pub struct AssociationInfo {
    /// the peer's address
    pub peer: SocketAddr,
    /// the calling AE title from the A-ASSOCIATE-RQ, without padding
    pub calling_ae: String,
    /// the called AE title (ours, as called), without padding
    pub called_ae: String,
    /// silence allowed between PDUs
    pub dimse_timeout: Duration,
    /// the largest PDU body we receive (announced in the A-ASSOCIATE-AC)
    pub max_pdu: u32,
}

/// One C-STORE-RQ, as the service sees it when the object begins.
#[derive(Debug, Clone, Copy)]
pub struct StoreRequest<'a> {
    /// (0000,0110) Message ID
    pub message_id: u16,
    /// (0000,0002) Affected SOP Class UID (equal to the context's abstract syntax)
    pub sop_class: &'a Uid,
    /// (0000,1000) Affected SOP Instance UID
    pub sop_instance: &'a Uid,
    /// the transfer syntax of the presentation context: the data set's
    pub transfer_syntax: &'a Uid,
}

/// The application's side of DIMSE: what to do with each request.
///
/// C-ECHO is answered at once; C-STORE is begun, fed its data set fragment
/// by fragment, and committed when the last fragment has arrived, and only
/// then answered. (C-FIND, C-MOVE, C-GET and N-ACTION come here next, each
/// as a method with a default that refuses.)
pub trait Service: Send + Sync {
    /// An object being received.
    type Object: IncomingObject;

    /// Answers a C-ECHO-RQ with a status (success by default).
    fn echo(&self, association: &AssociationInfo) -> u16 {
        let _ = association;
        status::SUCCESS
    }

    /// Begins a C-STORE: where its data set goes, or the failure to answer
    /// once the data set has been read (and dropped).
    fn store(
        &self,
        association: &AssociationInfo,
        request: &StoreRequest<'_>,
    ) -> Result<Self::Object, Failure>;
}

/// An object whose data set is arriving.
pub trait IncomingObject: Send + 'static {
    /// What a committed object leaves for the observer (e.g. its path).
    type Receipt: Send;

    /// Takes the next data set fragment, in order. A failure drops the
    /// object: the rest of its data set is read and discarded, and the
    /// failure is answered.
    fn write(&mut self, fragment: &[u8]) -> Result<(), Failure>;

    /// The last fragment has arrived: make the object durable. Success is
    /// answered only after this resolves, so a sender told "stored" can
    /// rely on it. (Blocking work belongs on a blocking thread: the future
    /// must not stall the runtime.)
    fn commit(self) -> impl Future<Output = Result<Self::Receipt, Failure>> + Send;
}

/// How one DIMSE message ended, for the observer.
#[derive(Debug)]
pub struct ObjectOutcome<'a, R> {
    /// the SOP class of the object
    pub sop_class: &'a Uid,
    /// the SOP instance of the object
    pub sop_instance: &'a Uid,
    /// data set bytes received
    pub bytes: u64,
    /// from the C-STORE-RQ to the C-STORE-RSP
    pub elapsed: Duration,
    /// the status we answered (0000 on success)
    pub status: u16,
    /// the service's receipt when stored, or the failure answered
    pub result: Result<&'a R, &'a Failure>,
}

/// What the application records of an association's messages: audit
/// trails, counters, an activity LED. Every method has a default that does
/// nothing.
pub trait Observer<R>: Send + Sync {
    /// A C-ECHO was answered with `status`.
    fn echoed(&self, association: &AssociationInfo, status: u16) {
        let _ = (association, status);
    }

    /// A C-STORE was answered (stored or not).
    fn object(&self, association: &AssociationInfo, outcome: &ObjectOutcome<'_, R>) {
        let _ = (association, outcome);
    }

    /// The peer asked to release; the A-RELEASE-RP is sent when this
    /// resolves. Records that must survive a power cut right after the
    /// release (the objects the sender was told are stored) are made
    /// durable here.
    fn releasing(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The observer that records nothing.
impl<R> Observer<R> for () {}

/// Counts of what an association did, for its log line and audit record.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AssociationSummary {
    /// objects stored
    pub stored: u64,
    /// objects answered with a failure status
    pub failed: u64,
    /// data set bytes stored
    pub bytes: u64,
    /// C-ECHO requests answered
    pub echoes: u64,
}

/// How an association ended, with what it did.
#[derive(Debug)]
pub struct Ended {
    /// `Ok` after an orderly release
    pub result: Result<(), AssociationError>,
    /// what it did until then
    pub summary: AssociationSummary,
}

/// Reads the first PDU of a connection, which must be an A-ASSOCIATE-RQ.
/// Reads exactly that PDU (nothing after it), into a buffer of its size.
pub async fn read_associate_rq<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<AssociationRQ, AssociationError> {
    let (header, whole) = pdu::read_setup_pdu(stream, MAX_ASSOCIATE_RQ).await?;
    if header.pdu_type != PduType::AssociateRq {
        return Err(ProtocolViolation::NotAssociateRq(header.pdu_type).into());
    }
    match dicom_ul::pdu::read_pdu(&whole[..], MAX_ASSOCIATE_RQ, true) {
        Ok(Some(Pdu::AssociationRQ(rq))) => Ok(rq),
        Ok(_) => Err(ProtocolViolation::NotAssociateRq(header.pdu_type).into()),
        Err(e) => Err(AssociationError::BadAssociateRq(e)),
    }
}

/// Encodes an association PDU with `dicom-ul` and sends it.
pub async fn send_pdu<W: AsyncWrite + Unpin>(stream: &mut W, pdu: &Pdu) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(512);
    dicom_ul::pdu::write_pdu(&mut bytes, pdu)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// Sends an A-ABORT (as the service provider) and closes our side.
pub async fn send_abort<W: AsyncWrite + Unpin>(stream: &mut W, reason: AbortReason) {
    // The peer may be gone already; there is nobody to tell then.
    let _ = stream
        .write_all(&pdu::abort_pdu(AbortSource::ServiceProvider, reason))
        .await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// How long, and how many bytes, [`drain`] reads after an A-ABORT.
pub const DRAIN_TIME: Duration = Duration::from_secs(2);
/// See [`DRAIN_TIME`].
pub const DRAIN_BYTES: u64 = 1 << 20;

/// Reads and drops what the peer still sends, until it closes, for at most
/// [`DRAIN_TIME`] and [`DRAIN_BYTES`]. Closing a socket with unread data
/// makes the kernel answer with a reset, which can destroy the A-ABORT
/// just sent before the peer reads it; draining first lets it arrive.
pub async fn drain<R: AsyncRead + Unpin>(stream: &mut R) {
    let mut sink = tokio::io::sink();
    let mut limited = tokio::io::AsyncReadExt::take(stream, DRAIN_BYTES);
    let _ = tokio::time::timeout(DRAIN_TIME, tokio::io::copy(&mut limited, &mut sink)).await;
}

/// Sends an A-ABORT, closes our side, and drains the peer's (see [`drain`]).
pub async fn abort_and_drain<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reason: AbortReason,
) {
    send_abort(stream, reason).await;
    drain(stream).await;
}

/// Runs an accepted association (the A-ASSOCIATE-AC has been sent) until
/// release, abort, error, or `shutdown` resolving while no message is in
/// flight (the caller's stop: the service shutting down, or this
/// association given up to make room). A message in flight is finished
/// first, so an object being received when the service stops is still
/// stored and answered.
pub async fn run_association<St, Sv, Ob>(
    stream: St,
    association: &AssociationInfo,
    contexts: &ContextTable,
    service: &Sv,
    observer: &Ob,
    shutdown: impl Future<Output = ()>,
) -> Ended
where
    St: AsyncRead + AsyncWrite + Unpin,
    Sv: Service,
    Ob: Observer<<Sv::Object as IncomingObject>::Receipt>,
{
    let (read_half, writer) = tokio::io::split(stream);
    let mut reader = PduReader::new(read_half, association.max_pdu);
    let mut handler = Handler {
        writer,
        association,
        contexts,
        service,
        observer,
        command: Vec::with_capacity(1024),
        command_context: None,
        in_flight: None,
        summary: AssociationSummary::default(),
    };
    let result = handler.run(&mut reader, shutdown).await;
    if let Err(e) = &result {
        if let Some(reason) = e.abort_reason() {
            send_abort(&mut handler.writer, reason).await;
            if !matches!(e, AssociationError::Timeout(_) | AssociationError::Stopped) {
                // A peer that broke the protocol may still be sending.
                drain(reader.get_mut()).await;
            }
        }
    }
    Ended {
        result,
        summary: handler.summary,
    }
}

/// Where the data set of the C-STORE in flight goes.
enum Sink<O> {
    /// Into the service's object.
    Object(O),
    /// Refused or failed: the rest of the data set is read and dropped,
    /// then this failure is answered.
    Discard(Failure),
}

/// The C-STORE whose data set is arriving.
struct InFlight<O> {
    context_id: u8,
    message_id: u16,
    sop_class: Uid,
    sop_instance: Uid,
    started: Instant,
    bytes: u64,
    sink: Sink<O>,
}

/// The state of one association (mini-redis's `Handler`): its write side,
/// what was agreed, and the message being assembled. (The read side is
/// apart: PDVs are borrowed from its buffer while the handler acts on them.)
struct Handler<'a, W, Sv: Service, Ob> {
    writer: W,
    association: &'a AssociationInfo,
    contexts: &'a ContextTable,
    service: &'a Sv,
    observer: &'a Ob,
    /// the command set being assembled from fragments (one allocation of
    /// at most [`MAX_COMMAND`] for the association's life)
    command: Vec<u8>,
    /// the context of the command being assembled
    command_context: Option<u8>,
    in_flight: Option<InFlight<Sv::Object>>,
    summary: AssociationSummary,
}

impl<W, Sv, Ob> Handler<'_, W, Sv, Ob>
where
    W: AsyncWrite + Unpin,
    Sv: Service,
    Ob: Observer<<Sv::Object as IncomingObject>::Receipt>,
{
    /// True between messages: nothing would be lost by stopping now.
    fn idle(&self) -> bool {
        self.in_flight.is_none() && self.command_context.is_none()
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PduReader<R>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AssociationError> {
        let timeout = self.association.dimse_timeout;
        let contexts = self.contexts;
        tokio::pin!(shutdown);
        loop {
            let idle = self.idle();
            let header = tokio::select! {
                biased;
                _ = &mut shutdown, if idle => return Err(AssociationError::Stopped),
                read = tokio::time::timeout(timeout, reader.read_header()) => match read {
                    Err(_) => return Err(AssociationError::Timeout(timeout.as_secs())),
                    Ok(Ok(Some(h))) => h,
                    Ok(Ok(None)) => {
                        return Err(FramingError::Io(std::io::ErrorKind::UnexpectedEof.into()).into())
                    }
                    Ok(Err(e)) => return Err(e.into()),
                },
            };
            match header.pdu_type {
                PduType::PData => {}
                PduType::ReleaseRq => {
                    reader.skip_body(header).await?;
                    if !idle {
                        return Err(ProtocolViolation::ReleaseDuringMessage.into());
                    }
                    self.observer.releasing().await;
                    self.writer.write_all(&pdu::RELEASE_RP).await?;
                    self.writer.flush().await?;
                    // The peer closes after reading A-RELEASE-RP.
                    let _ = self.writer.shutdown().await;
                    return Ok(());
                }
                PduType::Abort => return Err(AssociationError::PeerAborted),
                other @ (PduType::AssociateRq
                | PduType::AssociateAc
                | PduType::AssociateRj
                | PduType::ReleaseRp) => return Err(ProtocolViolation::UnexpectedPdu(other).into()),
            }
            let body = match tokio::time::timeout(timeout, reader.read_body(header)).await {
                Err(_) => return Err(AssociationError::Timeout(timeout.as_secs())),
                Ok(body) => body?,
            };
            if body.is_empty() {
                return Err(ProtocolViolation::EmptyPData.into());
            }
            for item in pdu::pdvs(body) {
                let pdv = item?;
                let Some(context) = find_context(contexts, pdv.context_id) else {
                    return Err(ProtocolViolation::UnknownContext(pdv.context_id).into());
                };
                if pdv.is_command {
                    self.command_fragment(context, pdv.data, pdv.is_last)
                        .await?;
                } else {
                    Self::data_fragment(&mut self.in_flight, pdv.context_id, pdv.data)?;
                    if pdv.is_last {
                        if let Some(obj) = self.in_flight.take() {
                            finish_store(
                                obj,
                                &mut self.writer,
                                self.association,
                                self.observer,
                                &mut self.summary,
                            )
                            .await?;
                        }
                    }
                }
            }
        }
    }

    /// Adds a command fragment; on the last one, decodes and performs the
    /// command.
    async fn command_fragment(
        &mut self,
        context: &AcceptedContext,
        data: &[u8],
        is_last: bool,
    ) -> Result<(), AssociationError> {
        if self.in_flight.is_some() {
            return Err(ProtocolViolation::CommandInsideDataSet.into());
        }
        match self.command_context {
            Some(id) if id != context.id => {
                return Err(ProtocolViolation::CommandContextSwitch.into())
            }
            _ => self.command_context = Some(context.id),
        }
        if self.command.len() + data.len() > MAX_COMMAND {
            return Err(ProtocolViolation::CommandTooLong(MAX_COMMAND).into());
        }
        self.command.extend_from_slice(data);
        if !is_last {
            return Ok(());
        }
        self.command_context = None;
        let decoded = Command::decode(&self.command);
        self.command.clear();
        let cmd = decoded.map_err(ProtocolViolation::BadCommand)?;
        match cmd.command_field {
            field::C_ECHO_RQ => {
                if cmd.has_data_set {
                    return Err(ProtocolViolation::EchoWithDataSet.into());
                }
                let code = if context.service != ServiceClass::Verification {
                    status::SOP_CLASS_NOT_SUPPORTED
                } else {
                    self.service.echo(self.association)
                };
                let rsp = command::echo_rsp(cmd.message_id, code);
                pdu::write_pdata(&mut self.writer, context.id, true, true, &rsp).await?;
                self.writer.flush().await?;
                self.summary.echoes += 1;
                self.observer.echoed(self.association, code);
            }
            field::C_STORE_RQ => {
                if !cmd.has_data_set {
                    return Err(ProtocolViolation::StoreWithoutDataSet.into());
                }
                self.in_flight = Some(self.begin_store(context, &cmd));
            }
            other => return Err(ProtocolViolation::UnsupportedCommand(other).into()),
        }
        Ok(())
    }

    /// Decides where the data set of a C-STORE-RQ goes: to the service, or,
    /// for a request the context or the command itself makes unusable,
    /// nowhere, with the failure to answer.
    fn begin_store(&self, context: &AcceptedContext, cmd: &Command) -> InFlight<Sv::Object> {
        let sop_class = cmd.sop_class.clone().unwrap_or_default();
        let sop_instance = cmd.sop_instance.clone().unwrap_or_default();
        let sink = if context.service != ServiceClass::Storage {
            Sink::Discard(Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                "C-STORE on a presentation context not accepted for storage",
            ))
        } else if cmd.sop_instance.is_none() {
            Sink::Discard(Failure::new(
                status::CANNOT_UNDERSTAND,
                "Affected SOP Instance UID missing or not a valid UID",
            ))
        } else if cmd.sop_class.as_ref() != Some(&context.abstract_syntax) {
            Sink::Discard(Failure::new(
                status::DATA_SET_MISMATCH,
                "SOP class differs from the presentation context",
            ))
        } else {
            let request = StoreRequest {
                message_id: cmd.message_id,
                sop_class: &sop_class,
                sop_instance: &sop_instance,
                transfer_syntax: &context.transfer_syntax,
            };
            match self.service.store(self.association, &request) {
                Ok(object) => Sink::Object(object),
                Err(failure) => Sink::Discard(failure),
            }
        };
        InFlight {
            context_id: context.id,
            message_id: cmd.message_id,
            sop_class,
            sop_instance,
            started: Instant::now(),
            bytes: 0,
            sink,
        }
    }

    /// Hands one data set fragment to the object in flight; a write failure
    /// turns it into a discarded one, answered with that failure.
    fn data_fragment(
        in_flight: &mut Option<InFlight<Sv::Object>>,
        context_id: u8,
        data: &[u8],
    ) -> Result<(), AssociationError> {
        let Some(obj) = in_flight.as_mut() else {
            return Err(ProtocolViolation::DataWithoutCommand.into());
        };
        if obj.context_id != context_id {
            return Err(ProtocolViolation::DataContextSwitch.into());
        }
        obj.bytes += data.len() as u64;
        if let Sink::Object(object) = &mut obj.sink {
            if let Err(failure) = object.write(data) {
                // Dropping the object gives up what was written of it.
                obj.sink = Sink::Discard(failure);
            }
        }
        Ok(())
    }
}

/// Commits the object (durably) and only then answers the C-STORE-RQ.
async fn finish_store<W, O, Ob>(
    obj: InFlight<O>,
    writer: &mut W,
    association: &AssociationInfo,
    observer: &Ob,
    summary: &mut AssociationSummary,
) -> Result<(), AssociationError>
where
    W: AsyncWrite + Unpin,
    O: IncomingObject,
    Ob: Observer<O::Receipt>,
{
    let committed = match obj.sink {
        Sink::Object(object) => object.commit().await,
        Sink::Discard(failure) => Err(failure),
    };
    let (code, comment) = match &committed {
        Ok(_) => (status::SUCCESS, None),
        Err(f) => (f.status, Some(f.comment.as_str())),
    };
    let rsp = command::store_rsp(
        obj.message_id,
        &obj.sop_class,
        &obj.sop_instance,
        code,
        comment,
    );
    pdu::write_pdata(writer, obj.context_id, true, true, &rsp).await?;
    writer.flush().await?;
    match &committed {
        Ok(_) => {
            summary.stored += 1;
            summary.bytes += obj.bytes;
        }
        Err(_) => summary.failed += 1,
    }
    observer.object(
        association,
        &ObjectOutcome {
            sop_class: &obj.sop_class,
            sop_instance: &obj.sop_instance,
            bytes: obj.bytes,
            elapsed: obj.started.elapsed(),
            status: code,
            result: committed.as_ref(),
        },
    );
    Ok(())
}
