//! The index's tables: patient / study / series / instance, the keys of
//! PS3.4 C.6.1/C.6.2 at their level, and the indexes that serve the
//! queries a viewer makes (patient by name, studies by date, the studies
//! of a patient, the series of a study, the instances of a series).
//!
//! Derived keys (ModalitiesInStudy, SOPClassesInStudy and the Number of
//! Related ... counts) are not stored: they are computed from the child
//! rows through these indexes, so they can never disagree with them.
//! Versioned with `user_version`: an index of another version is rebuilt
//! from the files (it is derived data).

/// The schema version this build writes and reads.
pub const VERSION: i64 = 1;

/// Creates every table and index (in one transaction, by the caller).
pub const CREATE: &str = "
CREATE TABLE patient (
    id INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL UNIQUE,
    patient_name TEXT NOT NULL,
    patient_birth_date TEXT NOT NULL,
    patient_sex TEXT NOT NULL
);
CREATE INDEX patient_by_name ON patient (patient_name COLLATE NOCASE);
CREATE TABLE study (
    id INTEGER PRIMARY KEY,
    patient INTEGER NOT NULL REFERENCES patient (id),
    study_instance_uid TEXT NOT NULL UNIQUE,
    study_date TEXT NOT NULL,
    study_time TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    study_id TEXT NOT NULL,
    study_description TEXT NOT NULL,
    referring_physician_name TEXT NOT NULL
);
CREATE INDEX study_by_date ON study (study_date);
CREATE INDEX study_by_patient ON study (patient);
CREATE TABLE series (
    id INTEGER PRIMARY KEY,
    study INTEGER NOT NULL REFERENCES study (id),
    series_instance_uid TEXT NOT NULL UNIQUE,
    modality TEXT NOT NULL,
    series_number INTEGER,
    series_description TEXT NOT NULL,
    series_date TEXT NOT NULL,
    body_part_examined TEXT NOT NULL
);
CREATE INDEX series_by_study ON series (study, modality);
CREATE TABLE instance (
    id INTEGER PRIMARY KEY,
    series INTEGER NOT NULL REFERENCES series (id),
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    instance_number INTEGER,
    path TEXT NOT NULL UNIQUE,
    transfer_syntax TEXT NOT NULL,
    size INTEGER NOT NULL,
    received INTEGER NOT NULL
);
CREATE INDEX instance_by_series ON instance (series, sop_class_uid);
CREATE INDEX instance_by_uid ON instance (sop_instance_uid);
";
