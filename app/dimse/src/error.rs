//! How an association ends other than by release, as typed causes.
//!
//! Each cause says what the peer did (or what happened to the connection);
//! [`AssociationError::abort_reason`] is the one place that decides which
//! A-ABORT, if any, the peer gets for it, as rustls maps its errors to
//! alerts in one place.

use crate::command::CommandError;
use crate::pdu::{AbortReason, FramingError, PduType};

/// A valid PDU at the wrong moment, or with contents the protocol forbids
/// (PS3.8 §9.2 state machine, PS3.7 §9.3 command rules).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolViolation {
    /// The first PDU of a connection was not an A-ASSOCIATE-RQ.
    #[error("expected A-ASSOCIATE-RQ as the first PDU, got {0:?}")]
    NotAssociateRq(PduType),
    /// An association PDU arrived on an established association.
    #[error("unexpected {0:?} during association")]
    UnexpectedPdu(PduType),
    /// A-RELEASE-RQ while a command or data set was still arriving.
    #[error("A-RELEASE-RQ with a message in progress")]
    ReleaseDuringMessage,
    /// A P-DATA-TF with no PDV item.
    #[error("P-DATA-TF without PDV items")]
    EmptyPData,
    /// A PDV on a presentation context that was not accepted.
    #[error("PDV on presentation context {0}, which was not accepted")]
    UnknownContext(u8),
    /// A command fragment while a data set was arriving.
    #[error("command fragment inside a data set")]
    CommandInsideDataSet,
    /// The fragments of one command set on two presentation contexts.
    #[error("command fragments on different presentation contexts")]
    CommandContextSwitch,
    /// A command set larger than any DIMSE command needs.
    #[error("command set longer than {0} bytes")]
    CommandTooLong(usize),
    /// A command set that cannot be decoded.
    #[error("undecodable command set: {0}")]
    BadCommand(#[source] CommandError),
    /// A C-ECHO-RQ that announces a data set.
    #[error("C-ECHO-RQ with a data set")]
    EchoWithDataSet,
    /// A C-STORE-RQ that announces no data set.
    #[error("C-STORE-RQ without a data set")]
    StoreWithoutDataSet,
    /// A C-FIND-RQ that announces no identifier.
    #[error("C-FIND-RQ without an identifier")]
    FindWithoutIdentifier,
    /// A command other than C-CANCEL-RQ while a C-FIND is answered (no
    /// asynchronous operations are negotiated).
    #[error("command 0x{0:04X} while a C-FIND is answered")]
    CommandDuringFind(u16),
    /// A C-GET-RQ or C-MOVE-RQ that announces no identifier.
    #[error("C-GET-RQ or C-MOVE-RQ without an identifier")]
    RetrieveWithoutIdentifier,
    /// A command other than C-CANCEL-RQ, or the C-STORE-RSP of the
    /// sub-operation in flight, while a C-GET or C-MOVE is performed.
    #[error("command 0x{0:04X} while a C-GET or C-MOVE is performed")]
    CommandDuringRetrieve(u16),
    /// A C-STORE-RSP for another message than the C-STORE-RQ we sent.
    #[error("C-STORE-RSP for message {got}, expected {expected}")]
    WrongResponse {
        /// the Message ID of our C-STORE-RQ
        expected: u16,
        /// the Message ID Being Responded To of the response
        got: u16,
    },
    /// A response without its Status (0000,0900).
    #[error("response without a status")]
    ResponseWithoutStatus,
    /// A command this SCP does not perform (PS3.7 has it abort: there is
    /// no response we could give that the requester expects).
    #[error("unsupported DIMSE command 0x{0:04X}")]
    UnsupportedCommand(u16),
    /// A request in the same PDU as the end of an N-ACTION or
    /// N-EVENT-REPORT (or C-FIND, C-GET, C-MOVE) not yet answered: no
    /// asynchronous operations are negotiated.
    #[error("request 0x{0:04X} before the previous one was answered")]
    RequestBeforeResponse(u16),
    /// A data set fragment with no command announcing it.
    #[error("data set fragment without a command")]
    DataWithoutCommand,
    /// The fragments of one data set on two presentation contexts.
    #[error("data set fragment on another presentation context")]
    DataContextSwitch,
}

impl ProtocolViolation {
    /// The provider's A-ABORT reason (PS3.8 Table 9-26) for this violation.
    pub fn abort_reason(&self) -> AbortReason {
        match self {
            ProtocolViolation::NotAssociateRq(_)
            | ProtocolViolation::UnexpectedPdu(_)
            | ProtocolViolation::ReleaseDuringMessage => AbortReason::UnexpectedPdu,
            ProtocolViolation::EmptyPData => AbortReason::InvalidPduParameter,
            ProtocolViolation::UnknownContext(_)
            | ProtocolViolation::CommandInsideDataSet
            | ProtocolViolation::CommandContextSwitch
            | ProtocolViolation::CommandTooLong(_)
            | ProtocolViolation::BadCommand(_)
            | ProtocolViolation::EchoWithDataSet
            | ProtocolViolation::StoreWithoutDataSet
            | ProtocolViolation::FindWithoutIdentifier
            | ProtocolViolation::CommandDuringFind(_)
            | ProtocolViolation::RetrieveWithoutIdentifier
            | ProtocolViolation::CommandDuringRetrieve(_)
            | ProtocolViolation::WrongResponse { .. }
            | ProtocolViolation::ResponseWithoutStatus
            | ProtocolViolation::UnsupportedCommand(_)
            | ProtocolViolation::RequestBeforeResponse(_)
            | ProtocolViolation::DataWithoutCommand
            | ProtocolViolation::DataContextSwitch => AbortReason::UnexpectedPduParameter,
        }
    }
}

/// Why an association (or a connection that was to become one) ended other
/// than by an orderly release.
#[derive(Debug, thiserror::Error)]
pub enum AssociationError {
    /// The byte stream was not valid PDUs, or the connection failed.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Violation(#[from] ProtocolViolation),
    /// The A-ASSOCIATE-RQ could not be decoded.
    #[error("undecodable A-ASSOCIATE-RQ: {0}")]
    BadAssociateRq(#[source] dicom_ul::pdu::ReadError),
    /// The peer aborted.
    #[error("peer sent A-ABORT")]
    PeerAborted,
    /// The peer was silent for longer than the DIMSE timeout.
    #[error("no data for {0} s (DIMSE timeout)")]
    Timeout(u64),
    /// A data set we were sending (a C-GET sub-operation) could not be read
    /// to its end: part of it is on the wire and there is no way in DIMSE
    /// to take it back, so the association is aborted.
    #[error("reading the data set of {sop_instance} to send: {source}")]
    SubOperationData {
        /// the SOP instance being sent
        sop_instance: crate::uid::Uid,
        /// why it could not be read
        #[source]
        source: std::io::Error,
    },
    /// The caller stopped the association between messages (the service
    /// shutting down, or the association given up to make room).
    #[error("stopped by the service")]
    Stopped,
}

impl From<std::io::Error> for AssociationError {
    fn from(e: std::io::Error) -> Self {
        AssociationError::Framing(FramingError::Io(e))
    }
}

impl AssociationError {
    /// The A-ABORT the peer gets for this error, or `None` when it cannot
    /// read one (the connection is gone, it aborted itself, or it speaks
    /// TLS where we expect DICOM and would read our PDU as garbage).
    pub fn abort_reason(&self) -> Option<AbortReason> {
        match self {
            AssociationError::Framing(FramingError::Io(_))
            | AssociationError::Framing(FramingError::TlsOnPlainPort)
            | AssociationError::PeerAborted => None,
            AssociationError::Framing(FramingError::UnknownPduType(_)) => {
                Some(AbortReason::UnrecognizedPdu)
            }
            AssociationError::Framing(_) | AssociationError::BadAssociateRq(_) => {
                Some(AbortReason::InvalidPduParameter)
            }
            AssociationError::Violation(v) => Some(v.abort_reason()),
            AssociationError::Timeout(_)
            | AssociationError::Stopped
            | AssociationError::SubOperationData { .. } => Some(AbortReason::NotSpecified),
        }
    }

    /// True when the connection itself failed (reset, closed, unreadable),
    /// as opposed to the peer or we ending the association.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, AssociationError::Framing(FramingError::Io(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_maps_to_one_abort() {
        assert_eq!(
            AssociationError::from(ProtocolViolation::EmptyPData).abort_reason(),
            Some(AbortReason::InvalidPduParameter)
        );
        assert_eq!(
            AssociationError::from(ProtocolViolation::UnexpectedPdu(PduType::AssociateRq))
                .abort_reason(),
            Some(AbortReason::UnexpectedPdu)
        );
        assert_eq!(
            AssociationError::from(ProtocolViolation::UnsupportedCommand(0x20)).abort_reason(),
            Some(AbortReason::UnexpectedPduParameter)
        );
        assert_eq!(AssociationError::PeerAborted.abort_reason(), None);
        assert_eq!(
            AssociationError::Framing(FramingError::TlsOnPlainPort).abort_reason(),
            None
        );
        assert_eq!(
            AssociationError::Framing(FramingError::UnknownPduType(9)).abort_reason(),
            Some(AbortReason::UnrecognizedPdu)
        );
        assert!(
            AssociationError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
                .is_connection_lost()
        );
    }
}
