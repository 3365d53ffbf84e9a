//! The `respite` binary: command line, signals, systemd notification.

use clap::{Args, Parser, Subcommand};
use respite::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "respite", version, about = "Redis-protocol caching proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the default).
    Serve(ServeArgs),
    /// Validate a configuration and print security recommendations; exit 0/1.
    #[command(alias = "check-config")]
    Check(ServeArgs),
}

#[derive(Args, Clone, Default)]
struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Client listen address (server.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Upstream URL: redis://[user:pass@]host:port[/db] or rediss://...
    #[arg(long)]
    upstream: Option<String>,
    /// Prometheus listen address (metrics.listen); empty disables.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Override any configuration key: --set l1.mode=off
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Validate the configuration and exit (same as `respite check`).
    #[arg(long)]
    check: bool,
}

impl ServeArgs {
    fn load(&self) -> Result<Config, String> {
        let mut sets = Vec::new();
        // Flags are --set overrides with their own names, so a reload keeps them.
        if let Some(v) = &self.listen {
            sets.push(format!("server.listen={}", quote(v)));
        }
        if let Some(v) = &self.upstream {
            sets.push(format!("upstream.url={}", quote(v)));
        }
        if let Some(v) = &self.metrics_listen {
            sets.push(format!("metrics.listen={}", quote(v)));
        }
        sets.extend(self.sets.iter().cloned());
        Config::load(self.config.as_deref(), std::env::vars(), &sets)
    }
}

/// A TOML string literal, so addresses are never read as something else.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn main() -> ExitCode {
    respite::tls::init();
    let cli = Cli::parse();
    let (check, args) = match cli.cmd {
        Some(Cmd::Check(a)) => (true, a),
        Some(Cmd::Serve(a)) => (a.check, a),
        None => (cli.serve.check, cli.serve),
    };
    let cfg = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("respite: {e}");
            return ExitCode::from(1);
        }
    };
    if check {
        println!("configuration OK");
        for r in respite::check::recommendations(&cfg) {
            println!("recommendation: {r}");
        }
        return ExitCode::SUCCESS;
    }
    respite::logging::init(&cfg.log);
    let threads = worker_threads(cfg.server.threads);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    tracing::info!(threads, configured = cfg.server.threads, "runtime");
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("respite: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(serve(cfg))
}

/// `server.threads`, with 0 settled for this machine: one worker per core,
/// except on one or two cores, where a single thread measured faster in
/// every `scripts/bench` case (the cores are shared with Redis and clients,
/// and a second worker mostly adds cross-thread wake-ups and steals).
fn worker_threads(configured: usize) -> usize {
    match configured {
        0 => match std::thread::available_parallelism().map_or(1, |n| n.get()) {
            n if n <= 2 => 1,
            n => n,
        },
        n => n,
    }
}

async fn serve(cfg: Config) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let running = match respite::server::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("respite: {e}");
            return ExitCode::from(1);
        }
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("respite: cannot install signal handlers");
        return ExitCode::from(1);
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                match respite::admin::reload_from_file(&running.shared) {
                    Ok(restart) if restart.is_empty() => tracing::info!("configuration reloaded"),
                    Ok(restart) => tracing::warn!(keys = ?restart, "configuration reloaded; some changes need a restart"),
                    Err(e) => tracing::error!(error = %e, "reload failed; configuration unchanged"),
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: draining clients");
    running.drain().await;
    tracing::info!("bye");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn automatic_threads_follow_the_core_count() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = worker_threads(0);
        assert_eq!(auto, if cores <= 2 { 1 } else { cores });
        assert_eq!(worker_threads(1), 1);
        assert_eq!(worker_threads(3), 3);
    }
}
