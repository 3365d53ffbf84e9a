//! `tracing` set-up: plain or JSON lines on stderr (journald captures
//! them under systemd), with a level that can be changed on reload.

use crate::config::{LogConfig, LogFormat};
use std::sync::OnceLock;
use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

static RELOAD: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let ok = match cfg.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
            .is_ok(),
        LogFormat::Plain => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colour codes only on a terminal, not in files or journald.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init()
            .is_ok(),
    };
    if ok {
        let _ = RELOAD.set(handle);
    }
}

/// Changes the log filter of a running process.
pub fn set_level(level: &str) {
    if let (Some(h), Ok(f)) = (RELOAD.get(), EnvFilter::try_new(level)) {
        let _ = h.reload(f);
    }
}
