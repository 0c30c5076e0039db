//! Every byte sequence a peer can send to a worker's data port goes through
//! `Message::decode`; it must return a frame, "incomplete" or an error, and
//! never panic or allocate what the header claims before checking limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_proto::data::Message;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((msg, used))) = Message::decode(rest) {
        // Whatever decodes must survive an encode/decode round trip.
        let again = msg.encode();
        let (back, n) = Message::decode(&again).ok().flatten().expect("re-decode");
        assert_eq!(back, msg);
        assert_eq!(n, again.len());
        rest = &rest[used..];
    }
});
