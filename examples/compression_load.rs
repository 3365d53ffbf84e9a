//! Load generator for `scripts/bench-compression`: SET or GET of JSON-like
//! values over plain RESP, one blocking connection per client thread.
//!
//! `compression_load ADDR set|get|load SIZE CLIENTS SECS KEYSPACE`
//! prints `ops_per_sec=<n> errors=<n>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn json_value(size: usize, seed: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size + 128);
    let mut i = seed * 7919;
    while v.len() < size {
        v.extend_from_slice(
            format!(
                "{{\"id\":{i},\"user\":\"user{}\",\"score\":{},\"active\":{},\"tags\":[\"t{}\",\"t{}\"]}},",
                i % 977,
                (i * 31) % 1000,
                i.is_multiple_of(2),
                i % 13,
                i % 7
            )
            .as_bytes(),
        );
        i += 1;
    }
    v.truncate(size);
    v
}

fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply; returns false on an error reply.
fn read_reply(r: &mut BufReader<TcpStream>, line: &mut Vec<u8>, body: &mut Vec<u8>) -> bool {
    line.clear();
    r.read_until(b'\n', line).expect("read");
    match line.first() {
        Some(b'$') => {
            let n: i64 = std::str::from_utf8(&line[1..line.len() - 2])
                .unwrap()
                .parse()
                .unwrap();
            if n >= 0 {
                body.resize(n as usize + 2, 0);
                r.read_exact(body).expect("read body");
            }
            true
        }
        Some(b'-') => false,
        _ => true,
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 {
        eprintln!("usage: compression_load ADDR set|get|load SIZE CLIENTS SECS KEYSPACE");
        std::process::exit(2);
    }
    let addr = a[1].clone();
    let op = a[2].clone();
    let size: usize = a[3].parse().unwrap();
    let clients: usize = a[4].parse().unwrap();
    let secs: f64 = a[5].parse().unwrap();
    let keyspace: usize = a[6].parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let values: Arc<Vec<Vec<u8>>> = Arc::new((0..16).map(|s| json_value(size, s)).collect());
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|t| {
            let (addr, op, stop, ops, errors, values) = (
                addr.clone(),
                op.clone(),
                stop.clone(),
                ops.clone(),
                errors.clone(),
                values.clone(),
            );
            std::thread::spawn(move || {
                let s = TcpStream::connect(&addr).expect("connect");
                s.set_nodelay(true).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::with_capacity(256 * 1024, s);
                let (mut line, mut body) = (Vec::new(), Vec::new());
                let mut i = t;
                loop {
                    if op == "load" {
                        if i >= keyspace {
                            break;
                        }
                    } else if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("bench:{:08}", i % keyspace);
                    let req = if op == "get" {
                        cmd(&[b"GET", key.as_bytes()])
                    } else {
                        cmd(&[b"SET", key.as_bytes(), &values[i % values.len()]])
                    };
                    w.write_all(&req).expect("write");
                    if !read_reply(&mut r, &mut line, &mut body) {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                    i += clients;
                }
            })
        })
        .collect();
    if op != "load" {
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    }
    for h in handles {
        h.join().unwrap();
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "ops_per_sec={:.0} errors={}",
        ops.load(Ordering::Relaxed) as f64 / el,
        errors.load(Ordering::Relaxed)
    );
}
