//! Metrics: one struct passed to every component. Counters that INFO and
//! `PROXY STATS` report live in atomics here; everything is also recorded
//! through the `metrics` facade for the Prometheus endpoint. Handles are
//! registered once, so the hot path is an atomic add, not a registry lookup.

use crate::command;
use metrics::{Counter, Gauge};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Latency buckets in seconds: 25 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 10.0,
];

/// Per-command counters and latency histogram. Kept in plain atomics
/// (rendered by [`Metrics::render_commands`]) because they are touched for
/// every command: a bucket index and three relaxed adds, no registry lookup.
struct CmdStats {
    ok: AtomicU64,
    err: AtomicU64,
    /// Non-cumulative counts per bucket; the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl CmdStats {
    fn record(&self, error: Option<bool>, l: Duration) {
        match error {
            Some(true) => self.err.fetch_add(1, Ordering::Relaxed),
            _ => self.ok.fetch_add(1, Ordering::Relaxed),
        };
        let ns = l.as_nanos().min(u64::MAX as u128) as u64;
        let i = bucket_bounds_ns().partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Prometheus histogram lines for this histogram.
    fn render_histogram(&self, s: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (j, le) in LATENCY_BUCKETS.iter().enumerate() {
            cum += counts[j];
            let _ = writeln!(s, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(s, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(s, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(s, "{name}_count{{{labels}}} {total}");
    }

    fn new() -> Self {
        CmdStats {
            ok: AtomicU64::new(0),
            err: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

fn bucket_bounds_ns() -> &'static [u64; LATENCY_BUCKETS.len()] {
    static B: OnceLock<[u64; LATENCY_BUCKETS.len()]> = OnceLock::new();
    B.get_or_init(|| std::array::from_fn(|i| (LATENCY_BUCKETS[i] * 1e9) as u64))
}

pub struct Metrics {
    cmds: Vec<CmdStats>,
    /// AI.* hit/miss/set/invalidation statistics (AI.STATS and /metrics).
    pub ai: crate::ai::AiStats,
    /// Compression counters (values compressed/skipped, bytes, errors).
    pub compression: crate::compress_cmd::Stats,
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
    /// Upstream round trip per batch; own atomics, like the per-command
    /// histograms, because it is recorded for every batch.
    upstream_latency: CmdStats,
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
            cmds: (0..n).map(|_| CmdStats::new()).collect(),
            ai: crate::ai::AiStats::new(),
            compression: Default::default(),
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
            upstream_latency: CmdStats::new(),
        }
    }

    /// Records one finished command. `id` is the table id or
    /// `command::count()` for unknown commands.
    pub fn command(&self, id: usize, error: bool, latency: Option<Duration>) {
        let c = &self.cmds[id.min(self.cmds.len() - 1)];
        match latency {
            Some(l) => c.record(Some(error), l),
            None if error => {
                c.err.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                c.ok.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records a batch that succeeded; runs of the same command (the usual
    /// pipeline) cost one histogram update.
    pub fn commands_ok(&self, ids: &[u16], latency: Duration) {
        let ns = latency.as_nanos().min(u64::MAX as u128) as u64;
        let bucket = bucket_bounds_ns().partition_point(|&b| b < ns);
        let mut i = 0;
        while i < ids.len() {
            let id = ids[i];
            let mut n = 1;
            while i + n < ids.len() && ids[i + n] == id {
                n += 1;
            }
            let c = &self.cmds[(id as usize).min(self.cmds.len() - 1)];
            c.ok.fetch_add(n as u64, Ordering::Relaxed);
            c.buckets[bucket].fetch_add(n as u64, Ordering::Relaxed);
            c.sum_ns
                .fetch_add(ns.saturating_mul(n as u64), Ordering::Relaxed);
            i += n;
        }
    }

    /// Prometheus text for the per-command families, L1 and AI statistics.
    pub fn render_commands(&self, l1: Option<&crate::cache::L1>) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        if let Some(l1) = l1 {
            for (k, v) in l1.render() {
                if let Ok(v) = v.parse::<f64>() {
                    let _ = writeln!(s, "respite_l1_{k} {v}");
                }
            }
        }
        crate::compress_cmd::render_prometheus(self, &mut s);
        // AI response cache statistics (see AI.STATS); untyped samples.
        for (k, v) in self.ai.render() {
            if let Ok(v) = v.parse::<f64>() {
                // Operation names may contain ':' themselves: split at the ends.
                let (name, labels) = match k.split_once(':').zip(k.rsplit_once(':')) {
                    Some(((kind, _), (head, what))) if kind == "op" || kind == "tier" => {
                        let val = &head[kind.len() + 1..];
                        (
                            what.to_string(),
                            format!("{{{kind}=\"{}\"}}", label_escape(val)),
                        )
                    }
                    _ => (k.clone(), String::new()),
                };
                let _ = writeln!(s, "respite_ai_{name}{labels} {v}");
            }
        }
        s.push_str("# HELP respite_commands_total Commands by name and result.\n");
        s.push_str("# TYPE respite_commands_total counter\n");
        for (i, c) in self.cmds.iter().enumerate() {
            let name = command::name(i).to_ascii_lowercase();
            for (res, v) in [("ok", &c.ok), ("error", &c.err)] {
                let v = v.load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        s,
                        "respite_commands_total{{cmd=\"{name}\",result=\"{res}\"}} {v}"
                    );
                }
            }
        }
        s.push_str(
            "# HELP respite_upstream_batch_duration_seconds Upstream round trip per batch.\n",
        );
        s.push_str("# TYPE respite_upstream_batch_duration_seconds histogram\n");
        self.upstream_latency.render_histogram(
            &mut s,
            "respite_upstream_batch_duration_seconds",
            "",
        );
        s.push_str(
            "# HELP respite_command_duration_seconds Time from dispatch to reply, per command.\n",
        );
        s.push_str("# TYPE respite_command_duration_seconds histogram\n");
        for (i, c) in self.cmds.iter().enumerate() {
            if c.buckets.iter().all(|b| b.load(Ordering::Relaxed) == 0) {
                continue;
            }
            let labels = format!("cmd=\"{}\"", command::name(i).to_ascii_lowercase());
            c.render_histogram(&mut s, "respite_command_duration_seconds", &labels);
        }
        s
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
        self.upstream_latency.record(None, d);
    }

    /// (name, calls, errors) for every command seen, for `PROXY STATS`.
    pub fn command_counts(&self) -> Vec<(&'static str, u64, u64)> {
        self.cmds
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let err = c.err.load(Ordering::Relaxed);
                let n = c.ok.load(Ordering::Relaxed) + err;
                (n > 0).then(|| (command::name(i), n, err))
            })
            .collect()
    }

    pub fn total_commands(&self) -> u64 {
        self.cmds
            .iter()
            .map(|c| c.ok.load(Ordering::Relaxed) + c.err.load(Ordering::Relaxed))
            .sum()
    }
}

/// Escapes a Prometheus label value (operation names come from clients).
fn label_escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
    ours: Arc<Metrics>,
    l1: Option<Arc<crate::cache::L1>>,
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
        let ours = ours.clone();
        let l1 = l1.clone();
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
                "/metrics" => (
                    "200 OK",
                    handle.render() + &ours.render_commands(l1.as_deref()),
                ),
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
