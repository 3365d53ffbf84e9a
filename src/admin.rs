//! `PROXY ...` commands and the `# Proxy` section of INFO, for redis-cli.

use crate::config::Config;
use crate::resp;
use crate::server::{Backend, RELOADABLE, Shared};
use bytes::{Bytes, BytesMut};
use std::fmt::Write;
use std::sync::atomic::Ordering;

const HELP: &[&str] = &[
    "PROXY <subcommand> [<arg> ...]. Subcommands are:",
    "INFO",
    "    Proxy status: version, uptime, clients, upstream, backend.",
    "STATS",
    "    Counters: commands by name, errors by kind, bytes in/out, compression.",
    "UPSTREAM",
    "    Upstream address, health, connections, reconnects, last error.",
    "CLIENTS",
    "    Connected clients: id, address, age, commands, pinned.",
    "L1 STATS",
    "    Near cache: hits, misses, fills, discarded fills, invalidations, evictions, bytes, entries.",
    "L1 FLUSH",
    "    Drop every near-cache entry.",
    "CONFIG GET <pattern>",
    "    Configuration values (glob pattern on dotted names; secrets masked).",
    "CONFIG SET <key> <value>",
    "    Change a runtime-reloadable key.",
    "CONFIG RELOAD",
    "    Re-read the configuration file (as SIGHUP does).",
    "SECURITY",
    "    TLS, AUTH and upstream security status, with recommendations (admin).",
    "HELP",
    "    This help.",
];

/// Whether an `INFO [section ...]` request should include the proxy section.
pub fn info_wants_proxy(sections: &[Bytes]) -> bool {
    sections.is_empty()
        || sections.iter().any(|s| {
            let s = s.to_ascii_lowercase();
            s == b"proxy" || s == b"all" || s == b"everything" || s == b"default"
        })
}

/// The `# Proxy` INFO section.
pub fn proxy_info(sh: &Shared) -> String {
    let mut s = String::from("# Proxy\r\n");
    let cfg = sh.config();
    let _ = write!(s, "proxy_version:{}\r\n", env!("CARGO_PKG_VERSION"));
    let _ = write!(
        s,
        "proxy_uptime_in_seconds:{}\r\n",
        sh.started.elapsed().as_secs()
    );
    let _ = write!(s, "proxy_listen:{}\r\n", sh.listen_addr);
    if let Some(t) = sh.tls_addr {
        let _ = write!(s, "proxy_tls_listen:{t}\r\n");
    }
    let _ = write!(
        s,
        "proxy_auth:{}\r\n",
        if sh.auth.enabled() { "required" } else { "off" }
    );
    let _ = write!(s, "proxy_connected_clients:{}\r\n", sh.clients.len());
    let _ = write!(
        s,
        "proxy_total_connections:{}\r\n",
        sh.metrics.clients_total.load(Ordering::Relaxed)
    );
    let _ = write!(
        s,
        "proxy_rejected_connections:{}\r\n",
        sh.metrics.rejected.load(Ordering::Relaxed)
    );
    let _ = write!(
        s,
        "proxy_total_commands:{}\r\n",
        sh.metrics.total_commands()
    );
    let _ = write!(
        s,
        "proxy_bytes_in:{}\r\n",
        sh.metrics.bytes_in.load(Ordering::Relaxed)
    );
    let _ = write!(
        s,
        "proxy_bytes_out:{}\r\n",
        sh.metrics.bytes_out.load(Ordering::Relaxed)
    );
    match &sh.backend {
        Backend::Upstream(u) => {
            let h = &u.health;
            let _ = write!(s, "proxy_backend:upstream\r\n");
            let _ = write!(s, "upstream_addr:{}\r\n", u.url.redacted());
            let _ = write!(s, "upstream_up:{}\r\n", h.up.load(Ordering::Relaxed) as u8);
            let _ = write!(
                s,
                "upstream_shared_connections:{}\r\n",
                h.connected.load(Ordering::Relaxed)
            );
            let _ = write!(
                s,
                "upstream_reconnects:{}\r\n",
                h.reconnects.load(Ordering::Relaxed)
            );
        }
        Backend::Local(_) => {
            let _ = write!(s, "proxy_backend:local\r\n");
        }
    }
    match &sh.l1 {
        Some(l1) => {
            for (k, v) in l1.render() {
                let _ = write!(s, "l1_{k}:{v}\r\n");
            }
        }
        None => {
            let _ = write!(s, "l1_mode:off\r\n");
        }
    }
    let _ = write!(
        s,
        "compression_enabled:{}\r\n",
        cfg.compression.enabled as u8
    );
    for (k, v) in sh.metrics.compression.render() {
        let _ = write!(s, "compression_{k}:{v}\r\n");
    }
    s
}

/// Appends the proxy section to an INFO reply from Redis (bulk or
/// verbatim), keeping its frame type.
pub fn append_proxy_info(reply: &Bytes, sh: &Shared) -> Bytes {
    let Some(text) = resp::bulk_payload(reply) else {
        return reply.clone();
    };
    let mut t = text.to_vec();
    if !t.is_empty() && !t.ends_with(b"\r\n\r\n") {
        if !t.ends_with(b"\r\n") {
            t.extend_from_slice(b"\r\n");
        }
        t.extend_from_slice(b"\r\n");
    }
    t.extend_from_slice(proxy_info(sh).as_bytes());
    let mut out = BytesMut::with_capacity(t.len() + 32);
    resp::verbatim_txt(&mut out, &t, reply.first() == Some(&b'='));
    out.freeze()
}

fn kv_reply(out: &mut BytesMut, pairs: &[(String, String)], resp3: bool) {
    resp::map_header(out, pairs.len(), resp3);
    for (k, v) in pairs {
        resp::bulk(out, k.as_bytes());
        resp::bulk(out, v.as_bytes());
    }
}

fn lines_reply(out: &mut BytesMut, text: &str, resp3: bool) {
    resp::verbatim_txt(out, text.as_bytes(), resp3);
}

/// Redis-style glob for CONFIG GET patterns.
pub fn glob(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

/// Executes `PROXY <sub> ...`.
pub fn proxy_command(sh: &Shared, args: &[Bytes], resp3: bool, out: &mut BytesMut) {
    let sub = args
        .get(1)
        .map(|a| a.to_ascii_uppercase())
        .unwrap_or_default();
    let arg = |i: usize| args.get(i).map(|a| String::from_utf8_lossy(a).into_owned());
    match (&sub[..], args.len()) {
        (b"HELP", 2) => {
            resp::array_header(out, HELP.len());
            for l in HELP {
                resp::simple(out, l);
            }
        }
        (b"INFO", 2) => lines_reply(out, &proxy_info(sh), resp3),
        (b"STATS", 2) => {
            let mut pairs = vec![
                (
                    "total_commands".to_string(),
                    sh.metrics.total_commands().to_string(),
                ),
                (
                    "connected_clients".to_string(),
                    sh.clients.len().to_string(),
                ),
                (
                    "bytes_in".to_string(),
                    sh.metrics.bytes_in.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "bytes_out".to_string(),
                    sh.metrics.bytes_out.load(Ordering::Relaxed).to_string(),
                ),
            ];
            for (k, v) in sh.metrics.compression.render() {
                pairs.push((format!("compression_{k}"), v));
            }
            let mut errs: Vec<(String, String)> = sh
                .metrics
                .errors
                .iter()
                .map(|e| (format!("errors:{}", e.key()), e.value().to_string()))
                .collect();
            errs.sort();
            pairs.extend(errs);
            for (name, calls, errors) in sh.metrics.command_counts() {
                pairs.push((
                    format!("cmd:{}", name.to_ascii_lowercase()),
                    format!("calls={calls},errors={errors}"),
                ));
            }
            kv_reply(out, &pairs, resp3);
        }
        (b"UPSTREAM", 2) => {
            let pairs = match &sh.backend {
                Backend::Upstream(u) => {
                    let h = &u.health;
                    let since = h
                        .last_change
                        .lock()
                        .unwrap()
                        .map(|t| t.elapsed().as_secs().to_string())
                        .unwrap_or_else(|| "-".into());
                    vec![
                        ("addr".to_string(), u.url.redacted()),
                        (
                            "status".to_string(),
                            if h.up.load(Ordering::Relaxed) {
                                "up"
                            } else {
                                "down"
                            }
                            .to_string(),
                        ),
                        ("version".to_string(), h.version.lock().unwrap().clone()),
                        (
                            "shared_connections".to_string(),
                            h.connected.load(Ordering::Relaxed).to_string(),
                        ),
                        (
                            "reconnects".to_string(),
                            h.reconnects.load(Ordering::Relaxed).to_string(),
                        ),
                        ("seconds_since_change".to_string(), since),
                        (
                            "last_error".to_string(),
                            h.last_error.lock().unwrap().clone(),
                        ),
                    ]
                }
                Backend::Local(_) => vec![(
                    "status".to_string(),
                    "local (in-process store, no Redis)".to_string(),
                )],
            };
            kv_reply(out, &pairs, resp3);
        }
        (b"CLIENTS", 2) => {
            let mut rows: Vec<String> = sh
                .clients
                .iter()
                .map(|c| {
                    format!(
                        "id={} addr={} age={} cmds={} pinned={}",
                        c.id,
                        c.addr,
                        c.since.elapsed().as_secs(),
                        c.commands.load(Ordering::Relaxed),
                        c.pinned.load(Ordering::Relaxed) as u8
                    )
                })
                .collect();
            rows.sort();
            let mut text = rows.join("\n");
            text.push('\n');
            lines_reply(out, &text, resp3);
        }
        (b"CONFIG", _) => config_command(sh, args, resp3, out),
        (b"SECURITY", 2) => lines_reply(out, &crate::check::report(sh), resp3),
        (b"L1", 3) => {
            let sub = args[2].to_ascii_uppercase();
            match (&sub[..], &sh.l1) {
                (b"STATS", Some(l1)) => kv_reply(out, &l1.render(), resp3),
                (b"STATS", None) => kv_reply(out, &[("mode".into(), "off".into())], resp3),
                (b"FLUSH", Some(l1)) => {
                    l1.flush();
                    resp::simple(out, "OK");
                }
                (b"FLUSH", None) => resp::simple(out, "OK"),
                _ => resp::error(out, "ERR syntax: PROXY L1 STATS | FLUSH"),
            }
        }
        (b"", _) => resp::error(out, "ERR wrong number of arguments for 'proxy' command"),
        _ => resp::error(
            out,
            &format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try PROXY HELP.",
                arg(1).unwrap_or_default()
            ),
        ),
    }
}

fn config_command(sh: &Shared, args: &[Bytes], resp3: bool, out: &mut BytesMut) {
    let sub = args
        .get(2)
        .map(|a| a.to_ascii_uppercase())
        .unwrap_or_default();
    match (&sub[..], args.len()) {
        (b"GET", 4) => {
            let pat = args[3].to_ascii_lowercase();
            let pairs: Vec<(String, String)> = sh
                .config()
                .flat()
                .into_iter()
                .filter(|(k, _)| glob(&pat, k.as_bytes()))
                .collect();
            kv_reply(out, &pairs, resp3);
        }
        (b"SET", 5) => {
            let key = String::from_utf8_lossy(&args[3]).to_ascii_lowercase();
            let val = String::from_utf8_lossy(&args[4]).into_owned();
            if !RELOADABLE.contains(&key.as_str()) {
                resp::error(
                    out,
                    &format!(
                        "ERR config key '{key}' cannot be changed at runtime (reloadable: {})",
                        RELOADABLE.join(", ")
                    ),
                );
                return;
            }
            match with_override(&sh.config(), &key, &val) {
                Ok(c) => {
                    sh.reload(c);
                    resp::simple(out, "OK");
                }
                Err(e) => resp::error(out, &format!("ERR {e}")),
            }
        }
        (b"RELOAD", 3) => match reload_from_file(sh) {
            Ok(restart) if restart.is_empty() => resp::simple(out, "OK"),
            Ok(restart) => resp::simple(
                out,
                &format!(
                    "OK (changes to {} take effect after a restart)",
                    restart.join(", ")
                ),
            ),
            Err(e) => resp::error(
                out,
                &format!("ERR reload failed, configuration unchanged: {e}"),
            ),
        },
        _ => resp::error(
            out,
            "ERR syntax: PROXY CONFIG GET <pattern> | SET <key> <value> | RELOAD",
        ),
    }
}

/// A copy of `cfg` with one key changed, validated.
fn with_override(cfg: &Config, key: &str, val: &str) -> Result<Config, String> {
    let mut table: toml::Table = toml::from_str(&toml::to_string(cfg).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    crate::config::set_path(&mut table, key, val)?;
    let mut c: Config = serde::Deserialize::deserialize(toml::Value::Table(table))
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    c.meta = cfg.meta.clone();
    c.validate()?;
    Ok(c)
}

/// Re-reads the file (and environment) the proxy was started with. The CLI
/// `--set` overrides are kept by re-applying them.
pub fn reload_from_file(sh: &Shared) -> Result<Vec<String>, String> {
    let cur = sh.config();
    let new = Config::load(cur.meta.path.as_deref(), std::env::vars(), &cur.meta.sets)?;
    Ok(sh.reload(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"*", b"server.listen"));
        assert!(glob(b"server.*", b"server.listen"));
        assert!(!glob(b"server.*", b"upstream.url"));
        assert!(glob(b"*.max_?ulk_bytes", b"limits.max_bulk_bytes"));
    }

    #[test]
    fn info_sections() {
        assert!(info_wants_proxy(&[]));
        assert!(info_wants_proxy(&[Bytes::from_static(b"PROXY")]));
        assert!(!info_wants_proxy(&[Bytes::from_static(b"memory")]));
    }
}
