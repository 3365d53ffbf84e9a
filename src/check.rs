//! Security recommendations for `respite check` (and later `PROXY SECURITY`).

use crate::config::Config;
use std::net::SocketAddr;

fn is_loopback(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false)
}

/// Advice on a valid configuration; empty when nothing stands out.
pub fn recommendations(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if !is_loopback(&cfg.server.listen) {
        out.push(format!(
            "server.listen {} is not a loopback address and clients connect in plaintext without AUTH: restrict it or front it with a firewall",
            cfg.server.listen
        ));
    }
    if !cfg.metrics.listen.is_empty() && !is_loopback(&cfg.metrics.listen) {
        out.push(format!(
            "metrics.listen {} exposes metrics beyond this host",
            cfg.metrics.listen
        ));
    }
    if let Ok(u) = cfg.upstream_url() {
        let local = u.host == "localhost"
            || u.host
                .parse::<std::net::IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(false);
        if !local && !u.tls {
            out.push(format!(
                "upstream {} is off-host without TLS (use rediss://)",
                u.redacted()
            ));
        }
        if !local && u.password.is_none() {
            out.push(format!(
                "upstream {} is off-host without AUTH",
                u.redacted()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_public_listeners() {
        let c = Config::load(None, std::iter::empty(), &[]).unwrap();
        assert!(recommendations(&c).is_empty());
        let c = Config::load(
            None,
            std::iter::empty(),
            &[
                "server.listen=0.0.0.0:6380".into(),
                "upstream.url=redis://10.1.2.3:6379".into(),
            ],
        )
        .unwrap();
        let r = recommendations(&c);
        assert_eq!(r.len(), 3, "{r:?}");
    }
}
