//! The L1 hit path: what a GET costs when it is answered from the near
//! cache (parse the request, classify, look up, get the reply frame).
//! rueidis serves a hit in about 160 ns; compare with `l1_hit/parse_and_lookup`.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use respite::cache::{L1, Lookup};
use respite::command::{self, RawArgs};
use respite::config::{L1Config, L1Mode};
use respite::resp::{Limits, Parse, parse_request};
use std::hint::black_box;

fn setup(n: usize, size: usize) -> std::sync::Arc<L1> {
    let l1 = L1::new(&L1Config {
        mode: L1Mode::Ttl,
        ..L1Config::default()
    })
    .unwrap();
    let frame = Bytes::from(format!("${size}\r\n{}\r\n", "v".repeat(size)));
    let out = std::sync::Arc::new(respite::upstream::OutBytes::default());
    for i in 0..n {
        let key = format!("key:{i:06}");
        if let Lookup::Fill(t, _) = l1.lookup(0, key.as_bytes(), &out, None) {
            let outcome = Ok(respite::upstream::Reply {
                data: frame.clone(),
                errors: 0,
            });
            l1.complete(&Bytes::from(key), t, Some(&frame), -1, outcome);
        }
    }
    l1
}

fn hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1_hit");
    g.throughput(Throughput::Elements(1));
    let out = std::sync::Arc::new(respite::upstream::OutBytes::default());
    for size in [100usize, 4096] {
        let l1 = setup(10_000, size);
        // Keys are built beforehand: formatting and allocating one per
        // iteration was part of what this measured, not part of a hit.
        let keys: Vec<Vec<u8>> = (0..10_000)
            .map(|i| format!("key:{i:06}").into_bytes())
            .collect();
        // As the session does: the hit's frame is appended to the output
        // buffer (`Copied`), or shared when larger than the copy limit.
        let mut dst = Vec::with_capacity(64 * 1024);
        g.bench_function(format!("lookup_{size}b"), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 7919) % 10_000;
                dst.clear();
                matches!(
                    l1.lookup(0, black_box(&keys[i]), &out, Some(&mut dst)),
                    Lookup::Copied(_) | Lookup::Hit(_)
                )
            })
        });
        let reqs: Vec<Vec<u8>> = (0..10_000)
            .map(|i| {
                let key = format!("key:{i:06}");
                format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).into_bytes()
            })
            .collect();
        let limits = Limits::default();
        g.bench_function(format!("parse_and_lookup_{size}b"), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 7919) % 10_000;
                dst.clear();
                let buf = &reqs[i];
                let Ok(Parse::Complete(p)) = parse_request(black_box(buf), &limits) else {
                    panic!()
                };
                let view = RawArgs {
                    buf,
                    ranges: &p.args,
                };
                let id = command::lookup(&view);
                let _ = command::classify(&view, id);
                use respite::command::Args;
                matches!(
                    l1.lookup(0, view.arg(1).unwrap(), &out, Some(&mut dst)),
                    Lookup::Copied(_) | Lookup::Hit(_)
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hit);
criterion_main!(benches);
