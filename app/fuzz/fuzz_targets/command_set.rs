//! DIMSE command sets: decoding never panics, and what decodes as a
//! C-STORE-RQ re-encodes (typed) into a command that decodes the same.
#![no_main]

use dimse::command::{self, field, Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = Command::decode(data) else {
        return;
    };
    if cmd.command_field == field::C_STORE_RQ {
        if let (Some(class), Some(instance)) = (&cmd.sop_class, &cmd.sop_instance) {
            let again = Command::decode(&command::store_rq(cmd.message_id, class, instance))
                .expect("our encoding decodes");
            assert_eq!(again.sop_class.as_ref(), Some(class));
            assert_eq!(again.sop_instance.as_ref(), Some(instance));
            assert_eq!(again.message_id, cmd.message_id);
        }
    }
});
