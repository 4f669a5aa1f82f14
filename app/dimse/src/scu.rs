//! The SCU side: request an association (with SCP/SCU Role Selection when
//! asked), C-ECHO, C-STORE a file by streaming its data set (from a
//! blocking reader, or from an async one: the C-MOVE SCP sends its
//! sub-operations this way), Storage Commitment's N-ACTION and
//! N-EVENT-REPORT (both ways), release or abort.
//!
//! A file's data set is read straight into the PDU buffer behind the PDU
//! and PDV headers and sent from there: one buffer per association, never
//! a whole file in memory. What the peer sends is reassembled within
//! bounds: command sets up to [`MAX_COMMAND`], data sets (an Event
//! Information) up to [`MAX_INFORMATION`].

use std::collections::VecDeque;
use std::io::Read;
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, PresentationContextResultReason,
    RequestorRoles, UserVariableItem,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::command::{self, field, Command};
use crate::pdu::{self, FramingError, PduReader, PduType};
use crate::scp::{MAX_COMMAND, MAX_INFORMATION};
use crate::uid::{self, Uid};

/// The largest data PDU we send, whatever the peer accepts: larger buys
/// nothing once system calls are amortised.
const MAX_SEND_PDU: u32 = 1 << 20;
/// What we announce as our own receive limit (responses are small).
const OUR_MAX_PDU: u32 = 65536;
/// How many N-EVENT-REPORT-RQs that arrive while a response is awaited
/// are kept for [`ScuAssociation::next_event_report`].
const MAX_QUEUED_REPORTS: usize = 4;

/// Why an SCU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    /// Socket or framing failure.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// The peer rejected the association.
    #[error("association rejected: {0}")]
    Rejected(String),
    /// The peer aborted.
    #[error("association aborted by the peer")]
    Aborted,
    /// The peer released the association (its A-RELEASE-RQ was answered):
    /// nothing more can come on it.
    #[error("association released by the peer")]
    Released,
    /// The peer sent something we did not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer did not answer in time.
    #[error("no answer within {0} s")]
    Timeout(u64),
    /// Reading a data set to send failed (see [`pdu::StreamError`]): if
    /// `sent` is false nothing of the message went out and the association
    /// can go on; if true it cannot (abort it).
    #[error("reading the data set to send: {source}")]
    DataSet {
        /// whether part of the message was sent already
        sent: bool,
        /// the error
        source: std::io::Error,
    },
    /// Reading the file to send failed.
    #[error("reading {what}: {source}")]
    File {
        /// which file
        what: String,
        /// the error
        source: std::io::Error,
    },
}

impl From<std::io::Error> for ScuError {
    fn from(e: std::io::Error) -> Self {
        ScuError::Framing(FramingError::Io(e))
    }
}

/// AE titles and timeouts of an SCU.
#[derive(Debug, Clone)]
pub struct ScuOptions {
    /// our AE title
    pub calling_ae: String,
    /// the peer's AE title
    pub called_ae: String,
    /// time to wait for the A-ASSOCIATE-AC and for each response
    pub timeout: Duration,
}

/// An SCP/SCU Role Selection item to propose (PS3.7 D.3.3.4): the roles
/// we, the requestor, ask for on a SOP class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleProposal {
    /// the SOP class
    pub sop_class: String,
    /// we would be SCU
    pub scu: bool,
    /// we would be SCP
    pub scp: bool,
}

impl RoleProposal {
    /// The SCP role only for Storage Commitment Push Model: what a
    /// commitment SCP proposes when it opens an association to deliver its
    /// N-EVENT-REPORT.
    pub fn commitment_scp() -> Self {
        RoleProposal {
            sop_class: uid::STORAGE_COMMITMENT_PUSH_MODEL.to_string(),
            scu: false,
            scp: true,
        }
    }
}

/// An N-EVENT-REPORT-RQ received as SCU (a Storage Commitment result on
/// the association of our N-ACTION), to be answered with
/// [`ScuAssociation::answer_event_report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingEventReport {
    /// (0000,0110) Message ID
    pub message_id: u16,
    /// (0000,0002) Affected SOP Class UID
    pub sop_class: Uid,
    /// (0000,1000) Affected SOP Instance UID
    pub sop_instance: Uid,
    /// (0000,1002) Event Type ID
    pub event_type_id: u16,
    /// the Event Information (at most [`MAX_INFORMATION`] bytes)
    pub data_set: Vec<u8>,
    /// the presentation context it came on
    pub context_id: u8,
    /// that context's transfer syntax: the data set's
    pub transfer_syntax: String,
}

/// One DIMSE message as received.
struct Received {
    context_id: u8,
    command: Command,
    /// the whole Error Comment (the decoded command's is cut to 64)
    comment: Option<String>,
    data_set: Vec<u8>,
    /// the data set was longer than [`MAX_INFORMATION`] and dropped
    data_set_dropped: bool,
}

/// What came from the peer while we waited. (Returned by value once per
/// message: its size costs a copy, where a box would cost an allocation.)
#[allow(clippy::large_enum_variant)]
enum Arrival {
    /// a whole message
    Message(Received),
    /// an A-RELEASE-RQ, answered
    Released,
    /// nothing, for the whole wait
    Quiet,
}

/// A presentation context as negotiated, from the SCU's side.
#[derive(Debug, Clone)]
pub struct NegotiatedContext {
    /// presentation context ID
    pub id: u8,
    /// SOP class
    pub abstract_syntax: String,
    /// the single transfer syntax we proposed for it
    pub transfer_syntax: String,
    /// whether the SCP accepted it
    pub accepted: bool,
}

/// An established association, as SCU.
pub struct ScuAssociation<S> {
    reader: PduReader<ReadHalf<S>>,
    writer: WriteHalf<S>,
    contexts: Vec<NegotiatedContext>,
    send_pdu: u32,
    buf: Vec<u8>,
    next_message_id: u16,
    timeout: Duration,
    /// the role items of the A-ASSOCIATE-AC
    roles: Vec<(String, RequestorRoles)>,
    /// N-EVENT-REPORT-RQs that came while a response was awaited
    queued: VecDeque<IncomingEventReport>,
    /// the command set being reassembled (kept between messages, so that a
    /// response costs no allocation)
    command_buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ScuAssociation<S> {
    /// Requests an association proposing one context per (abstract syntax,
    /// transfer syntax) pair, in order (at most 128).
    pub async fn request(
        stream: S,
        opts: &ScuOptions,
        proposals: &[(String, String)],
    ) -> Result<Self, ScuError> {
        Self::request_with(stream, opts, proposals, &[]).await
    }

    /// Requests an association as [`request`](Self::request) does, also
    /// proposing these SCP/SCU Role Selection items (e.g.
    /// [`RoleProposal::commitment_scp`] to deliver an N-EVENT-REPORT as
    /// Storage Commitment SCP). What the acceptor answered is in
    /// [`scp_role_granted`](Self::scp_role_granted).
    pub async fn request_with(
        mut stream: S,
        opts: &ScuOptions,
        proposals: &[(String, String)],
        roles: &[RoleProposal],
    ) -> Result<Self, ScuError> {
        let presentation_contexts: Vec<_> = proposals
            .iter()
            .enumerate()
            .map(|(i, (abs, ts))| PresentationContextProposed {
                id: (i * 2 + 1) as u8,
                abstract_syntax: abs.clone(),
                transfer_syntaxes: vec![ts.clone()],
            })
            .collect();
        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: opts.calling_ae.clone(),
            called_ae_title: opts.called_ae.clone(),
            application_context_name: uid::APPLICATION_CONTEXT.into(),
            presentation_contexts,
            // Sub-items in the order of their item types (51h, 52h, 54h,
            // 55h), as PS3.7 D.3.3 lists them.
            user_variables: [
                UserVariableItem::MaxLength(OUR_MAX_PDU),
                UserVariableItem::ImplementationClassUID(uid::IMPLEMENTATION_CLASS_UID.into()),
            ]
            .into_iter()
            .chain(roles.iter().map(|r| {
                UserVariableItem::ScuScpRoleSelectionSubItem(
                    r.sop_class.clone(),
                    RequestorRoles {
                        scu: r.scu,
                        scp: r.scp,
                    },
                )
            }))
            .chain([UserVariableItem::ImplementationVersionName(
                uid::IMPLEMENTATION_VERSION_NAME.into(),
            )])
            .collect(),
        };
        crate::scp::send_pdu(&mut stream, &Pdu::AssociationRQ(rq)).await?;

        let reply = tokio::time::timeout(opts.timeout, read_whole_pdu(&mut stream))
            .await
            .map_err(|_| ScuError::Timeout(opts.timeout.as_secs()))??;
        let ac = match reply {
            Pdu::AssociationAC(ac) => ac,
            Pdu::AssociationRJ(rj) => {
                return Err(ScuError::Rejected(format!(
                    "{:?}: {}",
                    rj.result, rj.source
                )))
            }
            Pdu::AbortRQ { .. } => return Err(ScuError::Aborted),
            other => {
                return Err(ScuError::Protocol(format!(
                    "unexpected {} in answer to A-ASSOCIATE-RQ",
                    other.short_description()
                )))
            }
        };
        let contexts = proposals
            .iter()
            .enumerate()
            .map(|(i, (abs, ts))| {
                let id = (i * 2 + 1) as u8;
                let accepted = ac
                    .presentation_contexts
                    .iter()
                    .any(|r| r.id == id && r.reason == PresentationContextResultReason::Acceptance);
                NegotiatedContext {
                    id,
                    abstract_syntax: abs.clone(),
                    transfer_syntax: ts.clone(),
                    accepted,
                }
            })
            .collect();
        let peer_max = crate::negotiation::max_pdu_of(&ac.user_variables);
        let accepted_roles = ac
            .user_variables
            .iter()
            .filter_map(|v| match v {
                UserVariableItem::ScuScpRoleSelectionSubItem(class, roles) => {
                    Some((class.trim_end_matches(['\0', ' ']).to_string(), *roles))
                }
                _ => None,
            })
            .collect();
        let send_pdu = if peer_max == 0 {
            MAX_SEND_PDU
        } else {
            peer_max.clamp(1024, MAX_SEND_PDU)
        };
        let (read_half, writer) = tokio::io::split(stream);
        Ok(ScuAssociation {
            reader: PduReader::new(read_half, OUR_MAX_PDU),
            writer,
            contexts,
            send_pdu,
            buf: Vec::new(),
            next_message_id: 1,
            timeout: opts.timeout,
            roles: accepted_roles,
            queued: VecDeque::new(),
            command_buf: Vec::new(),
        })
    }

    /// True when the acceptor answered a role item granting us the SCP
    /// role for `sop_class`. (Without an answer the default roles hold: we
    /// are SCU only, though many peers take an N-EVENT-REPORT anyway.)
    pub fn scp_role_granted(&self, sop_class: &str) -> bool {
        self.roles
            .iter()
            .any(|(class, roles)| class == sop_class && roles.scp)
    }

    /// The negotiated contexts.
    pub fn contexts(&self) -> &[NegotiatedContext] {
        &self.contexts
    }

    /// The accepted context for this SOP class and transfer syntax.
    pub fn context_for(&self, abstract_syntax: &str, transfer_syntax: &str) -> Option<u8> {
        self.contexts
            .iter()
            .find(|c| {
                c.accepted
                    && c.abstract_syntax == abstract_syntax
                    && c.transfer_syntax == transfer_syntax
            })
            .map(|c| c.id)
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }

    /// Sends a C-ECHO-RQ and returns the response status.
    pub async fn echo(&mut self) -> Result<u16, ScuError> {
        let ctx = self
            .contexts
            .iter()
            .find(|c| c.accepted && c.abstract_syntax == uid::VERIFICATION)
            .map(|c| c.id)
            .ok_or_else(|| ScuError::Protocol("Verification was not accepted".into()))?;
        let id = self.message_id();
        let rq = command::echo_rq(id);
        pdu::write_pdata(&mut self.writer, ctx, true, true, &rq).await?;
        self.writer.flush().await?;
        let rsp = self.response(field::C_ECHO_RSP).await?;
        Ok(rsp.0)
    }

    /// Sends one object: the command, then `len` data set bytes read from
    /// `data`, calling `progress` with each chunk's size. Returns the status
    /// and the peer's error comment, if any.
    pub async fn store(
        &mut self,
        context_id: u8,
        sop_class: &Uid,
        sop_instance: &Uid,
        data: &mut impl Read,
        len: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<(u16, Option<String>), ScuError> {
        let id = self.message_id();
        let rq = command::store_rq(id, sop_class, sop_instance);
        pdu::write_pdata(&mut self.writer, context_id, true, true, &rq).await?;

        const HEAD: usize = pdu::PDU_HEADER_LEN + pdu::PDV_HEADER_LEN;
        let chunk_max = self.send_pdu as usize - pdu::PDV_HEADER_LEN;
        let want = HEAD + chunk_max.min(len.max(1) as usize);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let mut left = len;
        loop {
            let n = chunk_max.min(left as usize);
            let last = left == n as u64;
            data.read_exact(&mut self.buf[HEAD..HEAD + n])
                .map_err(|source| ScuError::File {
                    what: format!("data set of {sop_instance}"),
                    source,
                })?;
            let headers = pdu::pdata_headers(context_id, false, last, n);
            self.buf[..HEAD].copy_from_slice(&headers);
            self.writer.write_all(&self.buf[..HEAD + n]).await?;
            left -= n as u64;
            progress(n as u64);
            if last {
                break;
            }
        }
        self.writer.flush().await?;
        self.response(field::C_STORE_RSP).await
    }

    /// Sends one object as a C-STORE-RQ (with this priority and, for a
    /// C-MOVE sub-operation, the Move Originator fields) and its data set
    /// of `len` bytes streamed from `data`, then awaits the C-STORE-RSP.
    /// Returns the status and the peer's error comment, if any.
    #[allow(clippy::too_many_arguments)]
    pub async fn store_streamed<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        context_id: u8,
        sop_class: &Uid,
        sop_instance: &Uid,
        priority: u16,
        move_originator: Option<&command::MoveOriginator>,
        data: &mut R,
        len: u64,
    ) -> Result<(u16, Option<String>), ScuError> {
        let id = self.message_id();
        let rq = command::store_rq_with(id, sop_class, sop_instance, priority, move_originator);
        pdu::send_streamed(
            &mut self.writer,
            &mut self.buf,
            context_id,
            &rq,
            data,
            len,
            self.send_pdu as usize,
            self.timeout,
        )
        .await
        .map_err(|e| match e {
            pdu::StreamError::Unread(source) => ScuError::DataSet {
                sent: false,
                source,
            },
            pdu::StreamError::Read(source) => ScuError::DataSet { sent: true, source },
            pdu::StreamError::Write(e) => ScuError::Framing(FramingError::Io(e)),
            pdu::StreamError::Timeout => ScuError::Timeout(self.timeout.as_secs()),
        })?;
        self.response(field::C_STORE_RSP).await
    }

    /// Sends an N-ACTION-RQ (the Requested SOP Class and Instance, e.g.
    /// Storage Commitment Push Model and its well-known instance) with its
    /// Action Information, and awaits the N-ACTION-RSP. Returns its status
    /// and Error Comment. An N-EVENT-REPORT-RQ that comes before it is kept
    /// for [`next_event_report`](Self::next_event_report).
    pub async fn n_action(
        &mut self,
        context_id: u8,
        sop_class: &Uid,
        sop_instance: &Uid,
        action_type_id: u16,
        data_set: &[u8],
    ) -> Result<(u16, Option<String>), ScuError> {
        let id = self.message_id();
        let rq = command::n_action_rq(id, sop_class, sop_instance, action_type_id);
        self.send_message(context_id, &rq, Some(data_set)).await?;
        self.response_to(field::N_ACTION_RSP, Some(id)).await
    }

    /// Sends an N-EVENT-REPORT-RQ (as Storage Commitment SCP, on an
    /// association we opened to deliver a result) with its Event
    /// Information, and awaits the N-EVENT-REPORT-RSP. Returns its status
    /// and Error Comment.
    pub async fn n_event_report(
        &mut self,
        context_id: u8,
        sop_class: &Uid,
        sop_instance: &Uid,
        event_type_id: u16,
        data_set: &[u8],
    ) -> Result<(u16, Option<String>), ScuError> {
        let id = self.message_id();
        let rq = command::n_event_report_rq(id, sop_class, sop_instance, event_type_id);
        self.send_message(context_id, &rq, Some(data_set)).await?;
        self.response_to(field::N_EVENT_REPORT_RSP, Some(id)).await
    }

    /// Waits up to `wait` for the peer's next N-EVENT-REPORT-RQ (the
    /// result of our N-ACTION, when the commitment SCP reports on the same
    /// association). `None` when nothing came; [`ScuError::Released`] when
    /// the peer released the association instead (answered: the result
    /// will come, if at all, on an association it opens). A report whose
    /// data set is over [`MAX_INFORMATION`] is answered 0213 here and not
    /// returned. Answer each with
    /// [`answer_event_report`](Self::answer_event_report).
    pub async fn next_event_report(
        &mut self,
        wait: Duration,
    ) -> Result<Option<IncomingEventReport>, ScuError> {
        if let Some(report) = self.queued.pop_front() {
            return Ok(Some(report));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_message(left).await? {
                Arrival::Quiet => return Ok(None),
                Arrival::Released => return Err(ScuError::Released),
                Arrival::Message(m) if m.command.command_field == field::N_EVENT_REPORT_RQ => {
                    if let Some(report) = self.take_report(m).await? {
                        return Ok(Some(report));
                    }
                }
                Arrival::Message(m) => {
                    return Err(ScuError::Protocol(format!(
                        "command 0x{:04X} while waiting for an N-EVENT-REPORT-RQ",
                        m.command.command_field
                    )))
                }
            }
        }
    }

    /// Answers an N-EVENT-REPORT-RQ with an N-EVENT-REPORT-RSP of `status`
    /// (0000: the result was taken).
    pub async fn answer_event_report(
        &mut self,
        report: &IncomingEventReport,
        status: u16,
    ) -> Result<(), ScuError> {
        let rsp = command::n_event_report_rsp(
            report.message_id,
            &report.sop_class,
            Some(&report.sop_instance),
            Some(report.event_type_id),
            status,
            None,
        );
        self.send_message(report.context_id, &rsp, None).await
    }

    /// An N-EVENT-REPORT-RQ as an [`IncomingEventReport`], or, when its
    /// data set was over the cap, `None` after answering it 0213.
    async fn take_report(&mut self, m: Received) -> Result<Option<IncomingEventReport>, ScuError> {
        let missing = |what: &str| ScuError::Protocol(format!("N-EVENT-REPORT-RQ without {what}"));
        let sop_class = m
            .command
            .sop_class
            .clone()
            .ok_or_else(|| missing("a valid Affected SOP Class UID"))?;
        let sop_instance = m
            .command
            .sop_instance
            .clone()
            .ok_or_else(|| missing("a valid Affected SOP Instance UID"))?;
        let event_type_id = m
            .command
            .event_type_id
            .ok_or_else(|| missing("an Event Type ID"))?;
        if m.data_set_dropped {
            let rsp = command::n_event_report_rsp(
                m.command.message_id,
                &sop_class,
                Some(&sop_instance),
                Some(event_type_id),
                command::status::RESOURCE_LIMITATION,
                Some(&format!(
                    "Event Information longer than {} KiB",
                    MAX_INFORMATION / 1024
                )),
            );
            self.send_message(m.context_id, &rsp, None).await?;
            return Ok(None);
        }
        let transfer_syntax = self
            .contexts
            .iter()
            .find(|c| c.id == m.context_id)
            .map(|c| c.transfer_syntax.clone())
            .unwrap_or_default();
        Ok(Some(IncomingEventReport {
            message_id: m.command.message_id,
            sop_class,
            sop_instance,
            event_type_id,
            data_set: m.data_set,
            context_id: m.context_id,
            transfer_syntax,
        }))
    }

    /// Sends a command and, when given, its data set, within the timeout.
    async fn send_message(
        &mut self,
        context_id: u8,
        command: &[u8],
        data_set: Option<&[u8]>,
    ) -> Result<(), ScuError> {
        let send = async {
            pdu::write_pdata(&mut self.writer, context_id, true, true, command).await?;
            if let Some(data_set) = data_set {
                pdu::write_data_set(&mut self.writer, context_id, data_set, self.send_pdu).await?;
            }
            self.writer.flush().await
        };
        tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| ScuError::Timeout(self.timeout.as_secs()))??;
        Ok(())
    }

    /// Reads messages until a complete response command arrives.
    async fn response(&mut self, expected: u16) -> Result<(u16, Option<String>), ScuError> {
        self.response_to(expected, None).await
    }

    /// Reads messages until the response `expected` arrives (to the
    /// request `message_id`, when given); an N-EVENT-REPORT-RQ before it is
    /// kept for [`next_event_report`](Self::next_event_report).
    async fn response_to(
        &mut self,
        expected: u16,
        message_id: Option<u16>,
    ) -> Result<(u16, Option<String>), ScuError> {
        loop {
            let m = match self.read_message(self.timeout).await? {
                Arrival::Message(m) => m,
                Arrival::Released => return Err(ScuError::Released),
                Arrival::Quiet => return Err(ScuError::Timeout(self.timeout.as_secs())),
            };
            if m.command.command_field == field::N_EVENT_REPORT_RQ
                && self.queued.len() < MAX_QUEUED_REPORTS
            {
                if let Some(report) = self.take_report(m).await? {
                    self.queued.push_back(report);
                }
                continue;
            }
            if m.command.command_field != expected {
                return Err(ScuError::Protocol(format!(
                    "expected command 0x{expected:04X}, got 0x{:04X}",
                    m.command.command_field
                )));
            }
            if let (Some(sent), Some(answered)) =
                (message_id, m.command.message_id_being_responded_to)
            {
                if sent != answered {
                    return Err(ScuError::Protocol(format!(
                        "response to message {answered}, expected {sent}"
                    )));
                }
            }
            let status = m
                .command
                .status
                .ok_or_else(|| ScuError::Protocol("response without status".into()))?;
            return Ok((status, m.comment));
        }
    }

    /// Reads one whole message: its command set and, when it announces
    /// one, its data set, each reassembled within bounds (a data set over
    /// [`MAX_INFORMATION`] is read and dropped). `Quiet` when no PDU
    /// starts within `first_wait`; an A-RELEASE-RQ between messages is
    /// answered. A P-DATA-TF must not hold the start of the next message.
    async fn read_message(&mut self, first_wait: Duration) -> Result<Arrival, ScuError> {
        let mut command = std::mem::take(&mut self.command_buf);
        command.clear();
        let mut command_context = None;
        // The decoded command, once whole, waiting for its data set.
        let mut announced: Option<(Command, Option<String>, u8)> = None;
        let mut data_set = Vec::new();
        let mut dropped = false;
        let mut first = true;
        loop {
            let wait = if first { first_wait } else { self.timeout };
            let header = match tokio::time::timeout(wait, self.reader.read_header()).await {
                Err(_) if first => return Ok(Arrival::Quiet),
                Err(_) => return Err(ScuError::Timeout(self.timeout.as_secs())),
                Ok(header) => header?
                    .ok_or_else(|| ScuError::Protocol("connection closed by the peer".into()))?,
            };
            match header.pdu_type {
                PduType::PData => {}
                PduType::Abort => return Err(ScuError::Aborted),
                PduType::ReleaseRq if first => {
                    self.reader.skip_body(header).await?;
                    self.writer.write_all(&pdu::RELEASE_RP).await?;
                    self.writer.flush().await?;
                    let _ = self.writer.shutdown().await;
                    return Ok(Arrival::Released);
                }
                _ => return Err(ScuError::Protocol("unexpected PDU while waiting".into())),
            }
            first = false;
            let body = tokio::time::timeout(self.timeout, self.reader.read_body(header))
                .await
                .map_err(|_| ScuError::Timeout(self.timeout.as_secs()))??;
            let mut done: Option<Received> = None;
            for item in pdu::pdvs(body) {
                let pdv = item?;
                if done.is_some() {
                    return Err(ScuError::Protocol(
                        "a P-DATA-TF holds the start of another message".into(),
                    ));
                }
                if pdv.is_command {
                    if announced.is_some() {
                        return Err(ScuError::Protocol(
                            "command fragment inside a data set".into(),
                        ));
                    }
                    if command_context.is_some_and(|c| c != pdv.context_id) {
                        return Err(ScuError::Protocol(
                            "command fragments on different presentation contexts".into(),
                        ));
                    }
                    command_context = Some(pdv.context_id);
                    if command.len() + pdv.data.len() > MAX_COMMAND {
                        return Err(ScuError::Protocol(format!(
                            "command set longer than {MAX_COMMAND} bytes"
                        )));
                    }
                    command.extend_from_slice(pdv.data);
                    if !pdv.is_last {
                        continue;
                    }
                    let cmd =
                        Command::decode(&command).map_err(|e| ScuError::Protocol(e.to_string()))?;
                    let comment = error_comment(&command);
                    if cmd.has_data_set {
                        announced = Some((cmd, comment, pdv.context_id));
                    } else {
                        done = Some(Received {
                            context_id: pdv.context_id,
                            command: cmd,
                            comment,
                            data_set: Vec::new(),
                            data_set_dropped: false,
                        });
                    }
                } else {
                    let Some((_, _, context_id)) = &announced else {
                        return Err(ScuError::Protocol(
                            "data set fragment without a command".into(),
                        ));
                    };
                    if *context_id != pdv.context_id {
                        return Err(ScuError::Protocol(
                            "data set fragment on another presentation context".into(),
                        ));
                    }
                    if dropped || data_set.len() + pdv.data.len() > MAX_INFORMATION {
                        dropped = true;
                        data_set = Vec::new();
                    } else {
                        data_set.extend_from_slice(pdv.data);
                    }
                    if pdv.is_last {
                        if let Some((cmd, comment, context_id)) = announced.take() {
                            done = Some(Received {
                                context_id,
                                command: cmd,
                                comment,
                                data_set: std::mem::take(&mut data_set),
                                data_set_dropped: dropped,
                            });
                        }
                    }
                }
            }
            if let Some(received) = done {
                self.command_buf = command;
                return Ok(Arrival::Message(received));
            }
        }
    }

    /// Aborts the association (as the service user) and closes the
    /// connection: for an association that cannot go on.
    pub async fn abort(mut self) {
        let _ = self
            .writer
            .write_all(&pdu::abort_pdu(
                pdu::AbortSource::ServiceUser,
                pdu::AbortReason::NotSpecified,
            ))
            .await;
        let _ = self.writer.flush().await;
        let _ = self.writer.shutdown().await;
    }

    /// Releases the association politely.
    pub async fn release(mut self) -> Result<(), ScuError> {
        self.writer.write_all(&pdu::RELEASE_RQ).await?;
        self.writer.flush().await?;
        let header = tokio::time::timeout(self.timeout, self.reader.read_header())
            .await
            .map_err(|_| ScuError::Timeout(self.timeout.as_secs()))??;
        match header {
            Some(h) if h.pdu_type == PduType::ReleaseRp => Ok(()),
            Some(h) if h.pdu_type == PduType::Abort => Err(ScuError::Aborted),
            _ => Err(ScuError::Protocol("no A-RELEASE-RP".into())),
        }
    }
}

/// Extracts (0000,0902) Error Comment from an encoded command, if present.
fn error_comment(bytes: &[u8]) -> Option<String> {
    let mut rest = bytes;
    while let Some((head, tail)) = rest.split_first_chunk::<8>() {
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let value = tail.get(..len)?;
        if head[..4] == [0x00, 0x00, 0x02, 0x09] {
            return Some(String::from_utf8_lossy(value).trim().to_string());
        }
        rest = &tail[len..];
    }
    None
}

/// Reads one whole PDU of association setup size and decodes it.
async fn read_whole_pdu<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Pdu, ScuError> {
    let (_, whole) = pdu::read_setup_pdu(stream, crate::scp::MAX_ASSOCIATE_RQ).await?;
    match dicom_ul::pdu::read_pdu(&whole[..], crate::scp::MAX_ASSOCIATE_RQ, false) {
        Ok(Some(pdu)) => Ok(pdu),
        Ok(None) => Err(ScuError::Protocol("truncated PDU".into())),
        Err(e) => Err(ScuError::Protocol(e.to_string())),
    }
}
