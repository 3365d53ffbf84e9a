//! Security recommendations for `respite check` (and later `PROXY SECURITY`).

use crate::config::Config;
use std::net::SocketAddr;

fn is_loopback(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false)
}

fn host_is_local(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Whether a file can be read by every user (mode o+r).
fn world_readable(path: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o004 != 0)
        .unwrap_or(false)
}

/// Advice on a valid configuration; empty when nothing stands out.
pub fn recommendations(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let users = !cfg.users.is_empty();
    let tls_listen = &cfg.server.tls.listen;
    if !is_loopback(&cfg.server.listen) {
        out.push(format!(
            "server.listen {} is not a loopback address and clients connect in plaintext{}: bind it to 127.0.0.1 and use [server.tls] for remote clients, or firewall it",
            cfg.server.listen,
            if users { "" } else { " without AUTH" }
        ));
    }
    let public =
        !is_loopback(&cfg.server.listen) || (!tls_listen.is_empty() && !is_loopback(tls_listen));
    if !users && public {
        out.push(
            "no [[users]] configured: any client that reaches the listener can run every command (add users with password_sha256)".into(),
        );
    }
    for u in &cfg.users {
        if !u.password.is_empty() {
            out.push(format!(
                "users.{}: plain-text password in the configuration; use password_sha256 = \"{}\" instead",
                u.name,
                "<sha256 hex of the password>"
            ));
        }
    }
    let mut secret_files: Vec<(&str, &str)> = vec![
        ("server.tls.key_file", &cfg.server.tls.key_file),
        ("upstream.tls.key_file", &cfg.upstream.tls.key_file),
        ("upstream.password_file", &cfg.upstream.password_file),
    ];
    if let Some(p) = &cfg.meta.path
        && (users || !cfg.upstream.password.is_empty() || cfg.upstream.url.contains('@'))
    {
        secret_files.push((
            "the configuration file (it holds secrets)",
            p.to_str().unwrap_or(""),
        ));
    }
    for (what, path) in secret_files {
        if !path.is_empty() && world_readable(path) {
            out.push(format!(
                "{what} {path} is world-readable: chmod 600 (or 640 with the service's group)"
            ));
        }
    }
    if !cfg.metrics.listen.is_empty() && !is_loopback(&cfg.metrics.listen) {
        out.push(format!(
            "metrics.listen {} exposes metrics beyond this host",
            cfg.metrics.listen
        ));
    }
    if let Ok(u) = cfg.upstream_url() {
        let local = host_is_local(&u.host);
        if !local && !u.tls {
            out.push(format!(
                "upstream {} is off-host without TLS (use rediss://)",
                u.redacted()
            ));
        }
        let has_password = u.password.is_some()
            || !cfg.upstream.password.is_empty()
            || !cfg.upstream.password_file.is_empty();
        if !local && !has_password {
            out.push(format!(
                "upstream {} is off-host without AUTH",
                u.redacted()
            ));
        }
        if u.tls && cfg.upstream.tls.insecure_skip_verify {
            out.push(
                "upstream.tls.insecure_skip_verify = true: the upstream's certificate is not verified".into(),
            );
        }
    }
    out
}

/// `PROXY SECURITY`: the live status, then the same recommendations.
pub fn report(sh: &crate::server::Shared) -> String {
    let cfg = sh.config();
    let mut s = String::new();
    let tls_up = cfg.upstream_url().map(|u| u.tls).unwrap_or(false);
    let (up_user, up_pass) = cfg.upstream_credentials().unwrap_or((None, None));
    let lines = [
        format!("listen:{} (plaintext)", sh.listen_addr),
        format!(
            "tls_listen:{}",
            sh.tls_addr
                .map(|a| a.to_string())
                .unwrap_or_else(|| "off".into())
        ),
        format!(
            "tls_client_certificates:{}",
            if cfg.server.tls.client_ca_file.is_empty() {
                "not required"
            } else {
                "required"
            }
        ),
        format!(
            "auth:{}",
            if sh.auth.enabled() {
                "required"
            } else {
                "off (AUTH goes to Redis)"
            }
        ),
        format!("users:{}", sh.auth.count()),
        format!(
            "plaintext_passwords:{}",
            cfg.users.iter().filter(|u| !u.password.is_empty()).count()
        ),
        format!("upstream_tls:{}", if tls_up { "on" } else { "off" }),
        format!(
            "upstream_tls_verify:{}",
            if !tls_up {
                "-"
            } else if cfg.upstream.tls.insecure_skip_verify {
                "OFF (insecure_skip_verify)"
            } else {
                "on"
            }
        ),
        format!(
            "upstream_auth:{}",
            match (up_user.is_some(), up_pass.is_some()) {
                (_, false) => "none",
                (false, true) => "password",
                (true, true) => "acl user",
            }
        ),
        format!(
            "metrics_listen:{}",
            if cfg.metrics.listen.is_empty() {
                "off"
            } else {
                &cfg.metrics.listen
            }
        ),
    ];
    for l in lines {
        s.push_str(&l);
        s.push('\n');
    }
    let recs = recommendations(&cfg);
    if recs.is_empty() {
        s.push_str("recommendations:none\n");
    }
    for r in recs {
        s.push_str("recommendation:");
        s.push_str(&r);
        s.push('\n');
    }
    s
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
        assert_eq!(r.len(), 4, "{r:?}");
        assert!(r.iter().any(|x| x.contains("no [[users]]")), "{r:?}");
    }
}
