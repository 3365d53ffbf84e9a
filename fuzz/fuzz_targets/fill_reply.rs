//! `cargo +nightly fuzz run fill_reply`: what an upstream sends back for an
//! L1 fill (`MULTI; [SELECT n;] PTTL k; <read>; [SELECT base;] EXEC`) is
//! parsed without panicking whatever it is, and aggregate frames split into
//! elements that make up exactly the frame.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use respite::cache::split_fill_reply;
use respite::resp::elements;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    if let Ok((_, frame)) = split_fill_reply(body, flags & 1 == 1) {
        check_elements(&frame);
    }
    check_elements(&Bytes::copy_from_slice(body));
});

fn check_elements(frame: &Bytes) {
    let Some(elems) = elements(frame) else {
        return;
    };
    let header = frame.iter().position(|&b| b == b'\n').expect("a header line") + 1;
    let joined: Vec<u8> = elems.iter().flat_map(|e| e.iter().copied()).collect();
    assert_eq!(&frame[header..], &joined[..], "elements do not make up the frame");
    for e in &elems {
        assert!(!e.is_empty());
    }
}
