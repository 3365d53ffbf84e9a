//! Transparent compression: respite with compression on must answer every
//! string and hash command exactly as Redis does, while storing large values
//! compressed.

mod common;

use common::*;
use respite::compress::MAGIC;
use std::io::Read;

/// Reads exactly one reply frame.
fn read_reply(r: &mut Raw) -> Vec<u8> {
    r.read_reply()
}

/// Reads `n` replies that arrived back to back (pipeline).
fn read_replies(r: &mut Raw, n: usize) -> Vec<Vec<u8>> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut sc = respite::resp::FrameScanner::new();
    let mut chunk = vec![0u8; 1 << 16];
    while out.len() < n {
        if let Some(end) = sc.next_frame(&buf).unwrap() {
            out.push(buf[..end].to_vec());
            buf.drain(..end);
            sc.reset();
            continue;
        }
        let m = r.s.read(&mut chunk).expect("reply within timeout");
        assert!(m > 0, "connection closed");
        buf.extend_from_slice(&chunk[..m]);
    }
    out
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const STRS: &[&str] = &["s0", "s1", "s2", "s3", "s4", "n0"];
const HASHES: &[&str] = &["h0", "h1", "h2"];
const FIELDS: &[&str] = &["f0", "f1", "f2", "f3"];

fn value(rng: &mut Rng) -> Vec<u8> {
    let size = match rng.below(100) {
        0..=9 => rng.below(16) as usize,
        10..=59 => 16 + rng.below(300) as usize,
        60..=89 => 300 + rng.below(6000) as usize,
        90..=98 => 6000 + rng.below(100_000) as usize,
        _ => 1 << 20,
    };
    match rng.below(10) {
        // JSON-like, compressible.
        0..=4 => {
            let mut v = Vec::with_capacity(size + 64);
            let mut i = rng.below(1000);
            while v.len() < size {
                v.extend_from_slice(
                    format!("{{\"id\":{i},\"name\":\"user{i}\",\"tags\":[\"a\",\"b\"]}},")
                        .as_bytes(),
                );
                i += 1;
            }
            v.truncate(size);
            v
        }
        // Incompressible binary.
        5..=7 => (0..size).map(|_| rng.next() as u8).collect(),
        // Looks like a frame.
        8 => {
            let mut v = MAGIC.to_vec();
            v.extend((0..size).map(|_| rng.next() as u8));
            v
        }
        // Numbers.
        _ => rng.below(100_000).to_string().into_bytes(),
    }
}

fn small(rng: &mut Rng) -> Vec<u8> {
    let n = rng.below(40) as usize;
    (0..n).map(|_| b'a' + (rng.next() % 3) as u8).collect()
}

fn int(rng: &mut Rng, lo: i64, hi: i64) -> Vec<u8> {
    (lo + rng.below((hi - lo) as u64) as i64)
        .to_string()
        .into_bytes()
}

fn command(rng: &mut Rng) -> Vec<Vec<u8>> {
    let s = |rng: &mut Rng| rng.pick(STRS).as_bytes().to_vec();
    let h = |rng: &mut Rng| rng.pick(HASHES).as_bytes().to_vec();
    let f = |rng: &mut Rng| rng.pick(FIELDS).as_bytes().to_vec();
    // Sometimes the wrong type, for WRONGTYPE errors.
    let any = |rng: &mut Rng| {
        if rng.below(10) == 0 {
            rng.pick(HASHES).as_bytes().to_vec()
        } else {
            rng.pick(STRS).as_bytes().to_vec()
        }
    };
    let b = |x: &str| x.as_bytes().to_vec();
    match rng.below(52) {
        0..=3 => {
            let mut c = vec![b("SET"), any(rng), value(rng)];
            match rng.below(6) {
                0 => c.extend([b("EX"), b("1000")]),
                1 => c.push(b("KEEPTTL")),
                2 => c.push(b("GET")),
                3 => c.extend([b("NX"), b("GET")]),
                4 => c.push(b("XX")),
                _ => {}
            }
            c
        }
        4 => vec![b("SETEX"), s(rng), b("1000"), value(rng)],
        5 => vec![b("PSETEX"), s(rng), b("1000000"), value(rng)],
        6 => vec![b("SETNX"), s(rng), value(rng)],
        7 => vec![b("GETSET"), any(rng), value(rng)],
        8 => vec![b("MSET"), s(rng), value(rng), s(rng), value(rng)],
        9 => vec![b("MSETNX"), s(rng), value(rng)],
        10..=13 => vec![b("GET"), any(rng)],
        14 => vec![b("MGET"), s(rng), any(rng), b("missing")],
        15 => vec![b("GETEX"), s(rng), b("PERSIST")],
        16 => vec![b("GETDEL"), any(rng)],
        17 => vec![b("STRLEN"), any(rng)],
        18 => vec![
            b("GETRANGE"),
            any(rng),
            int(rng, -500, 500),
            int(rng, -500, 5000),
        ],
        19 => vec![b("SUBSTR"), s(rng), int(rng, 0, 100), int(rng, 0, 300)],
        20 => vec![b("APPEND"), any(rng), small(rng)],
        21 => vec![b("SETRANGE"), any(rng), int(rng, 0, 3000), small(rng)],
        22 => vec![b("INCR"), any(rng)],
        23 => vec![b("INCRBY"), s(rng), int(rng, -100, 100)],
        24 => vec![b("INCRBYFLOAT"), s(rng), b("1.5")],
        25 => vec![b("DECR"), s(rng)],
        26 => vec![b("DECRBY"), s(rng), int(rng, -100, 100)],
        27 => vec![b("GETBIT"), any(rng), int(rng, 0, 20000)],
        28 => vec![b("SETBIT"), s(rng), int(rng, 0, 20000), int(rng, 0, 2)],
        29 => vec![b("BITCOUNT"), any(rng)],
        30 => vec![b("BITCOUNT"), s(rng), int(rng, -50, 50), int(rng, -50, 500)],
        31 => vec![b("BITPOS"), s(rng), int(rng, 0, 2)],
        32 => vec![
            b("BITFIELD"),
            s(rng),
            b("GET"),
            b("u8"),
            int(rng, 0, 800),
            b("INCRBY"),
            b("u4"),
            int(rng, 0, 800),
            b("3"),
        ],
        33 => vec![
            b("BITFIELD_RO"),
            s(rng),
            b("GET"),
            b("i16"),
            int(rng, 0, 800),
        ],
        34 => vec![b("BITOP"), b("AND"), b("s4"), s(rng), s(rng)],
        35 => {
            // Small values only: LCS is quadratic.
            if rng.below(2) == 0 {
                vec![b("SET"), b("lcs0"), value_small_json(rng)]
            } else {
                vec![b("LCS"), b("lcs0"), b("lcs1"), b("LEN")]
            }
        }
        36 => vec![b("SET"), b("lcs1"), value_small_json(rng)],
        37 => {
            let mut c = vec![b("HSET"), h(rng)];
            for _ in 0..=rng.below(3) {
                c.push(f(rng));
                c.push(value(rng));
            }
            c
        }
        38 => vec![b("HMSET"), h(rng), f(rng), value(rng)],
        39 => vec![b("HSETNX"), h(rng), f(rng), value(rng)],
        40 => vec![b("HGET"), h(rng), f(rng)],
        41 => vec![b("HMGET"), h(rng), f(rng), f(rng), b("nofield")],
        42 => match rng.below(3) {
            0 => vec![b("HGETALL"), h(rng)],
            1 => vec![b("HVALS"), h(rng)],
            _ => vec![b("HRANDFIELD"), h(rng), b("100"), b("WITHVALUES")],
        },
        43 => vec![b("HSTRLEN"), h(rng), f(rng)],
        44 => vec![b("HINCRBY"), h(rng), f(rng), int(rng, -10, 10)],
        45 => vec![b("HINCRBYFLOAT"), h(rng), f(rng), b("0.25")],
        46 => {
            // LCS keys: compressible, incompressible, or a hash.
            let k = if rng.below(2) == 0 { "lcs0" } else { "lcs1" };
            match rng.below(3) {
                0 => vec![b("SET"), b(k), value_small_json(rng)],
                1 => {
                    let n = 20 + rng.below(150) as usize;
                    vec![b("SET"), b(k), (0..n).map(|_| rng.next() as u8).collect()]
                }
                _ => vec![b("HSET"), b("lcsh"), b("f"), b("v")],
            }
        }
        _ => read_command(rng),
    }
}

/// The byte-level readers with their options, and argument errors.
fn read_command(rng: &mut Rng) -> Vec<Vec<u8>> {
    let s = |rng: &mut Rng| rng.pick(STRS).as_bytes().to_vec();
    let b = |x: &str| x.as_bytes().to_vec();
    let unit = |rng: &mut Rng| b(rng.pick(&["BYTE", "BIT", "byte"]));
    match rng.below(16) {
        0 => vec![
            b("BITCOUNT"),
            s(rng),
            int(rng, -100, 100),
            int(rng, -100, 3000),
            unit(rng),
        ],
        1 => vec![
            b("BITPOS"),
            s(rng),
            int(rng, 0, 2),
            int(rng, -100, 100),
            int(rng, -100, 3000),
            unit(rng),
        ],
        2 => vec![b("BITPOS"), s(rng), int(rng, 0, 2), int(rng, -100, 300)],
        3 => vec![
            b("BITFIELD"),
            s(rng),
            b("GET"),
            b("u8"),
            int(rng, 0, 8000),
            b("OVERFLOW"),
            b("SAT"),
            b("GET"),
            b("i5"),
            int(rng, 0, 800),
        ],
        4 => vec![b("SETRANGE"), s(rng), int(rng, 0, 3000), b("")],
        5 => {
            let k1 = b(rng.pick(&["lcs0", "lcs1", "lcsh", "missing"]));
            let k2 = b(rng.pick(&["lcs0", "lcs1"]));
            let mut c = vec![b("LCS"), k1, k2];
            match rng.below(4) {
                0 => {}
                1 => c.push(b("LEN")),
                2 => c.extend([b("IDX"), b("MINMATCHLEN"), int(rng, 0, 6)]),
                _ => c.extend([b("IDX"), b("WITHMATCHLEN")]),
            }
            c
        }
        6 => vec![b("LCS"), b("lcs0"), b("lcs0"), b("IDX")],
        7 => vec![b("GETRANGE"), s(rng), b("x"), b("10")],
        8 => vec![
            b("GETBIT"),
            s(rng),
            b(rng.pick(&["-1", "abc", "4294967296"])),
        ],
        9 => vec![b("BITCOUNT"), s(rng), int(rng, 0, 10)],
        10 => vec![b("BITCOUNT"), s(rng), b("0"), b("1"), b("WORD")],
        11 => vec![b("BITPOS"), s(rng), b("2")],
        12 => vec![b("BITFIELD_RO"), s(rng), b("GET"), b("x8"), b("0")],
        13 => vec![b("BITFIELD_RO"), s(rng), b("SET"), b("u8"), b("0"), b("1")],
        14 => vec![b("LCS"), b("lcs0"), b("lcs1"), b("NOPE")],
        _ => vec![b("STRLEN"), s(rng), b("extra")],
    }
}

fn value_small_json(rng: &mut Rng) -> Vec<u8> {
    let n = rng.below(200) as usize;
    let mut v = Vec::new();
    while v.len() < n {
        v.extend_from_slice(b"{\"a\":1,\"b\":[1,2,3]}");
        if rng.below(3) == 0 {
            v.push(b'x');
        }
    }
    v.truncate(n);
    v
}

/// Hash iteration order depends on Redis' internal encoding, which depends
/// on the stored size (listpack vs hashtable), so replies whose order Redis
/// leaves unspecified are compared as multisets.
fn normalize(cmd: &[u8], reply: Vec<u8>) -> Vec<u8> {
    let name = String::from_utf8_lossy(cmd).to_ascii_uppercase();
    if !matches!(name.as_str(), "HGETALL" | "HVALS" | "HRANDFIELD") {
        return reply;
    }
    let Some(items) = bulk_items(&reply) else {
        return reply;
    };
    let mut parts: Vec<Vec<u8>> = if name == "HVALS" {
        items
    } else {
        items.chunks(2).map(|c| c.concat()).collect()
    };
    parts.sort();
    parts.concat()
}

/// The elements of a flat array of bulk strings, each with its header.
fn bulk_items(reply: &[u8]) -> Option<Vec<Vec<u8>>> {
    let line = |p: usize| -> Option<(i64, usize)> {
        let e = p + reply[p..].windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(&reply[p + 1..e]).ok()?.parse().ok()?;
        Some((n, e + 2))
    };
    if reply.first() != Some(&b'*') {
        return None;
    }
    let (n, mut p) = line(0)?;
    let mut out = Vec::new();
    for _ in 0..n.max(0) {
        if reply.get(p) != Some(&b'$') {
            return None;
        }
        let (len, body) = line(p)?;
        let end = body + len.max(0) as usize + if len >= 0 { 2 } else { 0 };
        out.push(reply.get(p..end)?.to_vec());
        p = end;
    }
    Some(out)
}

/// The elements of an array reply (EXEC), each a whole frame.
fn elements(reply: &[u8]) -> Option<Vec<Vec<u8>>> {
    if reply.first() != Some(&b'*') {
        return None;
    }
    let e = reply.windows(2).position(|w| w == b"\r\n")?;
    let n: i64 = std::str::from_utf8(&reply[1..e]).ok()?.parse().ok()?;
    let mut p = e + 2;
    let mut out = Vec::new();
    for _ in 0..n.max(0) {
        let mut sc = respite::resp::FrameScanner::new();
        let end = sc.next_frame(&reply[p..]).ok()??;
        out.push(reply[p..p + end].to_vec());
        p += end;
    }
    Some(out)
}

/// [`normalize`] per element of an EXEC reply.
fn normalize_exec(queued: &[Vec<Vec<u8>>], reply: Vec<u8>) -> Vec<u8> {
    match elements(&reply) {
        Some(els) if els.len() == queued.len() => els
            .into_iter()
            .zip(queued)
            .map(|(e, c)| normalize(&c[0], e))
            .collect::<Vec<_>>()
            .concat(),
        _ => reply,
    }
}

/// The commands `command` generates that work on the bytes of a value.
const BYTE_LEVEL: &[&str] = &[
    "STRLEN",
    "GETRANGE",
    "SUBSTR",
    "APPEND",
    "SETRANGE",
    "INCR",
    "INCRBY",
    "INCRBYFLOAT",
    "DECR",
    "DECRBY",
    "GETBIT",
    "SETBIT",
    "BITCOUNT",
    "BITPOS",
    "BITFIELD",
    "BITFIELD_RO",
    "BITOP",
    "LCS",
    "HSTRLEN",
    "HINCRBY",
    "HINCRBYFLOAT",
];

fn differential(seed: u64, ops: usize, min_bytes: &str) {
    let direct = RedisServer::start();
    let behind = RedisServer::start();
    let proxy = Proxy::start(
        &behind.url(),
        &[
            "--set",
            &format!("compression.min_bytes={min_bytes}"),
            "--set",
            "compression.enabled=true",
            // Single-threaded: large values are then compressed on the
            // blocking pool, whatever the machine's core count.
            "--set",
            "server.threads=1",
        ],
    );
    let mut a = Raw::connect(direct.port);
    let mut b = proxy.raw();
    // A second client reads through L1 (GET only), to exercise fills and hits.
    let mut b2 = proxy.raw();
    let mut a2 = Raw::connect(direct.port);
    let mut rng = Rng(seed);
    let mut done = 0;
    let mut history: Vec<String> = Vec::new();
    while done < ops {
        let mode = rng.below(20);
        let batch: Vec<Vec<Vec<u8>>> = match mode {
            // MULTI … EXEC
            0 => {
                let mut v = vec![vec![b"MULTI".to_vec()]];
                for _ in 0..1 + rng.below(4) {
                    v.push(command(&mut rng));
                }
                v.push(vec![b"EXEC".to_vec()]);
                v
            }
            // Pipeline.
            1 | 2 => (0..2 + rng.below(6)).map(|_| command(&mut rng)).collect(),
            // Byte-level commands back to back (one script for the run),
            // with a plain write now and then to compress a key among them.
            3 => (0..2 + rng.below(12))
                .map(|_| {
                    if rng.below(6) == 0 {
                        return command(&mut rng);
                    }
                    loop {
                        let c = command(&mut rng);
                        if BYTE_LEVEL
                            .iter()
                            .any(|n| c[0].eq_ignore_ascii_case(n.as_bytes()))
                        {
                            return c;
                        }
                    }
                })
                .collect(),
            _ => vec![command(&mut rng)],
        };
        let mut req = Vec::new();
        for c in &batch {
            let refs: Vec<&[u8]> = c.iter().map(|x| x.as_slice()).collect();
            req.extend_from_slice(&cmd_bytes(&refs));
        }
        for c in &batch {
            history.push(
                c.iter()
                    .take(4)
                    .map(|x| String::from_utf8_lossy(&x[..x.len().min(12)]).to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        a.send(&req);
        b.send(&req);
        let ra = read_replies(&mut a, batch.len());
        let rb = read_replies(&mut b, batch.len());
        for (i, c) in batch.iter().enumerate() {
            let (x, y) = if mode == 0 && i == batch.len() - 1 {
                let q = &batch[1..batch.len() - 1];
                (
                    normalize_exec(q, ra[i].clone()),
                    normalize_exec(q, rb[i].clone()),
                )
            } else {
                (
                    normalize(&c[0], ra[i].clone()),
                    normalize(&c[0], rb[i].clone()),
                )
            };
            if x != y {
                let from = history.len().saturating_sub(40);
                panic!(
                    "seed {seed} op {done}: reply to {:?} differs\nhistory:\n{}\n direct: {:?}\n respite: {:?}",
                    c.iter()
                        .map(|x| String::from_utf8_lossy(&x[..x.len().min(60)]).to_string())
                        .collect::<Vec<_>>(),
                    history[from..].join("\n"),
                    String::from_utf8_lossy(&ra[i][..ra[i].len().min(300)]),
                    String::from_utf8_lossy(&rb[i][..rb[i].len().min(300)]),
                );
            }
        }
        if mode == 3 {
            let k = rng.pick(STRS);
            let req = cmd_bytes(&[b"GET", k.as_bytes()]);
            a2.send(&req);
            b2.send(&req);
            assert_eq!(
                read_reply(&mut a2),
                read_reply(&mut b2),
                "seed {seed} op {done}: L1 reader GET {k}"
            );
        }
        done += batch.len();
    }
    // The same keys on both sides: a read leaves no temporary copy behind.
    let keys = |port: u16| {
        let mut k: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg("*")
            .query(&mut conn_to(port))
            .unwrap();
        k.sort();
        k
    };
    assert_eq!(
        keys(direct.port),
        keys(behind.port),
        "seed {seed}: keyspace"
    );
    // Something was stored compressed.
    let stats = proxy.metrics();
    assert!(
        stats.contains("respite_compression_values_compressed"),
        "{stats}"
    );
}

#[test]
fn differential_random_workload_small_min_bytes() {
    differential(0x9E37_79B9_7F4A_7C15, 3000, "16");
}

#[test]
fn differential_random_workload_default_like_min_bytes() {
    differential(0xD1B5_4A32_D192_ED03, 2000, "100");
}

/// More seeds than the suite can afford: `cargo test --test compression
/// -- --ignored`.
#[test]
#[ignore]
fn differential_random_workload_many_seeds() {
    for seed in 1..=40u64 {
        differential(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            2000,
            ["16", "100"][seed as usize % 2],
        );
    }
}

#[test]
fn large_values_are_stored_compressed_and_direct_values_read_back() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "compression.min_bytes=1024"]);
    let mut p = proxy.conn();
    let mut d = redis.conn();
    let big: String = (0..2000)
        .map(|i| format!("{{\"id\":{i},\"v\":\"abc\"}}"))
        .collect();
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&big)
        .query(&mut p)
        .unwrap();
    let stored: Vec<u8> = redis::cmd("GET").arg("big").query(&mut d).unwrap();
    assert!(stored.starts_with(&MAGIC), "stored value is marked");
    assert!(
        stored.len() * 2 < big.len(),
        "stored {} of {}",
        stored.len(),
        big.len()
    );
    let back: String = redis::cmd("GET").arg("big").query(&mut p).unwrap();
    assert_eq!(back, big);
    let n: usize = redis::cmd("STRLEN").arg("big").query(&mut p).unwrap();
    assert_eq!(n, big.len());
    // Hash fields too.
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("f")
        .arg(&big)
        .query(&mut p)
        .unwrap();
    let stored: Vec<u8> = redis::cmd("HGET").arg("h").arg("f").query(&mut d).unwrap();
    assert!(stored.starts_with(&MAGIC));
    let back: String = redis::cmd("HGET").arg("h").arg("f").query(&mut p).unwrap();
    assert_eq!(back, big);
    // Written directly: read back unchanged, also large and binary.
    let raw: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let _: () = redis::cmd("SET")
        .arg("direct")
        .arg(&raw)
        .query(&mut d)
        .unwrap();
    let back: Vec<u8> = redis::cmd("GET").arg("direct").query(&mut p).unwrap();
    assert_eq!(back, raw);
    // Small values are stored as they are.
    let _: () = redis::cmd("SET")
        .arg("small")
        .arg("hello")
        .query(&mut p)
        .unwrap();
    let stored: String = redis::cmd("GET").arg("small").query(&mut d).unwrap();
    assert_eq!(stored, "hello");
    // Byte-level writer keeps the TTL.
    let _: () = redis::cmd("SET")
        .arg("ttl")
        .arg(&big)
        .arg("EX")
        .arg(1000)
        .query(&mut p)
        .unwrap();
    let n: usize = redis::cmd("APPEND")
        .arg("ttl")
        .arg("xyz")
        .query(&mut p)
        .unwrap();
    assert_eq!(n, big.len() + 3);
    let ttl: i64 = redis::cmd("TTL").arg("ttl").query(&mut p).unwrap();
    assert!((990..=1000).contains(&ttl), "ttl {ttl}");
    // Excluded keys are stored as they are.
    let info: String = redis::cmd("PROXY")
        .arg("STATS")
        .query(&mut p)
        .map(|v: redis::Value| format!("{v:?}"))
        .unwrap();
    assert!(info.contains("compression_values_compressed"), "{info}");
}

#[test]
fn excluded_keys_are_not_compressed() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        &redis.url(),
        &["--set", "compression.exclude=[\"plain:*\"]"],
    );
    let mut p = proxy.conn();
    let mut d = redis.conn();
    let big = "x".repeat(10_000);
    let _: () = redis::cmd("SET")
        .arg("plain:1")
        .arg(&big)
        .query(&mut p)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("other")
        .arg(&big)
        .query(&mut p)
        .unwrap();
    let a: Vec<u8> = redis::cmd("GET").arg("plain:1").query(&mut d).unwrap();
    let b: Vec<u8> = redis::cmd("GET").arg("other").query(&mut d).unwrap();
    assert_eq!(a, big.as_bytes());
    assert!(b.starts_with(&MAGIC));
}

#[test]
fn corrupt_and_forged_values_are_clear_errors() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut d = redis.conn();
    let mut bad_version = MAGIC.to_vec();
    bad_version.extend_from_slice(&[9, 1, 5, b'h', b'e', b'l', b'l', b'o']);
    let mut truncated = MAGIC.to_vec();
    truncated.push(1);
    // Declares 2^40 bytes.
    let mut forged = MAGIC.to_vec();
    forged.extend_from_slice(&[1, 1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20]);
    forged.extend_from_slice(b"\x10a");
    // Declares 100 bytes, decodes to fewer.
    let mut short = MAGIC.to_vec();
    short.extend_from_slice(&[1, 1, 100]);
    short.extend_from_slice(b"\x10a");
    for (k, v) in [
        ("c1", &bad_version),
        ("c2", &truncated),
        ("c3", &forged),
        ("c4", &short),
    ] {
        let _: () = redis::cmd("SET").arg(k).arg(v).query(&mut d).unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg("good")
        .arg("fine")
        .query(&mut d)
        .unwrap();
    let mut r = proxy.raw();
    for k in ["c1", "c2", "c3", "c4"] {
        r.send(&cmd_bytes(&[b"GET", k.as_bytes()]));
        let reply = read_reply(&mut r);
        assert!(
            reply.starts_with(b"-ERR respite: corrupt compressed value ("),
            "{k}: {:?}",
            String::from_utf8_lossy(&reply)
        );
        r.send(&cmd_bytes(&[b"STRLEN", k.as_bytes()]));
        let reply = read_reply(&mut r);
        assert!(
            reply.starts_with(b"-ERR respite: corrupt compressed value ("),
            "STRLEN {k}: {:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    // The same connection and others carry on.
    r.send(&cmd_bytes(&[b"GET", b"good"]));
    assert_eq!(read_reply(&mut r), b"$4\r\nfine\r\n");
    r.send(&cmd_bytes(&[b"MULTI"]));
    r.send(&cmd_bytes(&[b"GET", b"c3"]));
    r.send(&cmd_bytes(&[b"GET", b"good"]));
    r.send(&cmd_bytes(&[b"EXEC"]));
    let replies = read_replies(&mut r, 4);
    assert!(
        replies[3].starts_with(b"*2\r\n-ERR respite: corrupt compressed value ("),
        "{:?}",
        String::from_utf8_lossy(&replies[3])
    );
    assert!(replies[3].ends_with(b"$4\r\nfine\r\n"));
    let mut other = proxy.conn();
    let v: String = redis::cmd("GET").arg("good").query(&mut other).unwrap();
    assert_eq!(v, "fine");
    let m = proxy.metrics();
    assert!(
        m.lines().any(
            |l| l.starts_with("respite_compression_decompression_errors ") && !l.ends_with(" 0")
        ),
        "{m}"
    );
}

#[test]
fn resp3_maps_and_pairs_are_decoded() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "compression.min_bytes=16"]);
    let mut r = proxy.raw();
    let v = b"hello world ".repeat(20);
    r.send(&cmd_bytes(&[b"HELLO", b"3"]));
    read_reply(&mut r);
    r.send(&cmd_bytes(&[b"HSET", b"h", b"a", &v]));
    assert_eq!(read_reply(&mut r), b":1\r\n");
    let mut want = b"%1\r\n$1\r\na\r\n$240\r\n".to_vec();
    want.extend_from_slice(&v);
    want.extend_from_slice(b"\r\n");
    r.send(&cmd_bytes(&[b"HGETALL", b"h"]));
    assert_eq!(read_reply(&mut r), want);
    let mut want = b"*1\r\n*2\r\n$1\r\na\r\n$240\r\n".to_vec();
    want.extend_from_slice(&v);
    want.extend_from_slice(b"\r\n");
    r.send(&cmd_bytes(&[b"HRANDFIELD", b"h", b"5", b"WITHVALUES"]));
    assert_eq!(read_reply(&mut r), want);
    r.send(&cmd_bytes(&[b"HSTRLEN", b"h", b"a"]));
    assert_eq!(read_reply(&mut r), b":240\r\n");
    r.send(&cmd_bytes(&[b"GET", b"missing"]));
    assert_eq!(read_reply(&mut r), b"_\r\n");
    // Inside MULTI: a reader and a writer on a compressed key.
    r.send(&cmd_bytes(&[b"SET", b"s", &v]));
    r.send(&cmd_bytes(&[b"MULTI"]));
    r.send(&cmd_bytes(&[b"STRLEN", b"s"]));
    r.send(&cmd_bytes(&[b"APPEND", b"s", b"!"]));
    r.send(&cmd_bytes(&[b"HGET", b"h", b"a"]));
    r.send(&cmd_bytes(&[b"EXEC"]));
    let replies = read_replies(&mut r, 6);
    let mut want = b"*3\r\n:240\r\n:241\r\n$240\r\n".to_vec();
    want.extend_from_slice(&v);
    want.extend_from_slice(b"\r\n");
    assert_eq!(
        String::from_utf8_lossy(&replies[5]),
        String::from_utf8_lossy(&want)
    );
}

/// A byte-level read of a compressed key is a read, as in Redis: it does not
/// abort a WATCH on that key (another client's, or the reader's own), fires
/// no keyspace event for it, leaves the stored frame byte for byte, writes
/// nothing to the AOF and leaves no temporary key; and its reply is Redis'
/// reply for the plain value, errors included.
#[test]
fn reads_of_compressed_keys_leave_them_alone() {
    let redis = RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--notify-keyspace-events",
        "KEA",
    ]);
    let proxy = Proxy::start(&redis.url(), &["--set", "compression.min_bytes=16"]);
    let mut d = Raw::connect(redis.port);
    let mut p = proxy.raw();
    let json = |n: usize, salt: usize| -> Vec<u8> {
        let mut v: Vec<u8> = (0..)
            .map(|i| format!("{{\"id\":{},\"name\":\"user{}\"}},", i * salt, i % 7))
            .take_while(|_| true)
            .take(n / 20)
            .collect::<String>()
            .into_bytes();
        v.truncate(n);
        v
    };
    let (v1, v2) = (json(1500, 3), json(1200, 5));
    let send = |r: &mut Raw, args: &[&[u8]]| {
        r.send(&cmd_bytes(args));
        r.read_reply()
    };
    // Compressed through respite; the same values plain, written directly,
    // give the reference replies.
    assert_eq!(send(&mut p, &[b"SET", b"k", &v1]), b"+OK\r\n");
    assert_eq!(send(&mut p, &[b"SET", b"k2", &v2]), b"+OK\r\n");
    assert_eq!(send(&mut p, &[b"HSET", b"h", b"f", &v1]), b":1\r\n");
    assert_eq!(send(&mut d, &[b"SET", b"pk", &v1]), b"+OK\r\n");
    assert_eq!(send(&mut d, &[b"SET", b"pk2", &v2]), b"+OK\r\n");
    assert_eq!(send(&mut d, &[b"HSET", b"ph", b"f", &v1]), b":1\r\n");
    let stored = |d: &mut Raw| {
        (
            send(d, &[b"GET", b"k"]),
            send(d, &[b"GET", b"k2"]),
            send(d, &[b"HGET", b"h", b"f"]),
        )
    };
    let before = stored(&mut d);
    for frame in [&before.0, &before.1, &before.2] {
        let body = frame.splitn(2, |&c| c == b'\n').nth(1).unwrap();
        assert!(body.starts_with(&MAGIC), "stored compressed");
    }
    let mut sub = Raw::connect(redis.port);
    sub.send(&cmd_bytes(&[
        b"SUBSCRIBE",
        b"__keyspace@0__:k",
        b"__keyspace@0__:k2",
        b"__keyspace@0__:h",
        b"__keyspace@0__:marker",
    ]));
    read_replies(&mut sub, 4);
    // Another client watches the keys, directly and through respite.
    let mut w = Raw::connect(redis.port);
    assert_eq!(send(&mut w, &[b"WATCH", b"k", b"k2", b"h"]), b"+OK\r\n");
    let mut pw = proxy.raw();
    assert_eq!(send(&mut pw, &[b"WATCH", b"k", b"k2", b"h"]), b"+OK\r\n");
    // (command, which arguments are keys to swap for the plain copies)
    let reads: Vec<Vec<&[u8]>> = vec![
        vec![b"STRLEN", b"k"],
        vec![b"GETRANGE", b"k", b"10", b"200"],
        vec![b"SUBSTR", b"k", b"-100", b"-1"],
        vec![b"GETBIT", b"k", b"1234"],
        vec![b"BITCOUNT", b"k"],
        vec![b"BITCOUNT", b"k", b"5", b"-5"],
        vec![b"BITCOUNT", b"k", b"1", b"100", b"BIT"],
        vec![b"BITPOS", b"k", b"1"],
        vec![b"BITPOS", b"k", b"0", b"3", b"50", b"BYTE"],
        vec![
            b"BITFIELD_RO",
            b"k",
            b"GET",
            b"u8",
            b"40",
            b"GET",
            b"i16",
            b"1000",
        ],
        vec![b"BITFIELD", b"k", b"GET", b"u8", b"40", b"OVERFLOW", b"SAT"],
        vec![b"SETRANGE", b"k", b"100", b""],
        vec![b"LCS", b"k", b"k2", b"LEN"],
        vec![
            b"LCS",
            b"k",
            b"k2",
            b"IDX",
            b"MINMATCHLEN",
            b"8",
            b"WITHMATCHLEN",
        ],
        vec![b"LCS", b"k", b"k"],
        vec![b"HSTRLEN", b"h", b"f"],
        // Ranges and offsets at the edges of what Redis accepts.
        vec![b"GETRANGE", b"k", b"0", b"-1"],
        vec![b"GETRANGE", b"k", b"-1", b"-5"],
        vec![b"GETRANGE", b"k", b"-5", b"-1"],
        vec![b"GETRANGE", b"k", b"5", b"3"],
        vec![b"GETRANGE", b"k", b"-100000", b"3"],
        vec![b"GETRANGE", b"k", b"100000", b"100001"],
        vec![
            b"GETRANGE",
            b"k",
            b"-9223372036854775808",
            b"9223372036854775807",
        ],
        vec![
            b"GETRANGE",
            b"k",
            b"9223372036854775807",
            b"-9223372036854775808",
        ],
        vec![b"GETRANGE", b"k", b"007", b"10"],
        vec![b"GETRANGE", b"k", b"-0", b"10"],
        vec![b"GETRANGE", b"k", b"+1", b"10"],
        vec![b"GETRANGE", b"k", b" 1", b"10"],
        vec![b"GETRANGE", b"k", b"1", b"9223372036854775808"],
        vec![b"SUBSTR", b"k", b"0", b"0"],
        vec![b"GETBIT", b"k", b"0"],
        vec![b"GETBIT", b"k", b"7"],
        vec![b"GETBIT", b"k", b"8"],
        vec![b"GETBIT", b"k", b"99999999"],
        vec![b"GETBIT", b"k", b"4294967295"],
        vec![b"GETBIT", b"k", b"4294967296"],
        vec![b"GETBIT", b"k", b"007"],
        // Argument errors, and the wrong type.
        vec![b"GETRANGE", b"k", b"a", b"b"],
        vec![b"GETBIT", b"k", b"-1"],
        vec![b"BITCOUNT", b"k", b"0"],
        vec![b"BITPOS", b"k", b"2"],
        vec![b"BITFIELD_RO", b"k", b"GET", b"x8", b"0"],
        vec![b"LCS", b"k", b"k2", b"BOGUS"],
        vec![b"LCS", b"k", b"h"],
        vec![b"HSTRLEN", b"k", b"f"],
    ];
    let plain = |c: &[&[u8]]| -> Vec<Vec<u8>> {
        c.iter()
            .enumerate()
            .map(|(i, a)| match (i, *a) {
                (0, _) => a.to_vec(),
                (_, b"k") => b"pk".to_vec(),
                (_, b"k2") => b"pk2".to_vec(),
                (_, b"h") if c[0] != b"HSTRLEN" || i == 1 => b"ph".to_vec(),
                _ => a.to_vec(),
            })
            .collect()
    };
    let mut wants = Vec::new();
    for c in &reads {
        let want = {
            let args = plain(c);
            let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
            send(&mut d, &refs)
        };
        let got = send(&mut p, c);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{:?}",
            c.iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect::<Vec<_>>()
        );
        wants.push(want);
    }
    // Pipelined, and inside MULTI.
    let mut req = Vec::new();
    for c in &reads {
        req.extend_from_slice(&cmd_bytes(c));
    }
    p.send(&req);
    assert_eq!(read_replies(&mut p, reads.len()), wants);
    p.send(&cmd_bytes(&[b"MULTI"]));
    for c in &reads[..16] {
        p.send(&cmd_bytes(c));
    }
    p.send(&cmd_bytes(&[b"EXEC"]));
    let replies = read_replies(&mut p, 18);
    let mut want = b"*16\r\n".to_vec();
    for w in &wants[..16] {
        want.extend_from_slice(w);
    }
    assert_eq!(
        String::from_utf8_lossy(&replies[17]),
        String::from_utf8_lossy(&want)
    );
    // The watcher through respite reads too, on its own watched keys.
    assert_eq!(
        send(&mut pw, &[b"STRLEN", b"k"]),
        format!(":{}\r\n", v1.len()).as_bytes()
    );
    assert_eq!(
        send(&mut pw, &[b"LCS", b"k", b"k2", b"LEN"]),
        send(&mut d, &[b"LCS", b"pk", b"pk2", b"LEN"])
    );
    for r in [&mut w, &mut pw] {
        assert_eq!(send(r, &[b"MULTI"]), b"+OK\r\n");
        assert_eq!(send(r, &[b"INCR", b"done"]), b"+QUEUED\r\n");
        let exec = send(r, &[b"EXEC"]);
        assert!(
            exec.starts_with(b"*1\r\n:"),
            "WATCH aborted: {:?}",
            String::from_utf8_lossy(&exec)
        );
    }
    assert_eq!(stored(&mut d), before, "stored frames unchanged");
    // No keyspace event for the keys read: the next one is the marker's.
    assert_eq!(send(&mut d, &[b"SET", b"marker", b"1"]), b"+OK\r\n");
    let ev = read_replies(&mut sub, 1).remove(0);
    assert!(
        ev.windows(6).any(|w| w == b"marker"),
        "{:?}",
        String::from_utf8_lossy(&ev)
    );
    // No temporary key left, none in the AOF (replicas get what it gets).
    let keys = send(&mut d, &[b"KEYS", b"*respite*"]);
    assert_eq!(keys, b"*0\r\n");
    let dir = send(&mut d, &[b"CONFIG", b"GET", b"dir"]);
    let dir = String::from_utf8_lossy(&dir);
    let dir = dir.lines().nth(4).unwrap().to_string();
    let mut aof = Vec::new();
    for e in std::fs::read_dir(std::path::Path::new(&dir).join("appendonlydir")).unwrap() {
        aof.extend(std::fs::read(e.unwrap().path()).unwrap());
    }
    assert!(aof.windows(6).any(|w| w == b"marker"), "AOF is current");
    assert!(
        !aof.windows(12).any(|w| w == b"respite-read"),
        "a temporary copy reached the AOF"
    );
}

/// Inside MULTI a byte-level command queued after a write to the same key
/// works on what that write stores (also when a conditional write does not
/// happen), as in Redis; it used to be an error.
#[test]
fn multi_byte_commands_see_queued_writes() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "compression.min_bytes=16"]);
    let mut d = Raw::connect(redis.port);
    let mut p = proxy.raw();
    let a = b"abcdefgh".repeat(40);
    let b = b"0123456789".repeat(50);
    let tx = |k: &[u8], h: &[u8]| -> Vec<Vec<u8>> {
        let c: Vec<Vec<&[u8]>> = vec![
            vec![b"MULTI"],
            vec![b"SET", k, &a],
            vec![b"STRLEN", k],
            vec![b"SETNX", k, &b],
            vec![b"GETRANGE", k, b"0", b"9"],
            vec![b"SET", k, &b, b"XX"],
            vec![b"BITCOUNT", k],
            vec![b"APPEND", k, b"!"],
            vec![b"STRLEN", k],
            vec![b"HSET", h, b"f", &a],
            vec![b"HSTRLEN", h, b"f"],
            vec![b"EXEC"],
        ];
        c.iter().map(|c| cmd_bytes(c)).collect()
    };
    let run = |r: &mut Raw, reqs: Vec<Vec<u8>>| {
        let n = reqs.len();
        r.send(&reqs.concat());
        read_replies(r, n).pop().unwrap()
    };
    let want = run(&mut d, tx(b"pk", b"ph"));
    let got = run(&mut p, tx(b"k", b"h"));
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    assert!(
        want.starts_with(b"*10\r\n+OK\r\n:320\r\n:0\r\n"),
        "{want:?}"
    );
}

/// STRLEN and HSTRLEN of a compressed value are answered from the frame the
/// script read, without a temporary copy, so they work when Redis refuses
/// writes (here: out of memory with `noeviction`).
#[test]
fn lengths_of_compressed_values_need_no_write() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "compression.min_bytes=16"]);
    let mut d = Raw::connect(redis.port);
    let mut p = proxy.raw();
    let v = b"0123456789".repeat(300);
    let send = |r: &mut Raw, args: &[&[u8]]| {
        r.send(&cmd_bytes(args));
        r.read_reply()
    };
    assert_eq!(send(&mut p, &[b"SET", b"k", &v]), b"+OK\r\n");
    assert_eq!(send(&mut p, &[b"HSET", b"h", b"f", &v]), b":1\r\n");
    for c in [
        &[&b"CONFIG"[..], b"SET", b"maxmemory-policy", b"noeviction"][..],
        &[b"CONFIG", b"SET", b"maxmemory", b"1"],
    ] {
        assert_eq!(send(&mut d, c), b"+OK\r\n");
    }
    assert!(send(&mut d, &[b"SET", b"x", b"1"]).starts_with(b"-OOM"));
    assert_eq!(send(&mut p, &[b"STRLEN", b"k"]), b":3000\r\n");
    assert_eq!(send(&mut p, &[b"HSTRLEN", b"h", b"f"]), b":3000\r\n");
    assert_eq!(send(&mut p, &[b"HSTRLEN", b"h", b"nope"]), b":0\r\n");
    assert_eq!(send(&mut p, &[b"STRLEN", b"missing"]), b":0\r\n");
    assert!(send(&mut p, &[b"STRLEN", b"h"]).starts_with(b"-WRONGTYPE"));
}

#[test]
fn readers_of_compressed_values_work_on_a_read_only_replica() {
    // A replica refuses the temporary copies other readers use; these are
    // answered from the value itself.
    let primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let port = primary.port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let writer = Proxy::start(&primary.url(), &["--set", "compression.min_bytes=16"]);
    let reader = Proxy::start(&replica.url(), &["--set", "compression.min_bytes=16"]);
    let value: Vec<u8> = (0..400)
        .flat_map(|i| format!("{{\"n\":{}}},", i % 9).into_bytes())
        .collect();
    let mut w = writer.raw();
    w.send(&cmd_bytes(&[b"SET", b"k", &value]));
    assert_eq!(w.read_reply(), b"+OK\r\n");
    w.send(&cmd_bytes(&[b"SET", b"plain", &value]));
    w.read_reply();
    let mut direct = Raw::connect(replica.port);
    let t = std::time::Instant::now();
    loop {
        direct.send(&cmd_bytes(&[b"EXISTS", b"k"]));
        if direct.read_reply() == b":1\r\n" {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "replica never synced"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    direct.send(&cmd_bytes(&[b"GET", b"k"]));
    let stored = direct.read_reply();
    assert!(stored.windows(4).any(|w| w == MAGIC), "stored compressed");
    let mut r = reader.raw();
    let len = value.len().to_string();
    for (cmd, want) in [
        (
            vec![&b"STRLEN"[..], b"k"],
            format!(":{len}\r\n").into_bytes(),
        ),
        (
            vec![b"GETRANGE", b"k", b"2", b"9"],
            [b"$8\r\n", &value[2..10], b"\r\n"].concat(),
        ),
        (
            vec![b"SUBSTR", b"k", b"-3", b"-1"],
            [b"$3\r\n", &value[value.len() - 3..], b"\r\n"].concat(),
        ),
        (vec![b"GETBIT", b"k", b"10"], b":1\r\n".to_vec()),
        (vec![b"GETBIT", b"k", b"8"], b":0\r\n".to_vec()),
    ] {
        r.send(&cmd_bytes(&cmd));
        assert_eq!(
            String::from_utf8_lossy(&r.read_reply()),
            String::from_utf8_lossy(&want),
            "{:?}",
            String::from_utf8_lossy(cmd[0])
        );
    }
    // Readers that need a copy get the replica's own refusal, not a wrong answer.
    r.send(&cmd_bytes(&[b"BITCOUNT", b"k"]));
    let e = r.read_reply();
    assert!(
        e.starts_with(b"-READONLY"),
        "{:?}",
        String::from_utf8_lossy(&e)
    );
}

#[test]
fn byte_level_scripts_travel_as_evalsha_and_survive_script_flush() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "compression.min_bytes=16"]);
    let mut p = proxy.raw();
    let value = "{\"a\":1},".repeat(50);
    let mut expect = value.clone();
    p.send(&cmd_bytes(&[b"SET", b"k", value.as_bytes()]));
    assert_eq!(p.read_reply(), b"+OK\r\n");
    let mut d = Raw::connect(redis.port);
    for round in 0..3 {
        if round == 2 {
            // Redis forgets the script: respite sends it whole once more.
            d.send(&cmd_bytes(&[b"SCRIPT", b"FLUSH"]));
            assert_eq!(d.read_reply(), b"+OK\r\n");
        }
        p.send(&cmd_bytes(&[b"STRLEN", b"k"]));
        assert_eq!(
            p.read_reply(),
            format!(":{}\r\n", expect.len()).into_bytes()
        );
        p.send(&cmd_bytes(&[b"APPEND", b"k", b"x"]));
        expect.push('x');
        assert_eq!(
            p.read_reply(),
            format!(":{}\r\n", expect.len()).into_bytes()
        );
        // APPEND left it plain: compress it again for the next round.
        p.send(&cmd_bytes(&[b"SET", b"k", expect.as_bytes()]));
        assert_eq!(p.read_reply(), b"+OK\r\n");
    }
    p.send(&cmd_bytes(&[b"GET", b"k"]));
    assert_eq!(
        p.read_reply(),
        format!("${}\r\n{expect}\r\n", expect.len()).into_bytes()
    );
    let (sha, eval) = (redis.calls("evalsha"), redis.calls("eval"));
    assert!(sha >= 6, "evalsha {sha}");
    assert!(
        eval <= 2,
        "eval {eval}: the script body travelled more than needed"
    );
}

#[test]
fn pipelined_byte_level_runs_match_redis() {
    // Runs of byte-level commands share one script: RESP3 replies, a
    // command too big for a run, a script cache flushed between runs, and
    // compressed keys in the middle of a run all answer as Redis does.
    let direct = RedisServer::start();
    let behind = RedisServer::start();
    let proxy = Proxy::start(&behind.url(), &["--set", "compression.min_bytes=16"]);
    let json = "{\"a\":1,\"b\":[1,2,3]},".repeat(20);
    let big_bitfield: Vec<Vec<u8>> = std::iter::once(b"BITFIELD".to_vec())
        .chain(std::iter::once(b"bf".to_vec()))
        .chain((0..600).flat_map(|i| {
            [
                b"GET".to_vec(),
                b"u8".to_vec(),
                (i * 8).to_string().into_bytes(),
            ]
        }))
        .collect();
    let pipelines: Vec<Vec<Vec<Vec<u8>>>> = vec![
        // Plain keys only.
        vec![
            vec![
                b"SETBIT".to_vec(),
                b"bm".to_vec(),
                b"7".to_vec(),
                b"1".to_vec(),
            ],
            vec![b"GETBIT".to_vec(), b"bm".to_vec(), b"7".to_vec()],
            vec![b"APPEND".to_vec(), b"ap".to_vec(), b"xy".to_vec()],
            vec![b"STRLEN".to_vec(), b"ap".to_vec()],
            vec![b"BITCOUNT".to_vec(), b"bm".to_vec()],
            vec![b"INCRBYFLOAT".to_vec(), b"fl".to_vec(), b"1.5".to_vec()],
            vec![b"INCRBYFLOAT".to_vec(), b"ap".to_vec(), b"1".to_vec()],
            vec![
                b"BITFIELD".to_vec(),
                b"bm".to_vec(),
                b"OVERFLOW".to_vec(),
                b"FAIL".to_vec(),
                b"INCRBY".to_vec(),
                b"u2".to_vec(),
                b"0".to_vec(),
                b"7".to_vec(),
                b"GET".to_vec(),
                b"u8".to_vec(),
                b"0".to_vec(),
            ],
            vec![b"SET".to_vec(), b"j".to_vec(), json.clone().into_bytes()],
            vec![
                b"SET".to_vec(),
                b"j2".to_vec(),
                json.replace('1', "2").into_bytes(),
            ],
        ],
        // A compressed key in the middle of runs, before and after plain ones.
        vec![
            vec![b"APPEND".to_vec(), b"ap".to_vec(), b"z".to_vec()],
            vec![b"STRLEN".to_vec(), b"j".to_vec()],
            vec![
                b"GETRANGE".to_vec(),
                b"j".to_vec(),
                b"3".to_vec(),
                b"20".to_vec(),
            ],
            vec![b"APPEND".to_vec(), b"j".to_vec(), b"tail".to_vec()],
            vec![b"STRLEN".to_vec(), b"j".to_vec()],
            vec![
                b"LCS".to_vec(),
                b"j".to_vec(),
                b"j2".to_vec(),
                b"IDX".to_vec(),
                b"MINMATCHLEN".to_vec(),
                b"30".to_vec(),
            ],
            vec![
                b"SETBIT".to_vec(),
                b"bm".to_vec(),
                b"100".to_vec(),
                b"1".to_vec(),
            ],
            vec![b"GETBIT".to_vec(), b"j2".to_vec(), b"9".to_vec()],
        ],
        // Too big for a run: goes alone, between runs.
        vec![
            vec![b"APPEND".to_vec(), b"ap".to_vec(), b"w".to_vec()],
            big_bitfield,
            vec![b"STRLEN".to_vec(), b"ap".to_vec()],
            vec![b"GET".to_vec(), b"ap".to_vec()],
        ],
    ];
    for resp3 in [false, true] {
        let mut d = Raw::connect(direct.port);
        let mut p = proxy.raw();
        if resp3 {
            for r in [&mut d, &mut p] {
                r.send(&cmd_bytes(&[b"HELLO", b"3"]));
                r.read_reply();
            }
        }
        for (n, pipeline) in pipelines.iter().enumerate() {
            if n == 2 {
                // The proxy's scripts are gone: EVALSHA fails, EVAL follows.
                let mut b = Raw::connect(behind.port);
                b.send(&cmd_bytes(&[b"SCRIPT", b"FLUSH"]));
                assert_eq!(b.read_reply(), b"+OK\r\n");
            }
            let mut req = Vec::new();
            for c in pipeline {
                let refs: Vec<&[u8]> = c.iter().map(|a| a.as_slice()).collect();
                req.extend(cmd_bytes(&refs));
            }
            d.send(&req);
            p.send(&req);
            for c in pipeline {
                let (want, got) = (d.read_reply(), p.read_reply());
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want),
                    "resp3={resp3} {:?}",
                    String::from_utf8_lossy(&c[0])
                );
            }
        }
    }
}
