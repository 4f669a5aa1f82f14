//! The DICOM protocol: Upper Layer PDU framing, association negotiation,
//! DIMSE command sets, and the SCP and SCU sides of C-ECHO and C-STORE.
//! Nothing here opens sockets or chooses policy; `net` does.

pub mod command;
pub mod negotiation;
pub mod pdu;
pub mod scp;
pub mod scu;
pub mod uid;
