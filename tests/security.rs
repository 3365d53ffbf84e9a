//! Security: TLS on both sides (real certificates generated with rcgen, a
//! real redis-server with --tls-port), proxy users and roles, upstream ACL
//! users, `respite check`, and hostile clients.

mod common;

use common::*;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

/// Error text, lower-cased and without spaces, contains one of `any`.
fn says(e: &str, any: &[&str]) -> bool {
    let n: String = e
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    any.iter().any(|a| n.contains(a))
}

fn sha(p: &str) -> String {
    respite::auth::hash_password(p)
}

fn tls_conf(pki: &Pki, extra: &str) -> String {
    format!(
        "[server.tls]\nlisten = \"127.0.0.1:{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nhandshake_timeout_ms = 500\n{extra}",
        free_port(),
        pki.path("proxy.pem"),
        pki.path("proxy.key"),
    )
}

/// The TLS port, from PROXY SECURITY ("tls_listen:127.0.0.1:PORT").
fn tls_port(p: &Proxy) -> u16 {
    let text: String = redis::cmd("PROXY")
        .arg("SECURITY")
        .query(&mut p.conn())
        .unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("tls_listen:127.0.0.1:"))
        .unwrap_or_else(|| panic!("no TLS listener: {text}"));
    line.trim().parse().unwrap()
}

/// Reads the rest of a bulk reply whose header line was `head`.
fn bulk_body<S: Read>(s: &mut S, head: &str) -> String {
    let n: usize = head.strip_prefix('$').unwrap().parse().unwrap();
    let mut b = vec![0u8; n + 2];
    s.read_exact(&mut b).unwrap();
    String::from_utf8_lossy(&b[..n]).into_owned()
}

fn cmd<S: Read + Write>(s: &mut S, args: &[&str]) -> String {
    let a: Vec<&[u8]> = args.iter().map(|x| x.as_bytes()).collect();
    s.write_all(&cmd_bytes(&a)).unwrap();
    s.flush().unwrap();
    read_line(s).unwrap_or_else(|e| format!("<{e}>"))
}

#[test]
fn tls_listener_next_to_plain_one_and_refusals() {
    let r = RedisServer::start();
    let pki = Pki::new();
    let p = Proxy::start_config(&tls_conf(&pki, ""), &["--upstream", &r.url()], &[]);
    let port = tls_port(&p);

    // redis-rs over TLS, and the plain listener at the same time.
    let mut c = pki
        .redis_client("localhost", port, "ca.pem", None)
        .get_connection_with_timeout(TIMEOUT)
        .unwrap();
    redis::cmd("SET")
        .arg("k")
        .arg("over-tls")
        .query::<()>(&mut c)
        .unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut p.conn()).unwrap();
    assert_eq!(v, "over-tls");

    // redis-cli --tls.
    let out = Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &pki.path("ca.pem"),
            "--sni",
            "localhost",
        ])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "GET", "k"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over-tls");

    // Wrong CA, wrong name: the client refuses the proxy.
    let e = tls_raw(&pki, port, "localhost", "other-ca.pem", None)
        .err()
        .unwrap();
    assert!(says(&e, &["unknownissuer"]), "{e}");
    let e = tls_raw(&pki, port, "wrong.example", "ca.pem", None)
        .err()
        .unwrap();
    assert!(says(&e, &["notvalidforname"]), "{e}");
    let e = pki
        .redis_client("127.0.0.1", port, "ca.pem", None)
        .get_connection_with_timeout(TIMEOUT)
        .err()
        .unwrap();
    assert!(says(&e.to_string(), &["notvalidforname"]), "{e}");

    // Plaintext RESP to the TLS port: a readable error, then close.
    let mut raw = Raw::connect(port);
    raw.send(b"PING\r\n");
    let got = String::from_utf8_lossy(&raw.read_to_close()).into_owned();
    assert!(got.starts_with("-ERR this port speaks TLS"), "{got:?}");

    // A stalled handshake and a garbage one are dropped (handshake timeout
    // 500 ms); the established TLS client is unaffected.
    let mut stalled = Raw::connect(port);
    stalled.send(&[0x16, 0x03, 0x01]);
    let mut garbage = Raw::connect(port);
    garbage.send(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 6, 7, 8]);
    let t = Instant::now();
    assert!(stalled.is_closed());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(garbage.is_closed());
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "over-tls");

    // Request drip-fed byte by byte over TLS.
    let mut s = tls_raw(&pki, port, "localhost", "ca.pem", None).unwrap();
    for b in cmd_bytes(&[b"GET", b"k"]) {
        s.write_all(&[b]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_line(&mut s).unwrap(), "$8");
    assert_eq!(read_line(&mut s).unwrap(), "over-tls");
}

#[test]
fn certificates_reload_without_dropping_connections() {
    let r = RedisServer::start();
    let pki = Pki::new();
    // Serve from copies so the test can swap them.
    let cert = pki.path("live.pem");
    let key = pki.path("live.key");
    std::fs::copy(pki.path("proxy.pem"), &cert).unwrap();
    std::fs::copy(pki.path("proxy.key"), &key).unwrap();
    let conf = format!(
        "[server.tls]\nlisten = \"127.0.0.1:{}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n",
        free_port()
    );
    let p = Proxy::start_config(&conf, &["--upstream", &r.url()], &[]);
    let port = tls_port(&p);
    let mut old = tls_raw(&pki, port, "localhost", "ca.pem", None).unwrap();
    assert_eq!(cmd(&mut old, &["PING"]), "+PONG");

    // An expired certificate, loaded by SIGHUP: new clients refuse it, the
    // established connection goes on.
    std::fs::copy(pki.path("proxy-expired.pem"), &cert).unwrap();
    std::fs::copy(pki.path("proxy-expired.key"), &key).unwrap();
    p.signal("HUP");
    let deadline = Instant::now() + TIMEOUT;
    let e = loop {
        match tls_raw(&pki, port, "localhost", "ca.pem", None) {
            Err(e) => break e,
            Ok(_) => {
                assert!(Instant::now() < deadline, "expired cert never served");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert!(says(&e, &["expired"]), "{e}");
    assert_eq!(cmd(&mut old, &["PING"]), "+PONG");

    // Back to a good certificate with PROXY CONFIG RELOAD.
    std::fs::copy(pki.path("proxy.pem"), &cert).unwrap();
    std::fs::copy(pki.path("proxy.key"), &key).unwrap();
    assert_eq!(cmd(&mut old, &["PROXY", "CONFIG", "RELOAD"]), "+OK");
    let mut new = tls_raw(&pki, port, "localhost", "ca.pem", None).unwrap();
    assert_eq!(cmd(&mut new, &["PING"]), "+PONG");
    assert_eq!(cmd(&mut old, &["PING"]), "+PONG");

    // A broken key is refused at reload; the good certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    let reply = cmd(&mut old, &["PROXY", "CONFIG", "RELOAD"]);
    assert!(reply.starts_with("-ERR reload failed"), "{reply}");
    let mut again = tls_raw(&pki, port, "localhost", "ca.pem", None).unwrap();
    assert_eq!(cmd(&mut again, &["PING"]), "+PONG");
}

#[test]
fn mutual_tls_refuses_clients_without_a_valid_certificate() {
    let r = RedisServer::start();
    let pki = Pki::new();
    let conf = tls_conf(
        &pki,
        &format!("client_ca_file = \"{}\"\n", pki.path("ca.pem")),
    );
    let p = Proxy::start_config(&conf, &["--upstream", &r.url()], &[]);
    let port = tls_port(&p);

    let mut ok = tls_raw(&pki, port, "localhost", "ca.pem", Some("client")).unwrap();
    assert_eq!(cmd(&mut ok, &["PING"]), "+PONG");
    let mut c = pki
        .redis_client("localhost", port, "ca.pem", Some("client"))
        .get_connection_with_timeout(TIMEOUT)
        .unwrap();
    assert_eq!(redis::cmd("PING").query::<String>(&mut c).unwrap(), "PONG");

    // No certificate, or one from another CA: refused (TLS 1.3 reports it
    // on the first read after the client's side of the handshake).
    for client in [None, Some("rogue-client")] {
        let res = tls_raw(&pki, port, "localhost", "ca.pem", client).and_then(|mut s| {
            s.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
            read_line(&mut s)
        });
        let e = res.err().unwrap_or_else(|| panic!("{client:?} was let in"));
        eprintln!("mTLS refusal for {client:?}: {e}");
    }
    let out = Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &pki.path("ca.pem"),
            "--sni",
            "localhost",
        ])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("PONG"),
        "redis-cli without a client certificate got in"
    );
}

#[test]
fn upstream_tls_mtls_and_acl_user() {
    let pki = Pki::new();
    let r = RedisServer::start_tls(&pki, true, &[]);
    // An ACL user limited to app:* keys and no dangerous commands.
    let mut admin = r.conn();
    redis::cmd("ACL")
        .arg(vec![
            "SETUSER",
            "app",
            "on",
            ">s3cret-upstream",
            "~app:*",
            "+@all",
            "-@dangerous",
        ])
        .query::<()>(&mut admin)
        .unwrap();
    let conf = format!(
        "[upstream]\nurl = \"rediss://localhost:{}\"\nuser = \"app\"\n[upstream.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        r.tls_port,
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let p = Proxy::start_config(
        &conf,
        &[],
        &[("RESPITE_UPSTREAM_PASSWORD", "s3cret-upstream")],
    );
    let mut c = p.conn();
    redis::cmd("SET")
        .arg("app:1")
        .arg("v")
        .query::<()>(&mut c)
        .unwrap();
    assert_eq!(
        redis::cmd("GET")
            .arg("app:1")
            .query::<String>(&mut admin)
            .unwrap(),
        "v"
    );
    let who: String = redis::cmd("ACL").arg("WHOAMI").query(&mut c).unwrap();
    assert_eq!(who, "app");
    // Redis' ACL applies to what goes through the proxy.
    let e = redis::cmd("SET")
        .arg("other")
        .arg("v")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(says(&e.to_string(), &["noperm"]), "{e}");
    let e = redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap_err();
    assert!(says(&e.to_string(), &["noperm"]), "{e}");

    // The secret appears nowhere.
    let conf_get: Vec<String> = redis::cmd("PROXY")
        .arg(vec!["CONFIG", "GET", "*"])
        .query(&mut c)
        .unwrap();
    // INFO is @dangerous for this ACL user; PROXY INFO is the same section.
    let info: String = redis::cmd("PROXY").arg("INFO").query(&mut c).unwrap();
    let sec: String = redis::cmd("PROXY").arg("SECURITY").query(&mut c).unwrap();
    assert!(
        sec.contains("upstream_tls:on") && sec.contains("upstream_auth:acl user"),
        "{sec}"
    );
    for (what, text) in [
        ("CONFIG GET", conf_get.join(" ")),
        ("INFO", info),
        ("SECURITY", sec),
        ("metrics", p.metrics()),
        ("log", p.log()),
    ] {
        assert!(
            !text.contains("s3cret-upstream"),
            "{what} leaks the password"
        );
    }
    assert!(
        conf_get
            .windows(2)
            .any(|w| w[0] == "upstream.password" && w[1] == "***"),
        "{conf_get:?}"
    );
}

#[test]
fn upstream_tls_failures_are_clear() {
    let pki = Pki::new();
    let r = RedisServer::start_tls(&pki, false, &[]);
    // Verified against the wrong CA: commands fail fast with the reason.
    let conf = format!(
        "[upstream]\nurl = \"rediss://localhost:{}\"\n[upstream.tls]\nca_file = \"{}\"\n",
        r.tls_port,
        pki.path("other-ca.pem"),
    );
    let p = Proxy::start_config(&conf, &[], &[]);
    let e = redis::cmd("GET")
        .arg("x")
        .query::<Option<String>>(&mut p.conn())
        .unwrap_err();
    assert!(e.to_string().contains("upstream unavailable"), "{e}");
    assert!(says(&p.log(), &["unknownissuer"]), "{}", p.log());
    // A name the certificate does not have.
    let conf = format!(
        "[upstream]\nurl = \"rediss://localhost:{}\"\n[upstream.tls]\nca_file = \"{}\"\nserver_name = \"redis.wrong\"\n",
        r.tls_port,
        pki.path("ca.pem"),
    );
    let p = Proxy::start_config(&conf, &[], &[]);
    let e = redis::cmd("GET")
        .arg("x")
        .query::<Option<String>>(&mut p.conn())
        .unwrap_err();
    assert!(e.to_string().contains("upstream unavailable"), "{e}");
    assert!(says(&p.log(), &["notvalidforname"]), "{}", p.log());
    // insecure_skip_verify connects, with a loud warning.
    let conf = format!(
        "[upstream]\nurl = \"rediss://localhost:{}\"\n[upstream.tls]\ninsecure_skip_verify = true\n",
        r.tls_port,
    );
    let p = Proxy::start_config(&conf, &[], &[]);
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut p.conn()).unwrap(),
        "PONG"
    );
    assert!(p.log_with("NOT VERIFIED").contains("NOT VERIFIED"));
}

fn users_conf() -> String {
    format!(
        r#"
[[users]]
name = "admin"
password_sha256 = "{}"
role = "admin"

[[users]]
name = "default"
password_sha256 = "{}"
role = "readwrite"

[[users]]
name = "ro"
password = "ro-pw"
role = "readonly"

[[users]]
name = "tenant"
password_sha256 = "{}"
role = "readwrite"
key_prefixes = ["t1:", "shared:"]
"#,
        sha("admin-pw"),
        sha("rw-pw"),
        sha("tenant-pw"),
    )
}

#[test]
fn auth_matrix() {
    let r = RedisServer::start();
    let p = Proxy::start_config(&users_conf(), &["--upstream", &r.url()], &[]);
    let mut c = p.raw();

    // No auth.
    assert_eq!(
        cmd(&mut c.s, &["GET", "a"]),
        "-NOAUTH Authentication required."
    );
    assert_eq!(
        cmd(&mut c.s, &["PROXY", "INFO"]),
        "-NOAUTH Authentication required."
    );
    assert!(cmd(&mut c.s, &["HELLO", "3"]).starts_with("-NOAUTH HELLO must be called"));
    // Wrong password; failures from one address get slower.
    let mut last = Duration::ZERO;
    for i in 0..4 {
        let t = Instant::now();
        assert_eq!(
            cmd(&mut c.s, &["AUTH", "admin", "nope"]),
            "-WRONGPASS invalid username-password pair or user is disabled."
        );
        last = t.elapsed();
        if i == 0 {
            assert!(last >= Duration::from_millis(40), "{last:?}");
        }
    }
    assert!(last >= Duration::from_millis(300), "no slow-down: {last:?}");
    assert_eq!(
        cmd(&mut c.s, &["AUTH", "nobody", "x"]).split(' ').next(),
        Some("-WRONGPASS")
    );
    // AUTH pass = user "default" (readwrite).
    assert_eq!(cmd(&mut c.s, &["AUTH", "rw-pw"]), "+OK");
    assert_eq!(cmd(&mut c.s, &["SET", "a", "1"]), "+OK");
    assert_eq!(cmd(&mut c.s, &["GET", "a"]), "$1");
    read_line(&mut c.s).unwrap();
    for admin_cmd in [
        &["FLUSHALL"][..],
        &["FLUSHDB"],
        &["CONFIG", "SET", "maxmemory", "1"],
        &["SHUTDOWN", "NOSAVE"],
        &["DEBUG", "SLEEP", "0"],
        &["PROXY", "CONFIG", "SET", "log.level", "debug"],
        &["PROXY", "CONFIG", "RELOAD"],
        &["PROXY", "L1", "FLUSH"],
        &["PROXY", "SECURITY"],
        &["MONITOR"],
    ] {
        let got = cmd(&mut c.s, admin_cmd);
        assert!(got.starts_with("-NOPERM"), "{admin_cmd:?}: {got}");
    }

    // The AUTH never reached Redis: the upstream saw no AUTH call.
    assert_eq!(r.calls("auth"), 0);
    assert_eq!(r.calls("flushall"), 0);

    // readonly: reads yes, writes no (also scripts and transactions' writes).
    let mut ro = p.raw();
    assert_eq!(cmd(&mut ro.s, &["AUTH", "ro", "ro-pw"]), "+OK");
    assert_eq!(cmd(&mut ro.s, &["GET", "a"]), "$1");
    read_line(&mut ro.s).unwrap();
    assert_eq!(cmd(&mut ro.s, &["EXISTS", "a"]), ":1");
    for w in [
        &["SET", "a", "2"][..],
        &["DEL", "a"],
        &["INCR", "n"],
        &["EVAL", "return 1", "0"],
        &["FLUSHALL"],
    ] {
        let got = cmd(&mut ro.s, w);
        assert!(got.starts_with("-NOPERM User ro"), "{w:?}: {got}");
    }
    assert_eq!(cmd(&mut ro.s, &["MULTI"]), "+OK");
    assert!(cmd(&mut ro.s, &["SET", "a", "3"]).starts_with("-NOPERM"));
    // Redis' ACL refusals inside MULTI doom the transaction; so do ours.
    assert!(cmd(&mut ro.s, &["EXEC"]).starts_with("-EXECABORT"));

    // Key prefixes, on every key position.
    let mut t = p.raw();
    assert_eq!(cmd(&mut t.s, &["AUTH", "tenant", "tenant-pw"]), "+OK");
    assert_eq!(cmd(&mut t.s, &["SET", "t1:x", "1"]), "+OK");
    assert_eq!(
        cmd(&mut t.s, &["MSET", "t1:y", "1", "shared:z", "2"]),
        "+OK"
    );
    for bad in [
        &["GET", "a"][..],
        &["MSET", "t1:y", "1", "a", "2"],
        &["MGET", "t1:x", "a"],
        &["RENAME", "t1:x", "a"],
        &["EVAL", "return 1", "1", "a"],
        &["ZUNIONSTORE", "t1:d", "2", "t1:x", "a"],
        &["KEYS", "*"],
        &["SCAN", "0"],
    ] {
        let got = cmd(&mut t.s, bad);
        assert!(got.starts_with("-NOPERM"), "{bad:?}: {got}");
    }
    assert_eq!(
        redis::cmd("EXISTS")
            .arg("t1:d")
            .query::<i64>(&mut r.conn())
            .unwrap(),
        0
    );

    // HELLO 3 AUTH as admin: RESP3 map reply, admin commands allowed.
    let mut a = p.raw();
    a.send(&cmd_bytes(&[
        b"HELLO",
        b"3",
        b"AUTH",
        b"admin",
        b"admin-pw",
        b"SETNAME",
        b"x",
    ]));
    let first = String::from_utf8_lossy(&a.read_reply()).into_owned();
    assert!(first.starts_with("%7\r\n$6\r\nserver"), "{first}");
    // SETNAME reached Redis (as CLIENT SETNAME) though the HELLO did not.
    a.send(&cmd_bytes(&[b"CLIENT", b"GETNAME"]));
    assert_eq!(a.read_reply(), b"$1\r\nx\r\n");
    a.send(&cmd_bytes(&[b"CLIENT", b"INFO"]));
    assert!(String::from_utf8_lossy(&a.read_reply()).contains(" name=x "));
    a.send(&cmd_bytes(&[
        b"HELLO",
        b"3",
        b"AUTH",
        b"admin",
        b"admin-pw",
        b"SETNAME",
        b"a b",
    ]));
    assert_eq!(
        a.read_reply(),
        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    let mut a2 = p.raw();
    assert_eq!(
        cmd(&mut a2.s, &["HELLO", "3", "AUTH", "admin", "bad"]),
        "-WRONGPASS invalid username-password pair or user is disabled."
    );
    let mut adm = p.raw();
    assert_eq!(cmd(&mut adm.s, &["AUTH", "admin", "admin-pw"]), "+OK");
    let head = cmd(&mut adm.s, &["PROXY", "SECURITY"]);
    assert!(bulk_body(&mut adm.s, &head).contains("auth:required"));
    assert_eq!(cmd(&mut adm.s, &["PROXY", "L1", "FLUSH"]), "+OK");
    assert_eq!(cmd(&mut adm.s, &["FLUSHALL"]), "+OK");

    // redis-cli with a user and password, as an operator would.
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &p.port.to_string(),
            "--user",
            "admin",
            "--pass",
            "admin-pw",
        ])
        .args(["--no-auth-warning", "PROXY", "SECURITY"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("auth:required") && text.contains("users:4"),
        "{text}"
    );
    assert!(text.contains("plain-text password"), "{text}");
    let metrics = p.metrics();
    let log = p.log();
    for secret in ["admin-pw", "rw-pw", "ro-pw", "tenant-pw", &sha("admin-pw")] {
        assert!(
            !metrics.contains(secret) && !log.contains(secret),
            "{secret} leaked"
        );
    }
}

#[test]
fn without_users_auth_still_goes_to_redis() {
    let r = RedisServer::start();
    redis::cmd("CONFIG")
        .arg(vec!["SET", "requirepass", "upw"])
        .query::<()>(&mut r.conn())
        .unwrap();
    let p = Proxy::start(&format!("redis://:upw@127.0.0.1:{}", r.port), &[]);
    let mut c = p.raw();
    assert_eq!(
        cmd(&mut c.s, &["AUTH", "wrong"]).split(' ').next(),
        Some("-WRONGPASS")
    );
    assert_eq!(cmd(&mut c.s, &["AUTH", "upw"]), "+OK");
    assert_eq!(cmd(&mut c.s, &["PING"]), "+PONG");
}

#[test]
fn check_subcommand_rejects_bad_security_config() {
    let pki = Pki::new();
    let dir = pki.dir.clone();
    let run = |toml: &str| {
        let f = dir.join(format!("c{}.toml", free_port()));
        std::fs::write(&f, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_respite"))
            .args(["check", "-c", f.to_str().unwrap()])
            .env_remove("RESPITE_UPSTREAM_PASSWORD")
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let tls = |cert: &str, key: &str| {
        format!(
            "[server.tls]\nlisten = \"127.0.0.1:6390\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            pki.path(cert),
            pki.path(key)
        )
    };
    let (code, out) = run(&tls("missing.pem", "proxy.key"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("cannot read"), "{out}");
    let (code, out) = run(&tls("proxy.pem", "client.key"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("does not fit"), "{out}");
    let (code, out) = run(&tls("proxy.pem", "ca.pem"));
    assert_eq!(code, Some(1), "{out}");
    let (code, out) = run("[upstream]\nurl = \"http://x\"\n");
    assert_eq!(code, Some(1), "{out}");
    let (code, out) = run("[server.tls]\nlisten_on = \"x\"\n");
    assert_eq!(code, Some(1), "{out}");
    let (code, out) = run("[[users]]\nname = \"a\"\npassword_sha256 = \"abc\"\nrole = \"admin\"\n");
    assert_eq!(code, Some(1), "{out}");
    let (code, out) = run(&format!(
        "[upstream]\nurl = \"rediss://localhost:1\"\n[upstream.tls]\nca_file = \"{}\"\n",
        pki.path("nope.pem")
    ));
    assert_eq!(code, Some(1), "{out}");

    // Valid, with recommendations.
    let key = pki.path("proxy.key");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (code, out) = run(&format!(
        "[server]\nlisten = \"0.0.0.0:6380\"\n{}\n[upstream]\nurl = \"redis://10.9.8.7:6379\"\n[metrics]\nlisten = \"0.0.0.0:9380\"\n[[users]]\nname = \"a\"\npassword = \"plain\"\nrole = \"admin\"\n",
        tls("proxy.pem", "proxy.key")
    ));
    assert_eq!(code, Some(0), "{out}");
    for want in [
        "plaintext",
        "plain-text password",
        "world-readable",
        "off-host without TLS",
        "off-host without AUTH",
        "metrics",
    ] {
        assert!(out.contains(want), "missing '{want}' in:\n{out}");
    }
}

#[test]
fn slowloris_request_is_cut_after_header_timeout() {
    let r = RedisServer::start();
    let p = Proxy::start(&r.url(), &["--set", "server.header_timeout_ms=300"]);
    let mut slow = p.raw();
    slow.send(b"*2\r\n$3\r\nGET\r\n$1");
    let t = Instant::now();
    let got = String::from_utf8_lossy(&slow.read_to_close()).into_owned();
    assert!(got.contains("request not completed within"), "{got:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // Idle clients (nothing started) are not affected, nor are others.
    let mut idle = p.raw();
    std::thread::sleep(Duration::from_millis(500));
    idle.send(&cmd_bytes(&[b"PING"]));
    idle.expect(b"+PONG\r\n");
    // A client that keeps completing requests is never cut, even when every
    // read ends in the middle of the next one (pipelining), for longer than
    // the timeout in total.
    let mut busy = p.raw();
    busy.send(b"PI");
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        busy.send(b"NG\r\nPI");
        busy.expect(b"+PONG\r\n");
    }
    busy.send(b"NG\r\n");
    busy.expect(b"+PONG\r\n");
}

#[test]
fn slow_reader_of_a_big_pipeline_is_not_taken_for_a_slowloris() {
    // A client pipelines many large reads (plus the start of one more),
    // then takes longer than the header timeout to read the replies, as
    // redis-cli --pipe does. respite waits on the client's reading, not
    // the other way round: the request is not cut.
    let r = RedisServer::start();
    let p = Proxy::start(
        &r.url(),
        &[
            "--set",
            "server.header_timeout_ms=300",
            "--set",
            "l1.mode=off",
        ],
    );
    let value = incompressible(256 * 1024);
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&value)
        .query(&mut r.conn())
        .unwrap();
    const N: usize = 64; // 16 MiB of replies: far more than socket buffers hold
    let mut c = p.raw();
    let mut req = Vec::new();
    for _ in 0..N {
        req.extend_from_slice(&cmd_bytes(&[b"GET", b"big"]));
    }
    req.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$3\r\nb");
    c.send(&req);
    std::thread::sleep(Duration::from_millis(1000));
    let mut want = format!("${}\r\n", value.len()).into_bytes();
    want.extend_from_slice(&value);
    want.extend_from_slice(b"\r\n");
    for i in 0..N {
        assert!(c.read_reply() == want, "reply {i} differs");
    }
    c.send(b"ig\r\n");
    assert!(
        c.read_reply() == want,
        "the request completed late is answered"
    );
    c.send(&cmd_bytes(&[b"PING"]));
    c.expect(b"+PONG\r\n");
}

#[test]
fn ten_thousand_connections() {
    const N: usize = 10_000;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if soft < N + 1000 {
        eprintln!(
            "ten_thousand_connections: skipped, open-file limit {soft} < {} (scripts/test raises it with ulimit -n)",
            N + 1000
        );
        return;
    }
    let r = RedisServer::start();
    let p = Proxy::start(
        &r.url(),
        &["--set", &format!("server.max_clients={}", N + 100)],
    );
    let t = Instant::now();
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        let s = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        conns.push(s);
    }
    eprintln!("ten_thousand_connections: connected in {:?}", t.elapsed());
    // Every connection is served: a pipelined PING on each, then the replies.
    for s in conns.iter_mut() {
        s.write_all(b"PING\r\n").unwrap();
    }
    for s in conns.iter_mut() {
        let mut b = [0u8; 7];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"+PONG\r\n");
    }
    let info: String = redis::cmd("PROXY")
        .arg("INFO")
        .query(&mut p.conn())
        .unwrap();
    assert!(
        info.contains(&format!("proxy_connected_clients:{}", N + 1)),
        "{info}"
    );
    drop(conns);
}

#[test]
fn tls_client_that_never_reads_is_disconnected() {
    let r = RedisServer::start();
    let pki = Pki::new();
    let p = Proxy::start_config(
        &tls_conf(&pki, ""),
        &[
            "--upstream",
            &r.url(),
            "--set",
            "limits.max_output_bytes=1048576",
        ],
        &[],
    );
    let port = tls_port(&p);
    redis::cmd("SET")
        .arg("big")
        .arg(incompressible(512 * 1024))
        .query::<()>(&mut p.conn())
        .unwrap();
    // Ask for 400 MB of replies over TLS and never read them.
    let mut s = tls_raw(&pki, port, "localhost", "ca.pem", None).unwrap();
    s.sock
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // One write, so the whole pipeline is there before a reply can block.
    let get = cmd_bytes(&[b"GET", b"big"]).repeat(800);
    s.write_all(&get).and_then(|_| s.flush()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p
        .metrics()
        .contains("respite_errors_total{kind=\"output_overflow\"}")
    {
        assert!(
            Instant::now() < deadline,
            "TLS slow reader never disconnected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Other clients, plain and TLS, are fine.
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut p.conn()).unwrap(),
        "PONG"
    );
    let mut ok = tls_raw(&pki, port, "localhost", "ca.pem", None).unwrap();
    assert_eq!(cmd(&mut ok, &["PING"]), "+PONG");
}

#[test]
fn refused_command_inside_multi_aborts_the_transaction() {
    let r = RedisServer::start();
    let p = Proxy::start_config(&users_conf(), &["--upstream", &r.url()], &[]);
    let mut c = p.raw();
    assert_eq!(cmd(&mut c.s, &["AUTH", "ro", "ro-pw"]), "+OK");
    assert_eq!(cmd(&mut c.s, &["MULTI"]), "+OK");
    assert_eq!(cmd(&mut c.s, &["GET", "k"]), "+QUEUED");
    assert!(cmd(&mut c.s, &["SET", "k", "1"]).starts_with("-NOPERM"));
    // As with Redis' own ACL refusals: the whole transaction is discarded.
    assert!(
        cmd(&mut c.s, &["EXEC"]).starts_with("-EXECABORT"),
        "EXEC ran after a refused command"
    );
    assert_eq!(cmd(&mut c.s, &["PING"]), "+PONG");
    let mut direct = r.conn();
    let v: Option<String> = redis::cmd("GET").arg("k").query(&mut direct).unwrap();
    assert_eq!(v, None);
}

/// One command, one whole reply frame, as text.
fn rq(c: &mut Raw, args: &[&str]) -> String {
    let a: Vec<&[u8]> = args.iter().map(|x| x.as_bytes()).collect();
    c.send(&cmd_bytes(&a));
    String::from_utf8_lossy(&c.read_reply()).into_owned()
}

/// A subscribed connection is a tunnel to its own upstream connection, but
/// the gate still applies to everything sent on it: in RESP3 any command
/// may follow SUBSCRIBE, in RESP2 any after the last UNSUBSCRIBE.
#[test]
fn tunnel_keeps_the_gate() {
    let r = RedisServer::start();
    let p = Proxy::start_config(&users_conf(), &["--upstream", &r.url()], &[]);

    // readwrite, RESP2: subscribe, receive, and the refusals stay in order.
    let mut c = p.raw();
    assert_eq!(rq(&mut c, &["AUTH", "rw-pw"]), "+OK\r\n");
    // FLUSHALL pipelined in the same write as SUBSCRIBE.
    let mut both = cmd_bytes(&[b"SUBSCRIBE", b"ch"]);
    both.extend(cmd_bytes(&[b"FLUSHALL"]));
    both.extend(cmd_bytes(&[b"PING", b"x"]));
    c.send(&both);
    assert_eq!(
        String::from_utf8_lossy(&c.read_reply()),
        "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    );
    let got = String::from_utf8_lossy(&c.read_reply()).into_owned();
    assert!(got.starts_with("-NOPERM User default"), "{got}");
    assert_eq!(
        String::from_utf8_lossy(&c.read_reply()),
        "*2\r\n$4\r\npong\r\n$1\r\nx\r\n"
    );
    let mut pubr = p.raw();
    assert_eq!(rq(&mut pubr, &["AUTH", "rw-pw"]), "+OK\r\n");
    assert_eq!(rq(&mut pubr, &["PUBLISH", "ch", "hello"]), ":1\r\n");
    assert_eq!(
        String::from_utf8_lossy(&c.read_reply()),
        "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n"
    );
    // Back in normal mode on the same connection: still gated.
    assert_eq!(
        rq(&mut c, &["UNSUBSCRIBE"]),
        "*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n"
    );
    assert!(rq(&mut c, &["FLUSHALL"]).starts_with("-NOPERM"));
    assert!(rq(&mut c, &["CONFIG", "SET", "maxmemory", "1"]).starts_with("-NOPERM"));
    assert_eq!(rq(&mut c, &["SET", "k", "v"]), "+OK\r\n");
    assert_eq!(rq(&mut c, &["GET", "k"]), "$1\r\nv\r\n");
    // AUTH inside the tunnel is the proxy's, never Redis'.
    assert!(rq(&mut c, &["AUTH", "ro", "wrong"]).starts_with("-WRONGPASS"));
    assert_eq!(rq(&mut c, &["AUTH", "ro", "ro-pw"]), "+OK\r\n");
    assert!(rq(&mut c, &["SET", "k", "w"]).starts_with("-NOPERM User ro"));
    // RESET logs out, as in Redis.
    assert_eq!(rq(&mut c, &["RESET"]), "+RESET\r\n");
    assert!(rq(&mut c, &["GET", "k"]).starts_with("-NOAUTH"));
    assert_eq!(r.calls("flushall"), 0);
    assert_eq!(r.calls("auth"), 0);
    assert_eq!(r.calls("config|set"), 0);

    // readonly: may subscribe, may not publish.
    let mut ro = p.raw();
    assert_eq!(rq(&mut ro, &["AUTH", "ro", "ro-pw"]), "+OK\r\n");
    assert!(rq(&mut ro, &["PUBLISH", "ch", "x"]).starts_with("-NOPERM User ro"));
    assert!(rq(&mut ro, &["SUBSCRIBE", "ch"]).starts_with("*3"));
    assert!(rq(&mut ro, &["MONITOR"]).starts_with("-NOPERM"));

    // A tenant's key prefixes confine channels too.
    let mut t = p.raw();
    assert_eq!(rq(&mut t, &["AUTH", "tenant", "tenant-pw"]), "+OK\r\n");
    for bad in [
        &["SUBSCRIBE", "other"][..],
        &["SUBSCRIBE", "__keyspace@0__:a"],
        &["PSUBSCRIBE", "*"],
        &["PSUBSCRIBE", "t*"],
        &["PUBLISH", "other", "x"],
        &["PUBSUB", "CHANNELS"],
        &["CLIENT", "TRACKING", "ON", "BCAST"],
        &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "a"],
        &["MONITOR"],
    ] {
        let got = rq(&mut t, bad);
        assert!(got.starts_with("-NOPERM"), "{bad:?}: {got}");
    }
    assert_eq!(rq(&mut t, &["PUBLISH", "t1:ch", "x"]), ":0\r\n");
    assert_eq!(rq(&mut t, &["PUBSUB", "CHANNELS", "t1:*"]), "*0\r\n");
    assert!(rq(&mut t, &["PSUBSCRIBE", "t1:*"]).starts_with("*3\r\n$10\r\npsubscribe"));
    assert!(rq(&mut t, &["SUBSCRIBE", "other"]).starts_with("-NOPERM"));

    // RESP3: any command may follow SUBSCRIBE; each still passes the gate.
    let mut r3 = p.raw();
    r3.send(&cmd_bytes(&[
        b"HELLO",
        b"3",
        b"AUTH",
        b"tenant",
        b"tenant-pw",
    ]));
    assert!(r3.read_reply().starts_with(b"%"));
    assert_eq!(rq(&mut r3, &["SET", "t1:k", "v3"]), "+OK\r\n");
    assert!(rq(&mut r3, &["SUBSCRIBE", "t1:news"]).starts_with(">3"));
    assert_eq!(rq(&mut r3, &["GET", "t1:k"]), "$2\r\nv3\r\n");
    assert!(rq(&mut r3, &["GET", "a"]).starts_with("-NOPERM No permissions to access a key"));
    assert!(rq(&mut r3, &["HELLO", "2"]).starts_with("-ERR HELLO is not available"));
    // A refusal inside MULTI dooms the transaction, as in Redis.
    assert_eq!(rq(&mut r3, &["MULTI"]), "+OK\r\n");
    assert_eq!(rq(&mut r3, &["SET", "t1:m", "1"]), "+QUEUED\r\n");
    assert!(rq(&mut r3, &["GET", "a"]).starts_with("-NOPERM"));
    assert!(rq(&mut r3, &["EXEC"]).starts_with("-EXECABORT"));
    let exists: i64 = redis::cmd("EXISTS")
        .arg("t1:m")
        .query(&mut r.conn())
        .unwrap();
    assert_eq!(exists, 0);
    // CLIENT REPLY OFF silences refusals too; they resume with ON.
    let mut quiet = cmd_bytes(&[b"CLIENT", b"REPLY", b"OFF"]);
    quiet.extend(cmd_bytes(&[b"GET", b"a"]));
    quiet.extend(cmd_bytes(&[b"CLIENT", b"REPLY", b"ON"]));
    r3.send(&quiet);
    assert_eq!(r3.read_reply(), b"+OK\r\n");
    assert!(rq(&mut r3, &["GET", "a"]).starts_with("-NOPERM"));
    // r3 and the tenant's t1:* pattern.
    assert_eq!(rq(&mut pubr, &["PUBLISH", "t1:news", "n"]), ":2\r\n");
    assert_eq!(
        String::from_utf8_lossy(&r3.read_reply()),
        ">3\r\n$7\r\nmessage\r\n$7\r\nt1:news\r\n$1\r\nn\r\n"
    );

    // Garbage in a tunnel: the protocol error, in order, then close.
    let mut g = p.raw();
    assert_eq!(rq(&mut g, &["AUTH", "rw-pw"]), "+OK\r\n");
    assert!(rq(&mut g, &["SUBSCRIBE", "ch"]).starts_with("*3"));
    g.send(b"*1\r\n$4\r\nPING\r\n*1\r\n$x\r\n");
    let rest = String::from_utf8_lossy(&g.read_to_close()).into_owned();
    assert!(
        rest.starts_with("*2\r\n$4\r\npong\r\n$0\r\n\r\n-ERR Protocol error"),
        "{rest}"
    );
    // Everyone else carries on.
    assert_eq!(rq(&mut pubr, &["PING"]), "+PONG\r\n");
}
