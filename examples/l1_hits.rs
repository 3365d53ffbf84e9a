//! A fixed number of L1 hits, for instruction counting: criterion's
//! wall-clock numbers swing on a shared machine, callgrind's do not.
//!
//! valgrind --tool=callgrind --toggle-collect='*l1_hits::hits' \
//!     target/release/examples/l1_hits 100000
//! then divide the collected Ir by the count. `*l1_hits::requests` instead
//! counts the same hits with the request parsed and classified first, as
//! the session does. A second argument fills
//! the entries with that PTTL in ms (default -1: no expiry in Redis). It
//! also prints wall-clock ns per hit, for what that is worth when the
//! machine is busy.

use bytes::Bytes;
use respite::cache::{L1, Lookup};
use respite::command::{self, Args, RawArgs};
use respite::config::{L1Config, L1Mode};
use respite::resp::{Limits, Parse, parse_request};
use respite::upstream::{OutBytes, Reply};
use std::hint::black_box;
use std::sync::Arc;

#[inline(never)]
fn hits(l1: &L1, keys: &[Vec<u8>], n: usize) -> usize {
    let out = Arc::new(OutBytes::default());
    let mut dst = Vec::with_capacity(64 * 1024);
    let mut hit = 0;
    let mut i = 0usize;
    for _ in 0..n {
        i = (i + 7919) % keys.len();
        dst.clear();
        match l1.lookup(0, black_box(&keys[i]), &out, Some(&mut dst)) {
            Lookup::Copied(n) => hit += black_box(&dst).len().min(n),
            Lookup::Hit(f) => hit += black_box(f).len(),
            _ => {}
        }
    }
    hit
}

#[inline(never)]
fn requests(l1: &L1, reqs: &[Vec<u8>], n: usize) -> usize {
    let out = Arc::new(OutBytes::default());
    let limits = Limits::default();
    let mut dst = Vec::with_capacity(64 * 1024);
    let mut hit = 0;
    let mut i = 0usize;
    for _ in 0..n {
        i = (i + 7919) % reqs.len();
        let buf = black_box(&reqs[i][..]);
        let Ok(Parse::Complete(p)) = parse_request(buf, &limits) else {
            panic!("bad request")
        };
        let view = RawArgs {
            buf,
            ranges: &p.args,
        };
        let id = command::lookup(&view);
        black_box(command::classify(&view, id));
        dst.clear();
        match l1.lookup(0, view.arg(1).unwrap_or_default(), &out, Some(&mut dst)) {
            Lookup::Copied(n) => hit += black_box(&dst).len().min(n),
            Lookup::Hit(f) => hit += black_box(f).len(),
            _ => {}
        }
    }
    hit
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let pttl: i64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(-1);
    let l1 = L1::new(&L1Config {
        mode: L1Mode::Ttl,
        ..L1Config::default()
    })
    .unwrap();
    let frame = Bytes::from(format!("$100\r\n{}\r\n", "v".repeat(100)));
    let keys: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("key:{i:06}").into_bytes())
        .collect();
    let out = Arc::new(OutBytes::default());
    for k in &keys {
        if let Lookup::Fill(t, _) = l1.lookup(0, k, &out, None) {
            let outcome = Ok(Reply {
                data: frame.clone(),
                errors: 0,
            });
            l1.complete(&Bytes::copy_from_slice(k), t, Some(&frame), pttl, outcome);
        }
    }
    // Warm up (outside the counted functions): caches and the allocator
    // settle after the inserts.
    for k in keys.iter().cycle().take(20_000) {
        black_box(l1.lookup(0, k, &out, None));
    }
    let reqs: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| {
            let mut r = format!("*2\r\n$3\r\nGET\r\n${}\r\n", k.len()).into_bytes();
            r.extend_from_slice(k);
            r.extend_from_slice(b"\r\n");
            r
        })
        .collect();
    let t = std::time::Instant::now();
    let total = hits(&l1, &keys, n);
    let ns = t.elapsed().as_nanos() as f64 / n.max(1) as f64;
    assert!(n == 0 || total > 0);
    println!("{n} lookups, {total} hit bytes, {ns:.0} ns per lookup");
    let t = std::time::Instant::now();
    let total = requests(&l1, &reqs, n);
    let ns = t.elapsed().as_nanos() as f64 / n.max(1) as f64;
    assert!(n == 0 || total > 0);
    println!("{n} requests, {total} hit bytes, {ns:.0} ns per parse+lookup");
}
