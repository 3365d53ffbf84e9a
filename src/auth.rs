//! Client authentication and authorization against the `[[users]]` of the
//! configuration.
//!
//! With no user configured nothing here applies (AUTH goes to Redis as
//! before). With users, a session must authenticate first (`AUTH [user]
//! pass`, `HELLO 3 AUTH user pass`), then every command is checked against
//! the user's role and key prefixes before it is dispatched. Passwords are
//! compared as SHA-256 digests in constant time; failures from one address
//! are answered after a delay that grows with each failure.

use crate::command::{self, Args, Class, Local, flags};
use crate::config::{Config, Role, UserConfig};
use bytes::Bytes;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

pub const NOAUTH: &str = "NOAUTH Authentication required.";
pub const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";
const HELLO_NOAUTH: &str = "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time";

/// Failure delay: doubles per failure from one address, capped.
const DELAY_MIN: Duration = Duration::from_millis(50);
const DELAY_MAX: Duration = Duration::from_secs(2);
/// Failures older than this are forgotten.
const FAIL_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct User {
    pub name: String,
    digest: [u8; 32],
    pub role: Role,
    pub key_prefixes: Vec<Vec<u8>>,
}

impl User {
    fn from_config(u: &UserConfig) -> User {
        let digest = if u.password_sha256.is_empty() {
            Sha256::digest(u.password.as_bytes()).into()
        } else {
            let mut d = [0u8; 32];
            // Validated as 64 hex digits when the configuration was loaded.
            hex::decode_to_slice(&u.password_sha256, &mut d).unwrap_or_default();
            d
        };
        User {
            name: u.name.clone(),
            digest,
            role: u.role,
            key_prefixes: u
                .key_prefixes
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect(),
        }
    }

    fn key_allowed(&self, key: &[u8]) -> bool {
        self.key_prefixes.is_empty() || self.key_prefixes.iter().any(|p| key.starts_with(p))
    }

    /// Every name the glob `pattern` matches is allowed: it starts with
    /// one of the prefixes taken literally.
    fn pattern_allowed(&self, pattern: &[u8]) -> bool {
        self.key_prefixes.is_empty()
            || self.key_prefixes.iter().any(|p| {
                pattern.starts_with(p) && !p.iter().any(|c| matches!(c, b'*' | b'?' | b'[' | b'\\'))
            })
    }
}

/// The users in force and the per-address failure counts.
#[derive(Default)]
pub struct Registry {
    users: RwLock<Arc<Vec<Arc<User>>>>,
    enabled: AtomicBool,
    generation: AtomicU64,
    failures: DashMap<IpAddr, (u32, Instant)>,
}

impl Registry {
    pub fn new(cfg: &Config) -> Registry {
        let r = Registry::default();
        r.apply(cfg);
        r
    }

    /// Installs the users of a (re)loaded configuration. Sessions pick the
    /// change up at their next command.
    pub fn apply(&self, cfg: &Config) {
        let users: Vec<Arc<User>> = cfg
            .users
            .iter()
            .map(|u| Arc::new(User::from_config(u)))
            .collect();
        self.enabled.store(!users.is_empty(), Ordering::Release);
        *self.users.write().unwrap() = Arc::new(users);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether clients must authenticate.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    fn find(&self, name: &[u8]) -> Option<Arc<User>> {
        self.users
            .read()
            .unwrap()
            .iter()
            .find(|u| u.name.as_bytes() == name)
            .cloned()
    }

    /// Checks a user name and password. The digest comparison runs (against
    /// a dummy) also for unknown users, so timing does not tell names apart.
    pub fn verify(&self, name: &[u8], password: &[u8]) -> Option<Arc<User>> {
        let digest: [u8; 32] = Sha256::digest(password).into();
        let user = self.find(name);
        let expected = user.as_ref().map(|u| u.digest).unwrap_or([0xa5; 32]);
        let ok: bool = digest.ct_eq(&expected).into();
        user.filter(|_| ok)
    }

    /// Records a failure and returns how long to wait before answering.
    fn failed(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let mut e = self.failures.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) > FAIL_WINDOW {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = now;
        let n = e.0;
        drop(e);
        if self.failures.len() > 100_000 {
            self.failures
                .retain(|_, v| now.duration_since(v.1) <= FAIL_WINDOW);
        }
        DELAY_MIN
            .saturating_mul(1 << (n - 1).min(10))
            .min(DELAY_MAX)
    }

    fn succeeded(&self, ip: IpAddr) {
        self.failures.remove(&ip);
    }

    /// Users configured with a plain-text password (for `PROXY SECURITY`).
    pub fn count(&self) -> usize {
        self.users.read().unwrap().len()
    }
}

/// One session's authentication state.
pub struct ClientAuth {
    user: Option<Arc<User>>,
    generation: u64,
    ip: IpAddr,
}

/// What the gate decided for one command.
pub enum Verdict {
    /// Dispatch as usual.
    Allow,
    /// Answer with this reply (after `delay`) instead of dispatching.
    Reply { reply: Bytes, delay: Duration },
}

fn err(msg: &str) -> Verdict {
    Verdict::Reply {
        reply: crate::resp::error_bytes(msg),
        delay: Duration::ZERO,
    }
}

impl ClientAuth {
    pub fn new(addr: &str) -> ClientAuth {
        let ip = addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        ClientAuth {
            user: None,
            generation: 0,
            ip,
        }
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_ref().map(|u| u.name.as_str())
    }

    /// The gate: call for every command when `reg.enabled()`.
    pub fn check<A: Args + ?Sized>(
        &mut self,
        reg: &Registry,
        args: &A,
        id: Option<usize>,
        class: Class,
    ) -> Verdict {
        // A reload may have changed or removed this session's user.
        let generation = reg.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.user = self.user.take().and_then(|u| reg.find(u.name.as_bytes()));
        }
        match class {
            Class::Local(Local::Auth) => return self.auth(reg, args),
            Class::Local(Local::Hello) => {
                if let Some(at) = (2..args.count())
                    .find(|&i| args.arg(i).is_some_and(|a| a.eq_ignore_ascii_case(b"AUTH")))
                {
                    let (Some(user), Some(pass)) = (args.arg(at + 1), args.arg(at + 2)) else {
                        return Verdict::Allow; // hello() reports the syntax error
                    };
                    return match self.login(reg, user, pass) {
                        Ok(()) => Verdict::Allow,
                        Err(v) => v,
                    };
                }
                return if self.user.is_some() {
                    Verdict::Allow
                } else {
                    err(HELLO_NOAUTH)
                };
            }
            Class::Local(Local::Quit) => return Verdict::Allow,
            // As in Redis: RESET returns to the default, unauthenticated state.
            // (RESET with arguments is not classed as RESET: Redis refuses it.)
            Class::Local(Local::Reset) => {
                self.user = None;
                return Verdict::Allow;
            }
            _ => {}
        }
        let Some(user) = self.user.clone() else {
            return err(NOAUTH);
        };
        authorize(&user, args, id, class)
    }

    fn auth<A: Args + ?Sized>(&mut self, reg: &Registry, args: &A) -> Verdict {
        let (user, pass) = match args.count() {
            2 => (&b"default"[..], args.arg(1).unwrap_or_default()),
            3 => (
                args.arg(1).unwrap_or_default(),
                args.arg(2).unwrap_or_default(),
            ),
            _ => return err("ERR wrong number of arguments for 'auth' command"),
        };
        match self.login(reg, user, pass) {
            Ok(()) => Verdict::Reply {
                reply: Bytes::from_static(b"+OK\r\n"),
                delay: Duration::ZERO,
            },
            Err(v) => v,
        }
    }

    fn login(&mut self, reg: &Registry, user: &[u8], pass: &[u8]) -> Result<(), Verdict> {
        match reg.verify(user, pass) {
            Some(u) => {
                reg.succeeded(self.ip);
                self.user = Some(u);
                Ok(())
            }
            None => {
                let delay = reg.failed(self.ip);
                tracing::warn!(client_ip = %self.ip, user = %String::from_utf8_lossy(user), "authentication failed");
                Err(Verdict::Reply {
                    reply: crate::resp::error_bytes(WRONGPASS),
                    delay,
                })
            }
        }
    }
}

/// PROXY subcommands any authenticated user may run (they change nothing
/// and reveal no configuration).
fn proxy_readonly<A: Args + ?Sized>(args: &A) -> bool {
    let sub = args.arg(1).unwrap_or_default().to_ascii_uppercase();
    match &sub[..] {
        b"HELP" | b"INFO" | b"STATS" | b"UPSTREAM" => true,
        b"L1" => args
            .arg(2)
            .is_some_and(|a| a.eq_ignore_ascii_case(b"STATS")),
        _ => false,
    }
}

/// AI.* subcommands that write.
fn ai_writes<A: Args + ?Sized>(args: &A) -> bool {
    let name = args.arg(0).unwrap_or_default().to_ascii_uppercase();
    matches!(&name[..], b"AI.SET" | b"AI.DEL" | b"AI.INVALIDATE")
}

fn noperm_cmd<A: Args + ?Sized>(user: &User, args: &A) -> Verdict {
    err(&format!(
        "NOPERM User {} has no permissions to run the '{}' command",
        user.name,
        String::from_utf8_lossy(args.arg(0).unwrap_or_default()).to_ascii_lowercase()
    ))
}

/// Role and key-prefix rules for an authenticated user.
fn authorize<A: Args + ?Sized>(user: &User, args: &A, id: Option<usize>, class: Class) -> Verdict {
    let admin = user.role == Role::Admin;
    if admin && user.key_prefixes.is_empty() {
        return Verdict::Allow;
    }
    match class {
        Class::Local(Local::Proxy) => {
            return if admin || proxy_readonly(args) {
                Verdict::Allow
            } else {
                noperm_cmd(user, args)
            };
        }
        Class::Local(Local::Ai) => {
            if user.role == Role::Readonly && ai_writes(args) {
                return noperm_cmd(user, args);
            }
            // AI keys all live under "ai_cache:".
            if !user.key_allowed(b"ai_cache:") {
                return err("NOPERM No permissions to access a key");
            }
            return Verdict::Allow;
        }
        _ => {}
    }
    let Some(spec) = id.and_then(command::spec) else {
        // Unknown (module?) commands: only unrestricted writers.
        return if user.role == Role::Readonly || !user.key_prefixes.is_empty() {
            noperm_cmd(user, args)
        } else {
            Verdict::Allow
        };
    };
    let base = spec.name.split('|').next().unwrap_or_default();
    if !admin && (spec.has(flags::ADMIN) || matches!(base, "FLUSHALL" | "FLUSHDB")) {
        return noperm_cmd(user, args);
    }
    if user.role == Role::Readonly
        && (id.is_some_and(command::may_write) || matches!(base, "PUBLISH" | "SPUBLISH"))
    {
        return noperm_cmd(user, args);
    }
    if !user.key_prefixes.is_empty() {
        if let Some(v) = channel_rules(user, args, spec.name) {
            return v;
        }
        // Commands that reach every key cannot be confined to prefixes.
        if matches!(base, "KEYS" | "SCAN" | "RANDOMKEY" | "FLUSHALL" | "FLUSHDB") {
            return noperm_cmd(user, args);
        }
        for i in command::key_positions(args, id) {
            if !args.arg(i).is_some_and(|k| user.key_allowed(k)) {
                return err("NOPERM No permissions to access a key");
            }
        }
    }
    Verdict::Allow
}

/// Pub/sub, MONITOR and tracking for a user confined to key prefixes: the
/// prefixes confine channel names too (keyspace notifications and
/// broadcast tracking would otherwise reveal other tenants' keys).
/// `None`: no channel rule applies, the key rules decide.
fn channel_rules<A: Args + ?Sized>(user: &User, args: &A, name: &str) -> Option<Verdict> {
    let denied = || Some(err("NOPERM No permissions to access a channel"));
    let all = |from: usize, pattern: bool| {
        (from..args.count()).all(|i| {
            args.arg(i).is_some_and(|c| {
                if pattern {
                    user.pattern_allowed(c)
                } else {
                    user.key_allowed(c)
                }
            })
        })
    };
    match name {
        "MONITOR" => Some(noperm_cmd(user, args)),
        "SUBSCRIBE" | "SSUBSCRIBE" | "PUBSUB|NUMSUB" | "PUBSUB|SHARDNUMSUB" => {
            let from = if name.starts_with("PUBSUB") { 2 } else { 1 };
            if all(from, false) {
                Some(Verdict::Allow)
            } else {
                denied()
            }
        }
        "PUBLISH" | "SPUBLISH" => {
            if args.arg(1).is_some_and(|c| user.key_allowed(c)) {
                Some(Verdict::Allow)
            } else {
                denied()
            }
        }
        "PSUBSCRIBE" => {
            if all(1, true) {
                Some(Verdict::Allow)
            } else {
                denied()
            }
        }
        "PUBSUB|CHANNELS" | "PUBSUB|SHARDCHANNELS" => {
            // Without a pattern these list every channel.
            if args.count() == 3 && all(2, true) {
                Some(Verdict::Allow)
            } else {
                denied()
            }
        }
        "CLIENT|TRACKING" => {
            // Broadcast mode reports every key under its PREFIX arguments
            // (all keys without one), whoever reads them.
            let mut bcast = false;
            let mut prefixes = Vec::new();
            let mut i = 3;
            while let Some(a) = args.arg(i) {
                if a.eq_ignore_ascii_case(b"BCAST") {
                    bcast = true;
                } else if a.eq_ignore_ascii_case(b"PREFIX") {
                    prefixes.push(args.arg(i + 1).unwrap_or_default());
                    i += 1;
                }
                i += 1;
            }
            if bcast && (prefixes.is_empty() || !prefixes.iter().all(|p| user.key_allowed(p))) {
                denied()
            } else {
                Some(Verdict::Allow)
            }
        }
        _ => None,
    }
}

/// Hex SHA-256 of a password, for `password_sha256`.
pub fn hash_password(p: &str) -> String {
    hex::encode(Sha256::digest(p.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        let cfg = Config::load(None, std::iter::empty(), &[]).unwrap();
        let mut cfg = cfg;
        cfg.users = vec![
            UserConfig {
                name: "default".into(),
                password_sha256: hash_password("pw"),
                password: String::new(),
                role: Role::Admin,
                key_prefixes: vec![],
            },
            UserConfig {
                name: "ro".into(),
                password_sha256: String::new(),
                password: "ropw".into(),
                role: Role::Readonly,
                key_prefixes: vec!["app:".into()],
            },
        ];
        Registry::new(&cfg)
    }

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|p| Bytes::copy_from_slice(p.as_bytes()))
            .collect()
    }

    fn run(a: &mut ClientAuth, r: &Registry, s: &str) -> String {
        let v = args(s);
        let id = command::lookup(&v);
        let class = command::classify(&v, id);
        match a.check(r, &v, id, class) {
            Verdict::Allow => "allow".into(),
            Verdict::Reply { reply, .. } => String::from_utf8_lossy(&reply).trim_end().to_string(),
        }
    }

    #[test]
    fn matrix() {
        let r = reg();
        assert!(r.enabled());
        let mut a = ClientAuth::new("10.0.0.1:5000");
        assert!(run(&mut a, &r, "GET x").starts_with("-NOAUTH"));
        assert!(run(&mut a, &r, "HELLO 3").starts_with("-NOAUTH"));
        assert_eq!(run(&mut a, &r, "QUIT"), "allow");
        assert!(run(&mut a, &r, "AUTH nope").starts_with("-WRONGPASS"));
        assert!(r.failed(a.ip) > DELAY_MIN);
        assert_eq!(run(&mut a, &r, "AUTH pw"), "+OK");
        assert_eq!(a.user(), Some("default"));
        assert_eq!(run(&mut a, &r, "FLUSHALL"), "allow");
        assert!(run(&mut a, &r, "AUTH ro wrong").starts_with("-WRONGPASS"));
        assert_eq!(
            a.user(),
            Some("default"),
            "a failed AUTH keeps the old user"
        );
        assert_eq!(run(&mut a, &r, "HELLO 3 AUTH ro ropw"), "allow");
        assert_eq!(a.user(), Some("ro"));
        assert_eq!(run(&mut a, &r, "GET app:1"), "allow");
        assert!(run(&mut a, &r, "GET other").starts_with("-NOPERM No permissions to access a key"));
        assert!(run(&mut a, &r, "MGET app:1 other").starts_with("-NOPERM"));
        assert!(run(&mut a, &r, "SET app:1 v").starts_with("-NOPERM User ro"));
        assert!(run(&mut a, &r, "CONFIG SET x y").starts_with("-NOPERM"));
        assert!(run(&mut a, &r, "FLUSHDB").starts_with("-NOPERM"));
        assert!(run(&mut a, &r, "KEYS *").starts_with("-NOPERM"));
        assert!(run(&mut a, &r, "PROXY CONFIG SET log.level info").starts_with("-NOPERM"));
        assert_eq!(run(&mut a, &r, "PROXY INFO"), "allow");
        assert!(run(&mut a, &r, "EVAL x 1 other").starts_with("-NOPERM"));
        assert_eq!(run(&mut a, &r, "RESET"), "allow");
        assert!(run(&mut a, &r, "GET app:1").starts_with("-NOAUTH"));
    }
}
