//! Configuration: one TOML file, overridden by `RESPITE_<SECTION>_<KEY>`
//! environment variables, then by `--set key=value` and the dedicated CLI
//! flags. Unknown keys are errors everywhere, so a typo never silently
//! leaves a default in force.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub limits: LimitsConfig,
    pub l1: L1Config,
    pub compression: CompressionConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub ai: crate::ai::AiConfig,
    /// Proxy users (`[[users]]`); when any exists, clients must AUTH.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserConfig>,
    #[serde(skip)]
    pub meta: Meta,
}

/// Facts about where the configuration came from, not settings.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// The file it was loaded from, for reloads.
    pub path: Option<PathBuf>,
    /// Whether any source named an upstream (file, env, flag). Only when none
    /// did may respite fall back to its in-process store.
    pub upstream_explicit: bool,
    /// The `--set` overrides (CLI flags included), re-applied on reload.
    pub sets: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_clients: usize,
    /// 0 disables, as Redis' `timeout 0`.
    pub idle_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
    /// Worker threads; 0 = automatic (one per CPU core, a single thread on
    /// two cores or fewer), 1 = a single-threaded runtime.
    pub threads: usize,
    /// A client that started a request must complete it (or keep sending at
    /// least 16 KiB per period) within this many ms; 0 disables.
    pub header_timeout_ms: u64,
    pub tls: ServerTlsConfig,
}

/// `[server.tls]`: a second listener that terminates TLS.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    /// Empty: no TLS listener.
    pub listen: String,
    pub cert_file: String,
    pub key_file: String,
    /// Non-empty: clients must present a certificate signed by this CA.
    pub client_ca_file: String,
    pub handshake_timeout_ms: u64,
}

impl Default for ServerTlsConfig {
    fn default() -> Self {
        ServerTlsConfig {
            listen: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            handshake_timeout_ms: 10_000,
        }
    }
}

/// `[upstream.tls]`: how respite verifies (and authenticates to) a
/// `rediss://` upstream.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsConfig {
    /// CA bundle to verify the upstream with; empty = the system's roots.
    pub ca_file: String,
    /// Client certificate and key for mTLS (both or neither).
    pub cert_file: String,
    pub key_file: String,
    /// Name to send as SNI and verify the certificate against; empty = host.
    pub server_name: String,
    /// Accept any certificate. For tests only: logs a loud warning.
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Readwrite,
    Readonly,
}

/// One `[[users]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Hex SHA-256 of the password (like Redis ACL `#<hash>`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password_sha256: String,
    /// Plain-text password: accepted, flagged by `respite check`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    pub role: Role,
    /// When non-empty, every key of every command must start with one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_prefixes: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads: 0,
            listen: "127.0.0.1:6380".into(),
            max_clients: 10_000,
            idle_timeout_ms: 0,
            shutdown_grace_ms: 10_000,
            header_timeout_ms: 30_000,
            tls: ServerTlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Never serve from the in-process store (unless no upstream was named
    /// anywhere and nothing answers at the default address).
    None,
    /// Always serve from the in-process store.
    Local,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub url: String,
    /// Shared, multiplexed connections per protocol version.
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    /// A request on a shared connection older than this fails the
    /// connection: it is what bounds the wait when Redis hangs.
    pub timeout_ms: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub fallback: Fallback,
    /// ACL user for upstream AUTH (the URL's user wins).
    pub user: String,
    /// Upstream AUTH password (the URL's password wins). Secret: masked.
    pub password: String,
    /// File holding the upstream password (first line), when `password` is empty.
    pub password_file: String,
    pub tls: UpstreamTlsConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "redis://127.0.0.1:6379".into(),
            pool_size: 2,
            connect_timeout_ms: 1000,
            timeout_ms: 10_000,
            reconnect_min_ms: 50,
            reconnect_max_ms: 5000,
            fallback: Fallback::None,
            user: String::new(),
            password: String::new(),
            password_file: String::new(),
            tls: UpstreamTlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_bulk_bytes: usize,
    pub max_multibulk_len: usize,
    pub max_inline_bytes: usize,
    /// Reply bytes a client may leave unread before it is disconnected.
    pub max_output_bytes: usize,
    /// Reply slots (batches of pipelined commands) queued per client before
    /// the proxy stops reading from it.
    pub max_pipeline: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_bulk_bytes: 512 * 1024 * 1024,
            max_multibulk_len: 1024 * 1024,
            max_inline_bytes: 64 * 1024,
            max_output_bytes: 256 * 1024 * 1024,
            max_pipeline: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum L1Mode {
    Tracking,
    Ttl,
    Off,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct L1Config {
    pub mode: L1Mode,
    pub max_bytes: u64,
    pub max_ttl_ms: u64,
    pub max_value_bytes: usize,
    /// Only keys matching one of these globs are cached.
    pub include: Vec<String>,
    /// Keys matching one of these globs are never cached.
    pub exclude: Vec<String>,
}

impl Default for L1Config {
    fn default() -> Self {
        L1Config {
            mode: L1Mode::Tracking,
            max_bytes: 256 << 20,
            max_ttl_ms: 60_000,
            max_value_bytes: 1 << 20,
            include: vec!["*".into()],
            exclude: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    pub enabled: bool,
    pub min_bytes: usize,
    /// Store compressed only when that saves at least this fraction.
    pub min_saving: f64,
    /// Largest original length a stored frame may declare (checked before
    /// allocating).
    pub max_decompressed_bytes: usize,
    /// Redis-style key globs that are never compressed.
    pub exclude: Vec<String>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: true,
            min_bytes: 1024,
            min_saving: 0.1,
            max_decompressed_bytes: 512 * 1024 * 1024,
            exclude: Vec::new(),
        }
    }
}

impl CompressionConfig {
    /// The stored-format codec for this policy.
    pub fn codec(&self) -> crate::compress::Codec {
        crate::compress::Codec {
            min_bytes: self.min_bytes,
            min_saving: self.min_saving,
            max_decompressed_bytes: self.max_decompressed_bytes,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Empty disables the endpoint.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9380".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: "info", "respite=debug", ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Plain,
        }
    }
}

/// Sections that may appear in `RESPITE_<SECTION>_<KEY>`, longest first so
/// `RESPITE_UPSTREAM_TLS_CA_FILE` is not read as upstream.tls_ca_file.
const ENV_SECTIONS: &[&str] = &[
    "upstream_tls",
    "server_tls",
    "compression",
    "upstream",
    "metrics",
    "limits",
    "server",
    "log",
    "l1",
    "ai",
];

/// Parsed upstream address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let u = url::Url::parse(s).map_err(|e| format!("invalid upstream URL: {e}"))?;
        let tls = match u.scheme() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(format!(
                    "invalid upstream URL: scheme '{other}' (use redis:// or rediss://)"
                ));
            }
        };
        let host = u
            .host_str()
            .ok_or("invalid upstream URL: no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = u.port().unwrap_or(6379);
        let dec = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let user = (!u.username().is_empty()).then(|| dec(u.username()));
        let password = u.password().map(dec);
        let path = u.path().trim_start_matches('/');
        let db = if path.is_empty() {
            0
        } else {
            path.parse()
                .map_err(|_| format!("invalid upstream URL: db '{path}' is not a number"))?
        };
        Ok(UpstreamUrl {
            tls,
            host,
            port,
            user,
            password,
            db,
        })
    }

    /// The address without credentials, safe for logs and INFO.
    pub fn redacted(&self) -> String {
        format!(
            "{}://{}{}:{}/{}",
            if self.tls { "rediss" } else { "redis" },
            if self.password.is_some() || self.user.is_some() {
                "***@"
            } else {
                ""
            },
            if self.host.contains(':') {
                format!("[{}]", self.host)
            } else {
                self.host.clone()
            },
            self.port,
            self.db
        )
    }
}

impl Config {
    pub fn upstream_url(&self) -> Result<UpstreamUrl, String> {
        UpstreamUrl::parse(&self.upstream.url)
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.server.idle_timeout_ms > 0)
            .then(|| Duration::from_millis(self.server.idle_timeout_ms))
    }

    /// Loads a configuration from all sources. `file`: optional TOML path;
    /// `env`: the process environment (passed in for tests); `sets`:
    /// `key=value` overrides in order.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Config, String> {
        let mut table = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read config {}: {e}", p.display()))?;
                text.parse::<toml::Table>()
                    .map_err(|e| format!("{}: {e}", p.display()))?
            }
            None => toml::Table::new(),
        };
        let mut explicit = table
            .get("upstream")
            .and_then(|u| u.as_table())
            .is_some_and(|u| u.contains_key("url"));
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("RESPITE_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let Some(section) = ENV_SECTIONS
                .iter()
                .find(|s| rest.starts_with(*s) && rest.as_bytes().get(s.len()) == Some(&b'_'))
            else {
                return Err(format!("environment variable {k}: unknown section"));
            };
            let key = format!(
                "{}.{}",
                section.replace('_', "."),
                &rest[section.len() + 1..]
            );
            explicit |= key == "upstream.url";
            set_path(&mut table, &key, &v).map_err(|e| format!("environment variable {k}: {e}"))?;
        }
        for s in sets {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| format!("--set {s}: expected KEY=VALUE"))?;
            explicit |= k.trim() == "upstream.url";
            set_path(&mut table, k.trim(), v).map_err(|e| format!("--set {s}: {e}"))?;
        }
        let mut cfg: Config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| format!("invalid configuration: {}", e.message()))?;
        cfg.meta = Meta {
            path: file.map(Path::to_path_buf),
            upstream_explicit: explicit,
            sets: sets.to_vec(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that deserialize fine but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        self.server
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("server.listen '{}': {e}", self.server.listen))?;
        if !self.metrics.listen.is_empty() {
            self.metrics
                .listen
                .parse::<SocketAddr>()
                .map_err(|e| format!("metrics.listen '{}': {e}", self.metrics.listen))?;
        }
        self.upstream_url()?;
        if self.upstream.pool_size == 0 || self.upstream.pool_size > 64 {
            return Err("upstream.pool_size must be between 1 and 64".into());
        }
        if self.upstream.reconnect_min_ms == 0
            || self.upstream.reconnect_max_ms < self.upstream.reconnect_min_ms
        {
            return Err("upstream.reconnect_min_ms must be > 0 and <= reconnect_max_ms".into());
        }
        if self.limits.max_pipeline == 0 {
            return Err("limits.max_pipeline must be > 0".into());
        }
        if self.l1.mode != L1Mode::Off && self.l1.max_bytes < 1024 {
            return Err("l1.max_bytes must be at least 1024".into());
        }
        if !(0.0..=1.0).contains(&self.compression.min_saving) {
            return Err("compression.min_saving must be between 0.0 and 1.0".into());
        }
        if self.compression.max_decompressed_bytes == 0 {
            return Err("compression.max_decompressed_bytes must be > 0".into());
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| format!("log.level '{}': {e}", self.log.level))?;
        self.validate_security()
    }

    /// Users, credentials and TLS material: every file is read and every
    /// certificate and key parsed, so a bad one fails at start-up, on reload
    /// and in `respite check`, never at the first client.
    fn validate_security(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for u in &self.users {
            if u.name.is_empty() {
                return Err("users: a user has an empty name".into());
            }
            if !names.insert(u.name.as_str()) {
                return Err(format!("users: '{}' is defined twice", u.name));
            }
            match (u.password.is_empty(), u.password_sha256.is_empty()) {
                (true, true) => {
                    return Err(format!(
                        "users.{}: needs password_sha256 (or password)",
                        u.name
                    ));
                }
                (false, false) => {
                    return Err(format!(
                        "users.{}: give password_sha256 or password, not both",
                        u.name
                    ));
                }
                _ => {}
            }
            if !u.password_sha256.is_empty()
                && (u.password_sha256.len() != 64
                    || !u.password_sha256.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(format!(
                    "users.{}: password_sha256 must be 64 hex digits",
                    u.name
                ));
            }
        }
        if !self.upstream.password_file.is_empty() {
            read_secret_file(&self.upstream.password_file)?;
        }
        crate::tls::validate(self)
    }

    /// Upstream user and password: from the URL, else `upstream.user`,
    /// `upstream.password` (or env), else `upstream.password_file`.
    pub fn upstream_credentials(&self) -> Result<(Option<String>, Option<String>), String> {
        let u = self.upstream_url()?;
        if u.password.is_some() {
            return Ok((u.user, u.password));
        }
        let user = u
            .user
            .or_else(|| (!self.upstream.user.is_empty()).then(|| self.upstream.user.clone()));
        let password = if !self.upstream.password.is_empty() {
            Some(self.upstream.password.clone())
        } else if !self.upstream.password_file.is_empty() {
            Some(read_secret_file(&self.upstream.password_file)?)
        } else {
            None
        };
        Ok((user, password))
    }

    /// The configuration as TOML, with secrets masked.
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        if !c.upstream.password.is_empty() {
            c.upstream.password = "***".into();
        }
        for u in &mut c.users {
            if !u.password.is_empty() {
                u.password = "***".into();
            }
            if !u.password_sha256.is_empty() {
                u.password_sha256 = "***".into();
            }
        }
        if let Ok(u) = self.upstream_url()
            && (u.password.is_some() || u.user.is_some())
        {
            c.upstream.url = u.redacted();
        }
        toml::to_string(&c).unwrap_or_default()
    }

    /// Flattened `key = value` pairs for `PROXY CONFIG GET` (secrets masked).
    pub fn flat(&self) -> Vec<(String, String)> {
        let v: toml::Table = toml::from_str(&self.redacted_toml()).unwrap_or_default();
        let mut out = Vec::new();
        flatten("", &toml::Value::Table(v), &mut out);
        out
    }
}

/// The first line of a secret file, without its line ending.
pub fn read_secret_file(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read password file {path}: {e}"))?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        toml::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Sets a dotted key in a TOML table. The value is read as a TOML literal
/// when it is one (numbers, booleans, arrays, quoted strings), else as a bare
/// string, so `--set l1.mode=off` and `--set server.max_clients=5` both work.
pub fn set_path(table: &mut toml::Table, key: &str, raw: &str) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("invalid key '{key}'"));
    }
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("'{p}' in '{key}' is not a section"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, String> {
        let dir = std::env::temp_dir().join(format!(
            "respite-cfg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&dir, toml).unwrap();
        let r = Config::load(
            Some(&dir),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
            &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        std::fs::remove_file(&dir).ok();
        r
    }

    #[test]
    fn defaults_match_design() {
        let c = Config::load(None, std::iter::empty(), &[]).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:6380");
        assert_eq!(c.upstream.url, "redis://127.0.0.1:6379");
        assert_eq!(c.metrics.listen, "127.0.0.1:9380");
        assert!(!c.meta.upstream_explicit);
    }

    #[test]
    fn precedence_file_env_set() {
        let c = load(
            "[server]\nmax_clients = 5\n[upstream]\npool_size = 3\n",
            &[
                ("RESPITE_SERVER_MAX_CLIENTS", "6"),
                ("RESPITE_LIMITS_MAX_BULK_BYTES", "100"),
            ],
            &["server.max_clients=7", "log.format=json"],
        )
        .unwrap();
        assert_eq!(c.server.max_clients, 7);
        assert_eq!(c.upstream.pool_size, 3);
        assert_eq!(c.limits.max_bulk_bytes, 100);
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(!c.meta.upstream_explicit);
        let c = load(
            "",
            &[("RESPITE_UPSTREAM_URL", "redis://127.0.0.1:7000")],
            &[],
        )
        .unwrap();
        assert!(c.meta.upstream_explicit);
        assert_eq!(c.upstream_url().unwrap().port, 7000);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(
            load("[server]\nlisten_addr = 'x'\n", &[], &[])
                .unwrap_err()
                .contains("listen_addr")
        );
        assert!(load("bogus = 1\n", &[], &[]).is_err());
        assert!(load("", &[], &["server.nope=1"]).is_err());
        assert!(load("", &[("RESPITE_NOPE_X", "1")], &[]).is_err());
        assert!(load("", &[], &["server.listen=notanaddr"]).is_err());
        assert!(load("", &[], &["upstream.url=http://x"]).is_err());
        assert!(load("", &[], &["upstream.pool_size=0"]).is_err());
        assert!(load("", &[], &["noequals"]).is_err());
        assert!(load("[server\n", &[], &[]).is_err());
        assert!(load("", &[], &["l1.mode=bogus"]).is_err());
    }

    #[test]
    fn urls() {
        let u = UpstreamUrl::parse("rediss://app:p%40ss@10.0.0.1:6390/3").unwrap();
        assert_eq!(
            u,
            UpstreamUrl {
                tls: true,
                host: "10.0.0.1".into(),
                port: 6390,
                user: Some("app".into()),
                password: Some("p@ss".into()),
                db: 3
            }
        );
        assert_eq!(u.redacted(), "rediss://***@10.0.0.1:6390/3");
        let u = UpstreamUrl::parse("redis://:secret@[::1]").unwrap();
        assert_eq!(
            (u.user, u.password.as_deref(), u.port, u.host.as_str()),
            (None, Some("secret"), 6379, "::1")
        );
        assert!(UpstreamUrl::parse("redis://h/x").is_err());
    }

    #[test]
    fn shipped_config_is_valid_and_shows_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/respite.toml");
        let shipped = Config::load(Some(&path), std::iter::empty(), &[]).unwrap();
        let defaults = Config::load(None, std::iter::empty(), &[]).unwrap();
        assert_eq!(shipped.flat(), defaults.flat());
        // Every key of the configuration appears in the shipped file.
        let text = std::fs::read_to_string(&path).unwrap();
        for (k, _) in defaults.flat() {
            let leaf = k.rsplit('.').next().unwrap();
            assert!(
                text.contains(&format!("\n{leaf} = ")),
                "conf/respite.toml lacks {k}"
            );
        }
    }

    #[test]
    fn secrets_are_masked() {
        let c = load("", &[], &["upstream.url=redis://u:hunter2@127.0.0.1:6379"]).unwrap();
        let flat = c.flat();
        assert!(flat.iter().all(|(_, v)| !v.contains("hunter2")), "{flat:?}");
        assert!(!c.redacted_toml().contains("hunter2"));
        let c = load(
            "[upstream]\npassword = 'hunter2'\n[[users]]\nname = 'a'\npassword = 'hunter2'\nrole = 'admin'\n",
            &[],
            &[],
        )
        .unwrap();
        assert!(!c.redacted_toml().contains("hunter2"));
        assert!(c.flat().iter().all(|(_, v)| !v.contains("hunter2")));
        assert_eq!(
            c.upstream_credentials().unwrap(),
            (None, Some("hunter2".to_string()))
        );
    }

    #[test]
    fn users_and_env_sections() {
        let c = load(
            "[[users]]\nname = 'ro'\npassword_sha256 = '5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8'\nrole = 'readonly'\nkey_prefixes = ['app:']\n",
            &[
                ("RESPITE_UPSTREAM_URL", "rediss://10.0.0.1:6379"),
                ("RESPITE_UPSTREAM_TLS_SERVER_NAME", "redis.internal"),
                ("RESPITE_UPSTREAM_PASSWORD", "pw"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.users[0].role, Role::Readonly);
        assert_eq!(c.upstream.tls.server_name, "redis.internal");
        assert_eq!(c.upstream.password, "pw");
        assert!(load("[[users]]\nname = 'x'\nrole = 'admin'\n", &[], &[]).is_err());
        assert!(
            load(
                "[[users]]\nname = 'x'\npassword_sha256 = 'zz'\nrole = 'admin'\n",
                &[],
                &[]
            )
            .is_err()
        );
        assert!(
            load(
                "[[users]]\nname = 'x'\npassword = 'p'\nrole = 'root'\n",
                &[],
                &[]
            )
            .is_err()
        );
        assert!(
            load(
                "[[users]]\nname = 'x'\npassword = 'p'\nrole = 'admin'\nextra = 1\n",
                &[],
                &[]
            )
            .is_err()
        );
        assert!(load("", &[], &["server.tls.listen=127.0.0.1:0"]).is_err());
        assert!(load("", &[], &["upstream.password_file=/nonexistent/pw"]).is_err());
    }
}
