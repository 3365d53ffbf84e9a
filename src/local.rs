//! In-process store for "local mode": serves the string/key subset of Redis when no
//! Redis server is available. Replies are meant to be byte-identical to Redis 7.0, so
//! parsing quirks (C-string option matching, `string2ll`, `strtold`, `stringmatchlen`)
//! are reproduced deliberately rather than "fixed".

use bytes::{BufMut, Bytes, BytesMut};
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Command names grouped by Redis arity (negative: at least that many arguments).
#[rustfmt::skip]
const COMMANDS: &[(i32, &[&str])] = &[
    (1, &["DBSIZE", "RANDOMKEY"]),
    (2, &["GET", "GETDEL", "STRLEN", "INCR", "DECR", "TYPE", "PERSIST", "TTL", "PTTL",
          "EXPIRETIME", "PEXPIRETIME", "KEYS", "ECHO"]),
    (3, &["SETNX", "GETSET", "APPEND", "INCRBY", "DECRBY", "INCRBYFLOAT", "RENAME", "RENAMENX"]),
    (4, &["SETEX", "PSETEX"]),
    (-1, &["FLUSHDB", "FLUSHALL", "PING"]),
    (-2, &["GETEX", "MGET", "DEL", "UNLINK", "EXISTS", "SCAN"]),
    (-3, &["SET", "MSET", "MSETNX", "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT"]),
];

const NOT_INT: &str = "value is not an integer or out of range";
const NOT_FLOAT: &str = "value is not a valid float";
const SYNTAX: &str = "syntax error";
/// Redis' default proto-max-bulk-len, which caps APPEND results.
const MAX_STRING: usize = 512 * 1024 * 1024;
/// Bounds the work of one `sweep_expired` call per database so a mass expiry cannot
/// stall clients; lazy expiry hides whatever is left until the next sweep.
const SWEEP_LIMIT: usize = 20_000;

// Flags of Redis' parseExtendedStringArgumentsOrReply (SET and GETEX options).
const NX: u32 = 1;
const XX: u32 = 2;
const GET: u32 = 4;
const KEEPTTL: u32 = 8;
const PERSIST: u32 = 16;
const EX: u32 = 32;
const PX: u32 = 64;
const EXAT: u32 = 128;
const PXAT: u32 = 256;
const TIMED: u32 = EX | PX | EXAT | PXAT;

struct Entry {
    value: Bytes,
    /// Absolute unix time in milliseconds, as Redis stores it.
    expires_at: Option<i64>,
}

struct Db {
    map: HashMap<Bytes, Entry>,
    /// Keys ordered by a per-store random hash: SCAN cursors are positions in this order,
    /// so a key present for a whole scan is always returned, whatever else changes.
    order: BTreeSet<(u64, Bytes)>,
    /// Deadline index so active expiry does not have to walk every key.
    expiring: BTreeSet<(i64, Bytes)>,
    hasher: RandomState,
    /// RANDOMKEY draws: hashing a counter with the random keys is a good enough RNG.
    draws: u64,
}

impl Db {
    fn new(hasher: RandomState) -> Self {
        Db {
            map: HashMap::new(),
            order: BTreeSet::new(),
            expiring: BTreeSet::new(),
            hasher,
            draws: 0,
        }
    }

    /// Scan position of a key; two bits are dropped so `slot + 1` (the cursor) never
    /// overflows and stays positive when Redis-style code reads it as a signed number.
    fn slot(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key) >> 2
    }

    fn expire_if_needed(&mut self, key: &[u8], now: i64) {
        // Redis treats a key as expired only once `now > when` (keyIsExpired).
        if self
            .map
            .get(key)
            .is_some_and(|e| e.expires_at.is_some_and(|t| now > t))
        {
            self.remove(key);
        }
    }

    fn get(&mut self, key: &[u8], now: i64) -> Option<&Entry> {
        self.expire_if_needed(key, now);
        self.map.get(key)
    }

    fn value(&mut self, key: &[u8], now: i64) -> Option<Bytes> {
        self.get(key, now).map(|e| e.value.clone())
    }

    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let (k, e) = self.map.remove_entry(key)?;
        if let Some(t) = e.expires_at {
            self.expiring.remove(&(t, k.clone()));
        }
        let slot = self.slot(&k);
        self.order.remove(&(slot, k));
        Some(e)
    }

    /// Stores a value; the TTL survives only with `keep_ttl`, as in Redis' setKey.
    fn set(&mut self, key: &[u8], value: Bytes, keep_ttl: bool, now: i64) {
        self.expire_if_needed(key, now);
        if !keep_ttl {
            self.set_expiry(key, None);
        }
        if let Some(e) = self.map.get_mut(key) {
            e.value = value;
            return;
        }
        // Copy so a key never pins the caller's (possibly much larger) read buffer.
        let k = Bytes::copy_from_slice(key);
        self.order.insert((self.slot(&k), k.clone()));
        self.map.insert(
            k,
            Entry {
                value,
                expires_at: None,
            },
        );
    }

    fn set_expiry(&mut self, key: &[u8], at: Option<i64>) {
        let Some((k, e)) = self.map.get_key_value(key) else {
            return;
        };
        if e.expires_at == at {
            return;
        }
        let k = k.clone();
        if let Some(t) = e.expires_at {
            self.expiring.remove(&(t, k.clone()));
        }
        if let Some(t) = at {
            self.expiring.insert((t, k.clone()));
        }
        if let Some(e) = self.map.get_mut(&k) {
            e.expires_at = at;
        }
    }

    fn purge_expired(&mut self, now: i64, limit: usize) -> usize {
        let mut removed = 0;
        while removed < limit {
            match self.expiring.first() {
                Some((t, k)) if *t < now => {
                    let k = k.clone();
                    self.remove(&k);
                    removed += 1;
                }
                _ => break,
            }
        }
        removed
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.expiring.clear();
    }
}

/// The local-mode keyspace: `databases` independent databases, each behind its own lock.
pub struct LocalStore {
    dbs: Vec<Mutex<Db>>,
}

impl LocalStore {
    pub fn new(databases: usize) -> Self {
        let hasher = RandomState::new();
        LocalStore {
            dbs: (0..databases.max(1))
                .map(|_| Mutex::new(Db::new(hasher.clone())))
                .collect(),
        }
    }

    /// Whether `name` (any case) is served locally; everything else is the caller's job.
    pub fn supports(name_upper: &[u8]) -> bool {
        command(name_upper).is_some()
    }

    /// Removes keys whose TTL has passed (bounded per database per call); returns how many.
    pub fn sweep_expired(&self) -> usize {
        let now = now_ms();
        self.dbs
            .iter()
            .map(|db| lock(db).purge_expired(now, SWEEP_LIMIT))
            .sum()
    }

    /// Executes one command (`args[0]` is the name, any case) and appends its RESP reply.
    /// Like Redis with an empty multibulk, an empty `args` produces no reply at all.
    pub fn execute(&self, db: usize, args: &[Bytes], resp3: bool, out: &mut BytesMut) {
        let Some(first) = args.first() else {
            return;
        };
        let Some((name, arity)) = command(first) else {
            return unknown_command(args, out);
        };
        let argc = args.len();
        if (arity > 0 && argc != arity as usize) || argc < arity.unsigned_abs() as usize {
            return arity_error(name, out);
        }
        match name {
            "PING" => match argc {
                1 => out.put_slice(b"+PONG\r\n"),
                2 => bulk(out, &args[1]),
                _ => arity_error(name, out),
            },
            "ECHO" => bulk(out, &args[1]),
            "FLUSHALL" => {
                if flush_option_ok(args, out) {
                    self.dbs.iter().for_each(|d| lock(d).clear());
                    ok(out);
                }
            }
            _ => {
                let Some(db) = self.dbs.get(db) else {
                    return err(out, "DB index is out of range");
                };
                let mut guard = lock(db);
                let mut cx = Cx {
                    db: &mut guard,
                    now: now_ms(),
                    r3: resp3,
                    out,
                };
                cx.run(name, args);
            }
        }
    }
}

fn command(name: &[u8]) -> Option<(&'static str, i32)> {
    COMMANDS.iter().find_map(|&(arity, names)| {
        let found = names
            .iter()
            .find(|n| n.as_bytes().eq_ignore_ascii_case(name));
        found.map(|&n| (n, arity))
    })
}

fn lock(db: &Mutex<Db>) -> MutexGuard<'_, Db> {
    // A poisoned lock only means an earlier command panicked; the maps are still
    // memory-safe, and taking all of local mode down over it would be worse.
    db.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Redis compares options with strcasecmp on NUL-terminated strings, so an embedded NUL
/// ends the option early ("nx\0junk" is NX).
fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

fn is_opt(arg: &[u8], name: &str) -> bool {
    cstr(arg).eq_ignore_ascii_case(name.as_bytes())
}

// ---- reply encoding -------------------------------------------------------------

fn ok(out: &mut BytesMut) {
    out.put_slice(b"+OK\r\n");
}

fn err(out: &mut BytesMut, msg: &str) {
    err_bytes(out, msg.as_bytes());
}

/// Mirrors addReplyErrorFormat: user text may not break the protocol line.
fn err_bytes(out: &mut BytesMut, msg: &[u8]) {
    let start = msg.iter().position(|c| !b"\r\n".contains(c));
    let end = msg.iter().rposition(|c| !b"\r\n".contains(c));
    let msg = match (start, end) {
        (Some(s), Some(e)) => &msg[s..=e],
        _ => &[],
    };
    out.put_slice(b"-ERR ");
    out.extend(
        msg.iter()
            .map(|&c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
    );
    out.put_slice(b"\r\n");
}

fn arity_error(name: &str, out: &mut BytesMut) {
    let msg = format!(
        "wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    );
    err(out, &msg);
}

fn unknown_command(args: &[Bytes], out: &mut BytesMut) {
    let name = cstr(&args[0]);
    let mut msg = b"unknown command '".to_vec();
    msg.extend_from_slice(&name[..name.len().min(128)]);
    msg.extend_from_slice(b"', with args beginning with: ");
    let mut listed = Vec::new();
    for a in &args[1..] {
        if listed.len() >= 128 {
            break;
        }
        let a = cstr(a);
        let room = 128 - listed.len();
        listed.push(b'\'');
        listed.extend_from_slice(&a[..a.len().min(room)]);
        listed.extend_from_slice(b"' ");
    }
    msg.extend_from_slice(&listed);
    err_bytes(out, &msg);
}

fn int(out: &mut BytesMut, v: i64) {
    out.put_slice(format!(":{v}\r\n").as_bytes());
}

fn bulk(out: &mut BytesMut, v: &[u8]) {
    out.put_slice(format!("${}\r\n", v.len()).as_bytes());
    out.put_slice(v);
    out.put_slice(b"\r\n");
}

fn null(out: &mut BytesMut, r3: bool) {
    out.put_slice(if r3 { b"_\r\n" } else { b"$-1\r\n" });
}

fn array(out: &mut BytesMut, n: usize) {
    out.put_slice(format!("*{n}\r\n").as_bytes());
}

fn flush_option_ok(args: &[Bytes], out: &mut BytesMut) -> bool {
    let valid = match args.len() {
        1 => true,
        2 => is_opt(&args[1], "SYNC") || is_opt(&args[1], "ASYNC"),
        _ => false,
    };
    if !valid {
        err(out, SYNTAX);
    }
    valid
}

/// Redis' string2ll: no spaces, no '+', no leading zeros, at most 20 bytes.
fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    if !matches!(digits.first(), Some(b'1'..=b'9')) || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// SCAN's cursor goes through strtoul: a sign is accepted ("-1" wraps), an empty
/// string is cursor 0, whitespace and overflow are rejected.
fn parse_cursor(raw: &[u8]) -> Option<u64> {
    let s = cstr(raw);
    if s.is_empty() {
        return Some(0);
    }
    let (neg, digits) = split_sign(s);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(if neg { v.wrapping_neg() } else { v })
}

/// One optional leading '+' or '-', as the C library parsers accept.
fn split_sign(s: &[u8]) -> (bool, &[u8]) {
    match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    }
}

// ---- command execution ----------------------------------------------------------

struct Cx<'a> {
    db: &'a mut Db,
    now: i64,
    r3: bool,
    out: &'a mut BytesMut,
}

impl Cx<'_> {
    fn run(&mut self, name: &str, a: &[Bytes]) {
        match name {
            "GET" => self.get_reply(&a[1]),
            "SET" => match parse_ext_args(a, true) {
                Some((flags, exp)) => self.set_generic(flags, &a[1], &a[2], exp, "set", false),
                None => err(self.out, SYNTAX),
            },
            "SETNX" => self.set_generic(NX, &a[1], &a[2], None, "setnx", true),
            "SETEX" => self.set_generic(EX, &a[1], &a[3], Some(&a[2]), "setex", false),
            "PSETEX" => self.set_generic(PX, &a[1], &a[3], Some(&a[2]), "psetex", false),
            "GETSET" => {
                self.get_reply(&a[1]);
                self.db.set(&a[1], copy(&a[2]), false, self.now);
            }
            "GETDEL" => {
                self.get_reply(&a[1]);
                self.db.remove(&a[1]);
            }
            "GETEX" => self.getex(a),
            "MGET" => {
                array(self.out, a.len() - 1);
                for k in &a[1..] {
                    self.get_reply(k);
                }
            }
            "MSET" | "MSETNX" => self.mset(a, name == "MSETNX"),
            "APPEND" => self.append(&a[1], &a[2]),
            "STRLEN" => {
                let n = self.db.get(&a[1], self.now).map_or(0, |e| e.value.len());
                int(self.out, n as i64);
            }
            "INCR" => self.incr_by(&a[1], 1),
            "DECR" => self.incr_by(&a[1], -1),
            "INCRBY" | "DECRBY" => match parse_i64(&a[2]) {
                None => err(self.out, NOT_INT),
                Some(i64::MIN) if name == "DECRBY" => err(self.out, "decrement would overflow"),
                Some(n) => self.incr_by(&a[1], if name == "DECRBY" { -n } else { n }),
            },
            "INCRBYFLOAT" => self.incr_by_float(&a[1], &a[2]),
            "DEL" | "UNLINK" => {
                let n = a[1..]
                    .iter()
                    .filter(|k| {
                        self.db.expire_if_needed(k, self.now);
                        self.db.remove(k).is_some()
                    })
                    .count();
                int(self.out, n as i64);
            }
            "EXISTS" => {
                let n = a[1..]
                    .iter()
                    .filter(|k| self.db.get(k, self.now).is_some())
                    .count();
                int(self.out, n as i64);
            }
            "TYPE" => match self.db.get(&a[1], self.now) {
                Some(_) => self.out.put_slice(b"+string\r\n"),
                None => self.out.put_slice(b"+none\r\n"),
            },
            "EXPIRE" => self.expire(a, self.now, true, "expire"),
            "PEXPIRE" => self.expire(a, self.now, false, "pexpire"),
            "EXPIREAT" => self.expire(a, 0, true, "expireat"),
            "PEXPIREAT" => self.expire(a, 0, false, "pexpireat"),
            "PERSIST" => {
                let had = self
                    .db
                    .get(&a[1], self.now)
                    .is_some_and(|e| e.expires_at.is_some());
                if had {
                    self.db.set_expiry(&a[1], None);
                }
                int(self.out, i64::from(had));
            }
            "TTL" => self.ttl(&a[1], false, false),
            "PTTL" => self.ttl(&a[1], true, false),
            "EXPIRETIME" => self.ttl(&a[1], false, true),
            "PEXPIRETIME" => self.ttl(&a[1], true, true),
            "RENAME" => self.rename(&a[1], &a[2], false),
            "RENAMENX" => self.rename(&a[1], &a[2], true),
            "KEYS" => self.keys(&a[1]),
            "SCAN" => self.scan(a),
            "DBSIZE" => {
                // Unlike Redis, logically expired keys awaiting reclamation are not counted.
                self.db.purge_expired(self.now, usize::MAX);
                int(self.out, self.db.map.len() as i64);
            }
            "FLUSHDB" => {
                if flush_option_ok(a, self.out) {
                    self.db.clear();
                    ok(self.out);
                }
            }
            "RANDOMKEY" => self.random_key(),
            _ => unreachable!("command table and dispatch disagree on {name}"),
        }
    }

    fn get_reply(&mut self, key: &[u8]) {
        match self.db.get(key, self.now) {
            Some(e) => bulk(self.out, &e.value),
            None => null(self.out, self.r3),
        }
    }

    /// getExpireMillisecondsOrReply: the absolute deadline in ms, Err after an error reply.
    fn deadline(&mut self, raw: Option<&[u8]>, flags: u32, cmd: &str) -> Result<Option<i64>, ()> {
        let Some(raw) = raw else { return Ok(None) };
        let Some(v) = parse_i64(raw) else {
            err(self.out, NOT_INT);
            return Err(());
        };
        let secs = flags & (EX | EXAT) != 0;
        let ms = match v {
            ..=0 => None,
            _ if secs && v > i64::MAX / 1000 => None,
            _ if flags & (EX | PX) != 0 => (if secs { v * 1000 } else { v }).checked_add(self.now),
            _ => Some(if secs { v * 1000 } else { v }),
        };
        if ms.is_none() {
            err(self.out, &format!("invalid expire time in '{cmd}' command"));
        }
        ms.map(Some).ok_or(())
    }

    /// SETNX answers 1/0 where SET answers OK/nil.
    fn outcome(&mut self, int_reply: bool, done: bool) {
        match (int_reply, done) {
            (true, _) => int(self.out, i64::from(done)),
            (false, true) => ok(self.out),
            (false, false) => null(self.out, self.r3),
        }
    }

    fn set_generic(
        &mut self,
        flags: u32,
        key: &[u8],
        val: &[u8],
        expire: Option<&[u8]>,
        cmd: &str,
        int_reply: bool,
    ) {
        let Ok(deadline) = self.deadline(expire, flags, cmd) else {
            return;
        };
        let found = self.db.get(key, self.now).is_some();
        if flags & GET != 0 {
            self.get_reply(key);
        }
        if (flags & NX != 0 && found) || (flags & XX != 0 && !found) {
            if flags & GET == 0 {
                self.outcome(int_reply, false);
            }
            return;
        }
        self.db.set(key, copy(val), flags & KEEPTTL != 0, self.now);
        if deadline.is_some() {
            // Redis stores even a deadline already in the past; lookups then expire it.
            self.db.set_expiry(key, deadline);
        }
        if flags & GET == 0 {
            self.outcome(int_reply, true);
        }
    }

    fn getex(&mut self, a: &[Bytes]) {
        let Some((flags, exp)) = parse_ext_args(a, false) else {
            return err(self.out, SYNTAX);
        };
        // Redis looks the key up before validating the expire value.
        let Some(v) = self.db.value(&a[1], self.now) else {
            return null(self.out, self.r3);
        };
        let Ok(deadline) = self.deadline(exp, flags, "getex") else {
            return;
        };
        bulk(self.out, &v);
        match deadline {
            Some(ms) if flags & (EXAT | PXAT) != 0 && ms <= self.now => {
                self.db.remove(&a[1]);
            }
            Some(ms) => self.db.set_expiry(&a[1], Some(ms)),
            None if flags & PERSIST != 0 => self.db.set_expiry(&a[1], None),
            None => {}
        }
    }

    fn mset(&mut self, a: &[Bytes], nx: bool) {
        if a.len().is_multiple_of(2) {
            return arity_error(if nx { "msetnx" } else { "mset" }, self.out);
        }
        if nx {
            for pair in a[1..].chunks(2) {
                if self.db.get(&pair[0], self.now).is_some() {
                    return int(self.out, 0);
                }
            }
        }
        for pair in a[1..].chunks(2) {
            self.db.set(&pair[0], copy(&pair[1]), false, self.now);
        }
        if nx { int(self.out, 1) } else { ok(self.out) }
    }

    fn append(&mut self, key: &[u8], add: &[u8]) {
        let Some(old) = self.db.value(key, self.now) else {
            self.db.set(key, copy(add), false, self.now);
            return int(self.out, add.len() as i64);
        };
        if old.len() + add.len() > MAX_STRING {
            return err(
                self.out,
                "string exceeds maximum allowed size (proto-max-bulk-len)",
            );
        }
        let mut v = BytesMut::with_capacity(old.len() + add.len());
        v.put_slice(&old);
        v.put_slice(add);
        let len = v.len();
        self.db.set(key, v.freeze(), true, self.now);
        int(self.out, len as i64);
    }

    fn incr_by(&mut self, key: &[u8], by: i64) {
        let cur = match self.db.get(key, self.now) {
            None => 0,
            Some(e) => match parse_i64(&e.value) {
                Some(v) => v,
                None => return err(self.out, NOT_INT),
            },
        };
        let Some(v) = cur.checked_add(by) else {
            return err(self.out, "increment or decrement would overflow");
        };
        self.db.set(key, Bytes::from(v.to_string()), true, self.now);
        int(self.out, v);
    }

    fn incr_by_float(&mut self, key: &[u8], by: &[u8]) {
        let cur = match self.db.get(key, self.now) {
            None => Some(Ld::Finite(Ext::ZERO)),
            Some(e) => parse_ld(&e.value),
        };
        let (Some(cur), Some(by)) = (cur, parse_ld(by)) else {
            return err(self.out, NOT_FLOAT);
        };
        let sum = match (cur, by) {
            (Ld::Finite(x), Ld::Finite(y)) => x.add(y),
            _ => None,
        };
        let Some(sum) = sum else {
            return err(self.out, "increment would produce NaN or Infinity");
        };
        let text = Bytes::from(sum.to_human());
        bulk(self.out, &text);
        self.db.set(key, text, true, self.now);
    }

    fn expire(&mut self, a: &[Bytes], base: i64, secs: bool, cmd: &str) {
        let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
        for opt in &a[3..] {
            let flag = match cstr(opt).to_ascii_uppercase().as_slice() {
                b"NX" => &mut nx,
                b"XX" => &mut xx,
                b"GT" => &mut gt,
                b"LT" => &mut lt,
                _ => {
                    let mut msg = b"Unsupported option ".to_vec();
                    msg.extend_from_slice(cstr(opt));
                    return err_bytes(self.out, &msg);
                }
            };
            *flag = true;
        }
        if nx && (xx || gt || lt) {
            return err(
                self.out,
                "NX and XX, GT or LT options at the same time are not compatible",
            );
        }
        if gt && lt {
            return err(
                self.out,
                "GT and LT options at the same time are not compatible",
            );
        }
        let Some(mut when) = parse_i64(&a[2]) else {
            return err(self.out, NOT_INT);
        };
        let invalid = format!("invalid expire time in '{cmd}' command");
        if secs {
            if !(i64::MIN / 1000..=i64::MAX / 1000).contains(&when) {
                return err(self.out, &invalid);
            }
            when *= 1000;
        }
        let Some(when) = when.checked_add(base) else {
            return err(self.out, &invalid);
        };
        let Some(current) = self.db.get(&a[1], self.now).map(|e| e.expires_at) else {
            return int(self.out, 0);
        };
        let refused = (nx && current.is_some())
            || (xx && current.is_none())
            || (gt && current.is_none_or(|c| when <= c))
            || (lt && current.is_some_and(|c| when >= c));
        if refused {
            return int(self.out, 0);
        }
        if when <= self.now {
            self.db.remove(&a[1]);
        } else {
            self.db.set_expiry(&a[1], Some(when));
        }
        int(self.out, 1);
    }

    fn ttl(&mut self, key: &[u8], ms: bool, absolute: bool) {
        let Some(e) = self.db.get(key, self.now) else {
            return int(self.out, -2);
        };
        let v = match e.expires_at {
            None => -1,
            Some(t) => {
                let t = if absolute { t } else { t - self.now }.max(0);
                // Widened because Redis rounds deadlines near i64::MAX without wrapping.
                if ms {
                    t
                } else {
                    ((i128::from(t) + 500) / 1000) as i64
                }
            }
        };
        int(self.out, v);
    }

    fn rename(&mut self, from: &[u8], to: &[u8], nx: bool) {
        let Some(src) = self.db.get(from, self.now) else {
            return err(self.out, "no such key");
        };
        let (value, expires_at) = (src.value.clone(), src.expires_at);
        if from == to {
            return if nx { int(self.out, 0) } else { ok(self.out) };
        }
        if self.db.get(to, self.now).is_some() {
            if nx {
                return int(self.out, 0);
            }
            self.db.remove(to);
        }
        self.db.remove(from);
        self.db.set(to, value, false, self.now);
        self.db.set_expiry(to, expires_at);
        if nx { int(self.out, 1) } else { ok(self.out) }
    }

    fn keys(&mut self, pattern: &[u8]) {
        let all = pattern == b"*";
        let now = self.now;
        let found: Vec<&Bytes> = self
            .db
            .map
            .iter()
            .filter(|(k, e)| {
                e.expires_at.is_none_or(|t| now <= t) && (all || glob_match(pattern, k))
            })
            .map(|(k, _)| k)
            .collect();
        array(self.out, found.len());
        for k in found {
            bulk(self.out, k);
        }
    }

    fn scan(&mut self, a: &[Bytes]) {
        let Some(cursor) = parse_cursor(&a[1]) else {
            return err(self.out, "invalid cursor");
        };
        let (mut count, mut pattern, mut type_name) = (10usize, None, None);
        let mut i = 2;
        while i < a.len() {
            let has_value = a.len() - i >= 2;
            if is_opt(&a[i], "count") && has_value {
                match parse_i64(&a[i + 1]) {
                    None => return err(self.out, NOT_INT),
                    Some(n) if n < 1 => return err(self.out, SYNTAX),
                    Some(n) => count = usize::try_from(n).unwrap_or(usize::MAX),
                }
            } else if is_opt(&a[i], "match") && has_value {
                pattern = Some(&a[i + 1][..]).filter(|p| *p != b"*");
            } else if is_opt(&a[i], "type") && has_value {
                type_name = Some(cstr(&a[i + 1]));
            } else {
                return err(self.out, SYNTAX);
            }
            i += 2;
        }
        // Cursor 0 starts the scan; any other cursor is "slot + 1" of the next key due.
        let start = cursor.saturating_sub(1);
        let mut picked = Vec::new();
        let mut last_slot = None;
        let mut next = 0;
        for (slot, key) in self.db.order.range((start, Bytes::new())..) {
            // Keys sharing a slot are returned together so a cursor never splits them.
            if picked.len() >= count && last_slot != Some(*slot) {
                next = slot + 1;
                break;
            }
            last_slot = Some(*slot);
            picked.push(key.clone());
        }
        let wrong_type = type_name.is_some_and(|t| !t.eq_ignore_ascii_case(b"string"));
        picked.retain(|k| {
            let keep = !wrong_type && pattern.is_none_or(|p| glob_match(p, k));
            keep && self.db.get(k, self.now).is_some()
        });
        array(self.out, 2);
        bulk(self.out, next.to_string().as_bytes());
        array(self.out, picked.len());
        for k in &picked {
            bulk(self.out, k);
        }
    }

    fn random_key(&mut self) {
        loop {
            self.db.draws += 1;
            let r = self.db.hasher.hash_one(self.db.draws) >> 2;
            let hit = self
                .db
                .order
                .range((r, Bytes::new())..)
                .next()
                .or_else(|| self.db.order.first())
                .map(|(_, k)| k.clone());
            let Some(key) = hit else {
                return null(self.out, self.r3);
            };
            // Expired keys are reclaimed and another one drawn, as dbRandomKey does.
            if self.db.get(&key, self.now).is_some() {
                return bulk(self.out, &key);
            }
        }
    }
}

fn copy(b: &[u8]) -> Bytes {
    Bytes::copy_from_slice(b)
}

/// parseExtendedStringArgumentsOrReply for SET (`set`) and GETEX: flags plus the raw
/// expire argument, or None for "syntax error". Repeating the same expire option is
/// allowed (the last one wins), mixing different ones is not.
fn parse_ext_args(a: &[Bytes], set: bool) -> Option<(u32, Option<&[u8]>)> {
    let (mut flags, mut expire) = (0u32, None);
    let mut j = if set { 3 } else { 2 };
    while j < a.len() {
        let opt = &a[j];
        let has_next = j + 1 < a.len();
        let timed = [("EX", EX), ("PX", PX), ("EXAT", EXAT), ("PXAT", PXAT)]
            .into_iter()
            .find(|(n, _)| is_opt(opt, n))
            .map(|(_, f)| f);
        if set && is_opt(opt, "NX") && flags & XX == 0 {
            flags |= NX;
        } else if set && is_opt(opt, "XX") && flags & NX == 0 {
            flags |= XX;
        } else if set && is_opt(opt, "GET") {
            flags |= GET;
        } else if set && is_opt(opt, "KEEPTTL") && flags & (PERSIST | TIMED) == 0 {
            flags |= KEEPTTL;
        } else if !set && is_opt(opt, "PERSIST") && flags & (KEEPTTL | TIMED) == 0 {
            flags |= PERSIST;
        } else if let Some(f) = timed
            && flags & (KEEPTTL | PERSIST | (TIMED & !f)) == 0
            && has_next
        {
            flags |= f;
            expire = Some(&a[j + 1][..]);
            j += 1;
        } else {
            return None;
        }
        j += 1;
    }
    Some((flags, expire))
}

// ---- glob matching (Redis stringmatchlen) ---------------------------------------

/// Redis' stringmatchlen, case-sensitive, including its quirks: an unterminated `[`
/// class, ranges compared as signed chars, and the early exit for abusive patterns.
fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let mut skip_longer = false;
    glob_impl(pattern, 0, s, 0, &mut skip_longer, 0)
}

fn glob_impl(
    p: &[u8],
    mut pi: usize,
    s: &[u8],
    mut si: usize,
    skip: &mut bool,
    depth: u32,
) -> bool {
    if depth > 1000 {
        return false;
    }
    // Reading past the end yields the C string terminator.
    let at = |i: usize| p.get(i).copied().unwrap_or(0);
    while pi < p.len() && si < s.len() {
        match p[pi] {
            b'*' => {
                while pi < p.len() && at(pi + 1) == b'*' {
                    pi += 1;
                }
                if p.len() - pi == 1 {
                    return true;
                }
                while si < s.len() {
                    if glob_impl(p, pi + 1, s, si, skip, depth + 1) {
                        return true;
                    }
                    if *skip {
                        return false;
                    }
                    si += 1;
                }
                // The rest of the pattern matches nowhere, so longer matches for earlier
                // stars cannot help either.
                *skip = true;
                return false;
            }
            b'?' => si += 1,
            b'[' => {
                pi += 1;
                let negate = at(pi) == b'^';
                if negate {
                    pi += 1;
                }
                let mut matched = false;
                loop {
                    if at(pi) == b'\\' && p.len() - pi >= 2 {
                        pi += 1;
                        matched |= p[pi] == s[si];
                    } else if at(pi) == b']' {
                        break;
                    } else if pi >= p.len() {
                        pi -= 1;
                        break;
                    } else if p.len() - pi >= 3 && p[pi + 1] == b'-' {
                        let (lo, hi) = (p[pi] as i8, p[pi + 2] as i8);
                        let (lo, hi) = if lo > hi { (hi, lo) } else { (lo, hi) };
                        pi += 2;
                        matched |= (lo..=hi).contains(&(s[si] as i8));
                    } else {
                        matched |= p[pi] == s[si];
                    }
                    pi += 1;
                }
                if matched == negate {
                    return false;
                }
                si += 1;
            }
            c => {
                let c = if c == b'\\' && p.len() - pi >= 2 {
                    pi += 1;
                    p[pi]
                } else {
                    c
                };
                if c != s[si] {
                    return false;
                }
                si += 1;
            }
        }
        pi += 1;
        if si == s.len() {
            while pi < p.len() && p[pi] == b'*' {
                pi += 1;
            }
            break;
        }
    }
    pi == p.len() && si == s.len()
}

// ---- x87 long double emulation for INCRBYFLOAT ------------------------------------
//
// Redis computes INCRBYFLOAT in `long double`, which on x86-64 is the 80-bit x87 format
// (64-bit significand), parses with strtold and prints with "%.17Lf". f64 gives
// different digits (10.5 + 0.1 would print 10.59999999999999964), so the format is
// emulated exactly with a small arbitrary-precision integer.

/// Unsigned big integer, little-endian 32-bit limbs, no high zero limbs.
#[derive(Clone, Default)]
struct Big(Vec<u32>);

impl Big {
    fn new(v: u128) -> Big {
        Big((0..4).map(|i| (v >> (32 * i)) as u32).collect()).trimmed()
    }

    fn trimmed(mut self) -> Big {
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
        self
    }

    fn is_zero(&self) -> bool {
        self.0.is_empty()
    }

    fn bits(&self) -> i64 {
        let top = self
            .0
            .last()
            .map_or(0, |t| 32 - i64::from(t.leading_zeros()));
        (self.0.len() as i64 - 1).max(0) * 32 + top
    }

    fn low_u64(&self) -> u64 {
        self.0
            .iter()
            .take(2)
            .rev()
            .fold(0, |acc, &l| (acc << 32) | u64::from(l))
    }

    fn shl(&self, n: i64) -> Big {
        let (limbs, bits) = ((n / 32) as usize, (n % 32) as u32);
        let mut v = vec![0u32; limbs + self.0.len() + 1];
        for (i, &l) in self.0.iter().enumerate() {
            let wide = u64::from(l) << bits;
            v[limbs + i] |= wide as u32;
            v[limbs + i + 1] = (wide >> 32) as u32;
        }
        Big(v).trimmed()
    }

    fn shr(&self, n: i64) -> Big {
        let (limbs, bits) = ((n / 32) as usize, (n % 32) as u32);
        let src = self.0.get(limbs..).unwrap_or(&[]);
        let limb = |i: usize| u64::from(src.get(i).copied().unwrap_or(0));
        Big((0..src.len())
            .map(|i| (((limb(i + 1) << 32) | limb(i)) >> bits) as u32)
            .collect())
        .trimmed()
    }

    /// How the bits below position `n` compare with half a unit in position `n`: what
    /// round-to-nearest needs to know.
    fn rest_vs_half(&self, n: i64) -> Ordering {
        let rest = self.sub(&self.shr(n).shl(n));
        rest.cmp(&Big::new(1).shl(n - 1))
    }

    fn mul_add(&mut self, m: u32, add: u32) {
        let mut carry = u64::from(add);
        for l in &mut self.0 {
            let t = u64::from(*l) * u64::from(m) + carry;
            (*l, carry) = (t as u32, t >> 32);
        }
        self.0.push(carry as u32);
        *self = std::mem::take(self).trimmed();
    }

    fn mul_pow10(&mut self, mut n: u32) {
        while n > 0 {
            let step = n.min(9);
            self.mul_add(10u32.pow(step), 0);
            n -= step;
        }
    }

    fn cmp(&self, o: &Big) -> Ordering {
        let by_len = self.0.len().cmp(&o.0.len());
        by_len.then_with(|| self.0.iter().rev().cmp(o.0.iter().rev()))
    }

    fn add(&self, o: &Big) -> Big {
        let (mut v, mut carry) = (Vec::new(), 0u64);
        for i in 0..self.0.len().max(o.0.len()) + 1 {
            let limb = |b: &Big| u64::from(b.0.get(i).copied().unwrap_or(0));
            let t = limb(self) + limb(o) + carry;
            v.push(t as u32);
            carry = t >> 32;
        }
        Big(v).trimmed()
    }

    /// self - o, requires self >= o.
    fn sub(&self, o: &Big) -> Big {
        let (mut v, mut borrow) = (Vec::new(), 0i64);
        for (i, &l) in self.0.iter().enumerate() {
            let t = i64::from(l) - i64::from(o.0.get(i).copied().unwrap_or(0)) - borrow;
            borrow = i64::from(t < 0);
            v.push((t + (borrow << 32)) as u32);
        }
        Big(v).trimmed()
    }

    fn to_decimal(&self) -> String {
        let (mut n, mut digits) = (self.clone(), Vec::new());
        while !n.is_zero() {
            let mut rem = 0u64;
            for l in n.0.iter_mut().rev() {
                let cur = (rem << 32) | u64::from(*l);
                (*l, rem) = ((cur / 1_000_000_000) as u32, cur % 1_000_000_000);
            }
            n = n.trimmed();
            digits.push(rem);
        }
        let head = digits.pop().unwrap_or(0).to_string();
        digits
            .iter()
            .rev()
            .fold(head, |acc, d| format!("{acc}{d:09}"))
    }
}

/// A finite x87 extended value: (-1)^neg * m * 2^e, m == 0 for zero.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ext {
    neg: bool,
    m: u64,
    e: i64,
}

/// Exponent of the least significant significand bit of the smallest (subnormal) value.
const EXT_MIN_E: i64 = -16445;
/// Largest exponent of a normal value with a 64-bit significand.
const EXT_MAX_E: i64 = 16320;

enum Ld {
    Finite(Ext),
    Inf,
}

impl Ext {
    const ZERO: Ext = Ext {
        neg: false,
        m: 0,
        e: 0,
    };

    /// Rounds (q + sticky fraction) * 2^k to nearest-even; None on overflow. Callers
    /// pass at least 66 significant bits whenever `sticky` can be set.
    fn round(neg: bool, q: &Big, k: i64, sticky: bool) -> Option<Ext> {
        if q.is_zero() {
            return Some(Ext { neg, m: 0, e: 0 });
        }
        let mut e = (q.bits() - 64 + k).max(EXT_MIN_E);
        let shift = e - k;
        let m = if shift <= 0 {
            q.low_u64() << -shift
        } else {
            let mut m = q.shr(shift).low_u64();
            let rest = q.rest_vs_half(shift);
            if rest.then(sticky.cmp(&false)).then((m & 1).cmp(&0)) == Ordering::Greater {
                m = m.wrapping_add(1);
                if m == 0 {
                    m = 1 << 63;
                    e += 1;
                }
            }
            m
        };
        if m == 0 {
            return Some(Ext { neg, m: 0, e: 0 });
        }
        (e <= EXT_MAX_E).then_some(Ext { neg, m, e })
    }

    /// Exact sum, rounded once: what the x87 FADD does. Signed zeros come out as
    /// IEEE says (-0 only for -0 + -0), which the general path already gives.
    fn add(self, o: Ext) -> Option<Ext> {
        let e = self.e.min(o.e);
        let a = Big::new(self.m.into()).shl(self.e - e);
        let b = Big::new(o.m.into()).shl(o.e - e);
        if self.neg == o.neg {
            return Ext::round(self.neg, &a.add(&b), e, false);
        }
        match a.cmp(&b) {
            Ordering::Greater => Ext::round(self.neg, &a.sub(&b), e, false),
            Ordering::Less => Ext::round(o.neg, &b.sub(&a), e, false),
            Ordering::Equal => Some(Ext::ZERO),
        }
    }

    /// ld2string(LD_STR_HUMAN): "%.17Lf", trailing zeros and a bare "-0" removed.
    fn to_human(self) -> String {
        let mut s = if self.e >= 0 {
            Big::new(self.m.into()).shl(self.e).to_decimal()
        } else {
            let mut n = Big::new(self.m.into());
            n.mul_pow10(17);
            let sh = -self.e;
            let mut q = n.shr(sh);
            if n.rest_vs_half(sh).then((q.low_u64() & 1).cmp(&0)) == Ordering::Greater {
                q = q.add(&Big::new(1));
            }
            let digits = format!("{:0>18}", q.to_decimal());
            let (int_part, frac) = digits.split_at(digits.len() - 17);
            let frac = frac.trim_end_matches('0');
            if frac.is_empty() {
                int_part.to_string()
            } else {
                format!("{int_part}.{frac}")
            }
        };
        if self.neg && s != "0" {
            s.insert(0, '-');
        }
        s
    }
}

/// Redis' string2ld (strtold that must consume every byte, rejecting NaN, overflow and
/// underflow to zero). Handles decimal, hex ("0x1.8p3") and inf/infinity forms.
fn parse_ld(s: &[u8]) -> Option<Ld> {
    if s.is_empty() || s.len() >= 5 * 1024 {
        return None;
    }
    let (neg, body) = split_sign(s);
    if body.eq_ignore_ascii_case(b"inf") || body.eq_ignore_ascii_case(b"infinity") {
        return Some(Ld::Inf);
    }
    let hex = body.len() > 2 && body[0] == b'0' && (body[1] | 0x20) == b'x';
    let (radix, body, exp_char) = if hex {
        (16u32, &body[2..], b'p')
    } else {
        (10, body, b'e')
    };
    let mant_end = body
        .iter()
        .position(|&c| (c | 0x20) == exp_char)
        .unwrap_or(body.len());
    let (mant, exp) = body.split_at(mant_end);
    let (int_digits, frac_digits) = match mant.iter().position(|&c| c == b'.') {
        Some(dot) => (&mant[..dot], &mant[dot + 1..]),
        None => (mant, &mant[..0]),
    };
    let valid = |d: &[u8]| d.iter().all(|&c| (c as char).is_digit(radix));
    if int_digits.len() + frac_digits.len() == 0 || !valid(int_digits) || !valid(frac_digits) {
        return None;
    }
    let exp = if exp.is_empty() {
        0
    } else {
        let (eneg, edigits) = split_sign(&exp[1..]);
        if edigits.is_empty() || !edigits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        // Saturate: anything this large over- or underflows regardless of the digits.
        let v = edigits.iter().fold(0i64, |acc, &d| {
            (acc * 10 + i64::from(d - b'0')).min(1 << 40)
        });
        if eneg { -v } else { v }
    };
    let all: Vec<u32> = int_digits
        .iter()
        .chain(frac_digits)
        .map(|&c| (c as char).to_digit(radix).unwrap_or(0))
        .collect();
    let ndigits = all.iter().skip_while(|&&d| d == 0).count() as i64;
    // Several digits per limb operation: values can have thousands of digits.
    let mut digits = Big::default();
    for chunk in all.chunks(if hex { 7 } else { 9 }) {
        let (scale, v) = chunk
            .iter()
            .fold((1, 0), |(m, v), &d| (m * radix, v * radix + d));
        digits.mul_add(scale, v);
    }
    if digits.is_zero() {
        return Some(Ld::Finite(Ext { neg, ..Ext::ZERO }));
    }
    let frac_len = frac_digits.len() as i64;
    let ext = if hex {
        let k = exp - 4 * frac_len;
        let top = digits.bits() + k;
        if !(-16500..=16385).contains(&top) {
            return None;
        }
        Ext::round(neg, &digits, k, false)?
    } else {
        let x = exp - frac_len;
        // value lies in [10^(x+ndigits-1), 10^(x+ndigits)); the x87 range is about
        // 3.6e-4951 ..= 1.19e4932.
        if x + ndigits > 4933 || x + ndigits < -4955 {
            return None;
        }
        if x >= 0 {
            digits.mul_pow10(x as u32);
            Ext::round(neg, &digits, 0, false)?
        } else {
            let mut div = Big::new(1);
            div.mul_pow10((-x) as u32);
            // Shift so the quotient has 67-68 bits: enough to round, cheap to divide.
            let t = digits.bits() - div.bits() - 67;
            let (mut num, den) = if t >= 0 {
                (digits, div.shl(t))
            } else {
                (digits.shl(-t), div)
            };
            let mut q = 0u128;
            for i in (0..=69).rev() {
                let d = den.shl(i);
                if num.cmp(&d) != Ordering::Less {
                    num = num.sub(&d);
                    q |= 1 << i;
                }
            }
            Ext::round(neg, &Big::new(q), t, !num.is_zero())?
        }
    };
    // strtold reports underflow to zero as ERANGE, which Redis rejects.
    (ext.m != 0).then_some(Ld::Finite(ext))
}
#[cfg(test)]
mod tests {
    use super::*;

    fn exec(store: &LocalStore, args: &[&[u8]], resp3: bool) -> Vec<u8> {
        let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        let mut out = BytesMut::new();
        store.execute(0, &args, resp3, &mut out);
        out.to_vec()
    }

    fn cmd(store: &LocalStore, line: &str) -> String {
        let args: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
        String::from_utf8_lossy(&exec(store, &args, false)).into_owned()
    }

    /// Steps are "command args -> reply", with `|` standing for the inner CRLFs.
    fn script(steps: &str) -> LocalStore {
        let store = LocalStore::new(16);
        for step in steps.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (line, want) = step.split_once(" -> ").unwrap();
            assert_eq!(
                cmd(&store, line),
                want.replace('|', "\r\n") + "\r\n",
                "{line}"
            );
        }
        store
    }

    #[test]
    fn strings() {
        let s = script(
            "GET k -> $-1
            set k v -> +OK
            SET k w NX -> $-1
            SET k w XX GET -> $1|v
            SET n 1 XX -> $-1
            SET n 1 NX GET -> $-1
            SET k v NX XX -> -ERR syntax error
            SET k v EX -> -ERR syntax error
            SET k v EX 10 PX 10 -> -ERR syntax error
            SET k v KEEPTTL EX 10 -> -ERR syntax error
            SET k v EX 10 EX 20 -> +OK
            SET k v EX 0 -> -ERR invalid expire time in 'set' command
            SET k v PX 9223372036854775807 -> -ERR invalid expire time in 'set' command
            SET k v EXAT 9223372036854776 -> -ERR invalid expire time in 'set' command
            SET k v EX x -> -ERR value is not an integer or out of range
            SET k v EX 100 -> +OK
            SET k v2 KEEPTTL -> +OK
            TTL k -> :100
            SET k v3 -> +OK
            TTL k -> :-1
            SET k -> -ERR wrong number of arguments for 'set' command
            GET -> -ERR wrong number of arguments for 'get' command
            SETNX k x -> :0
            SETNX k2 x -> :1
            SETEX k3 0 v -> -ERR invalid expire time in 'setex' command
            PSETEX k3 -1 v -> -ERR invalid expire time in 'psetex' command
            PSETEX k3 100000 v -> +OK
            TTL k3 -> :100
            GETSET a 1 -> $-1
            EXPIRE a 100 -> :1
            GETSET a 2 -> $1|1
            TTL a -> :-1
            GETDEL a -> $1|2
            GETDEL a -> $-1
            GETEX a NX -> -ERR syntax error
            GETEX a EX -1 -> $-1
            SET a v -> +OK
            GETEX a EX -1 -> -ERR invalid expire time in 'getex' command
            GETEX a EX 100 -> $1|v
            GETEX a PERSIST -> $1|v
            TTL a -> :-1
            GETEX a EXAT 1 -> $1|v
            EXISTS a -> :0
            MSET a 1 b 2 -> +OK
            MSET a 1 b -> -ERR wrong number of arguments for 'mset' command
            MGET a x b -> *3|$1|1|$-1|$1|2
            MSETNX a 1 c 3 -> :0
            MSETNX c 1 c 3 -> :1
            GET c -> $1|3
            APPEND c 45 -> :3
            APPEND new hello -> :5
            STRLEN c -> :3
            STRLEN nope -> :0",
        );
        assert_eq!(exec(&s, &[b"GET", b"missing"], true), b"_\r\n");
        assert_eq!(exec(&s, &[b"SET", b"a\0b", b"\r\n\0"], false), b"+OK\r\n");
        assert_eq!(exec(&s, &[b"GET", b"a\0b"], false), b"$3\r\n\r\n\0\r\n");
        // Redis compares options as C strings, so the NUL ends "nx".
        assert_eq!(
            exec(&s, &[b"SET", b"fresh", b"1", b"nx\0junk"], false),
            b"+OK\r\n"
        );
    }

    #[test]
    fn counters() {
        script(
            "SET s abc -> +OK
            INCR s -> -ERR value is not an integer or out of range
            INCR n -> :1
            INCRBY n 41 -> :42
            DECRBY n 50 -> :-8
            DECR n -> :-9
            INCRBY n x -> -ERR value is not an integer or out of range
            DECRBY n -9223372036854775808 -> -ERR decrement would overflow
            SET n 9223372036854775807 -> +OK
            INCR n -> -ERR increment or decrement would overflow
            SET n 007 -> +OK
            INCR n -> -ERR value is not an integer or out of range
            SET f 10.5 -> +OK
            INCRBYFLOAT f 0.1 -> $4|10.6
            INCRBYFLOAT g 3.0e3 -> $4|3000
            INCRBYFLOAT g -3000 -> $1|0
            INCRBYFLOAT h 1e20 -> $21|100000000000000000000
            INCRBYFLOAT h inf -> -ERR increment would produce NaN or Infinity
            INCRBYFLOAT h nan -> -ERR value is not a valid float
            INCRBYFLOAT s 1 -> -ERR value is not a valid float
            INCRBYFLOAT z 0x1p3 -> $1|8
            INCRBYFLOAT z 0.000003814697265625 -> $19|8.00000381469726562
            INCRBYFLOAT y 123456789.123456789 -> $27|123456789.12345678899873747
            INCRBYFLOAT x -5e-18 -> $1|0
            INCRBYFLOAT x -6e-18 -> $20|-0.00000000000000001
            INCRBYFLOAT x 1e-5000 -> -ERR value is not a valid float",
        );
    }

    #[test]
    fn keyspace_and_expiry() {
        let s = script(
            "MSET a 1 b 2 c 3 -> +OK
            EXISTS a a x -> :2
            DEL a a x -> :1
            UNLINK b -> :1
            TYPE c -> +string
            TYPE a -> +none
            DBSIZE -> :1
            RENAME a b -> -ERR no such key
            RENAME c c -> +OK
            RENAMENX c c -> :0
            EXPIRE c 100 -> :1
            RENAME c d -> +OK
            TTL d -> :100
            SET e 1 -> +OK
            RENAMENX d e -> :0
            RENAMENX d f -> :1
            EXPIRE a 10 -> :0
            TTL nope -> :-2
            EXPIRE e 10 XX -> :0
            EXPIRE e 10 NX -> :1
            EXPIRE e 20 NX -> :0
            EXPIRE e 5 GT -> :0
            EXPIRE e 50 GT -> :1
            EXPIRE e 60 LT -> :0
            EXPIRE e 10 nx xx -> -ERR NX and XX, GT or LT options at the same time are not compatible
            EXPIRE e 10 gt lt -> -ERR GT and LT options at the same time are not compatible
            EXPIRE e 10 foo -> -ERR Unsupported option foo
            EXPIRE e x -> -ERR value is not an integer or out of range
            EXPIRE e 9223372036854776 -> -ERR invalid expire time in 'expire' command
            PEXPIRE e 9223372036854775807 -> -ERR invalid expire time in 'pexpire' command
            PERSIST e -> :1
            PERSIST e -> :0
            EXPIRE e 10 LT -> :1
            PEXPIREAT e 4000000000499 -> :1
            EXPIRETIME e -> :4000000000
            PEXPIRETIME e -> :4000000000499
            PEXPIREAT e 4000000000500 -> :1
            EXPIRETIME e -> :4000000001
            EXPIRE e -1 -> :1
            EXISTS e -> :0
            FLUSHDB bogus -> -ERR syntax error
            FLUSHDB async -> +OK
            RANDOMKEY -> $-1
            SET x 1 -> +OK
            RANDOMKEY -> $1|x
            FLUSHALL SYNC -> +OK
            PING -> +PONG
            PING hi -> $2|hi
            PING a b -> -ERR wrong number of arguments for 'ping' command
            ECHO x -> $1|x",
        );
        assert_eq!(
            exec(&s, &[b"EXPIRE", b"a", b"1", b"a\r\nb"], false),
            b"-ERR Unsupported option a  b\r\n"
        );
        cmd(&s, "SET a 1 PX 1");
        cmd(&s, "SET b 1 PX 1");
        cmd(&s, "SET c 1");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(cmd(&s, "GET a"), "$-1\r\n");
        assert_eq!(s.sweep_expired(), 1);
        assert_eq!(cmd(&s, "KEYS *"), "*1\r\n$1\r\nc\r\n");
        assert!(LocalStore::supports(b"INCRBYFLOAT") && !LocalStore::supports(b"HGET"));
        fn shared<T: Send + Sync>(_: &T) {}
        shared(&s);
        let mut out = BytesMut::new();
        let set = [Bytes::from("SET"), Bytes::from("k"), Bytes::from("v")];
        s.execute(1, &set, false, &mut out);
        s.execute(0, &[Bytes::from("GET"), Bytes::from("k")], false, &mut out);
        s.execute(16, &[Bytes::from("GET"), Bytes::from("k")], false, &mut out);
        assert_eq!(&out[..], b"+OK\r\n$-1\r\n-ERR DB index is out of range\r\n");
    }

    #[test]
    fn glob_quirks() {
        #[rustfmt::skip]
        let cases = [
            ("*", "", false), ("a**", "a", true), ("a?c", "abc", true), ("a[bc]d", "acd", true),
            ("a[^bc]d", "acd", false), ("a[c-a]d", "abd", true), ("a\\*", "a*", true),
            ("a\\*", "ab", false), ("a[", "ab", false), ("a[^", "ab", true), ("a[\\]]", "a]", true),
            ("h[a-]llo", "h]llo", false), ("h[a-]llo", "h]", true),
            ("*a*a*a*a*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ];
        for (p, s, want) in cases {
            assert_eq!(glob_match(p.as_bytes(), s.as_bytes()), want, "{p} vs {s}");
        }
        assert!(glob_match(b"[\x80-\xff]", b"\x90") && !glob_match(b"[a-\xff]", b"\x90"));
    }

    #[test]
    fn scan_returns_every_stable_key() {
        let s = script("SCAN x -> -ERR invalid cursor\nSCAN 0 COUNT 0 -> -ERR syntax error");
        for i in 0..500 {
            cmd(&s, &format!("SET stable{i} x"));
        }
        let (mut seen, mut cursor) = (std::collections::HashSet::new(), "0".to_string());
        for churn in 0.. {
            let reply = cmd(&s, &format!("SCAN {cursor} COUNT 7"));
            // Churn between calls; keys present throughout must still all be returned.
            cmd(&s, &format!("SET churn{churn} x"));
            cmd(&s, &format!("DEL churn{}", churn / 2));
            let lines: Vec<&str> = reply.split("\r\n").collect();
            cursor = lines[2].to_string();
            seen.extend(lines[4..].iter().skip(1).step_by(2).map(|k| k.to_string()));
            if cursor == "0" {
                break;
            }
        }
        assert!((0..500).all(|i| seen.contains(&format!("stable{i}"))));
        let hash = cmd(&s, "SCAN 0 TYPE hash COUNT 100000");
        assert_eq!(hash, "*2\r\n$1\r\n0\r\n*0\r\n");
        let one = cmd(&s, "SCAN 0 MATCH stable42 COUNT 100000");
        assert!(one.ends_with("*1\r\n$8\r\nstable42\r\n"), "{one}");
    }
}

/// Differential test against a real redis-server on a private loopback port; skipped
/// when redis-server is not installed.
#[cfg(test)]
mod differential {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};

    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    struct Redis(BufReader<TcpStream>);

    impl Redis {
        fn call(&mut self, args: &[Vec<u8>]) -> Vec<u8> {
            let mut req = format!("*{}\r\n", args.len()).into_bytes();
            for a in args {
                req.extend(format!("${}\r\n", a.len()).bytes().chain(a.iter().copied()));
                req.extend(b"\r\n");
            }
            self.0.get_mut().write_all(&req).unwrap();
            let mut out = Vec::new();
            self.read_reply(&mut out);
            out
        }

        fn read_reply(&mut self, out: &mut Vec<u8>) {
            let start = out.len();
            self.0.read_until(b'\n', out).unwrap();
            let head = String::from_utf8_lossy(&out[start + 1..out.len() - 2]).into_owned();
            let n: i64 = head.parse().unwrap_or(0);
            match out[start] {
                b'$' | b'=' | b'!' if n >= 0 => {
                    let mut buf = vec![0; n as usize + 2];
                    self.0.read_exact(&mut buf).unwrap();
                    out.extend(buf);
                }
                b'*' | b'~' | b'>' => (0..n).for_each(|_| self.read_reply(out)),
                b'%' => (0..2 * n).for_each(|_| self.read_reply(out)),
                _ => {}
            }
        }
    }

    fn local_call(store: &LocalStore, args: &[Vec<u8>], resp3: bool) -> Vec<u8> {
        let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        let mut out = BytesMut::new();
        store.execute(0, &args, resp3, &mut out);
        out.to_vec()
    }

    /// splitmix64, so runs are reproducible per seed without extra crates.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = (self.0 ^ (self.0 >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n as u64) as usize
        }
        fn pick<'a>(&mut self, items: &'a str) -> &'a [u8] {
            let items: Vec<&str> = items.split('|').collect();
            items[self.below(items.len())].as_bytes()
        }
        fn chance(&mut self, pct: usize) -> bool {
            self.below(100) < pct
        }
        fn int(&mut self) -> i64 {
            (self.below(usize::MAX) as i64) >> self.below(64)
        }
    }

    fn float_arg(r: &mut Rng) -> Vec<u8> {
        match r.below(12) {
            0 => r
                .pick(
                    "inf|-inf|nan|1e5000|1e-5000| 1|1 ||1e|.|-.5|+1.5|5.|1e-4940|-0|0x|0x1p-16445|\
                     1.18973149535723176502e+4932|1e4932|0X.8P-2|0x1p16383|1e+|3.0e3|1,5|\
                     0xffffffffffffffffp16320|0.000003814697265625|0x1.fffffffffffffffffp0",
                )
                .to_vec(),
            1 => r.int().to_string().into_bytes(),
            2 => format!(
                "0x{:x}.{:x}p{}",
                r.int(),
                r.below(1 << 24),
                r.below(200) as i64 - 100
            )
            .into_bytes(),
            _ => {
                let mut s: Vec<u8> = (0..1 + r.below(25))
                    .map(|_| b'0' + r.below(10) as u8)
                    .collect();
                s.insert(r.below(s.len() + 1), b'.');
                if r.chance(40) {
                    s.insert(0, b'-');
                }
                match r.below(10) {
                    0 => s.extend(format!("e{}", r.below(9900) as i64 - 4950).bytes()),
                    1..=3 => s.extend(format!("E{}", r.below(60) as i64 - 30).bytes()),
                    _ => {}
                }
                s
            }
        }
    }

    fn value(r: &mut Rng) -> Vec<u8> {
        match r.below(6) {
            0 | 1 => r
                .pick(
                    "0|1|-1|42|007|+5| 5|-0|9223372036854775807|-9223372036854775808|\
                     9223372036854775808|1.5|abc|",
                )
                .to_vec(),
            2 => float_arg(r),
            3 => r.int().to_string().into_bytes(),
            4 => b"hello\0\r\nworld".to_vec(),
            _ => (0..r.below(40)).map(|_| r.below(256) as u8).collect(),
        }
    }

    fn pattern(r: &mut Rng) -> Vec<u8> {
        (0..r.below(8))
            .map(|_| b"ab*?[]^-\\x:k0"[r.below(13)])
            .collect()
    }

    /// Relative expiries are far from now and absolute ones far in the future or long
    /// past, so no reply depends on the clock drifting between the two stores.
    fn expire_arg(r: &mut Rng, absolute: bool, ms: bool) -> Vec<u8> {
        let scale = if ms { 1000 } else { 1 };
        let v = match r.below(8) {
            0 => {
                let odd = "0|-5|9223372036854775|9223372036854776|9223372036854775807|x|1.5|";
                return r.pick(odd).to_vec();
            }
            _ if absolute => [2_200_000_000, 2_300_000_000, 1, 1000][r.below(4)] * scale,
            _ => (100 + r.below(1_000_000) as i64) * scale,
        };
        (v + r.below(1000) as i64).to_string().into_bytes()
    }

    /// A random command plus how to normalize replies that legitimately differ.
    fn random_command(r: &mut Rng) -> (Vec<Vec<u8>>, &'static str) {
        let names = "GET|SET|SETNX|SETEX|PSETEX|GETSET|GETDEL|GETEX|MGET|MSET|MSETNX|APPEND|\
                     STRLEN|INCR|DECR|INCRBY|DECRBY|INCRBYFLOAT|DEL|UNLINK|EXISTS|TYPE|EXPIRE|\
                     PEXPIRE|EXPIREAT|PEXPIREAT|PERSIST|TTL|PTTL|EXPIRETIME|PEXPIRETIME|RENAME|\
                     RENAMENX|KEYS|DBSIZE|FLUSHDB|RANDOMKEY|PING|ECHO|SCAN";
        let name = std::str::from_utf8(r.pick(names)).unwrap();
        let lower = name.bytes().map(|c| {
            if r.chance(30) {
                c.to_ascii_lowercase()
            } else {
                c
            }
        });
        let mut a = vec![lower.collect::<Vec<u8>>()];
        let key = |r: &mut Rng| r.pick("k0|k1|k2|k3|key:1|key:2|b\0in|[x]|a*b|").to_vec();
        let mut norm = "exact";
        match name {
            "SET" | "GETEX" => {
                a.push(key(r));
                if name == "SET" {
                    a.push(value(r));
                }
                for _ in 0..r.below(4) {
                    let opt = r.pick("NX|XX|GET|KEEPTTL|EX|PX|EXAT|PXAT|PERSIST|nx\0|EXX|ex");
                    a.push(opt.to_vec());
                    let (abs, ms) = (opt.ends_with(b"AT"), opt.starts_with(b"P"));
                    let v = expire_arg(r, abs, ms);
                    // Redis keeps a SET with a past deadline until it is touched, which
                    // would make DBSIZE depend on timing.
                    let past = abs && name == "SET" && v.len() <= 7 && v.first() != Some(&b'-');
                    if (opt.starts_with(b"EX") || opt.starts_with(b"PX")) && !past {
                        a.push(v);
                    }
                }
            }
            "SETEX" | "PSETEX" => {
                a.extend([key(r), expire_arg(r, false, name == "PSETEX"), value(r)]);
            }
            "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => {
                let abs = name.ends_with("AT");
                a.extend([key(r), expire_arg(r, abs, name.starts_with('P'))]);
                // GT/LT against relative deadlines would race the clock.
                let opts = if abs {
                    "NX|XX|GT|LT|bad|gt"
                } else {
                    "NX|XX|bad|nx"
                };
                (0..r.below(3)).for_each(|_| a.push(r.pick(opts).to_vec()));
            }
            "SETNX" | "GETSET" | "APPEND" | "INCRBY" | "DECRBY" => a.extend([key(r), value(r)]),
            "INCRBYFLOAT" => a.extend([key(r), float_arg(r)]),
            "MSET" | "MSETNX" => {
                (0..1 + r.below(3)).for_each(|_| a.extend([key(r), value(r)]));
                if r.chance(10) {
                    a.pop();
                }
            }
            "MGET" | "DEL" | "UNLINK" | "EXISTS" => {
                (0..1 + r.below(4)).for_each(|_| a.push(key(r)))
            }
            "RENAME" | "RENAMENX" => a.extend([key(r), key(r)]),
            "KEYS" => {
                a.push(pattern(r));
                norm = "sorted";
            }
            "FLUSHDB" if r.chance(90) => return (vec![b"PING".to_vec()], norm),
            "FLUSHDB" if r.chance(50) => a.push(r.pick("async|SYNC|now").to_vec()),
            "PING" | "ECHO" => (0..r.below(3)).for_each(|_| a.push(value(r))),
            "SCAN" => {
                a.push(r.pick("0| 1|x|-1|+0|18446744073709551616|").to_vec());
                for _ in 0..r.below(3) {
                    let opt = r.pick("COUNT|MATCH|TYPE|bogus");
                    a.push(opt.to_vec());
                    match opt {
                        b"COUNT" => a.push(r.pick("0|-1|x|1000").to_vec()),
                        b"MATCH" => a.push(pattern(r)),
                        b"TYPE" => a.push(r.pick("string|STRING|hash|nonsense").to_vec()),
                        _ => {}
                    }
                }
                norm = "scan";
            }
            "TTL" | "PTTL" | "EXPIRETIME" | "PEXPIRETIME" => {
                a.push(key(r));
                norm = "ttl";
            }
            "RANDOMKEY" => norm = "random",
            "DBSIZE" | "FLUSHDB" => {}
            _ => a.push(key(r)),
        }
        if r.chance(3) {
            // Break the arity on purpose.
            match r.chance(50) {
                true => a.truncate(1 + r.below(a.len())),
                false => a.push(b"extra".to_vec()),
            }
        }
        (a, norm)
    }

    /// Elements of a flat array of bulk strings, each with its RESP framing.
    fn elements(mut rest: &[u8]) -> Vec<Vec<u8>> {
        let mut parts = Vec::new();
        while !rest.is_empty() {
            let nl = rest.iter().position(|&c| c == b'\n').unwrap();
            let len: usize = String::from_utf8_lossy(&rest[1..nl - 1]).parse().unwrap();
            parts.push(rest[..nl + len + 3].to_vec());
            rest = &rest[nl + len + 3..];
        }
        parts
    }

    fn after_line(raw: &[u8]) -> &[u8] {
        &raw[raw.iter().position(|&c| c == b'\n').unwrap() + 1..]
    }

    fn normalize(norm: &str, raw: Vec<u8>) -> Vec<u8> {
        match norm {
            "ttl" if raw[0] == b':' && raw[1] != b'-' => b":<ttl>".to_vec(),
            "random" if raw[0] == b'$' && raw[1] != b'-' => b"$<key>".to_vec(),
            "sorted" if raw[0] == b'*' => {
                let mut e = elements(after_line(&raw));
                e.sort();
                e.concat()
            }
            "scan" if raw[0] == b'*' => b"*<scan page>".to_vec(),
            _ => raw,
        }
    }

    /// Every key a complete SCAN with these options returns, sorted and deduplicated.
    fn full_scan(opts: &[Vec<u8>], mut call: impl FnMut(&[Vec<u8>]) -> Vec<u8>) -> Vec<Vec<u8>> {
        let (mut cursor, mut keys) = (b"0".to_vec(), Vec::new());
        loop {
            let raw = call(&[&[b"SCAN".to_vec(), cursor][..], opts].concat());
            let rest = after_line(&raw);
            let nl = rest.iter().position(|&c| c == b'\n').unwrap();
            let len: usize = String::from_utf8_lossy(&rest[1..nl - 1]).parse().unwrap();
            cursor = rest[nl + 1..nl + 1 + len].to_vec();
            keys.extend(elements(after_line(&rest[nl + len + 3..])));
            if cursor == b"0" {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }

    fn random_commands(redis: &mut Redis, seed: u64, ops: usize, resp3: bool) {
        redis.call(&[b"FLUSHALL".to_vec()]);
        let (local, mut r) = (LocalStore::new(16), Rng(seed));
        for i in 0..ops {
            let (args, norm) = random_command(&mut r);
            let want = normalize(norm, redis.call(&args));
            let got = normalize(norm, local_call(&local, &args, resp3));
            let shown: Vec<_> = args.iter().map(|a| String::from_utf8_lossy(a)).collect();
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "seed {seed} op {i} resp3={resp3}: {shown:?}"
            );
            if i % 50 == 0 {
                let mut opts = vec![b"COUNT".to_vec(), (1 + r.below(5)).to_string().into_bytes()];
                if r.chance(50) {
                    opts.extend([b"MATCH".to_vec(), pattern(&mut r)]);
                }
                let theirs = full_scan(&opts, |a| redis.call(a));
                let ours = full_scan(&opts, |a| local_call(&local, a, resp3));
                assert_eq!(ours, theirs, "seed {seed} op {i}: full scan {opts:?}");
            }
        }
    }

    #[test]
    fn matches_real_redis() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn();
        let _server = match child {
            Ok(child) => Server(child),
            Err(e) => return println!("skipping differential test: no redis-server ({e})"),
        };
        let connect = || TcpStream::connect(("127.0.0.1", port));
        let stream = (0..200)
            .find_map(|_| {
                connect().ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                    None
                })
            })
            .expect("redis-server did not start");
        let mut redis = Redis(BufReader::new(stream));
        for seed in 1..=3 {
            random_commands(&mut redis, seed, 2500, false);
        }
        redis.call(&[b"HELLO".to_vec(), b"3".to_vec()]);
        for seed in 4..=5 {
            random_commands(&mut redis, seed, 2500, true);
        }
        redis.call(&[b"HELLO".to_vec(), b"2".to_vec()]);

        // INCRBYFLOAT: strtold, x87 addition and "%.17Lf" on the Redis side.
        let (local, mut r) = (LocalStore::new(16), Rng(7));
        for i in 0..3000 {
            let mut cmds = vec![vec![
                b"INCRBYFLOAT".to_vec(),
                b"f".to_vec(),
                float_arg(&mut r),
            ]];
            if r.chance(30) {
                cmds.insert(0, vec![b"SET".to_vec(), b"f".to_vec(), float_arg(&mut r)]);
            }
            for args in cmds {
                let want = String::from_utf8(redis.call(&args)).unwrap();
                let got = String::from_utf8(local_call(&local, &args, false)).unwrap();
                let shown: Vec<_> = args.iter().map(|a| String::from_utf8_lossy(a)).collect();
                assert_eq!(got, want, "float op {i}: {shown:?}");
            }
        }

        // KEYS over keys made of glob metacharacters and high bytes.
        redis.call(&[b"FLUSHALL".to_vec()]);
        let local = LocalStore::new(16);
        let mut mset = vec![b"MSET".to_vec()];
        for _ in 0..300 {
            mset.push(
                (0..r.below(6))
                    .map(|_| b"ab*?[]^-\\x\x80\xff"[r.below(12)])
                    .collect(),
            );
            mset.push(b"v".to_vec());
        }
        assert_eq!(redis.call(&mset), local_call(&local, &mset, false));
        for _ in 0..6000 {
            let mut pat = pattern(&mut r);
            if r.chance(20) {
                pat.push(b"\x80\xff\x7f"[r.below(3)]);
            }
            let args = [b"KEYS".to_vec(), pat];
            let want = normalize("sorted", redis.call(&args));
            let got = normalize("sorted", local_call(&local, &args, false));
            assert_eq!(got, want, "KEYS {:?}", String::from_utf8_lossy(&args[1]));
        }
    }
}
