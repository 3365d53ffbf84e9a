//! The L1's storage: a sharded hash map of values (reply frames, hash
//! fields: anything that knows its weight) with a byte bound and CLOCK
//! (second-chance) eviction.
//!
//! It replaced moka, which cost about a third of the proxy's CPU on a
//! pipelined all-hits load (lookup, read recording into its policy
//! deques, the maintenance that drains them). Here a hit is a hash, one
//! uncontended shard lock, a probe and a reference bit; eviction work is
//! done by the insert that exceeds the bound, never by readers.
//!
//! The bound: every shard holds at most `max_bytes / shards`, so the whole
//! map holds at most `max_bytes`, counted as key + the value's weight + a
//! fixed per-entry overhead that covers the slot, the table entry and the
//! frame's allocation header. The shard count keeps a shard's budget at least four
//! times `max_value_bytes`, so any admissible value fits in its shard.
//!
//! Admission is TinyLFU's (Einziger, Friedman, Manes; the policy of
//! caffeine and moka): every miss, and the first hit since the hand last
//! passed, counts its key in a small per-shard count-min sketch behind a
//! doorkeeper, and an insert that needs room only
//! displaces CLOCK's victim when the newcomer has been asked for more
//! often than the victim. So a one-off scan of cold keys does not push out
//! keys that are read repeatedly, even those not read since the hand last
//! passed; the counts are halved periodically, so popularity ages.

use bytes::Bytes;
use hashbrown::HashTable;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Instant;

/// foldhash is seeded per process, so keys a client picks cannot be aimed
/// at one shard or bucket without learning the seed.
type KeyHasher = foldhash::quality::RandomState;

/// Keys up to 32 bytes (most) sit inline in the slot: comparing them on a
/// hit costs no second cache miss.
type Key = smallvec::SmallVec<[u8; 32]>;

const MAX_SHARDS: usize = 64;

/// What a value costs in bytes, beyond the entry's fixed overhead.
pub trait Weigh {
    fn weight(&self) -> usize;
}

impl Weigh for Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

struct Slot<V> {
    key: Key,
    /// The Redis db the key lives in.
    db: u32,
    value: V,
    hash: u64,
    /// The earlier of the key's own expiry in Redis and `max_ttl`.
    deadline: Instant,
    weight: usize,
    /// Set by hits, cleared by the passing clock hand.
    referenced: bool,
}

/// What one entry costs beyond its key and frame bytes: the slot, the
/// table's index and control byte (with its spare capacity), the frame's
/// shared allocation header, and the allocator's own header and rounding
/// of the frame (measured: RSS grew ~10% past the count without it).
pub const fn entry_overhead<V>() -> usize {
    std::mem::size_of::<Option<Slot<V>>>() + 16 + 32 + 16
}

struct Shard<V> {
    table: HashTable<u32>,
    slots: Vec<Option<Slot<V>>>,
    free: Vec<u32>,
    bytes: usize,
    hand: usize,
    sketch: Sketch,
}

impl<V> Default for Shard<V> {
    fn default() -> Self {
        Shard {
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            bytes: 0,
            hand: 0,
            sketch: Sketch::default(),
        }
    }
}

/// How often keys were asked for, approximately: a count-min sketch of
/// four rows of saturating counters (0..=15, as caffeine's 4-bit ones),
/// with conservative increments (only the rows at the minimum grow), all
/// halved once the increments reach ten per counter of a row. A key's four
/// counters share one cache line (caffeine's blocked layout): counting a
/// hit costs one line, not four (four lines cost ~80 ns per hit).
///
/// A doorkeeper (a two-probe Bloom filter, TinyLFU's) takes each key's
/// first count, so keys asked for once (a scan's) never reach the
/// counters and do not inflate the estimates of the keys they share them
/// with. It is cleared when the counters are halved.
#[derive(Default, Clone)]
struct Sketch {
    blocks: Vec<Block>,
    door: Vec<u64>,
    additions: usize,
}

/// Four rows of sixteen counters.
#[repr(align(64))]
#[derive(Clone, Copy)]
struct Block([u8; 64]);

/// With the doorkeeper's one.
const SKETCH_MAX: u8 = 15;

impl Sketch {
    /// About two counters of a row per entry the shard can hold when
    /// values are small (an entry weighs ~250 bytes with its overhead), so
    /// keys seldom share all four counters; with the doorkeeper ~5% of the
    /// shard's budget.
    fn for_budget(budget: usize) -> Sketch {
        let blocks = (budget / 2048)
            .clamp(1, 1 << 12)
            .next_power_of_two()
            .min(1 << 12);
        Sketch {
            blocks: vec![Block([0; 64]); blocks],
            // 16 bits per counter of a row: ~10% full when the counters
            // are halved, if every count was a new key's.
            door: vec![0; blocks * 4],
            additions: 0,
        }
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * 64 + self.door.len() * 8
    }

    fn door_bits(&self, hash: u64) -> [usize; 2] {
        let d = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
        let m = self.door.len() * 64 - 1;
        [(d >> 40) as usize & m, (d >> 8) as usize & m]
    }

    fn at_door(&self, hash: u64) -> bool {
        self.door_bits(hash)
            .iter()
            .all(|&b| self.door[b / 64] & (1 << (b % 64)) != 0)
    }

    /// Counters per row.
    fn width(&self) -> usize {
        self.blocks.len() * 16
    }

    fn slots(&self, hash: u64) -> (usize, [usize; 4]) {
        // Remixed: the map's own use of the hash (bucket, tag, shard)
        // must not correlate with the sketch's.
        let h = (hash ^ (hash >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let block = (h as usize) & (self.blocks.len() - 1);
        (
            block,
            std::array::from_fn(|r| 16 * r + ((h >> (32 + 4 * r)) as usize & 15)),
        )
    }

    fn frequency(&self, hash: u64) -> u8 {
        if self.blocks.is_empty() {
            return 0;
        }
        let (b, at) = self.slots(hash);
        let c = &self.blocks[b].0;
        let counted = at.iter().map(|&i| c[i]).min().unwrap_or(0);
        counted + self.at_door(hash) as u8
    }

    fn record(&mut self, hash: u64) {
        if self.blocks.is_empty() {
            return;
        }
        self.additions += 1;
        if self.additions >= 10 * self.width() {
            self.age();
        }
        if !self.at_door(hash) {
            for b in self.door_bits(hash) {
                self.door[b / 64] |= 1 << (b % 64);
            }
            return;
        }
        let (b, at) = self.slots(hash);
        let c = &mut self.blocks[b].0;
        let min = at.iter().map(|&i| c[i]).min().unwrap_or(0);
        if min == SKETCH_MAX - 1 {
            return;
        }
        for i in at {
            if c[i] == min {
                c[i] += 1;
            }
        }
    }

    /// Halves every count; the doorkeeper's single counts are dropped
    /// (a half of one).
    fn age(&mut self) {
        for b in &mut self.blocks {
            for c in &mut b.0 {
                *c >>= 1;
            }
        }
        self.door.fill(0);
        self.additions /= 2;
    }
}

/// One shard per cache line, so two threads hitting neighbouring shards
/// do not share a line.
#[repr(align(64))]
struct Padded<V>(Mutex<Shard<V>>);

pub enum Get<R> {
    /// What the caller's closure made of the value.
    Hit(R),
    Miss,
    /// Found past its deadline, and removed.
    Expired,
}

/// Entries an insert pushed out, by reason, and whether the newcomer was
/// turned away instead (asked for no more often than the entry it would
/// have displaced).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub size: u64,
    pub expired: u64,
    pub rejected: bool,
}

pub struct L1Map<V> {
    shards: Box<[Padded<V>]>,
    hasher: KeyHasher,
    budget: usize,
}

impl<V: Weigh> L1Map<V> {
    pub fn new(max_bytes: u64, max_value_bytes: usize) -> Self {
        let per_value = (max_value_bytes.max(1) as u64).saturating_mul(4);
        let want = (max_bytes / per_value).clamp(1, MAX_SHARDS as u64) as usize;
        // A power of two, so the shard is picked with a mask.
        let n = if want.is_power_of_two() {
            want
        } else {
            want.next_power_of_two() / 2
        };
        let share = (max_bytes / n as u64) as usize;
        let sketch = Sketch::for_budget(share);
        L1Map {
            // The sketch is memory too: it comes out of the shard's share.
            budget: share.saturating_sub(sketch.bytes()),
            shards: (0..n)
                .map(|_| {
                    Padded(Mutex::new(Shard {
                        sketch: sketch.clone(),
                        ..Shard::default()
                    }))
                })
                .collect(),
            hasher: KeyHasher::default(),
        }
    }

    /// A key's hash in its db. Db 0's is the key's own: the common case
    /// pays nothing for the others.
    fn hash(&self, db: u32, key: &[u8]) -> u64 {
        let h = self.hasher.hash_one(key);
        if db == 0 {
            h
        } else {
            h ^ (db as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        }
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, Shard<V>> {
        // hashbrown takes its bucket from the low bits and its 7-bit tag
        // from the top ones: the shard comes from the middle, so keys of
        // one shard do not share tags (which would make probes compare
        // keys in vain).
        let i = (hash >> 32) as usize & (self.shards.len() - 1);
        // A panic while a shard was held cannot leave it half-updated in a
        // way a reader could misuse (values are replaced whole), so poisoning is
        // ignored rather than spread.
        self.shards[i].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks `key` up and hands its value to `f` while the shard is held,
    /// so a small frame can be copied out without touching its refcount
    /// (an atomic on a line other threads' hits also write). `f` answers
    /// None when the value cannot serve this read (another command's
    /// entry for the key): a miss, which counts nothing.
    pub fn get_with<R>(
        &self,
        db: u32,
        key: &[u8],
        now: Instant,
        f: impl FnOnce(&V) -> Option<R>,
    ) -> Get<R> {
        self.get_counted(db, key, now, true, f)
    }

    /// `get_with` for a first try that a full lookup follows on a miss:
    /// a missing key is not counted (the lookup will count it).
    pub fn try_get_with<R>(
        &self,
        db: u32,
        key: &[u8],
        now: Instant,
        f: impl FnOnce(&V) -> Option<R>,
    ) -> Get<R> {
        self.get_counted(db, key, now, false, f)
    }

    fn get_counted<R>(
        &self,
        db: u32,
        key: &[u8],
        now: Instant,
        count_miss: bool,
        f: impl FnOnce(&V) -> Option<R>,
    ) -> Get<R> {
        let hash = self.hash(db, key);
        let mut sh = self.shard(hash);
        let Some(i) = sh.find(hash, db, key) else {
            if count_miss {
                sh.sketch.record(hash);
            }
            return Get::Miss;
        };
        let Shard { slots, sketch, .. } = &mut *sh;
        let slot = slots[i].as_mut().expect("indexed slot is occupied");
        if now >= slot.deadline {
            sketch.record(hash);
            sh.remove_at(i);
            return Get::Expired;
        }
        let Some(r) = f(&slot.value) else {
            return Get::Miss;
        };
        // The reference bit is the sketch's doorkeeper: a resident key
        // counts once per pass of the hand, not once per hit, so the
        // all-hits path writes no sketch line (one more cache miss per hit
        // measured +35 ns) and a key's count means "read in this many
        // sweeps", which is what admission weighs against.
        if !slot.referenced {
            slot.referenced = true;
            sketch.record(hash);
        }
        Get::Hit(r)
    }

    /// Installs `value` for `key` until `deadline`, replacing any entry of
    /// the key. A value too heavy for a shard is not stored, and the key's
    /// older entry is removed all the same: the caller meant to replace it.
    pub fn insert(
        &self,
        db: u32,
        key: &[u8],
        value: V,
        deadline: Instant,
        now: Instant,
    ) -> Evicted {
        self.upsert(db, key, now, |_| Some((value, deadline)))
    }

    /// Replaces the key's entry with what `make` builds from it (the
    /// current value and deadline, None when absent or expired), under
    /// one hold of the shard, so nothing else is installed in between.
    /// `make` answering None leaves the key without an entry.
    pub fn upsert(
        &self,
        db: u32,
        key: &[u8],
        now: Instant,
        make: impl FnOnce(Option<(V, Instant)>) -> Option<(V, Instant)>,
    ) -> Evicted {
        let hash = self.hash(db, key);
        let mut sh = self.shard(hash);
        // A key already held is refreshed, not admitted anew.
        let (resident, current) = match sh.find(hash, db, key) {
            Some(i) => {
                let slot = sh.remove_at(i).expect("indexed slot is occupied");
                (
                    true,
                    (now < slot.deadline).then_some((slot.value, slot.deadline)),
                )
            }
            None => (false, None),
        };
        let mut ev = Evicted::default();
        let Some((value, deadline)) = make(current) else {
            return ev;
        };
        let weight = key.len() + value.weight() + entry_overhead::<V>();
        if weight > self.budget {
            return ev;
        }
        let wanted = sh.sketch.frequency(hash);
        // Victims are chosen first and removed only once the newcomer is
        // admitted, so a large newcomer turned away at its third victim
        // has not pushed out the first two for nothing.
        let mut victims: smallvec::SmallVec<[(usize, bool); 4]> = smallvec::SmallVec::new();
        let mut freed = 0;
        while sh.bytes - freed + weight > self.budget {
            let Some(v) = sh.victim(now, &victims) else {
                break;
            };
            let slot = sh.slots[v].as_ref().expect("victim is occupied");
            let expired = now >= slot.deadline;
            if !expired && !resident && sh.sketch.frequency(slot.hash) >= wanted {
                // Turned away; expired entries found on the way go all the
                // same.
                ev.rejected = true;
                victims.retain(|&mut (_, expired)| expired);
                break;
            }
            freed += slot.weight;
            victims.push((v, expired));
        }
        for &(v, expired) in &victims {
            sh.remove_at(v);
            if expired {
                ev.expired += 1;
            } else {
                ev.size += 1;
            }
        }
        if ev.rejected {
            return ev;
        }
        let slot = Slot {
            key: Key::from_slice(key),
            db,
            value,
            hash,
            deadline,
            weight,
            referenced: false,
        };
        let i = match sh.free.pop() {
            Some(i) => {
                sh.slots[i as usize] = Some(slot);
                i
            }
            None => {
                sh.slots.push(Some(slot));
                (sh.slots.len() - 1) as u32
            }
        };
        let Shard { table, slots, .. } = &mut *sh;
        table.insert_unique(hash, i, |&j| slot_hash(slots, j));
        sh.bytes += weight;
        ev
    }

    pub fn remove(&self, db: u32, key: &[u8]) -> bool {
        let hash = self.hash(db, key);
        let mut sh = self.shard(hash);
        match sh.find(hash, db, key) {
            Some(i) => {
                sh.remove_at(i);
                true
            }
            None => false,
        }
    }

    pub fn clear(&self) {
        for s in self.shards.iter() {
            let mut sh = s.0.lock().unwrap_or_else(|e| e.into_inner());
            // Popularity outlives a flush: it is about keys, not values.
            let sketch = std::mem::take(&mut sh.sketch);
            *sh = Shard {
                sketch,
                ..Shard::default()
            };
        }
    }

    pub fn entries(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).table.len() as u64)
            .sum()
    }

    /// Weighted size: what the bound is measured against.
    pub fn bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).bytes as u64)
            .sum()
    }

    #[cfg(test)]
    fn shard_count(&self) -> usize {
        self.shards.len()
    }
}

fn slot_hash<V>(slots: &[Option<Slot<V>>], i: u32) -> u64 {
    slots[i as usize].as_ref().map_or(0, |s| s.hash)
}

impl<V> Shard<V> {
    fn find(&self, hash: u64, db: u32, key: &[u8]) -> Option<usize> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| {
                slots[i as usize]
                    .as_ref()
                    .is_some_and(|s| s.db == db && s.key.as_slice() == key)
            })
            .map(|&i| i as usize)
    }

    fn remove_at(&mut self, i: usize) -> Option<Slot<V>> {
        let slot = self.slots[i].take()?;
        if let Ok(e) = self.table.find_entry(slot.hash, |&j| j as usize == i) {
            e.remove();
        }
        self.bytes -= slot.weight;
        self.free.push(i as u32);
        Some(slot)
    }

    /// Advances the hand to the first entry not referenced since its last
    /// pass (or already expired) and returns it, the hand just past it.
    /// None when the shard holds nothing else.
    /// Entries in `chosen` (victims already picked) are passed over.
    fn victim(&mut self, now: Instant, chosen: &[(usize, bool)]) -> Option<usize> {
        let n = self.slots.len();
        // Two sweeps: the first may only clear reference bits.
        for _ in 0..2 * n {
            if self.hand >= n {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            if chosen.iter().any(|&(j, _)| j == i) {
                continue;
            }
            let Some(s) = self.slots[i].as_mut() else {
                continue;
            };
            if s.referenced && now < s.deadline {
                s.referenced = false;
                continue;
            }
            return Some(i);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![b'v'; n])
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    impl L1Map<Bytes> {
        fn get(&self, key: &[u8], now: Instant) -> Get<Bytes> {
            self.get_with(0, key, now, |f| Some(f.clone()))
        }
    }

    #[test]
    fn insert_get_replace_remove() {
        let m = L1Map::<Bytes>::new(1 << 20, 1 << 10);
        let now = Instant::now();
        assert!(matches!(m.get(b"k", now), Get::Miss));
        m.insert(0, b"k", frame(3), later(), now);
        assert!(matches!(m.get(b"k", now), Get::Hit(f) if f.len() == 3));
        m.insert(0, b"k", frame(5), later(), now);
        assert!(matches!(m.get(b"k", now), Get::Hit(f) if f.len() == 5));
        assert_eq!(m.entries(), 1);
        assert_eq!(m.bytes(), (1 + 5 + entry_overhead::<Bytes>()) as u64);
        assert!(m.remove(0, b"k"));
        assert!(!m.remove(0, b"k"));
        assert!(matches!(m.get(b"k", now), Get::Miss));
        assert_eq!((m.entries(), m.bytes()), (0, 0));
    }

    #[test]
    fn entries_end_at_their_deadline() {
        let m = L1Map::<Bytes>::new(1 << 20, 1 << 10);
        let now = Instant::now();
        m.insert(0, b"k", frame(1), now + Duration::from_millis(5), now);
        assert!(matches!(m.get(b"k", now), Get::Hit(_)));
        assert!(matches!(
            m.get(b"k", now + Duration::from_millis(5)),
            Get::Expired
        ));
        assert_eq!(m.entries(), 0);
    }

    /// The real order: a lookup that misses (counted by the sketch), then
    /// the fill's insert.
    fn fill(m: &L1Map<Bytes>, key: &[u8], n: usize, deadline: Instant, now: Instant) -> Evicted {
        assert!(!matches!(m.get(key, now), Get::Hit(_)));
        m.insert(0, key, frame(n), deadline, now)
    }

    #[test]
    fn the_byte_bound_holds_and_read_keys_survive_a_scan() {
        let max = 64 * 1024;
        let m = L1Map::<Bytes>::new(max, 1024);
        assert_eq!(m.shard_count(), 16);
        let now = Instant::now();
        let hot: Vec<String> = (0..20).map(|i| format!("hot{i}")).collect();
        for k in &hot {
            fill(&m, k.as_bytes(), 100, later(), now);
        }
        let mut rejected = 0;
        for i in 0..5000 {
            for k in &hot {
                assert!(
                    matches!(m.get(k.as_bytes(), now), Get::Hit(_)),
                    "{k} at {i}"
                );
            }
            let ev = fill(&m, format!("cold{i}").as_bytes(), 100, later(), now);
            assert_eq!(ev.expired, 0);
            rejected += ev.rejected as u32;
            assert!(m.bytes() <= max);
        }
        assert!(m.bytes() > max * 8 / 10, "shards fill up: {}", m.bytes());
        // Tiny shards have tiny sketches: collisions admit some.
        assert!(rejected > 2500, "one-off keys are turned away: {rejected}");
    }

    #[test]
    fn frequent_keys_survive_a_scan_even_unread_since_the_last_sweep() {
        // CLOCK alone keeps only what was read since the hand passed; the
        // sketch remembers that these keys were read many times before.
        let max = 1 << 20;
        let m = L1Map::<Bytes>::new(max, 64 * 1024);
        assert_eq!(m.shard_count(), 4);
        let now = Instant::now();
        let hot: Vec<String> = (0..200).map(|i| format!("hot{i}")).collect();
        for k in &hot {
            fill(&m, k.as_bytes(), 100, later(), now);
            for _ in 0..5 {
                assert!(matches!(m.get(k.as_bytes(), now), Get::Hit(_)));
            }
        }
        let mut admitted = 0;
        for i in 0..20_000 {
            admitted += !fill(&m, format!("scan{i}").as_bytes(), 100, later(), now).rejected as u32;
        }
        let kept = hot
            .iter()
            .filter(|k| matches!(m.get(k.as_bytes(), now), Get::Hit(_)))
            .count();
        // Their five reads fell in one sweep, so they count 2 (the miss
        // and the first hit); a scan key counts 1, plus what it shares
        // with others (the doorkeeper keeps one-off keys out of the counters).
        assert!(kept >= 195, "{kept} of 200 hot keys kept");
        assert!(
            admitted > 2000,
            "scan keys still fill the free room: {admitted}"
        );
        assert!(m.bytes() <= max);
    }

    #[test]
    fn a_key_asked_for_more_often_than_the_victim_displaces_it() {
        let m = L1Map::<Bytes>::new(1 << 20, 64 * 1024);
        let now = Instant::now();
        // Fill every shard to its bound with keys asked for once.
        let mut i = 0;
        let mut rejected = 0;
        while rejected < 400 {
            rejected += fill(&m, format!("once{i}").as_bytes(), 100, later(), now).rejected as u32;
            i += 1;
        }
        let mut first_time = 0;
        for p in 0..50 {
            let key = format!("popular{p}");
            let mut shows = 0;
            loop {
                shows += 1;
                assert!(shows <= 5, "{key} never admitted");
                let ev = fill(&m, key.as_bytes(), 100, later(), now);
                if !ev.rejected {
                    assert!(ev.size >= 1, "it displaced an entry");
                    break;
                }
            }
            first_time += (shows == 1) as u32;
            assert!(matches!(m.get(key.as_bytes(), now), Get::Hit(_)));
        }
        // Only a sketch collision lets a first request displace an equal.
        assert!(first_time <= 5, "{first_time} of 50 admitted at once");
    }

    #[test]
    fn a_newcomer_turned_away_pushes_nothing_out() {
        // One shard holding cold, cold, hot (in clock order); a large
        // newcomer, asked for more than the cold keys but less than the hot
        // one, would need all three places: it is turned away at the hot
        // one, and the cold ones stay.
        let m = L1Map::<Bytes>::new(4096, 4096);
        assert_eq!(m.shard_count(), 1);
        let now = Instant::now();
        fill(&m, b"cold1", 1000, later(), now);
        fill(&m, b"cold2", 1000, later(), now);
        for _ in 0..6 {
            assert!(matches!(m.get(b"hot", now), Get::Miss));
        }
        m.insert(0, b"hot", frame(1000), later(), now);
        for _ in 0..2 {
            assert!(matches!(m.get(b"big", now), Get::Miss));
        }
        let ev = fill(&m, b"big", 3000, later(), now);
        assert!(ev.rejected, "{ev:?}");
        assert_eq!((ev.size, ev.expired), (0, 0));
        for k in [&b"cold1"[..], b"cold2", b"hot"] {
            assert!(matches!(m.get(k, now), Get::Hit(_)));
        }
        assert!(matches!(m.get(b"big", now), Get::Miss));
    }

    #[test]
    fn a_first_try_does_not_count_a_miss() {
        let m = L1Map::<Bytes>::new(1 << 20, 1 << 10);
        let now = Instant::now();
        let freq = |m: &L1Map<Bytes>| {
            let h = m.hash(0, b"k");
            m.shard(h).sketch.frequency(h)
        };
        for _ in 0..3 {
            assert!(matches!(
                m.try_get_with(0, b"k", now, |f| Some(f.clone())),
                Get::Miss
            ));
        }
        assert_eq!(freq(&m), 0);
        assert!(matches!(m.get(b"k", now), Get::Miss));
        assert_eq!(freq(&m), 1);
    }

    #[test]
    fn popularity_ages() {
        let mut s = Sketch::for_budget(2048);
        assert_eq!(s.width(), 16);
        for _ in 0..100 {
            s.record(7);
        }
        assert_eq!(s.frequency(7), SKETCH_MAX);
        // 10 x width increments of other keys halve every counter.
        for h in 0..400u64 {
            s.record(h.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 << 63);
        }
        assert!(s.frequency(7) < SKETCH_MAX, "{}", s.frequency(7));
    }

    #[test]
    fn expired_entries_go_first_and_are_counted_so() {
        let m = L1Map::<Bytes>::new(4096, 256);
        assert_eq!(m.shard_count(), 4);
        let now = Instant::now();
        let soon = now + Duration::from_millis(1);
        for i in 0..200 {
            fill(&m, format!("k{i}").as_bytes(), 10, soon, now);
        }
        let after = soon + Duration::from_millis(1);
        let e = fill(&m, b"late", 10, later(), after);
        assert_eq!(e.size, 0, "an expired entry was there to go first");
        assert!(e.expired >= 1);
        assert!(!e.rejected, "expired entries give way whatever their count");
    }

    #[test]
    fn too_heavy_replaces_by_removing() {
        let m = L1Map::<Bytes>::new(4096, 1024);
        let now = Instant::now();
        m.insert(0, b"k", frame(10), later(), now);
        m.insert(0, b"k", frame(5000), later(), now);
        assert!(matches!(m.get(b"k", now), Get::Miss));
        assert_eq!(m.bytes(), 0);
    }

    #[test]
    fn clear_empties_and_slots_are_reused() {
        let m = L1Map::<Bytes>::new(1 << 20, 1 << 10);
        let now = Instant::now();
        for round in 0..3 {
            for i in 0..100 {
                m.insert(0, format!("k{i}").as_bytes(), frame(10), later(), now);
            }
            for i in 0..100 {
                assert!(m.remove(0, format!("k{i}").as_bytes()), "round {round}");
            }
        }
        let slots: usize = m
            .shards
            .iter()
            .map(|s| s.0.lock().unwrap().slots.len())
            .sum();
        assert!(slots <= 100 + m.shard_count(), "{slots} slots for 100 keys");
        m.insert(0, b"x", frame(1), later(), now);
        m.clear();
        assert_eq!((m.entries(), m.bytes()), (0, 0));
    }
}
