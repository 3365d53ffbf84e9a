//! Compression on the data path: which commands carry values, how their
//! requests are re-encoded, how their replies are decoded, and how the
//! byte-level string commands keep Redis' own answers on compressed keys.
//!
//! The session asks [`kind`] once per command (a table lookup by command id);
//! commands that cannot carry a value never reach this module and keep the
//! raw pass-through path.
//!
//! # Approaches per command family
//!
//! * **Writes carrying values** (SET incl. GET/KEEPTTL and every other
//!   option, SETEX, PSETEX, SETNX, GETSET, MSET, MSETNX, HSET, HMSET, HSETNX):
//!   each value goes through [`Codec::encode`] and the command is re-encoded.
//!   Values that begin with the magic are always framed, so any value reads
//!   back unchanged.
//! * **Replies carrying values** (GET, GETEX, GETDEL, GETSET, SET … GET,
//!   HGET, MGET, HMGET, HVALS, HGETALL, HRANDFIELD … WITHVALUES, and the same
//!   commands queued in MULTI … EXEC): forwarded unchanged; the writer decodes
//!   the value positions of the reply ([`decode_reply`]). A corrupt or
//!   oversized frame turns that command's reply (or that EXEC element) into
//!   `-ERR respite: corrupt compressed value (…)`.
//! * **Byte-level commands** (STRLEN, GETRANGE, SUBSTR, APPEND, SETRANGE,
//!   INCRBYFLOAT, GETBIT, SETBIT, BITCOUNT, BITPOS, BITFIELD, BITFIELD_RO,
//!   BITOP, LCS, HSTRLEN, HINCRBYFLOAT, and INCR/INCRBY/DECR/DECRBY/HINCRBY
//!   when `min_bytes` <= 20): run inside one Lua script ([`SCRIPT`]) that
//!   checks every key (or hash field) the command reads. When none is
//!   compressed the script runs the original command (`redis.pcall`, so
//!   errors are Redis' own) and its reply is the client's. When one is, the
//!   script changes nothing and returns the stored frames; the proxy decodes
//!   them and runs the script again with those frames as expectations. If
//!   the keys still hold exactly those frames, the command runs on the plain
//!   values in the same atomic step (otherwise the script reports again and
//!   the proxy retries), so the answer is Redis' own for the plain value and
//!   is atomic against other clients without WATCH or a dedicated
//!   connection. How the plain value is put in front of the command depends
//!   on whether the command writes ([`read_only`]):
//!   - **Readers** (STRLEN, GETRANGE, SUBSTR, GETBIT, BITCOUNT, BITPOS,
//!     BITFIELD_RO, LCS, HSTRLEN, and BITFIELD with only GET/OVERFLOW,
//!     SETRANGE with an empty value, which Redis also leaves alone) run on
//!     temporary decoded copies that the script creates and deletes around
//!     the command. The key read is never written: a WATCH on it holds, no
//!     keyspace event fires for it, it stays compressed. Outside MULTI,
//!     STRLEN, HSTRLEN, GETRANGE, SUBSTR and GETBIT need no copy: the proxy
//!     answers from the frame the first script run reported, as Redis would
//!     for its decoded value ([`local_answer`]), so they also work on a
//!     read-only replica or under OOM, where copies cannot be written.
//!   - **Writers** rewrite each key uncompressed (`SET … KEEPTTL` / `HSET`,
//!     so TTLs stay) and run the command on it. Keys a writer touched stay
//!     uncompressed until rewritten. A value the command leaves beginning
//!     with the magic (APPEND, SETRANGE, BITOP … can build one) is wrapped
//!     in a raw frame in the same step, so it reads back as it is.
//! * **INCR, INCRBY, DECR, DECRBY, HINCRBY** with `min_bytes` > 20 are
//!   forwarded unchanged: a frame decodes to a value of at least `min_bytes`
//!   bytes or one beginning with the magic, and Redis never reads either as an
//!   integer (`string2ll` gives up beyond 20 characters), so Redis' error on
//!   the stored bytes is exactly its error on the decoded value, and on an
//!   unmarked value the command is the command.
//! * **Inside MULTI** a byte-level command cannot wait for a script's answer
//!   (it is only queued): the proxy reads the frames its keys hold when it
//!   is queued (on a shared connection) and queues the script with those,
//!   and the frames that writes queued before it in the transaction store
//!   ([`Tx::written`]), as expectations. A raw frame it did not expect is
//!   read as it is (no LZ4 needed); a key that holds an LZ4 frame none of
//!   them names at EXEC makes that element an error.
//! * **Pipelined back to back** outside MULTI, byte-level commands share
//!   the first run: [`BATCH_SCRIPT`] runs them in order until one meets a
//!   frame, which then takes the path above alone before the run goes on.
//!   Both scripts travel as EVALSHA ([`SCRIPT_SHA`], [`BATCH_SHA`]).
//!
//! Scripts (EVAL/FCALL), DUMP/RESTORE, OBJECT, MEMORY USAGE, SORT … BY/GET
//! and the like see the stored bytes (docs/compression-format.md).

use crate::command;
use crate::compress::{self, Codec, CompressError};
use crate::metrics::Metrics;
use bytes::{Bytes, BytesMut};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which part of a reply carries values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decode {
    /// Nothing to decode.
    None,
    /// The reply is one bulk string (or nil).
    Bulk,
    /// An array (or set) of bulk strings.
    Array,
    /// Field/value pairs: a flat array, a RESP3 map, or an array of
    /// two-element arrays (HRANDFIELD … WITHVALUES under RESP3).
    Pairs,
    /// An EXEC reply: one action per queued command.
    Exec(Vec<Decode>),
    /// The reply of [`SCRIPT`] queued in MULTI: a report (a key changed
    /// between queueing and EXEC) becomes an error. `map`: an array reply
    /// is a RESP3 map ([`lcs_map`]).
    Script { map: bool },
    /// An EXEC element replaced by this reply (an error found at queue time).
    Replace(Bytes),
    /// Consecutive replies of a pass-through batch, one action each.
    Seq(Vec<Decode>),
}

/// What the session does with a command when compression is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not affected: the normal path.
    None,
    /// Writes values (re-encoded).
    Write(Write),
    /// Reply carries values.
    Read(Read),
    /// Works on the bytes of string values.
    Bytes,
    /// Works on the bytes of hash field values (`HSTRLEN key field` …).
    HashBytes,
    /// Integer increments: exact without help when `min_bytes` > 20.
    Incr,
    /// Integer increments of hash fields, likewise.
    HIncr,
    Multi,
    Exec,
    Discard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// `SET key value [options]`: value at 2, GET option decodes the reply.
    Set,
    /// Value at a fixed position, reply not a value.
    At(usize),
    /// `GETSET key value`.
    GetSet,
    /// `MSET k v [k v …]`.
    Mset,
    /// `HSET key f v [f v …]`.
    Hset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Bulk,
    Array,
    Pairs,
    /// `HRANDFIELD key [count [WITHVALUES]]`.
    Hrandfield,
}

static TABLE: LazyLock<Vec<Kind>> = LazyLock::new(|| {
    let mut t = vec![Kind::None; command::count() + 1];
    let mut set = |name: &str, k: Kind| {
        if let Some(id) = command::id_of(name) {
            t[id] = k;
        }
    };
    set("SET", Kind::Write(Write::Set));
    set("SETEX", Kind::Write(Write::At(3)));
    set("PSETEX", Kind::Write(Write::At(3)));
    set("SETNX", Kind::Write(Write::At(2)));
    set("HSETNX", Kind::Write(Write::At(3)));
    set("GETSET", Kind::Write(Write::GetSet));
    set("MSET", Kind::Write(Write::Mset));
    set("MSETNX", Kind::Write(Write::Mset));
    set("HSET", Kind::Write(Write::Hset));
    set("HMSET", Kind::Write(Write::Hset));
    for n in ["GET", "GETEX", "GETDEL", "HGET"] {
        set(n, Kind::Read(Read::Bulk));
    }
    for n in ["MGET", "HMGET", "HVALS"] {
        set(n, Kind::Read(Read::Array));
    }
    set("HGETALL", Kind::Read(Read::Pairs));
    set("HRANDFIELD", Kind::Read(Read::Hrandfield));
    for n in [
        "STRLEN",
        "GETRANGE",
        "SUBSTR",
        "APPEND",
        "SETRANGE",
        "INCRBYFLOAT",
        "GETBIT",
        "SETBIT",
        "BITCOUNT",
        "BITPOS",
        "BITFIELD",
        "BITFIELD_RO",
        "BITOP",
        "LCS",
    ] {
        set(n, Kind::Bytes);
    }
    for n in ["INCR", "INCRBY", "DECR", "DECRBY"] {
        set(n, Kind::Incr);
    }
    set("HSTRLEN", Kind::HashBytes);
    set("HINCRBYFLOAT", Kind::HashBytes);
    set("HINCRBY", Kind::HIncr);
    set("MULTI", Kind::Multi);
    set("EXEC", Kind::Exec);
    set("DISCARD", Kind::Discard);
    t
});

/// How compression affects command `id` (one table lookup).
#[inline]
pub fn kind(id: Option<usize>) -> Kind {
    match id {
        Some(i) => TABLE.get(i).copied().unwrap_or(Kind::None),
        None => Kind::None,
    }
}

/// Per-session transaction bookkeeping, so an EXEC reply can be decoded.
#[derive(Debug, Default)]
pub struct Tx {
    pub multi: bool,
    pub queued: Vec<Decode>,
    /// Frames that writes queued so far will store: a byte-level command
    /// queued after them finds these, not what the keys hold at queue time.
    pub written: Vec<Written>,
}

/// A frame a write stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub key: Bytes,
    pub field: Option<Bytes>,
    pub stored: Bytes,
    pub value: Bytes,
}

/// A frame [`SCRIPT`] may find in target `target`, and its decoded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub target: usize,
    pub stored: Bytes,
    pub value: Bytes,
}

/// Compression counters (PROXY STATS, INFO, /metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub compressed: AtomicU64,
    pub skipped: AtomicU64,
    pub bytes_before: AtomicU64,
    pub bytes_after: AtomicU64,
    pub decompressed: AtomicU64,
    pub errors: AtomicU64,
    pub emulated: AtomicU64,
}

impl Stats {
    pub fn render(&self) -> Vec<(&'static str, String)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let before = g(&self.bytes_before);
        let after = g(&self.bytes_after);
        let ratio = if after == 0 {
            0.0
        } else {
            before as f64 / after as f64
        };
        vec![
            ("values_compressed", g(&self.compressed).to_string()),
            ("values_skipped", g(&self.skipped).to_string()),
            ("bytes_before", before.to_string()),
            ("bytes_after", after.to_string()),
            ("ratio", format!("{ratio:.3}")),
            ("values_decompressed", g(&self.decompressed).to_string()),
            ("decompression_errors", g(&self.errors).to_string()),
            ("byte_commands_emulated", g(&self.emulated).to_string()),
        ]
    }
}

/// The compression settings one command sees.
pub struct Policy<'a> {
    pub codec: Codec,
    pub exclude: &'a [String],
}

impl<'a> Policy<'a> {
    /// The policy `[compression]` configures.
    pub fn of(cfg: &'a crate::config::CompressionConfig) -> Self {
        Policy {
            codec: cfg.codec(),
            exclude: &cfg.exclude,
        }
    }

    fn excluded(&self, key: &[u8]) -> bool {
        self.exclude
            .iter()
            .any(|g| crate::admin::glob(g.as_bytes(), key))
    }

    /// The bytes to store for `value` under `key` (`None`: the value itself).
    pub fn encode(&self, key: &[u8], value: &[u8], stats: &Stats) -> Option<Bytes> {
        if self.excluded(key) {
            // Still frame values that look like frames, so they read back.
            if compress::is_compressed(value) {
                let raw_only = Codec {
                    min_bytes: usize::MAX,
                    ..self.codec.clone()
                };
                return raw_only.encode(value);
            }
            if value.len() >= self.codec.min_bytes {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        let out = self.codec.encode(value);
        if value.len() >= self.codec.min_bytes {
            match &out {
                Some(f) if f.len() < value.len() => {
                    stats.compressed.fetch_add(1, Ordering::Relaxed);
                    stats
                        .bytes_before
                        .fetch_add(value.len() as u64, Ordering::Relaxed);
                    stats
                        .bytes_after
                        .fetch_add(f.len() as u64, Ordering::Relaxed);
                }
                _ => {
                    stats.skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        out
    }
}

/// A write command re-encoded for storage (`None` when it goes upstream
/// unchanged), how to decode its reply, and the frames it stores.
pub fn rewrite_write(
    w: Write,
    args: &[Bytes],
    policy: &Policy<'_>,
    stats: &Stats,
) -> (Option<Vec<Bytes>>, Decode, Vec<Written>) {
    let mut positions: Vec<(usize, usize)> = Vec::new(); // (key, value)
    let mut decode = Decode::None;
    match w {
        Write::Set => {
            if args.len() >= 3 {
                positions.push((1, 2));
            }
            if args.iter().skip(3).any(|a| a.eq_ignore_ascii_case(b"GET")) {
                decode = Decode::Bulk;
            }
        }
        Write::At(i) => {
            if args.len() == i + 1 {
                positions.push((1, i));
            }
        }
        Write::GetSet => {
            if args.len() == 3 {
                positions.push((1, 2));
            }
            decode = Decode::Bulk;
        }
        Write::Mset => {
            if args.len() >= 3 && args.len() % 2 == 1 {
                positions.extend((1..args.len()).step_by(2).map(|k| (k, k + 1)));
            }
        }
        Write::Hset => {
            if args.len() >= 4 && args.len().is_multiple_of(2) {
                positions.extend((3..args.len()).step_by(2).map(|v| (1, v)));
            }
        }
    }
    let mut out: Option<Vec<Bytes>> = None;
    let mut written = Vec::new();
    for (k, v) in positions {
        if let Some(enc) = policy.encode(&args[k], &args[v], stats) {
            written.push(Written {
                key: args[k].clone(),
                field: matches!(w, Write::Hset).then(|| args[v - 1].clone()),
                stored: enc.clone(),
                value: args[v].clone(),
            });
            out.get_or_insert_with(|| args.to_vec())[v] = enc;
        }
    }
    (out, decode, written)
}

/// Adds to `expect` the frames that writes queued earlier in the
/// transaction store in `targets`: when the command runs at EXEC, a target
/// holds one of those or what the probe found (a conditional write such as
/// SETNX may not have happened).
pub fn expect_queued(tx: &Tx, targets: &[Target], expect: &mut Vec<Expect>) {
    for (i, t) in targets.iter().enumerate() {
        for w in &tx.written {
            if w.key == t.key
                && w.field == t.field
                && !expect.iter().any(|e| e.target == i && e.stored == w.stored)
            {
                expect.push(Expect {
                    target: i,
                    stored: w.stored.clone(),
                    value: w.value.clone(),
                });
            }
        }
    }
}

/// For a command on the pass-through batch path: `Some(action)` when it
/// needs no rewriting (reads, and writes whose values are all below
/// `min_bytes` and unmarked), `None` when it must take the compression path.
pub fn batchable<A: command::Args + ?Sized>(k: Kind, args: &A, min_bytes: usize) -> Option<Decode> {
    let n = args.count();
    let has_get = || (3..n).any(|i| args.arg(i).is_some_and(|a| a.eq_ignore_ascii_case(b"GET")));
    let plain = |range: &mut dyn Iterator<Item = usize>| {
        let mut ok = true;
        for i in range {
            ok &= args
                .arg(i)
                .is_none_or(|v| v.len() < min_bytes && !compress::is_compressed(v));
        }
        ok
    };
    match k {
        Kind::None => Some(Decode::None),
        Kind::Read(Read::Bulk) => Some(Decode::Bulk),
        Kind::Read(Read::Array) => Some(Decode::Array),
        Kind::Read(Read::Pairs) => Some(Decode::Pairs),
        Kind::Read(Read::Hrandfield) => Some(
            if n == 4
                && args
                    .arg(3)
                    .is_some_and(|a| a.eq_ignore_ascii_case(b"WITHVALUES"))
            {
                Decode::Pairs
            } else {
                Decode::None
            },
        ),
        Kind::Write(Write::Set) => plain(&mut (2..3)).then(|| {
            if has_get() {
                Decode::Bulk
            } else {
                Decode::None
            }
        }),
        Kind::Write(Write::At(i)) => plain(&mut (i..i + 1)).then_some(Decode::None),
        Kind::Write(Write::GetSet) => plain(&mut (2..3)).then_some(Decode::Bulk),
        Kind::Write(Write::Mset) => plain(&mut (2..n).step_by(2)).then_some(Decode::None),
        Kind::Write(Write::Hset) => plain(&mut (3..n).step_by(2)).then_some(Decode::None),
        Kind::Incr | Kind::HIncr if effective(k, min_bytes) == Kind::None => Some(Decode::None),
        _ => None,
    }
}

/// `k` as the compression path treats it: the integer increments need no
/// help when `min_bytes` > 20 (see the module doc) and are then
/// [`Kind::None`].
pub fn effective(k: Kind, min_bytes: usize) -> Kind {
    match k {
        Kind::Incr | Kind::HIncr if min_bytes > 20 => Kind::None,
        k => k,
    }
}

/// How to decode the reply of a reading command.
pub fn read_decode(r: Read, args: &[Bytes]) -> Decode {
    match r {
        Read::Bulk => Decode::Bulk,
        Read::Array => Decode::Array,
        Read::Pairs => Decode::Pairs,
        Read::Hrandfield => {
            if args.len() == 4 && args[3].eq_ignore_ascii_case(b"WITHVALUES") {
                Decode::Pairs
            } else {
                Decode::None
            }
        }
    }
}

/// The decode action of a command queued inside MULTI.
pub fn queued_decode(k: Kind, args: &[Bytes]) -> Decode {
    match k {
        Kind::Read(r) => read_decode(r, args),
        Kind::Write(Write::GetSet) => Decode::Bulk,
        Kind::Write(Write::Set) if args.iter().skip(3).any(|a| a.eq_ignore_ascii_case(b"GET")) => {
            Decode::Bulk
        }
        _ => Decode::None,
    }
}

/// The error reply for a value that cannot be decoded.
pub fn corrupt_error(e: &CompressError) -> Bytes {
    let msg = e.to_string();
    let detail = msg
        .strip_prefix("corrupt compressed value (")
        .and_then(|m| m.strip_suffix(')'))
        .unwrap_or(&msg);
    crate::resp::error_bytes(&format!("ERR respite: corrupt compressed value ({detail})"))
}

/// Decodes the value positions of one reply. The common case (no frame in
/// the reply) returns the input without copying.
pub fn decode_reply(d: &Decode, data: Bytes, codec: &Codec, stats: &Stats) -> Bytes {
    let skip = match d {
        Decode::None => true,
        Decode::Bulk => !bulk_may_be_framed(&data),
        // Replacements and LCS maps change the reply even without a frame.
        Decode::Exec(v)
            if v.iter()
                .any(|x| matches!(x, Decode::Replace(_) | Decode::Script { map: true })) =>
        {
            false
        }
        Decode::Seq(v) if v.iter().all(|x| *x == Decode::None) => true,
        _ => !contains_magic(&data),
    };
    if skip {
        return data;
    }
    let mut out = BytesMut::with_capacity(data.len() * 2);
    if let Decode::Seq(v) = d {
        let mut p = 0;
        for sub in v {
            match element(&data, p, sub, codec, stats, &mut out) {
                Ok(e) => p = e,
                Err(_) => return data,
            }
        }
        out.extend_from_slice(&data[p..]);
        return out.freeze();
    }
    match transform(&data, 0, d, codec, stats, &mut out) {
        Ok(end) => {
            out.extend_from_slice(&data[end..]);
            out.freeze()
        }
        Err(Fail::Corrupt(e)) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            corrupt_error(&e)
        }
        Err(Fail::Malformed) => data,
    }
}

fn contains_magic(data: &[u8]) -> bool {
    let mut i = 0;
    while let Some(p) = data[i..].iter().position(|&b| b == compress::MAGIC[0]) {
        if data[i + p..].starts_with(&compress::MAGIC) {
            return true;
        }
        i += p + 1;
    }
    false
}

/// For a single bulk reply only its first payload bytes matter.
fn bulk_may_be_framed(data: &[u8]) -> bool {
    if data.first() != Some(&b'$') {
        return false;
    }
    match data.iter().position(|&b| b == b'\n') {
        Some(p) => data[p + 1..].starts_with(&compress::MAGIC),
        None => false,
    }
}

enum Fail {
    Corrupt(CompressError),
    Malformed,
}

fn line_end(buf: &[u8], pos: usize) -> Result<usize, Fail> {
    buf[pos..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| pos + i)
        .ok_or(Fail::Malformed)
}

fn header_len(buf: &[u8], pos: usize) -> Result<(i64, usize), Fail> {
    let e = line_end(buf, pos)?;
    let n = crate::resp::parse_int(&buf[pos + 1..e]).ok_or(Fail::Malformed)?;
    Ok((n, e + 2))
}

/// End of the frame at `pos`.
fn skip(buf: &[u8], pos: usize) -> Result<usize, Fail> {
    let t = *buf.get(pos).ok_or(Fail::Malformed)?;
    match t {
        b'$' | b'=' | b'!' => {
            let (n, body) = header_len(buf, pos)?;
            if n < 0 {
                return Ok(body);
            }
            let end = body + n as usize + 2;
            if end > buf.len() {
                return Err(Fail::Malformed);
            }
            Ok(end)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let (n, mut p) = header_len(buf, pos)?;
            if n < 0 {
                return Ok(p);
            }
            let n = if matches!(t, b'%' | b'|') { n * 2 } else { n };
            for _ in 0..n {
                p = skip(buf, p)?;
            }
            if t == b'|' {
                // An attribute precedes the frame it describes.
                p = skip(buf, p)?;
            }
            Ok(p)
        }
        _ => Ok(line_end(buf, pos)? + 2),
    }
}

/// One element of an EXEC reply or a batch: a corrupt value makes it an
/// error reply of its own.
fn element(
    buf: &[u8],
    pos: usize,
    d: &Decode,
    codec: &Codec,
    stats: &Stats,
    out: &mut BytesMut,
) -> Result<usize, Fail> {
    let mark = out.len();
    match transform(buf, pos, d, codec, stats, out) {
        Ok(e) => Ok(e),
        Err(Fail::Corrupt(e)) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            out.truncate(mark);
            out.extend_from_slice(&corrupt_error(&e));
            skip(buf, pos)
        }
        Err(f) => Err(f),
    }
}

/// Copies the frame at `pos` to `out`, decoding value positions per `d`.
/// Inside an EXEC reply a corrupt value becomes an error element; elsewhere
/// it fails the whole reply.
fn transform(
    buf: &[u8],
    pos: usize,
    d: &Decode,
    codec: &Codec,
    stats: &Stats,
    out: &mut BytesMut,
) -> Result<usize, Fail> {
    let t = *buf.get(pos).ok_or(Fail::Malformed)?;
    match d {
        Decode::Script { map } => {
            let end = skip(buf, pos)?;
            if script_report(&buf[pos..end]).is_some() {
                out.extend_from_slice(&crate::resp::error_bytes(
                    "ERR respite: a compressed value changed between MULTI and EXEC; run the transaction again",
                ));
            } else if *map {
                out.extend_from_slice(&array_as_map(&buf[pos..end]));
            } else {
                out.extend_from_slice(&buf[pos..end]);
            }
            Ok(end)
        }
        Decode::Replace(r) => {
            let end = skip(buf, pos)?;
            out.extend_from_slice(r);
            Ok(end)
        }
        Decode::None => {
            let end = skip(buf, pos)?;
            out.extend_from_slice(&buf[pos..end]);
            Ok(end)
        }
        Decode::Bulk => {
            let end = skip(buf, pos)?;
            if t != b'$' {
                out.extend_from_slice(&buf[pos..end]);
                return Ok(end);
            }
            let (n, body) = header_len(buf, pos)?;
            if n < 0 {
                out.extend_from_slice(&buf[pos..end]);
                return Ok(end);
            }
            let payload = &buf[body..body + n as usize];
            if !compress::is_compressed(payload) {
                out.extend_from_slice(&buf[pos..end]);
                return Ok(end);
            }
            match codec.decode_bulk_into(payload, out) {
                Ok(()) => {
                    stats.decompressed.fetch_add(1, Ordering::Relaxed);
                    Ok(end)
                }
                Err(e) => Err(Fail::Corrupt(e)),
            }
        }
        Decode::Array | Decode::Pairs | Decode::Exec(_) | Decode::Seq(_) => {
            if !matches!(t, b'*' | b'~' | b'%') {
                let end = skip(buf, pos)?;
                out.extend_from_slice(&buf[pos..end]);
                return Ok(end);
            }
            let (n, mut p) = header_len(buf, pos)?;
            out.extend_from_slice(&buf[pos..p]);
            if n < 0 {
                return Ok(p);
            }
            let n = if t == b'%' {
                n as usize * 2
            } else {
                n as usize
            };
            for i in 0..n {
                let sub = match d {
                    Decode::Array => Decode::Bulk,
                    Decode::Pairs => {
                        if buf.get(p) == Some(&b'*') {
                            // [field, value] under RESP3.
                            Decode::Exec(vec![Decode::None, Decode::Bulk])
                        } else if i % 2 == 1 {
                            Decode::Bulk
                        } else {
                            Decode::None
                        }
                    }
                    Decode::Exec(v) => v.get(i).cloned().unwrap_or(Decode::None),
                    _ => Decode::None,
                };
                if matches!(d, Decode::Exec(_)) {
                    p = element(buf, p, &sub, codec, stats, out)?;
                } else {
                    p = transform(buf, p, &sub, codec, stats, out)?;
                }
            }
            Ok(p)
        }
    }
}

/// Arguments in range for the command's arity (otherwise Redis' own
/// arity error is wanted, which a script would reword).
pub fn arity_ok(id: usize, args: &[Bytes]) -> bool {
    arity_ok_n(id, args.len())
}

/// [`arity_ok`] for `n` arguments (the command name included).
pub fn arity_ok_n(id: usize, n: usize) -> bool {
    match command::spec(id) {
        Some(s) if s.arity >= 0 => n == s.arity as usize,
        Some(s) => n >= (-s.arity) as usize,
        None => false,
    }
}

/// The reply of a reader of one value, computed from the decoded value the
/// script just read atomically, where Redis' answer follows from the value
/// and the arguments alone: STRLEN and HSTRLEN, GETRANGE and SUBSTR, and
/// GETBIT inside the value. No temporary copy is written, so these also
/// work where Redis refuses writes (OOM, read-only replica), and they cost
/// one round trip fewer. `None` runs the command in Redis on a copy:
/// arguments Redis refuses (its own error), and a GETBIT past the value
/// (Redis checks that offset against its configured proto-max-bulk-len).
pub fn local_answer(cmd: &[Bytes], value: &[u8]) -> Option<Bytes> {
    let name = cmd.first()?;
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    let mut out = BytesMut::new();
    if (is(b"STRLEN") && cmd.len() == 2) || (is(b"HSTRLEN") && cmd.len() == 3) {
        crate::resp::int(&mut out, value.len() as i64);
    } else if (is(b"GETRANGE") || is(b"SUBSTR")) && cmd.len() == 4 {
        let range = getrange(value, redis_ll(&cmd[2])?, redis_ll(&cmd[3])?);
        crate::resp::bulk(&mut out, range);
    } else if is(b"GETBIT") && cmd.len() == 3 {
        let offset = u64::try_from(redis_ll(&cmd[2])?).ok()?;
        let byte = *value.get(usize::try_from(offset >> 3).ok()?)?;
        crate::resp::int(&mut out, i64::from(byte >> (7 - (offset & 7)) & 1));
    } else {
        return None;
    }
    Some(out.freeze())
}

/// Redis' `getrangeCommand` on `value` (t_string.c, 6.2-7.x).
fn getrange(value: &[u8], mut start: i64, mut end: i64) -> &[u8] {
    if start < 0 && end < 0 && start > end {
        return b"";
    }
    let len = value.len() as i64;
    if start < 0 {
        start = len.wrapping_add(start);
    }
    if end < 0 {
        end = len.wrapping_add(end);
    }
    start = start.max(0);
    end = end.max(0);
    if end >= len {
        end = len - 1;
    }
    if start > end || len == 0 {
        return b"";
    }
    &value[start as usize..=end as usize]
}

/// An integer argument as Redis' `string2ll` reads it: no sign but '-', no
/// leading zeros, no spaces, within i64.
fn redis_ll(s: &[u8]) -> Option<i64> {
    if s == b"0" {
        return Some(0);
    }
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    if !matches!(digits.first(), Some(b'1'..=b'9')) {
        return None;
    }
    crate::resp::parse_int(s)
}

/// A key (or hash field) a byte-level command reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: Bytes,
    /// `Some(field)` for a hash field.
    pub field: Option<Bytes>,
    /// Where the key appears in the command (`LCS k k` names it twice).
    pub at: Vec<usize>,
}

/// What a byte-level command reads.
pub fn targets(k: Kind, id: usize, args: &[Bytes]) -> Vec<Target> {
    match k {
        Kind::HashBytes | Kind::HIncr => vec![Target {
            key: args[1].clone(),
            field: Some(args[2].clone()),
            at: vec![1],
        }],
        _ => {
            // BITOP's destination is included: it is overwritten, and the
            // script frames it if the result begins with the magic. Each key
            // once, or the script would frame a value twice.
            let mut out: Vec<Target> = Vec::new();
            for i in command::key_positions(args, Some(id)) {
                let Some(a) = args.get(i) else { continue };
                match out.iter_mut().find(|t| t.key == *a) {
                    Some(t) => t.at.push(i),
                    None => out.push(Target {
                        key: a.clone(),
                        field: None,
                        at: vec![i],
                    }),
                }
            }
            out
        }
    }
}

/// Whether a byte-level command leaves every key as it is, as Redis runs
/// it: then the script answers it from temporary copies of the compressed
/// values and never writes the keys it reads (see [`SCRIPT`]). Writers are
/// recognised conservatively; a writer taken for a reader would lose its
/// write, a reader taken for a writer only rewrites the key uncompressed.
pub fn read_only(id: usize, args: &[Bytes]) -> bool {
    match command::name(id) {
        "STRLEN" | "GETRANGE" | "SUBSTR" | "GETBIT" | "BITCOUNT" | "BITPOS" | "BITFIELD_RO"
        | "LCS" | "HSTRLEN" => true,
        // Only GET (and OVERFLOW) subcommands: Redis changes nothing.
        "BITFIELD" => !args
            .iter()
            .skip(2)
            .any(|a| a.eq_ignore_ascii_case(b"SET") || a.eq_ignore_ascii_case(b"INCRBY")),
        // Setting nothing returns the length and leaves the key alone.
        "SETRANGE" => args.len() == 4 && args[3].is_empty(),
        _ => false,
    }
}

/// Lua both scripts share. `probe`: the whole value of a key (hash field
/// when `kind` is `h`) when it starts with the magic, else nil (a string is
/// probed by its first 4 bytes before it is read whole). `raw_frame`: the
/// raw frame (format version 1, algorithm 0, LEB128 length) of value `v`,
/// for a value a writer left beginning with the magic.
macro_rules! lua_shared {
    () => {
        r#"
local function probe(key, kind, field)
  local v
  if kind == 'h' then
    v = redis.pcall('HGET', key, field)
  else
    v = redis.pcall('GETRANGE', key, 0, 3)
  end
  if type(v) == 'string' and string.sub(v, 1, 4) == '\254RSP' then
    if kind ~= 'h' then v = redis.pcall('GET', key) end
    return v
  end
  return nil
end
local function raw_frame(v)
  local len = #v
  local h = {'\254RSP\1\0'}
  repeat
    local b = len % 128
    len = (len - b) / 128
    if len > 0 then b = b + 128 end
    table.insert(h, string.char(b))
  until len == 0
  return table.concat(h) .. v
end
"#
    };
}

/// Checks the keys (hash fields) a byte-level command reads and runs the
/// command on plain values, all in one atomic step; reports frames it did
/// not expect, for the proxy to decode and send back as expectations.
///
/// ARGV: `q` when queued in MULTI (else `-`), number of targets, mode,
/// number of expectations;
/// three slots per target (`s`/`h`, hash field, the target's positions in
/// the command); three per expectation (target number, frame, decoded
/// value; a target may have several); then the command (none: only
/// report). Every expectation pairs a frame with the value respite decoded
/// from it or encoded into it.
///
/// Mode `r` (readers): each expected frame is copied, decoded, to a
/// temporary key that the command then reads instead, and the copies are
/// deleted before the script returns. Nobody else can observe them (a
/// script is atomic), and the key read is never written, so WATCH,
/// keyspace notifications and the stored frame are as for a plain read.
/// The copies are not replicated or written to the AOF: their net effect is
/// nothing. Mode `w` (writers): each expected frame is rewritten plain in
/// place (TTL kept) and the command runs on it, which is a write anyway.
pub const SCRIPT: &str = concat!(
    lua_shared!(),
    r#"
local n, m = tonumber(ARGV[2]), tonumber(ARGV[4])
local function slot(i) return 5 + (i - 1) * 3 end
-- The decoded value of frame v when it is expected in target i.
local function expected(i, v)
  for e = 6 + n * 3, 3 + n * 3 + m * 3, 3 do
    if tonumber(ARGV[e - 1]) == i and ARGV[e] == v then return ARGV[e + 1] end
  end
  return nil
end
-- probe() of target i.
local function marked(i)
  local o = slot(i)
  return probe(KEYS[i], ARGV[o], ARGV[o + 1])
end
-- The payload of a raw frame (version 1, algorithm 0), else nil: it needs
-- no LZ4, so a run queued in MULTI (ARGV[1] 'q') or with expectations
-- takes a raw frame it did not expect as it is, e.g. one a byte-level
-- writer queued earlier in the same transaction left. (A first run outside
-- MULTI reports it: the proxy may answer from it without any write.)
local function raw_value(v)
  if string.sub(v, 5, 6) ~= '\1\0' then return nil end
  local len, mul, p = 0, 1, 7
  while true do
    local b = string.byte(v, p)
    if not b or p > 16 then return nil end
    p = p + 1
    if b < 128 then
      len = len + b * mul
      break
    end
    len = len + (b - 128) * mul
    mul = mul * 128
  end
  if #v - p + 1 ~= len then return nil end
  return string.sub(v, p)
end
local found = {}
local plain = {}
for i = 1, n do
  local v = marked(i)
  if v then
    local d = expected(i, v)
    if not d and (m > 0 or ARGV[1] == 'q') then d = raw_value(v) end
    if d then
      plain[i] = d
    else
      table.insert(found, i)
      table.insert(found, v)
    end
  end
end
if #found > 0 then
  table.insert(found, 1, '\254RSP-RESPITE-CAS')
  return found
end
local first = 5 + n * 3 + m * 3
if #ARGV < first then
  -- Without a command: report only (probe).
  return 1
end
if ARGV[3] == 'r' then
  local cmd = {unpack(ARGV, first)}
  local copies = {}
  local err
  if next(plain) then
    -- Older servers that replicate scripts verbatim refuse this; the
    -- replica then runs the same script, which is harmless.
    pcall(redis.set_repl, redis.REPL_NONE)
  end
  for i, d in pairs(plain) do
    local o = slot(i)
    local t = KEYS[i] .. '\254RSP-respite-read'
    while true do
      local e = redis.pcall('EXISTS', t)
      if type(e) ~= 'number' then err = e break end
      if e == 0 then break end
      t = t .. '~'
    end
    if err then break end
    local r
    if ARGV[o] == 'h' then
      r = redis.pcall('HSET', t, ARGV[o + 1], d)
    else
      r = redis.pcall('SET', t, d)
    end
    -- Refused (OOM, ACL …): answer with Redis' error, leave nothing behind.
    if type(r) == 'table' and r.err then err = r break end
    table.insert(copies, t)
    for p in string.gmatch(ARGV[o + 2], '%d+') do cmd[tonumber(p) + 1] = t end
  end
  local r = err
  if not err then
    r = redis.pcall(unpack(cmd))
  end
  for _, t in ipairs(copies) do
    local d = redis.pcall('DEL', t)
    if type(d) == 'table' and d.err then r = d end
  end
  return r
end
for i, d in pairs(plain) do
  local o = slot(i)
  if ARGV[o] == 'h' then
    redis.call('HSET', KEYS[i], ARGV[o + 1], d)
  else
    redis.call('SET', KEYS[i], d, 'KEEPTTL')
  end
end
-- The command runs in RESP2 whatever the client speaks: a RESP3 null
-- becomes a Lua nil, which cuts an array short (BITFIELD ... OVERFLOW FAIL),
-- and a RESP3 map comes back in Lua's key order. RESP2's false is answered
-- as the caller's own null; LCS IDX's map is rebuilt by the proxy
-- (lcs_map).
local r = redis.pcall(unpack(ARGV, first))
-- A value the command left beginning with the magic is stored in a raw
-- frame, so that it reads back as it is.
for i = 1, n do
  local o = slot(i)
  local v = marked(i)
  if v then
    if ARGV[o] == 'h' then
      redis.call('HSET', KEYS[i], ARGV[o + 1], raw_frame(v))
    else
      redis.call('SET', KEYS[i], raw_frame(v), 'KEEPTTL')
    end
  end
end
return r
"#
);

/// A run of byte-level commands a client pipelined, in one script: each
/// runs in order as [`SCRIPT`]'s first run would run it (the command when
/// none of its targets is compressed, then the raw framing of a value a
/// writer left beginning with the magic), until one finds a compressed
/// target: that one and those after it do not run, so the proxy emulates
/// it with [`SCRIPT`] and goes on after it, and every command still runs
/// in the client's order. Everything is `pcall`ed: a script that stopped
/// half-way on an error would leave the proxy unable to tell which
/// commands ran.
///
/// `KEYS`: every command's targets in order. `ARGV[1]`: the number of
/// commands; then per command: its number of targets, `r` or `w`, a type
/// (`s`/`h`) and field per target, its number of arguments, the arguments.
/// Returns `{commands run, reply, reply, …}`.
pub const BATCH_SCRIPT: &str = concat!(
    lua_shared!(),
    r#"
local out = {0}
local a, k = 2, 1
for c = 1, tonumber(ARGV[1]) do
  local t, rw = tonumber(ARGV[a]), ARGV[a + 1]
  local tk, ta = k, a + 2
  for i = 0, t - 1 do
    if probe(KEYS[tk + i], ARGV[ta + i * 2], ARGV[ta + i * 2 + 1]) then
      return out
    end
  end
  k = tk + t
  a = ta + t * 2
  local n = tonumber(ARGV[a])
  local r = redis.pcall(unpack(ARGV, a + 1, a + n))
  a = a + n + 1
  if rw == 'w' then
    for i = 0, t - 1 do
      local kind, field = ARGV[ta + i * 2], ARGV[ta + i * 2 + 1]
      local v = probe(KEYS[tk + i], kind, field)
      if type(v) == 'string' then
        local e
        if kind == 'h' then
          e = redis.pcall('HSET', KEYS[tk + i], field, raw_frame(v))
        else
          e = redis.pcall('SET', KEYS[tk + i], raw_frame(v), 'KEEPTTL')
        end
        -- Refused: the command's answer is that error, as SCRIPT's is.
        if type(e) == 'table' and e.err then r = e end
      end
    end
  end
  out[1] = c
  out[c + 1] = r
end
return out
"#
);

/// SHA1 of [`BATCH_SCRIPT`] in hex.
pub static BATCH_SHA: LazyLock<Bytes> = LazyLock::new(|| sha1_hex(BATCH_SCRIPT));

/// One command of a [`BATCH_SCRIPT`] run.
pub struct Batched {
    pub targets: Vec<Target>,
    pub read: bool,
    pub args: Vec<Bytes>,
}

/// `EVAL BATCH_SCRIPT …` for `cmds`.
pub fn batch_args(cmds: &[Batched]) -> Vec<Bytes> {
    let keys: usize = cmds.iter().map(|c| c.targets.len()).sum();
    let mut a =
        Vec::with_capacity(4 + keys * 3 + cmds.iter().map(|c| c.args.len() + 3).sum::<usize>());
    a.push(Bytes::from_static(b"EVAL"));
    a.push(Bytes::from_static(BATCH_SCRIPT.as_bytes()));
    a.push(Bytes::from(keys.to_string()));
    for c in cmds {
        a.extend(c.targets.iter().map(|t| t.key.clone()));
    }
    a.push(Bytes::from(cmds.len().to_string()));
    for c in cmds {
        a.push(Bytes::from(c.targets.len().to_string()));
        a.push(Bytes::from_static(if c.read { b"r" } else { b"w" }));
        for t in &c.targets {
            a.push(Bytes::from_static(if t.field.is_some() {
                b"h"
            } else {
                b"s"
            }));
            a.push(t.field.clone().unwrap_or_default());
        }
        a.push(Bytes::from(c.args.len().to_string()));
        a.extend(c.args.iter().cloned());
    }
    a
}

/// The replies of the commands a [`BATCH_SCRIPT`] run ran, in order (fewer
/// than it was given when it stopped at a compressed value); `None` when
/// `reply` is not the script's answer (an error for the whole call: then
/// none of them ran).
pub fn split_batch(reply: &Bytes) -> Option<Vec<Bytes>> {
    if !reply.starts_with(b"*") {
        return None;
    }
    let (n, p) = header_len(reply, 0).ok()?;
    if reply.get(p) != Some(&b':') {
        return None;
    }
    let (ran, mut p) = header_len(reply, p).ok()?;
    let mut frames = Vec::new();
    for _ in 1..n {
        let end = skip(reply, p).ok()?;
        frames.push(reply.slice(p..end));
        p = end;
    }
    (p == reply.len() && usize::try_from(ran).ok()? == frames.len()).then_some(frames)
}

fn sha1_hex(script: &str) -> Bytes {
    use sha1::{Digest, Sha1};
    Bytes::from(hex::encode(Sha1::digest(script.as_bytes())))
}

/// SHA1 of [`SCRIPT`] in hex, for EVALSHA: the script's ~3.5 KiB need not
/// travel, and be hashed by Redis, with every command.
pub static SCRIPT_SHA: LazyLock<Bytes> = LazyLock::new(|| sha1_hex(SCRIPT));

const MARKER: &[u8] = b"\xFERSP-RESPITE-CAS";

/// Whether the reply [`SCRIPT`] gives for `cmd` must become a RESP3 map:
/// LCS ... IDX answers a RESP3 client with a map, and the script runs the
/// command in RESP2 (see the script), where it is a flat array.
pub fn lcs_map(cmd: &[Bytes], resp3: bool) -> bool {
    resp3 && cmd.first().is_some_and(|c| c.eq_ignore_ascii_case(b"LCS"))
}

/// A flat array frame (`*2n`) as the map of its pairs (`%n`), in order;
/// anything else (LCS without IDX: a bulk or an integer; errors) unchanged.
pub fn array_as_map(frame: &[u8]) -> Bytes {
    let Some(rest) = frame.strip_prefix(b"*") else {
        return Bytes::copy_from_slice(frame);
    };
    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
        return Bytes::copy_from_slice(frame);
    };
    match std::str::from_utf8(&rest[..eol])
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n) if n % 2 == 0 => {
            let mut out = BytesMut::with_capacity(frame.len());
            out.extend_from_slice(format!("%{}", n / 2).as_bytes());
            out.extend_from_slice(&rest[eol..]);
            out.freeze()
        }
        _ => Bytes::copy_from_slice(frame),
    }
}

/// One attempt: the `EVAL` arguments. `read` selects mode `r` of
/// [`SCRIPT`] (see [`read_only`]). `queued`: the script runs at EXEC,
/// where it cannot report back and so takes raw frames as they are.
pub fn script_args(
    targets: &[Target],
    expect: &[Expect],
    queued: bool,
    read: bool,
    cmd: &[Bytes],
) -> Vec<Bytes> {
    let mut a = Vec::with_capacity(7 + targets.len() * 4 + expect.len() * 3 + cmd.len());
    a.push(Bytes::from_static(b"EVAL"));
    a.push(Bytes::from_static(SCRIPT.as_bytes()));
    a.push(Bytes::from(targets.len().to_string()));
    for t in targets {
        a.push(t.key.clone());
    }
    a.push(Bytes::from_static(if queued { b"q" } else { b"-" }));
    a.push(Bytes::from(targets.len().to_string()));
    a.push(Bytes::from_static(if read { b"r" } else { b"w" }));
    a.push(Bytes::from(expect.len().to_string()));
    for t in targets {
        a.push(Bytes::from_static(if t.field.is_some() {
            b"h"
        } else {
            b"s"
        }));
        a.push(t.field.clone().unwrap_or_default());
        let at: Vec<String> = t.at.iter().map(|p| p.to_string()).collect();
        a.push(Bytes::from(at.join(" ")));
    }
    for e in expect {
        a.push(Bytes::from((e.target + 1).to_string()));
        a.push(e.stored.clone());
        a.push(e.value.clone());
    }
    a.extend(cmd.iter().cloned());
    a
}

/// The frames a script reported: `(target index, stored bytes)`, or `None`
/// when `reply` is the command's own reply.
pub fn script_report(reply: &[u8]) -> Option<Vec<(usize, Bytes)>> {
    if !reply.starts_with(b"*") {
        return None;
    }
    let (n, mut p) = header_len(reply, 0).ok()?;
    let (_, body) = header_len(reply, p).ok()?;
    if reply.get(p) != Some(&b'$') || reply.get(body..body + MARKER.len()) != Some(MARKER) {
        return None;
    }
    p = skip(reply, p).ok()?;
    let mut out = Vec::new();
    for _ in 0..(n - 1) / 2 {
        let (i, q) = header_len(reply, p).ok()?;
        let (len, body) = header_len(reply, q).ok()?;
        let v = Bytes::copy_from_slice(reply.get(body..body + len.max(0) as usize)?);
        p = skip(reply, q).ok()?;
        out.push(((i - 1).max(0) as usize, v));
    }
    Some(out)
}

/// Adds compression counters to the Prometheus text.
pub fn render_prometheus(m: &Metrics, s: &mut String) {
    use std::fmt::Write;
    for (k, v) in m.compression.render() {
        let _ = writeln!(s, "# TYPE respite_compression_{k} gauge");
        let _ = writeln!(s, "respite_compression_{k} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_read_as_redis_reads_them() {
        for (s, want) in [
            (&b"0"[..], Some(0)),
            (b"12", Some(12)),
            (b"-12", Some(-12)),
            (b"-9223372036854775808", Some(i64::MIN)),
            (b"9223372036854775807", Some(i64::MAX)),
            (b"9223372036854775808", None),
            (b"007", None),
            (b"-0", None),
            (b"+1", None),
            (b" 1", None),
            (b"1 ", None),
            (b"", None),
            (b"-", None),
        ] {
            assert_eq!(redis_ll(s), want, "{:?}", String::from_utf8_lossy(s));
        }
    }

    #[test]
    fn batch_replies_split_into_the_commands_that_ran() {
        let split = |r: &'static [u8]| split_batch(&Bytes::from_static(r));
        assert_eq!(
            split(b"*3\r\n:2\r\n$1\r\nx\r\n*2\r\n:1\r\n-ERR e\r\n"),
            Some(vec![
                Bytes::from_static(b"$1\r\nx\r\n"),
                Bytes::from_static(b"*2\r\n:1\r\n-ERR e\r\n")
            ])
        );
        assert_eq!(split(b"*1\r\n:0\r\n"), Some(vec![]), "stopped at the first");
        // Not the script's answer: an error, a count that does not match,
        // trailing or missing bytes.
        assert_eq!(split(b"-BUSY running\r\n"), None);
        assert_eq!(split(b"*2\r\n:2\r\n+OK\r\n"), None);
        assert_eq!(split(b"*2\r\n:1\r\n+OK\r\n+OK\r\n"), None);
        assert_eq!(split(b"*2\r\n:1\r\n$5\r\nab\r\n"), None);
        assert_eq!(split(b"*0\r\n"), None);
    }

    #[test]
    fn local_answers() {
        let b = |xs: &[&str]| {
            xs.iter()
                .map(|x| Bytes::from(x.to_string()))
                .collect::<Vec<_>>()
        };
        let v = b"0123456789";
        let ask = |xs: &[&str]| local_answer(&b(xs), v);
        assert_eq!(ask(&["strlen", "k"]).unwrap(), &b":10\r\n"[..]);
        assert_eq!(
            ask(&["GETRANGE", "k", "2", "4"]).unwrap(),
            &b"$3\r\n234\r\n"[..]
        );
        assert_eq!(
            ask(&["GETRANGE", "k", "-3", "-1"]).unwrap(),
            &b"$3\r\n789\r\n"[..]
        );
        assert_eq!(
            ask(&["GETRANGE", "k", "-1", "-3"]).unwrap(),
            &b"$0\r\n\r\n"[..]
        );
        assert_eq!(
            ask(&["SUBSTR", "k", "8", "100"]).unwrap(),
            &b"$2\r\n89\r\n"[..]
        );
        assert_eq!(ask(&["GETRANGE", "k", "a", "1"]), None, "Redis' own error");
        // '0' is 0x30: bits 2 and 3 are set.
        assert_eq!(ask(&["getbit", "k", "2"]).unwrap(), &b":1\r\n"[..]);
        assert_eq!(ask(&["getbit", "k", "0"]).unwrap(), &b":0\r\n"[..]);
        assert_eq!(
            ask(&["getbit", "k", "80"]),
            None,
            "past the value: Redis decides"
        );
        assert_eq!(ask(&["getbit", "k", "-1"]), None);
        assert_eq!(ask(&["BITCOUNT", "k"]), None);
    }

    fn codec() -> Codec {
        Codec {
            min_bytes: 16,
            ..Codec::default()
        }
    }

    #[test]
    fn decodes_value_positions_only() {
        let c = codec();
        let st = Stats::default();
        let v = vec![b'a'; 200];
        let f = c.encode(&v).unwrap();
        let mut r = BytesMut::new();
        crate::resp::array_header(&mut r, 4);
        crate::resp::bulk(&mut r, &f);
        crate::resp::bulk(&mut r, &f);
        crate::resp::bulk(&mut r, b"x");
        crate::resp::bulk(&mut r, &f);
        let out = decode_reply(&Decode::Pairs, r.freeze(), &c, &st);
        let mut want = BytesMut::new();
        crate::resp::array_header(&mut want, 4);
        crate::resp::bulk(&mut want, &f);
        crate::resp::bulk(&mut want, &v);
        crate::resp::bulk(&mut want, b"x");
        crate::resp::bulk(&mut want, &v);
        assert_eq!(out, want.freeze());
    }

    #[test]
    fn exec_elements_fail_alone() {
        let c = codec();
        let st = Stats::default();
        let mut bad = compress::MAGIC.to_vec();
        bad.extend_from_slice(&[1, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        let mut r = BytesMut::new();
        crate::resp::array_header(&mut r, 2);
        crate::resp::bulk(&mut r, &bad);
        r.extend_from_slice(b"+OK\r\n");
        let out = decode_reply(
            &Decode::Exec(vec![Decode::Bulk, Decode::None]),
            r.freeze(),
            &c,
            &st,
        );
        assert!(out.starts_with(b"*2\r\n-ERR respite: corrupt compressed value ("));
        assert!(out.ends_with(b"+OK\r\n"));
    }

    fn cmd(parts: &[&str]) -> (usize, Vec<Bytes>) {
        let args: Vec<Bytes> = parts
            .iter()
            .map(|p| Bytes::copy_from_slice(p.as_bytes()))
            .collect();
        (command::id_of(parts[0]).unwrap(), args)
    }

    #[test]
    fn readers_and_writers() {
        for (c, read) in [
            (&["STRLEN", "k"][..], true),
            (&["LCS", "a", "b", "IDX"], true),
            (&["HSTRLEN", "h", "f"], true),
            (
                &["BITFIELD", "k", "GET", "u8", "0", "OVERFLOW", "SAT"],
                true,
            ),
            (
                &["BITFIELD", "k", "GET", "u8", "0", "incrby", "u8", "0", "1"],
                false,
            ),
            (&["BITFIELD", "k", "set", "u8", "0", "1"], false),
            (&["SETRANGE", "k", "5", ""], true),
            (&["SETRANGE", "k", "5", "x"], false),
            (&["APPEND", "k", ""], false),
            (&["HINCRBYFLOAT", "h", "f", "1"], false),
            (&["BITOP", "AND", "d", "a"], false),
        ] {
            let (id, args) = cmd(c);
            assert_eq!(read_only(id, &args), read, "{c:?}");
        }
    }

    #[test]
    fn targets_know_where_their_key_is() {
        let (id, args) = cmd(&["LCS", "k", "k", "LEN"]);
        let t = targets(Kind::Bytes, id, &args);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].at, vec![1, 2]);
        let (id, args) = cmd(&["BITOP", "AND", "d", "a", "d"]);
        let t = targets(Kind::Bytes, id, &args);
        let at: Vec<_> = t.iter().map(|t| (t.key.clone(), t.at.clone())).collect();
        assert_eq!(
            at,
            vec![(Bytes::from("d"), vec![2, 4]), (Bytes::from("a"), vec![3])]
        );
        let (id, args) = cmd(&["HSTRLEN", "h", "f"]);
        let t = targets(Kind::HashBytes, id, &args);
        assert_eq!(t[0].field.as_deref(), Some(&b"f"[..]));
        assert_eq!(t[0].at, vec![1]);
    }

    #[test]
    fn queued_writes_become_expectations() {
        let c = codec();
        let st = Stats::default();
        let policy = Policy {
            codec: c.clone(),
            exclude: &[],
        };
        let v = Bytes::from(vec![b'a'; 300]);
        let (_, args) = cmd(&["SET", "k", "x"]);
        let args = vec![args[0].clone(), args[1].clone(), v.clone()];
        let (new, _, written) = rewrite_write(Write::Set, &args, &policy, &st);
        let frame = new.unwrap()[2].clone();
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].stored, frame);
        let tx = Tx {
            multi: true,
            queued: Vec::new(),
            written,
        };
        let (id, args) = cmd(&["LCS", "j", "k"]);
        let t = targets(Kind::Bytes, id, &args);
        let mut expect = Vec::new();
        expect_queued(&tx, &t, &mut expect);
        assert_eq!(
            expect,
            vec![Expect {
                target: 1,
                stored: frame,
                value: v
            }]
        );
        // The same frame found by the probe is not sent twice.
        expect_queued(&tx, &t, &mut expect);
        assert_eq!(expect.len(), 1);
    }

    #[test]
    fn report_parses() {
        let mut r = BytesMut::new();
        crate::resp::array_header(&mut r, 3);
        crate::resp::bulk(&mut r, MARKER);
        crate::resp::int(&mut r, 2);
        crate::resp::bulk(&mut r, b"\xFERSPxx");
        assert_eq!(
            script_report(&r),
            Some(vec![(1, Bytes::from_static(b"\xFERSPxx"))])
        );
        assert_eq!(script_report(b"*1\r\n:1\r\n"), None);
    }
}
