//! UIDs: validation (they become file names), the well-known UIDs of the
//! services spoken here, and which SOP classes count as storage.

use std::fmt;

/// A validated DICOM UID: 1 to 64 characters, digits and dots, no empty
/// component. Only such a string may become part of a path in the store, so
/// nothing a peer sends can name `..`, `/` or a hidden file.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Uid(heapless::String<64>);

impl Uid {
    /// Validates `s` as a UID.
    pub fn new(s: &str) -> Option<Self> {
        if !is_valid_uid(s) {
            return None;
        }
        heapless::String::try_from(s).ok().map(Uid)
    }

    /// Validates a UID value as it appears in a data element: padded with a
    /// trailing NUL (or, from careless writers, spaces).
    pub fn from_padded(value: &[u8]) -> Option<Self> {
        let end = value
            .iter()
            .rposition(|&b| b != 0 && b != b' ')
            .map_or(0, |i| i + 1);
        let s = std::str::from_utf8(&value[..end]).ok()?;
        Self::new(s.trim_start_matches(' '))
    }

    /// The UID as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uid({})", self.as_str())
    }
}

/// True when `s` is a syntactically valid UID (PS3.5 §9.1).
pub fn is_valid_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
}

/// Verification SOP Class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// The DICOM application context name.
pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
/// Patient Root Query/Retrieve Information Model - FIND
pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";
/// Study Root Query/Retrieve Information Model - FIND
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";

/// Patient Root Query/Retrieve Information Model - MOVE
pub const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";
/// Patient Root Query/Retrieve Information Model - GET
pub const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";
/// Study Root Query/Retrieve Information Model - MOVE
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
/// Study Root Query/Retrieve Information Model - GET
pub const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

/// Storage Commitment Push Model SOP Class (PS3.4 Annex J): a modality
/// asks (N-ACTION) whether an archive has taken responsibility for the
/// instances it sent, and the archive answers later (N-EVENT-REPORT).
pub const STORAGE_COMMITMENT_PUSH_MODEL: &str = "1.2.840.10008.1.20.1";
/// The well-known SOP Instance of the Storage Commitment Push Model
/// (PS3.4 J.3.5): every N-ACTION-RQ and N-EVENT-REPORT-RQ of the service
/// names this instance, there being no other.
pub const STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE: &str = "1.2.840.10008.1.20.1.1";

/// True for the C-FIND information models this crate can accept.
pub fn is_find_sop_class(uid: &str) -> bool {
    uid == PATIENT_ROOT_FIND || uid == STUDY_ROOT_FIND
}

/// True for the C-GET information models this crate can accept.
pub fn is_get_sop_class(uid: &str) -> bool {
    uid == PATIENT_ROOT_GET || uid == STUDY_ROOT_GET
}

/// True for the C-MOVE information models this crate can accept.
pub fn is_move_sop_class(uid: &str) -> bool {
    uid == PATIENT_ROOT_MOVE || uid == STUDY_ROOT_MOVE
}
/// Implicit VR Little Endian, the default transfer syntax.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Deflated Explicit VR Little Endian.
pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";
/// Explicit VR Big Endian (retired, still seen).
pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";

/// Our implementation class UID, sent in associations and file meta groups.
/// (A UID under the "2.25" UUID root, derived from a fixed UUID.)
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.268034421617513612473834402331930427163";
/// Our implementation version name (at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("MINIPACS_", env!("CARGO_PKG_VERSION"));

/// Storage SOP classes outside the `1.2.840.10008.5.1.4.1.1.` branch.
const OTHER_STORAGE_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.1.27",    // Stored Print Storage (retired)
    "1.2.840.10008.5.1.1.29",    // Hardcopy Grayscale Image Storage (retired)
    "1.2.840.10008.5.1.1.30",    // Hardcopy Color Image Storage (retired)
    "1.2.840.10008.5.1.4.34.7",  // RT Beams Delivery Instruction Storage
    "1.2.840.10008.5.1.4.34.10", // RT Brachy Application Setup Delivery Instruction
    "1.2.840.10008.5.1.4.38.1",  // Hanging Protocol Storage
    "1.2.840.10008.5.1.4.39.1",  // Color Palette Storage
    "1.2.840.10008.5.1.4.43.1",  // Generic Implant Template Storage
    "1.2.840.10008.5.1.4.44.1",  // Implant Assembly Template Storage
    "1.2.840.10008.5.1.4.45.1",  // Implant Template Group Storage
];

/// True for a storage SOP class of the standard, or (when `allow_private`)
/// for any SOP class outside the DICOM root, which vendors use for their
/// private storage classes. Other standard services (query, retrieve,
/// worklist, print) are refused.
pub fn is_storage_sop_class(uid: &str, allow_private: bool) -> bool {
    if !is_valid_uid(uid) {
        return false;
    }
    if let Some(rest) = uid.strip_prefix("1.2.840.10008.") {
        return rest.starts_with("5.1.4.1.1.") || OTHER_STORAGE_CLASSES.contains(&uid);
    }
    allow_private
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_validation() {
        assert!(is_valid_uid("1.2.840.10008.1.1"));
        assert!(!is_valid_uid(""));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid(".1"));
        assert!(!is_valid_uid("1.2."));
        assert!(!is_valid_uid("../etc"));
        assert!(!is_valid_uid("1.2/3"));
        assert!(!is_valid_uid(&"1".repeat(65)));
        assert!(is_valid_uid(&"1".repeat(64)));
    }

    #[test]
    fn padded_values() {
        assert_eq!(
            Uid::from_padded(b"1.2.3\0").map(|u| u.to_string()),
            Some("1.2.3".to_string())
        );
        assert_eq!(
            Uid::from_padded(b"1.2.3 ").map(|u| u.to_string()),
            Some("1.2.3".to_string())
        );
        assert!(Uid::from_padded(b"\0").is_none());
        assert!(Uid::from_padded(b"1.2.\xff").is_none());
    }

    #[test]
    fn storage_classes() {
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.2", false));
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.38.1", false));
        assert!(!is_storage_sop_class(VERIFICATION, true));
        // Study Root Query/Retrieve FIND is not storage.
        assert!(!is_storage_sop_class("1.2.840.10008.5.1.4.1.2.2.1", true));
        assert!(is_storage_sop_class("1.3.12.2.1107.5.9.1", true));
        assert!(!is_storage_sop_class("1.3.12.2.1107.5.9.1", false));
    }

    #[test]
    fn implementation_names_fit() {
        assert!(is_valid_uid(IMPLEMENTATION_CLASS_UID));
        assert!(IMPLEMENTATION_VERSION_NAME.len() <= 16);
    }
}
