//! Final names of stored objects. Every path part comes from a validated
//! [`Uid`] or a fixed string, so nothing a peer sends can leave the store.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dimse::uid::{modality_prefix, Uid};

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

#[cfg(test)]
mod tests {
    use super::*;

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
