//! Paths arrive from every client; parsing must never panic and whatever it
//! accepts must be canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_common::NsPath;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(p) = NsPath::parse(s) {
            assert_eq!(NsPath::parse(p.as_str()).ok().as_ref(), Some(&p));
            assert!(!p.as_str().contains("//"));
        }
    }
});
