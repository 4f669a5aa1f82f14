//! Final names of stored objects. Every path part comes from a validated
//! [`Uid`] or a fixed string, so nothing a peer sends can leave the store.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use dimse::uid::Uid;

/// How stored objects are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `<store>/<MOD>.<SOPInstanceUID>`, like dcmtk `storescp -uf`.
    Flat,
    /// `<store>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`.
    Study,
}

/// Folder for objects whose header lacks a usable Study or Series Instance
/// UID; it cannot collide with a UID, which has no underscore.
pub const UNSORTED: &str = "_unsorted";

/// A final name relative to the store, and the extension that follows any
/// uniqueness suffix.
#[derive(Debug, PartialEq, Eq)]
pub struct RelativeName {
    /// path without extension
    pub path: PathBuf,
    /// extension including its dot, or empty
    pub extension: String,
}

/// The flat name: modality prefix and SOP Instance UID.
pub fn flat_name(sop_class: &Uid, sop_instance: &Uid) -> RelativeName {
    RelativeName {
        path: PathBuf::from(format!(
            "{}.{}",
            modality_prefix(sop_class.as_str()),
            sop_instance
        )),
        extension: String::new(),
    }
}

/// The study name: study and series folders, then the instance.
pub fn study_name(study: Option<&Uid>, series: Option<&Uid>, sop_instance: &Uid) -> RelativeName {
    let path = match (study, series) {
        (Some(study), Some(series)) => PathBuf::from(study.as_str())
            .join(series.as_str())
            .join(sop_instance.as_str()),
        _ => PathBuf::from(UNSORTED).join(sop_instance.as_str()),
    };
    RelativeName {
        path,
        extension: ".dcm".into(),
    }
}

/// The modality prefix dcmtk's `storescp -uf` gives a file of this SOP class
/// (`CT.<uid>`, `MR.<uid>`, ...), so that stores made by either look alike.
pub fn modality_prefix(sop_class: &str) -> &'static str {
    let Some(rest) = sop_class.strip_prefix("1.2.840.10008.5.1.4.1.1.") else {
        return "UNKNOWN";
    };
    // Longest prefixes first where one is a prefix of another.
    const TABLE: &[(&str, &str)] = &[
        ("1", "CR"),
        ("1.1", "DX"),
        ("1.1.1", "DX"),
        ("1.2", "MG"),
        ("1.2.1", "MG"),
        ("1.3", "IO"),
        ("1.3.1", "IO"),
        ("2", "CT"),
        ("2.1", "CTE"),
        ("2.2", "CTL"),
        ("3.1", "USM"),
        ("4", "MR"),
        ("4.1", "MRE"),
        ("4.2", "MRS"),
        ("4.3", "MRE"),
        ("4.4", "MRL"),
        ("6.1", "US"),
        ("6.2", "USE"),
        ("7", "SC"),
        ("7.1", "SCB"),
        ("7.2", "SCG"),
        ("7.3", "SCG"),
        ("7.4", "SCC"),
        ("9.1.1", "AU"),
        ("9.1.2", "AU"),
        ("9.1.3", "AU"),
        ("9.2.1", "AU"),
        ("9.3.1", "AU"),
        ("9.4.1", "AU"),
        ("9.4.2", "AU"),
        ("11.1", "PSg"),
        ("11.2", "PSc"),
        ("12.1", "XA"),
        ("12.1.1", "XAE"),
        ("12.2", "RF"),
        ("12.2.1", "RFE"),
        ("13.1.1", "BT"),
        ("13.1.3", "BT"),
        ("20", "NM"),
        ("30", "PA"),
        ("66", "RAW"),
        ("66.1", "RE"),
        ("66.2", "SR"),
        ("66.4", "SEG"),
        ("67", "RWV"),
        ("77.1.1", "VLe"),
        ("77.1.2", "VLm"),
        ("77.1.4", "VLp"),
        ("77.1.5.1", "OP"),
        ("77.1.5.2", "OP"),
        ("77.1.6", "SM"),
        ("88.11", "SRb"),
        ("88.22", "SRe"),
        ("88.33", "SRc"),
        ("88.59", "KO"),
        ("104.1", "PDF"),
        ("104.2", "CDA"),
        ("128", "PT"),
        ("130", "PT"),
        ("481.1", "RI"),
        ("481.2", "RD"),
        ("481.3", "RS"),
        ("481.4", "RB"),
        ("481.5", "RP"),
        ("481.8", "RI"),
    ];
    TABLE
        .iter()
        .find(|(suffix, _)| *suffix == rest)
        .map_or("UNKNOWN", |(_, prefix)| prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(modality_prefix("1.2.840.10008.5.1.4.1.1.2"), "CT");
        assert_eq!(modality_prefix("1.2.840.10008.5.1.4.1.1.4"), "MR");
        assert_eq!(modality_prefix("1.2.3"), "UNKNOWN");
    }

    #[test]
    fn names() {
        let u = |s: &str| Uid::new(s).expect("valid");
        assert_eq!(
            flat_name(&u("1.2.840.10008.5.1.4.1.1.4"), &u("1.2.3")).path,
            PathBuf::from("MR.1.2.3")
        );
        assert_eq!(
            study_name(Some(&u("1.1")), Some(&u("1.1.2")), &u("1.1.2.3")).path,
            PathBuf::from("1.1/1.1.2/1.1.2.3")
        );
        assert_eq!(
            study_name(None, Some(&u("1.1.2")), &u("9.9")).path,
            PathBuf::from("_unsorted/9.9")
        );
    }
}
