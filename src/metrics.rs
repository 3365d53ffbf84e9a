//! Metrics: one struct passed to every component. Counters that INFO and
//! `PROXY STATS` report live in atomics here; everything is also recorded
//! through the `metrics` facade for the Prometheus endpoint. Handles are
//! registered once, so the hot path is an atomic add, not a registry lookup.

use crate::command;
use metrics::{Counter, Gauge, Histogram};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Latency buckets in seconds: 25 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 10.0,
];

struct CmdHandles {
    ok: Counter,
    err: Counter,
    latency: Histogram,
}

pub struct Metrics {
    cmd_counts: Vec<AtomicU64>,
    cmd_errors: Vec<AtomicU64>,
    cmd_handles: Vec<OnceLock<CmdHandles>>,
    pub clients: AtomicI64,
    pub clients_total: AtomicU64,
    pub rejected: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub errors: dashmap::DashMap<&'static str, u64>,
    clients_gauge: Gauge,
    bytes_in_c: Counter,
    bytes_out_c: Counter,
    upstream_up_g: Gauge,
    upstream_reconnects: Counter,
    upstream_latency_h: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let n = command::count() + 1;
        Metrics {
            cmd_counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            cmd_errors: (0..n).map(|_| AtomicU64::new(0)).collect(),
            cmd_handles: (0..n).map(|_| OnceLock::new()).collect(),
            clients: AtomicI64::new(0),
            clients_total: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            errors: dashmap::DashMap::new(),
            clients_gauge: metrics::gauge!("respite_clients_connected"),
            bytes_in_c: metrics::counter!("respite_client_bytes_in_total"),
            bytes_out_c: metrics::counter!("respite_client_bytes_out_total"),
            upstream_up_g: metrics::gauge!("respite_upstream_up"),
            upstream_reconnects: metrics::counter!("respite_upstream_reconnects_total"),
            upstream_latency_h: metrics::histogram!("respite_upstream_batch_duration_seconds"),
        }
    }

    fn handles(&self, id: usize) -> &CmdHandles {
        self.cmd_handles[id].get_or_init(|| {
            let name = command::name(id).to_ascii_lowercase();
            CmdHandles {
                ok: metrics::counter!("respite_commands_total", "cmd" => name.clone(), "result" => "ok"),
                err: metrics::counter!("respite_commands_total", "cmd" => name.clone(), "result" => "error"),
                latency: metrics::histogram!("respite_command_duration_seconds", "cmd" => name),
            }
        })
    }

    /// Records one finished command. `id` is the table id or
    /// `command::count()` for unknown commands.
    pub fn command(&self, id: usize, error: bool, latency: Option<Duration>) {
        let id = id.min(self.cmd_counts.len() - 1);
        self.cmd_counts[id].fetch_add(1, Ordering::Relaxed);
        let h = self.handles(id);
        if error {
            self.cmd_errors[id].fetch_add(1, Ordering::Relaxed);
            h.err.increment(1);
        } else {
            h.ok.increment(1);
        }
        if let Some(l) = latency {
            h.latency.record(l.as_secs_f64());
        }
    }

    pub fn client_connected(&self) {
        self.clients.fetch_add(1, Ordering::Relaxed);
        self.clients_total.fetch_add(1, Ordering::Relaxed);
        self.clients_gauge.increment(1.0);
    }

    pub fn client_disconnected(&self) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
        self.clients_gauge.decrement(1.0);
    }

    pub fn client_rejected(&self, reason: &'static str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("respite_clients_rejected_total", "reason" => reason).increment(1);
    }

    pub fn bytes(&self, inb: usize, outb: usize) {
        if inb > 0 {
            self.bytes_in.fetch_add(inb as u64, Ordering::Relaxed);
            self.bytes_in_c.increment(inb as u64);
        }
        if outb > 0 {
            self.bytes_out.fetch_add(outb as u64, Ordering::Relaxed);
            self.bytes_out_c.increment(outb as u64);
        }
    }

    /// Counts an error by kind (protocol, limit, upstream_*, ...).
    pub fn error(&self, kind: &'static str) {
        *self.errors.entry(kind).or_insert(0) += 1;
        metrics::counter!("respite_errors_total", "kind" => kind).increment(1);
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.error(kind);
    }

    pub fn upstream_up(&self, up: bool) {
        self.upstream_up_g.set(if up { 1.0 } else { 0.0 });
    }

    pub fn upstream_reconnect(&self) {
        self.upstream_reconnects.increment(1);
    }

    pub fn upstream_latency(&self, d: Duration) {
        self.upstream_latency_h.record(d.as_secs_f64());
    }

    /// (name, calls, errors) for every command seen, for `PROXY STATS`.
    pub fn command_counts(&self) -> Vec<(&'static str, u64, u64)> {
        self.cmd_counts
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| {
                    (
                        command::name(i),
                        n,
                        self.cmd_errors[i].load(Ordering::Relaxed),
                    )
                })
            })
            .collect()
    }

    pub fn total_commands(&self) -> u64 {
        self.cmd_counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Installs the Prometheus recorder and returns the handle that renders the
/// text format. Only the first call in a process installs it.
pub fn install_prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// Serves `GET /metrics` (and `/health`) with a minimal HTTP/1.1 responder:
/// scrapes are rare and small, so no HTTP framework is warranted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    up: Option<Arc<crate::upstream::Upstream>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upkeep = handle.clone();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! { _ = iv.tick() => upkeep.run_upkeep(), _ = sd.cancelled() => return }
        }
    });
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let handle = handle.clone();
        let up = up.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    let m = sock.read(&mut buf[n..]).await.ok()?;
                    if m == 0 {
                        return None;
                    }
                    n += m;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        return Some(());
                    }
                }
                None
            })
            .await;
            if !matches!(read, Ok(Some(()))) {
                return;
            }
            let line = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", handle.render()),
                "/health" => {
                    if up
                        .as_ref()
                        .is_none_or(|u| u.health.up.load(Ordering::Relaxed))
                    {
                        ("200 OK", "ok\n".to_string())
                    } else {
                        (
                            "503 Service Unavailable",
                            "upstream unavailable\n".to_string(),
                        )
                    }
                }
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
