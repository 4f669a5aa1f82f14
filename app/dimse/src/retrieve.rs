//! The bookkeeping of a C-GET or C-MOVE (PS3.4 C.4.2, C.4.3), apart from
//! the network: how a C-STORE-RSP status counts, the sub-operation counts
//! of pending and final responses, which final status they make, and the
//! response identifier with the Failed SOP Instance UID List (0008,0058).
//!
//! The rules, as PS3.4 Tables C.4-2 and C.4-3 and the behaviour of common
//! implementations (dcmtk, pynetdicom) have them:
//! - a pending response (FF00) carries all four counts;
//! - the final response carries Completed, Failed and Warning, not
//!   Remaining: 0000 when nothing failed or warned; A702 when every
//!   sub-operation failed; B000 otherwise; both of the latter with the
//!   identifier;
//! - after a C-CANCEL-RQ, FE00 with all four counts and the identifier.
//!
//! The wire counts are 16-bit: larger ones saturate at 65535 (see
//! [`Retrieval::sub_operations`](crate::scp::Retrieval::sub_operations)).
//! The list is capped at [`MAX_FAILED_LIST`] bytes, the most an Explicit
//! VR element of VR UI can hold, which also bounds its memory; the UIDs
//! beyond it are counted but not listed.

use crate::command::{status, SubOperations};
use crate::scp::{SubOperationCounts, SubOperationResult};
use crate::uid::{self, Uid};

/// The longest Failed SOP Instance UID List value we build: an Explicit
/// VR UI element's 16-bit length, less one for even padding.
pub const MAX_FAILED_LIST: usize = 65534;

/// How a C-STORE-RSP status counts (PS3.4 B.2.3): 0000 completed, a
/// warning (B000, B006, B007, and the other warnings of the
/// [`status::is_stored`] family) warning, anything else failed.
pub fn classify(code: u16) -> SubOperationResult {
    if code == status::SUCCESS {
        SubOperationResult::Completed
    } else if status::is_stored(code) {
        SubOperationResult::Warning
    } else {
        SubOperationResult::Failed
    }
}

/// What a final response is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalResponse {
    /// the status
    pub status: u16,
    /// the counts on the wire
    pub counts: SubOperations,
    /// whether the identifier (the Failed SOP Instance UID List) follows
    pub with_identifier: bool,
    /// the Error Comment, for a failure
    pub comment: Option<String>,
}

/// The counts of one retrieve as it goes, and its failed SOP instances.
#[derive(Debug)]
pub struct Tally {
    announced: u64,
    counts: SubOperationCounts,
    /// the Failed SOP Instance UID List's value so far (backslash
    /// separated)
    failed_list: String,
    /// failed SOP instances left out of the list (over its cap)
    unlisted: u64,
    /// the first reason a sub-operation failed
    first_failure: Option<String>,
}

fn wire(n: u64) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

impl Tally {
    /// A retrieve of `announced` sub-operations.
    pub fn new(announced: u64) -> Self {
        Tally {
            announced,
            counts: SubOperationCounts::default(),
            failed_list: String::new(),
            unlisted: 0,
            first_failure: None,
        }
    }

    /// Sub-operations performed so far.
    pub fn done(&self) -> u64 {
        self.counts.completed + self.counts.failed + self.counts.warning
    }

    /// Sub-operations announced and not yet performed.
    pub fn remaining(&self) -> u64 {
        self.announced.saturating_sub(self.done())
    }

    /// Counts one sub-operation; a failed one's SOP instance (when known)
    /// goes into the list, its reason is kept if it is the first.
    pub fn record(
        &mut self,
        result: SubOperationResult,
        sop_instance: Option<&Uid>,
        reason: Option<&str>,
    ) {
        match result {
            SubOperationResult::Completed => self.counts.completed += 1,
            SubOperationResult::Warning => self.counts.warning += 1,
            SubOperationResult::Failed => {
                self.counts.failed += 1;
                if self.first_failure.is_none() {
                    self.first_failure = reason.map(str::to_string);
                }
                match sop_instance {
                    Some(uid) => self.list(uid),
                    None => self.unlisted += 1,
                }
            }
        }
    }

    fn list(&mut self, uid: &Uid) {
        let separator = usize::from(!self.failed_list.is_empty());
        if self.failed_list.len() + separator + uid.as_str().len() > MAX_FAILED_LIST {
            self.unlisted += 1;
            return;
        }
        if separator == 1 {
            self.failed_list.push('\\');
        }
        self.failed_list.push_str(uid.as_str());
    }

    /// The counts of a pending response: all four.
    pub fn pending(&self) -> SubOperations {
        SubOperations {
            remaining: Some(wire(self.remaining())),
            completed: Some(wire(self.counts.completed)),
            failed: Some(wire(self.counts.failed)),
            warning: Some(wire(self.counts.warning)),
        }
    }

    /// The exact counts, for the observer.
    pub fn counts(&self) -> SubOperationCounts {
        SubOperationCounts {
            remaining: self.remaining(),
            ..self.counts
        }
    }

    /// Ends the retrieve: after a C-CANCEL-RQ (`cancelled`), FE00 with
    /// what remains; otherwise announced sub-operations that never came
    /// count as failed, and the status follows the counts.
    pub fn finish(&mut self, cancelled: bool) -> FinalResponse {
        if cancelled {
            return FinalResponse {
                status: status::CANCEL,
                counts: self.pending(),
                with_identifier: true,
                comment: None,
            };
        }
        let missing = self.remaining();
        if missing > 0 {
            self.counts.failed += missing;
            self.unlisted += missing;
            if self.first_failure.is_none() {
                self.first_failure = Some(format!(
                    "{missing} of the {} objects were not provided",
                    self.announced
                ));
            }
        }
        let counts = SubOperations {
            remaining: None,
            ..self.pending()
        };
        let c = self.counts;
        if c.failed == 0 && c.warning == 0 {
            FinalResponse {
                status: status::SUCCESS,
                counts,
                with_identifier: false,
                comment: None,
            }
        } else if c.completed == 0 && c.warning == 0 {
            let reason = self.first_failure.as_deref().unwrap_or("not stored");
            FinalResponse {
                status: status::UNABLE_TO_PERFORM_SUB_OPERATIONS,
                counts,
                with_identifier: true,
                comment: Some(format!("all {} sub-operations failed: {reason}", c.failed)),
            }
        } else {
            FinalResponse {
                status: status::SUB_OPERATIONS_WARNING,
                counts,
                with_identifier: true,
                comment: None,
            }
        }
    }

    /// Why the first failed sub-operation failed (the receiver's comment,
    /// or why it was not sent), when one failed.
    pub fn first_failure(&self) -> Option<&str> {
        self.first_failure.as_deref()
    }

    /// Failed SOP instances not in the list (unknown UID, or over the cap).
    pub fn unlisted(&self) -> u64 {
        self.unlisted
    }

    /// The response identifier: a data set holding only the Failed SOP
    /// Instance UID List, in `transfer_syntax` (Implicit or Explicit VR
    /// Little Endian: the only ones a GET or MOVE context is accepted with).
    pub fn identifier(&self, transfer_syntax: &Uid) -> Vec<u8> {
        failed_list_identifier(transfer_syntax, &self.failed_list)
    }
}

/// Encodes a data set of one element, (0008,0058) Failed SOP Instance UID
/// List, holding `list` (UIDs separated by backslashes, at most
/// [`MAX_FAILED_LIST`] bytes), padded with NUL to even length.
pub fn failed_list_identifier(transfer_syntax: &Uid, list: &str) -> Vec<u8> {
    let value = list.as_bytes();
    let padded = value.len() + value.len() % 2;
    let mut out = Vec::with_capacity(12 + padded);
    out.extend_from_slice(&[0x08, 0x00, 0x58, 0x00]);
    if transfer_syntax.as_str() == uid::IMPLICIT_VR_LE {
        out.extend_from_slice(&(padded as u32).to_le_bytes());
    } else {
        // Explicit VR Little Endian: VR, then a 16-bit length (the list
        // is capped to fit it).
        out.extend_from_slice(b"UI");
        out.extend_from_slice(&(padded.min(usize::from(u16::MAX)) as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
    if value.len() % 2 == 1 {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Uid {
        Uid::new(s).expect("valid UID")
    }

    #[test]
    fn statuses_count_as_the_standard_says() {
        assert_eq!(classify(0x0000), SubOperationResult::Completed);
        for warning in [0xB000, 0xB006, 0xB007] {
            assert_eq!(classify(warning), SubOperationResult::Warning);
        }
        for failure in [0xA700, 0xA900, 0xC000, 0x0122, 0xFF00, 0x0211] {
            assert_eq!(classify(failure), SubOperationResult::Failed);
        }
    }

    #[test]
    fn final_status_follows_the_counts() {
        let mut all_good = Tally::new(2);
        all_good.record(SubOperationResult::Completed, None, None);
        assert_eq!(all_good.pending().remaining, Some(1));
        all_good.record(SubOperationResult::Completed, None, None);
        let end = all_good.finish(false);
        assert_eq!(end.status, 0x0000);
        assert!(!end.with_identifier);
        assert_eq!(
            end.counts,
            SubOperations {
                remaining: None,
                completed: Some(2),
                failed: Some(0),
                warning: Some(0)
            }
        );

        let mut some = Tally::new(3);
        some.record(SubOperationResult::Completed, None, None);
        some.record(
            SubOperationResult::Failed,
            Some(&u("1.2.3")),
            Some("refused"),
        );
        some.record(SubOperationResult::Warning, None, None);
        let end = some.finish(false);
        assert_eq!((end.status, end.with_identifier), (0xB000, true));
        assert_eq!(some.failed_list, "1.2.3");

        let mut only_warnings = Tally::new(1);
        only_warnings.record(SubOperationResult::Warning, None, None);
        assert_eq!(only_warnings.finish(false).status, 0xB000);

        let mut none = Tally::new(2);
        none.record(
            SubOperationResult::Failed,
            Some(&u("1.2.3")),
            Some("disk full"),
        );
        none.record(SubOperationResult::Failed, Some(&u("1.2.4")), None);
        let end = none.finish(false);
        assert_eq!(end.status, 0xA702);
        assert_eq!(
            end.comment.as_deref(),
            Some("all 2 sub-operations failed: disk full")
        );
        assert_eq!(none.failed_list, "1.2.3\\1.2.4");

        // Nothing matched: success with zero counts.
        assert_eq!(Tally::new(0).finish(false).status, 0x0000);
    }

    #[test]
    fn objects_that_never_came_are_failed_and_cancel_keeps_the_remaining() {
        let mut short = Tally::new(3);
        short.record(SubOperationResult::Completed, None, None);
        let end = short.finish(false);
        assert_eq!(end.status, 0xB000);
        assert_eq!(end.counts.failed, Some(2));
        assert_eq!(short.unlisted(), 2);

        let mut cancelled = Tally::new(5);
        cancelled.record(SubOperationResult::Completed, None, None);
        let end = cancelled.finish(true);
        assert_eq!(end.status, 0xFE00);
        assert_eq!(end.counts.remaining, Some(4));
        assert_eq!(end.counts.completed, Some(1));
        assert!(end.with_identifier);
    }

    #[test]
    fn wire_counts_saturate() {
        let mut big = Tally::new(100_000);
        big.record(SubOperationResult::Completed, None, None);
        assert_eq!(big.pending().remaining, Some(u16::MAX));
        assert_eq!(big.counts().remaining, 99_999);
    }

    #[test]
    fn the_failed_list_is_capped_and_encoded_in_either_syntax() {
        let long = u(&format!("1.{}", "2".repeat(62)));
        let mut t = Tally::new(2000);
        for _ in 0..2000 {
            t.record(SubOperationResult::Failed, Some(&long), None);
        }
        assert!(t.failed_list.len() <= MAX_FAILED_LIST);
        assert_eq!(t.unlisted(), 2000 - (MAX_FAILED_LIST as u64 + 1) / 65);

        let implicit = failed_list_identifier(&u(uid::IMPLICIT_VR_LE), "1.2.3");
        assert_eq!(
            implicit,
            [&[0x08, 0, 0x58, 0, 6, 0, 0, 0][..], b"1.2.3\0"].concat()
        );
        let explicit = failed_list_identifier(&u(uid::EXPLICIT_VR_LE), "1.2.34");
        assert_eq!(
            explicit,
            [&[0x08, 0, 0x58, 0][..], b"UI", &[6, 0], b"1.2.34"].concat()
        );
        let capped = failed_list_identifier(&u(uid::EXPLICIT_VR_LE), &t.failed_list);
        let len = u16::from_le_bytes([capped[6], capped[7]]) as usize;
        assert_eq!(len, capped.len() - 8);
        assert_eq!(len % 2, 0);
    }
}
