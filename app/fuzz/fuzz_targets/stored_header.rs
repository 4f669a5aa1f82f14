//! The stored-header scanner (Study and Series Instance UIDs for the
//! `study` layout) over any data set, in each transfer syntax family the
//! store takes (the first byte chooses: implicit LE, explicit LE, explicit
//! BE, deflate): it returns without panicking, and whatever it returns is
//! a valid UID (it becomes a folder name).
#![no_main]

use dimse::uid::{self, Uid};
use libfuzzer_sys::fuzz_target;
use minipacs::store::header::study_and_series_in;

fuzz_target!(|data: &[u8]| {
    let Some((&which, dataset)) = data.split_first() else {
        return;
    };
    let ts = match which % 4 {
        0 => uid::IMPLICIT_VR_LE,
        1 => uid::EXPLICIT_VR_LE,
        2 => uid::EXPLICIT_VR_BE,
        _ => uid::DEFLATED_EXPLICIT_VR_LE,
    };
    let ts = Uid::new(ts).expect("valid");
    let (study, series) = study_and_series_in(dataset, &ts);
    for found in [study, series].into_iter().flatten() {
        assert!(uid::is_valid_uid(found.as_str()));
    }
});
