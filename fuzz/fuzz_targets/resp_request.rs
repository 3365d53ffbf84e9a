//! `cargo +nightly fuzz run resp_request`: the client request parser must
//! never panic, hang or over-allocate on arbitrary bytes, and what it returns
//! must describe the input it was given.

#![no_main]

use libfuzzer_sys::fuzz_target;
use respite::resp::{Limits, Parse, inline_arg, parse_request};

fuzz_target!(|data: &[u8]| {
    // Small limits so the length checks are reached by short inputs.
    let limits = Limits {
        max_bulk_bytes: 64,
        max_multibulk_len: 16,
        max_inline_bytes: 128,
    };
    let mut off = 0;
    // Parse request after request, as a session does with a pipeline.
    while off < data.len() {
        let rest = &data[off..];
        match parse_request(rest, &limits) {
            Ok(Parse::Complete(p)) => {
                assert!(p.len > 0, "a complete request consumes bytes");
                assert!(p.len <= rest.len(), "request longer than the input");
                assert!(p.args.len() <= limits.max_multibulk_len.max(1 << 10));
                let mut prev_end = 0;
                for r in &p.args {
                    assert!(r.start <= r.end && r.end <= p.len, "range out of bounds");
                    assert!(r.start >= prev_end, "ranges overlap or go backwards");
                    prev_end = r.end;
                    if p.inline {
                        let _ = inline_arg(&rest[r.clone()]);
                    } else {
                        assert!(r.len() <= limits.max_bulk_bytes, "bulk over the limit");
                    }
                }
                // Parsing the same bytes again gives the same answer.
                assert_eq!(parse_request(&rest[..p.len], &limits), Ok(Parse::Complete(p.clone())));
                off += p.len;
            }
            Ok(Parse::Incomplete { need }) => {
                assert!(need > rest.len(), "incomplete but needs no more bytes");
                break;
            }
            Err(_) => break,
        }
    }
});
