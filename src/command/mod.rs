//! Command classification from one static table.
//!
//! `table.rs` is generated from Redis 7.0's own `COMMAND` reply (name, arity,
//! flags, key positions), so key positions and flags are Redis' and not a
//! hand-maintained copy. What the proxy does with a command (its [`Class`]) is
//! decided here from those flags plus a short list of commands whose effect on
//! the connection makes sharing an upstream connection wrong.

mod table;

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::LazyLock;

/// Command flags as Redis reports them in `COMMAND`.
pub mod flags {
    pub const WRITE: u32 = 1 << 0;
    pub const READONLY: u32 = 1 << 1;
    pub const DENYOOM: u32 = 1 << 2;
    pub const ADMIN: u32 = 1 << 3;
    pub const PUBSUB: u32 = 1 << 4;
    pub const NOSCRIPT: u32 = 1 << 5;
    pub const BLOCKING: u32 = 1 << 6;
    pub const LOADING: u32 = 1 << 7;
    pub const STALE: u32 = 1 << 8;
    pub const SKIP_MONITOR: u32 = 1 << 9;
    pub const FAST: u32 = 1 << 10;
    pub const NO_AUTH: u32 = 1 << 11;
    pub const MAY_REPLICATE: u32 = 1 << 12;
    pub const MOVABLEKEYS: u32 = 1 << 13;
    pub const NO_MULTI: u32 = 1 << 14;
    pub const ALLOW_BUSY: u32 = 1 << 15;
}

/// One row of the command table. Subcommands are named `PARENT|SUB`.
#[derive(Debug)]
pub struct Spec {
    pub name: &'static str,
    pub arity: i32,
    pub flags: u32,
    pub first: i32,
    pub last: i32,
    pub step: i32,
}

impl Spec {
    pub fn has(&self, f: u32) -> bool {
        self.flags & f != 0
    }
}

/// What the session does with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Forwarded as raw bytes over a shared upstream connection.
    Pass,
    /// Needs a dedicated upstream connection from now on (transactions,
    /// blocking commands, per-connection state).
    Pin,
    /// The connection stops being request/response (pub/sub, MONITOR,
    /// tracking pushes, CLIENT REPLY): the session becomes a byte tunnel to a
    /// dedicated upstream connection.
    Tunnel,
    /// Answered or steered by the proxy itself.
    Local(Local),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    Quit,
    Hello,
    Auth,
    Select,
    Reset,
    Info,
    Proxy,
    Ai,
    /// CLIENT GETNAME: the shared connections' name is the proxy's, not
    /// the client's.
    GetName,
}

/// FNV-1a: command names are short and trusted-shaped, and SipHash showed
/// up at ~3.5% of the proxy's CPU in pipelined benchmarks.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf29ce484222325
        } else {
            self.0
        };
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        self.0 = h;
    }
}

type FnvBuild = std::hash::BuildHasherDefault<Fnv>;

static INDEX: LazyLock<HashMap<&'static [u8], usize, FnvBuild>> = LazyLock::new(|| {
    table::SPECS
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_bytes(), i))
        .collect()
});

/// Whether a row has `PARENT|SUB` rows under it, by id. Only those rows
/// need the second lookup with the first argument appended: without this,
/// every GET also upper-cased and hashed "GET|<key>", about half of what
/// finding a command cost.
static PARENTS: LazyLock<Vec<bool>> = LazyLock::new(|| {
    let mut parents = vec![false; table::SPECS.len()];
    for s in table::SPECS {
        if let Some((parent, _)) = s.name.split_once('|')
            && let Some(&i) = INDEX.get(parent.as_bytes())
        {
            parents[i] = true;
        }
    }
    parents
});

/// Number of rows in the table; command ids are `0..count()`, and
/// `count()` itself stands for "unknown command".
pub fn count() -> usize {
    table::SPECS.len()
}

pub fn spec(id: usize) -> Option<&'static Spec> {
    table::SPECS.get(id)
}

/// Name used in metrics for a command id.
pub fn name(id: usize) -> &'static str {
    table::SPECS.get(id).map(|s| s.name).unwrap_or("UNKNOWN")
}

/// Upper-cases into a stack buffer; `None` when longer than any command name.
fn upper<'b>(name: &[u8], buf: &'b mut [u8; 48]) -> Option<&'b [u8]> {
    if name.len() > buf.len() {
        return None;
    }
    for (d, s) in buf.iter_mut().zip(name) {
        *d = s.to_ascii_uppercase();
    }
    Some(&buf[..name.len()])
}

/// Read access to a request's arguments, so classification works on the
/// parser's byte ranges without building a `Vec<Bytes>` per command.
pub trait Args {
    fn count(&self) -> usize;
    fn arg(&self, i: usize) -> Option<&[u8]>;
}

impl Args for [Bytes] {
    fn count(&self) -> usize {
        self.len()
    }
    fn arg(&self, i: usize) -> Option<&[u8]> {
        self.get(i).map(|b| &b[..])
    }
}

impl Args for Vec<Bytes> {
    fn count(&self) -> usize {
        self.len()
    }
    fn arg(&self, i: usize) -> Option<&[u8]> {
        self.get(i).map(|b| &b[..])
    }
}

/// Arguments as ranges into the bytes of one request.
pub struct RawArgs<'a> {
    pub buf: &'a [u8],
    pub ranges: &'a [std::ops::Range<usize>],
}

impl Args for RawArgs<'_> {
    fn count(&self) -> usize {
        self.ranges.len()
    }
    fn arg(&self, i: usize) -> Option<&[u8]> {
        self.ranges.get(i).map(|r| &self.buf[r.clone()])
    }
}

/// Finds the table row of a command (and of its subcommand where the table
/// has one, e.g. `CLIENT|SETNAME`).
pub fn lookup<A: Args + ?Sized>(args: &A) -> Option<usize> {
    let mut buf = [0u8; 48];
    let name = upper(args.arg(0)?, &mut buf)?;
    let id = *INDEX.get(name)?;
    if PARENTS[id]
        && let Some(sub) = args.arg(1)
    {
        let n = name.len();
        if n + 1 + sub.len() <= 48 {
            let mut full = [0u8; 48];
            full[..n].copy_from_slice(&name[..n]);
            full[n] = b'|';
            for (d, s) in full[n + 1..].iter_mut().zip(sub.iter()) {
                *d = s.to_ascii_uppercase();
            }
            if let Some(&sid) = INDEX.get(&full[..n + 1 + sub.len()]) {
                return Some(sid);
            }
        }
    }
    Some(id)
}

fn eq_upper(a: &[u8], upper: &[u8]) -> bool {
    a.len() == upper.len()
        && a.iter()
            .zip(upper)
            .all(|(x, y)| x.to_ascii_uppercase() == *y)
}

/// Classifies a request. `id` is the result of [`lookup`].
pub fn classify<A: Args + ?Sized>(args: &A, id: Option<usize>) -> Class {
    let Some(first) = args.arg(0) else {
        return Class::Pass;
    };
    if first.len() > 3 && eq_upper(&first[..3], b"AI.") {
        return Class::Local(Local::Ai);
    }
    let Some(spec) = id.and_then(spec) else {
        if eq_upper(first, b"PROXY") {
            return Class::Local(Local::Proxy);
        }
        return Class::Pass;
    };
    match spec.name {
        "QUIT" => Class::Local(Local::Quit),
        "HELLO" => Class::Local(Local::Hello),
        "AUTH" => Class::Local(Local::Auth),
        "SELECT" => Class::Local(Local::Select),
        // With arguments these are Redis' arity error, which Redis words.
        "RESET" if args.count() == 1 => Class::Local(Local::Reset),
        "INFO" => Class::Local(Local::Info),
        // WAIT blocks its connection although Redis does not flag it blocking.
        "MULTI" | "WATCH" | "WAIT" | "WAITAOF" => Class::Pin,
        "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" | "MONITOR" | "SYNC" | "PSYNC" => Class::Tunnel,
        "CLIENT|TRACKING" | "CLIENT|REPLY" => Class::Tunnel,
        // Connection state that must live on a connection of the client's own.
        "CLIENT|GETNAME" if args.count() == 2 => Class::Local(Local::GetName),
        "CLIENT|SETNAME" | "CLIENT|NO-EVICT" | "CLIENT|NO-TOUCH" | "CLIENT|CACHING"
        | "READONLY" | "READWRITE" | "ASKING" => Class::Pin,
        "XREAD" | "XREADGROUP" => {
            if (1..args.count()).any(|i| args.arg(i).is_some_and(|a| eq_upper(a, b"BLOCK"))) {
                Class::Pin
            } else {
                Class::Pass
            }
        }
        _ if spec.has(flags::BLOCKING) => Class::Pin,
        _ => Class::Pass,
    }
}

/// The keys of a request, using the table's positions and Redis' own rules
/// for the commands whose keys move with their arguments.
pub fn keys(args: &[Bytes], id: Option<usize>) -> Vec<&Bytes> {
    key_positions(args, id)
        .into_iter()
        .map(|i| &args[i])
        .collect()
}

/// Argument indices of the keys of a request.
pub fn key_positions<A: Args + ?Sized>(args: &A, id: Option<usize>) -> Vec<usize> {
    let Some(spec) = id.and_then(spec) else {
        return Vec::new();
    };
    let argc = args.count() as i64;
    if spec.has(flags::MOVABLEKEYS) {
        return movable_keys(spec.name, args);
    }
    if spec.first <= 0 {
        return Vec::new();
    }
    let last = if spec.last < 0 {
        argc + spec.last as i64
    } else {
        spec.last as i64
    };
    let step = spec.step.max(1) as i64;
    let mut out = Vec::new();
    let mut i = spec.first as i64;
    while i <= last && i < argc {
        out.push(i as usize);
        i += step;
    }
    out
}

/// `before` fixed keys after the name, then a count at `at` and that many keys.
fn numkeys_at<A: Args + ?Sized>(args: &A, at: usize, before: usize) -> Vec<usize> {
    let mut out: Vec<usize> = (1..=before).filter(|&i| i < args.count()).collect();
    if let Some(n) = args.arg(at).and_then(crate::resp::parse_int) {
        let n = n.max(0) as usize;
        out.extend((at + 1..args.count()).take(n));
    }
    out
}

fn find<A: Args + ?Sized>(args: &A, word: &[u8]) -> Option<usize> {
    (1..args.count()).find(|&i| args.arg(i).is_some_and(|a| eq_upper(a, word)))
}

fn movable_keys<A: Args + ?Sized>(name: &str, args: &A) -> Vec<usize> {
    let n = args.count();
    match name {
        "EVAL" | "EVALSHA" | "EVAL_RO" | "EVALSHA_RO" | "FCALL" | "FCALL_RO" => {
            numkeys_at(args, 2, 0)
        }
        "ZUNIONSTORE" | "ZINTERSTORE" | "ZDIFFSTORE" => numkeys_at(args, 2, 1),
        "ZUNION" | "ZINTER" | "ZDIFF" | "ZINTERCARD" | "SINTERCARD" | "LMPOP" | "ZMPOP" => {
            numkeys_at(args, 1, 0)
        }
        "BLMPOP" | "BZMPOP" => numkeys_at(args, 2, 0),
        "XREAD" | "XREADGROUP" => match find(args, b"STREAMS") {
            Some(p) => (p + 1..p + 1 + (n - p - 1) / 2).collect(),
            None => Vec::new(),
        },
        "SORT" | "SORT_RO" => {
            let mut out: Vec<usize> = (n > 1).then_some(1).into_iter().collect();
            out.extend(find(args, b"STORE").map(|p| p + 1).filter(|&i| i < n));
            out
        }
        "MIGRATE" => match find(args, b"KEYS") {
            Some(p) => (p + 1..n).collect(),
            None => (n > 3 && args.arg(3).is_some_and(|k| !k.is_empty()))
                .then_some(3)
                .into_iter()
                .collect(),
        },
        "GEORADIUS" | "GEORADIUSBYMEMBER" => {
            let mut out: Vec<usize> = (n > 1).then_some(1).into_iter().collect();
            for i in 1..n {
                if args
                    .arg(i)
                    .is_some_and(|a| eq_upper(a, b"STORE") || eq_upper(a, b"STOREDIST"))
                    && i + 1 < n
                {
                    out.push(i + 1);
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

/// The id of a command by its upper-case name.
pub fn id_of(name: &str) -> Option<usize> {
    INDEX.get(name.as_bytes()).copied()
}

/// Whether a command may change the keys it names (for L1 invalidation):
/// writes, and scripts, which Redis does not flag as writes.
pub fn may_write(id: usize) -> bool {
    spec(id).is_some_and(|s| s.has(flags::WRITE) || matches!(s.name, "EVAL" | "EVALSHA" | "FCALL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(parts: &[&str]) -> Vec<Bytes> {
        parts
            .iter()
            .map(|p| Bytes::copy_from_slice(p.as_bytes()))
            .collect()
    }

    fn class(parts: &[&str]) -> Class {
        let args = a(parts);
        classify(&args, lookup(&args))
    }

    #[test]
    fn table_is_redis_7() {
        assert!(count() >= 240, "table has {} rows", count());
        let args = a(&["get", "k"]);
        let s = spec(lookup(&args).unwrap()).unwrap();
        assert_eq!(
            (s.name, s.arity, s.first, s.last, s.step),
            ("GET", 2, 1, 1, 1)
        );
        assert!(s.has(flags::READONLY) && s.has(flags::FAST));
        let args = a(&["client", "setname", "x"]);
        assert_eq!(name(lookup(&args).unwrap()), "CLIENT|SETNAME");
        // An unknown subcommand falls back to the container.
        let args = a(&["client", "nosuch"]);
        assert_eq!(name(lookup(&args).unwrap()), "CLIENT");
        assert_eq!(lookup(&a(&["nosuchcmd"])), None);
        assert_eq!(lookup(&a(&[&"x".repeat(100)])), None);
        // Every subcommand row is reachable from its container (the
        // second lookup is only tried for containers).
        for (id, s) in table::SPECS.iter().enumerate() {
            if let Some((parent, sub)) = s.name.split_once('|') {
                let args = a(&[&parent.to_lowercase(), &sub.to_lowercase(), "x"]);
                assert_eq!(lookup(&args), Some(id), "{}", s.name);
            }
        }
    }

    #[test]
    fn classes() {
        assert_eq!(class(&["GET", "k"]), Class::Pass);
        assert_eq!(class(&["set", "k", "v"]), Class::Pass);
        assert_eq!(class(&["multi"]), Class::Pin);
        assert_eq!(class(&["WATCH", "k"]), Class::Pin);
        assert_eq!(class(&["blpop", "k", "0"]), Class::Pin);
        assert_eq!(class(&["BZPOPMIN", "k", "0"]), Class::Pin);
        assert_eq!(class(&["wait", "0", "0"]), Class::Pin);
        assert_eq!(
            class(&["xread", "count", "1", "streams", "s", "0"]),
            Class::Pass
        );
        assert_eq!(
            class(&["xread", "block", "0", "streams", "s", "0"]),
            Class::Pin
        );
        assert_eq!(class(&["subscribe", "c"]), Class::Tunnel);
        assert_eq!(class(&["psubscribe", "c*"]), Class::Tunnel);
        assert_eq!(class(&["monitor"]), Class::Tunnel);
        assert_eq!(class(&["client", "tracking", "on"]), Class::Tunnel);
        assert_eq!(class(&["client", "setname", "n"]), Class::Pin);
        assert_eq!(class(&["client", "list"]), Class::Pass);
        assert_eq!(class(&["select", "1"]), Class::Local(Local::Select));
        assert_eq!(class(&["hello", "3"]), Class::Local(Local::Hello));
        assert_eq!(class(&["proxy", "info"]), Class::Local(Local::Proxy));
        assert_eq!(class(&["ai.get", "x"]), Class::Local(Local::Ai));
        assert_eq!(class(&["quit"]), Class::Local(Local::Quit));
        assert_eq!(class(&["reset"]), Class::Local(Local::Reset));
        assert_eq!(class(&["reset", "x"]), Class::Pass);
        assert_eq!(class(&["client", "getname"]), Class::Local(Local::GetName));
        assert_eq!(class(&["client", "getname", "x"]), Class::Pass);
        assert_eq!(class(&["nosuch"]), Class::Pass);
    }

    #[test]
    fn key_positions() {
        let k = |parts: &[&str]| -> Vec<String> {
            let args = a(parts);
            keys(&args, lookup(&args))
                .into_iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect()
        };
        assert_eq!(k(&["GET", "a"]), ["a"]);
        assert_eq!(k(&["MSET", "a", "1", "b", "2"]), ["a", "b"]);
        assert_eq!(k(&["MGET", "a", "b", "c"]), ["a", "b", "c"]);
        assert_eq!(k(&["DEL", "a", "b"]), ["a", "b"]);
        assert_eq!(k(&["BLPOP", "a", "b", "0"]), ["a", "b"]);
        assert_eq!(k(&["EVAL", "s", "2", "a", "b", "x"]), ["a", "b"]);
        assert_eq!(k(&["ZUNIONSTORE", "d", "2", "a", "b"]), ["d", "a", "b"]);
        assert_eq!(
            k(&["XREAD", "COUNT", "1", "STREAMS", "s1", "s2", "0", "0"]),
            ["s1", "s2"]
        );
        assert_eq!(k(&["SORT", "l", "STORE", "d"]), ["l", "d"]);
        assert_eq!(k(&["PING"]), Vec::<String>::new());
        assert_eq!(k(&["nosuch", "a"]), Vec::<String>::new());
    }
}
