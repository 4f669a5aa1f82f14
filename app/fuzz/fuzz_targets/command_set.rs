//! DIMSE command sets: decoding never panics, and what decodes as a
//! C-STORE-RQ (with its Move Originator fields), a C-MOVE-RQ (with its
//! Move Destination) or a C-GET/C-MOVE-RSP (with its sub-operation counts
//! and comment) re-encodes (typed) into a command that decodes the same.
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
            let originator = cmd.move_originator();
            let again = Command::decode(&command::store_rq_with(
                cmd.message_id,
                class,
                instance,
                cmd.priority,
                originator.as_ref(),
            ))
            .expect("our encoding decodes");
            assert_eq!(again.move_originator(), originator);
            assert_eq!(again.priority, cmd.priority);
        }
    }
    if let (field::C_MOVE_RQ, Some(class), Some(destination)) =
        (cmd.command_field, &cmd.sop_class, &cmd.move_destination)
    {
        let again = Command::decode(&command::move_rq(
            cmd.message_id,
            class,
            cmd.priority,
            destination,
        ))
        .expect("our encoding decodes");
        assert_eq!(again.move_destination.as_ref(), Some(destination));
    }
    if matches!(cmd.command_field, field::C_GET_RSP | field::C_MOVE_RSP) {
        if let (Some(class), Some(code)) = (&cmd.sop_class, cmd.status) {
            let again = Command::decode(&command::get_rsp(
                cmd.message_id,
                class,
                code,
                &cmd.sub_operations,
                cmd.has_data_set,
                cmd.error_comment.as_deref(),
            ))
            .expect("our encoding decodes");
            assert_eq!(again.sub_operations, cmd.sub_operations);
            assert_eq!(again.status, Some(code));
            assert_eq!(again.error_comment, cmd.error_comment);
        }
    }
});
