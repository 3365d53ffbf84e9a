//! L1 near cache against real redis-servers: hits cost no upstream command,
//! invalidations from Redis and from other proxies arrive fast, readers
//! never see a key's version go backwards.

mod common;
use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn l1_stat(c: &mut redis::Connection, field: &str) -> i64 {
    let m: std::collections::HashMap<String, String> =
        redis::cmd("PROXY").arg("L1").arg("STATS").query(c).unwrap();
    m[field].parse().unwrap_or(-1)
}

/// Polls until `get` returns `want` or `within` passes; returns the time taken.
/// On failure it keeps polling a while to tell "slow" from "stuck stale".
fn visible_within(
    c: &mut redis::Connection,
    key: &str,
    want: Option<&str>,
    within: Duration,
) -> Duration {
    let t = Instant::now();
    loop {
        let v: Option<String> = redis::cmd("GET").arg(key).query(c).unwrap();
        if v.as_deref() == want {
            let took = t.elapsed();
            assert!(
                took < within,
                "{key}: {want:?} visible only after {took:?} (limit {within:?})"
            );
            return took;
        }
        assert!(
            t.elapsed() < within + Duration::from_secs(3),
            "{key}: STUCK at {v:?}, want {want:?} (stale entry never invalidated)"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn second_get_is_served_without_upstream_command() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut c = proxy.conn();
    let _: () = redis::cmd("SET").arg("hot").arg("v").query(&mut c).unwrap();
    let v: String = redis::cmd("GET").arg("hot").query(&mut c).unwrap();
    assert_eq!(v, "v");
    let before = redis.calls("get");
    for _ in 0..50 {
        let v: String = redis::cmd("GET").arg("hot").query(&mut c).unwrap();
        assert_eq!(v, "v");
    }
    assert_eq!(redis.calls("get"), before, "hits reached Redis");
    assert!(l1_stat(&mut c, "hits") >= 50);
    // RESP3 clients get the same hit.
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{}/?protocol=resp3", proxy.port)).unwrap();
    let mut c3 = client.get_connection_with_timeout(TIMEOUT).unwrap();
    let v: String = redis::cmd("GET").arg("hot").query(&mut c3).unwrap();
    assert_eq!(v, "v");
    // Nil is never cached and stays RESP2-nil for RESP2 clients.
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"GET", b"absent"]));
    r.expect(b"$-1\r\n");
    r.send(&cmd_bytes(&[b"GET", b"absent"]));
    r.expect(b"$-1\r\n");
    let m = proxy.metrics();
    assert!(m.contains("respite_l1_hits"), "{m}");
}

#[test]
fn writes_elsewhere_are_visible_fast() {
    let redis = RedisServer::start();
    // One single-threaded proxy and one with two workers.
    let p1 = Proxy::start(&redis.url(), &["--set", "server.threads=1"]);
    let p2 = Proxy::start(&redis.url(), &["--set", "server.threads=2"]);
    let mut c1 = p1.conn();
    let mut c2 = p2.conn();
    let mut direct = redis.conn();
    for round in 0..20 {
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg(format!("d{round}"))
            .query(&mut direct)
            .unwrap();
        visible_within(
            &mut c1,
            "k",
            Some(&format!("d{round}")),
            Duration::from_millis(50),
        );
        // Now cached in p1; a write through p2 must reach p1's readers too.
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg(format!("p{round}"))
            .query(&mut c2)
            .unwrap();
        visible_within(
            &mut c1,
            "k",
            Some(&format!("p{round}")),
            Duration::from_millis(50),
        );
    }
    // Deletes, expiry changes and FLUSHALL done directly.
    let _: i64 = redis::cmd("DEL").arg("k").query(&mut direct).unwrap();
    visible_within(&mut c1, "k", None, Duration::from_millis(50));
    let _: () = redis::cmd("SET")
        .arg("f")
        .arg("1")
        .query(&mut direct)
        .unwrap();
    visible_within(&mut c1, "f", Some("1"), Duration::from_millis(50));
    let _: () = redis::cmd("FLUSHALL").query(&mut direct).unwrap();
    visible_within(&mut c1, "f", None, Duration::from_millis(50));
    assert!(l1_stat(&mut c1, "invalidations") + l1_stat(&mut c1, "flushes") > 0);
}

#[test]
fn read_your_writes_in_pipelines() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut c = proxy.conn();
    for i in 0..200 {
        let (a, b, x, y): (String, String, i64, String) = redis::pipe()
            .cmd("SET")
            .arg("p")
            .arg(format!("a{i}"))
            .cmd("GET")
            .arg("p")
            .cmd("SET")
            .arg("p")
            .arg(format!("b{i}"))
            .cmd("GET")
            .arg("p")
            .cmd("INCR")
            .arg("n")
            .cmd("GET")
            .arg("n")
            .query::<((), String, (), String, i64, String)>(&mut c)
            .map(|(_, a, _, b, x, y)| (a, b, x, y))
            .unwrap();
        assert_eq!(
            (a.as_str(), b.as_str()),
            (format!("a{i}").as_str(), format!("b{i}").as_str())
        );
        assert_eq!(x.to_string(), y);
        // And the next single GET (likely a hit) agrees.
        let v: String = redis::cmd("GET").arg("p").query(&mut c).unwrap();
        assert_eq!(v, format!("b{i}"));
    }
    // MGET over cached and uncached keys answers in order.
    let _: () = redis::cmd("MSET")
        .arg("m1")
        .arg("1")
        .arg("m3")
        .arg("3")
        .query(&mut c)
        .unwrap();
    let _: String = redis::cmd("GET").arg("m1").query(&mut c).unwrap();
    let v: Vec<Option<String>> = redis::cmd("MGET")
        .arg("m1")
        .arg("m2")
        .arg("m3")
        .query(&mut c)
        .unwrap();
    assert_eq!(v, vec![Some("1".into()), None, Some("3".into())]);
}

#[test]
fn keys_never_outlive_their_redis_expiry() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut c = proxy.conn();
    let _: () = redis::cmd("SET")
        .arg("e")
        .arg("v")
        .arg("PX")
        .arg(300)
        .query(&mut c)
        .unwrap();
    let v: Option<String> = redis::cmd("GET").arg("e").query(&mut c).unwrap();
    assert_eq!(v.as_deref(), Some("v"));
    let v: Option<String> = redis::cmd("GET").arg("e").query(&mut c).unwrap();
    assert_eq!(v.as_deref(), Some("v"));
    std::thread::sleep(Duration::from_millis(320));
    let v: Option<String> = redis::cmd("GET").arg("e").query(&mut c).unwrap();
    assert_eq!(v, None, "served after its Redis expiry");
    // l1.max_ttl_ms bounds entries without a TTL (ttl mode, no tracking).
    let p2 = Proxy::start(
        &redis.url(),
        &["--set", "l1.mode=ttl", "--set", "l1.max_ttl_ms=200"],
    );
    let mut c2 = p2.conn();
    let mut direct = redis.conn();
    let _: () = redis::cmd("SET")
        .arg("t")
        .arg("1")
        .query(&mut direct)
        .unwrap();
    visible_within(&mut c2, "t", Some("1"), Duration::from_millis(50));
    let _: () = redis::cmd("SET")
        .arg("t")
        .arg("2")
        .query(&mut direct)
        .unwrap();
    visible_within(&mut c2, "t", Some("2"), Duration::from_millis(400));
    assert_eq!(l1_stat(&mut c2, "valid"), 1);
}

#[test]
fn upstream_restart_with_different_data_flushes() {
    let redis = RedisServer::start();
    let port = redis.port;
    let proxy = Proxy::start(&redis.url(), &["--set", "upstream.reconnect_max_ms=200"]);
    let mut c = proxy.conn();
    let _: () = redis::cmd("SET").arg("r").arg("old").query(&mut c).unwrap();
    let _: String = redis::cmd("GET").arg("r").query(&mut c).unwrap();
    redis.stop();
    // While tracking is down no hit is served.
    std::thread::sleep(Duration::from_millis(200));
    let r: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("r").query(&mut c);
    assert!(r.is_err(), "served {r:?} from L1 without tracking");
    let fresh = RedisServer::start_on(port, &[]);
    let mut direct = fresh.conn();
    let _: () = redis::cmd("SET")
        .arg("r")
        .arg("new")
        .query(&mut direct)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(v) = redis::cmd("GET").arg("r").query::<Option<String>>(&mut c) {
            assert_eq!(v.as_deref(), Some("new"), "stale value after restart");
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn missing_keys_are_cached_as_nil_until_created() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let get = cmd_bytes(&[b"GET", b"nokey"]);
    let mget = cmd_bytes(&[b"MGET", b"nokey", b"nokey"]);
    let mut r2 = proxy.raw();
    r2.send(&get);
    r2.expect(b"$-1\r\n");
    let before = redis.calls("get");
    for _ in 0..20 {
        r2.send(&get);
        r2.expect(b"$-1\r\n");
    }
    // Pipelined: hits copied straight into the output buffer, then MGET.
    r2.send(&[&get[..], &get, &get, &mget].concat());
    r2.expect(b"$-1\r\n$-1\r\n$-1\r\n*2\r\n$-1\r\n$-1\r\n");
    // RESP3 clients get RESP3's null.
    let mut r3 = proxy.raw();
    r3.send(&cmd_bytes(&[b"HELLO", b"3"]));
    let _ = r3.read_reply();
    r3.send(&[&get[..], &mget].concat());
    r3.expect(b"_\r\n*2\r\n_\r\n_\r\n");
    assert_eq!(redis.calls("get"), before, "nil hits reached Redis");
    assert_eq!(redis.calls("mget"), 0, "an all-nil MGET reached Redis");
    // Created directly in Redis: tracking invalidates a key read while it
    // did not exist, so the value shows at once.
    let _: () = redis::cmd("SET")
        .arg("nokey")
        .arg("v")
        .query(&mut redis.conn())
        .unwrap();
    visible_within(
        &mut proxy.conn(),
        "nokey",
        Some("v"),
        Duration::from_millis(50),
    );
    r2.send(&get);
    r2.expect(b"$1\r\nv\r\n");
    // Deleted through the proxy: its own write, read at once.
    r2.send(&cmd_bytes(&[b"DEL", b"nokey"]));
    r2.expect(b":1\r\n");
    r2.send(&get);
    r2.expect(b"$-1\r\n");
}

#[test]
fn swapdb_through_the_proxy_flushes_l1() {
    // Redis sends tracking clients no invalidation for SWAPDB, so respite
    // must drop what it holds for the swapped db itself.
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut direct = redis.conn();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("db0")
        .query(&mut direct)
        .unwrap();
    let _: () = redis::cmd("SELECT").arg(1).query(&mut direct).unwrap();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("db1")
        .query(&mut direct)
        .unwrap();
    let mut c = proxy.conn();
    for _ in 0..2 {
        let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
        assert_eq!(v, "db0");
    }
    let _: () = redis::cmd("SWAPDB").arg(0).arg(1).query(&mut c).unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "db1", "stale after SWAPDB");
    // In a transaction the swap happens at EXEC: what other clients read
    // into L1 between the queuing and EXEC is flushed then.
    let mut tx = proxy.conn();
    let _: () = redis::cmd("MULTI").query(&mut tx).unwrap();
    let _: String = redis::cmd("SWAPDB").arg(0).arg(1).query(&mut tx).unwrap();
    for _ in 0..2 {
        let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
        assert_eq!(v, "db1", "before EXEC");
    }
    let _: redis::Value = redis::cmd("EXEC").query(&mut tx).unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "db0", "stale after a SWAPDB in MULTI/EXEC");
}

#[test]
fn inline_writes_are_read_back_at_once() {
    // ttl mode: no invalidation comes from Redis, so only respite's own
    // invalidation of the written key can make the second GET right.
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        &redis.url(),
        &["--set", "l1.mode=ttl", "--set", "l1.max_ttl_ms=60000"],
    );
    let mut r = proxy.raw();
    for (write, after) in [
        (&b"SET k new\r\n"[..], &b"$3\r\nnew\r\n"[..]),
        (b"APPEND k er\r\n", b"$5\r\nolder\r\n"),
        (b"DEL k\r\n", b"$-1\r\n"),
    ] {
        r.send(&cmd_bytes(&[b"SET", b"k", b"old"]));
        r.read_reply();
        for _ in 0..2 {
            r.send(&cmd_bytes(&[b"GET", b"k"]));
            assert_eq!(r.read_reply(), b"$3\r\nold\r\n");
        }
        r.send(write);
        r.read_reply();
        r.send(&cmd_bytes(&[b"GET", b"k"]));
        assert_eq!(
            String::from_utf8_lossy(&r.read_reply()),
            String::from_utf8_lossy(after),
            "after inline {:?}",
            String::from_utf8_lossy(write)
        );
    }
    // FLUSHALL typed inline empties L1 too.
    r.send(&cmd_bytes(&[b"SET", b"k", b"old"]));
    r.read_reply();
    r.send(&cmd_bytes(&[b"GET", b"k"]));
    r.read_reply();
    r.send(b"FLUSHALL\r\n");
    assert_eq!(r.read_reply(), b"+OK\r\n");
    r.send(&cmd_bytes(&[b"GET", b"k"]));
    assert_eq!(r.read_reply(), b"$-1\r\n");
}

/// Sends `n` commands straight to Redis in one pipeline and reads their
/// replies.
fn preload(redis: &RedisServer, n: usize, cmd: impl Fn(usize) -> Vec<u8>) {
    let mut direct = Raw::connect(redis.port);
    direct.send(&(0..n).flat_map(cmd).collect::<Vec<u8>>());
    for _ in 0..n {
        direct.read_reply();
    }
}

#[test]
fn a_get_is_not_answered_with_a_write_pipelined_after_it() {
    // A GET that misses L1 is answered by a fill on a tracking connection;
    // the SET pipelined after it goes on the client's own connection and
    // must not reach Redis first.
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut r = proxy.raw();
    let n = 3000;
    preload(&redis, n, |i| {
        cmd_bytes(&[b"SET", format!("race{i}").as_bytes(), b"old"])
    });
    for chunk in 0..n / 100 {
        let mut batch = Vec::new();
        for i in chunk * 100..(chunk + 1) * 100 {
            let k = format!("race{i}");
            batch.extend(cmd_bytes(&[b"GET", k.as_bytes()]));
            batch.extend(cmd_bytes(&[b"SET", k.as_bytes(), b"new"]));
        }
        r.send(&batch);
        for i in chunk * 100..(chunk + 1) * 100 {
            assert_eq!(
                String::from_utf8_lossy(&r.read_reply()),
                "$3\r\nold\r\n",
                "GET race{i} saw the SET after it"
            );
            assert_eq!(r.read_reply(), b"+OK\r\n");
        }
    }
    r.send(&cmd_bytes(&[b"GET", b"race0"]));
    assert_eq!(r.read_reply(), b"$3\r\nnew\r\n");
}

/// Sets `{prefix}0..{prefix}{n-1}` to 1000-byte values in one pipeline.
fn set_thousand_byte_values(c: &mut redis::Connection, prefix: &str, n: usize) {
    let val = vec![b'x'; 1000];
    let mut p = redis::pipe();
    for i in 0..n {
        p.cmd("SET").arg(format!("{prefix}{i}")).arg(&val).ignore();
    }
    let _: () = p.query(c).unwrap();
}

fn read_thousand_bytes(c: &mut redis::Connection, key: &str) {
    let v: Vec<u8> = redis::cmd("GET").arg(key).query(c).unwrap();
    assert_eq!(v.len(), 1000, "{key}");
}

#[test]
fn byte_bound_holds_under_a_larger_working_set() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "l1.max_bytes=1048576"]);
    let mut c = proxy.conn();
    set_thousand_byte_values(&mut c, "w", 10_000);
    for _round in 0..2 {
        for i in 0..10_000 {
            read_thousand_bytes(&mut c, &format!("w{i}"));
        }
    }
    let bytes = l1_stat(&mut c, "bytes");
    assert!(
        bytes > 0 && bytes <= 1_153_434,
        "L1 holds {bytes} bytes for a 1 MiB bound"
    );
    // The bound was kept by evicting, or by turning away keys read no
    // more often than what they would have displaced (TinyLFU).
    assert!(l1_stat(&mut c, "evicted_size") + l1_stat(&mut c, "admissions_rejected") > 0);
    let _: () = redis::cmd("PROXY")
        .arg("L1")
        .arg("FLUSH")
        .query(&mut c)
        .unwrap();
    assert_eq!(l1_stat(&mut c, "entries"), 0);
}

#[test]
fn hot_keys_survive_a_scan_of_a_larger_keyspace() {
    // A one-off read of 10x the cache's worth of cold keys (a batch job,
    // a SCAN-and-GET) must not empty L1 of the keys clients read all day.
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "l1.max_bytes=1048576"]);
    let mut c = proxy.conn();
    set_thousand_byte_values(&mut c, "cold", 10_000);
    set_thousand_byte_values(&mut c, "hot", 100);
    let read = read_thousand_bytes;
    for _ in 0..5 {
        for i in 0..100 {
            read(&mut c, &format!("hot{i}"));
        }
    }
    for i in 0..10_000 {
        read(&mut c, &format!("cold{i}"));
    }
    let before = redis.calls("get");
    for i in 0..100 {
        read(&mut c, &format!("hot{i}"));
    }
    let refetched = redis.calls("get") - before;
    assert!(
        refetched <= 5,
        "{refetched} of 100 hot keys were pushed out by the scan"
    );
    assert!(l1_stat(&mut c, "admissions_rejected") > 5000);
}

/// Writers bump per-key versions (directly and through two proxies); readers
/// through the proxies must never see a version go backwards, and must see the
/// final versions shortly after the writers stop.
fn coherence_checker(duration: Duration) {
    let redis = RedisServer::start();
    // One single-threaded proxy and one with two workers.
    let p1 = Proxy::start(&redis.url(), &["--set", "server.threads=1"]);
    let p2 = Proxy::start(&redis.url(), &["--set", "server.threads=2"]);
    const KEYS: usize = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let ports = [redis.port, p1.port, p2.port];
    let mut writers = Vec::new();
    for (w, port) in ports.iter().enumerate() {
        let stop = stop.clone();
        let port = *port;
        writers.push(std::thread::spawn(move || {
            let mut c = conn_to(port);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = (n as usize + w) % KEYS;
                let _: i64 = redis::cmd("INCR")
                    .arg(format!("ver:{k}"))
                    .query(&mut c)
                    .unwrap();
                // The same versions as fields of a hash, for HGET, HMGET
                // and HGETALL, which share one entry per hash.
                let field = ["a", "b"][(n as usize / KEYS) % 2];
                let _: i64 = redis::cmd("HINCRBY")
                    .arg(format!("hver:{k}"))
                    .arg(field)
                    .arg(1)
                    .query(&mut c)
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    // The same key names in db 1, far behind db 0's: a read of the wrong
    // db would show as a version going backwards (or the wrong final one).
    {
        let stop1 = stop.clone();
        let port = p2.port;
        writers.push(std::thread::spawn(move || {
            let stop = stop1;
            let mut c = conn_to(port);
            let _: () = redis::cmd("SELECT").arg(1).query(&mut c).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = format!("ver:{}", n as usize % KEYS);
                let _: i64 = redis::cmd("INCR").arg(&k).query(&mut c).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            n
        }));
        let stop2 = stop.clone();
        let port = p1.port;
        writers.push(std::thread::spawn(move || {
            let stop = stop2;
            let mut c = conn_to(port);
            let _: () = redis::cmd("SELECT").arg(1).query(&mut c).unwrap();
            let mut last = [0i64; KEYS];
            while !stop.load(Ordering::Relaxed) {
                for (k, seen) in last.iter_mut().enumerate() {
                    let v: Option<i64> = redis::cmd("GET")
                        .arg(format!("ver:{k}"))
                        .query(&mut c)
                        .unwrap();
                    let v = v.unwrap_or(0);
                    assert!(v >= *seen, "db 1 ver:{k} went backwards: {seen} then {v}");
                    *seen = v;
                }
            }
            0
        }));
    }
    let mut readers = Vec::new();
    for r in 0..4 {
        let stop = stop.clone();
        let port = if r % 2 == 0 { p1.port } else { p2.port };
        readers.push(std::thread::spawn(move || {
            let mut c = conn_to(port);
            let mut last = [0i64; KEYS];
            let mut hlast = [[0i64; 2]; KEYS];
            let mut reads = 0u64;
            let mut round = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // Every other round one MGET of all keys (its misses fill
                // as GETs do).
                let got: Vec<Option<i64>> = if round.is_multiple_of(2) {
                    (0..KEYS)
                        .map(|k| {
                            redis::cmd("GET")
                                .arg(format!("ver:{k}"))
                                .query(&mut c)
                                .unwrap()
                        })
                        .collect()
                } else {
                    let keys: Vec<String> = (0..KEYS).map(|k| format!("ver:{k}")).collect();
                    redis::cmd("MGET").arg(&keys).query(&mut c).unwrap()
                };
                for (k, (seen, v)) in last.iter_mut().zip(got).enumerate() {
                    let v = v.unwrap_or(0);
                    assert!(
                        v >= *seen,
                        "ver:{k} went backwards: {seen} then {v} (proxy port {port})"
                    );
                    *seen = v;
                    reads += 1;
                }
                for (k, seen) in hlast.iter_mut().enumerate() {
                    let h = format!("hver:{k}");
                    let got: [Option<i64>; 2] = match (round + r + k) % 3 {
                        0 => {
                            let f = ["a", "b"][(round + k) % 2];
                            let v: Option<i64> =
                                redis::cmd("HGET").arg(&h).arg(f).query(&mut c).unwrap();
                            if f == "a" { [v, None] } else { [None, v] }
                        }
                        1 => {
                            let v: Vec<Option<i64>> = redis::cmd("HMGET")
                                .arg(&h)
                                .arg(&["a", "b"])
                                .query(&mut c)
                                .unwrap();
                            [v[0].or(Some(0)), v[1].or(Some(0))]
                        }
                        _ => {
                            let m: std::collections::HashMap<String, i64> =
                                redis::cmd("HGETALL").arg(&h).query(&mut c).unwrap();
                            [
                                Some(*m.get("a").unwrap_or(&0)),
                                Some(*m.get("b").unwrap_or(&0)),
                            ]
                        }
                    };
                    for (i, v) in got.iter().enumerate() {
                        if let Some(v) = *v {
                            assert!(
                                v >= seen[i],
                                "{h} field {i} went backwards: {} then {v} (proxy port {port})",
                                seen[i]
                            );
                            seen[i] = v;
                        }
                    }
                    reads += 1;
                }
                round += 1;
            }
            reads
        }));
    }
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let reads: u64 = readers
        .into_iter()
        .map(|r| r.join().expect("reader saw a version go backwards"))
        .sum();
    assert!(
        writes > 1000 && reads > 1000,
        "writes {writes} reads {reads}"
    );
    // Final versions everywhere within 100 ms.
    let mut direct = redis.conn();
    let finals: Vec<Option<String>> = (0..KEYS)
        .map(|k| {
            redis::cmd("GET")
                .arg(format!("ver:{k}"))
                .query(&mut direct)
                .unwrap()
        })
        .collect();
    for p in [&p1, &p2] {
        let mut c = p.conn();
        for (k, f) in finals.iter().enumerate() {
            visible_within(
                &mut c,
                &format!("ver:{k}"),
                f.as_deref(),
                Duration::from_millis(100),
            );
        }
        for k in 0..KEYS {
            let h = format!("hver:{k}");
            let want: Vec<String> = redis::cmd("HGETALL").arg(&h).query(&mut direct).unwrap();
            let t = Instant::now();
            loop {
                let got: Vec<String> = redis::cmd("HGETALL").arg(&h).query(&mut c).unwrap();
                if got == want {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_millis(100),
                    "{h}: {got:?}, want {want:?}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let _: () = redis::cmd("SELECT").arg(1).query(&mut direct).unwrap();
        let _: () = redis::cmd("SELECT").arg(1).query(&mut c).unwrap();
        for k in 0..KEYS {
            let key = format!("ver:{k}");
            let want: Option<String> = redis::cmd("GET").arg(&key).query(&mut direct).unwrap();
            visible_within(&mut c, &key, want.as_deref(), Duration::from_millis(100));
        }
        let _: () = redis::cmd("SELECT").arg(0).query(&mut direct).unwrap();
        let hits = l1_stat(&mut c, "hits");
        assert!(hits > 0, "the checker never exercised L1 hits");
    }
}

#[test]
fn coherence_versions_never_go_backwards() {
    coherence_checker(Duration::from_secs(3));
}

#[test]
#[ignore = "long soak; run with --ignored"]
fn coherence_versions_never_go_backwards_soak() {
    coherence_checker(Duration::from_secs(120));
}

#[test]
fn mget_serves_hits_and_fetches_only_misses() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut c = proxy.conn();
    let _: () = redis::cmd("MSET")
        .arg("a")
        .arg("1")
        .arg("b")
        .arg("2")
        .arg("c")
        .arg("3")
        .query(&mut c)
        .unwrap();
    for k in ["a", "c"] {
        let _: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
    }
    let mut r = proxy.raw();
    // Partial: only "b" and "zz" are read (filled, as their GETs would
    // be); the reply is still in order.
    let before = redis.calls("get");
    r.send(&cmd_bytes(&[b"MGET", b"a", b"b", b"zz", b"c"]));
    r.expect(b"*4\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n$1\r\n3\r\n");
    assert_eq!(redis.calls("get"), before + 2);
    let hits = l1_stat(&mut c, "hits");
    // All hits now, "b" and "zz" included: no upstream command at all.
    r.send(&cmd_bytes(&[b"MGET", b"c", b"a", b"b", b"zz"]));
    r.expect(b"*4\r\n$1\r\n3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n");
    assert_eq!(redis.calls("get"), before + 2);
    assert_eq!(redis.calls("mget"), 0);
    assert_eq!(l1_stat(&mut c, "hits"), hits + 4);
    // RESP3 clients get RESP3 nulls for the missing keys.
    r.send(&cmd_bytes(&[b"HELLO", b"3"]));
    let mut sc = respite::resp::FrameScanner::new();
    let mut buf = Vec::new();
    while sc.next_frame(&buf).unwrap().is_none() {
        buf.extend(r.read_n(1));
    }
    r.send(&cmd_bytes(&[b"MGET", b"a", b"zz"]));
    r.expect(b"*2\r\n$1\r\n1\r\n_\r\n");
}

/// A pipeline of reads fills L1 too (only writes in flight hold fills
/// back), and its replies keep request order.
#[test]
fn pipelined_reads_fill_and_keep_order() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut direct = redis.conn();
    for i in 0..40 {
        let _: () = redis::cmd("SET")
            .arg(format!("pf{i}"))
            .arg(format!("v{i}"))
            .query(&mut direct)
            .unwrap();
    }
    let mut c = proxy.conn();
    let read_all = |c: &mut redis::Connection| {
        let mut p = redis::pipe();
        for i in 0..40 {
            p.cmd("GET").arg(format!("pf{i}"));
            // Interleaved non-cacheable reads take batch slots between fills.
            p.cmd("STRLEN").arg(format!("pf{i}"));
        }
        let got: Vec<redis::Value> = p.query(c).unwrap();
        for i in 0..40 {
            assert_eq!(
                got[2 * i],
                redis::Value::BulkString(format!("v{i}").into_bytes()),
                "reply {i} out of order"
            );
            assert_eq!(
                got[2 * i + 1],
                redis::Value::Int(format!("v{i}").len() as i64)
            );
        }
    };
    read_all(&mut c);
    let before = redis.calls("get");
    read_all(&mut c);
    assert_eq!(redis.calls("get"), before, "second pipeline reached Redis");
    // A write earlier in the pipeline holds the fill back, and the GET after
    // it reads the write.
    let (_, v): ((), String) = redis::pipe()
        .cmd("SET")
        .arg("pf0")
        .arg("new")
        .cmd("GET")
        .arg("pf0")
        .query(&mut c)
        .unwrap();
    assert_eq!(v, "new");
}

/// Concurrent misses on one key coalesce into one upstream read: while
/// Redis is busy (DEBUG SLEEP), twenty clients miss the same key; Redis
/// sees one GET and every client gets the value.
#[test]
fn concurrent_misses_coalesce_into_one_read() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut direct = redis.conn();
    let _: () = redis::cmd("SET")
        .arg("cold")
        .arg("v")
        .query(&mut direct)
        .unwrap();
    // Warm the proxy's connections so only the GETs are in flight below.
    let mut warm = proxy.conn();
    let _: () = redis::cmd("PING").query(&mut warm).unwrap();
    let conns: Vec<redis::Connection> = (0..20).map(|_| proxy.conn()).collect();
    let before = redis.calls("get");
    let sleeper = std::thread::spawn(move || {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("1")
            .query(&mut direct)
            .unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    // Connected beforehand, so all twenty GETs arrive while Redis sleeps.
    let readers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let v: String = redis::cmd("GET").arg("cold").query(&mut c).unwrap();
                v
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), "v");
    }
    sleeper.join().unwrap();
    assert_eq!(redis.calls("get") - before, 1, "misses were not coalesced");
    assert!(l1_stat(&mut warm, "coalesced_misses") >= 19);
    // The fill installed the value: the next read is a hit.
    let v: String = redis::cmd("GET").arg("cold").query(&mut warm).unwrap();
    assert_eq!(v, "v");
    assert_eq!(redis.calls("get") - before, 1);
}

/// A client that pipelines many L1 hits and reads its replies normally is
/// not cut off by limits.max_output_bytes: hits copied straight into the
/// output buffer are bounded there, then take pipeline slots, so the
/// session writes before it reads ever more.
#[test]
fn a_deep_pipeline_of_large_hits_is_served_not_cut_off() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "limits.max_output_bytes=67108864"]);
    let mut c = proxy.conn();
    let val = vec![b'h'; 12 * 1024];
    for i in 0..10 {
        let _: () = redis::cmd("SET")
            .arg(format!("big{i}"))
            .arg(&val)
            .query(&mut c)
            .unwrap();
        let _: Vec<u8> = redis::cmd("GET")
            .arg(format!("big{i}"))
            .query(&mut c)
            .unwrap();
    }
    let hits_before = l1_stat(&mut c, "hits");
    // 8000 x 12 KiB = 94 MiB of replies to ~250 KB of requests.
    let mut p = redis::pipe();
    for i in 0..8000 {
        p.cmd("GET").arg(format!("big{}", i % 10));
    }
    let replies: Vec<Vec<u8>> = p.query(&mut c).unwrap();
    assert_eq!(replies.len(), 8000);
    assert!(replies.iter().all(|r| r == &val));
    assert!(l1_stat(&mut c, "hits") - hits_before >= 8000);
}

/// Whether respite caches this server's hashes: below Redis 7.4 (from
/// 7.4 on, per-field TTLs make it read them from Redis every time).
fn hashes_cached(redis: &RedisServer) -> bool {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut redis.conn())
        .unwrap();
    let v = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("");
    let mut p = v.trim().split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    (p.next().unwrap_or(0), p.next().unwrap_or(0)) < (7, 4)
}

/// Upstream hash reads of any kind (fills read HGET as a one-field HMGET).
fn hash_calls(redis: &RedisServer) -> u64 {
    ["hget", "hmget", "hgetall"]
        .iter()
        .map(|c| redis.calls(c))
        .sum()
}

#[test]
fn hash_reads_are_served_from_l1_with_redis_exact_replies() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut direct = redis.conn();
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg(&["a", "1", "b", "22", "c", ""])
        .query(&mut direct)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("s")
        .arg("x")
        .query(&mut direct)
        .unwrap();
    // The same requests, RESP2 then RESP3, first through Redis itself for
    // the expected bytes, then twice through respite (fill, then hit).
    let reads: [&[&[u8]]; 9] = [
        &[b"HGET", b"h", b"a"],
        &[b"HGET", b"h", b"zz"],
        &[b"HMGET", b"h", b"a", b"zz", b"b", b"a"],
        &[b"HGETALL", b"h"],
        &[b"HGET", b"h", b"c"],
        &[b"HGET", b"nokey", b"a"],
        &[b"HMGET", b"nokey", b"a", b"b"],
        &[b"HGETALL", b"nokey"],
        &[b"HGET", b"s", b"a"],
    ];
    for hello in [&b"2"[..], b"3"] {
        let mut want = Raw::connect(redis.port);
        let mut got = proxy.raw();
        for r in [&mut want, &mut got] {
            r.send(&cmd_bytes(&[b"HELLO", hello]));
            r.read_reply();
        }
        for req in reads {
            want.send(&cmd_bytes(req));
            let expected = want.read_reply();
            for round in 0..2 {
                got.send(&cmd_bytes(req));
                assert_eq!(
                    String::from_utf8_lossy(&got.read_reply()),
                    String::from_utf8_lossy(&expected),
                    "{req:?} RESP{hello:?} round {round}"
                );
            }
        }
    }
    // Every read above was a hit the second time, or answered from what a
    // wider read had filled: more reads would reach Redis no more.
    let mut c = proxy.conn();
    let before = hash_calls(&redis);
    for _ in 0..20 {
        let v: Option<String> = redis::cmd("HGET").arg("h").arg("b").query(&mut c).unwrap();
        assert_eq!(v.as_deref(), Some("22"));
        let v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg("h")
            .arg(&["c", "a", "nope"])
            .query(&mut c)
            .unwrap();
        assert_eq!(v, [Some(String::new()), Some("1".into()), None]);
        let all: Vec<String> = redis::cmd("HGETALL").arg("h").query(&mut c).unwrap();
        assert_eq!(all, ["a", "1", "b", "22", "c", ""]);
    }
    if hashes_cached(&redis) {
        assert_eq!(hash_calls(&redis), before, "hash hits reached Redis");
    }
    // The WRONGTYPE error is never cached.
    let before = redis.calls("hmget");
    for _ in 0..3 {
        let e = redis::cmd("HGET")
            .arg("s")
            .arg("a")
            .query::<Option<String>>(&mut c)
            .unwrap_err();
        assert!(e.to_string().contains("WRONGTYPE"), "{e}");
    }
    assert_eq!(redis.calls("hmget"), before + 3);
    // A GET of a hash is Redis' error, not a cached hash.
    let e = redis::cmd("GET")
        .arg("h")
        .query::<Option<String>>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("WRONGTYPE"), "{e}");
}

#[test]
fn hash_writes_invalidate_cached_fields() {
    let redis = RedisServer::start();
    let p1 = Proxy::start(&redis.url(), &[]);
    let p2 = Proxy::start(&redis.url(), &["--set", "server.threads=2"]);
    let mut c1 = p1.conn();
    let mut c2 = p2.conn();
    let mut direct = redis.conn();
    let hget = |c: &mut redis::Connection, f: &str| -> Option<String> {
        redis::cmd("HGET").arg("h").arg(f).query(c).unwrap()
    };
    let all = |c: &mut redis::Connection| -> Vec<String> {
        redis::cmd("HGETALL").arg("h").query(c).unwrap()
    };
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg(&["a", "1", "b", "2"])
        .query(&mut direct)
        .unwrap();
    // Warm both kinds of entry on both proxies.
    for c in [&mut c1, &mut c2] {
        assert_eq!(hget(c, "a").as_deref(), Some("1"));
        assert_eq!(all(c), ["a", "1", "b", "2"]);
    }
    // A write through p1: p1 reads it back at once, p2 within 50 ms.
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("a")
        .arg("10")
        .query(&mut c1)
        .unwrap();
    assert_eq!(hget(&mut c1, "a").as_deref(), Some("10"));
    let until = |c: &mut redis::Connection, want: &[&str]| {
        let t = Instant::now();
        loop {
            let got = all(c);
            if got == want {
                assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(3), "stuck at {got:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    until(&mut c2, &["a", "10", "b", "2"]);
    // Direct writes of every kind reach both.
    let _: () = redis::cmd("HDEL")
        .arg("h")
        .arg("b")
        .query(&mut direct)
        .unwrap();
    until(&mut c1, &["a", "10"]);
    until(&mut c2, &["a", "10"]);
    let _: i64 = redis::cmd("HINCRBY")
        .arg("h")
        .arg("a")
        .arg(5)
        .query(&mut direct)
        .unwrap();
    until(&mut c1, &["a", "15"]);
    let _: () = redis::cmd("DEL").arg("h").query(&mut direct).unwrap();
    until(&mut c2, &[]);
    assert_eq!(hget(&mut c1, "a"), None);
    // FLUSHALL through the other proxy empties the entry too.
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("z")
        .arg("1")
        .query(&mut c2)
        .unwrap();
    until(&mut c1, &["z", "1"]);
    let _: () = redis::cmd("FLUSHALL").query(&mut c2).unwrap();
    until(&mut c1, &[]);
}

#[test]
fn hash_fields_never_outlive_the_key_in_redis() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut c = proxy.conn();
    let mut direct = redis.conn();
    let _: () = redis::cmd("HSET")
        .arg("eh")
        .arg("f")
        .arg("v")
        .query(&mut direct)
        .unwrap();
    let _: () = redis::cmd("PEXPIRE")
        .arg("eh")
        .arg(300)
        .query(&mut direct)
        .unwrap();
    let t = Instant::now();
    let v: Option<String> = redis::cmd("HGET").arg("eh").arg("f").query(&mut c).unwrap();
    assert_eq!(v.as_deref(), Some("v"));
    loop {
        // Taken before the reads: they are then at least this late.
        let past = t.elapsed() >= Duration::from_millis(302);
        let v: Option<String> = redis::cmd("HGET").arg("eh").arg("f").query(&mut c).unwrap();
        let all: Vec<String> = redis::cmd("HGETALL").arg("eh").query(&mut c).unwrap();
        if past {
            assert_eq!(v, None, "cached past the key's expiry");
            assert!(all.is_empty());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn compressed_hash_values_are_cached_decoded() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "compression.min_bytes=64"]);
    let mut c = proxy.conn();
    let big = "json-ish value ".repeat(40);
    let _: () = redis::cmd("HSET")
        .arg("ch")
        .arg(&["big", big.as_str(), "small", "s"])
        .query(&mut c)
        .unwrap();
    let stored: Vec<u8> = redis::cmd("HGET")
        .arg("ch")
        .arg("big")
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        stored.len() < big.len(),
        "the value was not stored compressed"
    );
    for _ in 0..2 {
        let v: String = redis::cmd("HGET")
            .arg("ch")
            .arg("big")
            .query(&mut c)
            .unwrap();
        assert_eq!(v, big);
        let v: Vec<String> = redis::cmd("HMGET")
            .arg("ch")
            .arg(&["small", "big"])
            .query(&mut c)
            .unwrap();
        assert_eq!(v, ["s", big.as_str()]);
        let all: std::collections::HashMap<String, String> =
            redis::cmd("HGETALL").arg("ch").query(&mut c).unwrap();
        assert_eq!(all["big"], big);
    }
    if hashes_cached(&redis) {
        assert!(l1_stat(&mut c, "hits") >= 3);
    }
}

#[test]
fn hash_reads_are_not_answered_with_a_write_pipelined_after_them() {
    // As for GET: a hash read that misses is answered by a fill on a
    // tracking connection, and the write pipelined after it, sent on the
    // client's own connection, must not reach Redis first; the read after
    // the write sees it.
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut r = proxy.raw();
    let n = 1500;
    preload(&redis, n, |i| {
        cmd_bytes(&[b"HSET", format!("hrace{i}").as_bytes(), b"f", b"old"])
    });
    let reads: [&[&[u8]]; 3] = [&[b"HGET", b"f"], &[b"HMGET", b"f", b"g"], &[b"HGETALL"]];
    let before = |i: usize| match i % 3 {
        0 => "$3\r\nold\r\n",
        1 => "*2\r\n$3\r\nold\r\n$-1\r\n",
        _ => "*2\r\n$1\r\nf\r\n$3\r\nold\r\n",
    };
    let after = |i: usize| match i % 3 {
        0 => "$3\r\nnew\r\n",
        1 => "*2\r\n$3\r\nnew\r\n$-1\r\n",
        _ => "*2\r\n$1\r\nf\r\n$3\r\nnew\r\n",
    };
    let read = |i: usize, k: &str| -> Vec<u8> {
        let cmd = reads[i % 3];
        let mut args: Vec<&[u8]> = vec![cmd[0], k.as_bytes()];
        args.extend(&cmd[1..]);
        cmd_bytes(&args)
    };
    for chunk in 0..n / 100 {
        let mut batch = Vec::new();
        for i in chunk * 100..(chunk + 1) * 100 {
            let k = format!("hrace{i}");
            batch.extend(read(i, &k));
            batch.extend(cmd_bytes(&[b"HSET", k.as_bytes(), b"f", b"new"]));
            batch.extend(read(i, &k));
        }
        r.send(&batch);
        for i in chunk * 100..(chunk + 1) * 100 {
            assert_eq!(
                String::from_utf8_lossy(&r.read_reply()),
                before(i),
                "hrace{i} read saw the HSET after it"
            );
            assert_eq!(r.read_reply(), b":0\r\n");
            assert_eq!(
                String::from_utf8_lossy(&r.read_reply()),
                after(i),
                "hrace{i} read missed the HSET before it"
            );
        }
    }
    // And once cached, the new values are what L1 holds.
    for i in 0..6 {
        let k = format!("hrace{i}");
        r.send(&read(i, &k));
        assert_eq!(String::from_utf8_lossy(&r.read_reply()), after(i));
    }
}

#[test]
fn concurrent_hash_misses_coalesce_into_one_read() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    if !hashes_cached(&redis) {
        return;
    }
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut direct = redis.conn();
    let _: () = redis::cmd("HSET")
        .arg("coldh")
        .arg(&["a", "1", "b", "2"])
        .query(&mut direct)
        .unwrap();
    let mut warm = proxy.conn();
    let _: () = redis::cmd("PING").query(&mut warm).unwrap();
    let conns: Vec<redis::Connection> = (0..20).map(|_| proxy.conn()).collect();
    let before = hash_calls(&redis);
    let sleeper = std::thread::spawn(move || {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("1")
            .query(&mut direct)
            .unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    // The first reader's HGETALL is in flight before the others ask, so
    // each of theirs (whatever it reads) waits for it.
    let mut conns = conns.into_iter();
    let mut first = conns.next().unwrap();
    let first = std::thread::spawn(move || {
        let v: Vec<String> = redis::cmd("HGETALL")
            .arg("coldh")
            .query(&mut first)
            .unwrap();
        v
    });
    std::thread::sleep(Duration::from_millis(100));
    let readers: Vec<_> = conns
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || -> Vec<Option<String>> {
                match i % 3 {
                    0 => vec![
                        redis::cmd("HGET")
                            .arg("coldh")
                            .arg("a")
                            .query(&mut c)
                            .unwrap(),
                    ],
                    1 => redis::cmd("HMGET")
                        .arg("coldh")
                        .arg(&["b", "zz", "a"])
                        .query(&mut c)
                        .unwrap(),
                    _ => {
                        let v: Vec<String> =
                            redis::cmd("HGETALL").arg("coldh").query(&mut c).unwrap();
                        v.into_iter().map(Some).collect()
                    }
                }
            })
        })
        .collect();
    assert_eq!(first.join().unwrap(), ["a", "1", "b", "2"]);
    for (i, r) in readers.into_iter().enumerate() {
        let want: Vec<Option<String>> = match i % 3 {
            0 => vec![Some("1".into())],
            1 => vec![Some("2".into()), None, Some("1".into())],
            _ => ["a", "1", "b", "2"].map(|s| Some(s.into())).to_vec(),
        };
        assert_eq!(r.join().unwrap(), want, "reader {i}");
    }
    sleeper.join().unwrap();
    assert_eq!(hash_calls(&redis) - before, 1, "misses were not coalesced");
    assert!(l1_stat(&mut warm, "coalesced_misses") >= 19);
    let v: Option<String> = redis::cmd("HGET")
        .arg("coldh")
        .arg("b")
        .query(&mut warm)
        .unwrap();
    assert_eq!(v.as_deref(), Some("2"));
    assert_eq!(hash_calls(&redis) - before, 1);
}

#[test]
fn l1_serves_every_db_a_client_selects_and_keeps_them_apart() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut direct = redis.conn();
    for (db, v) in [(0, "zero"), (1, "one"), (2, "two")] {
        let _: () = redis::cmd("SELECT").arg(db).query(&mut direct).unwrap();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg(v)
            .query(&mut direct)
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg("h")
            .arg("f")
            .arg(v)
            .query(&mut direct)
            .unwrap();
    }
    let mut zero = proxy.raw();
    let mut r = proxy.raw();
    let get = |r: &mut Raw, cmd: &[&[u8]]| -> String {
        r.send(&cmd_bytes(cmd));
        String::from_utf8_lossy(&r.read_reply()).into_owned()
    };
    assert_eq!(get(&mut zero, &[b"GET", b"k"]), "$4\r\nzero\r\n");
    assert_eq!(get(&mut r, &[b"SELECT", b"1"]), "+OK\r\n");
    for _ in 0..2 {
        assert_eq!(get(&mut r, &[b"GET", b"k"]), "$3\r\none\r\n");
        assert_eq!(get(&mut r, &[b"HGET", b"h", b"f"]), "$3\r\none\r\n");
        assert_eq!(get(&mut zero, &[b"GET", b"k"]), "$4\r\nzero\r\n");
    }
    // Hits in db 1 too: more reads reach Redis no more.
    let (gets, hash) = (redis.calls("get"), hash_calls(&redis));
    for _ in 0..10 {
        assert_eq!(get(&mut r, &[b"GET", b"k"]), "$3\r\none\r\n");
        assert_eq!(get(&mut r, &[b"HGET", b"h", b"f"]), "$3\r\none\r\n");
        assert_eq!(
            get(&mut r, &[b"MGET", b"k", b"k"]),
            "*2\r\n$3\r\none\r\n$3\r\none\r\n"
        );
    }
    assert_eq!(redis.calls("get"), gets);
    if hashes_cached(&redis) {
        assert_eq!(hash_calls(&redis), hash);
    }
    // A direct write in db 1 reaches the entry of db 1 (the invalidation
    // names the key only: db 0's entry goes too, and is read again).
    let _: () = redis::cmd("SELECT").arg(1).query(&mut direct).unwrap();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("one2")
        .query(&mut direct)
        .unwrap();
    let t = Instant::now();
    while get(&mut r, &[b"GET", b"k"]) != "$4\r\none2\r\n" {
        assert!(t.elapsed() < Duration::from_millis(50), "db 1 stale");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(get(&mut zero, &[b"GET", b"k"]), "$4\r\nzero\r\n");
    // Own writes in the selected db, pipelined with reads.
    let mut batch = cmd_bytes(&[b"SET", b"k", b"mine"]);
    batch.extend(cmd_bytes(&[b"GET", b"k"]));
    r.send(&batch);
    assert_eq!(r.read_reply(), b"+OK\r\n");
    assert_eq!(r.read_reply(), b"$4\r\nmine\r\n");
    assert_eq!(get(&mut zero, &[b"GET", b"k"]), "$4\r\nzero\r\n");
    // SELECTs pipelined with reads: each read is of the db before it.
    let mut batch = Vec::new();
    for db in [&b"2"[..], b"0", b"1", b"2"] {
        batch.extend(cmd_bytes(&[b"SELECT", db]));
        batch.extend(cmd_bytes(&[b"GET", b"k"]));
        batch.extend(cmd_bytes(&[b"HGET", b"h", b"f"]));
    }
    r.send(&batch);
    for v in ["two", "zero", "mine", "two"] {
        assert_eq!(r.read_reply(), b"+OK\r\n");
        let want = format!("${}\r\n{v}\r\n", v.len());
        assert_eq!(String::from_utf8_lossy(&r.read_reply()), want);
        let want = if v == "mine" {
            "one".to_string()
        } else {
            v.to_string()
        };
        assert_eq!(
            String::from_utf8_lossy(&r.read_reply()),
            format!("${}\r\n{want}\r\n", want.len())
        );
    }
    // A refused SELECT leaves the db as it was.
    // (20: below the dbs L1 could hold, past the server's 16.)
    assert!(get(&mut r, &[b"SELECT", b"20"]).starts_with("-ERR"));
    assert!(get(&mut r, &[b"SELECT", b"x"]).starts_with("-ERR"));
    assert_eq!(get(&mut r, &[b"GET", b"k"]), "$3\r\ntwo\r\n");
    // Once a transaction pinned the connection, reads go to Redis (its
    // state is more than a db), still of the right db.
    assert_eq!(get(&mut r, &[b"MULTI"]), "+OK\r\n");
    assert_eq!(get(&mut r, &[b"EXEC"]), "*0\r\n");
    let gets = redis.calls("get");
    assert_eq!(get(&mut r, &[b"GET", b"k"]), "$3\r\ntwo\r\n");
    assert_eq!(get(&mut r, &[b"SELECT", b"1"]), "+OK\r\n");
    assert_eq!(get(&mut r, &[b"GET", b"k"]), "$4\r\nmine\r\n");
    assert_eq!(redis.calls("get"), gets + 2);
    // RESET: back to the upstream's db, through L1.
    assert_eq!(get(&mut r, &[b"RESET"]), "+RESET\r\n");
    assert_eq!(get(&mut r, &[b"GET", b"k"]), "$4\r\nzero\r\n");
    let gets = redis.calls("get");
    assert_eq!(get(&mut r, &[b"GET", b"k"]), "$4\r\nzero\r\n");
    assert_eq!(redis.calls("get"), gets);
}

#[test]
fn commands_the_proxy_does_not_know_invalidate_what_they_name() {
    // A write of a newer Redis than the command table (HGETDEL, HSETEX, ...)
    // stands for any unknown command: here HSET under another name (its second letter still S: Redis words the reply by it). In
    // `ttl` mode no invalidation comes from Redis, so only the local one
    // can make the client read its write.
    let redis = RedisServer::start_with(&["--rename-command", "HSET", "HSETV8"]);
    let proxy = Proxy::start(&redis.url(), &["--set", "l1.mode=ttl"]);
    let mut r = proxy.raw();
    let mut direct = Raw::connect(redis.port);
    direct.send(&cmd_bytes(&[b"HSETV8", b"h", b"f", b"old"]));
    assert_eq!(direct.read_reply(), b":1\r\n");
    direct.send(&cmd_bytes(&[b"SET", b"s", b"old"]));
    assert_eq!(direct.read_reply(), b"+OK\r\n");
    for _ in 0..2 {
        r.send(&cmd_bytes(&[b"HGET", b"h", b"f"]));
        assert_eq!(r.read_reply(), b"$3\r\nold\r\n");
        r.send(&cmd_bytes(&[b"GET", b"s"]));
        assert_eq!(r.read_reply(), b"$3\r\nold\r\n");
    }
    if hashes_cached(&redis) {
        assert_eq!(
            (redis.calls("hget"), redis.calls("hmget")),
            (0, 1),
            "the hash was not cached"
        );
    }
    r.send(&cmd_bytes(&[b"HSETV8", b"h", b"f", b"new"]));
    assert_eq!(r.read_reply(), b":0\r\n");
    r.send(&cmd_bytes(&[b"HGET", b"h", b"f"]));
    assert_eq!(r.read_reply(), b"$3\r\nnew\r\n");
    // The proxy's own commands are no writes of keys.
    r.send(&cmd_bytes(&[b"PROXY", b"PING", b"s"]));
    r.read_reply();
    let gets = redis.calls("get");
    r.send(&cmd_bytes(&[b"GET", b"s"]));
    assert_eq!(r.read_reply(), b"$3\r\nold\r\n");
    assert_eq!(redis.calls("get"), gets, "s was invalidated by PROXY");
}

#[test]
fn logging_in_on_a_selected_connection_leaves_l1_to_redis_acls() {
    // A client that SELECTs keeps L1; once it logs in as another user on
    // that connection (AUTH, or HELLO with AUTH), Redis' ACL for that user
    // must judge its reads, not values the proxy's own user filled.
    let redis = RedisServer::start();
    let mut direct = redis.conn();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "limited", "on", ">pw", "~allowed*", "+@all"])
        .query(&mut direct)
        .unwrap();
    let _: () = redis::cmd("SELECT").arg(1).query(&mut direct).unwrap();
    let _: () = redis::cmd("SET")
        .arg("secret")
        .arg("s1")
        .query(&mut direct)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("hsecret")
        .arg("f")
        .arg("s1")
        .query(&mut direct)
        .unwrap();
    let proxy = Proxy::start(&redis.url(), &[]);
    let login: [&[&[u8]]; 2] = [
        &[b"HELLO", b"2", b"AUTH", b"limited", b"pw"],
        &[b"AUTH", b"limited", b"pw"],
    ];
    for cmd in login {
        let mut r = proxy.raw();
        for req in [
            &[&b"SELECT"[..], b"1"][..],
            &[b"GET", b"secret"],
            &[b"HGET", b"hsecret", b"f"],
        ] {
            r.send(&cmd_bytes(req));
            r.read_reply();
        }
        // Both cached for db 1 now (read twice: hits).
        r.send(&cmd_bytes(&[b"GET", b"secret"]));
        assert_eq!(r.read_reply(), b"$2\r\ns1\r\n");
        r.send(&cmd_bytes(cmd));
        let reply = r.read_reply();
        assert!(
            !reply.starts_with(b"-"),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&reply)
        );
        for req in [&[&b"GET"[..], b"secret"][..], &[b"HGET", b"hsecret", b"f"]] {
            r.send(&cmd_bytes(req));
            let reply = String::from_utf8_lossy(&r.read_reply()).into_owned();
            assert!(
                reply.starts_with("-NOPERM"),
                "{cmd:?} then {req:?}: {reply}"
            );
        }
    }
}

#[test]
fn an_mget_only_workload_is_served_from_l1() {
    // Clients that read with MGET alone: the keys it misses are filled,
    // so the next MGET costs Redis nothing; replies are Redis' own bytes
    // (a key of another type reads as nil), and a write pipelined after a
    // filling MGET does not show in it.
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut direct = Raw::connect(redis.port);
    for cmd in [
        &[&b"SET"[..], b"m1", b"one"][..],
        &[b"SET", b"m2", b"two"],
        &[b"HSET", b"mh", b"f", b"v"],
    ] {
        direct.send(&cmd_bytes(cmd));
        direct.read_reply();
    }
    let req: &[&[u8]] = &[b"MGET", b"m1", b"mh", b"nokey", b"m2", b"m1"];
    for hello in [&b"2"[..], b"3"] {
        let mut want = Raw::connect(redis.port);
        let mut got = proxy.raw();
        for r in [&mut want, &mut got] {
            r.send(&cmd_bytes(&[b"HELLO", hello]));
            r.read_reply();
        }
        want.send(&cmd_bytes(req));
        let expected = want.read_reply();
        for round in 0..3 {
            got.send(&cmd_bytes(req));
            assert_eq!(
                String::from_utf8_lossy(&got.read_reply()),
                String::from_utf8_lossy(&expected),
                "RESP{hello:?} round {round}"
            );
        }
    }
    // m1, m2 and nokey are cached; the hash is read each time (a GET of it
    // is an error, which is never cached).
    let gets = redis.calls("get");
    let mut c = proxy.conn();
    for _ in 0..10 {
        let v: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&["m2", "nokey", "m1"])
            .query(&mut c)
            .unwrap();
        assert_eq!(v, [Some("two".into()), None, Some("one".into())]);
    }
    assert_eq!(redis.calls("get"), gets);
    assert_eq!(redis.calls("mget"), 2, "only the direct reads");
    // Keys missed together are read together: one transaction per
    // tracking connection, not one per key.
    let execs = redis.calls("exec");
    let keys: Vec<String> = (0..20).map(|i| format!("cold{i}")).collect();
    let v: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
    assert_eq!(v.len(), 20);
    let made = redis.calls("exec") - execs;
    assert!(
        (1..=4).contains(&made),
        "{made} fill transactions for one MGET"
    );
    // An MGET missing more keys than that goes to Redis as it is.
    let (execs, mgets) = (redis.calls("exec"), redis.calls("mget"));
    let keys: Vec<String> = (0..300).map(|i| format!("big{i}")).collect();
    let v: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
    assert_eq!(v.len(), 300);
    assert_eq!(
        (redis.calls("exec"), redis.calls("mget")),
        (execs, mgets + 1)
    );
    // Pipelined after a filling MGET, a SET of one of its keys waits.
    let mut r = proxy.raw();
    let n = 500;
    preload(&redis, n, |i| {
        cmd_bytes(&[b"SET", format!("mr{i}").as_bytes(), b"old"])
    });
    let mut batch = Vec::new();
    for i in 0..n {
        let (k, other) = (format!("mr{i}"), format!("mr{}", (i + 1) % n));
        batch.extend(cmd_bytes(&[b"MGET", other.as_bytes(), k.as_bytes()]));
        batch.extend(cmd_bytes(&[b"SET", k.as_bytes(), b"new"]));
        batch.extend(cmd_bytes(&[b"MGET", k.as_bytes()]));
    }
    r.send(&batch);
    for i in 0..n {
        let first = String::from_utf8_lossy(&r.read_reply()).into_owned();
        assert!(first.ends_with("$3\r\nold\r\n"), "mr{i}: {first:?}");
        assert_eq!(r.read_reply(), b"+OK\r\n");
        assert_eq!(
            String::from_utf8_lossy(&r.read_reply()),
            "*1\r\n$3\r\nnew\r\n",
            "mr{i} after its SET"
        );
    }
}

#[test]
fn one_unreadable_key_does_not_spoil_an_mgets_other_fills() {
    // The keys an MGET missed are read in one transaction per tracking
    // connection. A key the proxy's upstream user may not read aborts that
    // transaction; the others are then read alone, so they are still
    // installed (and GETs coalesced on them are not told NOPERM).
    let redis = RedisServer::start();
    let mut direct = redis.conn();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "px", "on", ">pw", "~ok*", "+@all"])
        .query(&mut direct)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("ok1")
        .arg("good")
        .query(&mut direct)
        .unwrap();
    let url = format!("redis://px:pw@127.0.0.1:{}", redis.port);
    let proxy = Proxy::start(&url, &[]);
    let mut r = proxy.raw();
    // Four forbidden keys: some share ok1's tracking connection.
    r.send(&cmd_bytes(&[
        b"MGET", b"ok1", b"sec1", b"sec2", b"sec3", b"sec4",
    ]));
    let reply = String::from_utf8_lossy(&r.read_reply()).into_owned();
    assert!(reply.starts_with("-NOPERM"), "{reply}");
    // ok1 was installed by its own read: the GET is a hit.
    let gets = redis.calls("get");
    r.send(&cmd_bytes(&[b"GET", b"ok1"]));
    assert_eq!(r.read_reply(), b"$4\r\ngood\r\n");
    assert_eq!(redis.calls("get"), gets, "ok1 was not filled");
    // And an MGET of readable keys only is one of Redis' answers.
    r.send(&cmd_bytes(&[b"MGET", b"ok1", b"ok2"]));
    assert_eq!(r.read_reply(), b"*2\r\n$4\r\ngood\r\n$-1\r\n");
}
