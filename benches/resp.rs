//! Request parsing, reply-frame scanning and classification, against
//! `redis-protocol` as the baseline (DESIGN.md: "use it ... if measurement
//! says so"; these numbers are why the hot path uses respite's own parser).

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use respite::command;
use respite::resp::{FrameScanner, Limits, Parse, parse_request};
use std::hint::black_box;

fn pipeline(n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..n {
        let key = format!("key:{i:06}");
        v.extend_from_slice(format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes());
    }
    v
}

fn parse(c: &mut Criterion) {
    let buf = pipeline(16);
    let limits = Limits::default();
    let mut g = c.benchmark_group("parse_16_gets");
    g.throughput(Throughput::Elements(16));
    g.bench_function("respite", |b| {
        b.iter(|| {
            let mut off = 0;
            while let Ok(Parse::Complete(p)) = parse_request(black_box(&buf[off..]), &limits) {
                off += p.len;
            }
            off
        })
    });
    g.bench_function("redis_protocol_resp2", |b| {
        b.iter(|| {
            let mut off = 0;
            while let Ok(Some((_, n))) =
                redis_protocol::resp2::decode::decode(black_box(&buf[off..]))
            {
                off += n;
            }
            off
        })
    });
    g.bench_function("redis_protocol_resp3", |b| {
        b.iter(|| {
            let mut off = 0;
            while let Ok(Some((_, n))) =
                redis_protocol::resp3::decode::complete::decode(black_box(&buf[off..]))
            {
                off += n;
            }
            off
        })
    });
    g.finish();
}

/// A large reply arriving in 64 KiB reads: the scanner resumes, a decoder
/// without resume state restarts at the frame start on every read.
fn large_reply(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply_in_64k_reads");
    for mb in [1usize, 8] {
        let body = vec![b'x'; mb << 20];
        let mut frame = format!("${}\r\n", body.len()).into_bytes();
        frame.extend_from_slice(&body);
        frame.extend_from_slice(b"\r\n");
        // A 2-element array so the bulk is not the outermost frame.
        let mut arr = b"*2\r\n:1\r\n".to_vec();
        arr.extend_from_slice(&frame);
        g.throughput(Throughput::Bytes(arr.len() as u64));
        g.bench_with_input(BenchmarkId::new("respite_scanner", mb), &arr, |b, arr| {
            b.iter(|| {
                let mut sc = FrameScanner::new();
                let mut end = None;
                let mut have = 0;
                while end.is_none() {
                    have = (have + 65536).min(arr.len());
                    end = sc.next_frame(&arr[..have]).unwrap();
                }
                end
            })
        });
        g.bench_with_input(
            BenchmarkId::new("redis_protocol_resp2", mb),
            &arr,
            |b, arr| {
                b.iter(|| {
                    let mut have = 0;
                    loop {
                        have = (have + 65536).min(arr.len());
                        if let Ok(Some((_, n))) =
                            redis_protocol::resp2::decode::decode_range(&arr[..have])
                        {
                            break n;
                        }
                    }
                })
            },
        );
    }
    g.finish();
}

fn classify(c: &mut Criterion) {
    let args: Vec<Bytes> = vec![Bytes::from_static(b"get"), Bytes::from_static(b"key:1")];
    c.bench_function("lookup_and_classify_get", |b| {
        b.iter(|| {
            let id = command::lookup(black_box(&args[..]));
            command::classify(&args[..], id)
        })
    });
    let args: Vec<Bytes> = vec![
        Bytes::from_static(b"client"),
        Bytes::from_static(b"setname"),
        Bytes::from_static(b"x"),
    ];
    c.bench_function("lookup_and_classify_subcommand", |b| {
        b.iter(|| {
            let id = command::lookup(black_box(&args[..]));
            command::classify(&args[..], id)
        })
    });
}

fn encode(c: &mut Criterion) {
    let args: [&[u8]; 3] = [b"SET", b"key:000001", &[b'v'; 100]];
    c.bench_function("encode_set_100b", |b| {
        b.iter(|| {
            let mut out = bytes::BytesMut::with_capacity(160);
            respite::resp::encode_command(black_box(&args), &mut out);
            out
        })
    });
}

criterion_group!(benches, parse, large_reply, classify, encode);
criterion_main!(benches);
