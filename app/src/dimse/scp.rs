//! The storage SCP side of one association: from the A-ASSOCIATE-RQ to
//! release or abort, with C-ECHO and streaming C-STORE.
//!
//! Per association there is one PDU buffer (the negotiated max PDU), one
//! small command buffer, and at most one object in flight. Data set PDVs go
//! from the PDU buffer straight into the object's temp file; the next PDU is
//! not read until the current one is written, so a slow disk slows the
//! sender down instead of filling memory.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_ul::pdu::{AssociationRQ, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::command::{self, field, status, Command};
use super::negotiation::{find_context, ContextTable};
use super::pdu::{self, AbortReason, AbortSource, FramingError, PduReader, PduType};
use super::uid::Uid;
use crate::store::{Incoming, ObjectInfo, Store, StoreError};

/// The largest A-ASSOCIATE-RQ we read: 128 presentation contexts with a
/// dozen transfer syntaxes each fit with room to spare.
pub const MAX_ASSOCIATE_RQ: u32 = 128 * 1024;
/// The largest command set we assemble from fragments.
const MAX_COMMAND: usize = 16 * 1024;

/// Why an association ended other than by release.
#[derive(Debug, thiserror::Error)]
pub enum ScpError {
    /// The byte stream was not valid PDUs, or the connection failed.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// The peer sent a valid PDU at the wrong moment or with wrong contents.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The peer aborted.
    #[error("peer sent A-ABORT")]
    PeerAborted,
    /// The peer was silent for longer than the DIMSE timeout.
    #[error("no data for {0} s (DIMSE timeout)")]
    Timeout(u64),
    /// The service is shutting down.
    #[error("service shutting down")]
    Shutdown,
    /// The A-ASSOCIATE-RQ could not be decoded.
    #[error("undecodable A-ASSOCIATE-RQ: {0}")]
    BadAssociateRq(String),
}

impl From<std::io::Error> for ScpError {
    fn from(e: std::io::Error) -> Self {
        ScpError::Framing(FramingError::Io(e))
    }
}

impl ScpError {
    /// The A-ABORT to send for this error, if the peer should get one.
    fn abort_reason(&self) -> Option<AbortReason> {
        match self {
            ScpError::Framing(FramingError::Io(_)) | ScpError::PeerAborted => None,
            ScpError::Framing(FramingError::UnknownPduType(_)) => {
                Some(AbortReason::UnrecognizedPdu)
            }
            ScpError::Framing(FramingError::TlsOnPlainPort) => None,
            ScpError::Framing(_) | ScpError::BadAssociateRq(_) => {
                Some(AbortReason::InvalidPduParameter)
            }
            ScpError::Protocol(_) => Some(AbortReason::UnexpectedPdu),
            ScpError::Timeout(_) | ScpError::Shutdown => Some(AbortReason::NotSpecified),
        }
    }
}

/// Counters shared by all associations, for status reports.
#[derive(Debug, Default)]
pub struct Stats {
    /// associations open now
    pub active_associations: AtomicUsize,
    /// objects stored since start
    pub objects_stored: AtomicU64,
    /// objects refused or failed since start
    pub objects_failed: AtomicU64,
    /// data set bytes stored since start
    pub bytes_stored: AtomicU64,
    /// the last failure, for status reports
    pub last_error: std::sync::Mutex<String>,
}

impl Stats {
    /// One line for systemd's STATUS and the log bundle.
    pub fn summary(&self) -> String {
        let last = self
            .last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        format!(
            "{} association(s); {} object(s) stored, {} failed{}",
            self.active_associations.load(Ordering::Relaxed),
            self.objects_stored.load(Ordering::Relaxed),
            self.objects_failed.load(Ordering::Relaxed),
            if last.is_empty() {
                String::new()
            } else {
                format!("; last error: {last}")
            }
        )
    }
}

/// What every association of a server shares.
pub struct ScpShared {
    /// where objects go (shared by all listeners)
    pub store: Arc<Store>,
    /// counters (shared by all listeners)
    pub stats: Arc<Stats>,
    /// the audit trail, when its folder could be opened
    pub audit: Option<Arc<crate::logs::Audit>>,
    /// the activity LED, when the board has one
    pub led: Option<Arc<crate::service::ActivityLed>>,
}

/// Reads the first PDU of a connection, which must be an A-ASSOCIATE-RQ.
/// Reads exactly that PDU (nothing after it), into a buffer of its size.
pub async fn read_associate_rq<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<AssociationRQ, ScpError> {
    let (header, whole) = pdu::read_setup_pdu(stream, MAX_ASSOCIATE_RQ).await?;
    if header.pdu_type != PduType::AssociateRq {
        return Err(ScpError::Protocol(
            "expected A-ASSOCIATE-RQ as the first PDU",
        ));
    }
    match dicom_ul::pdu::read_pdu(&whole[..], MAX_ASSOCIATE_RQ, true) {
        Ok(Some(Pdu::AssociationRQ(rq))) => Ok(rq),
        Ok(_) => Err(ScpError::BadAssociateRq("not an A-ASSOCIATE-RQ".into())),
        Err(e) => Err(ScpError::BadAssociateRq(e.to_string())),
    }
}

/// Encodes a PDU with `dicom-ul` and sends it.
pub async fn send_pdu<W: AsyncWrite + Unpin>(stream: &mut W, pdu: &Pdu) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(512);
    dicom_ul::pdu::write_pdu(&mut bytes, pdu)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// Sends an A-ABORT and gives up on the connection.
pub async fn send_abort<W: AsyncWrite + Unpin>(stream: &mut W, reason: AbortReason) {
    let _ = stream
        .write_all(&pdu::abort_pdu(AbortSource::ServiceProvider, reason))
        .await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// Who is on the other end, for logs.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// the peer's address
    pub addr: SocketAddr,
    /// the calling AE title from the A-ASSOCIATE-RQ
    pub calling_ae: String,
}

/// The object being received and where its bytes go. (One per association,
/// never copied: the size difference between variants does not matter.)
#[allow(clippy::large_enum_variant)]
enum Sink<'s> {
    /// Streaming into the store.
    File(Incoming<'s>),
    /// Refused or failed: the rest of the data set is read and dropped, then
    /// this status is answered.
    Discard {
        status: u16,
        comment: String,
        bytes: u64,
    },
}

struct InFlight<'s> {
    context_id: u8,
    message_id: u16,
    sop_class: Uid,
    sop_instance: Uid,
    started: Instant,
    sink: Sink<'s>,
}

/// Summary of an association, for its log line.
#[derive(Debug, Default)]
pub struct AssociationSummary {
    /// objects stored
    pub stored: u64,
    /// objects answered with a failure status
    pub failed: u64,
    /// data set bytes stored
    pub bytes: u64,
}

/// What one association runs with, fixed when it is accepted (a
/// configuration applied later does not change it).
#[derive(Debug, Clone)]
pub struct AssociationSettings {
    /// our AE title, as called
    pub ae_title: String,
    /// silence allowed between PDUs
    pub dimse_timeout: Duration,
    /// the largest PDU body we receive
    pub max_pdu: u32,
}

/// Runs an accepted association until release, abort, error or shutdown.
/// The A-ASSOCIATE-AC has been sent already. Once `shutdown` is cancelled
/// the association is aborted as soon as it is idle: an object or command
/// in flight is finished (and answered) first.
pub async fn run_association<S>(
    stream: S,
    shared: &ScpShared,
    settings: &AssociationSettings,
    contexts: &ContextTable,
    peer: &PeerInfo,
    shutdown: CancellationToken,
    summary: &mut AssociationSummary,
) -> Result<(), ScpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (read_half, mut writer) = tokio::io::split(stream);
    let mut reader = PduReader::new(read_half, settings.max_pdu);
    let result = association_loop(
        &mut reader,
        &mut writer,
        shared,
        settings,
        contexts,
        peer,
        &shutdown,
        summary,
    )
    .await;
    if let Err(e) = &result {
        if let Some(reason) = e.abort_reason() {
            send_abort(&mut writer, reason).await;
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn association_loop<R, W>(
    reader: &mut PduReader<R>,
    writer: &mut W,
    shared: &ScpShared,
    settings: &AssociationSettings,
    contexts: &ContextTable,
    peer: &PeerInfo,
    shutdown: &CancellationToken,
    summary: &mut AssociationSummary,
) -> Result<(), ScpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let timeout = settings.dimse_timeout;
    let mut command_buf: Vec<u8> = Vec::with_capacity(1024);
    let mut command_context: Option<u8> = None;
    let mut in_flight: Option<InFlight<'_>> = None;

    loop {
        let idle = in_flight.is_none() && command_context.is_none();
        let header = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if idle => return Err(ScpError::Shutdown),
            read = tokio::time::timeout(timeout, reader.read_header()) => match read {
                Err(_) => return Err(ScpError::Timeout(timeout.as_secs())),
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
                    return Err(ScpError::Protocol(
                        "A-RELEASE-RQ with a message in progress",
                    ));
                }
                if let Some(audit) = shared
                    .audit
                    .as_ref()
                    .filter(|_| shared.store.options().fsync)
                {
                    tokio::task::block_in_place(|| audit.sync());
                }
                writer.write_all(&pdu::RELEASE_RP).await?;
                writer.flush().await?;
                let _ = writer.shutdown().await;
                return Ok(());
            }
            PduType::Abort => return Err(ScpError::PeerAborted),
            PduType::AssociateRq
            | PduType::AssociateAc
            | PduType::AssociateRj
            | PduType::ReleaseRp => {
                return Err(ScpError::Protocol("unexpected PDU during association"))
            }
        }
        let body = match tokio::time::timeout(timeout, reader.read_body(header)).await {
            Err(_) => return Err(ScpError::Timeout(timeout.as_secs())),
            Ok(body) => body?,
        };
        if body.is_empty() {
            return Err(ScpError::Protocol("P-DATA-TF without PDV items"));
        }
        for item in pdu::pdvs(body) {
            let pdv = item?;
            let Some(context) = find_context(contexts, pdv.context_id) else {
                return Err(ScpError::Protocol(
                    "PDV on a presentation context that was not accepted",
                ));
            };
            if pdv.is_command {
                if in_flight.is_some() {
                    return Err(ScpError::Protocol("command fragment inside a data set"));
                }
                match command_context {
                    Some(id) if id != pdv.context_id => {
                        return Err(ScpError::Protocol(
                            "command fragments on different presentation contexts",
                        ))
                    }
                    _ => command_context = Some(pdv.context_id),
                }
                if command_buf.len() + pdv.data.len() > MAX_COMMAND {
                    return Err(ScpError::Protocol("command set too long"));
                }
                command_buf.extend_from_slice(pdv.data);
                if !pdv.is_last {
                    continue;
                }
                command_context = None;
                let cmd = Command::decode(&command_buf)
                    .map_err(|_| ScpError::Protocol("undecodable command set"))?;
                command_buf.clear();
                match cmd.command_field {
                    field::C_ECHO_RQ => {
                        if cmd.has_data_set {
                            return Err(ScpError::Protocol("C-ECHO-RQ with a data set"));
                        }
                        let rsp = command::echo_rsp(cmd.message_id, status::SUCCESS);
                        pdu::write_pdata(writer, pdv.context_id, true, true, &rsp).await?;
                        writer.flush().await?;
                        info!(peer = %peer.addr, calling = %peer.calling_ae, "C-ECHO");
                    }
                    field::C_STORE_RQ => {
                        if !cmd.has_data_set {
                            return Err(ScpError::Protocol("C-STORE-RQ without a data set"));
                        }
                        in_flight = Some(begin_object(
                            shared,
                            &settings.ae_title,
                            context,
                            &cmd,
                            peer,
                        ));
                    }
                    _ => return Err(ScpError::Protocol("unsupported DIMSE command")),
                }
            } else {
                let Some(obj) = in_flight.as_mut() else {
                    return Err(ScpError::Protocol("data set fragment without a C-STORE-RQ"));
                };
                if obj.context_id != pdv.context_id {
                    return Err(ScpError::Protocol(
                        "data set fragment on another presentation context",
                    ));
                }
                write_fragment(obj, pdv.data);
                if pdv.is_last {
                    if let Some(obj) = in_flight.take() {
                        finish_object(obj, shared, writer, peer, summary).await?;
                    }
                }
            }
        }
    }
}

/// Decides where the data set of a C-STORE-RQ goes.
fn begin_object<'s>(
    shared: &'s ScpShared,
    ae_title: &str,
    context: &super::negotiation::AcceptedContext,
    cmd: &Command,
    peer: &PeerInfo,
) -> InFlight<'s> {
    let sop_class = cmd.sop_class.clone().unwrap_or_default();
    let sop_instance = cmd.sop_instance.clone().unwrap_or_default();
    let discard = |status: u16, comment: String| Sink::Discard {
        status,
        comment,
        bytes: 0,
    };
    let sink = if cmd.sop_instance.is_none() {
        discard(
            status::CANNOT_UNDERSTAND,
            "Affected SOP Instance UID missing or not a valid UID".into(),
        )
    } else if cmd.sop_class.as_ref() != Some(&context.abstract_syntax) {
        discard(
            status::DATA_SET_MISMATCH,
            "SOP class differs from the presentation context".into(),
        )
    } else {
        let info = ObjectInfo {
            sop_class: &sop_class,
            sop_instance: &sop_instance,
            transfer_syntax: &context.transfer_syntax,
            calling_ae: &peer.calling_ae,
            called_ae: ae_title,
        };
        match shared.store.begin(&info) {
            Ok(incoming) => Sink::File(incoming),
            Err(e) => discard(status::OUT_OF_RESOURCES, e.to_string()),
        }
    };
    InFlight {
        context_id: context.id,
        message_id: cmd.message_id,
        sop_class,
        sop_instance,
        started: Instant::now(),
        sink,
    }
}

/// Writes one data set fragment; a write error turns the object into a
/// discarded one (dropping the temp file) that will be answered with A700.
fn write_fragment(obj: &mut InFlight<'_>, data: &[u8]) {
    match &mut obj.sink {
        Sink::File(incoming) => {
            if let Err(e) = incoming.write(data) {
                let bytes = incoming.data_set_len() + data.len() as u64;
                warn!(sop_instance = %obj.sop_instance, error = %e, "write failed; object dropped");
                obj.sink = Sink::Discard {
                    status: status::OUT_OF_RESOURCES,
                    comment: e.to_string(),
                    bytes,
                };
            }
        }
        Sink::Discard { bytes, .. } => *bytes += data.len() as u64,
    }
}

/// Commits the object (durably) and only then answers the C-STORE-RQ.
async fn finish_object<W: AsyncWrite + Unpin>(
    obj: InFlight<'_>,
    shared: &ScpShared,
    writer: &mut W,
    peer: &PeerInfo,
    summary: &mut AssociationSummary,
) -> Result<(), ScpError> {
    let (code, comment, bytes, path) = match obj.sink {
        Sink::File(incoming) => {
            let bytes = incoming.data_set_len();
            // fdatasync, rename and folder fsync block: keep them off the
            // other associations' scheduler slot.
            let committed: Result<_, StoreError> =
                tokio::task::block_in_place(move || incoming.commit());
            match committed {
                Ok(path) => (status::SUCCESS, None, bytes, Some(path)),
                Err(e) => (status::OUT_OF_RESOURCES, Some(e.to_string()), bytes, None),
            }
        }
        Sink::Discard {
            status,
            comment,
            bytes,
        } => (status, Some(comment), bytes, None),
    };
    let rsp = command::store_rsp(
        obj.message_id,
        obj.sop_class.as_str(),
        obj.sop_instance.as_str(),
        code,
        comment.as_deref(),
    );
    pdu::write_pdata(writer, obj.context_id, true, true, &rsp).await?;
    writer.flush().await?;
    let ms = obj.started.elapsed().as_secs_f64() * 1000.0;
    if let Some(audit) = &shared.audit {
        audit.object(&crate::logs::ObjectRecord {
            time: std::time::SystemTime::now(),
            peer: peer.addr,
            calling_ae: &peer.calling_ae,
            sop_class_uid: obj.sop_class.as_str(),
            sop_instance_uid: obj.sop_instance.as_str(),
            bytes,
            status: code,
            milliseconds: ms as u64,
            stored_path: path.as_deref(),
        });
    }
    let stats = &shared.stats;
    // One line per object: the same fields whatever the outcome, at info
    // level when stored and warn level when not.
    macro_rules! object_line {
        ($level:ident, $message:literal) => {
            $level!(
                peer = %peer.addr,
                calling = %peer.calling_ae,
                sop_class = %obj.sop_class,
                sop_instance = %obj.sop_instance,
                bytes,
                ms = format_args!("{ms:.1}"),
                status = format_args!("{code:04X}"),
                path = %path.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                reason = comment.as_deref().unwrap_or(""),
                $message
            )
        };
    }
    if code == status::SUCCESS {
        if let Some(led) = &shared.led {
            led.blink();
        }
        summary.stored += 1;
        summary.bytes += bytes;
        stats.objects_stored.fetch_add(1, Ordering::Relaxed);
        stats.bytes_stored.fetch_add(bytes, Ordering::Relaxed);
        object_line!(info, "C-STORE");
    } else {
        summary.failed += 1;
        stats.objects_failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = stats.last_error.lock() {
            *last = format!("{code:04X} {}", comment.as_deref().unwrap_or(""));
        }
        object_line!(warn, "C-STORE failed");
    }
    Ok(())
}

/// Keeps the active-association counter right however the task ends.
pub struct ActiveGuard<'a>(&'a Stats);

impl<'a> ActiveGuard<'a> {
    /// Counts one more active association until dropped.
    pub fn new(stats: &'a Stats) -> Self {
        stats.active_associations.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active_associations.fetch_sub(1, Ordering::Relaxed);
    }
}
