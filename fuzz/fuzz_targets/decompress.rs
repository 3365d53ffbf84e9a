//! `cargo +nightly fuzz run decompress`: decoding arbitrary stored bytes must
//! never panic, hang or over-allocate, and encode -> decode must give back
//! any input exactly.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use respite::compress::{Codec, FORMAT_VERSION, MAGIC, decoded_len, is_compressed};

fuzz_target!(|data: &[u8]| {
    // A small limit makes a missed header check show up as libFuzzer's
    // out-of-memory crash instead of a silently huge allocation.
    let strict = Codec {
        max_decompressed_bytes: 1 << 20,
        ..Codec::default()
    };
    check_decode(&strict, data);

    // Random bytes almost never form a valid header, so also put them
    // behind one to reach the LZ4 decoder: the first byte picks the
    // algorithm, the next two the declared length.
    if let [algorithm, lo, hi, payload @ ..] = data {
        let mut framed = MAGIC.to_vec();
        framed.extend([FORMAT_VERSION, algorithm & 1]);
        push_leb128(&mut framed, u16::from_le_bytes([*lo, *hi]).into());
        framed.extend_from_slice(payload);
        check_decode(&strict, &framed);
    }

    let eager = Codec {
        min_bytes: 0,
        min_saving: 0.0,
        ..Codec::default()
    };
    for codec in [Codec::default(), eager] {
        let encoded = codec.encode(data);
        if is_compressed(data) {
            assert!(encoded.is_some(), "magic-prefixed input left unframed");
        }
        let stored = encoded.unwrap_or_else(|| Bytes::copy_from_slice(data));
        let decoded = codec.decode(&stored).expect("decoding our own frame");
        assert_eq!(decoded, data);
        assert_eq!(decoded_len(&stored), Some(data.len()));
    }
});

fn check_decode(codec: &Codec, stored: &[u8]) {
    let owned = codec.decode(&Bytes::copy_from_slice(stored));
    let borrowed = codec.decode_slice(stored);
    match (&owned, &borrowed) {
        (Ok(a), Ok(b)) => assert_eq!(&a[..], &b[..]),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("decode and decode_slice disagree: {owned:?} vs {borrowed:?}"),
    }
    // The reply path decodes straight into the output buffer.
    let mut out = BytesMut::from(&b"+x\r\n"[..]);
    let framed = codec.decode_bulk_into(stored, &mut out);
    match (&owned, framed) {
        (Ok(v), Ok(())) => {
            let head = format!("+x\r\n${}\r\n", v.len());
            assert_eq!(&out[..head.len()], head.as_bytes());
            assert_eq!(&out[head.len()..out.len() - 2], &v[..]);
            assert_eq!(&out[out.len() - 2..], b"\r\n");
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, &b);
            assert_eq!(&out[..], b"+x\r\n", "output changed on error");
        }
        (a, b) => panic!("decode and decode_bulk_into disagree: {a:?} vs {b:?}"),
    }
    if let Ok(value) = owned {
        assert_eq!(decoded_len(stored), Some(value.len()));
        if !is_compressed(stored) {
            assert_eq!(value, stored);
        }
    }
}

/// Written independently of the library's encoder so the two cross-check.
fn push_leb128(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}
