//! L1: the in-process near cache.
//!
//! Entries are keyed by (db, key) and hold either the reply frame of GET
//! or the fields of a hash that HGET, HMGET and HGETALL read (one entry per
//! hash, so one invalidation of the key drops every field). Redis' tracking
//! names keys without their db, so an invalidation removes the key from
//! every db. Coherence rests on three rules:
//!
//! 1. Fills are read over RESP3 connections with `CLIENT TRACKING ON`, routed
//!    by key hash, so every read of a key and every invalidation Redis sends
//!    for it travel on one socket, in order.
//! 2. A fill carries the token of its pending marker; an invalidation (from
//!    Redis or from a write through this proxy) removes the marker, and a
//!    fill whose marker is gone is discarded instead of installed. A flush
//!    bumps the epoch, which voids every marker at once.
//! 3. Losing a tracking connection flushes L1 and stops hits until tracking
//!    is back, since invalidations may have been missed.

use crate::config::{L1Config, L1Mode};
use crate::l1map::{Get, L1Map, Weigh};
use bytes::Bytes;
use dashmap::DashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct L1Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fills: AtomicU64,
    pub discarded_fills: AtomicU64,
    pub invalidations: AtomicU64,
    pub flushes: AtomicU64,
    pub evicted_size: AtomicU64,
    pub evicted_expired: AtomicU64,
    /// Fills not stored because TinyLFU judged the key colder than the
    /// entry it would have displaced.
    pub rejected: AtomicU64,
    pub coalesced: AtomicU64,
}

/// What L1 holds for one key.
pub enum Entry {
    /// GET's reply: the value's RESP3 bulk string (decoded), or `_`.
    Frame(Bytes),
    /// Boxed, so a slot weighs no more than a frame's.
    Hash(Box<HashFields>),
}

impl Weigh for Entry {
    fn weight(&self) -> usize {
        match self {
            Entry::Frame(f) => f.len(),
            Entry::Hash(h) => h.weight(),
        }
    }
}

/// Fields of one hash as HGET, HMGET and HGETALL read them: a field's
/// frame is its value's RESP3 bulk string (decoded), or `_` for a field
/// read as missing.
#[derive(Default)]
pub struct HashFields {
    fields: hashbrown::HashMap<Bytes, Bytes, foldhash::fast::RandomState>,
    /// HGETALL's reply (a RESP3 map), when it was read: `fields` then holds
    /// every field of the hash (slices of this frame), and a field not in
    /// it does not exist.
    all: Option<Bytes>,
    /// Bytes of the buffers the fields point into: names and frames, or
    /// HGETALL's reply.
    bytes: usize,
}

impl HashFields {
    /// What it holds, all told: the buffers, the field table's allocation
    /// (two buffer handles per field, and spare capacity), itself, and the
    /// allocator's headers and rounding: of its box and table, and of each
    /// field's two buffers and their shared headers (measured: RSS grew
    /// ~17% past the count without them).
    fn weight(&self) -> usize {
        self.bytes
            + self.fields.allocation_size()
            + std::mem::size_of::<HashFields>()
            + 32
            + 64 * self.fields.len()
    }

    /// What a fill of `read` brought (its reply decoded, RESP3); None when
    /// the reply is no answer to it (an error, WRONGTYPE included). Names
    /// are copied: the request's are slices of the client's read buffer,
    /// which an entry must not keep alive.
    fn from_fill(read: &HashRead, frame: &Bytes) -> Option<HashFields> {
        let elems = crate::resp::elements(frame)?;
        let mut h = HashFields::default();
        if let HashRead::All = read {
            if frame.first() != Some(&b'%') {
                return None;
            }
            h.fields.reserve(elems.len() / 2);
            for pair in elems.chunks_exact(2) {
                let name = crate::resp::bulk_payload(&pair[0])?;
                if pair[1].first() != Some(&b'$') {
                    return None;
                }
                h.fields.insert(pair[0].slice_ref(name), pair[1].clone());
            }
            h.bytes = frame.len();
            h.all = Some(frame.clone());
            return Some(h);
        }
        let names = read.names();
        if frame.first() != Some(&b'*') || elems.len() != names.len() {
            return None;
        }
        for (name, f) in names.iter().zip(elems) {
            if f.first() != Some(&b'$') && f[..] != NIL[..] {
                return None;
            }
            h.add(Bytes::copy_from_slice(name), f);
        }
        Some(h)
    }

    fn add(&mut self, name: Bytes, frame: Bytes) {
        let (name_len, frame_len) = (name.len(), frame.len());
        match self.fields.insert(name, frame) {
            // A name already held (HMGET k f f) weighs once.
            Some(old) => self.bytes = self.bytes + frame_len - old.len(),
            None => self.bytes += name_len + frame_len,
        }
    }

    /// `fresh` added to what this entry holds: both were read with no
    /// invalidation of the key since (it would have removed the entry, or
    /// voided the fill), so both hold now. A whole hash already read stays
    /// as it is; past `limit` bytes, `fresh` alone.
    fn merge(mut self: Box<Self>, fresh: Box<HashFields>, limit: usize) -> Box<HashFields> {
        if self.all.is_some() || fresh.all.is_some() {
            return if self.all.is_some() { self } else { fresh };
        }
        if self.weight() + fresh.weight() > limit {
            return fresh;
        }
        let HashFields { fields, .. } = *fresh;
        for (name, f) in fields {
            self.add(name, f);
        }
        self
    }

    /// A field's frame, `_` for one known not to exist; None: not known.
    fn field(&self, name: &[u8]) -> Option<Bytes> {
        match self.fields.get(name) {
            Some(f) => Some(f.clone()),
            None if self.all.is_some() => Some(Bytes::from_static(NIL)),
            None => None,
        }
    }

    /// What answers `read`, if this holds all it asks for: the frames of
    /// its fields in order, or HGETALL's map. Handles only, so the shard
    /// is held for no copy; `HashRead::reply` makes the reply of them.
    fn pick(&self, read: &HashRead) -> Option<Vec<Bytes>> {
        match read {
            HashRead::All => self.all.clone().map(|a| vec![a]),
            _ => read.names().iter().map(|f| self.field(f)).collect(),
        }
    }
}

/// What a hash read asks L1 for.
#[derive(Clone, Debug)]
pub enum HashRead {
    /// HGET key field.
    Field(Bytes),
    /// HMGET key field [field ...].
    Fields(Vec<Bytes>),
    /// HGETALL key.
    All,
}

impl HashRead {
    /// The command that reads it on a fill: HGET is read as a one-field
    /// HMGET, so both install the same way.
    pub fn fill_command(&self, key: &Bytes) -> Vec<Bytes> {
        match self {
            HashRead::All => vec![Bytes::from_static(b"HGETALL"), key.clone()],
            _ => [Bytes::from_static(b"HMGET"), key.clone()]
                .into_iter()
                .chain(self.names().iter().cloned())
                .collect(),
        }
    }

    fn names(&self) -> &[Bytes] {
        match self {
            HashRead::Field(f) => std::slice::from_ref(f),
            HashRead::Fields(fs) => fs,
            HashRead::All => &[],
        }
    }

    /// Whether a fill of `self` answers `other` too (a miss of `other`
    /// may wait for it instead of reading).
    fn covers(&self, other: &HashRead) -> bool {
        match (self, other) {
            (HashRead::All, _) => true,
            (_, HashRead::All) => false,
            _ => {
                let (mine, theirs) = (self.names(), other.names());
                // Called under the marker's lock: no quadratic walk of two
                // long field lists there.
                if mine.len().saturating_mul(theirs.len()) <= 256 {
                    theirs.iter().all(|n| mine.contains(n))
                } else {
                    let set: std::collections::HashSet<&Bytes> = mine.iter().collect();
                    theirs.iter().all(|n| set.contains(n))
                }
            }
        }
    }

    /// The reply a client of `resp3` or not is shown, from what
    /// `HashFields::pick` found for this read.
    fn reply(&self, picked: Vec<Bytes>, resp3: bool) -> Bytes {
        let field = |f: Bytes| {
            if !resp3 && f[..] == NIL[..] {
                Bytes::from_static(NIL_RESP2)
            } else {
                f
            }
        };
        match self {
            HashRead::All => match picked.into_iter().next() {
                Some(m) if resp3 => m,
                Some(m) => map_for_client(&m, false),
                None => Bytes::new(),
            },
            HashRead::Field(_) => picked.into_iter().next().map(field).unwrap_or_default(),
            HashRead::Fields(fs) => {
                let mut out = bytes::BytesMut::new();
                crate::resp::array_header(&mut out, fs.len());
                for f in picked {
                    out.extend_from_slice(&field(f));
                }
                out.freeze()
            }
        }
    }
}

/// A RESP3 map of bulk strings as a client of `resp3` or not sees it:
/// RESP2 has a flat array of twice as many elements.
fn map_for_client(map: &[u8], resp3: bool) -> Bytes {
    if resp3 || map.first() != Some(&b'%') {
        return Bytes::copy_from_slice(map);
    }
    let Some(eol) = map.iter().position(|&b| b == b'\r') else {
        return Bytes::copy_from_slice(map);
    };
    let n = crate::resp::parse_int(&map[1..eol]).unwrap_or(0);
    let mut out = bytes::BytesMut::with_capacity(map.len() + 4);
    crate::resp::array_header(&mut out, 2 * n.max(0) as usize);
    out.extend_from_slice(&map[eol + 2..]);
    out.freeze()
}

/// What a hash read should do.
pub enum HashLookup {
    /// The reply, ready for the client.
    Hit(Bytes),
    /// Read through the tracking connection and complete with this token;
    /// the reply arrives on the receiver, as for every waiter.
    Fill(u64, FillRx),
    /// A fill that covers this read is in flight: its outcome, as this
    /// client must see it, arrives here.
    Wait(FillRx),
    Bypass,
}

/// A hash fill in flight, and what it reads.
struct HashPending {
    token: u64,
    since: Instant,
    db: u32,
    read: HashRead,
}

/// A session waiting for a hash fill, with what it asked and how it speaks.
type HashWaiter = (HashRead, bool, FillTx);

/// A fill in flight for one key.
struct Pending {
    token: u64,
    since: Instant,
    db: u32,
}

/// Hits up to this size are copied into the session's output buffer while
/// the shard is held; larger ones are shared (a copy would hold the shard
/// for longer than a refcount costs).
pub const COPY_MAX: usize = 16 * 1024;

/// The GET reply for a missing key as the tracking connections (RESP3)
/// read it, and as L1 holds it; RESP2 clients are served `$-1`.
pub const NIL: &[u8] = b"_\r\n";

/// RESP2's null bulk string: what a RESP2 client is shown for [`NIL`].
pub const NIL_RESP2: &[u8] = b"$-1\r\n";

/// `frame` as a client of the given protocol must see it: the cached
/// RESP3 nil becomes RESP2's null bulk string.
pub fn for_client(frame: Bytes, resp3: bool) -> Bytes {
    if !resp3 && frame[..] == NIL[..] {
        Bytes::from_static(NIL_RESP2)
    } else {
        frame
    }
}

/// A marker older than this belongs to a fill whose session vanished
/// before completing it; it no longer blocks new fills.
const STALE_PENDING: Duration = Duration::from_secs(30);

/// Sessions waiting for the outcome of one fill: its reply to GET (a RESP3
/// frame as the tracking connection read it, decoded) or the error.
pub type FillResult = Result<crate::upstream::Reply, crate::upstream::UpError>;
pub type FillRx = tokio::sync::oneshot::Receiver<FillResult>;
/// A waiter, and the output account of its client: a reply that arrived
/// but is not written yet counts against the client's output cap, as an
/// upstream reply does.
type FillTx = (
    tokio::sync::oneshot::Sender<FillResult>,
    Arc<crate::upstream::OutBytes>,
);

pub struct L1 {
    pub mode: L1Mode,
    map: L1Map<Entry>,
    pending: DashMap<Bytes, Pending>,
    /// Fills of hash fields in flight, by key. Apart from `pending` (GET's,
    /// which coalesce): several reads of different fields of one hash may
    /// be in flight at once. An invalidation removes both.
    hpending: DashMap<Bytes, Vec<HashPending>>,
    /// Sessions waiting for hash fills, by token (as `waiters`).
    hwaiters: DashMap<u64, Vec<HashWaiter>>,
    /// Waiters by fill token. Registered only under the key's marker lock
    /// while the marker holds that token, and drained by `complete` after
    /// the marker is gone, so no waiter is ever left behind. They live
    /// apart from the marker because an invalidation removes the marker
    /// (the value must not be installed) while the waiters still get it:
    /// they asked before that invalidation arrived, which is what makes a
    /// hit valid too.
    waiters: DashMap<u64, Vec<FillTx>>,
    next_token: AtomicU64,
    /// Tokens issued before this value belong to fills started before the
    /// last flush.
    epoch: AtomicU64,
    /// The dbs below 64 entries were ever installed for, one bit each: an
    /// invalidation names a key, not its db (Redis' tracking table has no
    /// dbs), so it removes the key from each of them.
    dbs: AtomicU64,
    /// The others (a server configured with more than 64 dbs), rarely any.
    high_dbs: std::sync::Mutex<Vec<u32>>,
    has_high_dbs: AtomicBool,
    /// Hash reads may be cached: the upstream is known to predate Redis
    /// 7.4, whose per-field TTLs a key's PTTL does not show (and whose
    /// expired fields are dropped, and invalidated, only when Redis gets to
    /// them), so an entry could outlive a field.
    hashes: AtomicBool,
    /// False while a tracking connection is missing: no hits, no fills.
    valid: AtomicBool,
    /// Tracking was refused (or mode is "ttl"): entries live at most
    /// `max_ttl` and connection loss does not matter.
    ttl_only: AtomicBool,
    max_ttl: Duration,
    max_value_bytes: usize,
    include: Vec<Vec<u8>>,
    exclude: Vec<Vec<u8>>,
    /// `include` holds "*" and `exclude` is empty.
    all_keys: bool,
    pub stats: Arc<L1Stats>,
}

/// What a GET should do.
pub enum Lookup {
    Hit(Bytes),
    /// A hit already appended to the caller's buffer.
    Copied(usize),
    /// Read through the tracking connection and install with this token;
    /// the outcome arrives on the receiver, as for every waiter.
    Fill(u64, FillRx),
    /// A fill of this key is in flight: its outcome arrives here
    /// (concurrent misses coalesce into one upstream read).
    Wait(FillRx),
    /// Read without filling (L1 off, not valid, ...).
    Bypass,
}

impl L1 {
    pub fn new(cfg: &L1Config) -> Option<Arc<Self>> {
        if cfg.mode == L1Mode::Off {
            return None;
        }
        let max_ttl = Duration::from_millis(cfg.max_ttl_ms.max(1));
        let stats = Arc::new(L1Stats::default());
        let map = L1Map::new(cfg.max_bytes, cfg.max_value_bytes);
        Some(Arc::new(L1 {
            mode: cfg.mode,
            map,
            pending: DashMap::new(),
            hpending: DashMap::new(),
            hwaiters: DashMap::new(),
            waiters: DashMap::new(),
            next_token: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
            dbs: AtomicU64::new(0),
            high_dbs: std::sync::Mutex::new(Vec::new()),
            has_high_dbs: AtomicBool::new(false),
            hashes: AtomicBool::new(false),
            valid: AtomicBool::new(cfg.mode == L1Mode::Ttl),
            ttl_only: AtomicBool::new(cfg.mode == L1Mode::Ttl),
            max_ttl,
            max_value_bytes: cfg.max_value_bytes,
            include: cfg.include.iter().map(|g| g.as_bytes().to_vec()).collect(),
            exclude: cfg.exclude.iter().map(|g| g.as_bytes().to_vec()).collect(),
            all_keys: cfg.include.iter().any(|g| g == "*") && cfg.exclude.is_empty(),
            stats,
        }))
    }

    /// Looks a key up for a GET. The caller makes sure no write of its
    /// session is in flight (a fill or a wait would not see that write).
    ///
    /// With `dst`, a hit of at most `COPY_MAX` bytes is appended to it
    /// (`Copied`) instead of being handed out as a `Bytes`.
    pub fn lookup(
        &self,
        db: u32,
        key: &[u8],
        out: &Arc<crate::upstream::OutBytes>,
        dst: Option<&mut Vec<u8>>,
    ) -> Lookup {
        if !self.fillable(db, key) {
            return Lookup::Bypass;
        }
        let found = self.map.get_with(db, key, Instant::now(), |e| {
            let Entry::Frame(frame) = e else {
                return None;
            };
            Some(match dst {
                Some(d) if frame.len() <= COPY_MAX => {
                    d.extend_from_slice(frame);
                    Lookup::Copied(frame.len())
                }
                _ => Lookup::Hit(frame.clone()),
            })
        });
        if let Some(hit) = self.found(found) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return hit;
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.fill_or_wait(db, key, out)
    }

    /// After a miss (counted by the caller): a fill of the key to start,
    /// or one in flight to wait for; Bypass when L1 cannot take this key.
    pub fn fill_or_wait(
        &self,
        db: u32,
        key: &[u8],
        out: &Arc<crate::upstream::OutBytes>,
    ) -> Lookup {
        if !self.fillable(db, key) {
            return Lookup::Bypass;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = (tx, out.clone());
        match self.pending.entry(Bytes::copy_from_slice(key)) {
            // The same key of another db (one marker per key name): read
            // without filling, a rare case.
            dashmap::Entry::Occupied(o)
                if o.get().db != db && o.get().since.elapsed() <= STALE_PENDING =>
            {
                Lookup::Bypass
            }
            dashmap::Entry::Occupied(o) if o.get().since.elapsed() <= STALE_PENDING => {
                // Registered while the marker's lock is held (see `waiters`).
                self.waiters.entry(o.get().token).or_default().push(tx);
                self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                Lookup::Wait(rx)
            }
            e => {
                // A stale marker's fill never completed; a new one replaces it.
                // The entry holds the lock: nobody can wait on this token
                // before its waiter list exists.
                let token = self.next_token.fetch_add(1, Ordering::Relaxed);
                self.waiters.insert(token, vec![tx]);
                e.insert(Pending {
                    token,
                    since: Instant::now(),
                    db,
                });
                Lookup::Fill(token, rx)
            }
        }
    }

    /// Whether L1 may serve this key now (and fill it on a miss): tracking
    /// is up (or not needed) and the key is one it caches.
    pub fn fillable(&self, db: u32, key: &[u8]) -> bool {
        self.valid.load(Ordering::Acquire) && self.cacheable(db, key)
    }

    /// The entry's frame unless it outlived its deadline (its key's PTTL
    /// or `max_ttl`).
    fn get(&self, db: u32, key: &[u8]) -> Option<Bytes> {
        self.found(self.map.get_with(db, key, Instant::now(), |e| match e {
            Entry::Frame(f) => Some(f.clone()),
            Entry::Hash(_) => None,
        }))
    }

    fn found<R>(&self, g: Get<R>) -> Option<R> {
        match g {
            Get::Hit(r) => Some(r),
            Get::Miss => None,
            Get::Expired => {
                self.stats.evicted_expired.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// `l1.include` / `l1.exclude`. The defaults ("*", nothing excluded)
    /// are settled at startup: walking the lists cost about 40 instructions
    /// per hit, for an answer that never changes.
    fn cacheable(&self, _db: u32, key: &[u8]) -> bool {
        if self.all_keys {
            return true;
        }
        let inc = self
            .include
            .iter()
            .any(|g| g == b"*" || crate::admin::glob(g, key));
        inc && !self.exclude.iter().any(|g| crate::admin::glob(g, key))
    }

    /// A hit without starting a fill (MGET: hits are served, misses fetched).
    pub fn peek(&self, db: u32, key: &[u8]) -> Option<Bytes> {
        if !self.fillable(db, key) {
            return None;
        }
        match self.get(db, key) {
            Some(frame) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(frame)
            }
            None => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Completes a fill: installs `frame` if still valid, then hands
    /// `outcome` to every waiter. `pttl` is the key's remaining time in ms
    /// as read atomically with the value (-1: no expiry, -2: missing).
    /// Returns whether the value was installed (admission may decline).
    pub fn complete(
        &self,
        key: &Bytes,
        token: u64,
        frame: Option<&Bytes>,
        pttl: i64,
        outcome: FillResult,
    ) -> bool {
        let installed = self.install(key, token, frame, pttl);
        // After the marker is gone: no new waiter can join this token.
        if let Some((_, ws)) = self.waiters.remove(&token) {
            for (w, out) in ws {
                if let Ok(r) = &outcome {
                    out.add(r.data.len());
                }
                if let Err(Ok(r)) = w.send(outcome.clone()) {
                    out.sub(r.data.len());
                }
            }
        }
        installed
    }

    fn install(&self, key: &Bytes, token: u64, frame: Option<&Bytes>, pttl: i64) -> bool {
        // The install happens while the pending marker's shard lock is held:
        // an invalidation removes the marker first (waiting for that lock),
        // then the entry, so it either voids this fill or removes what it
        // installed. Never a stale entry left behind.
        let dashmap::Entry::Occupied(marker) = self.pending.entry(key.clone()) else {
            if frame.is_some() {
                self.stats.discarded_fills.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        };
        if marker.get().token != token {
            if frame.is_some() {
                self.stats.discarded_fills.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        let current =
            token >= self.epoch.load(Ordering::Acquire) && self.valid.load(Ordering::Acquire);
        let ttl = self.lifetime(pttl);
        // The PTTL counts from before the fill was sent (the marker's
        // birth), not from now, so the entry dies no later than the key in
        // Redis. A fill slower than the key's remaining life installs nothing.
        let now = Instant::now();
        let deadline = marker.get().since + ttl;
        let installable = match frame {
            Some(f) => {
                current
                    // A missing key's nil is cached too: tracking remembers
                    // keys read whether or not they exist, so its creation
                    // invalidates the entry like any write.
                    && (pttl != -2 || f[..] == NIL[..])
                    && pttl != 0
                    && f.len() <= self.max_value_bytes
                    && deadline > now
            }
            None => false,
        };
        let mut installed = false;
        if let (true, Some(frame)) = (installable, frame) {
            let db = marker.get().db;
            self.note_db(db);
            let ev = self
                .map
                .insert(db, key, Entry::Frame(frame.clone()), deadline, now);
            installed = self.count_install(&ev);
        } else if frame.is_some() && !current {
            self.stats.discarded_fills.fetch_add(1, Ordering::Relaxed);
        }
        marker.remove();
        installed
    }

    /// Counts what an insert did; whether the value is in.
    fn count_install(&self, ev: &crate::l1map::Evicted) -> bool {
        self.stats
            .evicted_size
            .fetch_add(ev.size, Ordering::Relaxed);
        self.stats
            .evicted_expired
            .fetch_add(ev.expired, Ordering::Relaxed);
        let counter = if ev.rejected {
            &self.stats.rejected
        } else {
            &self.stats.fills
        };
        counter.fetch_add(1, Ordering::Relaxed);
        !ev.rejected
    }

    /// Looks up a hash read (HGET, HMGET, HGETALL). The caller makes sure
    /// no write of its session is in flight, as for `lookup`. On `Fill` the
    /// caller reads and calls `complete_hash` with the token, whatever
    /// happens.
    pub fn lookup_hash(
        &self,
        db: u32,
        key: &[u8],
        read: &HashRead,
        resp3: bool,
        out: &Arc<crate::upstream::OutBytes>,
    ) -> HashLookup {
        if !self.hashes.load(Ordering::Acquire) || !self.fillable(db, key) {
            return HashLookup::Bypass;
        }
        let found = self.map.get_with(db, key, Instant::now(), |e| match e {
            Entry::Hash(h) => h.pick(read),
            Entry::Frame(_) => None,
        });
        if let Some(picked) = self.found(found) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return HashLookup::Hit(read.reply(picked, resp3));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = (read.clone(), resp3, (tx, out.clone()));
        let mut marker = self
            .hpending
            .entry(Bytes::copy_from_slice(key))
            .or_default();
        // Registered while the marker's lock is held (see `waiters`).
        if let Some(p) = marker
            .iter()
            .find(|p| p.db == db && p.read.covers(read) && p.since.elapsed() <= STALE_PENDING)
        {
            self.hwaiters.entry(p.token).or_default().push(waiter);
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            return HashLookup::Wait(rx);
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.hwaiters.insert(token, vec![waiter]);
        marker.push(HashPending {
            token,
            since: Instant::now(),
            db,
            read: read.clone(),
        });
        HashLookup::Fill(token, rx)
    }

    /// HGET's hit path: a known field's frame (as a client of `resp3` or
    /// not sees it) appended to `dst` while the shard is held, as GET's
    /// small hits are; its length, or None for anything else (the caller
    /// goes through `lookup_hash`, which counts the miss).
    pub fn copy_field(
        &self,
        db: u32,
        key: &[u8],
        field: &[u8],
        resp3: bool,
        dst: &mut Vec<u8>,
    ) -> Option<usize> {
        if !self.hashes.load(Ordering::Acquire) || !self.fillable(db, key) {
            return None;
        }
        let found = self.map.try_get_with(db, key, Instant::now(), |e| {
            let Entry::Hash(h) = e else {
                return None;
            };
            let f: &[u8] = match h.fields.get(field) {
                Some(f) if f.len() <= COPY_MAX => f,
                Some(_) => return None,
                None if h.all.is_some() => NIL,
                None => return None,
            };
            let f = if !resp3 && f == NIL { NIL_RESP2 } else { f };
            dst.extend_from_slice(f);
            Some(f.len())
        });
        let n = self.found(found)?;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(n)
    }

    /// Completes a hash fill of `read`: `outcome` is its reply (decoded,
    /// RESP3) with the key's PTTL read atomically with it, or the failure.
    /// The fields are installed when no invalidation came since the
    /// lookup; every waiter gets the reply to its own read either way (it
    /// asked before that invalidation, as GET's waiters).
    pub fn complete_hash(
        &self,
        key: &Bytes,
        token: u64,
        read: &HashRead,
        outcome: Result<(Bytes, i64), crate::upstream::UpError>,
    ) {
        let fresh = match &outcome {
            Ok((frame, _)) => HashFields::from_fill(read, frame).map(Box::new),
            Err(_) => None,
        };
        // As in `install`: the install happens under the marker's lock,
        // which an invalidation takes first.
        let mut since = None;
        let mut marker = None;
        if let dashmap::Entry::Occupied(mut m) = self.hpending.entry(key.clone()) {
            if let Some(at) = m.get().iter().position(|p| p.token == token) {
                let p = m.get_mut().swap_remove(at);
                since = Some((p.since, p.db));
                // Fills whose session vanished before completing them.
                m.get_mut().retain(|p| p.since.elapsed() <= STALE_PENDING);
            }
            marker = Some(m);
        }
        // The token has left the marker: no new waiter can join it.
        let waiters = self
            .hwaiters
            .remove(&token)
            .map(|(_, w)| w)
            .unwrap_or_default();
        let replies: Vec<FillResult> = waiters
            .iter()
            .map(|(r, resp3, _)| match &outcome {
                Ok((frame, _)) => {
                    let data = match fresh.as_ref().and_then(|h| h.pick(r)) {
                        Some(picked) => r.reply(picked, *resp3),
                        None => for_client(frame.clone(), *resp3),
                    };
                    Ok(crate::upstream::Reply {
                        errors: (data.first() == Some(&b'-')) as u64,
                        data,
                    })
                }
                Err(e) => Err(e.clone()),
            })
            .collect();
        match (since, fresh, &outcome) {
            (Some((since, db)), Some(h), Ok((frame, pttl))) => {
                self.install_hash(db, key, token, h, since, *pttl, frame.len())
            }
            (None, Some(_), Ok(_)) => {
                self.stats.discarded_fills.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if let Some(m) = marker
            && m.get().is_empty()
        {
            m.remove();
        }
        for ((_, _, (w, out)), r) in waiters.into_iter().zip(replies) {
            if let Ok(r) = &r {
                out.add(r.data.len());
            }
            if let Err(Ok(r)) = w.send(r) {
                out.sub(r.data.len());
            }
        }
    }

    /// Merges a hash fill into the key's entry (see `HashFields::merge`).
    #[allow(clippy::too_many_arguments)]
    fn install_hash(
        &self,
        db: u32,
        key: &Bytes,
        token: u64,
        fresh: Box<HashFields>,
        since: Instant,
        pttl: i64,
        size: usize,
    ) {
        let current =
            token >= self.epoch.load(Ordering::Acquire) && self.valid.load(Ordering::Acquire);
        if !current {
            self.stats.discarded_fills.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let deadline = since + self.lifetime(pttl);
        if pttl == 0 || deadline <= now || size > self.max_value_bytes {
            return;
        }
        let limit = self.max_value_bytes;
        self.note_db(db);
        let ev = self.map.upsert(db, key, now, |cur| {
            Some(match cur {
                Some((Entry::Hash(h), d)) => (Entry::Hash(h.merge(fresh, limit)), d.min(deadline)),
                _ => (Entry::Hash(fresh), deadline),
            })
        });
        self.count_install(&ev);
    }

    /// How long a value read with this PTTL may live in L1.
    fn lifetime(&self, pttl: i64) -> Duration {
        if pttl > 0 {
            self.max_ttl.min(Duration::from_millis(pttl as u64))
        } else {
            self.max_ttl
        }
    }

    /// Remembers that `db` has entries, before one is installed (under
    /// the key's marker lock, which `invalidate` waits for before it reads
    /// the dbs).
    fn note_db(&self, db: u32) {
        if db < 64 {
            self.dbs.fetch_or(1 << db, Ordering::AcqRel);
            return;
        }
        let mut high = self.high_dbs.lock().unwrap_or_else(|e| e.into_inner());
        if !high.contains(&db) {
            high.push(db);
        }
        self.has_high_dbs.store(true, Ordering::Release);
    }

    /// The upstream's `redis_version` (from its HELLO): hash reads are
    /// cached only below 7.4 (see `hashes`); an unknown version is taken
    /// to have per-field TTLs.
    pub fn set_server_version(&self, version: &str) {
        let mut parts = version.split('.').map(|p| p.parse::<u32>());
        let before_field_ttls = match (parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor))) => (major, minor) < (7, 4),
            _ => false,
        };
        let was = self.hashes.swap(before_field_ttls, Ordering::AcqRel);
        if was && !before_field_ttls {
            // A newer server behind the same address: what was cached of
            // hashes may not hold there. Flushed after the switch, so a
            // fill started before it is voided by the new epoch.
            self.flush();
        }
    }

    /// Forgets a key, in every db: its entries and any fill in flight.
    pub fn invalidate(&self, key: &[u8]) {
        self.pending.remove(key);
        self.hpending.remove(key);
        let mut dbs = self.dbs.load(Ordering::Acquire);
        while dbs != 0 {
            let db = dbs.trailing_zeros();
            self.map.remove(db, key);
            dbs &= dbs - 1;
        }
        if self.has_high_dbs.load(Ordering::Acquire) {
            for &db in self
                .high_dbs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                self.map.remove(db, key);
            }
        }
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops everything, including fills in flight.
    pub fn flush(&self) {
        self.epoch.store(
            self.next_token.fetch_add(1, Ordering::AcqRel) + 1,
            Ordering::Release,
        );
        self.pending.clear();
        self.hpending.clear();
        self.map.clear();
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Tracking lost (false) or back (true). Losing it flushes first, so no
    /// hit is served from entries whose invalidations may have been missed.
    pub fn set_valid(&self, valid: bool) {
        if self.ttl_only.load(Ordering::Acquire) {
            return;
        }
        if !valid {
            self.valid.store(false, Ordering::Release);
            self.flush();
        } else {
            self.flush();
            self.valid.store(true, Ordering::Release);
        }
    }

    /// Whether fill connections should ask for tracking.
    pub fn tracks(&self) -> bool {
        !self.ttl_only.load(Ordering::Acquire)
    }

    /// Redis refused tracking: serve with TTL-bounded entries only.
    pub fn degrade_to_ttl(&self) {
        self.ttl_only.store(true, Ordering::Release);
        self.flush();
        self.valid.store(true, Ordering::Release);
    }

    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    /// Handles one RESP3 push frame from a tracking connection.
    pub fn on_push(&self, frame: &[u8]) {
        let Ok(redis::Value::Push { kind, data }) = redis::parse_redis_value(frame) else {
            return;
        };
        if kind != redis::PushKind::Invalidate {
            return;
        }
        match data.into_iter().next() {
            Some(redis::Value::Array(keys)) => {
                for k in keys {
                    if let redis::Value::BulkString(k) = k {
                        self.invalidate(&k);
                    }
                }
            }
            // A null list: FLUSHALL/FLUSHDB (or tracking table overflow).
            _ => self.flush(),
        }
    }

    pub fn entries(&self) -> u64 {
        self.map.entries()
    }

    pub fn bytes(&self) -> u64 {
        self.map.bytes()
    }

    /// Field/value pairs for PROXY L1 STATS and INFO.
    pub fn render(&self) -> Vec<(String, String)> {
        let s = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let hits = s.hits.load(Ordering::Relaxed);
        let misses = s.misses.load(Ordering::Relaxed);
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        vec![
            (
                "mode".into(),
                if self.tracks() { "tracking" } else { "ttl" }.to_string(),
            ),
            ("valid".into(), (self.is_valid() as u8).to_string()),
            ("hits".into(), hits.to_string()),
            ("misses".into(), misses.to_string()),
            ("hit_ratio".into(), format!("{ratio:.4}")),
            ("fills".into(), g(&s.fills)),
            ("discarded_fills".into(), g(&s.discarded_fills)),
            ("coalesced_misses".into(), g(&s.coalesced)),
            ("invalidations".into(), g(&s.invalidations)),
            ("flushes".into(), g(&s.flushes)),
            ("evicted_size".into(), g(&s.evicted_size)),
            ("evicted_expired".into(), g(&s.evicted_expired)),
            ("admissions_rejected".into(), g(&s.rejected)),
            ("entries".into(), self.entries().to_string()),
            ("bytes".into(), self.bytes().to_string()),
        ]
    }
}

/// The transaction a fill sends on a tracking connection, whose db is
/// `base`: the key's PTTL and the read (`read`, its arguments), atomically.
/// A key of another db is read between SELECTs, which leave the connection
/// in `base` again. Returns the bytes and the number of replies to expect.
pub fn fill_request(db: u32, base: u32, key: &[u8], read: &[&[u8]]) -> (Bytes, u32) {
    fill_request_many(db, base, &[(key, read)])
}

/// [`fill_request`] for several keys in one transaction: each key's PTTL
/// and read in turn (the fills of an MGET's misses that share a tracking
/// connection).
pub fn fill_request_many(db: u32, base: u32, reads: &[(&[u8], &[&[u8]])]) -> (Bytes, u32) {
    use crate::resp::encode_command;
    let size: usize = reads
        .iter()
        .map(|(k, r)| 40 + 2 * k.len() + 8 * r.len())
        .sum();
    let mut b = bytes::BytesMut::with_capacity(64 + size);
    encode_command(&[&b"MULTI"[..]], &mut b);
    let other = db != base;
    if other {
        encode_command(&[&b"SELECT"[..], db.to_string().as_bytes()], &mut b);
    }
    for (key, read) in reads {
        encode_command(&[&b"PTTL"[..], key], &mut b);
        encode_command(read, &mut b);
    }
    if other {
        encode_command(&[&b"SELECT"[..], base.to_string().as_bytes()], &mut b);
    }
    encode_command(&[&b"EXEC"[..]], &mut b);
    let queued = 2 * reads.len() as u32 + if other { 2 } else { 0 };
    (b.freeze(), queued + 2)
}

/// Splits the reply to a [`fill_request`] (RESP3; `selected`: it had the
/// SELECTs) into the key's PTTL and the read's reply frame. `Err` when the
/// transaction failed, with the error frame to show.
pub fn split_fill_reply(data: &[u8], selected: bool) -> Result<(i64, Bytes), Bytes> {
    split_fill_replies(data, selected, 1).map(|mut v| v.swap_remove(0))
}

/// [`split_fill_reply`] for a [`fill_request_many`] of `n` keys: each
/// key's PTTL and read reply, in order.
pub fn split_fill_replies(
    data: &[u8],
    selected: bool,
    n: usize,
) -> Result<Vec<(i64, Bytes)>, Bytes> {
    let err = |d: &[u8]| Bytes::copy_from_slice(d);
    let malformed = || err(b"-ERR respite: malformed fill reply\r\n");
    let mut sc = crate::resp::FrameScanner::new();
    let mut next = |pos: usize| match sc.next_frame(&data[pos..]) {
        Ok(Some(end)) => {
            sc.reset();
            Some(pos + end)
        }
        _ => None,
    };
    let mut pos = 0;
    // +OK, then +QUEUED for each command.
    for _ in 0..1 + 2 * n + if selected { 2 } else { 0 } {
        let end = next(pos).ok_or_else(malformed)?;
        if data[pos] == b'-' {
            return Err(err(&data[pos..end]));
        }
        pos = end;
    }
    let exec = &data[pos..];
    if exec.first() != Some(&b'*') {
        // -EXECABORT or a null array: pass the frame on as the reply.
        return Err(err(exec));
    }
    let Some(hdr) = exec.iter().position(|&b| b == b'\n') else {
        return Err(malformed());
    };
    let mut pos = pos + hdr + 1;
    // A SELECT refused when EXEC ran (the server behind the address has
    // fewer dbs now) left the reads in the base db: nothing of it may pass
    // for the other db's.
    let selected_ok = |at: usize, end: usize| -> Result<(), Bytes> {
        match &data[at..end] {
            b"+OK\r\n" => Ok(()),
            e if e.first() == Some(&b'-') => Err(err(e)),
            _ => Err(malformed()),
        }
    };
    if selected {
        let end = next(pos).ok_or_else(malformed)?;
        selected_ok(pos, end)?;
        pos = end;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let pttl_end = next(pos).ok_or_else(malformed)?;
        let pttl = match data[pos] {
            b':' => crate::resp::parse_int(&data[pos + 1..pttl_end - 2]).unwrap_or(-2),
            _ => -2,
        };
        let end = next(pttl_end).ok_or_else(malformed)?;
        out.push((pttl, Bytes::copy_from_slice(&data[pttl_end..end])));
        pos = end;
    }
    if selected {
        let back = next(pos).ok_or_else(malformed)?;
        selected_ok(pos, back)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l1() -> Arc<L1> {
        let cfg = L1Config {
            mode: L1Mode::Ttl,
            ..L1Config::default()
        };
        let l = L1::new(&cfg).unwrap();
        l.set_server_version("7.0.15");
        l
    }

    fn out() -> Arc<crate::upstream::OutBytes> {
        Arc::new(crate::upstream::OutBytes::default())
    }

    fn ok() -> FillResult {
        Ok(crate::upstream::Reply {
            data: Bytes::from_static(b"$1\r\nv\r\n"),
            errors: 0,
        })
    }

    #[test]
    fn fill_then_hit_then_invalidate() {
        let l = l1();
        let k = Bytes::from_static(b"k");
        let Lookup::Fill(t, _) = l.lookup(0, b"k", &out(), None) else {
            panic!()
        };
        let frame = Bytes::from_static(b"$1\r\nv\r\n");
        assert!(l.complete(&k, t, Some(&frame), -1, ok()));
        assert!(matches!(l.lookup(0, b"k", &out(), None), Lookup::Hit(f) if f == frame));
        l.invalidate(b"k");
        assert!(l.peek(0, b"k").is_none());
    }

    #[test]
    fn small_hits_are_copied_large_ones_shared() {
        let l = l1();
        for (key, size) in [(&b"small"[..], 100), (&b"large"[..], COPY_MAX + 1)] {
            let Lookup::Fill(t, _) = l.lookup(0, key, &out(), None) else {
                panic!()
            };
            let frame = Bytes::from(vec![b'v'; size]);
            let k = Bytes::copy_from_slice(key);
            assert!(l.complete(&k, t, Some(&frame), -1, ok()));
        }
        let mut dst = b"before".to_vec();
        assert!(matches!(
            l.lookup(0, b"small", &out(), Some(&mut dst)),
            Lookup::Copied(100)
        ));
        assert_eq!(dst.len(), 106);
        assert!(dst[6..].iter().all(|&b| b == b'v'));
        assert!(matches!(
            l.lookup(0, b"large", &out(), Some(&mut dst)),
            Lookup::Hit(f) if f.len() == COPY_MAX + 1
        ));
        assert_eq!(dst.len(), 106);
        assert_eq!(l.stats.hits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn keys_longer_than_the_inline_key_work_the_same() {
        let l = l1();
        let long = vec![b'k'; 100];
        let Lookup::Fill(t, _) = l.lookup(0, &long, &out(), None) else {
            panic!()
        };
        let frame = Bytes::from_static(b"$1\r\nv\r\n");
        assert!(l.complete(&Bytes::from(long.clone()), t, Some(&frame), -1, ok()));
        assert!(matches!(l.lookup(0, &long, &out(), None), Lookup::Hit(f) if f == frame));
        assert!(l.peek(0, &long[..99]).is_none());
        l.invalidate(&long);
        assert!(l.peek(0, &long).is_none());
    }

    #[test]
    fn invalidation_during_fill_discards_it() {
        let l = l1();
        let k = Bytes::from_static(b"k");
        let Lookup::Fill(t, _) = l.lookup(0, b"k", &out(), None) else {
            panic!()
        };
        // A second miss while the fill is in flight waits for it.
        let Lookup::Wait(mut rx) = l.lookup(0, b"k", &out(), None) else {
            panic!()
        };
        l.invalidate(b"k");
        let old = Bytes::from_static(b"$1\r\nold\r\n");
        let outcome = Ok(crate::upstream::Reply {
            data: old.clone(),
            errors: 0,
        });
        assert!(!l.complete(&k, t, Some(&old), -1, outcome));
        // Not installed, but the waiter asked before the invalidation
        // arrived, so it gets the value, as a hit would have.
        assert_eq!(rx.try_recv().unwrap().unwrap().data, old);
        assert!(l.waiters.is_empty());
        assert_eq!(l.stats.discarded_fills.load(Ordering::Relaxed), 1);
        let Lookup::Fill(t, _) = l.lookup(0, b"k", &out(), None) else {
            panic!()
        };
        l.flush();
        assert!(!l.complete(&k, t, Some(&Bytes::from_static(b"$1\r\nx\r\n")), -1, ok()));
    }

    #[test]
    fn ttl_follows_redis_and_missing_keys_are_cached_as_nil() {
        let l = l1();
        let k = Bytes::from_static(b"k");
        let Lookup::Fill(t, _) = l.lookup(0, b"k", &out(), None) else {
            panic!()
        };
        assert!(l.complete(&k, t, Some(&Bytes::from_static(b"$1\r\nv\r\n")), 30, ok()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.peek(0, b"k").is_none(), "outlived its PTTL");
        assert_eq!(l.stats.evicted_expired.load(Ordering::Relaxed), 1);
        let Lookup::Fill(t, _) = l.lookup(0, b"k", &out(), None) else {
            panic!()
        };
        // A missing key's nil (as the RESP3 tracking connection reads it)
        // is cached until max_ttl or an invalidation; a RESP2 null frame
        // with PTTL -2 never reaches here, and is not installed.
        assert!(!l.complete(&k, t, Some(&Bytes::from_static(b"$-1\r\n")), -2, ok()));
        let Lookup::Fill(t, _) = l.lookup(0, b"k", &out(), None) else {
            panic!()
        };
        assert!(l.complete(&k, t, Some(&Bytes::from_static(NIL)), -2, ok()));
        assert_eq!(l.peek(0, b"k").as_deref(), Some(NIL));
        assert_eq!(&for_client(Bytes::from_static(NIL), false)[..], b"$-1\r\n");
        assert_eq!(&for_client(Bytes::from_static(NIL), true)[..], NIL);
        l.invalidate(b"k");
        assert!(l.peek(0, b"k").is_none());
    }

    #[test]
    fn max_ttl_caps_entries_with_and_without_a_pttl() {
        let l = L1::new(&L1Config {
            mode: L1Mode::Ttl,
            max_ttl_ms: 40,
            ..L1Config::default()
        })
        .unwrap();
        let frame = Bytes::from_static(b"$1\r\nv\r\n");
        // No PTTL, and a PTTL longer than max_ttl: both end at max_ttl.
        for (k, pttl) in [(&b"a"[..], -1), (&b"b"[..], 60_000)] {
            let Lookup::Fill(t, _) = l.lookup(0, k, &out(), None) else {
                panic!()
            };
            assert!(l.complete(&Bytes::copy_from_slice(k), t, Some(&frame), pttl, ok()));
            assert!(matches!(l.lookup(0, k, &out(), None), Lookup::Hit(_)));
        }
        std::thread::sleep(Duration::from_millis(80));
        assert!(l.peek(0, b"a").is_none());
        assert!(l.peek(0, b"b").is_none(), "outlived max_ttl");
    }

    #[test]
    fn include_exclude() {
        let cfg = L1Config {
            mode: L1Mode::Ttl,
            include: vec!["user:*".into()],
            exclude: vec!["user:secret:*".into()],
            ..L1Config::default()
        };
        let l = L1::new(&cfg).unwrap();
        assert!(matches!(
            l.lookup(0, b"user:1", &out(), None),
            Lookup::Fill(..)
        ));
        assert!(matches!(
            l.lookup(0, b"other", &out(), None),
            Lookup::Bypass
        ));
        assert!(matches!(
            l.lookup(0, b"user:secret:x", &out(), None),
            Lookup::Bypass
        ));
    }

    #[test]
    fn pushes() {
        let l = l1();
        let k = Bytes::from_static(b"a");
        let Lookup::Fill(t, _) = l.lookup(0, b"a", &out(), None) else {
            panic!()
        };
        assert!(l.complete(&k, t, Some(&Bytes::from_static(b"$1\r\nv\r\n")), -1, ok()));
        l.on_push(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\na\r\n");
        assert!(l.peek(0, b"a").is_none());
        let Lookup::Fill(t, _) = l.lookup(0, b"a", &out(), None) else {
            panic!()
        };
        assert!(l.complete(&k, t, Some(&Bytes::from_static(b"$1\r\nv\r\n")), -1, ok()));
        l.on_push(b">2\r\n$10\r\ninvalidate\r\n_\r\n");
        assert!(l.peek(0, b"a").is_none());
    }

    #[test]
    fn fill_reply_parsing() {
        let split = |d: &[u8]| split_fill_reply(d, false);
        let (pttl, v) =
            split(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1500\r\n$3\r\nabc\r\n").unwrap();
        assert_eq!((pttl, &v[..]), (1500, &b"$3\r\nabc\r\n"[..]));
        let (pttl, v) = split(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:-2\r\n_\r\n").unwrap();
        assert_eq!((pttl, &v[..]), (-2, &b"_\r\n"[..]));
        let (_, v) = split(
            b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:-1\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        )
        .unwrap();
        assert!(v.starts_with(b"-WRONGTYPE"));
        assert!(split(b"-ERR x\r\n+QUEUED\r\n+QUEUED\r\n-EXECABORT y\r\n").is_err());
        // A key of another db: read between SELECTs.
        let (req, n) = fill_request(3, 0, b"k", &[b"GET", b"k"]);
        assert_eq!(n, 6);
        assert_eq!(
            &req[..],
            &b"*1\r\n$5\r\nMULTI\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n*2\r\n$4\r\nPTTL\r\n$1\r\nk\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n*1\r\n$4\r\nEXEC\r\n"[..]
        );
        assert_eq!(fill_request(2, 2, b"k", &[b"GET", b"k"]).1, 4);
        let q = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n";
        let ok = [&q[..], b"*4\r\n+OK\r\n:-1\r\n*2\r\n$1\r\na\r\n_\r\n+OK\r\n"].concat();
        let (pttl, v) = split_fill_reply(&ok, true).unwrap();
        assert_eq!((pttl, &v[..]), (-1, &b"*2\r\n$1\r\na\r\n_\r\n"[..]));
        let refused = [
            &q[..],
            b"*4\r\n-ERR DB index is out of range\r\n:-1\r\n$1\r\nv\r\n+OK\r\n",
        ]
        .concat();
        assert_eq!(
            &split_fill_reply(&refused, true).unwrap_err()[..],
            b"-ERR DB index is out of range\r\n"
        );
        // Several keys in one transaction (an MGET's misses).
        let (req, n) = fill_request_many(0, 0, &[(b"a", &[b"GET", b"a"]), (b"b", &[b"GET", b"b"])]);
        assert_eq!(n, 6);
        assert_eq!(req.windows(4).filter(|w| w == b"PTTL").count(), 2);
        let two = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*4\r\n:-1\r\n$1\r\nx\r\n:-2\r\n_\r\n";
        let v = split_fill_replies(two, false, 2).unwrap();
        assert_eq!(v, [(-1, b(b"$1\r\nx\r\n")), (-2, b(b"_\r\n"))]);
        assert!(split_fill_replies(two, false, 3).is_err());
        let short = [&q[..], b"*4\r\n+OK\r\n:-1\r\n"].concat();
        assert!(split_fill_reply(&short, true).is_err());
        assert!(split_fill_reply(&q[..], true).is_err());
    }

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    /// What a waiter was sent, if anything yet.
    fn sent(rx: &mut FillRx) -> Option<Bytes> {
        rx.try_recv().ok().map(|r| r.expect("a reply").data)
    }

    /// A hash read that misses, filled with `frame`; the reply its client
    /// (RESP2) was sent.
    fn hash_fill(l: &L1, key: &[u8], read: &HashRead, frame: &'static [u8]) -> Option<Bytes> {
        let HashLookup::Fill(t, mut rx) = l.lookup_hash(0, key, read, false, &out()) else {
            panic!("expected a miss")
        };
        let k = Bytes::copy_from_slice(key);
        l.complete_hash(&k, t, read, Ok((b(frame), -1)));
        sent(&mut rx)
    }

    fn hit(l: &L1, key: &[u8], read: &HashRead, resp3: bool) -> Option<Bytes> {
        match l.lookup_hash(0, key, read, resp3, &out()) {
            HashLookup::Hit(r) => Some(r),
            HashLookup::Fill(t, _) => {
                // Leave no marker behind.
                let k = Bytes::copy_from_slice(key);
                l.complete_hash(&k, t, read, Err(crate::upstream::UpError::Lost));
                None
            }
            HashLookup::Wait(_) => panic!("nothing is in flight"),
            HashLookup::Bypass => panic!("bypass"),
        }
    }

    #[test]
    fn hash_fields_accumulate_and_answer_every_hash_read() {
        let l = l1();
        let a = HashRead::Field(b(b"a"));
        // The fill's reply as the client sees it (RESP2 here).
        assert_eq!(
            hash_fill(&l, b"h", &a, b"*1\r\n$1\r\n1\r\n").as_deref(),
            Some(&b"$1\r\n1\r\n"[..])
        );
        assert_eq!(
            hit(&l, b"h", &a, false).as_deref(),
            Some(&b"$1\r\n1\r\n"[..])
        );
        // b is not known yet; an HMGET of a, b, z reads and adds them.
        let abz = HashRead::Fields(vec![b(b"a"), b(b"b"), b(b"z")]);
        assert!(hit(&l, b"h", &HashRead::Field(b(b"b")), false).is_none());
        assert_eq!(
            hash_fill(&l, b"h", &abz, b"*3\r\n$1\r\n1\r\n$1\r\n2\r\n_\r\n").as_deref(),
            Some(&b"*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n"[..])
        );
        let ba = HashRead::Fields(vec![b(b"b"), b(b"z"), b(b"a")]);
        assert_eq!(
            hit(&l, b"h", &ba, true).as_deref(),
            Some(&b"*3\r\n$1\r\n2\r\n_\r\n$1\r\n1\r\n"[..])
        );
        // HGETALL is not answered from some fields, only from its own read,
        // which then answers any field (absent ones as nil).
        assert!(hit(&l, b"h", &HashRead::All, true).is_none());
        let all = b"%2\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n";
        assert_eq!(
            hash_fill(&l, b"h", &HashRead::All, all).as_deref(),
            Some(&b"*4\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n"[..])
        );
        assert_eq!(
            hit(&l, b"h", &HashRead::All, true).as_deref(),
            Some(&all[..])
        );
        assert_eq!(
            hit(&l, b"h", &HashRead::Field(b(b"nope")), false).as_deref(),
            Some(NIL_RESP2)
        );
        // A later field read keeps the whole hash as it is.
        assert!(hash_fill(&l, b"h2", &a, b"*1\r\n$1\r\n1\r\n").is_some());
        // GET does not take a hash's entry for its own, nor the reverse.
        assert!(matches!(l.lookup(0, b"h", &out(), None), Lookup::Fill(..)));
        // An invalidation drops every field.
        l.invalidate(b"h");
        assert!(hit(&l, b"h", &a, true).is_none());
        l.invalidate(b"h2");
        assert_eq!(l.entries(), 0);
        assert!(l.hpending.is_empty() && l.hwaiters.is_empty());
    }

    #[test]
    fn hash_misses_wait_for_a_fill_that_covers_them() {
        let l = l1();
        let k = b(b"h");
        let ab = HashRead::Fields(vec![b(b"a"), b(b"b")]);
        let HashLookup::Fill(t, mut first) = l.lookup_hash(0, b"h", &ab, true, &out()) else {
            panic!()
        };
        // Covered by the HMGET in flight: they wait, each for its own reply.
        let mut waits = Vec::new();
        for (read, resp3) in [
            (HashRead::Field(b(b"b")), false),
            (HashRead::Fields(vec![b(b"b"), b(b"a"), b(b"b")]), true),
            (ab.clone(), false),
        ] {
            let HashLookup::Wait(rx) = l.lookup_hash(0, b"h", &read, resp3, &out()) else {
                panic!("{read:?} should wait")
            };
            waits.push(rx);
        }
        // Not covered: a fill of their own.
        let HashLookup::Fill(t3, _) =
            l.lookup_hash(0, b"h", &HashRead::Field(b(b"c")), true, &out())
        else {
            panic!()
        };
        let HashLookup::Fill(t2, _) = l.lookup_hash(0, b"h", &HashRead::All, true, &out()) else {
            panic!()
        };
        // Covered by the HGETALL in flight.
        let HashLookup::Wait(mut c) =
            l.lookup_hash(0, b"h", &HashRead::Field(b(b"zz")), false, &out())
        else {
            panic!()
        };
        l.complete_hash(&k, t, &ab, Ok((b(b"*2\r\n$1\r\n1\r\n_\r\n"), -1)));
        assert_eq!(
            sent(&mut first).as_deref(),
            Some(&b"*2\r\n$1\r\n1\r\n_\r\n"[..])
        );
        let got: Vec<_> = waits.iter_mut().map(|rx| sent(rx).unwrap()).collect();
        assert_eq!(got[0], &b"$-1\r\n"[..]);
        assert_eq!(got[1], &b"*3\r\n_\r\n$1\r\n1\r\n_\r\n"[..]);
        assert_eq!(got[2], &b"*2\r\n$1\r\n1\r\n$-1\r\n"[..]);
        let all = b(b"%1\r\n$1\r\na\r\n$1\r\n1\r\n");
        l.complete_hash(&k, t2, &HashRead::All, Ok((all, -1)));
        assert_eq!(sent(&mut c).as_deref(), Some(NIL_RESP2));
        l.complete_hash(
            &k,
            t3,
            &HashRead::Field(b(b"c")),
            Ok((b(b"*1\r\n_\r\n"), -1)),
        );
        assert_eq!(l.stats.coalesced.load(Ordering::Relaxed), 4);
        assert!(l.hpending.is_empty() && l.hwaiters.is_empty());
        // A failure reaches every waiter.
        let HashLookup::Fill(t, mut a) = l.lookup_hash(0, b"x", &ab, true, &out()) else {
            panic!()
        };
        let HashLookup::Wait(mut w) = l.lookup_hash(0, b"x", &ab, true, &out()) else {
            panic!()
        };
        l.complete_hash(&b(b"x"), t, &ab, Err(crate::upstream::UpError::Lost));
        assert!(matches!(a.try_recv(), Ok(Err(_))));
        assert!(matches!(w.try_recv(), Ok(Err(_))));
        assert_eq!(l.entries(), 1);
    }

    #[test]
    fn an_invalidated_hash_fill_installs_nothing() {
        let l = l1();
        let a = HashRead::Field(b(b"a"));
        let HashLookup::Fill(t1, mut rx) = l.lookup_hash(0, b"h", &a, true, &out()) else {
            panic!()
        };
        // Two fills of one hash in flight at once, both voided.
        let HashLookup::Fill(t2, _) = l.lookup_hash(0, b"h", &HashRead::All, true, &out()) else {
            panic!()
        };
        l.invalidate(b"h");
        let k = b(b"h");
        l.complete_hash(&k, t1, &a, Ok((b(b"*1\r\n$1\r\n1\r\n"), -1)));
        assert_eq!(
            sent(&mut rx).as_deref(),
            Some(&b"$1\r\n1\r\n"[..]),
            "the client still gets its reply"
        );
        l.complete_hash(&k, t2, &HashRead::All, Ok((b(b"%0\r\n"), -1)));
        assert_eq!(l.entries(), 0);
        assert_eq!(l.stats.discarded_fills.load(Ordering::Relaxed), 2);
        // A flush voids fills started before it.
        let HashLookup::Fill(t, _) = l.lookup_hash(0, b"h", &a, true, &out()) else {
            panic!()
        };
        l.flush();
        l.complete_hash(&k, t, &a, Ok((b(b"*1\r\n$1\r\n1\r\n"), -1)));
        assert_eq!(l.entries(), 0);
        // Errors and nonsense are handed on, never installed.
        for reply in [
            &b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"[..],
            b"*2\r\n$1\r\n1\r\n$1\r\n2\r\n",
            b"*1\r\n:1\r\n",
        ] {
            let HashLookup::Fill(t, mut rx) = l.lookup_hash(0, b"h", &a, true, &out()) else {
                panic!()
            };
            l.complete_hash(&k, t, &a, Ok((Bytes::copy_from_slice(reply), -1)));
            assert_eq!(sent(&mut rx).as_deref(), Some(reply));
            assert_eq!(l.entries(), 0);
        }
        let HashLookup::Fill(t, _) = l.lookup_hash(0, b"h", &HashRead::All, true, &out()) else {
            panic!()
        };
        let bad = b(b"%1\r\n$1\r\na\r\n:1\r\n");
        l.complete_hash(&k, t, &HashRead::All, Ok((bad, -1)));
        assert_eq!(l.entries(), 0);
        assert!(l.hpending.is_empty() && l.hwaiters.is_empty());
    }

    #[test]
    fn hash_entries_stay_within_max_value_bytes() {
        let cfg = L1Config {
            mode: L1Mode::Ttl,
            max_value_bytes: 1000,
            ..L1Config::default()
        };
        let l = L1::new(&cfg).unwrap();
        l.set_server_version("7.2.4");
        let value =
            |i: usize| Bytes::from(format!("*1\r\n$100\r\n{}{}\r\n", "v".repeat(99), i % 10));
        // Fields accumulate until the next would pass the bound; then the
        // newcomers replace the rest.
        for i in 0..20 {
            let read = HashRead::Field(Bytes::from(format!("f{i}")));
            let HashLookup::Fill(t, _) = l.lookup_hash(0, b"big", &read, true, &out()) else {
                panic!()
            };
            l.complete_hash(&b(b"big"), t, &read, Ok((value(i), -1)));
            assert!(
                l.bytes() as usize <= 1000 + 3 + crate::l1map::entry_overhead::<Entry>(),
                "{i}"
            );
            assert!(hit(&l, b"big", &read, true).is_some(), "{i}");
        }
        assert!(hit(&l, b"big", &HashRead::Field(b(b"f0")), true).is_none());
        // A field read twice weighs once.
        let twice = HashRead::Fields(vec![b(b"t"), b(b"t")]);
        let before = l.bytes();
        let HashLookup::Fill(t, _) = l.lookup_hash(0, b"w", &twice, true, &out()) else {
            panic!()
        };
        let reply = b(b"*2\r\n$1\r\nv\r\n$1\r\nv\r\n");
        l.complete_hash(&b(b"w"), t, &twice, Ok((reply.clone(), -1)));
        let h = HashFields::from_fill(&twice, &reply).unwrap();
        assert_eq!((h.fields.len(), h.bytes), (1, 1 + 7));
        // The field table's allocation counts too.
        assert!(h.weight() >= 8 + 64 + std::mem::size_of::<HashFields>());
        assert_eq!(
            l.bytes() - before,
            (1 + h.weight() + crate::l1map::entry_overhead::<Entry>()) as u64
        );
        // The names are the entry's own, not slices of the request's buffer.
        let buf = Bytes::from(vec![b'n'; 4096]);
        let read = HashRead::Field(buf.slice(0..1));
        let h = HashFields::from_fill(&read, &b(b"*1\r\n$1\r\nv\r\n")).unwrap();
        let name = h.fields.keys().next().unwrap();
        assert!(!std::ptr::eq(name.as_ptr(), buf.as_ptr()));
        // A slot holding a hash weighs no more than one holding a frame.
        assert_eq!(
            crate::l1map::entry_overhead::<Entry>(),
            crate::l1map::entry_overhead::<Bytes>()
        );
    }

    #[test]
    fn hashes_are_cached_only_from_servers_without_field_ttls() {
        let l = l1();
        let a = HashRead::Field(b(b"a"));
        assert!(hash_fill(&l, b"h", &a, b"*1\r\n$1\r\n1\r\n").is_some());
        assert!(hit(&l, b"h", &a, true).is_some());
        for (v, cached) in [
            ("7.4.0", false),
            ("7.2.5", true),
            ("8.0.2", false),
            ("6.2.14", true),
            ("", false),
            ("unstable", false),
        ] {
            l.set_server_version(v);
            assert_eq!(
                !matches!(l.lookup_hash(0, b"h", &a, true, &out()), HashLookup::Bypass),
                cached,
                "{v}"
            );
            // (a miss left a marker: voided with the entry)
            l.invalidate(b"h");
        }
        // What was cached is gone once a newer server shows up.
        l.set_server_version("7.0.0");
        assert!(hash_fill(&l, b"h", &a, b"*1\r\n$1\r\n1\r\n").is_some());
        l.set_server_version("7.4.1");
        l.set_server_version("7.0.0");
        assert!(hit(&l, b"h", &a, true).is_none());
    }

    #[test]
    fn maps_become_flat_arrays_for_resp2() {
        assert_eq!(
            &map_for_client(b"%1\r\n$1\r\na\r\n$1\r\nb\r\n", false)[..],
            b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        );
        assert_eq!(&map_for_client(b"%0\r\n", false)[..], b"*0\r\n");
        assert_eq!(&map_for_client(b"%0\r\n", true)[..], b"%0\r\n");
        assert_eq!(&map_for_client(b"-ERR x\r\n", false)[..], b"-ERR x\r\n");
    }
}
