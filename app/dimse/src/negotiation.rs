//! Association negotiation for the SCP: which A-ASSOCIATE-RQ to accept,
//! which presentation contexts to accept in it, for which service, and with
//! which transfer syntax.
//!
//! Because every data set is stored exactly as received, the SCP never has
//! to understand a transfer syntax: it accepts the first one the SCU proposes
//! for each storage context (dcmtk's `+xa`, private and unknown syntaxes
//! included), which is the one the SCU prefers.
//!
//! For C-GET the requester receives the objects over the same association,
//! so it proposes their storage SOP classes with the SCP role for itself
//! (SCP/SCU Role Selection, PS3.7 D.3.3.4). When retrieve is enabled that
//! role is granted (and answered in the A-ASSOCIATE-AC), and the contexts of
//! those classes are marked: C-GET sub-operations go only to them. They
//! stay usable for the peer's own C-STOREs as well.
//!
//! Storage Commitment Push Model (when enabled, for a peer that may store:
//! it asks us to commit what it stored) is accepted in Implicit or
//! Explicit VR Little Endian only, the syntaxes of
//! [`commitment`](crate::commitment). A peer that asks for the SCP role
//! for it is a Storage Commitment SCP opening an association to deliver
//! its N-EVENT-REPORT to us: the role is granted and answered, and the
//! context marked.

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextResult, PresentationContextResultReason,
    RequestorRoles, UserVariableItem,
};

use crate::ae::AeTitle;
use crate::uid::{self, Uid};

/// The DIMSE service a presentation context was accepted for: a request
/// on it for another service is refused (a C-STORE on the Verification
/// context is not an object to keep).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceClass {
    /// Verification (C-ECHO)
    Verification,
    /// a storage SOP class (C-STORE)
    Storage,
    /// a Query/Retrieve FIND information model, Patient Root or Study
    /// Root (C-FIND; the model is the context's abstract syntax)
    Find,
    /// a Query/Retrieve GET information model, Patient Root or Study Root
    /// (C-GET)
    Get,
    /// a Query/Retrieve MOVE information model, Patient Root or Study Root
    /// (C-MOVE)
    Move,
    /// Storage Commitment Push Model (N-ACTION, N-EVENT-REPORT)
    Commitment,
}

/// A presentation context accepted for the life of an association.
#[derive(Debug, Clone)]
pub struct AcceptedContext {
    /// the presentation context ID (odd, 1..=255)
    pub id: u8,
    /// the abstract syntax (SOP class) it was proposed for
    pub abstract_syntax: Uid,
    /// the transfer syntax we accepted for it
    pub transfer_syntax: Uid,
    /// the service it was accepted for
    pub service: ServiceClass,
    /// the peer (the association requestor) was granted the SCP role for
    /// this abstract syntax by SCP/SCU Role Selection: on a storage
    /// context, C-GET sub-operations (our C-STORE-RQs) are sent on it; on
    /// the Storage Commitment context, the peer is a commitment SCP that
    /// came to deliver N-EVENT-REPORTs. False without a role selection,
    /// when the default roles hold (the peer is SCU only).
    pub peer_scp_role: bool,
    /// the peer may send C-STOREs on this context (a storage context of a
    /// peer granted `store`); false for a storage context accepted only so
    /// that C-GET sub-operations can go to a peer that may not store
    pub peer_may_store: bool,
}

/// The contexts of one association, bounded by the 128 a PDU can propose.
pub type ContextTable = heapless::Vec<AcceptedContext, 128>;

/// Looks up an accepted presentation context by ID.
pub fn find_context(table: &ContextTable, id: u8) -> Option<&AcceptedContext> {
    table.iter().find(|c| c.id == id)
}

/// What the SCP accepts.
#[derive(Debug, Clone)]
pub struct AcceptPolicy {
    /// our AE title; a request calling another is rejected
    pub ae_title: AeTitle,
    /// the largest PDU body we will receive
    pub max_pdu: u32,
    /// accept SOP classes outside the DICOM root (vendors' private storage)
    pub accept_private_sop_classes: bool,
    /// who may associate; empty: anyone who calls our AE title
    pub allow: Vec<Allowed>,
    /// accept the Patient Root and Study Root Query/Retrieve FIND models
    /// (the application answers C-FIND); off, they are refused at
    /// negotiation
    pub find: bool,
    /// accept the Patient Root and Study Root Query/Retrieve GET and MOVE
    /// models (the application answers C-GET and C-MOVE), and grant the
    /// SCP role for storage SOP classes that a C-GET requester asks for;
    /// off, the models are refused at negotiation and no role is granted
    pub retrieve: bool,
    /// accept Storage Commitment Push Model (the application answers
    /// N-ACTION and N-EVENT-REPORT) from peers that may store, and grant
    /// the SCP role for it to a peer that asks (a commitment SCP
    /// delivering a result); off, it is refused at negotiation
    pub commitment: bool,
}

/// One entry of the calling AE title allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// the calling AE title
    pub aetitle: AeTitle,
    /// if set, the only address it may call from
    pub host: Option<std::net::IpAddr>,
    /// if set, the common name its TLS client certificate must carry
    pub cert_name: Option<String>,
    /// the services it may use
    pub grants: Grants,
}

/// The services an allowlist entry grants. Verification (C-ECHO) is always
/// granted: it reveals nothing and is how a peer checks the link. A
/// presentation context for a service not granted is refused at
/// negotiation (user rejection), so the peer learns at once what it may
/// not do, and a request on it cannot reach the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grants {
    /// C-STORE into us, and Storage Commitment (asking us to commit what
    /// it stored, or delivering the result of what we asked it to)
    pub store: bool,
    /// C-FIND
    pub find: bool,
    /// C-GET (its sub-operations go to the peer on storage contexts)
    pub get: bool,
    /// C-MOVE
    pub r#move: bool,
}

impl Grants {
    /// Every service.
    pub const ALL: Grants = Grants {
        store: true,
        find: true,
        get: true,
        r#move: true,
    };
    /// No service but C-ECHO.
    pub const NONE: Grants = Grants {
        store: false,
        find: false,
        get: false,
        r#move: false,
    };

    fn union(self, other: Grants) -> Grants {
        Grants {
            store: self.store || other.store,
            find: self.find || other.find,
            get: self.get || other.get,
            r#move: self.r#move || other.r#move,
        }
    }

    fn permits(self, service: ServiceClass) -> bool {
        match service {
            ServiceClass::Verification => true,
            ServiceClass::Storage | ServiceClass::Commitment => self.store,
            ServiceClass::Find => self.find,
            ServiceClass::Get => self.get,
            ServiceClass::Move => self.r#move,
        }
    }
}

/// What is known of the peer apart from its request.
#[derive(Debug, Clone, Copy)]
pub struct PeerFacts<'a> {
    /// the address it connects from
    pub addr: std::net::IpAddr,
    /// the common name values (CN) of its TLS client certificate's
    /// subject, as parsed from the certificate; empty without one. (Parsed
    /// values, never the subject's text: a comma inside another attribute's
    /// value must not make a name appear.)
    pub cert_common_names: &'a [String],
}

impl Allowed {
    fn admits(&self, calling: &str, peer: &PeerFacts<'_>) -> bool {
        let cn_matches = |name: &str| peer.cert_common_names.iter().any(|cn| cn == name);
        self.aetitle.as_str() == calling
            && self.host.is_none_or(|h| h == peer.addr)
            && self.cert_name.as_deref().is_none_or(cn_matches)
    }
}

/// The outcome of negotiation.
#[derive(Debug)]
pub enum Negotiated {
    /// Accept: the A-ASSOCIATE-AC to send and the accepted contexts.
    Accept {
        /// the response PDU
        ac: AssociationAC,
        /// the contexts the association may use (boxed: 128 entries of
        /// two UIDs each are too large to move around on the stack)
        contexts: Box<ContextTable>,
        /// the largest PDU body the peer accepts from us (0 = no limit)
        peer_max_pdu: u32,
    },
    /// Reject with this A-ASSOCIATE-RJ, for this reason.
    Reject(AssociationRJ, RejectReason),
}

/// Why an A-ASSOCIATE-RQ was rejected, for logs and the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The protocol version bit is not set.
    #[error("protocol version not supported")]
    ProtocolVersion,
    /// Not the DICOM application context.
    #[error("application context name not supported")]
    ApplicationContext,
    /// The called AE title is not ours.
    #[error("called AE title not recognized")]
    CalledAeTitle,
    /// The allowlist does not admit this calling AE title (from this host,
    /// with this certificate).
    #[error("calling AE title not allowed (from this host or certificate)")]
    CallingAeTitle,
    /// No proposed presentation context could be accepted: nothing could be
    /// done on the association, so it is not opened.
    #[error("no acceptable presentation context")]
    NoAcceptableContext,
    /// The association cap is reached (transient: retry later).
    #[error("association limit reached")]
    Busy,
}

/// The A-ASSOCIATE-RJ sent when the association cap is reached: transient,
/// so that the SCU may retry later.
pub fn reject_busy() -> AssociationRJ {
    AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    }
}

/// The Maximum Length sub-item of an association PDU's user information:
/// the largest PDU body the sender of that PDU accepts (0 = no limit).
pub fn max_pdu_of(user_variables: &[UserVariableItem]) -> u32 {
    user_variables
        .iter()
        .find_map(|v| match v {
            UserVariableItem::MaxLength(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

/// Decides on an A-ASSOCIATE-RQ from `peer`.
pub fn negotiate(rq: &AssociationRQ, policy: &AcceptPolicy, peer: &PeerFacts<'_>) -> Negotiated {
    if rq.protocol_version & 1 == 0 {
        return Negotiated::Reject(
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceProviderASCE(
                    AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
                ),
            },
            RejectReason::ProtocolVersion,
        );
    }
    if rq.application_context_name.trim_end_matches(['\0', ' ']) != uid::APPLICATION_CONTEXT {
        return Negotiated::Reject(
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
                ),
            },
            RejectReason::ApplicationContext,
        );
    }
    if rq.called_ae_title.trim() != policy.ae_title.as_str() {
        return Negotiated::Reject(
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CalledAETitleNotRecognized,
                ),
            },
            RejectReason::CalledAeTitle,
        );
    }
    let calling = rq.calling_ae_title.trim();
    // What the entries admitting this peer grant together (all, without
    // an allowlist).
    let grants = if policy.allow.is_empty() {
        Grants::ALL
    } else {
        policy
            .allow
            .iter()
            .filter(|a| a.admits(calling, peer))
            .fold(None, |acc: Option<Grants>, a| {
                Some(acc.map_or(a.grants, |g| g.union(a.grants)))
            })
            .unwrap_or(Grants::NONE)
    };
    if !policy.allow.is_empty() && !policy.allow.iter().any(|a| a.admits(calling, peer)) {
        return Negotiated::Reject(
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized,
                ),
            },
            RejectReason::CallingAeTitle,
        );
    }

    let roles = if grants.get {
        granted_roles(rq, policy, grants.store)
    } else {
        Vec::new()
    };
    let commitment_role = if policy.commitment {
        commitment_role(rq)
    } else {
        None
    };
    let mut contexts = Box::new(ContextTable::new());
    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    for pc in &rq.presentation_contexts {
        let abstract_syntax = pc.abstract_syntax.trim_end_matches(['\0', ' ']);
        let is_verification = abstract_syntax == uid::VERIFICATION;
        let service = if is_verification {
            Some(ServiceClass::Verification)
        } else if policy.find && uid::is_find_sop_class(abstract_syntax) {
            Some(ServiceClass::Find)
        } else if policy.retrieve && uid::is_get_sop_class(abstract_syntax) {
            Some(ServiceClass::Get)
        } else if policy.retrieve && uid::is_move_sop_class(abstract_syntax) {
            Some(ServiceClass::Move)
        } else if policy.commitment && abstract_syntax == uid::STORAGE_COMMITMENT_PUSH_MODEL {
            Some(ServiceClass::Commitment)
        } else if uid::is_storage_sop_class(abstract_syntax, policy.accept_private_sop_classes) {
            Some(ServiceClass::Storage)
        } else {
            None
        };
        let valid_id = pc.id % 2 == 1 && contexts.iter().all(|c| c.id != pc.id);
        let proposed = pc
            .transfer_syntaxes
            .iter()
            .filter_map(|ts| Uid::new(ts.trim_end_matches(['\0', ' '])));
        // For Verification no data set travels: any syntax will do, the
        // default one is the polite choice.
        let chosen = if is_verification {
            let all: Vec<Uid> = proposed.collect();
            all.iter()
                .find(|ts| ts.as_str() == uid::IMPLICIT_VR_LE)
                .or(all.first())
                .cloned()
        } else if matches!(
            service,
            Some(
                ServiceClass::Find
                    | ServiceClass::Get
                    | ServiceClass::Move
                    | ServiceClass::Commitment
            )
        ) {
            // Identifiers and commitment data sets are read and written
            // by the application: only the two uncompressed little-endian
            // syntaxes, the SCU's preference first.
            proposed
                .into_iter()
                .find(|ts| matches!(ts.as_str(), uid::IMPLICIT_VR_LE | uid::EXPLICIT_VR_LE))
        } else {
            proposed.into_iter().next()
        };
        let service = service.filter(|_| valid_id);
        // A storage context of a peer that may not store is still taken
        // for C-GET's sub-operations when it asked for the SCP role.
        let peer_scp_role = match service {
            Some(ServiceClass::Storage) => roles.iter().any(|(class, _)| *class == abstract_syntax),
            Some(ServiceClass::Commitment) => commitment_role.is_some(),
            _ => false,
        };
        let refused = service.is_some_and(|s| !grants.permits(s))
            && !(service == Some(ServiceClass::Storage) && peer_scp_role);
        let (reason, ts) = match (service, chosen, Uid::new(abstract_syntax)) {
            _ if refused => (
                PresentationContextResultReason::UserRejection,
                pc.transfer_syntaxes.first().cloned().unwrap_or_default(),
            ),
            (None, _, _) | (_, _, None) => (
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                pc.transfer_syntaxes.first().cloned().unwrap_or_default(),
            ),
            (Some(_), None, _) => (
                PresentationContextResultReason::TransferSyntaxesNotSupported,
                pc.transfer_syntaxes.first().cloned().unwrap_or_default(),
            ),
            (Some(service), Some(ts), Some(abstract_syntax)) => {
                let text = ts.to_string();
                // Cannot overflow: a PDU proposes at most 128 odd IDs and
                // duplicates were refused above.
                let _ = contexts.push(AcceptedContext {
                    id: pc.id,
                    abstract_syntax,
                    transfer_syntax: ts,
                    service,
                    peer_scp_role,
                    peer_may_store: service == ServiceClass::Storage && grants.store,
                });
                (PresentationContextResultReason::Acceptance, text)
            }
        };
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            transfer_syntax: ts,
        });
    }

    if contexts.is_empty() {
        // As dcmtk's storescp: permanent, by the service user, no reason.
        return Negotiated::Reject(
            AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::NoReasonGiven,
                ),
            },
            RejectReason::NoAcceptableContext,
        );
    }
    let peer_max_pdu = max_pdu_of(&rq.user_variables);

    let mut user_variables = vec![
        UserVariableItem::MaxLength(policy.max_pdu),
        UserVariableItem::ImplementationClassUID(uid::IMPLEMENTATION_CLASS_UID.to_string()),
        UserVariableItem::ImplementationVersionName(uid::IMPLEMENTATION_VERSION_NAME.to_string()),
    ];
    // Only SOP classes with an accepted storage context are answered.
    user_variables.extend(
        roles
            .iter()
            .filter(|(class, _)| {
                contexts
                    .iter()
                    .any(|c| c.peer_scp_role && c.abstract_syntax.as_str() == *class)
            })
            .map(|(class, scu)| {
                UserVariableItem::ScuScpRoleSelectionSubItem(
                    class.to_string(),
                    RequestorRoles {
                        scu: *scu,
                        scp: true,
                    },
                )
            }),
    );
    // The commitment role, when its context was accepted.
    user_variables.extend(
        commitment_role
            .filter(|_| {
                contexts
                    .iter()
                    .any(|c| c.peer_scp_role && c.service == ServiceClass::Commitment)
            })
            .map(|scu| {
                UserVariableItem::ScuScpRoleSelectionSubItem(
                    uid::STORAGE_COMMITMENT_PUSH_MODEL.to_string(),
                    RequestorRoles { scu, scp: true },
                )
            }),
    );
    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: uid::APPLICATION_CONTEXT.to_string(),
        presentation_contexts: results,
        user_variables,
    };
    Negotiated::Accept {
        ac,
        contexts,
        peer_max_pdu,
    }
}

/// The SOP classes for which the requestor proposed the SCP role and gets
/// it (PS3.7 D.3.3.4), each with the SCU role it proposed (granted as
/// proposed: a peer that asks for both roles may also send C-STOREs). The
/// SCP role is granted for storage SOP classes only, and only when
/// retrieve is enabled: it exists here for C-GET. Role items for other
/// classes, or that do not ask for the SCP role, get no answer, which
/// leaves the default roles (PS3.7 D.3.3.4: the requestor is SCU).
fn granted_roles<'a>(
    rq: &'a AssociationRQ,
    policy: &AcceptPolicy,
    may_store: bool,
) -> Vec<(&'a str, bool)> {
    if !policy.retrieve {
        return Vec::new();
    }
    let mut granted: Vec<(&str, bool)> = Vec::new();
    for item in &rq.user_variables {
        let UserVariableItem::ScuScpRoleSelectionSubItem(class, roles) = item else {
            continue;
        };
        let class = class.trim_end_matches(['\0', ' ']);
        if roles.scp
            && uid::is_storage_sop_class(class, policy.accept_private_sop_classes)
            && granted.iter().all(|(c, _)| *c != class)
        {
            // The SCU role (the peer storing to us) only if it may store.
            granted.push((class, roles.scu && may_store));
        }
    }
    granted
}

/// The role item for Storage Commitment Push Model in which the requestor
/// asks for the SCP role, if there is one: granted, with the SCU role as
/// proposed (the first such item counts). This is how a commitment SCP
/// (Orthanc, pynetdicom, dcmtk-based archives) opens an association to
/// deliver its N-EVENT-REPORT to the SCU that asked. An item that asks
/// for the SCU role only gets no answer: the default roles.
fn commitment_role(rq: &AssociationRQ) -> Option<bool> {
    rq.user_variables.iter().find_map(|item| match item {
        UserVariableItem::ScuScpRoleSelectionSubItem(class, roles)
            if roles.scp
                && class.trim_end_matches(['\0', ' ']) == uid::STORAGE_COMMITMENT_PUSH_MODEL =>
        {
            Some(roles.scu)
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    fn policy() -> AcceptPolicy {
        AcceptPolicy {
            ae_title: ae("MINIPACS"),
            max_pdu: 65536,
            accept_private_sop_classes: true,
            allow: Vec::new(),
            find: false,
            retrieve: false,
            commitment: false,
        }
    }

    const PEER: PeerFacts<'static> = PeerFacts {
        addr: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        cert_common_names: &[],
    };

    fn ae(s: &str) -> AeTitle {
        AeTitle::new(s).expect("valid AE title")
    }

    fn echo_only(called: &str) -> AssociationRQ {
        rq(
            called,
            vec![pc(1, uid::VERIFICATION, &[uid::IMPLICIT_VR_LE])],
        )
    }

    #[test]
    fn allowlist_binds_ae_titles_to_hosts_and_certificates() {
        let mut p = policy();
        p.allow = vec![
            Allowed {
                aetitle: ae("SCU"),
                host: Some("10.0.0.5".parse().expect("ip")),
                cert_name: None,
                grants: Grants::ALL,
            },
            Allowed {
                aetitle: ae("CT1"),
                host: None,
                cert_name: Some("ct1.example".into()),
                grants: Grants::ALL,
            },
        ];
        let from = |ip: &str, names: &'static [String]| PeerFacts {
            addr: ip.parse().expect("ip"),
            cert_common_names: names,
        };
        let ct1_names: &'static [String] = Box::leak(Box::new(["ct1.example".to_string()]));
        let ct2_names: &'static [String] = Box::leak(Box::new(["ct2.example".to_string()]));
        let accepted = |r: &AssociationRQ, peer: PeerFacts<'_>| {
            matches!(negotiate(r, &p, &peer), Negotiated::Accept { .. })
        };
        let scu = echo_only("MINIPACS");
        assert!(accepted(&scu, from("10.0.0.5", &[])));
        assert!(!accepted(&scu, from("10.0.0.6", &[])));
        let mut ct1 = echo_only("MINIPACS");
        ct1.calling_ae_title = "CT1".into();
        assert!(accepted(&ct1, from("10.9.9.9", ct1_names)));
        assert!(!accepted(&ct1, from("10.9.9.9", ct2_names)));
        assert!(!accepted(&ct1, from("10.9.9.9", &[])));
        let mut other = echo_only("MINIPACS");
        other.calling_ae_title = "OTHER".into();
        match negotiate(&other, &p, &from("10.0.0.5", &[])) {
            Negotiated::Reject(rj, _) => assert_eq!(
                rj.source,
                AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized
                )
            ),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn rq(called: &str, pcs: Vec<PresentationContextProposed>) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "SCU".into(),
            called_ae_title: called.into(),
            application_context_name: uid::APPLICATION_CONTEXT.into(),
            presentation_contexts: pcs,
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    fn pc(id: u8, abs: &str, ts: &[&str]) -> PresentationContextProposed {
        PresentationContextProposed {
            id,
            abstract_syntax: abs.into(),
            transfer_syntaxes: ts.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn find_models_are_accepted_when_enabled_with_a_little_endian_syntax() {
        let request = rq(
            "MINIPACS",
            vec![
                pc(
                    1,
                    uid::STUDY_ROOT_FIND,
                    &[uid::EXPLICIT_VR_BE, uid::EXPLICIT_VR_LE],
                ),
                pc(3, uid::PATIENT_ROOT_FIND, &[uid::IMPLICIT_VR_LE]),
                pc(5, uid::PATIENT_ROOT_FIND, &["1.2.840.10008.1.2.4.50"]),
                // Patient/Study Only (retired) and MOVE are not FIND models.
                pc(7, "1.2.840.10008.5.1.4.1.2.3.1", &[uid::IMPLICIT_VR_LE]),
                pc(9, "1.2.840.10008.5.1.4.1.2.2.2", &[uid::IMPLICIT_VR_LE]),
            ],
        );
        let mut p = policy();
        p.find = true;
        let Negotiated::Accept { ac, contexts, .. } = negotiate(&request, &p, &PEER) else {
            panic!("expected acceptance");
        };
        use PresentationContextResultReason::*;
        let reasons: Vec<_> = ac
            .presentation_contexts
            .iter()
            .map(|r| r.reason.clone())
            .collect();
        assert_eq!(
            reasons,
            vec![
                Acceptance,
                Acceptance,
                TransferSyntaxesNotSupported,
                AbstractSyntaxNotSupported,
                AbstractSyntaxNotSupported
            ]
        );
        assert_eq!(contexts[0].service, ServiceClass::Find);
        assert_eq!(contexts[0].transfer_syntax.as_str(), uid::EXPLICIT_VR_LE);
        // Off: the same request finds nothing to accept.
        assert!(matches!(
            negotiate(&request, &policy(), &PEER),
            Negotiated::Reject(_, RejectReason::NoAcceptableContext)
        ));
    }

    #[test]
    fn an_allowlist_entry_grants_only_its_services() {
        let mut request = rq(
            "MINIPACS",
            vec![
                pc(1, uid::VERIFICATION, &[uid::IMPLICIT_VR_LE]),
                pc(3, uid::STUDY_ROOT_FIND, &[uid::IMPLICIT_VR_LE]),
                pc(5, uid::STUDY_ROOT_GET, &[uid::IMPLICIT_VR_LE]),
                pc(7, "1.2.840.10008.5.1.4.1.1.2", &[uid::IMPLICIT_VR_LE]),
                pc(9, "1.2.840.10008.5.1.4.1.1.4", &[uid::IMPLICIT_VR_LE]),
            ],
        );
        // The peer asks for both roles for CT, none for MR.
        request
            .user_variables
            .push(UserVariableItem::ScuScpRoleSelectionSubItem(
                "1.2.840.10008.5.1.4.1.1.2".into(),
                RequestorRoles {
                    scu: true,
                    scp: true,
                },
            ));
        let entry = |grants| Allowed {
            aetitle: ae("SCU"),
            host: None,
            cert_name: None,
            grants,
        };
        let outcome = |grants: &[Grants]| {
            let mut p = policy();
            p.find = true;
            p.retrieve = true;
            p.allow = grants.iter().map(|g| entry(*g)).collect();
            match negotiate(&request, &p, &PEER) {
                Negotiated::Accept { ac, contexts, .. } => {
                    use PresentationContextResultReason::*;
                    let accepted: Vec<_> = ac
                        .presentation_contexts
                        .iter()
                        .map(|r| (r.id, r.reason == Acceptance))
                        .collect();
                    let storing: Vec<_> = contexts
                        .iter()
                        .map(|c| (c.id, c.peer_may_store, c.peer_scp_role))
                        .collect();
                    let scu_role = ac.user_variables.iter().find_map(|v| match v {
                        UserVariableItem::ScuScpRoleSelectionSubItem(_, roles) => Some(roles.scu),
                        _ => None,
                    });
                    (accepted, storing, scu_role)
                }
                Negotiated::Reject(..) => panic!("rejected"),
            }
        };
        let store_only = Grants {
            store: true,
            ..Grants::NONE
        };
        let (accepted, storing, _) = outcome(&[store_only]);
        assert_eq!(
            accepted,
            vec![(1, true), (3, false), (5, false), (7, true), (9, true)]
        );
        // No C-GET granted: no SCP role for the peer.
        assert_eq!(
            storing,
            vec![(1, false, false), (7, true, false), (9, true, false)]
        );

        let query_and_get = Grants {
            find: true,
            get: true,
            ..Grants::NONE
        };
        let (accepted, storing, scu_role) = outcome(&[query_and_get]);
        // CT is taken for C-GET's sub-operations only; MR (no role asked)
        // could only be stored into us, which is not granted.
        assert_eq!(
            accepted,
            vec![(1, true), (3, true), (5, true), (7, true), (9, false)]
        );
        assert_eq!(
            storing,
            vec![
                (1, false, false),
                (3, false, false),
                (5, false, false),
                (7, false, true)
            ]
        );
        assert_eq!(
            scu_role,
            Some(false),
            "the role item withholds the SCU role"
        );

        // Two entries for the same peer: their grants add up.
        let (accepted, _, scu_role) = outcome(&[store_only, query_and_get]);
        assert!(accepted.iter().all(|(_, ok)| *ok), "{accepted:?}");
        assert_eq!(scu_role, Some(true));
    }

    #[test]
    fn retrieve_models_are_accepted_when_enabled_and_roles_only_for_storage() {
        let mut request = rq(
            "MINIPACS",
            vec![
                pc(1, uid::PATIENT_ROOT_GET, &[uid::IMPLICIT_VR_LE]),
                pc(3, uid::STUDY_ROOT_MOVE, &["1.2.840.10008.1.2.4.50"]),
                pc(5, uid::STUDY_ROOT_MOVE, &[uid::EXPLICIT_VR_LE]),
                pc(7, "1.2.840.10008.5.1.4.1.1.2", &[uid::IMPLICIT_VR_LE]),
            ],
        );
        let both = RequestorRoles {
            scu: true,
            scp: true,
        };
        request.user_variables.extend([
            UserVariableItem::ScuScpRoleSelectionSubItem(
                "1.2.840.10008.5.1.4.1.1.2\0".into(),
                both,
            ),
            // Asked twice: answered once.
            UserVariableItem::ScuScpRoleSelectionSubItem("1.2.840.10008.5.1.4.1.1.2".into(), both),
            // Not asking for the SCP role: no answer, the default roles.
            UserVariableItem::ScuScpRoleSelectionSubItem(
                uid::PATIENT_ROOT_GET.into(),
                RequestorRoles {
                    scu: true,
                    scp: false,
                },
            ),
        ]);
        let mut p = policy();
        p.retrieve = true;
        let Negotiated::Accept { ac, contexts, .. } = negotiate(&request, &p, &PEER) else {
            panic!("expected acceptance");
        };
        use PresentationContextResultReason::*;
        let reasons: Vec<_> = ac
            .presentation_contexts
            .iter()
            .map(|r| r.reason.clone())
            .collect();
        assert_eq!(
            reasons,
            vec![
                Acceptance,
                TransferSyntaxesNotSupported,
                Acceptance,
                Acceptance
            ]
        );
        let services: Vec<_> = contexts
            .iter()
            .map(|c| (c.id, c.service, c.peer_scp_role))
            .collect();
        assert_eq!(
            services,
            vec![
                (1, ServiceClass::Get, false),
                (5, ServiceClass::Move, false),
                (7, ServiceClass::Storage, true)
            ]
        );
        let roles: Vec<_> = ac
            .user_variables
            .iter()
            .filter(|v| matches!(v, UserVariableItem::ScuScpRoleSelectionSubItem(..)))
            .cloned()
            .collect();
        assert_eq!(
            roles,
            vec![UserVariableItem::ScuScpRoleSelectionSubItem(
                "1.2.840.10008.5.1.4.1.1.2".into(),
                both
            )]
        );
        // Off: only storage, with the default roles.
        let Negotiated::Accept { ac, contexts, .. } = negotiate(&request, &policy(), &PEER) else {
            panic!("expected acceptance");
        };
        assert_eq!(contexts.len(), 1);
        assert!(!contexts[0].peer_scp_role);
        assert_eq!(ac.user_variables.len(), 3);
    }

    #[test]
    fn commitment_is_accepted_when_enabled_and_its_scp_role_granted_when_asked() {
        const COMMIT: &str = uid::STORAGE_COMMITMENT_PUSH_MODEL;
        let request = |roles: &[(&str, bool, bool)]| {
            let mut request = rq(
                "MINIPACS",
                vec![
                    pc(1, COMMIT, &[uid::EXPLICIT_VR_BE, uid::EXPLICIT_VR_LE]),
                    pc(3, COMMIT, &["1.2.840.10008.1.2.4.50"]),
                    pc(5, "1.2.840.10008.5.1.4.1.1.2", &[uid::IMPLICIT_VR_LE]),
                ],
            );
            request
                .user_variables
                .extend(roles.iter().map(|(class, scu, scp)| {
                    UserVariableItem::ScuScpRoleSelectionSubItem(
                        class.to_string(),
                        RequestorRoles {
                            scu: *scu,
                            scp: *scp,
                        },
                    )
                }));
            request
        };
        let outcome = |request: &AssociationRQ, p: &AcceptPolicy| match negotiate(request, p, &PEER)
        {
            Negotiated::Accept { ac, contexts, .. } => {
                let reasons: Vec<_> = ac
                    .presentation_contexts
                    .iter()
                    .map(|r| r.reason.clone())
                    .collect();
                let roles: Vec<_> = ac
                    .user_variables
                    .iter()
                    .filter_map(|v| match v {
                        UserVariableItem::ScuScpRoleSelectionSubItem(class, roles) => {
                            Some((class.clone(), roles.scu, roles.scp))
                        }
                        _ => None,
                    })
                    .collect();
                let marked: Vec<_> = contexts
                    .iter()
                    .map(|c| (c.id, c.service, c.peer_scp_role))
                    .collect();
                (reasons, roles, marked)
            }
            Negotiated::Reject(..) => panic!("rejected"),
        };
        let mut p = policy();
        p.commitment = true;
        use PresentationContextResultReason::*;

        // A commitment SCP delivering a result: SCU role 0, SCP role 1.
        let (reasons, roles, marked) = outcome(&request(&[(COMMIT, false, true)]), &p);
        assert_eq!(
            reasons,
            vec![Acceptance, TransferSyntaxesNotSupported, Acceptance]
        );
        assert_eq!(roles, vec![(COMMIT.to_string(), false, true)]);
        assert_eq!(
            marked,
            vec![
                (1, ServiceClass::Commitment, true),
                (5, ServiceClass::Storage, false)
            ]
        );

        // A modality asking for commitment: no role item, no answer; an
        // item asking for the SCU role only, no answer either; a role for
        // a storage class while retrieve is off, none.
        for roles in [
            &[][..],
            &[(COMMIT, true, false)],
            &[("1.2.840.10008.5.1.4.1.1.2", true, true)],
        ] {
            let (reasons, answered, marked) = outcome(&request(roles), &p);
            assert_eq!(reasons[0], Acceptance);
            assert_eq!(answered, vec![], "{roles:?}");
            assert_eq!(marked[0], (1, ServiceClass::Commitment, false));
        }

        // Off: refused at negotiation, and no role answered.
        let (reasons, roles, _) = outcome(&request(&[(COMMIT, false, true)]), &policy());
        assert_eq!(reasons[0], AbstractSyntaxNotSupported);
        assert_eq!(roles, vec![]);

        // A peer that may not store may not commit either.
        p.allow = vec![Allowed {
            aetitle: ae("SCU"),
            host: None,
            cert_name: None,
            grants: Grants {
                find: true,
                ..Grants::NONE
            },
        }];
        p.find = true;
        let mut with_find = request(&[(COMMIT, false, true)]);
        with_find
            .presentation_contexts
            .push(pc(7, uid::STUDY_ROOT_FIND, &[uid::IMPLICIT_VR_LE]));
        let (reasons, roles, _) = outcome(&with_find, &p);
        assert_eq!(reasons[0], UserRejection);
        assert_eq!(roles, vec![]);
    }

    #[test]
    fn wrong_called_ae_is_rejected() {
        match negotiate(&echo_only("OTHER"), &policy(), &PEER) {
            Negotiated::Reject(rj, _) => {
                assert_eq!(rj.result, AssociationRJResult::Permanent);
                assert_eq!(
                    rj.source,
                    AssociationRJSource::ServiceUser(
                        AssociationRJServiceUserReason::CalledAETitleNotRecognized
                    )
                );
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn contexts_are_accepted_per_policy() {
        let request = rq(
            "MINIPACS",
            vec![
                pc(
                    1,
                    uid::VERIFICATION,
                    &[uid::EXPLICIT_VR_LE, uid::IMPLICIT_VR_LE],
                ),
                pc(3, "1.2.840.10008.5.1.4.1.1.2", &["1.2.840.10008.1.2.4.50"]),
                pc(5, "1.2.840.10008.5.1.4.1.2.2.1", &[uid::IMPLICIT_VR_LE]),
                pc(7, "1.2.840.10008.5.1.4.1.1.4", &["1.2.3.4.5.6.7"]),
                pc(9, "1.2.840.10008.5.1.4.1.1.4", &["not a uid"]),
                pc(9, "1.2.840.10008.5.1.4.1.1.4", &[uid::IMPLICIT_VR_LE]),
            ],
        );
        let Negotiated::Accept {
            ac,
            contexts,
            peer_max_pdu,
        } = negotiate(&request, &policy(), &PEER)
        else {
            panic!("expected acceptance");
        };
        assert_eq!(peer_max_pdu, 16384);
        let reasons: Vec<_> = ac
            .presentation_contexts
            .iter()
            .map(|r| r.reason.clone())
            .collect();
        use PresentationContextResultReason::*;
        assert_eq!(
            reasons,
            vec![
                Acceptance,
                Acceptance,
                AbstractSyntaxNotSupported,
                Acceptance,
                TransferSyntaxesNotSupported,
                Acceptance
            ]
        );
        assert_eq!(
            ac.presentation_contexts[0].transfer_syntax,
            uid::IMPLICIT_VR_LE
        );
        assert_eq!(
            ac.presentation_contexts[1].transfer_syntax,
            "1.2.840.10008.1.2.4.50"
        );
        assert_eq!(contexts.len(), 4);
        assert_eq!(
            find_context(&contexts, 7).map(|c| c.transfer_syntax.as_str()),
            Some("1.2.3.4.5.6.7")
        );
    }

    #[test]
    fn even_context_ids_are_refused() {
        let request = rq(
            "MINIPACS",
            vec![
                pc(2, uid::VERIFICATION, &[uid::IMPLICIT_VR_LE]),
                pc(3, uid::VERIFICATION, &[uid::IMPLICIT_VR_LE]),
            ],
        );
        let Negotiated::Accept { contexts, .. } = negotiate(&request, &policy(), &PEER) else {
            panic!("expected acceptance");
        };
        assert_eq!(contexts.len(), 1);
        assert_eq!(contexts[0].id, 3);
    }

    #[test]
    fn contexts_remember_their_service() {
        let request = rq(
            "MINIPACS",
            vec![
                pc(1, uid::VERIFICATION, &[uid::IMPLICIT_VR_LE]),
                pc(3, "1.2.840.10008.5.1.4.1.1.2", &[uid::IMPLICIT_VR_LE]),
            ],
        );
        let Negotiated::Accept { contexts, .. } = negotiate(&request, &policy(), &PEER) else {
            panic!("expected acceptance");
        };
        assert_eq!(contexts[0].service, ServiceClass::Verification);
        assert_eq!(contexts[1].service, ServiceClass::Storage);
    }

    #[test]
    fn no_acceptable_context_is_a_rejection() {
        let none = rq("MINIPACS", vec![]);
        let query_only = rq(
            "MINIPACS",
            vec![pc(1, "1.2.840.10008.5.1.4.1.2.2.1", &[uid::IMPLICIT_VR_LE])],
        );
        for request in [none, query_only] {
            match negotiate(&request, &policy(), &PEER) {
                Negotiated::Reject(rj, why) => {
                    assert_eq!(why, RejectReason::NoAcceptableContext);
                    assert_eq!(rj.result, AssociationRJResult::Permanent);
                    assert_eq!(
                        rj.source,
                        AssociationRJSource::ServiceUser(
                            AssociationRJServiceUserReason::NoReasonGiven
                        )
                    );
                }
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
    }
}
