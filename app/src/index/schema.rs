//! The index's tables: patient / study / series / instance, the keys of
//! PS3.4 C.6.1/C.6.2 at their level, and the indexes that serve the
//! queries a viewer makes (patient by name, studies by date, the studies
//! of a patient, the series of a study, the instances of a series).
//!
//! Derived keys (ModalitiesInStudy, SOPClassesInStudy and the Number of
//! Related ... counts) are not stored: they are computed from the child
//! rows through these indexes, so they can never disagree with them.
//! Versioned with `user_version`. Version 2 added what is not derived
//! from the files: the forwarding queue (`forward`), which says what has
//! left the device, so an index of version 1 is brought up to date in
//! place ([`MIGRATE_1_TO_2`]) rather than rebuilt; an index of an unknown
//! version is rebuilt from the files (every object then queued again for
//! the forwarding rules: delivery is at least once).

/// The schema version this build writes and reads.
pub const VERSION: i64 = 2;

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
    received INTEGER NOT NULL,
    source_ae TEXT NOT NULL DEFAULT ''
);
CREATE INDEX instance_by_series ON instance (series, sop_class_uid);
CREATE INDEX instance_by_uid ON instance (sop_instance_uid);
";

/// The forwarding queue (version 2): one row per stored object and
/// destination that a `[[forward]]` rule matched, written in the same
/// transaction as the object's instance row, kept after delivery (as
/// `done`) until retention deletes the object, so that what has left the
/// device can be told. `state` is one of `queued`, `sent` (delivered,
/// storage commitment asked and not yet answered), `done` and `failed`
/// (see `index::queue::State`); rows are taken oldest first (`id`); an
/// entry asked about with storage commitment carries the request's
/// `transaction_uid`, and `updated` is when it was asked.
///
/// `commitment` holds the storage commitment requests we answer as SCP
/// (N-ACTION from a modality) until their N-EVENT-REPORT is delivered, so
/// that a restart does not lose them: `refs` is the request's references,
/// one `SOP class UID<TAB>SOP instance UID` per line.
pub const CREATE_QUEUE: &str = "
CREATE TABLE forward (
    id INTEGER PRIMARY KEY,
    instance INTEGER NOT NULL REFERENCES instance (id),
    destination TEXT NOT NULL,
    commit_wanted INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    queued INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    status INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    transaction_uid TEXT,
    UNIQUE (instance, destination)
);
CREATE INDEX forward_by_state ON forward (destination, state, id);
CREATE INDEX forward_by_transaction ON forward (transaction_uid) WHERE transaction_uid IS NOT NULL;
CREATE TABLE commitment (
    id INTEGER PRIMARY KEY,
    requester TEXT NOT NULL,
    transaction_uid TEXT NOT NULL,
    refs TEXT NOT NULL,
    received INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT ''
);
";

/// Brings a version 1 index to version 2 (with [`CREATE_QUEUE`]): objects
/// indexed before keep an empty `source_ae`.
pub const MIGRATE_1_TO_2: &str = "
ALTER TABLE instance ADD COLUMN source_ae TEXT NOT NULL DEFAULT '';
";
