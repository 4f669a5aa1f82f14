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
//! A C-FIND's identifier is assembled in memory (it is small, and capped
//! at [`MAX_IDENTIFIER`]) and handed to [`Service::find`] as bytes in the
//! context's transfer syntax; the service answers with a bounded channel of
//! encoded response identifiers, each sent as a pending response while the
//! next PDU is read at the same time, so that a C-CANCEL-RQ stops the
//! answer within one response. Parsing identifiers and matching them is
//! the application's: this crate holds no dictionary and no database.
//!
//! C-GET and C-MOVE take their identifier the same way and hand it to
//! [`Service::get`] or [`Service::move_`], which answer with a
//! [`Retrieval`]: how many objects there are, and a bounded channel of
//! [`Outgoing`] objects, each a data set to be read from the application
//! (its file, after the Part-10 meta header) and streamed through one send
//! buffer of the peer's PDU size, bytes unchanged. A C-GET sends them as
//! C-STORE-RQs on this association, on the storage contexts whose SCP role
//! the peer took (see [`negotiation`](crate::negotiation)), and reads each
//! C-STORE-RSP while watching for a C-CANCEL-RQ; a C-MOVE opens one
//! association (as [`scu`](crate::scu)) on the connection the application
//! made to the destination and sends them there, with the Move Originator
//! fields, while this association is read for a C-CANCEL-RQ. Either way a
//! pending response follows each sub-operation and a final one the last
//! (PS3.4 C.4.2, C.4.3); the counts are this crate's, the lookups,
//! files and peers the application's.
//!
//! Storage Commitment (PS3.4 Annex J) comes as an N-ACTION-RQ whose Action
//! Information is assembled like an identifier (capped at
//! [`MAX_INFORMATION`]) and handed to [`Service::n_action`]. Its
//! [`ActionAnswer`] is sent as the N-ACTION-RSP at once, followed, when
//! the application has the result already, by an N-EVENT-REPORT-RQ on the
//! same association ([`EventReport`]). The association goes on meanwhile:
//! the peer's N-EVENT-REPORT-RSP is matched to it whenever it comes (even
//! amid a C-FIND), and the application learns through a oneshot channel
//! whether the report was delivered, or was not (the peer released or
//! aborted first, or did not answer within the DIMSE timeout), in which
//! case it sends it on an association of its own. A commitment SCP that
//! delivers a result to us sends an N-EVENT-REPORT-RQ, handed to
//! [`Service::n_event_report`] and answered with its status.
//!
//! Accepting or rejecting the request is the caller's, with the helpers
//! [`read_associate_rq`], [`negotiation::negotiate`](crate::negotiation::negotiate),
//! [`send_pdu`] and [`send_abort`]: it knows which bounds apply (association
//! caps, per-peer limits) and what to record of a rejection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use dicom_ul::pdu::{AssociationRQ, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::ae::AeTitle;
use crate::command::{self, field, status, Command, MoveOriginator};
use crate::error::{AssociationError, ProtocolViolation};
use crate::negotiation::{find_context, AcceptedContext, ContextTable, ServiceClass};
use crate::pdu::{self, AbortReason, AbortSource, FramingError, PduReader, PduType, StreamError};
use crate::retrieve::{self, Tally};
use crate::scu::{ScuAssociation, ScuError, ScuOptions};
use crate::uid::{self, Uid};

/// The largest A-ASSOCIATE-RQ we read: 128 presentation contexts with a
/// dozen transfer syntaxes each fit with room to spare.
pub const MAX_ASSOCIATE_RQ: u32 = 128 * 1024;
/// The largest command set we assemble from fragments (the largest a
/// C-STORE-RQ can be is well under 1 KiB; C-FIND identifiers travel as data
/// sets, not commands).
pub const MAX_COMMAND: usize = 16 * 1024;
/// The largest C-FIND identifier we take. A query names a few dozen keys
/// (well under 4 KiB); a larger one is read and dropped, and answered with
/// a failure status, not an abort.
pub const MAX_IDENTIFIER: usize = 64 * 1024;
/// The largest Action Information (N-ACTION) or Event Information
/// (N-EVENT-REPORT) we take: a Storage Commitment data set, decoded whole
/// by the application, so bounded as [`crate::commitment::MAX_DATA_SET`]
/// (1 MiB, some 10,000 references). A larger one is read and dropped, and
/// answered with 0213 (resource limitation), not an abort.
pub const MAX_INFORMATION: usize = crate::commitment::MAX_DATA_SET;
/// How many of our N-EVENT-REPORT-RQs may await their response on one
/// association; a report beyond them is not sent (not delivered).
pub const MAX_PENDING_REPORTS: usize = 8;

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
    /// the largest PDU body the peer receives (from its A-ASSOCIATE-RQ; 0
    /// for no limit): data sets we send are cut to fit it
    pub peer_max_pdu: u32,
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
    /// (0000,1030) and (0000,1031): who asked for the C-MOVE this C-STORE
    /// is a sub-operation of, when the sender says so
    pub move_originator: Option<&'a MoveOriginator>,
}

/// One C-FIND-RQ with its whole identifier, as the service sees it.
#[derive(Debug, Clone, Copy)]
pub struct FindRequest<'a> {
    /// (0000,0110) Message ID
    pub message_id: u16,
    /// (0000,0002) Affected SOP Class UID: the information model (Patient
    /// Root or Study Root FIND), equal to the context's abstract syntax
    pub sop_class: &'a Uid,
    /// (0000,0700) Priority
    pub priority: u16,
    /// the transfer syntax of the presentation context: the identifier's,
    /// and the one the response identifiers must be encoded in
    pub transfer_syntax: &'a Uid,
    /// the identifier data set (at most [`MAX_IDENTIFIER`] bytes)
    pub identifier: &'a [u8],
}

/// What a service answers a C-FIND with: the encoded identifier of each
/// match, in the request's transfer syntax, one at a time. Each is sent as
/// a pending response (FF00); the channel closing ends the answer with
/// success (0000), a `Failure` ends it with that failure. The handler drops
/// the receiver on a C-CANCEL-RQ (answered FE00) or when the association
/// ends, so the producer's next `send` fails and it stops. Bounded by its
/// producer: a channel of a few entries keeps memory flat however many
/// matches there are.
pub type Matches = tokio::sync::mpsc::Receiver<Result<Vec<u8>, Failure>>;

/// Which retrieve a request is (the two differ only in where the objects
/// go).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrieveOperation {
    /// C-GET: to the requester, over its own association
    Get,
    /// C-MOVE: to the Move Destination, over an association we open
    Move,
}

/// One C-GET-RQ or C-MOVE-RQ with its whole identifier, as the service
/// sees it.
#[derive(Debug, Clone, Copy)]
pub struct RetrieveRequest<'a> {
    /// C-GET or C-MOVE
    pub operation: RetrieveOperation,
    /// (0000,0110) Message ID
    pub message_id: u16,
    /// (0000,0002) Affected SOP Class UID: the information model (Patient
    /// Root or Study Root GET or MOVE), equal to the context's abstract
    /// syntax
    pub sop_class: &'a Uid,
    /// (0000,0700) Priority (passed on to the sub-operations' C-STORE-RQs)
    pub priority: u16,
    /// the transfer syntax of the presentation context: the identifier's
    pub transfer_syntax: &'a Uid,
    /// the identifier data set (at most [`MAX_IDENTIFIER`] bytes)
    pub identifier: &'a [u8],
    /// (0000,0600) Move Destination, for a C-MOVE (always a valid AE
    /// title: a C-MOVE without one is refused with A801 before the service
    /// is asked); `None` for a C-GET
    pub move_destination: Option<&'a AeTitle>,
}

/// One object to send as a C-STORE sub-operation.
///
/// The application opens the object's file, positions the reader after
/// the Part-10 meta header (the data set starts there) and says how many
/// data set bytes follow. They are sent unchanged, in the transfer syntax
/// they are stored in, read chunk by chunk into the association's one send
/// buffer: never a whole object in memory.
pub struct Outgoing {
    /// the object's SOP Class UID (the C-STORE-RQ's Affected SOP Class)
    pub sop_class: Uid,
    /// the object's SOP Instance UID
    pub sop_instance: Uid,
    /// the transfer syntax the data set is encoded in: it is sent on a
    /// presentation context of exactly this (SOP class, transfer syntax)
    /// pair, or not at all (no transcoding here)
    pub transfer_syntax: Uid,
    /// how many data set bytes `data` yields (the file's length less the
    /// meta header's); exactly these are read and sent
    pub length: u64,
    /// the data set bytes; a read failure before the first byte is sent
    /// fails this sub-operation only, one after it aborts the association
    /// it was being sent on (DIMSE cannot take half a data set back)
    pub data: Pin<Box<dyn tokio::io::AsyncRead + Send>>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("sop_class", &self.sop_class)
            .field("sop_instance", &self.sop_instance)
            .field("transfer_syntax", &self.transfer_syntax)
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

/// An object the application could not hand over (its file gone or
/// unreadable, say): counted as a failed sub-operation, and its SOP
/// Instance UID, when known, put in the Failed SOP Instance UID List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubOperationFailure {
    /// the object that failed, when the application knows it
    pub sop_instance: Option<Uid>,
    /// why (for the observer; the peer sees only the counts and the list)
    pub failure: Failure,
}

impl SubOperationFailure {
    /// The failure of one object.
    pub fn new(sop_instance: Option<Uid>, failure: Failure) -> Self {
        SubOperationFailure {
            sop_instance,
            failure,
        }
    }
}

impl From<Failure> for SubOperationFailure {
    fn from(failure: Failure) -> Self {
        SubOperationFailure::new(None, failure)
    }
}

/// The objects of a retrieve, one at a time, as the application produces
/// them. The handler drops the receiver on a C-CANCEL-RQ or when the
/// association ends, so the producer's next `send` fails and it stops.
/// Bounded by its producer: a few entries (each an open file) keep memory
/// and descriptors flat however many objects there are.
pub type Outgoings = tokio::sync::mpsc::Receiver<Result<Outgoing, SubOperationFailure>>;

/// What a service answers a C-GET or C-MOVE with.
#[derive(Debug)]
pub struct Retrieval {
    /// how many objects will come through `objects` (known up front, from
    /// the index). The wire counts are 16-bit: above 65535 the Number of
    /// Remaining Sub-operations is reported as 65535 until fewer remain
    /// (and the other counts saturate at 65535), so that a large retrieve
    /// is performed rather than refused; the observer gets exact counts.
    /// Objects that never come (the channel closes early) are counted as
    /// failed; objects beyond the number are still sent.
    pub sub_operations: u64,
    /// the distinct (SOP class, transfer syntax) pairs of the objects, in
    /// the order they should be proposed: the presentation contexts of the
    /// C-MOVE association (one each, at most 128; objects of a pair left
    /// out or refused by the destination fail without being sent). Not
    /// used by C-GET, whose contexts the requester proposed.
    pub presentations: Vec<(Uid, Uid)>,
    /// the objects
    pub objects: Outgoings,
}

/// One N-ACTION-RQ with its whole Action Information, as the service sees
/// it. Only a Storage Commitment "Request Storage Commitment" reaches the
/// service: the SOP class, the well-known instance and the Action Type ID
/// are checked before.
#[derive(Debug, Clone, Copy)]
pub struct ActionRequest<'a> {
    /// (0000,0110) Message ID
    pub message_id: u16,
    /// (0000,0003) Requested SOP Class UID (the context's abstract syntax)
    pub sop_class: &'a Uid,
    /// (0000,1001) Requested SOP Instance UID (the well-known instance)
    pub sop_instance: &'a Uid,
    /// (0000,1008) Action Type ID
    pub action_type_id: u16,
    /// the transfer syntax of the presentation context: the data set's,
    /// and the one an [`EventReport`] on this association is encoded in
    pub transfer_syntax: &'a Uid,
    /// the Action Information (at most [`MAX_INFORMATION`] bytes; empty if
    /// the request had none)
    pub data_set: &'a [u8],
}

/// Whether an N-EVENT-REPORT-RQ we sent was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportDelivery {
    /// the peer answered with this N-EVENT-REPORT-RSP status (0000: it
    /// took the result) and Error Comment
    Delivered {
        /// the response's status
        status: u16,
        /// the response's Error Comment, if any
        comment: Option<String>,
    },
    /// the peer did not answer: it released or aborted the association, or
    /// did not answer within the DIMSE timeout, or the report was not sent
    /// at all. The application sends it again on an association it opens.
    NotDelivered {
        /// what happened, for the logs
        reason: String,
    },
}

/// An N-EVENT-REPORT-RQ to send on the association an N-ACTION came on,
/// right after its N-ACTION-RSP (PS3.4 J.3.3: the Storage Commitment SCP
/// may report on the same association).
#[derive(Debug)]
pub struct EventReport {
    /// (0000,0002) Affected SOP Class UID (Storage Commitment Push Model)
    pub sop_class: Uid,
    /// (0000,1000) Affected SOP Instance UID (its well-known instance)
    pub sop_instance: Uid,
    /// (0000,1002) Event Type ID (1: all committed, 2: failures exist)
    pub event_type_id: u16,
    /// the Event Information, encoded by the application (with
    /// [`commitment`](crate::commitment)) in the request's transfer syntax
    pub data_set: Vec<u8>,
    /// told whether the report was delivered; `None` when nobody asks. A
    /// sender dropped without a value (the association failing while the
    /// N-ACTION-RSP was sent) means not delivered too.
    pub delivery: Option<oneshot::Sender<ReportDelivery>>,
}

impl EventReport {
    /// Tells the application the report was not delivered, and why.
    fn not_delivered(mut self, reason: impl Into<String>) {
        if let Some(tx) = self.delivery.take() {
            let _ = tx.send(ReportDelivery::NotDelivered {
                reason: reason.into(),
            });
        }
    }
}

/// What a service answers an N-ACTION with.
#[derive(Debug)]
pub struct ActionAnswer {
    /// the N-ACTION-RSP status (success or a warning), or the failure to
    /// answer
    pub result: Result<u16, Failure>,
    /// the report to send right after a successful N-ACTION-RSP, when the
    /// result is known already (ignored, and not delivered, after a
    /// failure)
    pub report: Option<EventReport>,
}

impl ActionAnswer {
    /// Success, followed by `report` when given.
    pub fn success(report: Option<EventReport>) -> Self {
        ActionAnswer {
            result: Ok(command::status::SUCCESS),
            report,
        }
    }

    /// A failure, and no report.
    pub fn failed(failure: Failure) -> Self {
        ActionAnswer {
            result: Err(failure),
            report: None,
        }
    }
}

/// One N-EVENT-REPORT-RQ with its whole Event Information, as the service
/// sees it: a Storage Commitment SCP delivering the result of a request we
/// made. The SOP class, the well-known instance and the Event Type ID (1
/// or 2) are checked before.
#[derive(Debug, Clone, Copy)]
pub struct EventReportRequest<'a> {
    /// (0000,0110) Message ID
    pub message_id: u16,
    /// (0000,0002) Affected SOP Class UID (the context's abstract syntax)
    pub sop_class: &'a Uid,
    /// (0000,1000) Affected SOP Instance UID (the well-known instance)
    pub sop_instance: &'a Uid,
    /// (0000,1002) Event Type ID
    pub event_type_id: u16,
    /// the transfer syntax of the presentation context: the data set's
    pub transfer_syntax: &'a Uid,
    /// the Event Information (at most [`MAX_INFORMATION`] bytes; empty if
    /// the request had none)
    pub data_set: &'a [u8],
    /// the peer took the SCP role for Storage Commitment at negotiation,
    /// as a commitment SCP opening an association to report should. (Not
    /// required here: some do not ask, and the report is still theirs.)
    pub peer_scp_role: bool,
}

/// A connection to a C-MOVE destination, already established (TCP, or
/// TLS over it): anything that reads and writes bytes.
pub trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + ?Sized> Transport for T {}

/// Where a C-MOVE's objects go: the application looked the Move
/// Destination up (its peers table) and connected to it; this crate
/// requests the association, sends, and releases it.
pub struct MoveDestination {
    /// the connection, already open
    pub transport: Box<dyn Transport>,
    /// the destination's AE title (the called AE title we request)
    pub called_ae: AeTitle,
    /// our AE title for that association (the calling AE title)
    pub calling_ae: AeTitle,
}

impl std::fmt::Debug for MoveDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoveDestination")
            .field("called_ae", &self.called_ae)
            .field("calling_ae", &self.calling_ae)
            .finish_non_exhaustive()
    }
}

/// What a service answers a C-MOVE with: the objects and where they go.
#[derive(Debug)]
pub struct MoveRetrieval {
    /// the objects
    pub retrieval: Retrieval,
    /// the destination, connected
    pub destination: MoveDestination,
}

/// The application's side of DIMSE: what to do with each request.
///
/// C-ECHO is answered at once; C-STORE is begun, fed its data set fragment
/// by fragment, and committed when the last fragment has arrived, and only
/// then answered; C-FIND is answered from [`Service::find`]'s stream of
/// matches; C-GET and C-MOVE from [`Service::get`]'s and
/// [`Service::move_`]'s stream of objects; N-ACTION and N-EVENT-REPORT
/// (Storage Commitment) from [`Service::n_action`] and
/// [`Service::n_event_report`].
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

    /// Begins a C-FIND: the matches to send, or the failure to answer at
    /// once. By default C-FIND is refused (0122, SOP class not supported).
    fn find(
        &self,
        association: &AssociationInfo,
        request: &FindRequest<'_>,
    ) -> Result<Matches, Failure> {
        let _ = (association, request);
        Err(Failure::new(
            status::SOP_CLASS_NOT_SUPPORTED,
            "C-FIND not supported",
        ))
    }

    /// Begins a C-GET: how many objects match the identifier and the
    /// stream of them, or the failure to answer at once (A900 for an
    /// identifier that does not fit the model, A701 when the matches
    /// cannot be counted, a C000-range status otherwise). The objects go
    /// back to the requester on this association. Asynchronous, so that
    /// the count can come from a blocking index lookup; no C-CANCEL-RQ is
    /// read until it resolves. By default C-GET is refused (0122, SOP
    /// class not supported).
    fn get(
        &self,
        association: &AssociationInfo,
        request: &RetrieveRequest<'_>,
    ) -> impl Future<Output = Result<Retrieval, Failure>> + Send {
        let _ = (association, request);
        async {
            Err(Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                "C-GET not supported",
            ))
        }
    }

    /// Begins a C-MOVE: the objects as for [`Service::get`], and the
    /// destination named by `request.move_destination`, connected. Which
    /// destinations exist, and what a failure to reach one is answered
    /// with (A801 for an unknown AE title), is the application's. By
    /// default C-MOVE is refused (0122, SOP class not supported).
    fn move_(
        &self,
        association: &AssociationInfo,
        request: &RetrieveRequest<'_>,
    ) -> impl Future<Output = Result<MoveRetrieval, Failure>> + Send {
        let _ = (association, request);
        async {
            Err(Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                "C-MOVE not supported",
            ))
        }
    }

    /// Answers an N-ACTION-RQ (Request Storage Commitment): the
    /// N-ACTION-RSP status, sent at once, and the result as an
    /// [`EventReport`] to send after it on this association when it is
    /// known already. Whether the instances are here is the application's
    /// to decide (and quickly: the requester waits for the N-ACTION-RSP);
    /// a result it cannot give at once, or that was not delivered, it
    /// sends on an association it opens. By default N-ACTION is refused
    /// (0122, SOP class not supported).
    fn n_action(
        &self,
        association: &AssociationInfo,
        request: &ActionRequest<'_>,
    ) -> impl Future<Output = ActionAnswer> + Send {
        let _ = (association, request);
        async {
            ActionAnswer::failed(Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                "N-ACTION not supported",
            ))
        }
    }

    /// Takes an N-EVENT-REPORT-RQ (the result of a Storage Commitment we
    /// asked for, delivered on an association the commitment SCP opened):
    /// the N-EVENT-REPORT-RSP status, or the failure to answer. By default
    /// refused (0122, SOP class not supported).
    fn n_event_report(
        &self,
        association: &AssociationInfo,
        request: &EventReportRequest<'_>,
    ) -> impl Future<Output = Result<u16, Failure>> + Send {
        let _ = (association, request);
        async {
            Err(Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                "N-EVENT-REPORT not supported",
            ))
        }
    }
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

/// How one C-FIND ended, for the observer.
#[derive(Debug)]
pub struct FindOutcome<'a> {
    /// the information model (the request's Affected SOP Class UID)
    pub sop_class: &'a Uid,
    /// the identifier's transfer syntax
    pub transfer_syntax: &'a Uid,
    /// the identifier as received (empty when it was over the cap)
    pub identifier: &'a [u8],
    /// pending responses sent (matches answered)
    pub matches: u64,
    /// the final status (0000, FE00 after a cancel, or a failure)
    pub status: u16,
    /// the failure's comment, when the final status is one
    pub comment: Option<&'a str>,
    /// from the last identifier fragment to the final response
    pub elapsed: Duration,
}

/// How one sub-operation (one object sent) of a C-GET or C-MOVE ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubOperationResult {
    /// stored by the receiver (status 0000)
    Completed,
    /// stored with a warning (B000, B006, B007 and other warnings)
    Warning,
    /// not stored: refused by the receiver, or not sent
    Failed,
}

/// One sub-operation of a C-GET or C-MOVE, for the observer (an audit
/// record of each object that left).
#[derive(Debug)]
pub struct SubOperationOutcome<'a> {
    /// C-GET or C-MOVE
    pub operation: RetrieveOperation,
    /// the C-MOVE's destination AE title; `None` for a C-GET
    pub destination: Option<&'a AeTitle>,
    /// the object's SOP class; `None` when the application's failure named
    /// no object
    pub sop_class: Option<&'a Uid>,
    /// the object's SOP instance; `None` as for `sop_class`
    pub sop_instance: Option<&'a Uid>,
    /// data set bytes sent
    pub bytes: u64,
    /// the receiver's C-STORE-RSP status, or, for an object not sent, the
    /// failure's
    pub status: u16,
    /// the receiver's Error Comment, or why the object was not sent
    pub comment: Option<&'a str>,
    /// how it counts
    pub result: SubOperationResult,
    /// from taking the object to its C-STORE-RSP
    pub elapsed: Duration,
}

/// Sub-operation counts of a retrieve, exact (the wire's are 16-bit).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SubOperationCounts {
    /// not performed (after a C-CANCEL-RQ; 0 otherwise)
    pub remaining: u64,
    /// stored without warning
    pub completed: u64,
    /// not stored, or not sent
    pub failed: u64,
    /// stored with a warning
    pub warning: u64,
}

/// How one C-GET or C-MOVE ended, for the observer.
#[derive(Debug)]
pub struct RetrieveOutcome<'a> {
    /// C-GET or C-MOVE
    pub operation: RetrieveOperation,
    /// the information model (the request's Affected SOP Class UID)
    pub sop_class: &'a Uid,
    /// the identifier's transfer syntax
    pub transfer_syntax: &'a Uid,
    /// the identifier as received (empty when it was over the cap)
    pub identifier: &'a [u8],
    /// the C-MOVE's Move Destination; `None` for a C-GET (or a C-MOVE
    /// without a valid one)
    pub destination: Option<&'a AeTitle>,
    /// what was done
    pub counts: SubOperationCounts,
    /// the final status: 0000 all completed, B000 some failed or warned,
    /// A702 all failed, FE00 cancelled, or the refusal
    pub status: u16,
    /// the Error Comment of the final response, when it has one
    pub comment: Option<&'a str>,
    /// why the first failed sub-operation failed (the receiver's Error
    /// Comment or status, or why it was not sent), when one failed: the
    /// reason a B000 or A702 is worth a line in the log
    pub first_failure: Option<&'a str>,
    /// from the last identifier fragment to the final response
    pub elapsed: Duration,
}

/// How one N-ACTION ended, for the observer.
#[derive(Debug)]
pub struct ActionOutcome<'a> {
    /// the Requested SOP Class UID (the context's when the request named
    /// none usable)
    pub sop_class: &'a Uid,
    /// the Action Type ID, when the request had one
    pub action_type_id: Option<u16>,
    /// the data set's transfer syntax
    pub transfer_syntax: &'a Uid,
    /// the Action Information as received (empty when over the cap)
    pub data_set: &'a [u8],
    /// the N-ACTION-RSP status
    pub status: u16,
    /// the failure's comment, when the status is one
    pub comment: Option<&'a str>,
    /// an N-EVENT-REPORT-RQ followed on this association (its delivery is
    /// told through [`EventReport::delivery`])
    pub report_sent: bool,
    /// from the last data set fragment to the N-ACTION-RSP
    pub elapsed: Duration,
}

/// How one incoming N-EVENT-REPORT ended, for the observer.
#[derive(Debug)]
pub struct EventReportOutcome<'a> {
    /// the Affected SOP Class UID (the context's when the request named
    /// none usable)
    pub sop_class: &'a Uid,
    /// the Event Type ID, when the request had one
    pub event_type_id: Option<u16>,
    /// the data set's transfer syntax
    pub transfer_syntax: &'a Uid,
    /// the Event Information as received (empty when over the cap)
    pub data_set: &'a [u8],
    /// the N-EVENT-REPORT-RSP status
    pub status: u16,
    /// the failure's comment, when the status is one
    pub comment: Option<&'a str>,
    /// from the last data set fragment to the N-EVENT-REPORT-RSP
    pub elapsed: Duration,
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

    /// A C-FIND was answered with its final response.
    fn found(&self, association: &AssociationInfo, outcome: &FindOutcome<'_>) {
        let _ = (association, outcome);
    }

    /// One object of a C-GET or C-MOVE was sent (or failed).
    fn sub_operation(&self, association: &AssociationInfo, outcome: &SubOperationOutcome<'_>) {
        let _ = (association, outcome);
    }

    /// A C-GET or C-MOVE was answered with its final response.
    fn retrieved(&self, association: &AssociationInfo, outcome: &RetrieveOutcome<'_>) {
        let _ = (association, outcome);
    }

    /// An N-ACTION was answered (and its report sent, when there was one).
    fn actioned(&self, association: &AssociationInfo, outcome: &ActionOutcome<'_>) {
        let _ = (association, outcome);
    }

    /// An N-EVENT-REPORT from the peer was answered.
    fn event_reported(&self, association: &AssociationInfo, outcome: &EventReportOutcome<'_>) {
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
    /// C-FIND requests answered (whatever their final status)
    pub finds: u64,
    /// C-GET and C-MOVE requests answered (whatever their final status)
    pub retrieves: u64,
    /// objects sent by C-GET and C-MOVE and stored by the receiver
    /// (completed or with a warning)
    pub sent: u64,
    /// data set bytes of the objects in `sent`
    pub sent_bytes: u64,
    /// N-ACTION requests answered (whatever their status)
    pub actions: u64,
    /// N-EVENT-REPORT requests from the peer answered (whatever their
    /// status)
    pub event_reports: u64,
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
        query: None,
        query_ready: None,
        cancel_seen: None,
        send_buf: Vec::new(),
        next_message_id: 1,
        summary: AssociationSummary::default(),
        n_request: None,
        n_ready: None,
        reports: Vec::new(),
    };
    let result = handler.run(&mut reader, shutdown).await;
    // Reports still awaiting their response were not delivered.
    let reason = match &result {
        Ok(()) => "the peer released the association without answering".to_string(),
        Err(e) => format!("the association ended without an answer: {e}"),
    };
    for report in handler.reports.drain(..) {
        report.resolve(ReportDelivery::NotDelivered {
            reason: reason.clone(),
        });
    }
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

/// What a query/retrieve request whose identifier is arriving will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueryOperation {
    Find,
    Retrieve(RetrieveOperation),
}

/// The C-FIND, C-GET or C-MOVE whose identifier is arriving (or has
/// arrived).
struct QueryInFlight {
    operation: QueryOperation,
    context_id: u8,
    message_id: u16,
    sop_class: Uid,
    transfer_syntax: Uid,
    priority: u16,
    /// the identifier so far, at most [`MAX_IDENTIFIER`] bytes
    identifier: Vec<u8>,
    /// why it will be answered with a failure without asking the service
    /// (a context not accepted for the operation, an identifier over the
    /// cap, a C-MOVE without a valid Move Destination)
    refusal: Option<Failure>,
    /// (0000,0600) of a C-MOVE
    move_destination: Option<AeTitle>,
}

/// What arrived from the requester while a C-GET or C-MOVE is performed.
#[derive(Debug, Default)]
struct RetrieveEvents {
    /// a C-CANCEL-RQ of the retrieve
    cancelled: bool,
    /// the C-STORE-RSP awaited: its status and Error Comment
    store_rsp: Option<(u16, Option<String>)>,
}

/// Which DIMSE-N request a data set is arriving for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NOperation {
    Action,
    EventReport,
}

/// The N-ACTION or N-EVENT-REPORT whose data set is arriving (or has
/// arrived).
struct NInFlight {
    operation: NOperation,
    context_id: u8,
    message_id: u16,
    /// the Requested (N-ACTION) or Affected (N-EVENT-REPORT) SOP Class
    /// UID, or the context's when the request named none usable
    sop_class: Uid,
    /// the Requested or Affected SOP Instance UID, when usable
    sop_instance: Option<Uid>,
    /// the Action or Event Type ID
    type_id: Option<u16>,
    transfer_syntax: Uid,
    peer_scp_role: bool,
    /// the data set so far, at most [`MAX_INFORMATION`] bytes
    data_set: Vec<u8>,
    /// why it will be answered with a failure without asking the service
    refusal: Option<Failure>,
}

/// One of our N-EVENT-REPORT-RQs awaiting its response.
struct PendingReport {
    message_id: u16,
    /// when it counts as not delivered
    deadline: tokio::time::Instant,
    delivery: Option<oneshot::Sender<ReportDelivery>>,
}

impl PendingReport {
    /// Tells the application how it went.
    fn resolve(mut self, outcome: ReportDelivery) {
        if let Some(tx) = self.delivery.take() {
            let _ = tx.send(outcome);
        }
    }
}

impl Drop for PendingReport {
    /// A report dropped unresolved (a path that forgot it) was not
    /// delivered: the application must never wait for ever.
    fn drop(&mut self) {
        if let Some(tx) = self.delivery.take() {
            let _ = tx.send(ReportDelivery::NotDelivered {
                reason: "the association ended without an answer".into(),
            });
        }
    }
}

/// Resolves at `deadline`, or never without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How one sub-operation went.
#[derive(Debug)]
struct SubOperationDone {
    /// the receiver's status, or the failure's for an object not sent
    status: u16,
    comment: Option<String>,
    /// data set bytes sent
    bytes: u64,
    result: SubOperationResult,
    /// whether the receiver answered (the status is its own)
    sent: bool,
}

impl SubOperationDone {
    /// An object that failed without being (wholly) sent.
    fn not_sent(failure: Failure) -> Self {
        SubOperationDone {
            status: failure.status,
            comment: Some(failure.comment),
            bytes: 0,
            result: SubOperationResult::Failed,
            sent: false,
        }
    }

    /// An object the receiver answered with `status`.
    fn answered(status: u16, comment: Option<String>, bytes: u64) -> Self {
        SubOperationDone {
            status,
            comment,
            bytes,
            result: retrieve::classify(status),
            sent: true,
        }
    }
}

/// The destination of a C-MOVE: its association, or why there is none
/// (never established, or lost on the way).
struct MoveTarget {
    called_ae: AeTitle,
    association: Result<ScuAssociation<Box<dyn Transport>>, String>,
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
    /// the C-FIND, C-GET or C-MOVE whose identifier is arriving
    query: Option<QueryInFlight>,
    /// one whose identifier is complete, performed once the PDU that
    /// completed it has been read to its end
    query_ready: Option<QueryInFlight>,
    /// the Message ID a C-CANCEL-RQ named (in the PDU that completed an
    /// identifier, or while matches or objects are sent)
    cancel_seen: Option<u16>,
    /// the buffer C-GET sub-operations are sent from (allocated at the
    /// first C-GET, of the peer's PDU size, kept for the association)
    send_buf: Vec<u8>,
    /// the Message ID of our next request (C-GET sub-operations'
    /// C-STORE-RQs, N-EVENT-REPORT-RQs)
    next_message_id: u16,
    summary: AssociationSummary,
    /// the N-ACTION or N-EVENT-REPORT whose data set is arriving
    n_request: Option<NInFlight>,
    /// one whose data set is complete, performed once the PDU that
    /// completed it has been read to its end
    n_ready: Option<NInFlight>,
    /// our N-EVENT-REPORT-RQs awaiting their response (at most
    /// [`MAX_PENDING_REPORTS`]; no allocation until the first)
    reports: Vec<PendingReport>,
}

impl<W, Sv, Ob> Handler<'_, W, Sv, Ob>
where
    W: AsyncWrite + Unpin,
    Sv: Service,
    Ob: Observer<<Sv::Object as IncomingObject>::Receipt>,
{
    /// True between messages: nothing would be lost by stopping now.
    fn idle(&self) -> bool {
        self.in_flight.is_none()
            && self.command_context.is_none()
            && self.query.is_none()
            && self.n_request.is_none()
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
            let deadline = self.reports.iter().map(|r| r.deadline).min();
            let header = tokio::select! {
                biased;
                _ = &mut shutdown, if idle => return Err(AssociationError::Stopped),
                _ = until(deadline) => {
                    self.expire_reports();
                    continue;
                }
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
                } else if let Some(query) = self.query.as_mut() {
                    identifier_fragment(query, pdv.context_id, pdv.data)?;
                    if pdv.is_last {
                        self.query_ready = self.query.take();
                    }
                } else if let Some(n) = self.n_request.as_mut() {
                    information_fragment(n, pdv.context_id, pdv.data)?;
                    if pdv.is_last {
                        self.n_ready = self.n_request.take();
                    }
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
            if let Some(query) = self.query_ready.take() {
                match query.operation {
                    QueryOperation::Find => self.serve_find(reader, query).await?,
                    QueryOperation::Retrieve(operation) => {
                        self.serve_retrieve(reader, operation, query).await?
                    }
                }
            }
            if let Some(n) = self.n_ready.take() {
                match n.operation {
                    NOperation::Action => self.serve_action(n).await?,
                    NOperation::EventReport => self.serve_event_report(n).await?,
                }
            }
        }
    }

    /// Our next Message ID (never 0).
    fn take_message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }

    /// Sends a command and, when given, its data set, within the DIMSE
    /// timeout.
    async fn send_message(
        &mut self,
        context_id: u8,
        command: &[u8],
        data_set: Option<&[u8]>,
    ) -> Result<(), AssociationError> {
        let timeout = self.association.dimse_timeout;
        let send = async {
            pdu::write_pdata(&mut self.writer, context_id, true, true, command).await?;
            if let Some(data_set) = data_set {
                pdu::write_data_set(
                    &mut self.writer,
                    context_id,
                    data_set,
                    self.association.peer_max_pdu,
                )
                .await?;
            }
            self.writer.flush().await
        };
        match tokio::time::timeout(timeout, send).await {
            Err(_) => Err(AssociationError::Timeout(timeout.as_secs())),
            Ok(sent) => Ok(sent?),
        }
    }

    /// Answers an N-ACTION whose Action Information has arrived: the
    /// service's status as the N-ACTION-RSP, then its report, if any, as
    /// an N-EVENT-REPORT-RQ whose response is awaited while the
    /// association goes on.
    async fn serve_action(&mut self, n: NInFlight) -> Result<(), AssociationError> {
        let started = Instant::now();
        let answer = match (&n.refusal, &n.sop_instance, n.type_id) {
            (None, Some(sop_instance), Some(action_type_id)) => {
                let request = ActionRequest {
                    message_id: n.message_id,
                    sop_class: &n.sop_class,
                    sop_instance,
                    action_type_id,
                    transfer_syntax: &n.transfer_syntax,
                    data_set: &n.data_set,
                };
                self.service.n_action(self.association, &request).await
            }
            (refusal, _, _) => ActionAnswer::failed(refusal.clone().unwrap_or_else(|| {
                Failure::new(status::PROCESSING_FAILURE, "N-ACTION not understood")
            })),
        };
        let ActionAnswer { result, report } = answer;
        let (code, comment) = match &result {
            Ok(code) => (*code, None),
            Err(f) => (f.status, Some(f.comment.as_str())),
        };
        let rsp = command::n_action_rsp(
            n.message_id,
            &n.sop_class,
            n.sop_instance.as_ref(),
            n.type_id,
            code,
            comment,
        );
        if let Err(e) = self.send_message(n.context_id, &rsp, None).await {
            if let Some(report) = report {
                report.not_delivered(format!("the N-ACTION-RSP could not be sent: {e}"));
            }
            return Err(e);
        }
        self.summary.actions += 1;
        let report_sent = match report {
            None => false,
            Some(report) if result.is_err() => {
                report.not_delivered("the N-ACTION was answered with a failure");
                false
            }
            Some(report) => self.send_report(n.context_id, report).await?,
        };
        self.observer.actioned(
            self.association,
            &ActionOutcome {
                sop_class: &n.sop_class,
                action_type_id: n.type_id,
                transfer_syntax: &n.transfer_syntax,
                data_set: &n.data_set,
                status: code,
                comment,
                report_sent,
                elapsed: started.elapsed(),
            },
        );
        Ok(())
    }

    /// Sends an N-EVENT-REPORT-RQ on `context_id` and notes it as awaiting
    /// its response; false when too many await one already (then it is not
    /// delivered).
    async fn send_report(
        &mut self,
        context_id: u8,
        report: EventReport,
    ) -> Result<bool, AssociationError> {
        if self.reports.len() >= MAX_PENDING_REPORTS {
            report.not_delivered(format!(
                "{MAX_PENDING_REPORTS} event reports await an answer on this association"
            ));
            return Ok(false);
        }
        let message_id = self.take_message_id();
        let rq = command::n_event_report_rq(
            message_id,
            &report.sop_class,
            &report.sop_instance,
            report.event_type_id,
        );
        let EventReport {
            data_set, delivery, ..
        } = report;
        // Noted first: if sending fails, the association's end resolves it.
        self.reports.push(PendingReport {
            message_id,
            deadline: tokio::time::Instant::now() + self.association.dimse_timeout,
            delivery,
        });
        self.send_message(context_id, &rq, Some(&data_set)).await?;
        Ok(true)
    }

    /// Matches an N-EVENT-REPORT-RSP to the report it answers. One that
    /// answers none (it came after the report timed out) is ignored.
    fn report_answered(&mut self, cmd: &Command) -> Result<(), AssociationError> {
        let Some(at) = self
            .reports
            .iter()
            .position(|r| r.message_id == cmd.message_id)
        else {
            tracing::debug!(
                message_id = cmd.message_id,
                "N-EVENT-REPORT-RSP for no report awaiting one, ignored"
            );
            return Ok(());
        };
        let code = cmd.status.ok_or(ProtocolViolation::ResponseWithoutStatus)?;
        let comment = cmd.error_comment.as_ref().map(|c| c.as_str().to_string());
        self.reports.remove(at).resolve(ReportDelivery::Delivered {
            status: code,
            comment,
        });
        Ok(())
    }

    /// Reports whose response did not come within the DIMSE timeout were
    /// not delivered; the association goes on.
    fn expire_reports(&mut self) {
        let now = tokio::time::Instant::now();
        let secs = self.association.dimse_timeout.as_secs();
        while let Some(at) = self.reports.iter().position(|r| r.deadline <= now) {
            self.reports
                .remove(at)
                .resolve(ReportDelivery::NotDelivered {
                    reason: format!("no N-EVENT-REPORT-RSP within {secs} s"),
                });
        }
    }

    /// Answers an N-EVENT-REPORT from the peer whose Event Information has
    /// arrived, with the service's status.
    async fn serve_event_report(&mut self, n: NInFlight) -> Result<(), AssociationError> {
        let started = Instant::now();
        let result = match (&n.refusal, &n.sop_instance, n.type_id) {
            (None, Some(sop_instance), Some(event_type_id)) => {
                let request = EventReportRequest {
                    message_id: n.message_id,
                    sop_class: &n.sop_class,
                    sop_instance,
                    event_type_id,
                    transfer_syntax: &n.transfer_syntax,
                    data_set: &n.data_set,
                    peer_scp_role: n.peer_scp_role,
                };
                self.service
                    .n_event_report(self.association, &request)
                    .await
            }
            (refusal, _, _) => Err(refusal.clone().unwrap_or_else(|| {
                Failure::new(status::PROCESSING_FAILURE, "N-EVENT-REPORT not understood")
            })),
        };
        let (code, comment) = match &result {
            Ok(code) => (*code, None),
            Err(f) => (f.status, Some(f.comment.as_str())),
        };
        let rsp = command::n_event_report_rsp(
            n.message_id,
            &n.sop_class,
            n.sop_instance.as_ref(),
            n.type_id,
            code,
            comment,
        );
        self.send_message(n.context_id, &rsp, None).await?;
        self.summary.event_reports += 1;
        self.observer.event_reported(
            self.association,
            &EventReportOutcome {
                sop_class: &n.sop_class,
                event_type_id: n.type_id,
                transfer_syntax: &n.transfer_syntax,
                data_set: &n.data_set,
                status: code,
                comment,
                elapsed: started.elapsed(),
            },
        );
        Ok(())
    }

    /// Adds a command fragment; on the last one, decodes and performs the
    /// command.
    async fn command_fragment(
        &mut self,
        context: &AcceptedContext,
        data: &[u8],
        is_last: bool,
    ) -> Result<(), AssociationError> {
        if self.in_flight.is_some() || self.query.is_some() || self.n_request.is_some() {
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
        if self.n_ready.is_some()
            && !matches!(
                cmd.command_field,
                field::N_EVENT_REPORT_RSP | field::C_CANCEL_RQ
            )
        {
            // A request before the N-ACTION or N-EVENT-REPORT completed in
            // this PDU is answered: no asynchronous operations.
            return Err(ProtocolViolation::RequestBeforeResponse(cmd.command_field).into());
        }
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
            field::C_FIND_RQ => {
                if !cmd.has_data_set {
                    return Err(ProtocolViolation::FindWithoutIdentifier.into());
                }
                if self.query_ready.is_some() {
                    return Err(ProtocolViolation::CommandDuringFind(cmd.command_field).into());
                }
                self.query = Some(begin_query(QueryOperation::Find, context, &cmd));
            }
            field::C_GET_RQ | field::C_MOVE_RQ => {
                if !cmd.has_data_set {
                    return Err(ProtocolViolation::RetrieveWithoutIdentifier.into());
                }
                if self.query_ready.is_some() {
                    return Err(ProtocolViolation::CommandDuringRetrieve(cmd.command_field).into());
                }
                let operation = if cmd.command_field == field::C_GET_RQ {
                    RetrieveOperation::Get
                } else {
                    RetrieveOperation::Move
                };
                self.query = Some(begin_query(
                    QueryOperation::Retrieve(operation),
                    context,
                    &cmd,
                ));
            }
            field::C_CANCEL_RQ => {
                // A cancel of a request whose identifier just arrived in
                // the same PDU; any other is of an operation already
                // answered, and is ignored (PS3.7 9.3.2.3).
                if self.query_ready.is_some() {
                    self.cancel_seen = Some(cmd.message_id);
                }
            }
            field::N_ACTION_RQ | field::N_EVENT_REPORT_RQ => {
                if self.query_ready.is_some() {
                    return Err(ProtocolViolation::RequestBeforeResponse(cmd.command_field).into());
                }
                let operation = if cmd.command_field == field::N_ACTION_RQ {
                    NOperation::Action
                } else {
                    NOperation::EventReport
                };
                let n = begin_n(operation, context, &cmd);
                if cmd.has_data_set {
                    self.n_request = Some(n);
                } else {
                    self.n_ready = Some(n);
                }
            }
            field::N_EVENT_REPORT_RSP => self.report_answered(&cmd)?,
            other => return Err(ProtocolViolation::UnsupportedCommand(other).into()),
        }
        Ok(())
    }

    /// Answers a C-FIND whose identifier has arrived: the service's matches
    /// as pending responses, then the final one. The next PDU is read at
    /// the same time as the next match is awaited, so that a C-CANCEL-RQ
    /// stops the answer before the next pending response.
    async fn serve_find<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PduReader<R>,
        find: QueryInFlight,
    ) -> Result<(), AssociationError> {
        let started = Instant::now();
        let timeout = self.association.dimse_timeout;
        let mut matches: u64 = 0;
        let cancelled_early = self.cancel_seen.take() == Some(find.message_id);
        let request = FindRequest {
            message_id: find.message_id,
            sop_class: &find.sop_class,
            priority: find.priority,
            transfer_syntax: &find.transfer_syntax,
            identifier: &find.identifier,
        };
        let end: Result<(), Failure> = if let Some(refusal) = find.refusal.clone() {
            Err(refusal)
        } else if cancelled_early {
            Err(Failure::new(status::CANCEL, "cancelled"))
        } else {
            match self.service.find(self.association, &request) {
                Err(failure) => Err(failure),
                Ok(mut rx) => loop {
                    let next = tokio::select! {
                        biased;
                        header = reader.read_header() => {
                            if self.during_find(reader, header?, find.message_id).await? {
                                break Err(Failure::new(status::CANCEL, "cancelled"));
                            }
                            continue;
                        }
                        next = rx.recv() => next,
                    };
                    match next {
                        None => break Ok(()),
                        Some(Err(failure)) => break Err(failure),
                        Some(Ok(identifier)) => {
                            let rsp = command::find_rsp(
                                find.message_id,
                                &find.sop_class,
                                status::PENDING,
                                true,
                                None,
                            );
                            let send = async {
                                pdu::write_pdata(
                                    &mut self.writer,
                                    find.context_id,
                                    true,
                                    true,
                                    &rsp,
                                )
                                .await?;
                                pdu::write_data_set(
                                    &mut self.writer,
                                    find.context_id,
                                    &identifier,
                                    self.association.peer_max_pdu,
                                )
                                .await?;
                                self.writer.flush().await
                            };
                            match tokio::time::timeout(timeout, send).await {
                                Err(_) => return Err(AssociationError::Timeout(timeout.as_secs())),
                                Ok(sent) => sent?,
                            }
                            matches += 1;
                        }
                    }
                },
            }
        };
        // Dropping the receiver (with `end` decided) stops the producer.
        let (code, comment) = match &end {
            Ok(()) => (status::SUCCESS, None),
            Err(f) if f.status == status::CANCEL => (status::CANCEL, None),
            Err(f) => (f.status, Some(f.comment.as_str())),
        };
        let rsp = command::find_rsp(find.message_id, &find.sop_class, code, false, comment);
        match tokio::time::timeout(timeout, async {
            pdu::write_pdata(&mut self.writer, find.context_id, true, true, &rsp).await?;
            self.writer.flush().await
        })
        .await
        {
            Err(_) => return Err(AssociationError::Timeout(timeout.as_secs())),
            Ok(sent) => sent?,
        }
        self.summary.finds += 1;
        self.observer.found(
            self.association,
            &FindOutcome {
                sop_class: &find.sop_class,
                transfer_syntax: &find.transfer_syntax,
                identifier: &find.identifier,
                matches,
                status: code,
                comment,
                elapsed: started.elapsed(),
            },
        );
        Ok(())
    }

    /// Performs a C-GET or C-MOVE whose identifier has arrived: asks the
    /// service for the objects, performs each as a C-STORE sub-operation
    /// (a pending response after each but the last), and sends the final
    /// response. The next PDU of this association is read while the next
    /// object is awaited and while each is stored, so that a C-CANCEL-RQ
    /// stops the retrieve after the sub-operation in progress.
    async fn serve_retrieve<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PduReader<R>,
        operation: RetrieveOperation,
        query: QueryInFlight,
    ) -> Result<(), AssociationError> {
        let started = Instant::now();
        let cancelled_early = self.cancel_seen.take() == Some(query.message_id);
        let move_destination = query
            .move_destination
            .as_ref()
            .filter(|_| operation == RetrieveOperation::Move);
        let request = RetrieveRequest {
            operation,
            message_id: query.message_id,
            sop_class: &query.sop_class,
            priority: query.priority,
            transfer_syntax: &query.transfer_syntax,
            identifier: &query.identifier,
            move_destination,
        };
        let begun = if let Some(refusal) = query.refusal.clone() {
            Err(refusal)
        } else if cancelled_early {
            Err(Failure::new(status::CANCEL, "cancelled"))
        } else {
            match operation {
                RetrieveOperation::Get => self
                    .service
                    .get(self.association, &request)
                    .await
                    .map(|retrieval| (retrieval, None)),
                RetrieveOperation::Move => self
                    .service
                    .move_(self.association, &request)
                    .await
                    .map(|moved| (moved.retrieval, Some(moved.destination))),
            }
        };
        let (retrieval, destination) = match begun {
            Ok(begun) => begun,
            Err(failure) => {
                // Answered at once: a refusal (no counts), or a cancel that
                // came with the identifier (nothing done, nothing left).
                let (code, comment, counts) = if failure.status == status::CANCEL {
                    let zero = Some(0);
                    let counts = command::SubOperations {
                        remaining: zero,
                        completed: zero,
                        failed: zero,
                        warning: zero,
                    };
                    (status::CANCEL, None, counts)
                } else {
                    let comment = Some(failure.comment.as_str());
                    (failure.status, comment, command::SubOperations::default())
                };
                self.send_retrieve_rsp(operation, &query, code, &counts, None, comment)
                    .await?;
                self.summary.retrieves += 1;
                self.observer.retrieved(
                    self.association,
                    &RetrieveOutcome {
                        operation,
                        sop_class: &query.sop_class,
                        transfer_syntax: &query.transfer_syntax,
                        identifier: &query.identifier,
                        destination: move_destination,
                        counts: SubOperationCounts::default(),
                        status: code,
                        comment,
                        first_failure: None,
                        elapsed: started.elapsed(),
                    },
                );
                return Ok(());
            }
        };
        let mut tally = Tally::new(retrieval.sub_operations);
        let mut objects = retrieval.objects;
        let mut target = match destination {
            None => None,
            Some(destination) => Some(
                self.open_destination(destination, &retrieval.presentations)
                    .await,
            ),
        };
        let run = self
            .sub_operations(
                reader,
                operation,
                &query,
                &mut objects,
                &mut target,
                &mut tally,
            )
            .await;
        // Dropping the receiver stops the producer.
        drop(objects);
        if let Some(MoveTarget {
            association: Ok(scu),
            called_ae,
        }) = target
        {
            if run.is_ok() {
                if let Err(e) = scu.release().await {
                    tracing::debug!(destination = %called_ae, error = %e, "C-MOVE association release failed");
                }
            } else {
                scu.abort().await;
            }
        }
        let cancelled = run?;
        let end = tally.finish(cancelled);
        let identifier = end
            .with_identifier
            .then(|| tally.identifier(&query.transfer_syntax));
        self.send_retrieve_rsp(
            operation,
            &query,
            end.status,
            &end.counts,
            identifier.as_deref(),
            end.comment.as_deref(),
        )
        .await?;
        self.summary.retrieves += 1;
        self.observer.retrieved(
            self.association,
            &RetrieveOutcome {
                operation,
                sop_class: &query.sop_class,
                transfer_syntax: &query.transfer_syntax,
                identifier: &query.identifier,
                destination: move_destination,
                counts: tally.counts(),
                status: end.status,
                comment: end.comment.as_deref(),
                first_failure: tally.first_failure(),
                elapsed: started.elapsed(),
            },
        );
        Ok(())
    }

    /// Requests the one association of a C-MOVE on the connection the
    /// service made: a context per distinct (SOP class, transfer syntax)
    /// pair of the objects, at most 128. A failure is kept as the reason
    /// each object then fails.
    async fn open_destination(
        &self,
        destination: MoveDestination,
        presentations: &[(Uid, Uid)],
    ) -> MoveTarget {
        let mut proposals: Vec<(String, String)> = Vec::new();
        for (class, ts) in presentations {
            let pair = (class.to_string(), ts.to_string());
            if proposals.len() < 128 && !proposals.contains(&pair) {
                proposals.push(pair);
            }
        }
        let called_ae = destination.called_ae;
        let association = if proposals.is_empty() {
            Err(format!("nothing to propose to {called_ae}"))
        } else {
            let options = ScuOptions {
                calling_ae: destination.calling_ae.to_string(),
                called_ae: called_ae.to_string(),
                timeout: self.association.dimse_timeout,
            };
            ScuAssociation::request(destination.transport, &options, &proposals)
                .await
                .map_err(|e| format!("no association with {called_ae}: {e}"))
        };
        MoveTarget {
            called_ae,
            association,
        }
    }

    /// The sub-operations of a retrieve, until the objects end (`false`)
    /// or a C-CANCEL-RQ arrives (`true`).
    async fn sub_operations<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PduReader<R>,
        operation: RetrieveOperation,
        query: &QueryInFlight,
        objects: &mut Outgoings,
        target: &mut Option<MoveTarget>,
        tally: &mut Tally,
    ) -> Result<bool, AssociationError> {
        let destination = target.as_ref().map(|t| t.called_ae.clone());
        loop {
            let next = tokio::select! {
                biased;
                header = reader.read_header() => {
                    let events = self.during_retrieve(reader, header?, query.message_id, None).await?;
                    if events.cancelled {
                        return Ok(true);
                    }
                    continue;
                }
                next = objects.recv() => next,
            };
            let Some(next) = next else {
                return Ok(false);
            };
            let began = Instant::now();
            let mut cancelled = false;
            let (object, done) = match next {
                Err(failed) => {
                    let done = SubOperationDone::not_sent(failed.failure);
                    (Err(failed.sop_instance), done)
                }
                Ok(mut object) => {
                    let done = match target {
                        None => {
                            self.get_sub_operation(reader, query, &mut object, &mut cancelled)
                                .await?
                        }
                        Some(target) => {
                            self.move_sub_operation(
                                reader,
                                query,
                                target,
                                &mut object,
                                &mut cancelled,
                            )
                            .await?
                        }
                    };
                    (Ok(object), done)
                }
            };
            let (sop_class, sop_instance) = match &object {
                Ok(object) => (Some(&object.sop_class), Some(&object.sop_instance)),
                Err(instance) => (None, instance.as_ref()),
            };
            let reason = match (&done.comment, done.sent) {
                (Some(comment), false) => comment.clone(),
                (Some(comment), true) => format!("{:04X} {comment}", done.status),
                (None, _) => format!("{:04X}", done.status),
            };
            tally.record(done.result, sop_instance, Some(&reason));
            if done.result != SubOperationResult::Failed {
                self.summary.sent += 1;
                self.summary.sent_bytes += done.bytes;
            }
            self.observer.sub_operation(
                self.association,
                &SubOperationOutcome {
                    operation,
                    destination: destination.as_ref(),
                    sop_class,
                    sop_instance,
                    bytes: done.bytes,
                    status: done.status,
                    comment: done.comment.as_deref(),
                    result: done.result,
                    elapsed: began.elapsed(),
                },
            );
            if cancelled {
                return Ok(true);
            }
            if tally.remaining() > 0 {
                self.send_retrieve_rsp(
                    operation,
                    query,
                    status::PENDING,
                    &tally.pending(),
                    None,
                    None,
                )
                .await?;
            }
        }
    }

    /// One C-GET sub-operation: the object as a C-STORE-RQ on this
    /// association, on a storage context of its (SOP class, transfer
    /// syntax) whose SCP role the peer took, then the peer's C-STORE-RSP
    /// (within the DIMSE timeout; a C-CANCEL-RQ around it is noted).
    async fn get_sub_operation<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PduReader<R>,
        query: &QueryInFlight,
        object: &mut Outgoing,
        cancelled: &mut bool,
    ) -> Result<SubOperationDone, AssociationError> {
        let context = self.contexts.iter().find(|c| {
            c.service == ServiceClass::Storage
                && c.peer_scp_role
                && c.abstract_syntax == object.sop_class
                && c.transfer_syntax == object.transfer_syntax
        });
        let Some(context) = context else {
            return Ok(SubOperationDone::not_sent(Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                format!(
                    "no presentation context with the SCP role for {} in {}",
                    object.sop_class, object.transfer_syntax
                ),
            )));
        };
        let context_id = context.id;
        let message_id = self.take_message_id();
        let rq = command::store_rq_with(
            message_id,
            &object.sop_class,
            &object.sop_instance,
            query.priority,
            None,
        );
        let timeout = self.association.dimse_timeout;
        let sent = pdu::send_streamed(
            &mut self.writer,
            &mut self.send_buf,
            context_id,
            &rq,
            &mut object.data,
            object.length,
            pdu::send_body_len(self.association.peer_max_pdu),
            timeout,
        )
        .await;
        match sent {
            Ok(()) => {}
            Err(StreamError::Unread(e)) => {
                return Ok(SubOperationDone::not_sent(Failure::new(
                    status::UNABLE_TO_PERFORM_SUB_OPERATIONS,
                    format!("reading the data set: {e}"),
                )))
            }
            Err(StreamError::Read(source)) => {
                return Err(AssociationError::SubOperationData {
                    sop_instance: object.sop_instance.clone(),
                    source,
                })
            }
            Err(StreamError::Write(e)) => return Err(e.into()),
            Err(StreamError::Timeout) => return Err(AssociationError::Timeout(timeout.as_secs())),
        }
        loop {
            let header = match tokio::time::timeout(timeout, reader.read_header()).await {
                Err(_) => return Err(AssociationError::Timeout(timeout.as_secs())),
                Ok(header) => header?,
            };
            let events = self
                .during_retrieve(reader, header, query.message_id, Some(message_id))
                .await?;
            *cancelled |= events.cancelled;
            if let Some((code, comment)) = events.store_rsp {
                return Ok(SubOperationDone::answered(code, comment, object.length));
            }
        }
    }

    /// One C-MOVE sub-operation: the object as a C-STORE-RQ (with the Move
    /// Originator fields) on the destination association, while this
    /// association is read for a C-CANCEL-RQ. A destination association
    /// that fails is aborted, and the objects after it fail unsent.
    async fn move_sub_operation<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PduReader<R>,
        query: &QueryInFlight,
        target: &mut MoveTarget,
        object: &mut Outgoing,
        cancelled: &mut bool,
    ) -> Result<SubOperationDone, AssociationError> {
        let scu = match &mut target.association {
            Ok(scu) => scu,
            Err(why) => {
                return Ok(SubOperationDone::not_sent(Failure::new(
                    status::UNABLE_TO_PERFORM_SUB_OPERATIONS,
                    why.clone(),
                )))
            }
        };
        let Some(context_id) =
            scu.context_for(object.sop_class.as_str(), object.transfer_syntax.as_str())
        else {
            return Ok(SubOperationDone::not_sent(Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                format!(
                    "{} accepted no presentation context for {} in {}",
                    target.called_ae, object.sop_class, object.transfer_syntax
                ),
            )));
        };
        let originator = AeTitle::new(&self.association.calling_ae)
            .ok()
            .map(|ae_title| MoveOriginator {
                ae_title,
                message_id: query.message_id,
            });
        let stored = {
            let store = scu.store_streamed(
                context_id,
                &object.sop_class,
                &object.sop_instance,
                query.priority,
                originator.as_ref(),
                &mut object.data,
                object.length,
            );
            tokio::pin!(store);
            loop {
                tokio::select! {
                    biased;
                    stored = &mut store => break stored,
                    header = reader.read_header() => {
                        let events = self
                            .during_retrieve(reader, header?, query.message_id, None)
                            .await?;
                        *cancelled |= events.cancelled;
                    }
                }
            }
        };
        match stored {
            Ok((code, comment)) => Ok(SubOperationDone::answered(code, comment, object.length)),
            Err(ScuError::DataSet {
                sent: false,
                source,
            }) => Ok(SubOperationDone::not_sent(Failure::new(
                status::UNABLE_TO_PERFORM_SUB_OPERATIONS,
                format!("reading the data set: {source}"),
            ))),
            Err(e) => {
                let why = format!("association with {} lost: {e}", target.called_ae);
                if let Ok(scu) = std::mem::replace(&mut target.association, Err(why.clone())) {
                    scu.abort().await;
                }
                Ok(SubOperationDone::not_sent(Failure::new(
                    status::UNABLE_TO_PERFORM_SUB_OPERATIONS,
                    why,
                )))
            }
        }
    }

    /// Sends a C-GET-RSP or C-MOVE-RSP, with the identifier when given.
    async fn send_retrieve_rsp(
        &mut self,
        operation: RetrieveOperation,
        query: &QueryInFlight,
        code: u16,
        counts: &command::SubOperations,
        identifier: Option<&[u8]>,
        comment: Option<&str>,
    ) -> Result<(), AssociationError> {
        let encode = match operation {
            RetrieveOperation::Get => command::get_rsp,
            RetrieveOperation::Move => command::move_rsp,
        };
        let rsp = encode(
            query.message_id,
            &query.sop_class,
            code,
            counts,
            identifier.is_some(),
            comment,
        );
        let timeout = self.association.dimse_timeout;
        let send = async {
            pdu::write_pdata(&mut self.writer, query.context_id, true, true, &rsp).await?;
            if let Some(identifier) = identifier {
                pdu::write_data_set(
                    &mut self.writer,
                    query.context_id,
                    identifier,
                    self.association.peer_max_pdu,
                )
                .await?;
            }
            self.writer.flush().await
        };
        match tokio::time::timeout(timeout, send).await {
            Err(_) => Err(AssociationError::Timeout(timeout.as_secs())),
            Ok(sent) => Ok(sent?),
        }
    }

    /// Acts on a PDU that arrived while a C-GET or C-MOVE is performed:
    /// command fragments only, each command a C-CANCEL-RQ (of this
    /// retrieve: noted) or, when one is `expecting`, the C-STORE-RSP to our
    /// C-STORE-RQ of that Message ID; an A-ABORT ends the association;
    /// anything else breaks the protocol.
    async fn during_retrieve<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PduReader<R>,
        header: Option<pdu::PduHeader>,
        message_id: u16,
        expecting: Option<u16>,
    ) -> Result<RetrieveEvents, AssociationError> {
        let timeout = self.association.dimse_timeout;
        let Some(header) = header else {
            return Err(FramingError::Io(std::io::ErrorKind::UnexpectedEof.into()).into());
        };
        match header.pdu_type {
            PduType::PData => {}
            PduType::Abort => return Err(AssociationError::PeerAborted),
            PduType::ReleaseRq => return Err(ProtocolViolation::ReleaseDuringMessage.into()),
            other => return Err(ProtocolViolation::UnexpectedPdu(other).into()),
        }
        let body = match tokio::time::timeout(timeout, reader.read_body(header)).await {
            Err(_) => return Err(AssociationError::Timeout(timeout.as_secs())),
            Ok(body) => body?,
        };
        if body.is_empty() {
            return Err(ProtocolViolation::EmptyPData.into());
        }
        let mut events = RetrieveEvents::default();
        for item in pdu::pdvs(body) {
            let pdv = item?;
            if find_context(self.contexts, pdv.context_id).is_none() {
                return Err(ProtocolViolation::UnknownContext(pdv.context_id).into());
            }
            if !pdv.is_command {
                return Err(ProtocolViolation::DataWithoutCommand.into());
            }
            match self.command_context {
                Some(id) if id != pdv.context_id => {
                    return Err(ProtocolViolation::CommandContextSwitch.into())
                }
                _ => self.command_context = Some(pdv.context_id),
            }
            if self.command.len() + pdv.data.len() > MAX_COMMAND {
                return Err(ProtocolViolation::CommandTooLong(MAX_COMMAND).into());
            }
            self.command.extend_from_slice(pdv.data);
            if !pdv.is_last {
                continue;
            }
            self.command_context = None;
            let decoded = Command::decode(&self.command);
            self.command.clear();
            let cmd = decoded.map_err(ProtocolViolation::BadCommand)?;
            match (cmd.command_field, expecting) {
                // A cancel naming another (finished) request is ignored.
                (field::C_CANCEL_RQ, _) => events.cancelled |= cmd.message_id == message_id,
                (field::C_STORE_RSP, Some(expected)) if events.store_rsp.is_none() => {
                    if cmd.message_id != expected {
                        return Err(ProtocolViolation::WrongResponse {
                            expected,
                            got: cmd.message_id,
                        }
                        .into());
                    }
                    let code = cmd.status.ok_or(ProtocolViolation::ResponseWithoutStatus)?;
                    let comment = cmd.error_comment.map(|c| c.as_str().to_string());
                    events.store_rsp = Some((code, comment));
                }
                (field::N_EVENT_REPORT_RSP, _) => self.report_answered(&cmd)?,
                (other, _) => return Err(ProtocolViolation::CommandDuringRetrieve(other).into()),
            }
        }
        Ok(events)
    }

    /// Acts on a PDU that arrived while a C-FIND is answered: only a
    /// C-CANCEL-RQ (of this C-FIND: true) or A-ABORT may come; anything else
    /// breaks the protocol.
    async fn during_find<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PduReader<R>,
        header: Option<pdu::PduHeader>,
        message_id: u16,
    ) -> Result<bool, AssociationError> {
        let timeout = self.association.dimse_timeout;
        let Some(header) = header else {
            return Err(FramingError::Io(std::io::ErrorKind::UnexpectedEof.into()).into());
        };
        match header.pdu_type {
            PduType::PData => {}
            PduType::Abort => return Err(AssociationError::PeerAborted),
            PduType::ReleaseRq => return Err(ProtocolViolation::ReleaseDuringMessage.into()),
            other => return Err(ProtocolViolation::UnexpectedPdu(other).into()),
        }
        let body = match tokio::time::timeout(timeout, reader.read_body(header)).await {
            Err(_) => return Err(AssociationError::Timeout(timeout.as_secs())),
            Ok(body) => body?,
        };
        if body.is_empty() {
            return Err(ProtocolViolation::EmptyPData.into());
        }
        let mut cancelled = false;
        for item in pdu::pdvs(body) {
            let pdv = item?;
            if find_context(self.contexts, pdv.context_id).is_none() {
                return Err(ProtocolViolation::UnknownContext(pdv.context_id).into());
            }
            if !pdv.is_command {
                return Err(ProtocolViolation::DataWithoutCommand.into());
            }
            if self.command.len() + pdv.data.len() > MAX_COMMAND {
                return Err(ProtocolViolation::CommandTooLong(MAX_COMMAND).into());
            }
            self.command.extend_from_slice(pdv.data);
            if !pdv.is_last {
                continue;
            }
            let decoded = Command::decode(&self.command);
            self.command.clear();
            let cmd = decoded.map_err(ProtocolViolation::BadCommand)?;
            if cmd.command_field == field::N_EVENT_REPORT_RSP {
                // The answer to a report sent before this C-FIND.
                self.report_answered(&cmd)?;
                continue;
            }
            if cmd.command_field != field::C_CANCEL_RQ {
                return Err(ProtocolViolation::CommandDuringFind(cmd.command_field).into());
            }
            // A cancel naming another (finished) request is ignored.
            cancelled |= cmd.message_id == message_id;
        }
        Ok(cancelled)
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
        } else if !context.peer_may_store {
            Sink::Discard(Failure::new(
                status::NOT_AUTHORIZED,
                "this calling AE title may not store here",
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
            let move_originator = cmd.move_originator();
            let request = StoreRequest {
                message_id: cmd.message_id,
                sop_class: &sop_class,
                sop_instance: &sop_instance,
                transfer_syntax: &context.transfer_syntax,
                move_originator: move_originator.as_ref(),
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

/// Begins a C-FIND-RQ, C-GET-RQ or C-MOVE-RQ: its identifier is
/// collected, to be answered by the service, or with a failure when the
/// context was not accepted for the operation, the SOP class is not the
/// context's, or a C-MOVE names no valid Move Destination.
fn begin_query(
    operation: QueryOperation,
    context: &AcceptedContext,
    cmd: &Command,
) -> QueryInFlight {
    let sop_class = cmd.sop_class.clone().unwrap_or_default();
    let (service, name) = match operation {
        QueryOperation::Find => (ServiceClass::Find, "C-FIND"),
        QueryOperation::Retrieve(RetrieveOperation::Get) => (ServiceClass::Get, "C-GET"),
        QueryOperation::Retrieve(RetrieveOperation::Move) => (ServiceClass::Move, "C-MOVE"),
    };
    let refusal = if context.service != service {
        Some(Failure::new(
            status::SOP_CLASS_NOT_SUPPORTED,
            format!("{name} on a presentation context not accepted for {name}"),
        ))
    } else if cmd.sop_class.as_ref() != Some(&context.abstract_syntax) {
        Some(Failure::new(
            status::IDENTIFIER_MISMATCH,
            "SOP class differs from the presentation context",
        ))
    } else if service == ServiceClass::Move && cmd.move_destination.is_none() {
        Some(Failure::new(
            status::MOVE_DESTINATION_UNKNOWN,
            "Move Destination missing or not a valid AE title",
        ))
    } else {
        None
    };
    QueryInFlight {
        operation,
        move_destination: cmd.move_destination.clone(),
        context_id: context.id,
        message_id: cmd.message_id,
        sop_class,
        transfer_syntax: context.transfer_syntax.clone(),
        priority: cmd.priority,
        identifier: Vec::new(),
        refusal,
    }
}

/// Adds one identifier fragment; past [`MAX_IDENTIFIER`] the identifier is
/// dropped (the rest is read and discarded) and the request will fail
/// (A700 for C-FIND, A701 for C-GET and C-MOVE).
fn identifier_fragment(
    find: &mut QueryInFlight,
    context_id: u8,
    data: &[u8],
) -> Result<(), AssociationError> {
    if find.context_id != context_id {
        return Err(ProtocolViolation::DataContextSwitch.into());
    }
    if find.refusal.is_some() {
        return Ok(());
    }
    if find.identifier.len() + data.len() > MAX_IDENTIFIER {
        find.identifier = Vec::new();
        let code = match find.operation {
            QueryOperation::Find => status::OUT_OF_RESOURCES,
            QueryOperation::Retrieve(_) => status::UNABLE_TO_CALCULATE_MATCHES,
        };
        find.refusal = Some(Failure::new(
            code,
            format!("identifier longer than {} KiB", MAX_IDENTIFIER / 1024),
        ));
        return Ok(());
    }
    find.identifier.extend_from_slice(data);
    Ok(())
}

/// Begins an N-ACTION-RQ or N-EVENT-REPORT-RQ: its data set is collected,
/// to be answered by the service, or with a failure when the context is not
/// Storage Commitment's, or the request names another SOP class, another
/// instance than the well-known one, or an action or event type that
/// Storage Commitment does not have.
fn begin_n(operation: NOperation, context: &AcceptedContext, cmd: &Command) -> NInFlight {
    let (sop_class, sop_instance, type_id, name) = match operation {
        NOperation::Action => (
            cmd.requested_sop_class.clone(),
            cmd.requested_sop_instance.clone(),
            cmd.action_type_id,
            "N-ACTION",
        ),
        NOperation::EventReport => (
            cmd.sop_class.clone(),
            cmd.sop_instance.clone(),
            cmd.event_type_id,
            "N-EVENT-REPORT",
        ),
    };
    let known_type = match operation {
        NOperation::Action => type_id == Some(crate::commitment::ACTION_REQUEST_COMMITMENT),
        NOperation::EventReport => matches!(
            type_id,
            Some(crate::commitment::EVENT_SUCCESSFUL | crate::commitment::EVENT_FAILURES_EXIST)
        ),
    };
    let refusal = if context.service != ServiceClass::Commitment {
        Some(Failure::new(
            status::SOP_CLASS_NOT_SUPPORTED,
            format!("{name} on a presentation context not accepted for Storage Commitment"),
        ))
    } else if sop_class.as_ref() != Some(&context.abstract_syntax) {
        Some(Failure::new(
            status::NO_SUCH_SOP_CLASS,
            "SOP class differs from the presentation context",
        ))
    } else if sop_instance.is_none() {
        Some(Failure::new(
            status::INVALID_OBJECT_INSTANCE,
            "SOP Instance UID missing or not a valid UID",
        ))
    } else if sop_instance.as_ref().map(Uid::as_str)
        != Some(uid::STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
    {
        Some(Failure::new(
            status::NO_SUCH_SOP_INSTANCE,
            "not the Storage Commitment Push Model SOP Instance",
        ))
    } else if !known_type {
        Some(match operation {
            NOperation::Action => Failure::new(
                status::NO_SUCH_ACTION,
                "Action Type ID missing or not 1 (Request Storage Commitment)",
            ),
            NOperation::EventReport => Failure::new(
                status::NO_SUCH_EVENT_TYPE,
                "Event Type ID missing or not 1 or 2",
            ),
        })
    } else {
        None
    };
    NInFlight {
        operation,
        context_id: context.id,
        message_id: cmd.message_id,
        sop_class: sop_class.unwrap_or_else(|| context.abstract_syntax.clone()),
        sop_instance,
        type_id,
        transfer_syntax: context.transfer_syntax.clone(),
        peer_scp_role: context.peer_scp_role,
        data_set: Vec::new(),
        refusal,
    }
}

/// Adds one Action or Event Information fragment; past [`MAX_INFORMATION`]
/// the data set is dropped (the rest is read and discarded) and the
/// request will fail with 0213.
fn information_fragment(
    n: &mut NInFlight,
    context_id: u8,
    data: &[u8],
) -> Result<(), AssociationError> {
    if n.context_id != context_id {
        return Err(ProtocolViolation::DataContextSwitch.into());
    }
    if n.refusal.is_some() {
        return Ok(());
    }
    if n.data_set.len() + data.len() > MAX_INFORMATION {
        n.data_set = Vec::new();
        n.refusal = Some(Failure::new(
            status::RESOURCE_LIMITATION,
            format!("data set longer than {} KiB", MAX_INFORMATION / 1024),
        ));
        return Ok(());
    }
    n.data_set.extend_from_slice(data);
    Ok(())
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
