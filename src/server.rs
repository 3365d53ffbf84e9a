//! The listener, shared state, start-up, reload and graceful shutdown.

use crate::cache::L1;
use crate::config::{Config, Fallback};
use crate::local::LocalStore;
use crate::metrics::Metrics;
use crate::resp::Limits;
use crate::upstream::Upstream;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Where commands are executed.
pub enum Backend {
    Upstream(Arc<Upstream>),
    /// In-process store for a first run without Redis.
    Local(Arc<LocalStore>),
}

/// The settings that may change while running, read lock-free by sessions.
#[derive(Debug, Default)]
pub struct Runtime {
    pub max_clients: AtomicUsize,
    pub idle_timeout_ms: AtomicU64,
    pub header_timeout_ms: AtomicU64,
    pub max_bulk_bytes: AtomicUsize,
    pub max_multibulk_len: AtomicUsize,
    pub max_inline_bytes: AtomicUsize,
    pub max_output_bytes: AtomicUsize,
    pub max_pipeline: AtomicUsize,
    /// `compression.enabled` (read on the hot path).
    pub compression: std::sync::atomic::AtomicBool,
    /// `compression.min_bytes`.
    pub compression_min_bytes: AtomicUsize,
}

impl Runtime {
    pub fn apply(&self, c: &Config) {
        self.max_clients
            .store(c.server.max_clients, Ordering::Relaxed);
        self.idle_timeout_ms
            .store(c.server.idle_timeout_ms, Ordering::Relaxed);
        self.header_timeout_ms
            .store(c.server.header_timeout_ms, Ordering::Relaxed);
        self.max_bulk_bytes
            .store(c.limits.max_bulk_bytes, Ordering::Relaxed);
        self.max_multibulk_len
            .store(c.limits.max_multibulk_len, Ordering::Relaxed);
        self.max_inline_bytes
            .store(c.limits.max_inline_bytes, Ordering::Relaxed);
        self.max_output_bytes
            .store(c.limits.max_output_bytes, Ordering::Relaxed);
        self.max_pipeline
            .store(c.limits.max_pipeline, Ordering::Relaxed);
        self.compression
            .store(c.compression.enabled, Ordering::Relaxed);
        self.compression_min_bytes
            .store(c.compression.min_bytes, Ordering::Relaxed);
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_bulk_bytes: self.max_bulk_bytes.load(Ordering::Relaxed),
            max_multibulk_len: self.max_multibulk_len.load(Ordering::Relaxed),
            max_inline_bytes: self.max_inline_bytes.load(Ordering::Relaxed),
        }
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        let ms = self.idle_timeout_ms.load(Ordering::Relaxed);
        (ms > 0).then(|| Duration::from_millis(ms))
    }
}

/// One connected client, for `PROXY CLIENTS`.
#[derive(Debug)]
pub struct ClientEntry {
    pub id: u64,
    pub addr: String,
    pub since: Instant,
    pub commands: AtomicU64,
    pub pinned: AtomicBool,
}

pub struct Shared {
    pub config: RwLock<Arc<Config>>,
    pub rt: Runtime,
    pub metrics: Arc<Metrics>,
    pub backend: Backend,
    pub l1: Option<Arc<L1>>,
    pub clients: DashMap<u64, Arc<ClientEntry>>,
    pub next_id: AtomicU64,
    pub started: Instant,
    pub shutdown: CancellationToken,
    /// Cancelled when the listener stops accepting (drain phase).
    pub draining: CancellationToken,
    pub listen_addr: SocketAddr,
    /// The TLS listener's address and its (reloadable) acceptor.
    pub tls_addr: Option<SocketAddr>,
    pub tls: Option<Arc<crate::tls::Acceptor>>,
    /// Proxy users; when any exists clients must AUTH.
    pub auth: crate::auth::Registry,
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    /// Applies a new configuration: the reloadable subset takes effect now;
    /// other changed keys are reported and need a restart.
    pub fn reload(&self, new: Config) -> Vec<String> {
        let old = self.config();
        let mut restart = Vec::new();
        let mut diff = |name: &str, a: String, b: String| {
            if a != b {
                restart.push(name.to_string());
            }
        };
        diff(
            "server.listen",
            old.server.listen.clone(),
            new.server.listen.clone(),
        );
        diff(
            "upstream.url",
            old.upstream.url.clone(),
            new.upstream.url.clone(),
        );
        diff(
            "upstream.pool_size",
            old.upstream.pool_size.to_string(),
            new.upstream.pool_size.to_string(),
        );
        diff(
            "metrics.listen",
            old.metrics.listen.clone(),
            new.metrics.listen.clone(),
        );
        diff(
            "server.tls.listen",
            old.server.tls.listen.clone(),
            new.server.tls.listen.clone(),
        );
        self.rt.apply(&new);
        // New handshakes use the new certificates; open connections keep theirs.
        if let Some(acc) = &self.tls
            && let Err(e) = acc.reload(&new.server.tls)
        {
            tracing::error!(error = %e, "TLS certificates not reloaded; the previous ones stay in use");
        }
        self.auth.apply(&new);
        if let Backend::Upstream(u) = &self.backend {
            u.set_timeout_ms(new.upstream.timeout_ms);
        }
        crate::logging::set_level(&new.log.level);
        *self.config.write().unwrap() = Arc::new(new);
        restart
    }
}

/// Keys `PROXY CONFIG SET` may change at runtime.
pub const RELOADABLE: &[&str] = &[
    "server.max_clients",
    "server.idle_timeout_ms",
    "server.header_timeout_ms",
    "server.shutdown_grace_ms",
    "upstream.timeout_ms",
    "limits.max_bulk_bytes",
    "limits.max_multibulk_len",
    "limits.max_inline_bytes",
    "limits.max_output_bytes",
    "limits.max_pipeline",
    "log.level",
];

/// Decides between Redis and the in-process store.
async fn choose_backend(
    cfg: &Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    l1: Option<Arc<L1>>,
) -> Result<Backend, String> {
    if cfg.upstream.fallback == Fallback::Local {
        tracing::warn!(
            "upstream.fallback = \"local\": serving from an IN-PROCESS store; nothing is written to Redis"
        );
        return Ok(Backend::Local(Arc::new(LocalStore::new(16))));
    }
    if !cfg.meta.upstream_explicit {
        let url = cfg.upstream_url()?;
        let probe = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect((url.host.as_str(), url.port)),
        )
        .await;
        if !matches!(probe, Ok(Ok(_))) {
            tracing::warn!(
                "NO REDIS at {} and no upstream configured: serving strings and keys from an IN-PROCESS store. \
                 Data lives only in this process and is never written to Redis. \
                 Configure upstream.url (or --upstream) to use Redis.",
                url.redacted()
            );
            return Ok(Backend::Local(Arc::new(LocalStore::new(16))));
        }
    }
    Ok(Backend::Upstream(Upstream::new(
        cfg, metrics, shutdown, l1,
    )?))
}

/// A client listener with a deep accept queue: tokio's default backlog
/// (1024) made bursts of connects wait for SYN retransmits (about 1 s each).
fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(8192)
}

/// A running proxy (also used by tests that embed it).
pub struct Running {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub done: tokio::task::JoinHandle<()>,
}

/// Binds the listeners and starts serving. Returns once ready.
pub async fn start(cfg: Config) -> Result<Running, String> {
    crate::tls::init();
    let shutdown = CancellationToken::new();
    // The recorder must exist before Metrics registers its handles, or they
    // would be no-ops.
    let prometheus = if cfg.metrics.listen.is_empty() {
        None
    } else {
        crate::metrics::install_prometheus()
    };
    let metrics = Arc::new(Metrics::new());
    let listener = bind(&cfg.server.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.server.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (tls_listener, tls) = if cfg.server.tls.listen.is_empty() {
        (None, None)
    } else {
        let acc = Arc::new(crate::tls::Acceptor::new(&cfg.server.tls)?);
        let l = bind(&cfg.server.tls.listen)
            .map_err(|e| format!("cannot listen on {} (TLS): {e}", cfg.server.tls.listen))?;
        (Some(l), Some(acc))
    };
    let tls_addr = tls_listener.as_ref().and_then(|l| l.local_addr().ok());
    let l1 = L1::new(&cfg.l1);
    let backend = choose_backend(&cfg, metrics.clone(), shutdown.clone(), l1.clone()).await?;
    // The in-process store needs no near cache in front of it.
    let l1 = if matches!(backend, Backend::Upstream(_)) {
        l1
    } else {
        None
    };
    if let Backend::Upstream(u) = &backend {
        // Give the pool a moment so the first clients do not see "connecting";
        // serving starts regardless (Redis may be down: that is reported).
        u.wait_ready(Duration::from_millis(500)).await;
    }
    let mut metrics_addr = None;
    if !cfg.metrics.listen.is_empty() {
        let ml = TcpListener::bind(&cfg.metrics.listen)
            .await
            .map_err(|e| format!("cannot listen on {} (metrics): {e}", cfg.metrics.listen))?;
        metrics_addr = ml.local_addr().ok();
        if let Some(handle) = prometheus {
            let up = match &backend {
                Backend::Upstream(u) => Some(u.clone()),
                Backend::Local(_) => None,
            };
            tokio::spawn(crate::metrics::serve(
                ml,
                handle,
                metrics.clone(),
                l1.clone(),
                up,
                shutdown.clone(),
            ));
        }
    }
    let rt = Runtime::default();
    rt.apply(&cfg);
    let auth = crate::auth::Registry::new(&cfg);
    if !auth.enabled()
        && (!is_loopback(&cfg.server.listen) || tls_addr.is_some_and(|a| !a.ip().is_loopback()))
    {
        tracing::warn!(
            "no [[users]] configured: any client that reaches the listener can run every command"
        );
    }
    let shared = Arc::new(Shared {
        config: RwLock::new(Arc::new(cfg)),
        rt,
        metrics,
        backend,
        l1,
        clients: DashMap::new(),
        next_id: AtomicU64::new(1),
        started: Instant::now(),
        shutdown: shutdown.clone(),
        draining: CancellationToken::new(),
        listen_addr: addr,
        tls_addr,
        tls,
        auth,
    });
    if let Backend::Local(store) = &shared.backend {
        let store = store.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! { _ = iv.tick() => { store.sweep_expired(); } _ = sd.cancelled() => return }
            }
        });
    }
    let plain = tokio::spawn(accept_loop(listener, shared.clone(), false));
    let done = match tls_listener {
        Some(l) => {
            let t = tokio::spawn(accept_loop(l, shared.clone(), true));
            tokio::spawn(async move {
                let _ = plain.await;
                let _ = t.await;
            })
        }
        None => plain,
    };
    tracing::info!(listen = %addr, tls_listen = ?tls_addr, metrics = ?metrics_addr, "respite ready");
    Ok(Running {
        shared,
        addr,
        metrics_addr,
        done,
    })
}

fn is_loopback(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: bool) {
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.draining.cancelled() => return,
        };
        sock.set_nodelay(true).ok();
        let max = shared.rt.max_clients.load(Ordering::Relaxed);
        if shared.clients.len() >= max {
            shared.metrics.client_rejected("max_clients");
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut sock = sock;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    sock.write_all(b"-ERR max number of clients reached\r\n"),
                )
                .await;
            });
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ClientEntry {
            id,
            addr: peer.to_string(),
            since: Instant::now(),
            commands: AtomicU64::new(0),
            pinned: AtomicBool::new(false),
        });
        shared.clients.insert(id, entry.clone());
        shared.metrics.client_connected();
        let sh = shared.clone();
        let acceptor = if tls {
            sh.tls.as_ref().map(|a| a.current())
        } else {
            None
        };
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let (rd, wr) = sock.into_split();
                    crate::session::run(rd, wr, sh.clone(), entry).await;
                }
                Some(acc) => tls_session(sock, peer, acc, sh.clone(), entry).await,
            }
            sh.clients.remove(&id);
            sh.metrics.client_disconnected();
        });
    }
}

/// Handshake (bounded by `server.tls.handshake_timeout_ms`), then a session.
/// A stalled or garbage handshake costs one task for at most that long, and
/// counts against max_clients meanwhile. A client speaking plain RESP to the
/// TLS port gets a readable error instead of a TLS alert.
async fn tls_session(
    mut sock: tokio::net::TcpStream,
    peer: SocketAddr,
    acc: tokio_rustls::TlsAcceptor,
    sh: Arc<Shared>,
    entry: Arc<ClientEntry>,
) {
    use tokio::io::AsyncWriteExt;
    let limit = Duration::from_millis(sh.config().server.tls.handshake_timeout_ms.max(1));
    let deadline = tokio::time::Instant::now() + limit;
    let mut first = [0u8; 1];
    // 0x16: a TLS handshake record.
    if let Ok(Ok(1)) = tokio::time::timeout_at(deadline, sock.peek(&mut first)).await
        && first[0] != 0x16
    {
        sh.metrics.error("tls_plaintext");
        tracing::info!(client = %peer, "plaintext client on the TLS port");
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            sock.write_all(
                b"-ERR this port speaks TLS: connect with TLS (e.g. redis-cli --tls)\r\n",
            ),
        )
        .await;
        return;
    }
    let hs = tokio::select! {
        r = tokio::time::timeout_at(deadline, acc.accept(sock)) => r,
        _ = sh.shutdown.cancelled() => return,
    };
    match hs {
        Ok(Ok(stream)) => {
            let (rd, wr) = tokio::io::split(stream);
            crate::session::run(rd, wr, sh, entry).await;
        }
        Ok(Err(e)) => {
            sh.metrics.error("tls_handshake");
            tracing::info!(client = %peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            sh.metrics.error("tls_handshake_timeout");
            tracing::info!(client = %peer, "TLS handshake timed out");
        }
    }
}

impl Running {
    /// Stops accepting, lets clients finish for up to the grace period, then
    /// closes everything.
    pub async fn drain(self) {
        let grace = Duration::from_millis(self.shared.config().server.shutdown_grace_ms);
        self.shared.draining.cancel();
        let _ = self.done.await;
        let deadline = Instant::now() + grace;
        while !self.shared.clients.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.shared.clients.len();
        if left > 0 {
            tracing::warn!(
                clients = left,
                "grace period over; closing remaining connections"
            );
        }
        self.shared.shutdown.cancel();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.shared.clients.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
