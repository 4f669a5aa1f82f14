//! The data sets of Storage Commitment Push Model (PS3.4 Annex J) as typed
//! values: the Action Information of an N-ACTION-RQ (which instances to
//! commit) and the Event Information of an N-EVENT-REPORT-RQ (which were
//! committed and which failed, with why).
//!
//! The Storage Commitment context is negotiated in Implicit or Explicit VR
//! Little Endian only (see [`negotiation`](crate::negotiation)), so these
//! two are the only encodings here, and this module needs no dictionary:
//! it knows the few tags of Annex J and skips every other element (a
//! Retrieve AE Title, a Storage Media File-Set ID, private tags), whole
//! sequences of unknown elements included, with defined or undefined
//! lengths. Decoding is bounded: a data set over [`MAX_DATA_SET`] is
//! refused before it is looked at, and sequences nest at most
//! [`MAX_DEPTH`] deep.

use crate::uid::Uid;

/// The largest Action or Event Information decoded (1 MiB). A reference
/// costs about 100 bytes on the wire (two UIDs and their item), so this
/// takes a commitment of some 10,000 instances (6,500 with UIDs of the
/// full 64 characters): a large study. A larger request is refused, not
/// truncated, and an application committing more sends several
/// transactions. The bound matters because the data set is held whole in
/// memory, once per association, on a small appliance.
pub const MAX_DATA_SET: usize = 1 << 20;

/// How deep sequences may nest (Annex J needs one level; unknown elements
/// may bring a few more). Bounds the recursion of skipping them.
pub const MAX_DEPTH: usize = 8;

/// (0008,1195) Transaction UID
const TAG_TRANSACTION_UID: u32 = 0x0008_1195;
/// (0008,1197) Failure Reason
const TAG_FAILURE_REASON: u32 = 0x0008_1197;
/// (0008,1198) Failed SOP Sequence
const TAG_FAILED_SOP_SEQUENCE: u32 = 0x0008_1198;
/// (0008,1199) Referenced SOP Sequence
const TAG_REFERENCED_SOP_SEQUENCE: u32 = 0x0008_1199;
/// (0008,1150) Referenced SOP Class UID
const TAG_REFERENCED_SOP_CLASS: u32 = 0x0008_1150;
/// (0008,1155) Referenced SOP Instance UID
const TAG_REFERENCED_SOP_INSTANCE: u32 = 0x0008_1155;
/// (FFFE,E000) Item
const TAG_ITEM: u32 = 0xFFFE_E000;
/// (FFFE,E00D) Item Delimitation Item
const TAG_ITEM_DELIMITER: u32 = 0xFFFE_E00D;
/// (FFFE,E0DD) Sequence Delimitation Item
const TAG_SEQUENCE_DELIMITER: u32 = 0xFFFE_E0DD;
/// A length of 0xFFFFFFFF: undefined, the end is marked by a delimiter.
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// The Action Type ID of "Request Storage Commitment" (PS3.4 J.3.3).
pub const ACTION_REQUEST_COMMITMENT: u16 = 1;
/// The Event Type ID of "Storage Commitment Request Successful": every
/// instance was committed (PS3.4 J.3.3).
pub const EVENT_SUCCESSFUL: u16 = 1;
/// The Event Type ID of "Storage Commitment Request Complete - Failures
/// Exist" (PS3.4 J.3.3).
pub const EVENT_FAILURES_EXIST: u16 = 2;

/// Failure Reason (0008,1197) values for Storage Commitment (PS3.4
/// J.3.3.1.1.2, PS3.3 C.12.1.1.4).
pub mod failure_reason {
    /// a general failure in processing the operation
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// the instance is not here (never received, or gone)
    pub const NO_SUCH_OBJECT_INSTANCE: u16 = 0x0112;
    /// the instance was not committed for lack of resources
    pub const RESOURCE_LIMITATION: u16 = 0x0213;
    /// the SOP class of the instance is not supported
    pub const REFERENCED_SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// the SOP class given does not match the instance's
    pub const CLASS_INSTANCE_CONFLICT: u16 = 0x0119;
    /// the Transaction UID was used before
    pub const DUPLICATE_TRANSACTION_UID: u16 = 0x0131;
}

/// The two transfer syntaxes these data sets travel in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// Implicit VR Little Endian (1.2.840.10008.1.2)
    ImplicitLittle,
    /// Explicit VR Little Endian (1.2.840.10008.1.2.1)
    ExplicitLittle,
}

impl Syntax {
    /// The syntax of a presentation context's transfer syntax UID; `None`
    /// for any other (which the Storage Commitment context is never
    /// accepted with).
    pub fn of(transfer_syntax: &str) -> Option<Syntax> {
        match transfer_syntax {
            crate::uid::IMPLICIT_VR_LE => Some(Syntax::ImplicitLittle),
            crate::uid::EXPLICIT_VR_LE => Some(Syntax::ExplicitLittle),
            _ => None,
        }
    }
}

/// One instance named in a commitment: an item of the Referenced SOP
/// Sequence or the Failed SOP Sequence.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// (0008,1150) Referenced SOP Class UID
    pub sop_class: Uid,
    /// (0008,1155) Referenced SOP Instance UID
    pub sop_instance: Uid,
}

/// The Action Information of an N-ACTION-RQ "Request Storage Commitment"
/// (PS3.4 Table J.3-1): which instances the requester asks us to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitmentRequest {
    /// (0008,1195) Transaction UID: names the request, and its answer
    pub transaction_uid: Uid,
    /// (0008,1199) Referenced SOP Sequence
    pub references: Vec<Reference>,
}

/// The Event Information of an N-EVENT-REPORT-RQ (PS3.4 Table J.3-2):
/// the answer to the request of the same Transaction UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitmentResult {
    /// (0008,1195) Transaction UID of the request answered
    pub transaction_uid: Uid,
    /// (0008,1199) Referenced SOP Sequence: the instances committed
    pub committed: Vec<Reference>,
    /// (0008,1198) Failed SOP Sequence: the instances not committed, each
    /// with its (0008,1197) Failure Reason (see [`failure_reason`])
    pub failed: Vec<(Reference, u16)>,
}

/// Why a Storage Commitment data set could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_DATA_SET`].
    #[error("data set of {0} bytes is longer than {max} bytes", max = MAX_DATA_SET)]
    TooLarge(usize),
    /// An element header or value runs past the end of what contains it.
    #[error("data set truncated")]
    Truncated,
    /// The encoding breaks the rules (a stray delimiter, an item outside a
    /// sequence, an undefined length where none may be).
    #[error("malformed data set: {0}")]
    Malformed(&'static str),
    /// Sequences nested deeper than [`MAX_DEPTH`].
    #[error("sequences nested deeper than {max}", max = MAX_DEPTH)]
    TooDeep,
    /// A required element is missing or its value is not usable.
    #[error("{0} missing or not valid")]
    Missing(&'static str),
    /// An item of a sequence lacks a valid Referenced SOP Class or
    /// Instance UID (or, in the Failed SOP Sequence, a Failure Reason).
    #[error("item {item} of the {sequence}: {what} missing or not valid")]
    BadReference {
        /// the sequence's name
        sequence: &'static str,
        /// the item's position, from 1
        item: usize,
        /// the element that is missing or not valid
        what: &'static str,
    },
}

impl CommitmentRequest {
    /// Encodes the request in `syntax`, with defined lengths. Its size is
    /// the caller's: about 100 bytes per reference.
    pub fn encode(&self, syntax: Syntax) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.references.len() * 160);
        uid_element(&mut out, syntax, TAG_TRANSACTION_UID, &self.transaction_uid);
        let items = self.references.iter().map(|r| (r, None));
        sequence(&mut out, syntax, TAG_REFERENCED_SOP_SEQUENCE, items);
        out
    }

    /// Decodes a request in `syntax`; unknown elements are skipped.
    pub fn decode(bytes: &[u8], syntax: Syntax) -> Result<Self, DecodeError> {
        let found = walk(bytes, syntax)?;
        Ok(CommitmentRequest {
            transaction_uid: found
                .transaction_uid
                .ok_or(DecodeError::Missing("Transaction UID (0008,1195)"))?,
            references: found
                .referenced
                .ok_or(DecodeError::Missing("Referenced SOP Sequence (0008,1199)"))?
                .into_iter()
                .map(|(reference, _)| reference)
                .collect(),
        })
    }
}

impl CommitmentResult {
    /// The Event Type ID this result is reported with: 1 when every
    /// instance was committed, 2 when any failed.
    pub fn event_type(&self) -> u16 {
        if self.failed.is_empty() {
            EVENT_SUCCESSFUL
        } else {
            EVENT_FAILURES_EXIST
        }
    }

    /// Encodes the result in `syntax`, with defined lengths. Each sequence
    /// is present only when it has items (both are Type 1C).
    pub fn encode(&self, syntax: Syntax) -> Vec<u8> {
        let n = self.committed.len() + self.failed.len();
        let mut out = Vec::with_capacity(128 + n * 170);
        uid_element(&mut out, syntax, TAG_TRANSACTION_UID, &self.transaction_uid);
        if !self.failed.is_empty() {
            let items = self.failed.iter().map(|(r, why)| (r, Some(*why)));
            sequence(&mut out, syntax, TAG_FAILED_SOP_SEQUENCE, items);
        }
        if !self.committed.is_empty() {
            let items = self.committed.iter().map(|r| (r, None));
            sequence(&mut out, syntax, TAG_REFERENCED_SOP_SEQUENCE, items);
        }
        out
    }

    /// Decodes a result in `syntax`; unknown elements are skipped. An
    /// absent sequence is an empty list.
    pub fn decode(bytes: &[u8], syntax: Syntax) -> Result<Self, DecodeError> {
        let found = walk(bytes, syntax)?;
        let failed = found
            .failed
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, (reference, why))| {
                why.map(|why| (reference, why))
                    .ok_or(DecodeError::BadReference {
                        sequence: "Failed SOP Sequence",
                        item: i + 1,
                        what: "Failure Reason (0008,1197)",
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(CommitmentResult {
            transaction_uid: found
                .transaction_uid
                .ok_or(DecodeError::Missing("Transaction UID (0008,1195)"))?,
            committed: found
                .referenced
                .unwrap_or_default()
                .into_iter()
                .map(|(reference, _)| reference)
                .collect(),
            failed,
        })
    }
}

// ---- encoding ----

/// Appends one element with a 2-byte length in Explicit VR (UI, US) in
/// `syntax`, its value padded to even length with `pad`.
fn element(out: &mut Vec<u8>, syntax: Syntax, tag: u32, vr: &[u8; 2], value: &[u8], pad: u8) {
    let padded = value.len() + value.len() % 2;
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    match syntax {
        Syntax::ImplicitLittle => out.extend_from_slice(&(padded as u32).to_le_bytes()),
        Syntax::ExplicitLittle => {
            out.extend_from_slice(vr);
            // A UID is at most 64 bytes: the 2-byte length cannot overflow.
            out.extend_from_slice(&(padded as u16).to_le_bytes());
        }
    }
    out.extend_from_slice(value);
    if value.len() % 2 == 1 {
        out.push(pad);
    }
}

/// Appends a UI element (padded with a NUL).
fn uid_element(out: &mut Vec<u8>, syntax: Syntax, tag: u32, value: &Uid) {
    element(out, syntax, tag, b"UI", value.as_str().as_bytes(), 0);
}

/// The encoded length of an item's content: its header is 8 bytes per
/// element in both syntaxes (Implicit VR: tag and 4-byte length; Explicit
/// VR: tag, VR and 2-byte length).
fn item_len(reference: &Reference, failure_reason: Option<u16>) -> usize {
    let uid_len = |u: &Uid| 8 + u.as_str().len() + u.as_str().len() % 2;
    uid_len(&reference.sop_class)
        + uid_len(&reference.sop_instance)
        + failure_reason.map_or(0, |_| 10)
}

/// Appends a sequence of references (with a Failure Reason each when
/// given), with defined lengths, elements in ascending tag order.
fn sequence<'a>(
    out: &mut Vec<u8>,
    syntax: Syntax,
    tag: u32,
    items: impl Iterator<Item = (&'a Reference, Option<u16>)> + Clone,
) {
    let content: usize = items.clone().map(|(r, why)| 8 + item_len(r, why)).sum();
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    if syntax == Syntax::ExplicitLittle {
        out.extend_from_slice(b"SQ\0\0");
    }
    out.extend_from_slice(&(content as u32).to_le_bytes());
    for (reference, why) in items {
        out.extend_from_slice(&0xFFFEu16.to_le_bytes());
        out.extend_from_slice(&0xE000u16.to_le_bytes());
        out.extend_from_slice(&(item_len(reference, why) as u32).to_le_bytes());
        uid_element(out, syntax, TAG_REFERENCED_SOP_CLASS, &reference.sop_class);
        uid_element(
            out,
            syntax,
            TAG_REFERENCED_SOP_INSTANCE,
            &reference.sop_instance,
        );
        if let Some(why) = why {
            element(
                out,
                syntax,
                TAG_FAILURE_REASON,
                b"US",
                &why.to_le_bytes(),
                0,
            );
        }
    }
}

// ---- decoding ----

/// What a walk of a data set found of the elements of Annex J.
#[derive(Default)]
struct Found {
    transaction_uid: Option<Uid>,
    /// (0008,1199), each item with the Failure Reason it had (none should)
    referenced: Option<Vec<(Reference, Option<u16>)>>,
    /// (0008,1198)
    failed: Option<Vec<(Reference, Option<u16>)>>,
}

/// An element's header.
struct Header {
    tag: u32,
    /// the value length; [`UNDEFINED`] for an undefined length
    len: u32,
}

/// Reads elements from a slice.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    syntax: Syntax,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8], syntax: Syntax) -> Self {
        Cursor {
            bytes,
            at: 0,
            syntax,
        }
    }

    fn is_empty(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let taken = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(taken)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads an element header. Items and delimiters (group FFFE) have no
    /// VR in either syntax.
    fn header(&mut self) -> Result<Header, DecodeError> {
        let group = self.u16()?;
        let element = self.u16()?;
        let tag = (u32::from(group) << 16) | u32::from(element);
        if group == 0xFFFE || self.syntax == Syntax::ImplicitLittle {
            let len = self.u32()?;
            return Ok(Header { tag, len });
        }
        let vr = self.take(2)?;
        let vr = [vr[0], vr[1]];
        let len = if has_long_length(&vr) {
            self.take(2)?;
            self.u32()?
        } else {
            u32::from(self.u16()?)
        };
        Ok(Header { tag, len })
    }

    /// The value of an element of defined length.
    fn value(&mut self, header: &Header) -> Result<&'a [u8], DecodeError> {
        if header.len == UNDEFINED {
            return Err(DecodeError::Malformed(
                "undefined length on a plain element",
            ));
        }
        self.take(header.len as usize)
    }

    /// Skips the items of a sequence of undefined length, up to and
    /// including its Sequence Delimitation Item.
    fn skip_undefined_sequence(&mut self, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        loop {
            let header = self.header()?;
            match header.tag {
                TAG_SEQUENCE_DELIMITER => return Ok(()),
                TAG_ITEM if header.len == UNDEFINED => {
                    self.undefined_item(depth)?;
                }
                // Items of defined length, and the fragments of
                // encapsulated pixel data, are skipped whole.
                TAG_ITEM => {
                    self.take(header.len as usize)?;
                }
                _ => return Err(DecodeError::Malformed("element where an item was due")),
            }
        }
    }

    /// Reads an item of undefined length up to and including its Item
    /// Delimitation Item, skipping its elements; returns its content.
    fn undefined_item(&mut self, depth: usize) -> Result<&'a [u8], DecodeError> {
        let start = self.at;
        loop {
            let before = self.at;
            let header = self.header()?;
            match header.tag {
                TAG_ITEM_DELIMITER => return Ok(&self.bytes[start..before]),
                TAG_ITEM | TAG_SEQUENCE_DELIMITER => {
                    return Err(DecodeError::Malformed("item or delimiter inside an item"))
                }
                _ if header.len == UNDEFINED => self.skip_undefined_sequence(depth + 1)?,
                _ => {
                    self.take(header.len as usize)?;
                }
            }
        }
    }

    /// The contents of the items of a sequence whose header was just read
    /// (defined or undefined length, items of either).
    fn items(&mut self, header: &Header, depth: usize) -> Result<Vec<&'a [u8]>, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let mut items = Vec::new();
        if header.len == UNDEFINED {
            loop {
                let item = self.header()?;
                match item.tag {
                    TAG_SEQUENCE_DELIMITER => return Ok(items),
                    TAG_ITEM => items.push(self.item(&item, depth)?),
                    _ => return Err(DecodeError::Malformed("element where an item was due")),
                }
            }
        }
        let mut inner = Cursor::new(self.take(header.len as usize)?, self.syntax);
        while !inner.is_empty() {
            let item = inner.header()?;
            if item.tag != TAG_ITEM {
                return Err(DecodeError::Malformed("element where an item was due"));
            }
            items.push(inner.item(&item, depth)?);
        }
        Ok(items)
    }

    /// The content of an item whose header was just read.
    fn item(&mut self, header: &Header, depth: usize) -> Result<&'a [u8], DecodeError> {
        if header.len == UNDEFINED {
            self.undefined_item(depth)
        } else {
            self.take(header.len as usize)
        }
    }
}

/// True for the Explicit VRs with a 2-byte reserved field and a 4-byte
/// length (PS3.5 7.1.2).
fn has_long_length(vr: &[u8; 2]) -> bool {
    matches!(
        vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

/// Walks the top level of a data set: the Transaction UID and the two
/// sequences are taken, every other element is skipped.
fn walk(bytes: &[u8], syntax: Syntax) -> Result<Found, DecodeError> {
    if bytes.len() > MAX_DATA_SET {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let mut found = Found::default();
    let mut cursor = Cursor::new(bytes, syntax);
    while !cursor.is_empty() {
        let header = cursor.header()?;
        match header.tag {
            TAG_TRANSACTION_UID => {
                let value = cursor.value(&header)?;
                found.transaction_uid = Some(
                    Uid::from_padded(value)
                        .ok_or(DecodeError::Missing("Transaction UID (0008,1195)"))?,
                );
            }
            TAG_REFERENCED_SOP_SEQUENCE => {
                let items = cursor.items(&header, 1)?;
                found.referenced = Some(references(&items, syntax, "Referenced SOP Sequence")?);
            }
            TAG_FAILED_SOP_SEQUENCE => {
                let items = cursor.items(&header, 1)?;
                found.failed = Some(references(&items, syntax, "Failed SOP Sequence")?);
            }
            TAG_ITEM | TAG_ITEM_DELIMITER | TAG_SEQUENCE_DELIMITER => {
                return Err(DecodeError::Malformed(
                    "item or delimiter outside a sequence",
                ))
            }
            _ if header.len == UNDEFINED => cursor.skip_undefined_sequence(1)?,
            _ => {
                cursor.value(&header)?;
            }
        }
    }
    Ok(found)
}

/// The references in the items of a sequence.
fn references(
    items: &[&[u8]],
    syntax: Syntax,
    sequence: &'static str,
) -> Result<Vec<(Reference, Option<u16>)>, DecodeError> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let bad = |what| DecodeError::BadReference {
            sequence,
            item: i + 1,
            what,
        };
        let (mut class, mut instance, mut why) = (None, None, None);
        let mut cursor = Cursor::new(item, syntax);
        while !cursor.is_empty() {
            let header = cursor.header()?;
            match header.tag {
                TAG_REFERENCED_SOP_CLASS => class = Uid::from_padded(cursor.value(&header)?),
                TAG_REFERENCED_SOP_INSTANCE => instance = Uid::from_padded(cursor.value(&header)?),
                TAG_FAILURE_REASON => {
                    let value = cursor.value(&header)?;
                    why = Some(
                        value
                            .get(..2)
                            .map(|v| u16::from_le_bytes([v[0], v[1]]))
                            .ok_or(bad("Failure Reason (0008,1197)"))?,
                    );
                }
                TAG_ITEM | TAG_ITEM_DELIMITER | TAG_SEQUENCE_DELIMITER => {
                    return Err(DecodeError::Malformed("item or delimiter inside an item"))
                }
                _ if header.len == UNDEFINED => cursor.skip_undefined_sequence(2)?,
                _ => {
                    cursor.value(&header)?;
                }
            }
        }
        let reference = Reference {
            sop_class: class.ok_or(bad("Referenced SOP Class UID (0008,1150)"))?,
            sop_instance: instance.ok_or(bad("Referenced SOP Instance UID (0008,1155)"))?,
        };
        out.push((reference, why));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Uid {
        Uid::new(s).expect("valid UID")
    }

    fn r(class: &str, instance: &str) -> Reference {
        Reference {
            sop_class: u(class),
            sop_instance: u(instance),
        }
    }

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    const BOTH: [Syntax; 2] = [Syntax::ImplicitLittle, Syntax::ExplicitLittle];

    /// What the pydicom data sets below hold.
    fn expected_request() -> CommitmentRequest {
        CommitmentRequest {
            transaction_uid: u("1.2.3.4.5.6"),
            references: vec![r(CT, "1.2.3.4.100"), r(MR, "1.2.3.4.101.1")],
        }
    }

    fn expected_result() -> CommitmentResult {
        CommitmentResult {
            transaction_uid: u("1.2.3.4.5.6"),
            committed: vec![r(CT, "1.2.3.4.100")],
            failed: vec![(
                r(MR, "1.2.3.4.101.1"),
                failure_reason::NO_SUCH_OBJECT_INSTANCE,
            )],
        }
    }

    // Written by pydicom 3.0.2 (`write_dataset` on a DicomBytesIO): the
    // request also carries a Retrieve AE Title (0008,0054) and a
    // Referenced Performed Procedure Step Sequence (0008,1111), which are
    // skipped. The `_UNDEFINED` variants have every sequence and item of
    // undefined length, as dcmtk writes them.
    const PYDICOM_REQUEST_IMPLICIT: &[u8] = b"\x08\x00\x54\x00\x08\x00\x00\x00\x41\x52\x43\x48\x49\x56\x45\x20\x08\x00\x11\x11\x38\x00\x00\x00\xfe\xff\x00\xe0\x30\x00\x00\x00\x08\x00\x50\x11\x18\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x33\x2e\x31\x2e\x32\x2e\x33\x2e\x33\x00\x08\x00\x55\x11\x08\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x39\x00\x08\x00\x95\x11\x0c\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x35\x2e\x36\x00\x08\x00\x99\x11\x7e\x00\x00\x00\xfe\xff\x00\xe0\x36\x00\x00\x00\x08\x00\x50\x11\x1a\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x0c\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x30\x00\xfe\xff\x00\xe0\x38\x00\x00\x00\x08\x00\x50\x11\x1a\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x34\x00\x08\x00\x55\x11\x0e\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x31\x2e\x31\x00";
    const PYDICOM_REQUEST_EXPLICIT: &[u8] = b"\x08\x00\x54\x00\x41\x45\x08\x00\x41\x52\x43\x48\x49\x56\x45\x20\x08\x00\x11\x11\x53\x51\x00\x00\x38\x00\x00\x00\xfe\xff\x00\xe0\x30\x00\x00\x00\x08\x00\x50\x11\x55\x49\x18\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x33\x2e\x31\x2e\x32\x2e\x33\x2e\x33\x00\x08\x00\x55\x11\x55\x49\x08\x00\x31\x2e\x32\x2e\x33\x2e\x39\x00\x08\x00\x95\x11\x55\x49\x0c\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x35\x2e\x36\x00\x08\x00\x99\x11\x53\x51\x00\x00\x7e\x00\x00\x00\xfe\xff\x00\xe0\x36\x00\x00\x00\x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x55\x49\x0c\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x30\x00\xfe\xff\x00\xe0\x38\x00\x00\x00\x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x34\x00\x08\x00\x55\x11\x55\x49\x0e\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x31\x2e\x31\x00";
    const PYDICOM_RESULT_IMPLICIT: &[u8] = b"\x08\x00\x95\x11\x0c\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x35\x2e\x36\x00\x08\x00\x98\x11\x4a\x00\x00\x00\xfe\xff\x00\xe0\x42\x00\x00\x00\x08\x00\x50\x11\x1a\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x34\x00\x08\x00\x55\x11\x0e\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x31\x2e\x31\x00\x08\x00\x97\x11\x02\x00\x00\x00\x12\x01\x08\x00\x99\x11\x3e\x00\x00\x00\xfe\xff\x00\xe0\x36\x00\x00\x00\x08\x00\x50\x11\x1a\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x0c\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x30\x00";
    const PYDICOM_RESULT_EXPLICIT: &[u8] = b"\x08\x00\x95\x11\x55\x49\x0c\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x35\x2e\x36\x00\x08\x00\x98\x11\x53\x51\x00\x00\x4a\x00\x00\x00\xfe\xff\x00\xe0\x42\x00\x00\x00\x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x34\x00\x08\x00\x55\x11\x55\x49\x0e\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x31\x2e\x31\x00\x08\x00\x97\x11\x55\x53\x02\x00\x12\x01\x08\x00\x99\x11\x53\x51\x00\x00\x3e\x00\x00\x00\xfe\xff\x00\xe0\x36\x00\x00\x00\x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x55\x49\x0c\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x30\x00";
    const PYDICOM_REQUEST_IMPLICIT_UNDEFINED: &[u8] = b"\x08\x00\x54\x00\x08\x00\x00\x00\x41\x52\x43\x48\x49\x56\x45\x20\x08\x00\x11\x11\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x18\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x33\x2e\x31\x2e\x32\x2e\x33\x2e\x33\x00\x08\x00\x55\x11\x08\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x39\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00\x08\x00\x95\x11\x0c\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x35\x2e\x36\x00\x08\x00\x99\x11\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x1a\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x0c\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x30\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x1a\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x34\x00\x08\x00\x55\x11\x0e\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x31\x2e\x31\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00";
    const PYDICOM_REQUEST_EXPLICIT_UNDEFINED: &[u8] = b"\x08\x00\x54\x00\x41\x45\x08\x00\x41\x52\x43\x48\x49\x56\x45\x20\x08\x00\x11\x11\x53\x51\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x55\x49\x18\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x33\x2e\x31\x2e\x32\x2e\x33\x2e\x33\x00\x08\x00\x55\x11\x55\x49\x08\x00\x31\x2e\x32\x2e\x33\x2e\x39\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00\x08\x00\x95\x11\x55\x49\x0c\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x35\x2e\x36\x00\x08\x00\x99\x11\x53\x51\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x55\x49\x0c\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x30\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x34\x00\x08\x00\x55\x11\x55\x49\x0e\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x31\x2e\x31\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00";
    const PYDICOM_RESULT_IMPLICIT_UNDEFINED: &[u8] = b"\x08\x00\x95\x11\x0c\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x35\x2e\x36\x00\x08\x00\x98\x11\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x1a\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x34\x00\x08\x00\x55\x11\x0e\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x31\x2e\x31\x00\x08\x00\x97\x11\x02\x00\x00\x00\x12\x01\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00\x08\x00\x99\x11\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x1a\x00\x00\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x0c\x00\x00\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x30\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00";
    const PYDICOM_RESULT_EXPLICIT_UNDEFINED: &[u8] = b"\x08\x00\x95\x11\x55\x49\x0c\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x35\x2e\x36\x00\x08\x00\x98\x11\x53\x51\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x34\x00\x08\x00\x55\x11\x55\x49\x0e\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x31\x2e\x31\x00\x08\x00\x97\x11\x55\x53\x02\x00\x12\x01\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00\x08\x00\x99\x11\x53\x51\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x55\x49\x0c\x00\x31\x2e\x32\x2e\x33\x2e\x34\x2e\x31\x30\x30\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00";

    #[test]
    fn what_pydicom_writes_decodes_in_both_syntaxes_and_lengths() {
        let requests = [
            (PYDICOM_REQUEST_IMPLICIT, Syntax::ImplicitLittle),
            (PYDICOM_REQUEST_EXPLICIT, Syntax::ExplicitLittle),
            (PYDICOM_REQUEST_IMPLICIT_UNDEFINED, Syntax::ImplicitLittle),
            (PYDICOM_REQUEST_EXPLICIT_UNDEFINED, Syntax::ExplicitLittle),
        ];
        for (i, (bytes, syntax)) in requests.into_iter().enumerate() {
            assert_eq!(
                CommitmentRequest::decode(bytes, syntax),
                Ok(expected_request()),
                "request {i}"
            );
        }
        let results = [
            (PYDICOM_RESULT_IMPLICIT, Syntax::ImplicitLittle),
            (PYDICOM_RESULT_EXPLICIT, Syntax::ExplicitLittle),
            (PYDICOM_RESULT_IMPLICIT_UNDEFINED, Syntax::ImplicitLittle),
            (PYDICOM_RESULT_EXPLICIT_UNDEFINED, Syntax::ExplicitLittle),
        ];
        for (i, (bytes, syntax)) in results.into_iter().enumerate() {
            assert_eq!(
                CommitmentResult::decode(bytes, syntax),
                Ok(expected_result()),
                "result {i}"
            );
        }
    }

    #[test]
    fn a_result_is_encoded_byte_for_byte_as_pydicom_does() {
        let result = expected_result();
        assert_eq!(
            result.encode(Syntax::ImplicitLittle),
            PYDICOM_RESULT_IMPLICIT
        );
        assert_eq!(
            result.encode(Syntax::ExplicitLittle),
            PYDICOM_RESULT_EXPLICIT
        );
    }

    #[test]
    fn round_trips_in_both_syntaxes() {
        let longest = format!("1.{}", "2".repeat(62));
        let request = CommitmentRequest {
            transaction_uid: u("2.25.1"),
            references: vec![r(CT, "1.2.3"), r(MR, "1.2.34"), r(CT, &longest)],
        };
        let empty = CommitmentRequest {
            transaction_uid: u("2.25.2"),
            references: Vec::new(),
        };
        let all_good = CommitmentResult {
            transaction_uid: u("2.25.1"),
            committed: request.references.clone(),
            failed: Vec::new(),
        };
        let all_failed = CommitmentResult {
            transaction_uid: u("2.25.1"),
            committed: Vec::new(),
            failed: vec![
                (r(CT, "1.2.3"), failure_reason::PROCESSING_FAILURE),
                (r(MR, &longest), failure_reason::RESOURCE_LIMITATION),
            ],
        };
        for syntax in BOTH {
            for rq in [&request, &empty] {
                assert_eq!(
                    CommitmentRequest::decode(&rq.encode(syntax), syntax).as_ref(),
                    Ok(rq)
                );
            }
            for result in [&all_good, &all_failed, &expected_result()] {
                assert_eq!(
                    CommitmentResult::decode(&result.encode(syntax), syntax).as_ref(),
                    Ok(result)
                );
            }
        }
        assert_eq!(all_good.event_type(), EVENT_SUCCESSFUL);
        assert_eq!(all_failed.event_type(), EVENT_FAILURES_EXIST);
        assert_eq!(expected_result().event_type(), 2);
        // Nothing committed and nothing failed: a successful (empty) answer.
        let nothing = CommitmentResult {
            transaction_uid: u("2.25.3"),
            committed: Vec::new(),
            failed: Vec::new(),
        };
        assert_eq!(nothing.event_type(), 1);
        assert_eq!(
            CommitmentResult::decode(
                &nothing.encode(Syntax::ImplicitLittle),
                Syntax::ImplicitLittle
            ),
            Ok(nothing)
        );
    }

    /// Little-endian element bytes, written by hand.
    fn tag(out: &mut Vec<u8>, group: u16, element: u16) {
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
    }

    fn implicit(out: &mut Vec<u8>, group: u16, element: u16, value: &[u8]) {
        tag(out, group, element);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }

    fn undefined(out: &mut Vec<u8>, group: u16, element: u16) {
        tag(out, group, element);
        out.extend_from_slice(&UNDEFINED.to_le_bytes());
    }

    fn delimiter(out: &mut Vec<u8>, element: u16) {
        tag(out, 0xFFFE, element);
        out.extend_from_slice(&0u32.to_le_bytes());
    }

    #[test]
    fn hand_written_undefined_lengths_and_unknown_elements_are_taken() {
        // As dcmtk writes in Implicit VR: a private sequence of undefined
        // length (nesting another) before the Transaction UID, the
        // Referenced SOP Sequence of undefined length with one item of
        // undefined length and one of defined length, an unknown element
        // inside an item.
        let mut b = Vec::new();
        implicit(&mut b, 0x0008, 0x0054, b"ARCHIVE ");
        undefined(&mut b, 0x0009, 0x1010);
        undefined(&mut b, 0xFFFE, 0xE000);
        undefined(&mut b, 0x0009, 0x1011);
        undefined(&mut b, 0xFFFE, 0xE000);
        implicit(&mut b, 0x0010, 0x0010, b"DOE^J ");
        delimiter(&mut b, 0xE00D);
        delimiter(&mut b, 0xE0DD);
        delimiter(&mut b, 0xE00D);
        // A defined-length item among undefined ones.
        implicit(
            &mut b,
            0xFFFE,
            0xE000,
            b"\x10\x00\x20\x00\x02\x00\x00\x00ID",
        );
        delimiter(&mut b, 0xE0DD);
        implicit(&mut b, 0x0008, 0x1195, b"1.2.3.4.5.6\0");
        undefined(&mut b, 0x0008, 0x1199);
        undefined(&mut b, 0xFFFE, 0xE000);
        implicit(&mut b, 0x0008, 0x1150, b"1.2.840.10008.5.1.4.1.1.2\0");
        implicit(&mut b, 0x0008, 0x1155, b"1.2.3.4.100\0");
        implicit(&mut b, 0x0009, 0x0001, b"xy");
        delimiter(&mut b, 0xE00D);
        let mut item = Vec::new();
        implicit(&mut item, 0x0008, 0x1150, b"1.2.840.10008.5.1.4.1.1.4\0");
        implicit(&mut item, 0x0008, 0x1155, b"1.2.3.4.101.1 ");
        implicit(&mut b, 0xFFFE, 0xE000, &item);
        delimiter(&mut b, 0xE0DD);
        implicit(&mut b, 0x0040, 0xA170, b"");
        assert_eq!(
            CommitmentRequest::decode(&b, Syntax::ImplicitLittle),
            Ok(expected_request())
        );
    }

    #[test]
    fn bad_data_sets_are_typed_errors() {
        let good = expected_request().encode(Syntax::ImplicitLittle);
        // Truncated anywhere: an error, never a panic.
        for cut in 0..good.len() {
            let decoded = CommitmentRequest::decode(&good[..cut], Syntax::ImplicitLittle);
            assert!(decoded.is_err(), "cut at {cut}");
        }
        // Read in the wrong syntax: an error, not garbage.
        assert!(CommitmentRequest::decode(&good, Syntax::ExplicitLittle).is_err());

        let big = vec![0u8; MAX_DATA_SET + 1];
        assert_eq!(
            CommitmentRequest::decode(&big, Syntax::ImplicitLittle),
            Err(DecodeError::TooLarge(MAX_DATA_SET + 1))
        );

        let mut no_uid = Vec::new();
        implicit(&mut no_uid, 0x0008, 0x1199, b"");
        assert_eq!(
            CommitmentRequest::decode(&no_uid, Syntax::ImplicitLittle),
            Err(DecodeError::Missing("Transaction UID (0008,1195)"))
        );
        let mut no_sequence = Vec::new();
        implicit(&mut no_sequence, 0x0008, 0x1195, b"1.2\0");
        assert!(matches!(
            CommitmentRequest::decode(&no_sequence, Syntax::ImplicitLittle),
            Err(DecodeError::Missing(_))
        ));

        // A hostile instance UID in an item.
        let mut hostile = Vec::new();
        implicit(&mut hostile, 0x0008, 0x1195, b"1.2\0");
        let mut item = Vec::new();
        implicit(&mut item, 0x0008, 0x1150, b"1.2\0");
        implicit(&mut item, 0x0008, 0x1155, b"../../etc");
        let mut items = Vec::new();
        implicit(&mut items, 0xFFFE, 0xE000, &item);
        implicit(&mut hostile, 0x0008, 0x1199, &items);
        assert_eq!(
            CommitmentRequest::decode(&hostile, Syntax::ImplicitLittle),
            Err(DecodeError::BadReference {
                sequence: "Referenced SOP Sequence",
                item: 1,
                what: "Referenced SOP Instance UID (0008,1155)"
            })
        );

        // A failed item without its reason.
        let mut no_reason = Vec::new();
        implicit(&mut no_reason, 0x0008, 0x1195, b"1.2\0");
        let mut item = Vec::new();
        implicit(&mut item, 0x0008, 0x1150, b"1.2\0");
        implicit(&mut item, 0x0008, 0x1155, b"1.3\0");
        let mut items = Vec::new();
        implicit(&mut items, 0xFFFE, 0xE000, &item);
        implicit(&mut no_reason, 0x0008, 0x1198, &items);
        assert!(matches!(
            CommitmentResult::decode(&no_reason, Syntax::ImplicitLittle),
            Err(DecodeError::BadReference { item: 1, .. })
        ));

        // Nesting without end is bounded.
        let mut deep = Vec::new();
        for _ in 0..1000 {
            undefined(&mut deep, 0x0009, 0x1010);
            undefined(&mut deep, 0xFFFE, 0xE000);
        }
        assert_eq!(
            CommitmentRequest::decode(&deep, Syntax::ImplicitLittle),
            Err(DecodeError::TooDeep)
        );

        // A delimiter where none belongs.
        let mut stray = Vec::new();
        delimiter(&mut stray, 0xE0DD);
        assert!(matches!(
            CommitmentRequest::decode(&stray, Syntax::ImplicitLittle),
            Err(DecodeError::Malformed(_))
        ));
        // An item length beyond the sequence's.
        let mut long_item = Vec::new();
        implicit(&mut long_item, 0x0008, 0x1195, b"1.2\0");
        implicit(
            &mut long_item,
            0x0008,
            0x1199,
            b"\xfe\xff\x00\xe0\xff\x00\x00\x00",
        );
        assert_eq!(
            CommitmentRequest::decode(&long_item, Syntax::ImplicitLittle),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn syntaxes_by_uid() {
        assert_eq!(
            Syntax::of(crate::uid::IMPLICIT_VR_LE),
            Some(Syntax::ImplicitLittle)
        );
        assert_eq!(
            Syntax::of(crate::uid::EXPLICIT_VR_LE),
            Some(Syntax::ExplicitLittle)
        );
        assert_eq!(Syntax::of(crate::uid::EXPLICIT_VR_BE), None);
    }
}
