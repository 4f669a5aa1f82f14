//! DIMSE command sets (PS3.7 §9.3, §10.3 and §E): the small implicit-VR
//! little-endian data sets that announce each C-ECHO, C-STORE, C-FIND,
//! C-GET, C-MOVE and C-CANCEL, and the N-ACTION and N-EVENT-REPORT of
//! Storage Commitment.
//!
//! Command sets are decoded from and encoded into fixed-size buffers; the
//! UIDs they carry live in `heapless` strings, so a command costs no heap
//! allocation on the receive path.

use heapless::Vec as HVec;
use std::borrow::Cow;

use crate::ae::AeTitle;
use crate::uid::{self, Uid};

/// The command field values (0000,0100) this appliance speaks.
pub mod field {
    /// C-STORE-RQ
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE-RSP
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-ECHO-RQ
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO-RSP
    pub const C_ECHO_RSP: u16 = 0x8030;
    /// C-FIND-RQ
    pub const C_FIND_RQ: u16 = 0x0020;
    /// C-FIND-RSP
    pub const C_FIND_RSP: u16 = 0x8020;
    /// C-GET-RQ
    pub const C_GET_RQ: u16 = 0x0010;
    /// C-GET-RSP
    pub const C_GET_RSP: u16 = 0x8010;
    /// C-MOVE-RQ
    pub const C_MOVE_RQ: u16 = 0x0021;
    /// C-MOVE-RSP
    pub const C_MOVE_RSP: u16 = 0x8021;
    /// C-CANCEL-RQ
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
    /// N-EVENT-REPORT-RQ
    pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
    /// N-EVENT-REPORT-RSP
    pub const N_EVENT_REPORT_RSP: u16 = 0x8100;
    /// N-ACTION-RQ
    pub const N_ACTION_RQ: u16 = 0x0130;
    /// N-ACTION-RSP
    pub const N_ACTION_RSP: u16 = 0x8130;
}

/// DIMSE status codes (PS3.7 Annex C, PS3.4 Annex B) used here.
pub mod status {
    /// Success
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: SOP class not supported
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Refused: not authorized (PS3.7 C.5.x): a C-STORE from a peer whose
    /// allowlist entry does not grant storing
    pub const NOT_AUTHORIZED: u16 = 0x0124;
    /// Refused: Out of Resources (storage)
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: Data Set does not match SOP Class
    pub const DATA_SET_MISMATCH: u16 = 0xA900;
    /// Error: Cannot understand (used for an unusable SOP Instance UID)
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Warning: Coercion of Data Elements (the first warning status)
    pub const WARNING_FIRST: u16 = 0xB000;
    /// C-FIND: Pending, matches are continuing (optional keys supported)
    pub const PENDING: u16 = 0xFF00;
    /// C-FIND: Pending, but one or more optional keys were not supported
    pub const PENDING_WARNING: u16 = 0xFF01;
    /// Cancel: the operation was ended by a C-CANCEL-RQ
    pub const CANCEL: u16 = 0xFE00;
    /// C-FIND: Error: Identifier does not match SOP Class
    pub const IDENTIFIER_MISMATCH: u16 = 0xA900;
    /// C-FIND: Failed: Unable to process (the C000 family)
    pub const UNABLE_TO_PROCESS: u16 = 0xC000;
    /// C-STORE: Warning: Elements Discarded
    pub const ELEMENTS_DISCARDED: u16 = 0xB006;
    /// C-STORE: Warning: Data Set does not match SOP Class
    pub const DATA_SET_MISMATCH_WARNING: u16 = 0xB007;
    /// C-GET, C-MOVE: Refused: Out of Resources, unable to calculate the
    /// number of matches
    pub const UNABLE_TO_CALCULATE_MATCHES: u16 = 0xA701;
    /// C-GET, C-MOVE: Refused: Out of Resources, unable to perform
    /// sub-operations (also the final status when every sub-operation
    /// failed)
    pub const UNABLE_TO_PERFORM_SUB_OPERATIONS: u16 = 0xA702;
    /// C-MOVE: Refused: Move Destination unknown
    pub const MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
    /// C-GET, C-MOVE: Warning: sub-operations complete, one or more
    /// failures or warnings
    pub const SUB_OPERATIONS_WARNING: u16 = 0xB000;
    /// DIMSE-N: Failure: Processing failure (PS3.7 C.4.3)
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// DIMSE-N: Failure: No such SOP Instance (not the well-known instance
    /// of Storage Commitment)
    pub const NO_SUCH_SOP_INSTANCE: u16 = 0x0112;
    /// N-EVENT-REPORT: Failure: No such event type
    pub const NO_SUCH_EVENT_TYPE: u16 = 0x0113;
    /// DIMSE-N: Failure: Invalid object instance (a SOP Instance UID that
    /// is missing or not a UID)
    pub const INVALID_OBJECT_INSTANCE: u16 = 0x0117;
    /// DIMSE-N: Failure: No such SOP Class (the requested class is not the
    /// presentation context's)
    pub const NO_SUCH_SOP_CLASS: u16 = 0x0118;
    /// N-ACTION: Failure: No such action
    pub const NO_SUCH_ACTION: u16 = 0x0123;
    /// DIMSE-N: Failure: Resource limitation (an Action or Event
    /// Information larger than we take)
    pub const RESOURCE_LIMITATION: u16 = 0x0213;

    /// True for success and for the warning statuses, which mean "stored".
    pub fn is_stored(code: u16) -> bool {
        code == SUCCESS || (code & 0xF000) == 0xB000 || code == 0x0107 || code == 0x0116
    }
}

/// (0000,0800) Command Data Set Type value meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;

const TAG_AFFECTED_SOP_CLASS: u32 = 0x0000_0002;
const TAG_REQUESTED_SOP_CLASS: u32 = 0x0000_0003;
const TAG_COMMAND_FIELD: u32 = 0x0000_0100;
const TAG_MESSAGE_ID: u32 = 0x0000_0110;
const TAG_MESSAGE_ID_RESPONDED: u32 = 0x0000_0120;
const TAG_PRIORITY: u32 = 0x0000_0700;
const TAG_DATA_SET_TYPE: u32 = 0x0000_0800;
const TAG_STATUS: u32 = 0x0000_0900;
const TAG_ERROR_COMMENT: u32 = 0x0000_0902;
const TAG_AFFECTED_SOP_INSTANCE: u32 = 0x0000_1000;
const TAG_REQUESTED_SOP_INSTANCE: u32 = 0x0000_1001;
const TAG_EVENT_TYPE_ID: u32 = 0x0000_1002;
const TAG_ACTION_TYPE_ID: u32 = 0x0000_1008;
const TAG_MOVE_DESTINATION: u32 = 0x0000_0600;
const TAG_REMAINING: u32 = 0x0000_1020;
const TAG_COMPLETED: u32 = 0x0000_1021;
const TAG_FAILED: u32 = 0x0000_1022;
const TAG_WARNING: u32 = 0x0000_1023;
const TAG_MOVE_ORIGINATOR_AE: u32 = 0x0000_1030;
const TAG_MOVE_ORIGINATOR_MESSAGE_ID: u32 = 0x0000_1031;

/// Why a command set could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// An element header or value runs past the end of the command set.
    #[error("command set truncated")]
    Truncated,
    /// A required element is missing.
    #[error("command set lacks {0}")]
    Missing(&'static str),
    /// An element has the wrong length for its VR.
    #[error("command element ({0:04X},{1:04X}) has a bad length")]
    BadLength(u16, u16),
}

/// The sub-operation counts of a C-GET-RSP or C-MOVE-RSP, (0000,1020) to
/// (0000,1023), as they are on the wire: each is present or not (PS3.4
/// C.4.2.1.5, C.4.3.1.4: a pending or cancel response carries all four, a
/// final one all but Remaining, an immediate refusal none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubOperations {
    /// (0000,1020) Number of Remaining Sub-operations
    pub remaining: Option<u16>,
    /// (0000,1021) Number of Completed Sub-operations
    pub completed: Option<u16>,
    /// (0000,1022) Number of Failed Sub-operations
    pub failed: Option<u16>,
    /// (0000,1023) Number of Warning Sub-operations
    pub warning: Option<u16>,
}

/// Who asked for the C-MOVE that a C-STORE-RQ is a sub-operation of:
/// (0000,1030) Move Originator Application Entity Title and (0000,1031)
/// Move Originator Message ID (PS3.7 §9.1.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveOriginator {
    /// the C-MOVE requester's AE title
    pub ae_title: AeTitle,
    /// the Message ID of its C-MOVE-RQ
    pub message_id: u16,
}

/// The fields of a command set that the services spoken here use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    /// (0000,0100) Command Field
    pub command_field: u16,
    /// (0000,0110) Message ID, or for a response or a C-CANCEL-RQ (0000,0120)
    /// Message ID Being Responded To
    pub message_id: u16,
    /// (0000,0120) Message ID Being Responded To, when present (a
    /// C-CANCEL-RQ names the request it cancels with it)
    pub message_id_being_responded_to: Option<u16>,
    /// (0000,0700) Priority (0 medium, 1 high, 2 low; 0 when absent)
    pub priority: u16,
    /// (0000,0002) Affected SOP Class UID; `None` when absent or too long to be a UID
    pub sop_class: Option<Uid>,
    /// (0000,1000) Affected SOP Instance UID; `None` when absent or too long to be a UID
    pub sop_instance: Option<Uid>,
    /// True when the raw (0000,1000) value was present but is not a usable UID
    pub sop_instance_unusable: bool,
    /// (0000,0800) true when a data set follows the command
    pub has_data_set: bool,
    /// (0000,0900) Status, for responses
    pub status: Option<u16>,
    /// (0000,0902) Error Comment of a response, cut to 64 bytes (on a
    /// character boundary; bytes that are not UTF-8 replaced)
    pub error_comment: Option<heapless::String<MAX_COMMENT>>,
    /// (0000,0600) Move Destination of a C-MOVE-RQ; `None` when absent or
    /// not a valid AE title
    pub move_destination: Option<AeTitle>,
    /// (0000,1020) to (0000,1023), for C-GET and C-MOVE responses
    pub sub_operations: SubOperations,
    /// (0000,1030) Move Originator Application Entity Title of a
    /// C-STORE-RQ; `None` when absent or not a valid AE title
    pub move_originator_ae: Option<AeTitle>,
    /// (0000,1031) Move Originator Message ID of a C-STORE-RQ
    pub move_originator_message_id: Option<u16>,
    /// (0000,0003) Requested SOP Class UID of an N-ACTION-RQ; `None` when
    /// absent or not a valid UID
    pub requested_sop_class: Option<Uid>,
    /// (0000,1001) Requested SOP Instance UID of an N-ACTION-RQ; `None`
    /// when absent or not a valid UID
    pub requested_sop_instance: Option<Uid>,
    /// (0000,1002) Event Type ID of an N-EVENT-REPORT
    pub event_type_id: Option<u16>,
    /// (0000,1008) Action Type ID of an N-ACTION
    pub action_type_id: Option<u16>,
}

impl Command {
    /// Decodes an implicit-VR little-endian command set.
    pub fn decode(bytes: &[u8]) -> Result<Self, CommandError> {
        let mut cmd = Command::default();
        let mut seen_field = false;
        let mut seen_data_set_type = false;
        let mut rest = bytes;
        while !rest.is_empty() {
            let Some((head, tail)) = rest.split_first_chunk::<8>() else {
                return Err(CommandError::Truncated);
            };
            let group = u16::from_le_bytes([head[0], head[1]]);
            let element = u16::from_le_bytes([head[2], head[3]]);
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            if len > tail.len() {
                return Err(CommandError::Truncated);
            }
            let (value, tail) = tail.split_at(len);
            rest = tail;
            let tag = (u32::from(group) << 16) | u32::from(element);
            let us = || -> Result<u16, CommandError> {
                value
                    .get(..2)
                    .map(|v| u16::from_le_bytes([v[0], v[1]]))
                    .ok_or(CommandError::BadLength(group, element))
            };
            match tag {
                TAG_COMMAND_FIELD => {
                    cmd.command_field = us()?;
                    seen_field = true;
                }
                TAG_MESSAGE_ID => cmd.message_id = us()?,
                TAG_MESSAGE_ID_RESPONDED => {
                    cmd.message_id = us()?;
                    cmd.message_id_being_responded_to = Some(cmd.message_id);
                }
                TAG_PRIORITY => cmd.priority = us()?,
                TAG_DATA_SET_TYPE => {
                    cmd.has_data_set = us()? != NO_DATA_SET;
                    seen_data_set_type = true;
                }
                TAG_STATUS => cmd.status = Some(us()?),
                TAG_ERROR_COMMENT => cmd.error_comment = Some(comment_of(value)),
                TAG_MOVE_DESTINATION => cmd.move_destination = ae_of(value),
                TAG_REMAINING => cmd.sub_operations.remaining = Some(us()?),
                TAG_COMPLETED => cmd.sub_operations.completed = Some(us()?),
                TAG_FAILED => cmd.sub_operations.failed = Some(us()?),
                TAG_WARNING => cmd.sub_operations.warning = Some(us()?),
                TAG_MOVE_ORIGINATOR_AE => cmd.move_originator_ae = ae_of(value),
                TAG_MOVE_ORIGINATOR_MESSAGE_ID => cmd.move_originator_message_id = Some(us()?),
                TAG_AFFECTED_SOP_CLASS => cmd.sop_class = Uid::from_padded(value),
                TAG_REQUESTED_SOP_CLASS => cmd.requested_sop_class = Uid::from_padded(value),
                TAG_REQUESTED_SOP_INSTANCE => cmd.requested_sop_instance = Uid::from_padded(value),
                TAG_EVENT_TYPE_ID => cmd.event_type_id = Some(us()?),
                TAG_ACTION_TYPE_ID => cmd.action_type_id = Some(us()?),
                TAG_AFFECTED_SOP_INSTANCE => {
                    cmd.sop_instance = Uid::from_padded(value);
                    cmd.sop_instance_unusable = cmd.sop_instance.is_none();
                }
                _ => {}
            }
        }
        if !seen_field {
            return Err(CommandError::Missing("Command Field (0000,0100)"));
        }
        if !seen_data_set_type {
            return Err(CommandError::Missing("Command Data Set Type (0000,0800)"));
        }
        Ok(cmd)
    }

    /// The Move Originator of a C-STORE-RQ, when both of its fields are
    /// present and valid.
    pub fn move_originator(&self) -> Option<MoveOriginator> {
        Some(MoveOriginator {
            ae_title: self.move_originator_ae.clone()?,
            message_id: self.move_originator_message_id?,
        })
    }
}

/// An AE value (padded with spaces) as a valid AE title, if it is one.
fn ae_of(value: &[u8]) -> Option<AeTitle> {
    let text = std::str::from_utf8(value).ok()?;
    AeTitle::new(text.trim_end_matches(['\0', ' '])).ok()
}

/// An Error Comment value as text of at most [`MAX_COMMENT`] bytes: what a
/// peer wrote is shown, never refused (it is for people).
fn comment_of(value: &[u8]) -> heapless::String<MAX_COMMENT> {
    let text = String::from_utf8_lossy(value);
    let text = text.trim_matches(['\0', ' ']);
    let mut out = heapless::String::new();
    for c in text.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}

/// The capacity of an encoded command set. The largest we build is an
/// N-ACTION-RSP or N-EVENT-REPORT-RSP: the group length (12 bytes), two
/// UIDs of at most 64 bytes and a comment of at most 64 (8 + 64 each), and
/// four US elements (10 each): 268 bytes. (A C-STORE-RSP is 258, a
/// C-MOVE-RSP with a comment and all four counts 236, a C-STORE-RQ with
/// the Move Originator fields 230.) The inputs are typed ([`Uid`] holds
/// at most 64 bytes, comments are cut to 64), so no command can outgrow
/// the buffer; the tests `the_largest_command_fits` and
/// `n_commands_round_trip` build the largest ones.
pub const COMMAND_CAPACITY: usize = 512;

/// An encoded command set, in a fixed buffer.
pub type EncodedCommand = HVec<u8, COMMAND_CAPACITY>;

/// Builds command sets in the fixed buffer, group length first.
struct Encoder {
    out: EncodedCommand,
}

impl Encoder {
    fn new() -> Self {
        let mut out = EncodedCommand::new();
        // Placeholder for (0000,0000) UL, patched in `finish`.
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0])
            .unwrap_or_else(|_| unreachable!("12 bytes fit in {COMMAND_CAPACITY}"));
        Encoder { out }
    }

    /// Appends one element. Only called with values of bounded length
    /// (typed UIDs, cut comments, US values): see [`COMMAND_CAPACITY`].
    fn element(&mut self, tag: u32, value: &[u8]) {
        let pad = value.len() % 2;
        let len = (value.len() + pad) as u32;
        let mut head = [0u8; 8];
        head[..2].copy_from_slice(&((tag >> 16) as u16).to_le_bytes());
        head[2..4].copy_from_slice(&(tag as u16).to_le_bytes());
        head[4..].copy_from_slice(&len.to_le_bytes());
        // UIDs are padded with NUL, text (comments, AE titles) with a space.
        let fill = match tag {
            TAG_ERROR_COMMENT | TAG_MOVE_DESTINATION | TAG_MOVE_ORIGINATOR_AE => b' ',
            _ => 0,
        };
        let fits = self.out.extend_from_slice(&head).is_ok()
            && self.out.extend_from_slice(value).is_ok()
            && (pad == 0 || self.out.push(fill).is_ok());
        assert!(fits, "command set outgrew {COMMAND_CAPACITY} bytes");
    }

    fn uid(&mut self, tag: u32, value: &Uid) {
        self.element(tag, value.as_str().as_bytes());
    }

    fn us(&mut self, tag: u32, value: u16) {
        self.element(tag, &value.to_le_bytes());
    }

    fn ae(&mut self, tag: u32, value: &AeTitle) {
        self.element(tag, value.as_str().as_bytes());
    }

    fn counts(&mut self, counts: &SubOperations) {
        for (tag, value) in [
            (TAG_REMAINING, counts.remaining),
            (TAG_COMPLETED, counts.completed),
            (TAG_FAILED, counts.failed),
            (TAG_WARNING, counts.warning),
        ] {
            if let Some(value) = value {
                self.us(tag, value);
            }
        }
    }

    fn finish(mut self) -> EncodedCommand {
        let group_len = (self.out.len() - 12) as u32;
        self.out[8..12].copy_from_slice(&group_len.to_le_bytes());
        self.out
    }
}

/// The Verification SOP Class as a typed UID.
fn verification() -> Uid {
    Uid::new(uid::VERIFICATION).unwrap_or_else(|| unreachable!("a valid constant UID"))
}

/// Encodes a C-ECHO-RQ.
pub fn echo_rq(message_id: u16) -> EncodedCommand {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, &verification());
    e.us(TAG_COMMAND_FIELD, field::C_ECHO_RQ);
    e.us(TAG_MESSAGE_ID, message_id);
    e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
    e.finish()
}

/// Encodes a C-ECHO-RSP.
pub fn echo_rsp(message_id: u16, status_code: u16) -> EncodedCommand {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, &verification());
    e.us(TAG_COMMAND_FIELD, field::C_ECHO_RSP);
    e.us(TAG_MESSAGE_ID_RESPONDED, message_id);
    e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
    e.us(TAG_STATUS, status_code);
    e.finish()
}

/// Encodes a C-STORE-RQ (medium priority, a data set follows).
pub fn store_rq(message_id: u16, sop_class: &Uid, sop_instance: &Uid) -> EncodedCommand {
    store_rq_with(message_id, sop_class, sop_instance, 0, None)
}

/// Encodes a C-STORE-RQ with a priority and, for a sub-operation of a
/// C-MOVE, the Move Originator fields (a data set follows).
pub fn store_rq_with(
    message_id: u16,
    sop_class: &Uid,
    sop_instance: &Uid,
    priority: u16,
    move_originator: Option<&MoveOriginator>,
) -> EncodedCommand {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, sop_class);
    e.us(TAG_COMMAND_FIELD, field::C_STORE_RQ);
    e.us(TAG_MESSAGE_ID, message_id);
    e.us(TAG_PRIORITY, priority);
    e.us(TAG_DATA_SET_TYPE, 0x0000);
    e.uid(TAG_AFFECTED_SOP_INSTANCE, sop_instance);
    if let Some(originator) = move_originator {
        e.ae(TAG_MOVE_ORIGINATOR_AE, &originator.ae_title);
        e.us(TAG_MOVE_ORIGINATOR_MESSAGE_ID, originator.message_id);
    }
    e.finish()
}

/// Encodes a C-GET-RQ (an identifier data set follows).
pub fn get_rq(message_id: u16, sop_class: &Uid, priority: u16) -> EncodedCommand {
    query_rq(field::C_GET_RQ, message_id, sop_class, priority).finish()
}

/// The fields a C-FIND-RQ, C-GET-RQ and C-MOVE-RQ share, ready for more.
fn query_rq(command_field: u16, message_id: u16, sop_class: &Uid, priority: u16) -> Encoder {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, sop_class);
    e.us(TAG_COMMAND_FIELD, command_field);
    e.us(TAG_MESSAGE_ID, message_id);
    e.us(TAG_PRIORITY, priority);
    e.us(TAG_DATA_SET_TYPE, 0x0000);
    e
}

/// Encodes a C-MOVE-RQ to `destination` (an identifier data set follows).
pub fn move_rq(
    message_id: u16,
    sop_class: &Uid,
    priority: u16,
    destination: &AeTitle,
) -> EncodedCommand {
    // In tag order: Move Destination (0000,0600) comes before Priority.
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, sop_class);
    e.us(TAG_COMMAND_FIELD, field::C_MOVE_RQ);
    e.us(TAG_MESSAGE_ID, message_id);
    e.ae(TAG_MOVE_DESTINATION, destination);
    e.us(TAG_PRIORITY, priority);
    e.us(TAG_DATA_SET_TYPE, 0x0000);
    e.finish()
}

/// Encodes a C-GET-RSP: pending, final or refusal, with the counts that
/// are present in `counts`, an identifier following (`with_identifier`:
/// the Failed SOP Instance UID List) or not, and an Error Comment (made to
/// fit by [`fit_comment`]).
pub fn get_rsp(
    message_id: u16,
    sop_class: &Uid,
    status_code: u16,
    counts: &SubOperations,
    with_identifier: bool,
    comment: Option<&str>,
) -> EncodedCommand {
    retrieve_rsp(
        field::C_GET_RSP,
        message_id,
        sop_class,
        status_code,
        counts,
        with_identifier,
        comment,
    )
}

/// Encodes a C-MOVE-RSP, as [`get_rsp`] does a C-GET-RSP.
pub fn move_rsp(
    message_id: u16,
    sop_class: &Uid,
    status_code: u16,
    counts: &SubOperations,
    with_identifier: bool,
    comment: Option<&str>,
) -> EncodedCommand {
    retrieve_rsp(
        field::C_MOVE_RSP,
        message_id,
        sop_class,
        status_code,
        counts,
        with_identifier,
        comment,
    )
}

fn retrieve_rsp(
    command_field: u16,
    message_id: u16,
    sop_class: &Uid,
    status_code: u16,
    counts: &SubOperations,
    with_identifier: bool,
    comment: Option<&str>,
) -> EncodedCommand {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, sop_class);
    e.us(TAG_COMMAND_FIELD, command_field);
    e.us(TAG_MESSAGE_ID_RESPONDED, message_id);
    e.us(
        TAG_DATA_SET_TYPE,
        if with_identifier { 0x0000 } else { NO_DATA_SET },
    );
    e.us(TAG_STATUS, status_code);
    if let Some(comment) = comment {
        e.element(TAG_ERROR_COMMENT, fit_comment(comment).as_bytes());
    }
    e.counts(counts);
    e.finish()
}

/// Encodes a C-FIND-RQ (an identifier data set follows).
pub fn find_rq(message_id: u16, sop_class: &Uid, priority: u16) -> EncodedCommand {
    query_rq(field::C_FIND_RQ, message_id, sop_class, priority).finish()
}

/// Encodes a C-FIND-RSP: a pending one (`with_identifier`, an identifier
/// data set follows) or the final one, whose failure status may carry an
/// Error Comment (made to fit by [`fit_comment`]).
pub fn find_rsp(
    message_id: u16,
    sop_class: &Uid,
    status_code: u16,
    with_identifier: bool,
    comment: Option<&str>,
) -> EncodedCommand {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, sop_class);
    e.us(TAG_COMMAND_FIELD, field::C_FIND_RSP);
    e.us(TAG_MESSAGE_ID_RESPONDED, message_id);
    e.us(
        TAG_DATA_SET_TYPE,
        if with_identifier { 0x0000 } else { NO_DATA_SET },
    );
    e.us(TAG_STATUS, status_code);
    if let Some(comment) = comment {
        e.element(TAG_ERROR_COMMENT, fit_comment(comment).as_bytes());
    }
    e.finish()
}

/// Encodes a C-CANCEL-RQ for the request `message_id`.
pub fn cancel_rq(message_id: u16) -> EncodedCommand {
    let mut e = Encoder::new();
    e.us(TAG_COMMAND_FIELD, field::C_CANCEL_RQ);
    e.us(TAG_MESSAGE_ID_RESPONDED, message_id);
    e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
    e.finish()
}

/// Encodes an N-ACTION-RQ (PS3.7 10.3.4): the action `action_type_id` on
/// the instance `sop_instance` of `sop_class` (Requested SOP Class and
/// Instance UIDs); the Action Information data set follows.
pub fn n_action_rq(
    message_id: u16,
    sop_class: &Uid,
    sop_instance: &Uid,
    action_type_id: u16,
) -> EncodedCommand {
    let request = NRequest {
        command_field: field::N_ACTION_RQ,
        class_tag: TAG_REQUESTED_SOP_CLASS,
        instance_tag: TAG_REQUESTED_SOP_INSTANCE,
        type_tag: TAG_ACTION_TYPE_ID,
    };
    request.encode(message_id, sop_class, sop_instance, action_type_id)
}

/// Encodes an N-ACTION-RSP (PS3.7 10.3.4) without an Action Reply. The
/// Affected SOP Instance UID is left out when the request named no usable
/// one (it is optional in the response); `comment` becomes the Error
/// Comment of a failure, made to fit by [`fit_comment`].
pub fn n_action_rsp(
    message_id: u16,
    sop_class: &Uid,
    sop_instance: Option<&Uid>,
    action_type_id: Option<u16>,
    status_code: u16,
    comment: Option<&str>,
) -> EncodedCommand {
    n_response(
        field::N_ACTION_RSP,
        TAG_ACTION_TYPE_ID,
        message_id,
        sop_class,
        sop_instance,
        action_type_id,
        status_code,
        comment,
    )
}

/// Encodes an N-EVENT-REPORT-RQ (PS3.7 10.3.1): the event
/// `event_type_id` of the instance `sop_instance` of `sop_class`; the
/// Event Information data set follows.
pub fn n_event_report_rq(
    message_id: u16,
    sop_class: &Uid,
    sop_instance: &Uid,
    event_type_id: u16,
) -> EncodedCommand {
    let request = NRequest {
        command_field: field::N_EVENT_REPORT_RQ,
        class_tag: TAG_AFFECTED_SOP_CLASS,
        instance_tag: TAG_AFFECTED_SOP_INSTANCE,
        type_tag: TAG_EVENT_TYPE_ID,
    };
    request.encode(message_id, sop_class, sop_instance, event_type_id)
}

/// Encodes an N-EVENT-REPORT-RSP (PS3.7 10.3.1) without an Event Reply.
/// The Affected SOP Instance UID and Event Type ID are left out when the
/// request had no usable one; `comment` becomes the Error Comment of a
/// failure, made to fit by [`fit_comment`].
pub fn n_event_report_rsp(
    message_id: u16,
    sop_class: &Uid,
    sop_instance: Option<&Uid>,
    event_type_id: Option<u16>,
    status_code: u16,
    comment: Option<&str>,
) -> EncodedCommand {
    n_response(
        field::N_EVENT_REPORT_RSP,
        TAG_EVENT_TYPE_ID,
        message_id,
        sop_class,
        sop_instance,
        event_type_id,
        status_code,
        comment,
    )
}

/// What tells the DIMSE-N requests with a data set apart: N-ACTION names
/// the Requested SOP Class and Instance and an Action Type, N-EVENT-REPORT
/// the Affected ones and an Event Type, in the same places.
struct NRequest {
    command_field: u16,
    class_tag: u32,
    instance_tag: u32,
    type_tag: u32,
}

impl NRequest {
    fn encode(
        &self,
        message_id: u16,
        sop_class: &Uid,
        sop_instance: &Uid,
        type_id: u16,
    ) -> EncodedCommand {
        let mut e = Encoder::new();
        e.uid(self.class_tag, sop_class);
        e.us(TAG_COMMAND_FIELD, self.command_field);
        e.us(TAG_MESSAGE_ID, message_id);
        // a data set follows
        e.us(TAG_DATA_SET_TYPE, 0x0000);
        e.uid(self.instance_tag, sop_instance);
        e.us(self.type_tag, type_id);
        e.finish()
    }
}

/// An N-ACTION-RSP or N-EVENT-REPORT-RSP without a reply data set; the
/// Action or Event Type ID goes under `type_tag`.
#[allow(clippy::too_many_arguments)]
fn n_response(
    command_field: u16,
    type_tag: u32,
    message_id: u16,
    sop_class: &Uid,
    sop_instance: Option<&Uid>,
    type_id: Option<u16>,
    status_code: u16,
    comment: Option<&str>,
) -> EncodedCommand {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, sop_class);
    e.us(TAG_COMMAND_FIELD, command_field);
    e.us(TAG_MESSAGE_ID_RESPONDED, message_id);
    e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
    e.us(TAG_STATUS, status_code);
    if let Some(comment) = comment {
        e.element(TAG_ERROR_COMMENT, fit_comment(comment).as_bytes());
    }
    if let Some(instance) = sop_instance {
        e.uid(TAG_AFFECTED_SOP_INSTANCE, instance);
    }
    if let Some(type_id) = type_id {
        e.us(type_tag, type_id);
    }
    e.finish()
}

/// The longest Error Comment (0000,0902): its VR, LO, allows 64 characters.
pub const MAX_COMMENT: usize = 64;

/// A failure reason made to fit the Error Comment without being cut in the
/// middle of a word or a path: what the sender prints is what an operator
/// reads. In order, until it fits: paths are shortened to their last
/// component (`.../name`), paths are left out, and the text is cut after
/// its last whole word, marked with `...`. The full reason stays in the
/// receiver's own log.
pub fn fit_comment(reason: &str) -> Cow<'_, str> {
    if reason.len() <= MAX_COMMENT {
        return Cow::Borrowed(reason);
    }
    // A path starts with '/', './' or '../' (after an opening quote or
    // parenthesis): "Input/output" is a word.
    let is_path = |word: &&str| {
        let word = word.trim_start_matches(['"', '\'', '(', '[']);
        word.starts_with('/') || word.starts_with("./") || word.starts_with("../")
    };
    // The text before a path's first '/' (a quote, say) is kept.
    let short_path = |word: &str| match (word.find('/'), word.rfind('/')) {
        (Some(first), Some(last)) if last + 1 < word.len() => {
            format!("{}.../{}", &word[..first], &word[last + 1..])
        }
        _ => word.to_string(),
    };
    let words: Vec<&str> = reason.split_whitespace().collect();
    let shortened = words
        .iter()
        .map(|w| {
            if is_path(w) {
                short_path(w)
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    if shortened.len() <= MAX_COMMENT {
        return Cow::Owned(shortened);
    }
    let without_paths = words
        .iter()
        .filter(|w| !is_path(w))
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if without_paths.len() <= MAX_COMMENT {
        return Cow::Owned(without_paths);
    }
    let budget = MAX_COMMENT - "...".len();
    let mut kept = String::new();
    for word in without_paths.split(' ') {
        let more = if kept.is_empty() { 0 } else { 1 } + word.len();
        if kept.len() + more > budget {
            break;
        }
        if !kept.is_empty() {
            kept.push(' ');
        }
        kept.push_str(word);
    }
    if kept.is_empty() {
        // One word longer than the whole comment: cut it (on a character
        // boundary), as there is no better place.
        let cut = (0..=budget)
            .rev()
            .find(|&i| without_paths.is_char_boundary(i))
            .unwrap_or(0);
        kept.push_str(&without_paths[..cut]);
    }
    kept.push_str("...");
    Cow::Owned(kept)
}

/// Encodes a C-STORE-RSP. `comment` becomes the Error Comment (0000,0902)
/// of a failure status, made to fit its 64 characters by [`fit_comment`].
pub fn store_rsp(
    message_id: u16,
    sop_class: &Uid,
    sop_instance: &Uid,
    status_code: u16,
    comment: Option<&str>,
) -> EncodedCommand {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, sop_class);
    e.us(TAG_COMMAND_FIELD, field::C_STORE_RSP);
    e.us(TAG_MESSAGE_ID_RESPONDED, message_id);
    e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
    e.us(TAG_STATUS, status_code);
    if let Some(comment) = comment {
        e.element(TAG_ERROR_COMMENT, fit_comment(comment).as_bytes());
    }
    e.uid(TAG_AFFECTED_SOP_INSTANCE, sop_instance);
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Uid {
        Uid::new(s).expect("valid UID")
    }

    /// The tags of an encoded command set, after its group length.
    fn tags(command: &[u8]) -> Vec<u32> {
        let mut tags = Vec::new();
        let mut at = 0;
        while at + 8 <= command.len() {
            let group = u16::from_le_bytes([command[at], command[at + 1]]);
            let element = u16::from_le_bytes([command[at + 2], command[at + 3]]);
            let len = u32::from_le_bytes([
                command[at + 4],
                command[at + 5],
                command[at + 6],
                command[at + 7],
            ]) as usize;
            tags.push((u32::from(group) << 16) | u32::from(element));
            at += 8 + len;
        }
        assert_eq!(at, command.len(), "elements end where the command set does");
        tags
    }

    #[test]
    fn every_encoder_writes_its_elements_in_ascending_tag_order() {
        let class = u("1.2.840.10008.5.1.4.1.2.2.2");
        let instance = u("1.2.3.4.5");
        let ae = AeTitle::new("DEST").expect("valid AE title");
        let originator = MoveOriginator {
            ae_title: ae.clone(),
            message_id: 9,
        };
        let counts = SubOperations {
            remaining: Some(1),
            completed: Some(2),
            failed: Some(3),
            warning: Some(4),
        };
        let encoded = [
            ("echo_rq", echo_rq(1)),
            ("echo_rsp", echo_rsp(1, 0)),
            ("store_rq", store_rq(1, &class, &instance)),
            (
                "store_rq_with",
                store_rq_with(1, &class, &instance, 0, Some(&originator)),
            ),
            (
                "store_rsp",
                store_rsp(1, &class, &instance, 0xA700, Some("full")),
            ),
            ("find_rq", find_rq(1, &class, 0)),
            ("find_rsp", find_rsp(1, &class, 0xC000, false, Some("bad"))),
            ("get_rq", get_rq(1, &class, 0)),
            (
                "get_rsp",
                get_rsp(1, &class, 0xB000, &counts, true, Some("some")),
            ),
            ("move_rq", move_rq(1, &class, 0, &ae)),
            (
                "move_rsp",
                move_rsp(1, &class, 0xB000, &counts, true, Some("some")),
            ),
            ("cancel_rq", cancel_rq(1)),
            ("n_action_rq", n_action_rq(1, &class, &instance, 1)),
            (
                "n_action_rsp",
                n_action_rsp(1, &class, Some(&instance), Some(1), 0x0110, Some("no")),
            ),
            (
                "n_event_report_rq",
                n_event_report_rq(1, &class, &instance, 2),
            ),
            (
                "n_event_report_rsp",
                n_event_report_rsp(1, &class, Some(&instance), Some(2), 0x0110, Some("no")),
            ),
        ];
        for (name, command) in &encoded {
            let tags = tags(command);
            assert_eq!(tags[0], 0x0000_0000, "{name}: group length first");
            assert!(
                tags.windows(2).all(|w| w[0] < w[1]),
                "{name}: tags out of order: {tags:08X?}"
            );
        }
    }

    #[test]
    fn store_round_trip() {
        let rq = store_rq(7, &u("1.2.840.10008.5.1.4.1.1.2"), &u("1.2.3.4.5"));
        let cmd = Command::decode(&rq).expect("decodes");
        assert_eq!(cmd.command_field, field::C_STORE_RQ);
        assert_eq!(cmd.message_id, 7);
        assert!(cmd.has_data_set);
        assert_eq!(
            cmd.sop_class.as_ref().map(|u| u.as_str()),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        assert_eq!(
            cmd.sop_instance.as_ref().map(|u| u.as_str()),
            Some("1.2.3.4.5")
        );
        // The group length counts every byte after its own element.
        let group_len = u32::from_le_bytes([rq[8], rq[9], rq[10], rq[11]]) as usize;
        assert_eq!(group_len, rq.len() - 12);

        let rsp = store_rsp(7, &u("1.2.3"), &u("1.2.3.4"), 0xA700, Some("disk full"));
        let cmd = Command::decode(&rsp).expect("decodes");
        assert_eq!(cmd.command_field, field::C_STORE_RSP);
        assert_eq!(cmd.status, Some(0xA700));
        assert!(!cmd.has_data_set);
    }

    #[test]
    fn echo_round_trip() {
        let cmd = Command::decode(&echo_rq(1)).expect("decodes");
        assert_eq!(cmd.command_field, field::C_ECHO_RQ);
        assert!(!cmd.has_data_set);
        let cmd = Command::decode(&echo_rsp(1, 0)).expect("decodes");
        assert_eq!(cmd.status, Some(0));
    }

    #[test]
    fn malformed_commands_are_errors() {
        assert_eq!(Command::decode(&[1, 2, 3]), Err(CommandError::Truncated));
        let mut rq = store_rq(1, &u("1.2"), &u("1.2"));
        rq.truncate(rq.len() - 1);
        assert_eq!(Command::decode(&rq), Err(CommandError::Truncated));
        // A command without a command field.
        assert!(matches!(
            Command::decode(&[0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]),
            Err(CommandError::Missing(_))
        ));
    }

    #[test]
    fn hostile_instance_uid_is_flagged() {
        // A peer is not bound by our types: build the command by hand.
        let mut e = Encoder::new();
        e.uid(TAG_AFFECTED_SOP_CLASS, &u("1.2.840.10008.5.1.4.1.1.2"));
        e.us(TAG_COMMAND_FIELD, field::C_STORE_RQ);
        e.us(TAG_MESSAGE_ID, 1);
        e.us(TAG_DATA_SET_TYPE, 0);
        e.element(TAG_AFFECTED_SOP_INSTANCE, b"../../etc/passwd");
        let cmd = Command::decode(&e.finish()).expect("decodes");
        assert!(cmd.sop_instance.is_none());
        assert!(cmd.sop_instance_unusable);
    }

    #[test]
    fn long_comment_is_cut_to_lo_length() {
        let long = "x".repeat(200);
        let rsp = store_rsp(1, &u("1.2"), &u("1.2"), 0xA700, Some(&long));
        assert!(rsp.len() < 300);
    }

    #[test]
    fn a_long_reason_is_never_cut_in_a_word_or_a_path() {
        assert_eq!(fit_comment("disk full"), "disk full");
        // tempfile's error for a store that cannot be written.
        let reason = "creating temp file: Permission denied (os error 13) at path \
                      \"/reserve/playground/pacs/.incoming/.tmpAbC123\"";
        assert_eq!(
            fit_comment(reason),
            "creating temp file: Permission denied (os error 13) at path"
        );
        let reason = "writing data set: Input/output error (os error 5) /var/lib/minipacs/x.tmp";
        assert_eq!(
            fit_comment(reason),
            "writing data set: Input/output error (os error 5) .../x.tmp"
        );
        let prose = "word ".repeat(30);
        let fitted = fit_comment(&prose);
        assert!(
            fitted.len() <= MAX_COMMENT && fitted.ends_with("word..."),
            "{fitted}"
        );
        let one_word = "x".repeat(200);
        assert_eq!(fit_comment(&one_word).len(), MAX_COMMENT);
        // What the sender decodes is the fitted text.
        let rsp = store_rsp(1, &u("1.2"), &u("1.2"), 0xA700, Some(reason));
        let at = rsp
            .windows(b"writing".len())
            .position(|w| w == b"writing")
            .expect("comment encoded");
        assert!(
            rsp[at..].starts_with(b"writing data set: Input/output error (os error 5) .../x.tmp")
        );
    }

    #[test]
    fn the_largest_command_fits() {
        let longest = u(&format!("1.{}", "2".repeat(62)));
        assert_eq!(longest.as_str().len(), 64);
        // A comment of multi-byte characters is cut on a character boundary.
        let comment = "é".repeat(100);
        let rsp = store_rsp(u16::MAX, &longest, &longest, 0xA700, Some(&comment));
        assert!(rsp.len() <= COMMAND_CAPACITY);
        let cmd = Command::decode(&rsp).expect("decodes");
        assert_eq!(cmd.sop_instance.as_ref(), Some(&longest));
        assert_eq!(cmd.status, Some(0xA700));
        let rq = store_rq(u16::MAX, &longest, &longest);
        assert_eq!(
            Command::decode(&rq).map(|c| c.sop_class),
            Ok(Some(longest.clone()))
        );
        let rsp = find_rsp(u16::MAX, &longest, 0xC000, false, Some(&comment));
        assert!(rsp.len() <= COMMAND_CAPACITY);
        let all = Some(u16::MAX);
        let counts = SubOperations {
            remaining: all,
            completed: all,
            failed: all,
            warning: all,
        };
        let rsp = move_rsp(u16::MAX, &longest, 0xA702, &counts, true, Some(&comment));
        assert!(rsp.len() <= COMMAND_CAPACITY);
        let originator = MoveOriginator {
            ae_title: AeTitle::new(&"M".repeat(16)).expect("valid"),
            message_id: u16::MAX,
        };
        let rq = store_rq_with(u16::MAX, &longest, &longest, 2, Some(&originator));
        assert_eq!(
            Command::decode(&rq).map(|c| c.move_originator()),
            Ok(Some(originator))
        );
    }

    #[test]
    fn retrieve_commands_round_trip() {
        let get = u("1.2.840.10008.5.1.4.1.2.2.3");
        let rq = Command::decode(&get_rq(3, &get, 1)).expect("decodes");
        assert_eq!(
            (
                rq.command_field,
                rq.message_id,
                rq.priority,
                rq.has_data_set
            ),
            (field::C_GET_RQ, 3, 1, true)
        );
        assert_eq!(rq.move_destination, None);

        let moved = u("1.2.840.10008.5.1.4.1.2.1.2");
        let dest = AeTitle::new("STORESCP").expect("valid");
        let rq = Command::decode(&move_rq(4, &moved, 0, &dest)).expect("decodes");
        assert_eq!(rq.command_field, field::C_MOVE_RQ);
        assert_eq!(rq.move_destination.as_ref(), Some(&dest));

        let pending = SubOperations {
            remaining: Some(3),
            completed: Some(2),
            failed: Some(1),
            warning: Some(0),
        };
        let rsp = Command::decode(&get_rsp(3, &get, status::PENDING, &pending, false, None))
            .expect("decodes");
        assert_eq!(rsp.command_field, field::C_GET_RSP);
        assert_eq!(rsp.message_id_being_responded_to, Some(3));
        assert_eq!(rsp.sub_operations, pending);
        assert!(!rsp.has_data_set);
        assert_eq!(rsp.error_comment, None);

        let last = SubOperations {
            remaining: None,
            ..pending
        };
        let rsp = Command::decode(&move_rsp(
            4,
            &moved,
            status::UNABLE_TO_PERFORM_SUB_OPERATIONS,
            &last,
            true,
            Some("all failed"),
        ))
        .expect("decodes");
        assert_eq!(rsp.command_field, field::C_MOVE_RSP);
        assert_eq!(rsp.sub_operations, last);
        assert!(rsp.has_data_set);
        assert_eq!(rsp.error_comment.as_deref(), Some("all failed"));

        // A refusal carries no counts at all.
        let rsp = Command::decode(&move_rsp(
            4,
            &moved,
            status::MOVE_DESTINATION_UNKNOWN,
            &SubOperations::default(),
            false,
            Some("unknown"),
        ))
        .expect("decodes");
        assert_eq!(rsp.sub_operations, SubOperations::default());

        // Without the originator fields, a C-STORE-RQ names none.
        let plain = Command::decode(&store_rq(1, &get, &get)).expect("decodes");
        assert_eq!(plain.move_originator(), None);
    }

    #[test]
    fn what_a_peer_writes_in_text_fields_is_taken_without_overflow() {
        let mut e = Encoder::new();
        e.us(TAG_COMMAND_FIELD, field::C_STORE_RSP);
        e.us(TAG_MESSAGE_ID_RESPONDED, 1);
        e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
        e.us(TAG_STATUS, 0xA700);
        // Longer than LO allows, and not UTF-8 in the middle.
        let mut comment = b"  disk \xff full ".to_vec();
        comment.extend_from_slice(&[b'x'; 100]);
        e.out
            .extend_from_slice(&[0x00, 0x00, 0x02, 0x09])
            .expect("room");
        e.out
            .extend_from_slice(&(comment.len() as u32).to_le_bytes())
            .expect("room");
        e.out.extend_from_slice(&comment).expect("room");
        // A Move Destination longer than an AE title, and an originator
        // with a backslash.
        e.element(TAG_MOVE_DESTINATION, b"SEVENTEEN_LETTERS");
        e.element(TAG_MOVE_ORIGINATOR_AE, b"A\\B");
        e.us(TAG_MOVE_ORIGINATOR_MESSAGE_ID, 7);
        let cmd = Command::decode(&e.finish()).expect("decodes");
        let text = cmd.error_comment.clone().expect("a comment");
        assert!(text.starts_with("disk \u{FFFD} full x"), "{text}");
        assert!(text.len() <= MAX_COMMENT);
        assert_eq!(cmd.move_destination, None);
        assert_eq!(cmd.move_originator_ae, None);
        assert_eq!(cmd.move_originator_message_id, Some(7));
        assert_eq!(cmd.move_originator(), None);
    }

    #[test]
    fn n_commands_round_trip() {
        let class = u(uid::STORAGE_COMMITMENT_PUSH_MODEL);
        let instance = u(uid::STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE);
        let rq = Command::decode(&n_action_rq(5, &class, &instance, 1)).expect("decodes");
        assert_eq!(
            (rq.command_field, rq.message_id, rq.has_data_set),
            (field::N_ACTION_RQ, 5, true)
        );
        assert_eq!(rq.requested_sop_class.as_ref(), Some(&class));
        assert_eq!(rq.requested_sop_instance.as_ref(), Some(&instance));
        assert_eq!((rq.sop_class.as_ref(), rq.action_type_id), (None, Some(1)));

        let rsp = Command::decode(&n_action_rsp(5, &class, None, None, 0x0213, Some("big")))
            .expect("decodes");
        assert_eq!(rsp.command_field, field::N_ACTION_RSP);
        assert_eq!(rsp.message_id_being_responded_to, Some(5));
        assert_eq!((rsp.status, rsp.has_data_set), (Some(0x0213), false));
        assert_eq!(
            (rsp.sop_instance.as_ref(), rsp.action_type_id),
            (None, None)
        );
        assert_eq!(rsp.error_comment.as_deref(), Some("big"));

        let rq = Command::decode(&n_event_report_rq(9, &class, &instance, 2)).expect("decodes");
        assert_eq!(
            (rq.command_field, rq.message_id, rq.has_data_set),
            (field::N_EVENT_REPORT_RQ, 9, true)
        );
        assert_eq!(rq.sop_class.as_ref(), Some(&class));
        assert_eq!(rq.sop_instance.as_ref(), Some(&instance));
        assert_eq!(rq.event_type_id, Some(2));

        let rsp = Command::decode(&n_event_report_rsp(
            9,
            &class,
            Some(&instance),
            Some(2),
            0,
            None,
        ))
        .expect("decodes");
        assert_eq!(rsp.command_field, field::N_EVENT_REPORT_RSP);
        assert_eq!((rsp.message_id, rsp.status), (9, Some(0)));
        assert_eq!(rsp.event_type_id, Some(2));

        let longest = u(&format!("1.{}", "2".repeat(62)));
        let comment = "é".repeat(100);
        for rsp in [
            n_action_rsp(1, &longest, Some(&longest), Some(1), 0x0110, Some(&comment)),
            n_event_report_rsp(1, &longest, Some(&longest), Some(1), 0x0110, Some(&comment)),
        ] {
            assert!(rsp.len() <= COMMAND_CAPACITY);
        }
    }

    #[test]
    fn find_and_cancel_commands_round_trip() {
        let class = u("1.2.840.10008.5.1.4.1.2.2.1");
        let rq = Command::decode(&find_rq(7, &class, 2)).expect("decodes");
        assert_eq!(
            (
                rq.command_field,
                rq.message_id,
                rq.priority,
                rq.has_data_set
            ),
            (field::C_FIND_RQ, 7, 2, true)
        );
        let cancel = Command::decode(&cancel_rq(7)).expect("decodes");
        assert_eq!(cancel.command_field, field::C_CANCEL_RQ);
        assert_eq!(cancel.message_id_being_responded_to, Some(7));
        let pending =
            Command::decode(&find_rsp(7, &class, status::PENDING, true, None)).expect("decodes");
        assert_eq!((pending.status, pending.has_data_set), (Some(0xFF00), true));
    }
}
