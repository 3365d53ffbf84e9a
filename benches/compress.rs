//! Throughput of the value codec on JSON-like payloads, the typical content
//! of a cached string. Run with `cargo bench --bench compress`; the
//! compression ratio for each size is printed before the measurements.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use respite::compress::Codec;

const SIZES: [(usize, &str); 3] = [
    (1 << 10, "1KiB"),
    (16 << 10, "16KiB"),
    (256 << 10, "256KiB"),
];

/// Deterministic xorshift so every run benchmarks the same bytes.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// An API-response-like array of records. Field names repeat (as in real
/// JSON) while ids, numbers, words and timestamps vary, so the ratio is
/// realistic rather than the near-infinite one of a repeated byte.
fn json_like(len: usize) -> Vec<u8> {
    const FIRST: &[&str] = &[
        "Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances", "Edsger",
        "Radia", "Donald", "Shafi",
    ];
    const LAST: &[&str] = &[
        "Lovelace",
        "Hopper",
        "Torvalds",
        "Liskov",
        "Thompson",
        "Hamilton",
        "Ritchie",
        "Allen",
        "Dijkstra",
        "Perlman",
        "Knuth",
        "Goldwasser",
    ];
    const WORDS: &[&str] = &[
        "cache", "latency", "replica", "shard", "eviction", "pipeline", "cluster", "failover",
        "snapshot", "stream", "keyspace", "ttl", "proxy", "backend", "quorum", "lease",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut pick = |list: &[&'static str]| list[rng.below(list.len() as u64) as usize];
    let mut out = String::with_capacity(len + 512);
    out.push_str(r#"{"page":1,"items":["#);
    let mut id = 100_000u64;
    while out.len() < len {
        id += 1 + u64::from(pick(&["1", "2", "3"]).as_bytes()[0] - b'0');
        let (first, last) = (pick(FIRST), pick(LAST));
        let summary = (0..6).map(|_| pick(WORDS)).collect::<Vec<_>>().join(" ");
        let mut n = Rng(id.wrapping_mul(2_654_435_761));
        out.push_str(&format!(
            concat!(
                r#"{{"id":{},"name":"{} {}","email":"{}.{}@example.com","#,
                r#""balance":{}.{:02},"visits":{},"active":{},"#,
                r#""created_at":"2024-{:02}-{:02}T{:02}:{:02}:{:02}Z","#,
                r#""tags":["{}","{}"],"summary":"{}"}},"#
            ),
            id,
            first,
            last,
            first.to_lowercase(),
            last.to_lowercase(),
            n.below(100_000),
            n.below(100),
            n.below(5_000),
            n.below(4) != 0,
            1 + n.below(12),
            1 + n.below(28),
            n.below(24),
            n.below(60),
            n.below(60),
            pick(WORDS),
            pick(WORDS),
            summary,
        ));
    }
    out.truncate(len);
    out.into_bytes()
}

fn bench_codec(c: &mut Criterion) {
    let codec = Codec::default();
    let inputs: Vec<_> = SIZES
        .iter()
        .map(|&(len, name)| {
            let value = json_like(len);
            let frame = codec.encode(&value).expect("JSON-like input compresses");
            eprintln!(
                "{name}: {} -> {} bytes, ratio {:.2}x ({:.1}% saved)",
                value.len(),
                frame.len(),
                value.len() as f64 / frame.len() as f64,
                100.0 * (1.0 - frame.len() as f64 / value.len() as f64),
            );
            (name, value, frame)
        })
        .collect();

    let mut group = c.benchmark_group("compress");
    for (name, value, _) in &inputs {
        group.throughput(Throughput::Bytes(value.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), value, |b, v| {
            b.iter(|| codec.encode(black_box(v)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decompress");
    for (name, value, frame) in &inputs {
        // Throughput in original bytes, so both groups are comparable.
        group.throughput(Throughput::Bytes(value.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), frame, |b, f| {
            b.iter(|| codec.decode(black_box(f)).unwrap())
        });
    }
    group.finish();

    // The cost of trying and giving up, paid on every large incompressible SET.
    let mut rng = Rng(42);
    let noise: Vec<u8> = (0..16 << 10).map(|_| rng.below(256) as u8).collect();
    assert!(codec.encode(&noise).is_none());
    let mut group = c.benchmark_group("compress_incompressible");
    group.throughput(Throughput::Bytes(noise.len() as u64));
    group.bench_function("16KiB", |b| b.iter(|| codec.encode(black_box(&noise))));
    group.finish();

    // Unmarked values must stay close to free on the read path.
    let plain = Bytes::from(json_like(16 << 10));
    let mut group = c.benchmark_group("decode_passthrough");
    group.throughput(Throughput::Bytes(plain.len() as u64));
    group.bench_function("16KiB", |b| b.iter(|| codec.decode(black_box(&plain))));
    group.finish();
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
