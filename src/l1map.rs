//! The L1's storage: a sharded hash map of reply frames with a byte bound
//! and CLOCK (second-chance) eviction.
//!
//! It replaced moka, which cost about a third of the proxy's CPU on a
//! pipelined all-hits load (lookup, read recording into its policy
//! deques, the maintenance that drains them). Here a hit is a hash, one
//! uncontended shard lock, a probe and a reference bit; eviction work is
//! done by the insert that exceeds the bound, never by readers.
//!
//! The bound: every shard holds at most `max_bytes / shards`, so the whole
//! map holds at most `max_bytes`, counted as key + frame + a fixed per-entry
//! overhead that covers the slot, the table entry and the frame's
//! allocation header. The shard count keeps a shard's budget at least four
//! times `max_value_bytes`, so any admissible value fits in its shard.
//!
//! CLOCK has no admission filter: a one-off scan of cold keys can push
//! hot ones out, but a key read since the hand last passed survives a
//! sweep, so keys that are read repeatedly stay.

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

struct Slot {
    key: Key,
    frame: Bytes,
    hash: u64,
    /// The earlier of the key's own expiry in Redis and `max_ttl`.
    deadline: Instant,
    weight: usize,
    /// Set by hits, cleared by the passing clock hand.
    referenced: bool,
}

/// What one entry costs beyond its key and frame bytes: the slot, the
/// table's index and control byte (with its spare capacity), and the
/// frame's shared allocation header.
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Option<Slot>>() + 16 + 32;

#[derive(Default)]
struct Shard {
    table: HashTable<u32>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    bytes: usize,
    hand: usize,
}

/// One shard per cache line, so two threads hitting neighbouring shards
/// do not share a line.
#[repr(align(64))]
#[derive(Default)]
struct Padded(Mutex<Shard>);

pub enum Get<R> {
    /// What the caller's closure made of the frame.
    Hit(R),
    Miss,
    /// Found past its deadline, and removed.
    Expired,
}

/// Entries an insert pushed out, by reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub size: u64,
    pub expired: u64,
}

pub struct L1Map {
    shards: Box<[Padded]>,
    hasher: KeyHasher,
    budget: usize,
}

impl L1Map {
    pub fn new(max_bytes: u64, max_value_bytes: usize) -> Self {
        let per_value = (max_value_bytes.max(1) as u64).saturating_mul(4);
        let want = (max_bytes / per_value).clamp(1, MAX_SHARDS as u64) as usize;
        // A power of two, so the shard is picked with a mask.
        let n = if want.is_power_of_two() {
            want
        } else {
            want.next_power_of_two() / 2
        };
        L1Map {
            shards: (0..n).map(|_| Padded::default()).collect(),
            hasher: KeyHasher::default(),
            budget: (max_bytes / n as u64) as usize,
        }
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, Shard> {
        // hashbrown takes its bucket from the low bits and its 7-bit tag
        // from the top ones: the shard comes from the middle, so keys of
        // one shard do not share tags (which would make probes compare
        // keys in vain).
        let i = (hash >> 32) as usize & (self.shards.len() - 1);
        // A panic while a shard was held cannot leave it half-updated in a
        // way a reader could misuse (frames are immutable), so poisoning is
        // ignored rather than spread.
        self.shards[i].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks `key` up and hands its frame to `f` while the shard is held,
    /// so a small frame can be copied out without touching its refcount
    /// (an atomic on a line other threads' hits also write).
    pub fn get_with<R>(&self, key: &[u8], now: Instant, f: impl FnOnce(&Bytes) -> R) -> Get<R> {
        let hash = self.hasher.hash_one(key);
        let mut sh = self.shard(hash);
        let Some(i) = sh.find(hash, key) else {
            return Get::Miss;
        };
        let slot = sh.slots[i].as_mut().expect("indexed slot is occupied");
        if now >= slot.deadline {
            sh.remove_at(i);
            return Get::Expired;
        }
        slot.referenced = true;
        Get::Hit(f(&slot.frame))
    }

    #[cfg(test)]
    fn get(&self, key: &[u8], now: Instant) -> Get<Bytes> {
        self.get_with(key, now, Bytes::clone)
    }

    /// Installs `frame` for `key` until `deadline`, replacing any entry of
    /// the key. A frame too heavy for a shard is not stored, and the key's
    /// older entry is removed all the same: the caller meant to replace it.
    pub fn insert(&self, key: &[u8], frame: Bytes, deadline: Instant, now: Instant) -> Evicted {
        let hash = self.hasher.hash_one(key);
        let weight = key.len() + frame.len() + ENTRY_OVERHEAD;
        let mut sh = self.shard(hash);
        if let Some(i) = sh.find(hash, key) {
            sh.remove_at(i);
        }
        let mut ev = Evicted::default();
        if weight > self.budget {
            return ev;
        }
        while sh.bytes + weight > self.budget {
            match sh.evict_one(now) {
                Some(true) => ev.expired += 1,
                Some(false) => ev.size += 1,
                None => break,
            }
        }
        let slot = Slot {
            key: Key::from_slice(key),
            frame,
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

    pub fn remove(&self, key: &[u8]) -> bool {
        let hash = self.hasher.hash_one(key);
        let mut sh = self.shard(hash);
        match sh.find(hash, key) {
            Some(i) => {
                sh.remove_at(i);
                true
            }
            None => false,
        }
    }

    pub fn clear(&self) {
        for s in self.shards.iter() {
            *s.0.lock().unwrap_or_else(|e| e.into_inner()) = Shard::default();
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

fn slot_hash(slots: &[Option<Slot>], i: u32) -> u64 {
    slots[i as usize].as_ref().map_or(0, |s| s.hash)
}

impl Shard {
    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| {
                slots[i as usize]
                    .as_ref()
                    .is_some_and(|s| s.key.as_slice() == key)
            })
            .map(|&i| i as usize)
    }

    fn remove_at(&mut self, i: usize) {
        let Some(slot) = self.slots[i].take() else {
            return;
        };
        if let Ok(e) = self.table.find_entry(slot.hash, |&j| j as usize == i) {
            e.remove();
        }
        self.bytes -= slot.weight;
        self.free.push(i as u32);
    }

    /// Advances the hand to the first entry not referenced since its last
    /// pass (or already expired) and removes it. Returns whether it had
    /// expired, or None when the shard is empty.
    fn evict_one(&mut self, now: Instant) -> Option<bool> {
        let n = self.slots.len();
        // Two sweeps: the first may only clear reference bits.
        for _ in 0..2 * n {
            if self.hand >= n {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            let Some(s) = self.slots[i].as_mut() else {
                continue;
            };
            let expired = now >= s.deadline;
            if s.referenced && !expired {
                s.referenced = false;
                continue;
            }
            self.remove_at(i);
            return Some(expired);
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

    #[test]
    fn insert_get_replace_remove() {
        let m = L1Map::new(1 << 20, 1 << 10);
        let now = Instant::now();
        assert!(matches!(m.get(b"k", now), Get::Miss));
        m.insert(b"k", frame(3), later(), now);
        assert!(matches!(m.get(b"k", now), Get::Hit(f) if f.len() == 3));
        m.insert(b"k", frame(5), later(), now);
        assert!(matches!(m.get(b"k", now), Get::Hit(f) if f.len() == 5));
        assert_eq!(m.entries(), 1);
        assert_eq!(m.bytes(), (1 + 5 + ENTRY_OVERHEAD) as u64);
        assert!(m.remove(b"k"));
        assert!(!m.remove(b"k"));
        assert!(matches!(m.get(b"k", now), Get::Miss));
        assert_eq!((m.entries(), m.bytes()), (0, 0));
    }

    #[test]
    fn entries_end_at_their_deadline() {
        let m = L1Map::new(1 << 20, 1 << 10);
        let now = Instant::now();
        m.insert(b"k", frame(1), now + Duration::from_millis(5), now);
        assert!(matches!(m.get(b"k", now), Get::Hit(_)));
        assert!(matches!(
            m.get(b"k", now + Duration::from_millis(5)),
            Get::Expired
        ));
        assert_eq!(m.entries(), 0);
    }

    #[test]
    fn the_byte_bound_holds_and_read_keys_survive_a_scan() {
        let max = 64 * 1024;
        let m = L1Map::new(max, 1024);
        assert_eq!(m.shard_count(), 16);
        let now = Instant::now();
        let hot: Vec<String> = (0..20).map(|i| format!("hot{i}")).collect();
        for k in &hot {
            m.insert(k.as_bytes(), frame(100), later(), now);
        }
        for i in 0..5000 {
            for k in &hot {
                assert!(
                    matches!(m.get(k.as_bytes(), now), Get::Hit(_)),
                    "{k} at {i}"
                );
            }
            let ev = m.insert(format!("cold{i}").as_bytes(), frame(100), later(), now);
            assert_eq!(ev.expired, 0);
            assert!(m.bytes() <= max);
        }
        assert!(m.bytes() > max * 8 / 10, "shards fill up: {}", m.bytes());
    }

    #[test]
    fn expired_entries_go_first_and_are_counted_so() {
        let m = L1Map::new(4096, 256);
        assert_eq!(m.shard_count(), 4);
        let now = Instant::now();
        let soon = now + Duration::from_millis(1);
        let mut ev = Evicted::default();
        for i in 0..200 {
            let e = m.insert(format!("k{i}").as_bytes(), frame(10), soon, now);
            ev.size += e.size;
        }
        assert!(ev.size > 0);
        let after = soon + Duration::from_millis(1);
        let e = m.insert(b"late", frame(10), later(), after);
        assert_eq!(e.size, 0, "an expired entry was there to go first");
        assert!(e.expired >= 1);
    }

    #[test]
    fn too_heavy_replaces_by_removing() {
        let m = L1Map::new(4096, 1024);
        let now = Instant::now();
        m.insert(b"k", frame(10), later(), now);
        m.insert(b"k", frame(5000), later(), now);
        assert!(matches!(m.get(b"k", now), Get::Miss));
        assert_eq!(m.bytes(), 0);
    }

    #[test]
    fn clear_empties_and_slots_are_reused() {
        let m = L1Map::new(1 << 20, 1 << 10);
        let now = Instant::now();
        for round in 0..3 {
            for i in 0..100 {
                m.insert(format!("k{i}").as_bytes(), frame(10), later(), now);
            }
            for i in 0..100 {
                assert!(m.remove(format!("k{i}").as_bytes()), "round {round}");
            }
        }
        let slots: usize = m
            .shards
            .iter()
            .map(|s| s.0.lock().unwrap().slots.len())
            .sum();
        assert!(slots <= 100 + m.shard_count(), "{slots} slots for 100 keys");
        m.insert(b"x", frame(1), later(), now);
        m.clear();
        assert_eq!((m.entries(), m.bytes()), (0, 0));
    }
}
