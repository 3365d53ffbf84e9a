//! Bad input, limits, upstream failures, local mode, admin, metrics and
//! signals: every failure is a clear error for the one client concerned and
//! everything else keeps working.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn ping_ok(p: &Proxy) {
    let mut c = p.conn();
    let r: String = redis::cmd("PING").query(&mut c).unwrap();
    assert_eq!(r, "PONG");
}

#[test]
fn malformed_resp_gets_error_and_close_others_unaffected() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        &redis.url(),
        &[
            "--set",
            "limits.max_bulk_bytes=1048576",
            "--set",
            "limits.max_multibulk_len=1000",
        ],
    );
    let mut bystander = proxy.conn();
    let cases: &[(&[u8], &str)] = &[
        (
            b"*2\r\n$3\r\nGET\r\n:1\r\n",
            "-ERR Protocol error: expected '$', got ':'\r\n",
        ),
        (
            b"*1\r\n$-5\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n$99999999999\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n$2000000\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*5000\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*x\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$3\r\nabcde\r\n",
            "-ERR Protocol error: bulk string not terminated by CRLF\r\n",
        ),
        (
            b"SET \"unbalanced\r\n",
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
    ];
    for (input, want) in cases {
        let mut r = proxy.raw();
        r.send(input);
        let got = r.read_to_close();
        assert_eq!(
            String::from_utf8_lossy(&got),
            *want,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
    // A too-long inline request without a newline.
    let mut r = proxy.raw();
    r.send(&vec![b'a'; 70 * 1024]);
    assert_eq!(
        r.read_to_close(),
        b"-ERR Protocol error: too big inline request\r\n"
    );
    // Valid commands before the bad one are answered first.
    let mut r = proxy.raw();
    let mut req = cmd_bytes(&[b"SET", b"k", b"v"]);
    req.extend(cmd_bytes(&[b"GET", b"k"]));
    req.extend(b"*1\r\n$x\r\n");
    r.send(&req);
    assert_eq!(
        String::from_utf8_lossy(&r.read_to_close()),
        "+OK\r\n$1\r\nv\r\n-ERR Protocol error: invalid bulk length\r\n"
    );
    let v: String = redis::cmd("GET").arg("k").query(&mut bystander).unwrap();
    assert_eq!(v, "v");
    // Unknown commands are Redis' answer, not a disconnect.
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"FOOBAR", b"x"]));
    r.expect(b"-ERR unknown command 'FOOBAR', with args beginning with: 'x' \r\n");
    r.send(&cmd_bytes(&[b"PING"]));
    r.expect(b"+PONG\r\n");
    // Empty multibulk and blank lines are skipped like Redis does.
    r.send(b"*0\r\n\r\n*1\r\n$4\r\nPING\r\n");
    r.expect(b"+PONG\r\n");
    let m = proxy.metrics();
    assert!(m.contains("respite_errors_total{kind=\"protocol\"}"), "{m}");
}

#[test]
fn request_split_byte_by_byte() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut r = proxy.raw();
    let req = cmd_bytes(&[b"SET", b"drip", b"value"]);
    for b in &req {
        r.send(&[*b]);
        std::thread::sleep(Duration::from_millis(2));
    }
    r.expect(b"+OK\r\n");
}

#[test]
fn max_clients_rejects_with_clear_error() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "server.max_clients=3"]);
    let held: Vec<_> = (0..3).map(|_| proxy.conn()).collect();
    let mut extra = proxy.raw();
    assert_eq!(
        String::from_utf8_lossy(&extra.read_to_close()),
        "-ERR max number of clients reached\r\n"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    ping_ok(&proxy);
}

#[test]
fn idle_timeout_closes_idle_clients_only() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "server.idle_timeout_ms=300"]);
    let mut idle = proxy.raw();
    let mut busy = proxy.conn();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(800) {
        let _: String = redis::cmd("PING").query(&mut busy).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(idle.is_closed(), "idle client not closed");
    // A client blocked in a long command is not idle.
    let mut blocked = proxy.conn();
    let v: Option<(String, String)> = redis::cmd("BLPOP")
        .arg("nothing")
        .arg(0.6)
        .query(&mut blocked)
        .unwrap();
    assert_eq!(v, None);
}

#[test]
fn slow_reader_is_disconnected_memory_stays_bounded() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "limits.max_output_bytes=1048576"]);
    let mut c = proxy.conn();
    // Incompressible: the cap is about bytes owed to the client.
    let big = incompressible(512 * 1024);
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&big)
        .query(&mut c)
        .unwrap();
    // Ask for 400 MB of replies and never read them.
    let mut r = proxy.raw();
    // One write: the whole pipeline is there before the first reply can
    // block (a client that drip-feeds requests without reading holds its
    // session blocked on one reply instead: memory stays bounded, see
    // `run` in src/session.rs).
    let get = cmd_bytes(&[b"GET", b"big"]).repeat(800);
    r.s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    {
        use std::io::Write;
        r.s.write_all(&get).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = proxy.metrics();
        if m.contains("respite_errors_total{kind=\"output_overflow\"}") {
            break;
        }
        assert!(Instant::now() < deadline, "slow reader never disconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
    ping_ok(&proxy);
}

#[test]
fn upstream_down_gives_fast_errors_then_recovers() {
    let redis = RedisServer::start();
    let port = redis.port;
    let proxy = Proxy::start(&redis.url(), &["--set", "upstream.reconnect_max_ms=200"]);
    let mut c = proxy.conn();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    redis.stop();
    // In-flight or new: an error within a bounded time, never a hang.
    let t = Instant::now();
    let mut saw_error = false;
    for _ in 0..5 {
        if let Err(e) = redis::cmd("GET").arg("k").query::<Option<String>>(&mut c) {
            let s = e.to_string();
            assert!(s.contains("upstream"), "unclear error: {s}");
            saw_error = true;
        }
    }
    assert!(saw_error);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "errors took {:?}",
        t.elapsed()
    );
    let mut raw = proxy.raw();
    raw.send(&cmd_bytes(&[b"GET", b"k"]));
    let mut line = raw.read_n(9);
    line.extend(raw.read_n(1));
    assert!(
        line.starts_with(b"-TRYAGAIN"),
        "{}",
        String::from_utf8_lossy(&line)
    );
    // The health is visible.
    let up: redis::Value = redis::cmd("PROXY").arg("UPSTREAM").query(&mut c).unwrap();
    assert!(format!("{up:?}").contains("down"), "{up:?}");
    assert!(proxy.metrics().contains("respite_upstream_up 0"));
    // Restart Redis on the same port: the proxy reconnects on its own.
    let _redis = RedisServer::start_on(port, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(()) = redis::cmd("SET").arg("k2").arg("v2").query::<()>(&mut c) {
            break;
        }
        assert!(Instant::now() < deadline, "proxy did not reconnect");
        std::thread::sleep(Duration::from_millis(50));
    }
    let v: String = redis::cmd("GET").arg("k2").query(&mut c).unwrap();
    assert_eq!(v, "v2");
}

#[test]
fn upstream_killed_mid_load_no_hang_no_wrong_reply() {
    let redis = RedisServer::start();
    let port = redis.port;
    let proxy = Proxy::start(&redis.url(), &["--set", "upstream.reconnect_max_ms=200"]);
    let pport = proxy.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut err) = (0u64, 0u64);
                let mut c = conn_to(pport);
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let key = format!("w{w}");
                    let mut p = redis::pipe();
                    p.cmd("SET").arg(&key).arg(i).cmd("GET").arg(&key);
                    match p.query::<((), u64)>(&mut c) {
                        Ok(((), v)) => {
                            assert_eq!(v, i, "reply out of step");
                            ok += 1;
                        }
                        Err(e) => {
                            assert!(e.to_string().contains("upstream") || e.is_io_error(), "{e}");
                            err += 1;
                            if e.is_io_error() {
                                c = conn_to(pport);
                            }
                        }
                    }
                }
                (ok, err)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    redis.stop();
    std::thread::sleep(Duration::from_millis(500));
    let _redis = RedisServer::start_on(port, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut err) = (0, 0);
    for w in workers {
        let (o, e) = w.join().expect("worker panicked");
        ok += o;
        err += e;
    }
    assert!(ok > 100 && err > 0, "ok={ok} err={err}");
    ping_ok(&proxy);
}

#[test]
fn upstream_timeout_bounds_the_wait() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "upstream.timeout_ms=400"]);
    let mut c = proxy.conn();
    let t = Instant::now();
    // DEBUG SLEEP stalls the whole server, like a hung Redis would.
    let e = redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg(2)
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("upstream timeout"), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(2000));
    ping_ok(&proxy);
}

#[test]
fn configured_upstream_never_falls_back_silently() {
    let dead = free_port();
    let proxy = Proxy::start(&format!("redis://127.0.0.1:{dead}"), &[]);
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"SET", b"k", b"v"]));
    let t = Instant::now();
    let got = r.read_n(10);
    assert!(
        got.starts_with(b"-TRYAGAIN "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    // Local admin commands still work.
    r.send(&cmd_bytes(&[b"PING"]));
    let _ = r.read_n(1);
}

#[test]
fn local_fallback_mode_serves_strings() {
    let proxy = Proxy::start_args(&["--set".into(), "upstream.fallback=local".into()]);
    let log = proxy.log_with("IN-PROCESS");
    assert!(log.contains("IN-PROCESS"), "no loud warning: {log}");
    let mut c = proxy.conn();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .arg("EX")
        .arg(100)
        .query(&mut c)
        .unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
    let n: i64 = redis::cmd("INCRBY").arg("n").arg(5).query(&mut c).unwrap();
    assert_eq!(n, 5);
    let ttl: i64 = redis::cmd("TTL").arg("k").query(&mut c).unwrap();
    assert!(ttl > 90);
    let e = redis::cmd("LPUSH")
        .arg("l")
        .arg("x")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("local fallback mode"), "{e}");
    let info: String = redis::cmd("INFO").query(&mut c).unwrap();
    assert!(info.contains("proxy_backend:local"), "{info}");
    let _: () = redis::cmd("SELECT").arg(2).query(&mut c).unwrap();
    let v: Option<String> = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, None);
}

#[test]
fn admin_commands_via_redis_cli() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let cli = |args: &[&str]| redis_cli(proxy.port, args);
    let info = cli(&["PROXY", "INFO"]);
    assert!(
        info.contains("proxy_version:") && info.contains("upstream_up:1"),
        "{info}"
    );
    let got = cli(&["PROXY", "CONFIG", "GET", "limits.*"]);
    assert!(got.contains("limits.max_bulk_bytes"), "{got}");
    assert_eq!(
        cli(&["PROXY", "CONFIG", "SET", "limits.max_bulk_bytes", "100"]).trim(),
        "OK"
    );
    let got = cli(&["PROXY", "CONFIG", "GET", "limits.max_bulk_bytes"]);
    assert!(got.contains("100"), "{got}");
    // The new limit applies to new requests at once.
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"SET", b"k", &[b'x'; 200]]));
    assert_eq!(
        String::from_utf8_lossy(&r.read_to_close()),
        "-ERR Protocol error: invalid bulk length\r\n"
    );
    assert!(
        cli(&["PROXY", "CONFIG", "SET", "upstream.url", "redis://x"])
            .contains("cannot be changed at runtime")
    );
    assert!(cli(&["PROXY", "CONFIG", "SET", "limits.max_pipeline", "zero"]).contains("ERR"));
    assert!(cli(&["PROXY", "CLIENTS"]).contains("addr=127.0.0.1"));
    assert!(cli(&["PROXY", "NOPE"]).contains("unknown subcommand"));
    assert!(cli(&["PROXY", "STATS"]).contains("total_commands"));
}

#[test]
fn metrics_endpoint_has_real_histograms() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &[]);
    let mut c = proxy.conn();
    for _ in 0..10 {
        let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    }
    let _ = redis::cmd("NOSUCH").query::<()>(&mut c);
    let m = proxy.metrics();
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        m.contains("respite_commands_total{cmd=\"set\",result=\"ok\"} 10"),
        "{m}"
    );
    assert!(
        m.contains("respite_command_duration_seconds_bucket{cmd=\"set\",le=\"0.001\"}"),
        "{m}"
    );
    assert!(m.contains("respite_clients_connected 1"), "{m}");
    assert!(m.contains("respite_upstream_up 1"), "{m}");
    assert!(m.contains("respite_client_bytes_in_total"), "{m}");
    assert!(http_get(proxy.metrics_port, "/health").contains("200 OK"));
}

#[test]
fn sigterm_drains_in_flight_requests() {
    let redis = RedisServer::start();
    let mut proxy = Proxy::start(&redis.url(), &[]);
    let port = proxy.port;
    let inflight = std::thread::spawn(move || {
        let mut c = conn_to(port);
        let v: Option<(String, String)> =
            redis::cmd("BLPOP").arg("q").arg(0.7).query(&mut c).unwrap();
        v
    });
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let status = proxy.signal_and_wait("TERM");
    assert!(status.success(), "{status}");
    assert_eq!(
        inflight.join().unwrap(),
        None,
        "in-flight BLPOP must get its reply"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting"
    );
}

#[test]
fn sighup_reloads_config_file() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("respite-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("respite.toml");
    std::fs::write(&file, "[limits]\nmax_pipeline = 100\n").unwrap();
    let proxy = Proxy::start(&redis.url(), &["-c", file.to_str().unwrap()]);
    let mut c = proxy.conn();
    let get = |c: &mut redis::Connection| -> String {
        let v: redis::Value = redis::cmd("PROXY")
            .arg("CONFIG")
            .arg("GET")
            .arg("limits.max_pipeline")
            .query(c)
            .unwrap();
        format!("{v:?}")
    };
    assert!(get(&mut c).contains("100"));
    std::fs::write(&file, "[limits]\nmax_pipeline = 200\n").unwrap();
    proxy.signal("HUP");
    let deadline = Instant::now() + TIMEOUT;
    while !get(&mut c).contains("200") {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A broken file leaves the running configuration in place.
    std::fs::write(&file, "[limits]\nmax_pipeline = \"x\"\n").unwrap();
    let r: redis::RedisResult<()> = redis::cmd("PROXY")
        .arg("CONFIG")
        .arg("RELOAD")
        .query(&mut c);
    assert!(r.unwrap_err().to_string().contains("reload failed"));
    assert!(get(&mut c).contains("200"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn check_subcommand_validates() {
    let dir = std::env::temp_dir().join(format!("respite-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[server]\nlisten = \"0.0.0.0:6380\"\n").unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten_addr = \"x\"\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_respite");
    let out = std::process::Command::new(bin)
        .args(["check", "-c", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not a loopback address"), "{text}");
    let out = std::process::Command::new(bin)
        .args(["check", "-c", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_addr"));
    let out = std::process::Command::new(bin)
        .args(["--check", "--set", "server.listen=bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn upstream_password_and_client_auth_to_upstream_acl_users() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let proxy = Proxy::start(&url, &[]);
    let mut c = proxy.conn();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    // The password never shows in INFO or PROXY CONFIG GET.
    let info: String = redis::cmd("INFO").arg("proxy").query(&mut c).unwrap();
    let cfg: redis::Value = redis::cmd("PROXY")
        .arg("CONFIG")
        .arg("GET")
        .arg("*")
        .query(&mut c)
        .unwrap();
    assert!(!info.contains("s3cret") && !format!("{cfg:?}").contains("s3cret"));
    assert!(!proxy.log().contains("s3cret"));
    // A client authenticating as a Redis ACL user gets that user's rights.
    let mut admin = redis::Client::open(format!("redis://:s3cret@127.0.0.1:{}", redis.port))
        .unwrap()
        .get_connection_with_timeout(TIMEOUT)
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("reader")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("+get")
        .arg("+auth")
        .query(&mut admin)
        .unwrap();
    let mut r = proxy.conn();
    let _: () = redis::cmd("AUTH")
        .arg("reader")
        .arg("pw")
        .query(&mut r)
        .unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut r).unwrap();
    assert_eq!(v, "v");
    let e = redis::cmd("SET")
        .arg("k")
        .arg("x")
        .query::<()>(&mut r)
        .unwrap_err();
    assert!(
        e.to_string().contains("NOPERM") || e.to_string().contains("permission"),
        "{e}"
    );
    let e = redis::cmd("AUTH")
        .arg("reader")
        .arg("wrong")
        .query::<()>(&mut r)
        .unwrap_err();
    assert!(e.to_string().contains("WRONGPASS"), "{e}");
}

#[test]
fn reset_on_a_subscribed_connection_keeps_the_upstream_credentials_and_db() {
    // On Redis, RESET logs the connection out and selects db 0; a
    // subscriber's dedicated connection must come back as respite's
    // connections are: the URL's user and db.
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}/2", redis.port);
    let proxy = Proxy::start(&url, &[]);
    for resp3 in [false, true] {
        let mut r = proxy.raw();
        if resp3 {
            r.send(&cmd_bytes(&[b"HELLO", b"3"]));
            r.read_reply();
        }
        r.send(&cmd_bytes(&[b"SUBSCRIBE", b"ch"]));
        r.read_reply();
        // Pipelined: the RESET reply, then the next command's, nothing else.
        let mut batch = cmd_bytes(&[b"RESET"]);
        batch.extend(cmd_bytes(&[b"SET", b"after-reset", b"v"]));
        batch.extend(cmd_bytes(&[b"PING"]));
        r.send(&batch);
        assert_eq!(r.read_reply(), b"+RESET\r\n");
        assert_eq!(
            String::from_utf8_lossy(&r.read_reply()),
            "+OK\r\n",
            "resp3={resp3}"
        );
        assert_eq!(r.read_reply(), b"+PONG\r\n");
        r.send(&cmd_bytes(&[b"GET", b"after-reset"]));
        assert_eq!(r.read_reply(), b"$1\r\nv\r\n");
        // Still subscribed-capable: RESET again, twice in a row.
        r.send(&cmd_bytes(&[b"SUBSCRIBE", b"ch"]));
        r.read_reply();
        let mut batch = cmd_bytes(&[b"RESET"]);
        batch.extend(cmd_bytes(&[b"RESET"]));
        batch.extend(cmd_bytes(&[b"DBSIZE"]));
        r.send(&batch);
        assert_eq!(r.read_reply(), b"+RESET\r\n");
        assert_eq!(r.read_reply(), b"+RESET\r\n");
        assert_eq!(r.read_reply(), b":1\r\n");
    }
    let mut direct = redis::Client::open(format!("redis://:s3cret@127.0.0.1:{}/2", redis.port))
        .unwrap()
        .get_connection_with_timeout(TIMEOUT)
        .unwrap();
    let v: String = redis::cmd("GET")
        .arg("after-reset")
        .query(&mut direct)
        .unwrap();
    assert_eq!(v, "v", "written to the URL's db");

    // A RESET with arguments is Redis' arity error and changes nothing.
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"SUBSCRIBE", b"ch"]));
    r.read_reply();
    let mut batch = cmd_bytes(&[b"RESET", b"x"]);
    batch.extend(cmd_bytes(&[b"PING"]));
    r.send(&batch);
    assert_eq!(
        String::from_utf8_lossy(&r.read_reply()),
        "-ERR wrong number of arguments for 'reset' command\r\n"
    );
    assert_eq!(r.read_reply(), b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");

    // After CLIENT REPLY SKIP, Redis sends nothing for the RESET: no
    // `+RESET` marks where the restoring replies would be, so none is sent
    // and the connection is left as Redis leaves it, logged out.
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"CLIENT", b"TRACKING", b"ON"]));
    assert_eq!(r.read_reply(), b"+OK\r\n");
    let mut batch = cmd_bytes(&[b"CLIENT", b"REPLY", b"SKIP"]);
    batch.extend(cmd_bytes(&[b"RESET"]));
    batch.extend(cmd_bytes(&[b"PING"]));
    r.send(&batch);
    let reply = r.read_reply();
    assert!(
        reply.starts_with(b"-NOAUTH"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    r.send(&cmd_bytes(&[b"AUTH", b"s3cret"]));
    assert_eq!(r.read_reply(), b"+OK\r\n");
    r.send(&cmd_bytes(&[b"PING"]));
    assert_eq!(r.read_reply(), b"+PONG\r\n");
}

#[test]
fn replication_stream_passes_through_with_upstream_credentials() {
    // SYNC's stream is not RESP frames (an RDB without trailing CRLF,
    // bare-newline keepalives); it must be copied as it comes even when the
    // tunnel would otherwise read frames (password and db in the URL).
    let redis =
        RedisServer::start_with(&["--requirepass", "s3cret", "--repl-diskless-sync-delay", "0"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}/2", redis.port);
    let proxy = Proxy::start(&url, &[]);
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"SYNC"]));
    let mut direct = redis::Client::open(format!("redis://:s3cret@127.0.0.1:{}/2", redis.port))
        .unwrap()
        .get_connection_with_timeout(TIMEOUT)
        .unwrap();
    let mut seen = Vec::new();
    let t = std::time::Instant::now();
    for i in 0.. {
        // Writes keep coming until the stream carries one of them.
        let key = format!("replicated-{i}");
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("v")
            .query(&mut direct)
            .unwrap();
        seen.extend(r.read_n(1));
        let text = String::from_utf8_lossy(&seen).into_owned();
        if text.contains("replicated-") && text.contains("SET") {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "no replicated write in the stream: {:?}",
            &text[..text.len().min(300)]
        );
    }
    // Still open: a later write arrives too.
    let _: () = redis::cmd("SET")
        .arg("last-write")
        .arg("v")
        .query(&mut direct)
        .unwrap();
    let t = std::time::Instant::now();
    while !String::from_utf8_lossy(&seen).contains("last-write") {
        seen.extend(r.read_n(1));
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "stream stopped"
        );
    }
}

/// Found by running redis-py's own test suite through respite.
#[test]
fn redis_py_suite_regressions() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.url(), &["--set", "upstream.reconnect_max_ms=200"]);
    // CLIENT GETNAME on a client that never set a name is nil, not the proxy's name.
    let mut r = proxy.raw();
    r.send(&cmd_bytes(&[b"CLIENT", b"GETNAME"]));
    r.expect(b"$-1\r\n");
    // A pinned client whose own connection Redis kills is closed at once.
    let mut a = proxy.conn();
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("victim")
        .query(&mut a)
        .unwrap();
    let n: String = redis::cmd("CLIENT").arg("GETNAME").query(&mut a).unwrap();
    assert_eq!(n, "victim");
    let mut direct = redis.conn();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("SKIPME")
        .arg("yes")
        .arg("TYPE")
        .arg("normal")
        .query(&mut direct)
        .unwrap_or(0);
    assert!(killed > 0);
    let mut raw_victim = proxy.raw();
    raw_victim.send(&cmd_bytes(&[b"CLIENT", b"SETNAME", b"v2"]));
    raw_victim.expect(b"+OK\r\n");
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut direct).unwrap();
    let addr = list
        .lines()
        .find(|l| l.contains("name=v2"))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("addr=")))
        .unwrap()
        .to_string();
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg(&addr)
        .query(&mut direct)
        .unwrap();
    assert!(
        raw_victim.is_closed(),
        "client not closed when Redis killed its connection"
    );
    // Killing every shared connection is not an outage: new commands succeed.
    for _ in 0..20 {
        let r: String = redis::cmd("PING").query(&mut proxy.conn()).unwrap();
        assert_eq!(r, "PONG");
    }
    // A password set at runtime: a client's AUTH through respite works.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("tp")
        .query(&mut direct)
        .unwrap();
    let mut c = proxy.conn();
    let _: () = redis::cmd("AUTH").arg("tp").query(&mut c).unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("n")
        .query(&mut c)
        .unwrap();
    let v: Option<(String, String)> = redis::cmd("BLPOP")
        .arg("nokey")
        .arg(0.1)
        .query(&mut c)
        .unwrap();
    assert_eq!(v, None);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("")
        .query(&mut c)
        .unwrap();
    // The same for a RESP3 client (redis-py 8's default): its dedicated
    // connection must not open with a HELLO 3 of the proxy's, which Redis
    // refuses with NOAUTH before the client's AUTH arrives. Wrong password
    // first: the error is Redis' own, then the right one works and the
    // connection speaks RESP3 (a map reply, `%`).
    let mut r3 = proxy.raw();
    r3.send(&cmd_bytes(&[b"HELLO", b"3"]));
    assert!(r3.read_reply().starts_with(b"%"));
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("tp3")
        .query(&mut direct)
        .unwrap();
    r3.send(&cmd_bytes(&[b"AUTH", b"nope"]));
    let e = r3.read_reply();
    assert!(
        e.starts_with(b"-WRONGPASS"),
        "{}",
        String::from_utf8_lossy(&e)
    );
    r3.send(&cmd_bytes(&[b"PING"]));
    r3.expect(b"-NOAUTH Authentication required.\r\n");
    r3.send(&cmd_bytes(&[b"AUTH", b"tp3"]));
    r3.expect(b"+OK\r\n");
    r3.send(&cmd_bytes(&[b"HGETALL", b"nohash"]));
    r3.expect(b"%0\r\n");
    // HELLO 3 AUTH from a session that is already RESP3.
    let mut h3 = proxy.raw();
    h3.send(&cmd_bytes(&[b"HELLO", b"3"]));
    assert!(h3.read_reply().starts_with(b"%"));
    h3.send(&cmd_bytes(&[b"HELLO", b"3", b"AUTH", b"default", b"tp3"]));
    assert!(h3.read_reply().starts_with(b"%"));
    h3.send(&cmd_bytes(&[b"CONFIG", b"SET", b"requirepass", b""]));
    h3.expect(b"+OK\r\n");
    // Byte-level commands (run in a Lua script while compression is on)
    // answer a RESP3 client with Redis' own bytes: BITFIELD's nulls keep
    // their places, LCS IDX is a map in Redis' order; also inside MULTI.
    // The same commands on other keys directly against Redis are the bar.
    let mut via = proxy.raw();
    let mut dir = Raw::connect(redis.port);
    for (r, k) in [(&mut via, &b"p"[..]), (&mut dir, &b"d"[..])] {
        r.send(&cmd_bytes(&[b"HELLO", b"3"]));
        r.read_reply();
        let (bf, a, b) = (
            [k, b"bf"].concat(),
            [k, b"lcs1"].concat(),
            [k, b"lcs2"].concat(),
        );
        r.send(&cmd_bytes(&[b"MSET", &a, b"ohmytext", &b, b"mynewtext"]));
        r.read_reply();
        r.send(&cmd_bytes(&[b"SET", &bf, b"x"]));
        r.read_reply();
    }
    let bitfield = |k: &[u8]| {
        cmd_bytes(&[
            b"BITFIELD",
            k,
            b"SET",
            b"u8",
            b"8",
            b"254",
            b"OVERFLOW",
            b"FAIL",
            b"INCRBY",
            b"u8",
            b"8",
            b"2",
            b"INCRBY",
            b"u8",
            b"8",
            b"1",
            b"INCRBY",
            b"u8",
            b"8",
            b"1",
            b"GET",
            b"u16",
            b"0",
        ])
    };
    let lcs = |a: &[u8], b: &[u8]| cmd_bytes(&[b"LCS", a, b, b"IDX", b"MINMATCHLEN", b"3"]);
    let mut answers = Vec::new();
    for (r, k) in [(&mut via, &b"p"[..]), (&mut dir, &b"d"[..])] {
        let (bf, a, b) = (
            [k, b"bf"].concat(),
            [k, b"lcs1"].concat(),
            [k, b"lcs2"].concat(),
        );
        let mut got = Vec::new();
        r.send(&bitfield(&bf));
        got.push(r.read_reply());
        r.send(&lcs(&a, &b));
        got.push(r.read_reply());
        r.send(&cmd_bytes(&[b"MULTI"]));
        r.read_reply();
        r.send(&bitfield(&bf));
        r.read_reply();
        r.send(&lcs(&a, &b));
        r.read_reply();
        r.send(&cmd_bytes(&[b"EXEC"]));
        got.push(r.read_reply());
        answers.push(got);
    }
    assert_eq!(
        answers[0]
            .iter()
            .map(|g| String::from_utf8_lossy(g))
            .collect::<Vec<_>>(),
        answers[1]
            .iter()
            .map(|g| String::from_utf8_lossy(g))
            .collect::<Vec<_>>(),
        "through respite (left) vs Redis (right)"
    );
    assert!(answers[1][0].windows(3).any(|w| w == b"_\r\n"));
}

/// First run without Redis: no upstream configured anywhere and nothing at
/// the default address means local mode; an explicitly configured upstream
/// never falls back. The machine (and CI) may run a Redis on 6379, so this
/// runs respite in a network namespace of its own, whose loopback has none.
#[test]
fn auto_local_mode_only_without_configured_upstream() {
    let probe = std::process::Command::new("unshare")
        .args(["-rn", "true"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("SKIPPED: `unshare -rn` (user + network namespace) is not available here");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_respite");
    // One shell inside the namespace: start respite, wait for it, talk to
    // it with redis-cli, stop it. `timeout` bounds every step.
    let script = format!(
        r#"
ip link set lo up || exit 90
run() {{
  timeout 20 {bin} --listen 127.0.0.1:7000 --metrics-listen 127.0.0.1:0 "$@" >/tmp/respite-auto-$$.log 2>&1 &
  pid=$!
  for i in $(seq 1 100); do timeout 2 redis-cli -p 7000 PING >/dev/null 2>&1 && break; sleep 0.05; done
}}
stop() {{ kill $pid; wait $pid; echo "--- log"; cat /tmp/respite-auto-$$.log; rm -f /tmp/respite-auto-$$.log; }}
run
echo "SET: $(timeout 5 redis-cli -p 7000 SET k v)"
echo "GET: $(timeout 5 redis-cli -p 7000 GET k)"
echo "LPUSH: $(timeout 5 redis-cli -p 7000 LPUSH l x)"
stop
echo "=== explicit"
run --upstream redis://127.0.0.1:6379
echo "SET2: $(timeout 5 redis-cli -p 7000 SET k v)"
stop
"#
    );
    let out = std::process::Command::new("timeout")
        .args(["60", "unshare", "-rn", "sh", "-c", &script])
        // A RESPITE_UPSTREAM_URL in the environment would configure one.
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| !k.starts_with("RESPITE_")))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (auto, explicit) = text.split_once("=== explicit").expect(&text);
    assert!(auto.contains("SET: OK"), "{text}");
    assert!(auto.contains("GET: v"), "{text}");
    assert!(
        auto.contains("LPUSH: ERR") && auto.contains("local fallback mode"),
        "{text}"
    );
    assert!(
        auto.contains("NO REDIS at") && auto.contains("IN-PROCESS"),
        "{text}"
    );
    // Configured upstream: errors, never the local store.
    assert!(explicit.contains("SET2: TRYAGAIN"), "{text}");
    assert!(!explicit.contains("IN-PROCESS"), "{text}");
}
