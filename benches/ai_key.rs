//! Key generation cost for small (inline) and large (hashed) texts.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use respite::ai::ai_key;
use serde_json::{Map, Value};

/// Mixed ASCII / multi-byte / whitespace text of about `len` bytes, so the
/// word counter sees the kinds of input the vectors use.
fn text_of(len: usize) -> String {
    const WORDS: [&str; 8] = [
        "the",
        "quick",
        "naïve",
        "данные",
        "東京",
        "emoji🙂",
        "a|b",
        "line\nbreak",
    ];
    let mut s = String::with_capacity(len + 16);
    let mut i = 0;
    while s.len() < len {
        s.push_str(WORDS[i % WORDS.len()]);
        s.push(if i % 7 == 0 { '\u{a0}' } else { ' ' });
        i += 1;
    }
    while s.len() > len {
        s.pop();
    }
    s
}

fn bench(c: &mut Criterion) {
    let mut options = Map::new();
    options.insert("max_length".into(), Value::from(100));
    options.insert("lang".into(), Value::from("en"));
    let mut group = c.benchmark_group("ai_key");
    for (name, len) in [("100B", 100), ("10KB", 10 * 1024), ("1MB", 1024 * 1024)] {
        let text = text_of(len);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                ai_key(
                    black_box("summarize"),
                    black_box(&text),
                    Some(&options),
                    Some("What is it about?"),
                    1000,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
