//! The SCU side: request an association, C-ECHO, C-STORE a file by
//! streaming its data set (from a blocking reader, or from an async one:
//! the C-MOVE SCP sends its sub-operations this way), release or abort.
//!
//! A file's data set is read straight into the PDU buffer behind the PDU
//! and PDV headers and sent from there: one buffer per association, never
//! a whole file in memory.

use std::io::Read;
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, PresentationContextResultReason,
    UserVariableItem,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::command::{self, field, Command};
use crate::pdu::{self, FramingError, PduReader, PduType};
use crate::uid::{self, Uid};

/// The largest data PDU we send, whatever the peer accepts: larger buys
/// nothing once system calls are amortised.
const MAX_SEND_PDU: u32 = 1 << 20;
/// What we announce as our own receive limit (responses are small).
const OUR_MAX_PDU: u32 = 65536;

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
}

impl<S: AsyncRead + AsyncWrite + Unpin> ScuAssociation<S> {
    /// Requests an association proposing one context per (abstract syntax,
    /// transfer syntax) pair, in order (at most 128).
    pub async fn request(
        mut stream: S,
        opts: &ScuOptions,
        proposals: &[(String, String)],
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
            user_variables: vec![
                UserVariableItem::MaxLength(OUR_MAX_PDU),
                UserVariableItem::ImplementationClassUID(uid::IMPLEMENTATION_CLASS_UID.into()),
                UserVariableItem::ImplementationVersionName(
                    uid::IMPLEMENTATION_VERSION_NAME.into(),
                ),
            ],
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
        })
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

    /// Reads PDUs until a complete response command arrives.
    async fn response(&mut self, expected: u16) -> Result<(u16, Option<String>), ScuError> {
        let mut command_buf = Vec::new();
        loop {
            let header = tokio::time::timeout(self.timeout, self.reader.read_header())
                .await
                .map_err(|_| ScuError::Timeout(self.timeout.as_secs()))??
                .ok_or_else(|| ScuError::Protocol("connection closed by the peer".into()))?;
            match header.pdu_type {
                PduType::PData => {}
                PduType::Abort => return Err(ScuError::Aborted),
                _ => return Err(ScuError::Protocol("unexpected PDU while waiting".into())),
            }
            let body = self.reader.read_body(header).await?;
            for item in pdu::pdvs(body) {
                let pdv = item?;
                if !pdv.is_command {
                    continue;
                }
                command_buf.extend_from_slice(pdv.data);
                if pdv.is_last {
                    let cmd = Command::decode(&command_buf)
                        .map_err(|e| ScuError::Protocol(e.to_string()))?;
                    if cmd.command_field != expected {
                        return Err(ScuError::Protocol(format!(
                            "expected command 0x{expected:04X}, got 0x{:04X}",
                            cmd.command_field
                        )));
                    }
                    let status = cmd
                        .status
                        .ok_or_else(|| ScuError::Protocol("response without status".into()))?;
                    return Ok((status, error_comment(&command_buf)));
                }
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
