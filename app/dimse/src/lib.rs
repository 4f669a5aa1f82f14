//! The DICOM network protocol, without policy.
//!
//! This crate speaks the Upper Layer (PS3.8) and DIMSE (PS3.7): PDU framing
//! on one reusable buffer, association negotiation, command sets, UIDs and
//! AE titles as validated types, the SCP side of an association as a state
//! machine, and an SCU. It opens no socket, touches no file, reads no
//! configuration and writes no log line a user would read: the SCP pushes
//! every request into the caller's [`scp::Service`] and every outcome into
//! its [`scp::Observer`], as ripgrep's searcher pushes matches into a
//! caller's sink. The application decides where objects go, what is logged
//! and audited, and when a record must be durable.
//!
//! Modules, one concept each:
//! - [`pdu`]: PDU and PDV framing, A-ABORT and A-RELEASE encodings.
//! - [`uid`]: UIDs (they become file names, so they are validated) and the
//!   well-known UIDs and SOP class families.
//! - [`ae`]: AE titles.
//! - [`command`]: DIMSE command sets, decoded and encoded in fixed buffers.
//! - [`commitment`]: the Storage Commitment data sets (which instances to
//!   commit, which were), as typed values.
//! - [`negotiation`]: which A-ASSOCIATE-RQ and presentation contexts to
//!   accept.
//! - [`error`]: how an association can go wrong, and the one mapping from a
//!   protocol error to an A-ABORT reason.
//! - [`scp`]: one accepted association, from A-ASSOCIATE-AC to release or
//!   abort, driving a [`scp::Service`] (C-ECHO, C-STORE, C-FIND, C-GET,
//!   C-MOVE, and N-ACTION and N-EVENT-REPORT for Storage Commitment).
//! - [`retrieve`]: the counts, statuses and failed-instance list of a
//!   C-GET or C-MOVE.
//! - [`scu`]: the requesting side (C-ECHO, streaming C-STORE, Storage
//!   Commitment's N-ACTION and N-EVENT-REPORT, role selection).

pub mod ae;
pub mod command;
pub mod commitment;
pub mod error;
pub mod negotiation;
pub mod pdu;
pub mod retrieve;
pub mod scp;
pub mod scu;
pub mod uid;

/// The Upper Layer PDU types of `dicom-ul`, used for association set-up
/// (re-exported so that callers name one version of them).
pub use dicom_ul::pdu as ul;
