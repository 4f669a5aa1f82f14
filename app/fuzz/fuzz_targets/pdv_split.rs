//! PDV items of a P-DATA-TF body: every item the splitter yields lies
//! inside the body, and it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let mut covered = 0usize;
    for item in dimse::pdu::pdvs(body) {
        match item {
            Ok(pdv) => {
                covered += pdv.data.len() + dimse::pdu::PDV_HEADER_LEN;
                assert!(covered <= body.len(), "a PDV beyond its PDU");
            }
            Err(_) => break,
        }
    }
    if body.len() >= dimse::pdu::PDU_HEADER_LEN {
        let mut head = [0u8; dimse::pdu::PDU_HEADER_LEN];
        head.copy_from_slice(&body[..dimse::pdu::PDU_HEADER_LEN]);
        if let Ok(h) = dimse::pdu::parse_header(&head, 16384) {
            assert!(h.length <= 16384);
        }
    }
});
