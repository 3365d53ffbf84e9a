//! Full-fidelity passthrough: every reply through respite equals Redis' own,
//! byte for byte, across command families, pipelines and protocol versions.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// Sends the same command sequence to Redis directly and through respite (in
/// front of a second, fresh Redis) and compares the raw reply bytes.
fn differential(cmds: &[Vec<&[u8]>]) {
    let direct = RedisServer::start();
    let behind = RedisServer::start();
    let proxy = Proxy::start(&behind.url(), &[]);
    let mut a = Raw::connect(direct.port);
    let mut b = proxy.raw();
    for c in cmds {
        let req = cmd_bytes(c);
        a.send(&req);
        b.send(&req);
        let ra = read_reply(&mut a);
        let rb = read_reply(&mut b);
        assert_eq!(
            String::from_utf8_lossy(&rb),
            String::from_utf8_lossy(&ra),
            "reply to {:?} differs",
            c.iter()
                .map(|x| String::from_utf8_lossy(x))
                .collect::<Vec<_>>()
        );
    }
}

/// Reads exactly one reply frame.
fn read_reply(r: &mut Raw) -> Vec<u8> {
    r.read_reply()
}

fn c(parts: &[&'static str]) -> Vec<&'static [u8]> {
    parts.iter().map(|p| p.as_bytes()).collect()
}

#[test]
fn command_families_match_redis_byte_for_byte() {
    let cmds: Vec<Vec<&[u8]>> = vec![
        c(&["PING"]),
        c(&["PING", "hello"]),
        c(&["ECHO", "x"]),
        // strings
        c(&["SET", "s", "v"]),
        c(&["SET", "s", "v2", "NX"]),
        c(&["SET", "s", "v3", "XX", "GET"]),
        c(&["GET", "s"]),
        c(&["GET", "missing"]),
        c(&["APPEND", "s", "abc"]),
        c(&["STRLEN", "s"]),
        c(&["GETRANGE", "s", "1", "3"]),
        c(&["SETRANGE", "s", "1", "ZZ"]),
        c(&["INCR", "n"]),
        c(&["INCRBY", "n", "41"]),
        c(&["INCRBYFLOAT", "f", "1.5"]),
        c(&["DECR", "n"]),
        c(&["INCR", "s"]),
        c(&["MSET", "a", "1", "b", "2"]),
        c(&["MGET", "a", "b", "nope"]),
        c(&["GETDEL", "a"]),
        c(&["SETEX", "e", "100", "v"]),
        c(&["TTL", "e"]),
        c(&["PERSIST", "e"]),
        c(&["TTL", "e"]),
        c(&["LCS", "s", "b"]),
        // bits
        c(&["SETBIT", "bits", "7", "1"]),
        c(&["GETBIT", "bits", "7"]),
        c(&["BITCOUNT", "bits"]),
        c(&["BITPOS", "bits", "1"]),
        c(&["BITFIELD", "bf", "SET", "u8", "0", "200", "GET", "u8", "0"]),
        // hashes
        c(&["HSET", "h", "f1", "v1", "f2", "v2"]),
        c(&["HGET", "h", "f1"]),
        c(&["HGETALL", "h"]),
        c(&["HMGET", "h", "f1", "x"]),
        c(&["HINCRBY", "h", "n", "5"]),
        c(&["HLEN", "h"]),
        c(&["HDEL", "h", "f2"]),
        c(&["HEXISTS", "h", "f2"]),
        // lists
        c(&["RPUSH", "l", "a", "b", "c"]),
        c(&["LRANGE", "l", "0", "-1"]),
        c(&["LPOP", "l"]),
        c(&["LPOS", "l", "c"]),
        c(&["LMOVE", "l", "l2", "LEFT", "RIGHT"]),
        c(&["LLEN", "l2"]),
        // sets
        c(&["SADD", "st", "x", "y", "z"]),
        c(&["SCARD", "st"]),
        c(&["SISMEMBER", "st", "y"]),
        c(&["SMISMEMBER", "st", "y", "q"]),
        c(&["SINTERCARD", "1", "st"]),
        // sorted sets
        c(&["ZADD", "z", "1", "a", "2", "b", "3.5", "c"]),
        c(&["ZRANGE", "z", "0", "-1", "WITHSCORES"]),
        c(&["ZSCORE", "z", "c"]),
        c(&["ZRANK", "z", "b"]),
        c(&["ZINCRBY", "z", "0.5", "a"]),
        c(&["ZRANGEBYSCORE", "z", "-inf", "+inf"]),
        c(&["ZPOPMIN", "z"]),
        // streams
        c(&["XADD", "x", "1-1", "k", "v"]),
        c(&["XADD", "x", "2-1", "k", "w"]),
        c(&["XLEN", "x"]),
        c(&["XRANGE", "x", "-", "+"]),
        c(&["XREAD", "COUNT", "1", "STREAMS", "x", "0"]),
        c(&["XGROUP", "CREATE", "x", "g", "0"]),
        c(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "c1",
            "COUNT",
            "1",
            "STREAMS",
            "x",
            ">",
        ]),
        c(&["XPENDING", "x", "g"]),
        // geo, hyperloglog
        c(&[
            "GEOADD",
            "geo",
            "13.361389",
            "38.115556",
            "Palermo",
            "15.087269",
            "37.502669",
            "Catania",
        ]),
        c(&["GEODIST", "geo", "Palermo", "Catania", "km"]),
        c(&["GEOPOS", "geo", "Palermo"]),
        c(&["PFADD", "hll", "a", "b", "c"]),
        c(&["PFCOUNT", "hll"]),
        // keys
        c(&["EXISTS", "s", "h", "nope"]),
        c(&["TYPE", "z"]),
        c(&["EXPIRE", "h", "100"]),
        c(&["EXPIRETIME", "nope"]),
        c(&["RENAME", "st", "st2"]),
        c(&["OBJECT", "ENCODING", "n"]),
        c(&["DBSIZE"]),
        c(&["DEL", "s", "nope"]),
        c(&["SORT", "l2", "ALPHA"]),
        // scripting
        c(&["EVAL", "return {KEYS[1], ARGV[1], 7}", "1", "k", "arg"]),
        c(&["EVAL", "return redis.call('INCR', KEYS[1])", "1", "n"]),
        c(&["EVAL", "return redis.error_reply('boom')", "0"]),
        c(&[
            "FUNCTION",
            "LOAD",
            "#!lua name=t\nredis.register_function('f', function(keys, args) return args[1] end)",
        ]),
        c(&["FCALL", "f", "0", "fv"]),
        // errors and misc
        c(&["NOSUCHCOMMAND", "x"]),
        c(&["GET"]),
        c(&["HGET", "s"]),
        c(&["LPUSH", "n", "x"]),
        c(&["EXEC"]),
        c(&["CONFIG", "GET", "maxmemory-policy"]),
        c(&["DEBUG", "SLEEP", "0"]),
        c(&["UNSUBSCRIBE"]),
        c(&["FLUSHDB"]),
        c(&["DBSIZE"]),
    ];
    differential(&cmds);
}

#[test]
fn binary_keys_and_values_roundtrip() {
    let mut vals: Vec<Vec<u8>> = vec![Vec::new(), b"\r\n".to_vec(), (0u8..=255).collect()];
    vals.push(vec![0u8; 100_000]);
    let mut cmds: Vec<Vec<&[u8]>> = Vec::new();
    for v in &vals {
        cmds.push(vec![b"SET", &v[..v.len().min(300)], v]);
        cmds.push(vec![b"GET", &v[..v.len().min(300)]]);
    }
    differential(&cmds);
}

#[test]
fn resp3_after_hello_and_resp2_never_sees_resp3() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"HSET", b"h", b"f", b"v"]));
    r.expect(b":1\r\n");
    // RESP2: a flat array, and nil as $-1.
    r.send(&cmd_bytes(&[b"HGETALL", b"h"]));
    r.expect(b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n");
    r.send(&cmd_bytes(&[b"GET", b"nope"]));
    r.expect(b"$-1\r\n");
    r.send(&cmd_bytes(&[b"HELLO", b"3"]));
    let hello = read_reply(&mut r);
    assert!(
        hello.starts_with(b"%7\r\n"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    assert!(hello.windows(7).any(|w| w == b"proto\r\n"));
    r.send(&cmd_bytes(&[b"HGETALL", b"h"]));
    r.expect(b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n");
    r.send(&cmd_bytes(&[b"GET", b"nope"]));
    r.expect(b"_\r\n");
    r.send(&cmd_bytes(&[b"HELLO", b"2"]));
    let hello = read_reply(&mut r);
    assert!(hello.starts_with(b"*14\r\n"));
    r.send(&cmd_bytes(&[b"HGETALL", b"h"]));
    r.expect(b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n");
    r.send(&cmd_bytes(&[b"HELLO", b"4"]));
    r.expect(b"-NOPROTO unsupported protocol version\r\n");
    // The redis crate speaking RESP3 end to end.
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{}/?protocol=resp3", proxy.port)).unwrap();
    let mut con = client.get_connection_with_timeout(TIMEOUT).unwrap();
    let m: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg("h").query(&mut con).unwrap();
    assert_eq!(m.get("f").map(String::as_str), Some("v"));
}

/// Both runtimes (`server.threads` 0 picks one of them by core count).
const RUNTIMES: [&str; 2] = ["server.threads=1", "server.threads=2"];

#[test]
fn deep_pipeline_mixed_families_in_order() {
    for rt in RUNTIMES {
        deep_pipeline_on(rt);
    }
}

fn deep_pipeline_on(runtime: &str) {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", runtime]);
    let mut con = proxy.conn();
    let mut p = redis::pipe();
    for i in 0..10_000 {
        match i % 5 {
            0 => p.cmd("SET").arg(format!("k{i}")).arg(i),
            1 => p.cmd("GET").arg(format!("k{}", i - 1)),
            2 => p.cmd("HSET").arg("h").arg(i).arg(i),
            3 => p.cmd("PING"),
            _ => p.cmd("SELECT").arg(0),
        };
    }
    let replies: Vec<redis::Value> = p.query(&mut con).unwrap();
    assert_eq!(replies.len(), 10_000);
    for (i, v) in replies.iter().enumerate() {
        match i % 5 {
            1 => assert_eq!(
                v,
                &redis::Value::BulkString((i - 1).to_string().into_bytes()),
                "reply {i}"
            ),
            2 => assert_eq!(v, &redis::Value::Int(1)),
            3 => assert_eq!(v, &redis::Value::SimpleString("PONG".into())),
            _ => assert_eq!(v, &redis::Value::Okay, "reply {i}"),
        }
    }
}

#[test]
fn transactions_with_watch_conflict() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut a = proxy.conn();
    let mut b = proxy.conn();
    let _: () = redis::cmd("SET").arg("w").arg(1).query(&mut a).unwrap();
    let _: () = redis::cmd("WATCH").arg("w").query(&mut a).unwrap();
    let _: () = redis::cmd("SET").arg("w").arg(2).query(&mut b).unwrap();
    let _: () = redis::cmd("MULTI").query(&mut a).unwrap();
    let q: String = redis::cmd("SET").arg("w").arg(3).query(&mut a).unwrap();
    assert_eq!(q, "QUEUED");
    let r: redis::Value = redis::cmd("EXEC").query(&mut a).unwrap();
    assert_eq!(
        r,
        redis::Value::Nil,
        "EXEC must abort after a WATCHed key changed"
    );
    let v: i64 = redis::cmd("GET").arg("w").query(&mut b).unwrap();
    assert_eq!(v, 2);
    // Without a conflict the transaction applies atomically.
    let (x, y): (i64, i64) = redis::pipe()
        .atomic()
        .incr("t", 1)
        .incr("t", 1)
        .query(&mut a)
        .unwrap();
    assert_eq!((x, y), (1, 2));
    // DISCARD and errors inside MULTI behave as in Redis.
    let _: () = redis::cmd("MULTI").query(&mut a).unwrap();
    let e = redis::cmd("NOSUCH").query::<()>(&mut a).unwrap_err();
    assert!(e.to_string().contains("unknown command"), "{e}");
    let e = redis::cmd("EXEC").query::<()>(&mut a).unwrap_err();
    assert!(
        e.to_string()
            .contains("Transaction discarded because of previous errors"),
        "{e}"
    );
}

#[test]
fn pubsub_with_patterns() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut sub = proxy.raw();
    sub.send(&cmd_bytes(&[b"SUBSCRIBE", b"news"]));
    sub.expect(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n");
    sub.send(&cmd_bytes(&[b"PSUBSCRIBE", b"n*"]));
    sub.expect(b"*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:2\r\n");
    let mut publ = proxy.conn();
    let n: i64 = redis::cmd("PUBLISH")
        .arg("news")
        .arg("hi")
        .query(&mut publ)
        .unwrap();
    assert_eq!(n, 2);
    sub.expect(b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n");
    sub.expect(b"*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$2\r\nhi\r\n");
    sub.send(&cmd_bytes(&[b"PING"]));
    sub.expect(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    sub.send(&cmd_bytes(&[b"UNSUBSCRIBE", b"news"]));
    sub.expect(b"*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:1\r\n");
    // The redis crate's pub/sub API through the proxy.
    let client = proxy.client();
    let mut c = client.get_connection_with_timeout(TIMEOUT).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut ps = c.as_pubsub();
    ps.psubscribe("ev.*").unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("ev.1")
        .arg("payload")
        .query(&mut publ)
        .unwrap();
    let msg = ps.get_message().unwrap();
    assert_eq!(msg.get_channel_name(), "ev.1");
    assert_eq!(msg.get_payload::<String>().unwrap(), "payload");
}

#[test]
fn blocking_commands_with_timeouts_and_wakeups() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut a = proxy.conn();
    let t = Instant::now();
    let v: Option<(String, String)> = redis::cmd("BLPOP")
        .arg("bl")
        .arg(0.2)
        .query(&mut a)
        .unwrap();
    assert_eq!(v, None);
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "BLPOP returned too early"
    );
    // Blocking on one client must not stall others sharing upstream connections.
    let port = proxy.port;
    let waiter = std::thread::spawn(move || {
        let mut c = conn_to(port);
        let v: (String, String) = redis::cmd("BLPOP").arg("bl").arg(5).query(&mut c).unwrap();
        v
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut others = proxy.conn();
    let t = Instant::now();
    for i in 0..100 {
        let _: () = redis::cmd("SET")
            .arg("x")
            .arg(i)
            .query(&mut others)
            .unwrap();
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    let _: i64 = redis::cmd("RPUSH")
        .arg("bl")
        .arg("item")
        .query(&mut others)
        .unwrap();
    assert_eq!(
        waiter.join().unwrap(),
        ("bl".to_string(), "item".to_string())
    );
    // Streams: XREAD BLOCK with a timeout.
    let v: redis::Value = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(100)
        .arg("STREAMS")
        .arg("sx")
        .arg("$")
        .query(&mut a)
        .unwrap();
    assert_eq!(v, redis::Value::Nil);
    let v: redis::Value = redis::cmd("BZPOPMIN")
        .arg("zz")
        .arg(0.1)
        .query(&mut a)
        .unwrap();
    assert_eq!(v, redis::Value::Nil);
}

#[test]
fn select_isolation_and_reset() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut a = proxy.conn();
    let mut b = proxy.conn();
    let _: () = redis::cmd("SELECT").arg(3).query(&mut a).unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("in3").query(&mut a).unwrap();
    let v: Option<String> = redis::cmd("GET").arg("k").query(&mut b).unwrap();
    assert_eq!(v, None, "db 3 write visible in db 0");
    let _: () = redis::cmd("SET").arg("k").arg("in0").query(&mut b).unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut a).unwrap();
    assert_eq!(v, "in3");
    let e = redis::cmd("SELECT")
        .arg(99)
        .query::<()>(&mut b)
        .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    // With arguments RESET is Redis' arity error and resets nothing (as
    // CLIENT GETNAME with one too many), with Redis' own wording.
    let mut raw = proxy.raw();
    raw.send(&cmd_bytes(&[b"SELECT", b"3"]));
    raw.expect(b"+OK\r\n");
    raw.send(&cmd_bytes(&[b"RESET", b"x"]));
    raw.expect(b"-ERR wrong number of arguments for 'reset' command\r\n");
    raw.send(&cmd_bytes(&[b"CLIENT", b"GETNAME", b"x"]));
    raw.expect(b"-ERR wrong number of arguments for 'client|getname' command\r\n");
    raw.send(&cmd_bytes(&[b"GET", b"k"]));
    raw.expect(b"$3\r\nin3\r\n");
    let r: String = redis::cmd("RESET").query(&mut a).unwrap();
    assert_eq!(r, "RESET");
    let v: String = redis::cmd("GET").arg("k").query(&mut a).unwrap();
    assert_eq!(v, "in0", "RESET returns to db 0");
    // The redis crate selecting a db in its URL.
    let c = redis::Client::open(format!("redis://127.0.0.1:{}/3", proxy.port)).unwrap();
    let mut c = c.get_connection_with_timeout(TIMEOUT).unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "in3");
}

#[test]
fn hundred_megabyte_value() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut con = proxy.conn();
    let big: Vec<u8> = (0..100 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&big)
        .query(&mut con)
        .unwrap();
    let back: Vec<u8> = redis::cmd("GET").arg("big").query(&mut con).unwrap();
    assert!(back == big, "100 MB value corrupted");
    let n: usize = redis::cmd("STRLEN").arg("big").query(&mut con).unwrap();
    assert_eq!(n, big.len());
}

#[test]
fn scan_cursors_cover_every_key() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut con = proxy.conn();
    let mut p = redis::pipe();
    for i in 0..2000 {
        p.cmd("SET").arg(format!("sk:{i}")).arg(i).ignore();
    }
    let _: () = p.query(&mut con).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("sk:*")
            .arg("COUNT")
            .arg(100)
            .query(&mut con)
            .unwrap();
        seen.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert_eq!(seen.len(), 2000);
}

#[test]
fn client_commands_and_quit() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut a = proxy.conn();
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("myapp")
        .query(&mut a)
        .unwrap();
    let n: String = redis::cmd("CLIENT").arg("GETNAME").query(&mut a).unwrap();
    assert_eq!(n, "myapp");
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut a).unwrap();
    assert!(list.contains("name=myapp"), "{list}");
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"QUIT"]));
    r.expect(b"+OK\r\n");
    assert!(r.is_closed());
    // Inline commands (telnet style) are answered like Redis does.
    let mut r = proxy.raw();
    r.send(b"SET inl \"a b\"\r\nGET inl\r\nPING\r\n");
    r.expect(b"+OK\r\n$3\r\na b\r\n+PONG\r\n");
}

#[test]
fn info_has_proxy_section_and_redis_sections() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut con = proxy.conn();
    let info: String = redis::cmd("INFO").query(&mut con).unwrap();
    assert!(
        info.contains("# Server") && info.contains("redis_version:"),
        "{info}"
    );
    assert!(
        info.contains("# Proxy") && info.contains("upstream_up:1"),
        "{info}"
    );
    let info: String = redis::cmd("INFO").arg("proxy").query(&mut con).unwrap();
    assert!(
        info.contains("# Proxy") && !info.contains("# Server"),
        "{info}"
    );
    let info: String = redis::cmd("INFO").arg("memory").query(&mut con).unwrap();
    assert!(info.contains("used_memory:") && !info.contains("# Proxy"));
}

#[test]
fn thousand_concurrent_clients() {
    for rt in RUNTIMES {
        thousand_clients_on(rt);
    }
}

fn thousand_clients_on(runtime: &str) {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", runtime]);
    let port = proxy.port;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tasks = Vec::new();
        for i in 0..1000 {
            tasks.push(tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                let key = format!("c{i}");
                let val = format!("v{i}");
                let mut req = cmd_bytes(&[b"SET", key.as_bytes(), val.as_bytes()]);
                req.extend(cmd_bytes(&[b"GET", key.as_bytes()]));
                s.write_all(&req).await.unwrap();
                let want = format!("+OK\r\n${}\r\n{val}\r\n", val.len());
                let mut got = vec![0u8; want.len()];
                tokio::time::timeout(TIMEOUT, s.read_exact(&mut got))
                    .await
                    .expect("reply in time")
                    .unwrap();
                assert_eq!(got, want.as_bytes());
                s
            }));
        }
        let mut socks = Vec::new();
        for t in tasks {
            socks.push(t.await.unwrap());
        }
        assert_eq!(socks.len(), 1000);
    });
    let mut con = redis.conn();
    let n: i64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(n, 1000);
    // Few upstream connections carried them all.
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
    assert!(
        clients.lines().count() < 20,
        "{} upstream connections",
        clients.lines().count()
    );
}

#[test]
fn redis_cli_session() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let run = |args: &[&str]| redis_cli(proxy.port, args);
    assert_eq!(run(&["SET", "cli", "v"]).trim(), "OK");
    assert_eq!(run(&["GET", "cli"]).trim(), "v");
    assert!(run(&["PROXY", "HELP"]).contains("CONFIG GET"));
    assert!(run(&["PROXY", "UPSTREAM"]).contains("up"));
    assert!(run(&["--no-raw", "PROXY", "STATS"]).contains("cmd:set"));
    // redis-cli's own pipe mode.
    let mut child = std::process::Command::new("redis-cli")
        .args(["-p", &proxy.port.to_string(), "--pipe"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        for i in 0..1000 {
            stdin
                .write_all(&cmd_bytes(&[b"SET", format!("p{i}").as_bytes(), b"x"]))
                .unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("errors: 0, replies: 1000"), "{text}");
}
