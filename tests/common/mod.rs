//! The one test harness: real `redis-server` processes on free loopback
//! ports and the real `respite` binary in front of them. Everything started
//! here is stopped on drop; every network wait has a timeout.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A port nothing listens on, from 20000-31999: below Linux's ephemeral
/// range (32768+), so that between this check and the server's bind no
/// outgoing connection takes it as its local port, and a client can never
/// connect to itself on it. Handed out in a per-process sequence, so
/// parallel tests of one binary do not get the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % 12000;
    for _ in 0..12000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + (start.wrapping_add(n.wrapping_mul(7)) % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what} did not listen on {port} within {TIMEOUT:?}");
}

pub struct RedisServer {
    pub port: u16,
    /// The TLS port (0 without TLS).
    pub tls_port: u16,
    child: Child,
    dir: PathBuf,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    /// Starts on a given port (used to restart a server where it was).
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("respite-test-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .args(["--enable-debug-command", "local"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        wait_for_port(port, &mut child, "redis-server");
        let s = RedisServer {
            port,
            tls_port: 0,
            child,
            dir,
        };
        // Listening is not ready: wait until it answers PING.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            // Raw PING: "+PONG", or "-NOAUTH" from a password-protected server.
            if let Ok(mut t) = TcpStream::connect(("127.0.0.1", port)) {
                t.set_read_timeout(Some(Duration::from_secs(1))).ok();
                let mut b = [0u8; 64];
                if t.write_all(b"PING\r\n").is_ok()
                    && let Ok(n) = t.read(&mut b)
                    && (b[..n].starts_with(b"+PONG") || b[..n].starts_with(b"-NOAUTH"))
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server never answered PING"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    /// A redis-server that also listens with TLS (certificates of `pki`),
    /// requiring client certificates when `mtls`. The plain port stays on
    /// loopback for the harness' own checks.
    pub fn start_tls(pki: &Pki, mtls: bool, extra: &[&str]) -> Self {
        let tls_port = free_port();
        let mut args: Vec<String> = vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            pki.path("upstream.pem"),
            "--tls-key-file".into(),
            pki.path("upstream.key"),
            "--tls-ca-cert-file".into(),
            pki.path("ca.pem"),
            "--tls-auth-clients".into(),
            if mtls { "yes" } else { "no" }.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let mut s = Self::start_on(free_port(), &refs);
        s.tls_port = tls_port;
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub fn conn(&self) -> redis::Connection {
        conn_to(self.port)
    }

    /// Calls of one command recorded by the server (INFO commandstats).
    pub fn calls(&self, cmd: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn())
            .unwrap();
        let key = format!("cmdstat_{}:calls=", cmd.to_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn conn_to(port: u16) -> redis::Connection {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let con = c.get_connection_with_timeout(TIMEOUT).expect("connect");
    con.set_read_timeout(Some(TIMEOUT)).unwrap();
    con.set_write_timeout(Some(TIMEOUT)).unwrap();
    con
}

pub struct Proxy {
    pub port: u16,
    pub metrics_port: u16,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proxy {
    /// respite in front of `upstream` with extra CLI arguments.
    pub fn start(upstream: &str, extra: &[&str]) -> Self {
        let mut args = vec!["--upstream".to_string(), upstream.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_args(&args)
    }

    pub fn start_args(args: &[String]) -> Self {
        Self::start_env(args, &[])
    }

    pub fn start_env(args: &[String], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(format!("respite-test-{port}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_respite"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(args)
            .env_remove("RESPITE_LOG_LEVEL")
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        wait_for_port(port, &mut child, "respite");
        Proxy {
            port,
            metrics_port,
            child: Some(child),
            log,
        }
    }

    pub fn conn(&self) -> redis::Connection {
        conn_to(self.port)
    }

    /// respite with a configuration file (written to a temp file) plus CLI
    /// arguments and environment.
    pub fn start_config(toml: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "respite-test-conf-{}-{}.toml",
            std::process::id(),
            free_port()
        ));
        std::fs::write(&path, toml).unwrap();
        let mut a = vec!["-c".to_string(), path.to_string_lossy().into_owned()];
        a.extend(args.iter().map(|s| s.to_string()));
        Self::start_env(&a, env)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).unwrap()
    }

    pub fn raw(&self) -> Raw {
        Raw::connect(self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it contains `needle` (or as it is after a few seconds):
    /// the port can answer before a line logged during start-up is
    /// flushed to the file.
    pub fn log_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
    }

    /// Sends a signal and waits for exit; returns the exit status.
    pub fn signal_and_wait(&mut self, sig: &str) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "respite did not exit after SIG{sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let child = self.child.as_ref().unwrap();
        Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM first: every test then ends with a graceful drain, and an
        // instrumented binary (cargo llvm-cov) writes its coverage at exit.
        // SIGKILL if it takes more than a few seconds.
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // The proxy's side of a failed test.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- respite log tail (port {}) ---", self.port);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A raw socket for exact-bytes tests.
pub struct Raw {
    pub s: TcpStream,
    /// Bytes read past the last reply `read_reply` returned.
    left: Vec<u8>,
}

impl Raw {
    pub fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            left: Vec::new(),
        }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Reads until exactly `expected.len()` bytes arrived and compares.
    pub fn expect(&mut self, expected: &[u8]) {
        let got = self.read_n(expected.len());
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected),
            "reply bytes differ"
        );
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        let mut off = self.left.len().min(n);
        got[..off].copy_from_slice(&self.left[..off]);
        self.left.drain(..off);
        while off < n {
            match self.s.read(&mut got[off..]) {
                Ok(0) => panic!(
                    "connection closed after {off} of {n} bytes: {:?}",
                    String::from_utf8_lossy(&got[..off])
                ),
                Ok(m) => off += m,
                Err(e) => panic!(
                    "read failed after {off} of {n} bytes ({e}): {:?}",
                    String::from_utf8_lossy(&got[..off])
                ),
            }
        }
        got
    }

    /// Reads exactly one reply frame (found with respite's own scanner);
    /// what follows it is kept for the next read.
    pub fn read_reply(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.left);
        let mut sc = respite::resp::FrameScanner::new();
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            if let Some(end) = sc.next_frame(&buf).unwrap() {
                self.left = buf.split_off(end);
                return buf;
            }
            let n = self.s.read(&mut chunk).expect("reply within timeout");
            assert!(
                n > 0,
                "connection closed; got {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until the peer closes (or the timeout), returning everything.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.left);
        let _ = self.s.read_to_end(&mut out);
        out
    }

    /// True when the server closed the connection (EOF) within the timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.s.read(&mut b), Ok(0)) || matches!(self.s.read(&mut b), Ok(0))
    }
}

/// Encodes a command as RESP.
pub fn cmd_bytes(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// Certificates generated at test time: a CA, the proxy, the upstream and a
/// client, plus a second CA and an expired proxy certificate. Files are PEM
/// in `dir`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, date_time_ymd,
        };
        let dir = std::env::temp_dir().join(format!(
            "respite-pki-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        let ca = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = p.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(p, key))
        };
        let (ca_pem, issuer) = ca("respite test CA");
        let (other_pem, other_issuer) = ca("some other CA");
        write("ca.pem", &ca_pem);
        write("other-ca.pem", &other_pem);
        let leaf =
            |name: &str, sans: &[&str], client: bool, expired: bool, iss: &Issuer<'_, KeyPair>| {
                let key = KeyPair::generate().unwrap();
                let mut p =
                    CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                        .unwrap();
                p.distinguished_name.push(DnType::CommonName, name);
                p.extended_key_usages = vec![if client {
                    ExtendedKeyUsagePurpose::ClientAuth
                } else {
                    ExtendedKeyUsagePurpose::ServerAuth
                }];
                if expired {
                    p.not_before = date_time_ymd(2020, 1, 1);
                    p.not_after = date_time_ymd(2021, 1, 1);
                }
                let cert = p.signed_by(&key, iss).unwrap();
                write(&format!("{name}.pem"), &cert.pem());
                write(&format!("{name}.key"), &key.serialize_pem());
            };
        leaf("proxy", &["localhost"], false, false, &issuer);
        leaf("proxy-expired", &["localhost"], false, true, &issuer);
        leaf(
            "upstream",
            &["localhost", "127.0.0.1"],
            false,
            false,
            &issuer,
        );
        // Redis uses its server certificate as its client one too.
        leaf("client", &["client"], true, false, &issuer);
        leaf("rogue-client", &["client"], true, false, &other_issuer);
        // Private keys mode 600, as an operator would keep them.
        for name in [
            "proxy",
            "proxy-expired",
            "upstream",
            "client",
            "rogue-client",
        ] {
            use std::os::unix::fs::PermissionsExt;
            let p = dir.join(format!("{name}.key"));
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap()
    }

    /// A redis-rs client over TLS to `host:port`, trusting `ca`, with an
    /// optional client certificate (`name` → name.pem / name.key).
    pub fn redis_client(
        &self,
        host: &str,
        port: u16,
        ca: &str,
        client: Option<&str>,
    ) -> redis::Client {
        respite::tls::init();
        redis::Client::build_with_tls(
            format!("rediss://{host}:{port}"),
            redis::TlsCertificates {
                client_tls: client.map(|c| redis::ClientTlsConfig {
                    client_cert: self.read(&format!("{c}.pem")),
                    client_key: self.read(&format!("{c}.key")),
                }),
                root_cert: Some(self.read(ca)),
            },
        )
        .unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub type TlsStream = respite_rustls::StreamOwned<respite_rustls::ClientConnection, TcpStream>;
use tokio_rustls::rustls as respite_rustls;

/// A raw TLS socket (rustls, blocking) for exact-bytes tests. Returns the
/// handshake error as text.
pub fn tls_raw(
    pki: &Pki,
    port: u16,
    name: &str,
    ca: &str,
    client: Option<&str>,
) -> Result<TlsStream, String> {
    use respite_rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    respite::tls::init();
    let mut roots = respite_rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.path(ca)).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = respite_rustls::ClientConfig::builder().with_root_certificates(roots);
    let cfg = match client {
        Some(c) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(pki.path(&format!("{c}.pem")))
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(pki.path(&format!("{c}.key"))).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    let sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock.set_nodelay(true).unwrap();
    let conn = respite_rustls::ClientConnection::new(
        std::sync::Arc::new(cfg),
        ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap();
    let mut s = respite_rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    // With TLS 1.3 a refused client certificate shows on the first read.
    Ok(s)
}

/// Reads one reply line (up to CRLF) from any stream.
pub fn read_line<S: Read>(s: &mut S) -> Result<String, String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&out))),
            Ok(_) => {
                out.push(b[0]);
                if out.ends_with(b"\r\n") {
                    return Ok(String::from_utf8_lossy(&out[..out.len() - 2]).into_owned());
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Runs redis-cli against a port and returns its stdout.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes that LZ4 cannot shrink (an xorshift stream), for tests about sizes
/// that must not be changed by transparent compression.
pub fn incompressible(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
