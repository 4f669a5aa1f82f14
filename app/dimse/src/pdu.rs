//! PDU framing for the DICOM Upper Layer (PS3.8 §9.3), written for the hot path.
//!
//! Association PDUs (A-ASSOCIATE-RQ/AC/RJ) are rare and small, so they are
//! decoded and encoded by `dicom-ul`. P-DATA-TF PDUs carry every byte of every
//! object, and `dicom-ul`'s reader copies each PDV into a fresh `Vec`; here a
//! PDU is read into ONE buffer allocated at association time and its PDVs are
//! handed out as borrowed slices. Nothing on this path allocates.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes in a PDU header: type (1), reserved (1), length (4, big endian).
pub const PDU_HEADER_LEN: usize = 6;
/// Bytes in a PDV item header: item length (4), presentation context ID (1),
/// message control header (1).
pub const PDV_HEADER_LEN: usize = 6;

/// The PDU types of PS3.8 Table 9-11.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduType {
    /// A-ASSOCIATE-RQ
    AssociateRq,
    /// A-ASSOCIATE-AC
    AssociateAc,
    /// A-ASSOCIATE-RJ
    AssociateRj,
    /// P-DATA-TF
    PData,
    /// A-RELEASE-RQ
    ReleaseRq,
    /// A-RELEASE-RP
    ReleaseRp,
    /// A-ABORT
    Abort,
}

impl PduType {
    /// Maps the type byte of a PDU header; `None` for a type PS3.8 does not define.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::AssociateRq,
            0x02 => Self::AssociateAc,
            0x03 => Self::AssociateRj,
            0x04 => Self::PData,
            0x05 => Self::ReleaseRq,
            0x06 => Self::ReleaseRp,
            0x07 => Self::Abort,
            _ => return None,
        })
    }
}

/// Why a byte stream is not a valid sequence of PDUs. Each of these ends the
/// association with an A-ABORT.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// The peer closed or reset the connection, or a read failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The PDU type byte is not one PS3.8 defines.
    #[error("unknown PDU type 0x{0:02X}")]
    UnknownPduType(u8),
    /// The PDU is longer than the maximum we negotiated.
    #[error("PDU of {length} bytes exceeds the negotiated maximum of {max}")]
    PduTooLong {
        /// the length field of the PDU
        length: u32,
        /// the largest PDU body this association accepts
        max: u32,
    },
    /// A PDV item inside a P-DATA-TF does not fit the PDU it is in.
    #[error("malformed PDV item in P-DATA-TF: {0}")]
    MalformedPdv(&'static str),
    /// A TLS ClientHello arrived where plain DICOM was expected.
    #[error("TLS handshake (ClientHello) received on a plain DICOM port")]
    TlsOnPlainPort,
}

/// The header of one PDU.
#[derive(Debug, Clone, Copy)]
pub struct PduHeader {
    /// the PDU type
    pub pdu_type: PduType,
    /// the number of bytes that follow the header
    pub length: u32,
}

/// Reads PDUs from a stream into one fixed buffer.
///
/// The buffer holds the largest PDU body we accept plus room for the next
/// PDU's header, so that one `read` can return the tail of a body and the head
/// of the next PDU: a steady stream of P-DATA-TF costs about one system call
/// per PDU and no copying beyond the kernel's.
pub struct PduReader<R> {
    stream: R,
    buf: Box<[u8]>,
    /// Bytes of the current PDU body in `buf[..body_len]`.
    body_len: usize,
    /// Bytes read past the current body (the next PDU's header, in part or
    /// whole), kept at `buf[body_len..body_len + carry]` until the next call.
    carry: usize,
    max_body: u32,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    /// Wraps `stream`, accepting PDU bodies of at most `max_body` bytes. This
    /// is the one allocation of the association's receive path.
    pub fn new(stream: R, max_body: u32) -> Self {
        let size = max_body as usize + PDU_HEADER_LEN;
        PduReader {
            stream,
            buf: vec![0; size].into_boxed_slice(),
            body_len: 0,
            carry: 0,
            max_body,
        }
    }

    /// Reads the next PDU header. Returns `Ok(None)` when the peer closed the
    /// connection cleanly between PDUs.
    ///
    /// Cancel-safe: the bytes of a header read so far are kept in the
    /// reader, so the future may be dropped (a `select!` between the next
    /// PDU and the next C-FIND match) and called again without losing any.
    pub async fn read_header(&mut self) -> Result<Option<PduHeader>, FramingError> {
        // Move the carried bytes (at most a header's worth) to the front.
        if self.body_len > 0 {
            self.buf
                .copy_within(self.body_len..self.body_len + self.carry, 0);
            self.body_len = 0;
        }
        while self.carry < PDU_HEADER_LEN {
            // `read` is cancel-safe, and what it read is counted before the
            // next await.
            let n = self
                .stream
                .read(&mut self.buf[self.carry..PDU_HEADER_LEN])
                .await?;
            if n == 0 {
                if self.carry == 0 {
                    return Ok(None);
                }
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            self.carry += n;
        }
        let mut head = [0u8; PDU_HEADER_LEN];
        head.copy_from_slice(&self.buf[..PDU_HEADER_LEN]);
        self.carry = 0;
        parse_header(&head, self.max_body).map(Some)
    }

    /// Reads the body of the PDU whose header was just read, returning it as
    /// a slice of the reusable buffer.
    pub async fn read_body(&mut self, header: PduHeader) -> Result<&[u8], FramingError> {
        let want = header.length as usize;
        debug_assert!(want <= self.max_body as usize);
        let mut have = 0;
        // Read the body and, opportunistically, up to one following header.
        let limit = (want + PDU_HEADER_LEN).min(self.buf.len());
        while have < want {
            let n = self.stream.read(&mut self.buf[have..limit]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            have += n;
        }
        self.body_len = want;
        self.carry = have - want;
        Ok(&self.buf[..want])
    }

    /// The stream, e.g. to drain it after an abort.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.stream
    }

    /// Reads and discards the body of a PDU we will not interpret, in chunks
    /// through the same buffer.
    pub async fn skip_body(&mut self, header: PduHeader) -> Result<(), FramingError> {
        let mut left = header.length as usize;
        self.carry = 0;
        self.body_len = 0;
        while left > 0 {
            let chunk = left.min(self.buf.len());
            self.stream.read_exact(&mut self.buf[..chunk]).await?;
            left -= chunk;
        }
        Ok(())
    }
}

/// Reads one whole association-setup PDU (A-ASSOCIATE-RQ/AC/RJ, at most
/// `max_body` bytes of body) into a buffer of exactly its size, reading
/// nothing past it. Returns its header and all of its bytes.
pub async fn read_setup_pdu<R: AsyncRead + Unpin>(
    stream: &mut R,
    max_body: u32,
) -> Result<(PduHeader, Vec<u8>), FramingError> {
    let mut head = [0u8; PDU_HEADER_LEN];
    stream.read_exact(&mut head).await?;
    let header = parse_header(&head, max_body)?;
    let mut whole = vec![0u8; PDU_HEADER_LEN + header.length as usize];
    whole[..PDU_HEADER_LEN].copy_from_slice(&head);
    stream.read_exact(&mut whole[PDU_HEADER_LEN..]).await?;
    Ok((header, whole))
}

/// Decodes a PDU header and checks its length against `max_body`.
pub fn parse_header(head: &[u8; PDU_HEADER_LEN], max_body: u32) -> Result<PduHeader, FramingError> {
    // A TLS record starts with content type 0x16 (handshake) and version 0x03.
    if head[0] == 0x16 && head[1] == 0x03 {
        return Err(FramingError::TlsOnPlainPort);
    }
    let pdu_type = PduType::from_byte(head[0]).ok_or(FramingError::UnknownPduType(head[0]))?;
    let length = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
    if length > max_body {
        return Err(FramingError::PduTooLong {
            length,
            max: max_body,
        });
    }
    Ok(PduHeader { pdu_type, length })
}

/// One presentation data value, borrowed from a P-DATA-TF body.
#[derive(Debug, Clone, Copy)]
pub struct Pdv<'a> {
    /// the presentation context the value belongs to
    pub context_id: u8,
    /// true for a command fragment, false for a data set fragment
    pub is_command: bool,
    /// true for the last fragment of the command or data set
    pub is_last: bool,
    /// the fragment itself
    pub data: &'a [u8],
}

/// Iterates over the PDV items of a P-DATA-TF body without copying.
pub struct Pdvs<'a> {
    rest: &'a [u8],
}

/// Splits a P-DATA-TF body into its PDV items.
pub fn pdvs(body: &[u8]) -> Pdvs<'_> {
    Pdvs { rest: body }
}

impl<'a> Iterator for Pdvs<'a> {
    type Item = Result<Pdv<'a>, FramingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some((head, tail)) = self.rest.split_first_chunk::<4>() else {
            self.rest = &[];
            return Some(Err(FramingError::MalformedPdv("truncated item length")));
        };
        let item_len = u32::from_be_bytes(*head) as usize;
        if item_len < 2 {
            self.rest = &[];
            return Some(Err(FramingError::MalformedPdv(
                "item shorter than its header",
            )));
        }
        if item_len > tail.len() {
            self.rest = &[];
            return Some(Err(FramingError::MalformedPdv("item longer than its PDU")));
        }
        let (item, rest) = tail.split_at(item_len);
        self.rest = rest;
        let control = item[1];
        Some(Ok(Pdv {
            context_id: item[0],
            is_command: control & 0x01 != 0,
            is_last: control & 0x02 != 0,
            data: &item[2..],
        }))
    }
}

/// Writes the headers of a P-DATA-TF PDU holding one PDV of `data_len` bytes
/// into `out[..12]`.
pub fn pdata_headers(context_id: u8, is_command: bool, is_last: bool, data_len: usize) -> [u8; 12] {
    let pdv_len = (data_len + 2) as u32;
    let pdu_len = pdv_len + 4;
    let mut h = [0u8; PDU_HEADER_LEN + PDV_HEADER_LEN];
    h[0] = 0x04;
    h[2..6].copy_from_slice(&pdu_len.to_be_bytes());
    h[6..10].copy_from_slice(&pdv_len.to_be_bytes());
    h[10] = context_id;
    h[11] = u8::from(is_command) | (u8::from(is_last) << 1);
    h
}

/// Sends `data` as one P-DATA-TF PDU with one PDV (used for command sets,
/// which always fit the smallest PDU we allow).
pub async fn write_pdata<W: AsyncWrite + Unpin>(
    stream: &mut W,
    context_id: u8,
    is_command: bool,
    is_last: bool,
    data: &[u8],
) -> io::Result<()> {
    let headers = pdata_headers(context_id, is_command, is_last, data.len());
    // One buffer, one write: a command set is at most a few hundred bytes.
    let mut pdu = heapless::Vec::<u8, 1024>::new();
    if pdu.extend_from_slice(&headers).is_ok() && pdu.extend_from_slice(data).is_ok() {
        stream.write_all(&pdu).await
    } else {
        stream.write_all(&headers).await?;
        stream.write_all(data).await
    }
}

/// Sends `data` as a data set: PDVs in P-DATA-TF PDUs no longer than the
/// peer's maximum (`peer_max_pdu`, 0 for no limit, then 64 KiB PDUs), the
/// last one marked last.
pub async fn write_data_set<W: AsyncWrite + Unpin>(
    stream: &mut W,
    context_id: u8,
    data: &[u8],
    peer_max_pdu: u32,
) -> io::Result<()> {
    let max_body = match peer_max_pdu {
        0 => 64 * 1024,
        n => (n as usize).min(1 << 24),
    };
    // A PDV item's header (length and control) takes 6 bytes of the body.
    let chunk = max_body.saturating_sub(PDV_HEADER_LEN).max(16);
    let mut rest = data;
    loop {
        let (part, tail) = rest.split_at(rest.len().min(chunk));
        stream
            .write_all(&pdata_headers(
                context_id,
                false,
                tail.is_empty(),
                part.len(),
            ))
            .await?;
        stream.write_all(part).await?;
        rest = tail;
        if rest.is_empty() {
            return Ok(());
        }
    }
}

/// The largest PDU body we send a streamed data set in, whatever the peer
/// accepts: larger buys nothing once system calls are amortised, and the
/// send buffer is this big.
pub const MAX_SEND_BODY: usize = 1 << 20;

/// The PDU body length to send data sets in to a peer that announced
/// `peer_max_pdu` (0: no limit, then 64 KiB), at most [`MAX_SEND_BODY`].
pub fn send_body_len(peer_max_pdu: u32) -> usize {
    match peer_max_pdu {
        0 => 64 * 1024,
        n => (n as usize).min(MAX_SEND_BODY),
    }
}

/// Why a message with a streamed data set was not (wholly) sent.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The data set could not be read before anything of the message was
    /// sent: the association is as it was.
    #[error("data set unreadable: {0}")]
    Unread(#[source] io::Error),
    /// The data set could not be read to its end after part of it was
    /// sent: the association cannot carry another message.
    #[error("data set unreadable after part of it was sent: {0}")]
    Read(#[source] io::Error),
    /// Writing to the peer failed.
    #[error("sending: {0}")]
    Write(#[source] io::Error),
    /// The peer took nothing for longer than the timeout.
    #[error("peer not reading")]
    Timeout,
}

/// Sends a command set followed by a data set of `length` bytes read from
/// `data`, in PDUs of at most `max_body` bytes. The data set passes through
/// `buf` (grown once to one PDU, then reused): never wholly in memory. Its
/// first chunk is read before the command goes out, so that a data set that
/// cannot be read at all leaves nothing on the wire. Each write must make
/// progress within `timeout`.
#[allow(clippy::too_many_arguments)]
pub async fn send_streamed<W, R>(
    writer: &mut W,
    buf: &mut Vec<u8>,
    context_id: u8,
    command: &[u8],
    data: &mut R,
    length: u64,
    max_body: usize,
    timeout: std::time::Duration,
) -> Result<(), StreamError>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin + ?Sized,
{
    const HEAD: usize = PDU_HEADER_LEN + PDV_HEADER_LEN;
    let chunk_max = max_body.saturating_sub(PDV_HEADER_LEN).max(16);
    if buf.len() < HEAD + chunk_max {
        buf.resize(HEAD + chunk_max, 0);
    }
    let chunk = |left: u64| left.min(chunk_max as u64) as usize;
    let timed = |result: Result<io::Result<()>, tokio::time::error::Elapsed>| match result {
        Err(_) => Err(StreamError::Timeout),
        Ok(written) => written.map_err(StreamError::Write),
    };
    let mut n = chunk(length);
    data.read_exact(&mut buf[HEAD..HEAD + n])
        .await
        .map_err(StreamError::Unread)?;
    timed(
        tokio::time::timeout(
            timeout,
            write_pdata(writer, context_id, true, true, command),
        )
        .await,
    )?;
    let mut left = length;
    loop {
        left -= n as u64;
        let last = left == 0;
        buf[..HEAD].copy_from_slice(&pdata_headers(context_id, false, last, n));
        timed(tokio::time::timeout(timeout, writer.write_all(&buf[..HEAD + n])).await)?;
        if last {
            break;
        }
        n = chunk(left);
        data.read_exact(&mut buf[HEAD..HEAD + n])
            .await
            .map_err(StreamError::Read)?;
    }
    timed(tokio::time::timeout(timeout, writer.flush()).await)
}

/// A-RELEASE-RQ, which has no variable fields.
pub const RELEASE_RQ: [u8; 10] = [0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0];
/// A-RELEASE-RP, which has no variable fields.
pub const RELEASE_RP: [u8; 10] = [0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0];

/// Who aborts an association (PS3.8 §9.3.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortSource {
    /// the DICOM UL service user (our application)
    ServiceUser = 0,
    /// the DICOM UL service provider (our protocol machine)
    ServiceProvider = 2,
}

/// The provider's reason for an A-ABORT (PS3.8 Table 9-26).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// reason not specified
    NotSpecified = 0,
    /// unrecognized PDU
    UnrecognizedPdu = 1,
    /// unexpected PDU
    UnexpectedPdu = 2,
    /// unrecognized PDU parameter
    UnrecognizedPduParameter = 4,
    /// unexpected PDU parameter
    UnexpectedPduParameter = 5,
    /// invalid PDU parameter value
    InvalidPduParameter = 6,
}

/// Encodes an A-ABORT PDU.
pub fn abort_pdu(source: AbortSource, reason: AbortReason) -> [u8; 10] {
    let reason = if source == AbortSource::ServiceUser {
        0
    } else {
        reason as u8
    };
    [0x07, 0, 0, 0, 0, 4, 0, 0, source as u8, reason]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rejects_unknown_type_and_oversize() {
        assert!(matches!(
            parse_header(&[0x09, 0, 0, 0, 0, 4], 1024),
            Err(FramingError::UnknownPduType(9))
        ));
        assert!(matches!(
            parse_header(&[0x04, 0, 0xff, 0xff, 0xff, 0xff], 1024),
            Err(FramingError::PduTooLong { .. })
        ));
        assert!(matches!(
            parse_header(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01], 1024),
            Err(FramingError::TlsOnPlainPort)
        ));
        let h = parse_header(&[0x04, 0, 0, 0, 0x10, 0], 4096).expect("valid header");
        assert_eq!(h.pdu_type, PduType::PData);
        assert_eq!(h.length, 4096);
    }

    #[test]
    fn pdvs_split_and_validate() {
        let mut body = Vec::new();
        body.extend_from_slice(&5u32.to_be_bytes());
        body.extend_from_slice(&[1, 0x03, b'a', b'b', b'c']);
        body.extend_from_slice(&3u32.to_be_bytes());
        body.extend_from_slice(&[3, 0x00, b'z']);
        let items: Vec<_> = pdvs(&body).collect::<Result<_, _>>().expect("well formed");
        assert_eq!(items.len(), 2);
        assert!(items[0].is_command && items[0].is_last && items[0].context_id == 1);
        assert_eq!(items[0].data, b"abc");
        assert!(!items[1].is_command && !items[1].is_last && items[1].context_id == 3);

        let mut bad = Vec::new();
        bad.extend_from_slice(&100u32.to_be_bytes());
        bad.extend_from_slice(&[1, 0]);
        assert!(pdvs(&bad).next().expect("one item").is_err());
        assert!(pdvs(&[0, 0, 0, 1, 1]).next().expect("one item").is_err());
        assert!(pdvs(&[0, 0]).next().expect("one item").is_err());
    }

    #[tokio::test]
    async fn reader_carries_the_next_header() {
        let mut stream = Vec::new();
        for i in 0..3u8 {
            let h = pdata_headers(1, false, i == 2, 3);
            stream.extend_from_slice(&h);
            stream.extend_from_slice(&[i; 3]);
        }
        stream.extend_from_slice(&RELEASE_RQ);
        let mut reader = PduReader::new(&stream[..], 4096);
        for i in 0..3u8 {
            let h = reader.read_header().await.expect("ok").expect("a PDU");
            assert_eq!(h.pdu_type, PduType::PData);
            let body = reader.read_body(h).await.expect("body");
            let pdv = pdvs(body).next().expect("one").expect("valid");
            assert_eq!(pdv.data, &[i; 3]);
        }
        let h = reader.read_header().await.expect("ok").expect("a PDU");
        assert_eq!(h.pdu_type, PduType::ReleaseRq);
        reader.read_body(h).await.expect("body");
        assert!(reader.read_header().await.expect("clean end").is_none());
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error() {
        let stream = [0x04u8, 0, 0, 0, 0x10];
        let mut reader = PduReader::new(&stream[..], 4096);
        assert!(reader.read_header().await.is_err());
        let stream = [0x04u8, 0, 0, 0, 0, 10, 1, 2];
        let mut reader = PduReader::new(&stream[..], 4096);
        let h = reader.read_header().await.expect("ok").expect("header");
        assert!(reader.read_body(h).await.is_err());
    }
}
