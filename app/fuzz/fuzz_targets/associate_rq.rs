//! A-ASSOCIATE-RQ decoding and negotiation: whatever the bytes, reading
//! the request and deciding on it never panics, and an acceptance names
//! only odd, distinct, accepted context IDs, grants the SCP role only on
//! storage contexts (for C-GET) and Storage Commitment contexts (a
//! commitment SCP delivering its report), and answers a role selection only
//! for those. The policy is the service's: find, retrieve and commitment on.
#![no_main]

use std::sync::OnceLock;

use dimse::ae::AeTitle;
use dimse::negotiation::{negotiate, AcceptPolicy, Negotiated, PeerFacts, ServiceClass};
use dimse::ul::UserVariableItem;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    let Ok(rq) = runtime().block_on(dimse::scp::read_associate_rq(&mut stream)) else {
        return;
    };
    let policy = AcceptPolicy {
        ae_title: AeTitle::new("MINIPACS").expect("valid"),
        max_pdu: 16384,
        accept_private_sop_classes: true,
        allow: Vec::new(),
        find: true,
        retrieve: true,
        commitment: true,
    };
    let peer = PeerFacts {
        addr: std::net::IpAddr::from([127, 0, 0, 1]),
        cert_common_names: &[],
    };
    if let Negotiated::Accept { ac, contexts, .. } = negotiate(&rq, &policy, &peer) {
        assert!(!contexts.is_empty());
        for (i, c) in contexts.iter().enumerate() {
            assert_eq!(c.id % 2, 1);
            assert!(contexts[..i].iter().all(|d| d.id != c.id));
            assert!(
                !c.peer_scp_role
                    || c.service == ServiceClass::Storage
                    || c.service == ServiceClass::Commitment
            );
        }
        for item in &ac.user_variables {
            if let UserVariableItem::ScuScpRoleSelectionSubItem(class, roles) = item {
                assert!(roles.scp);
                assert!(contexts
                    .iter()
                    .any(|c| c.peer_scp_role && c.abstract_syntax.as_str() == class));
            }
        }
    }
});
