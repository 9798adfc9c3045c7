//! Bounded, approximately least-recently-used maps for per-user state and event dedupe.
//!
//! Two generations: entries live in `current` until it fills, then `current` becomes
//! `previous` and the old `previous` is dropped. A hit in `previous` moves the entry back
//! to `current`, so active keys survive and memory never exceeds the capacity. Cheaper
//! than a linked LRU and good enough where "recently active" is all that matters.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};

use parking_lot::Mutex;

/// A map holding at most about `capacity` entries, dropping the least recently used.
#[derive(Debug)]
pub struct Bounded<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    generation_cap: usize,
}

impl<K: Hash + Eq, V> Bounded<K, V> {
    /// A map that keeps at most `capacity` entries (at least 2).
    pub fn new(capacity: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            generation_cap: (capacity / 2).max(1),
        }
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` is held, without refreshing it.
    pub fn contains(&self, key: &K) -> bool {
        self.current.contains_key(key) || self.previous.contains_key(key)
    }

    /// The value for `key`, without refreshing it.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.previous.iter().chain(self.current.iter())
    }

    /// The value for `key` if held; the entry becomes most recent.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V>
    where
        K: Clone,
    {
        if let Some(value) = self.previous.remove(key) {
            if self.current.len() >= self.generation_cap {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(key.clone(), value);
        }
        self.current.get_mut(key)
    }

    /// The value for `key`, inserting `make()` if absent; the entry becomes most recent.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if !self.current.contains_key(&key) {
            let revived = self.previous.remove(&key);
            if self.current.len() >= self.generation_cap {
                self.previous = std::mem::take(&mut self.current);
            }
            return self
                .current
                .entry(key)
                .or_insert_with(|| revived.unwrap_or_else(make));
        }
        self.current.entry(key).or_insert_with(make)
    }
}

/// A [`Bounded`] map split into shards behind their own locks, for concurrent access.
#[derive(Debug)]
pub struct Sharded<K, V> {
    shards: Box<[Mutex<Bounded<K, V>>]>,
    hasher: RandomState,
}

const SHARDS: usize = 16;

impl<K: Hash + Eq, V> Sharded<K, V> {
    /// A sharded map holding at most about `capacity` entries in all.
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(2);
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Bounded::new(per_shard)))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    /// The locked shard that holds `key` (or a borrowed form of it, which hashes alike).
    pub fn shard<Q>(&self, key: &Q) -> parking_lot::MutexGuard<'_, Bounded<K, V>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + ?Sized,
    {
        let i = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        self.shards[i].lock()
    }

    /// Number of entries held in all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether every shard is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` on every entry, one shard locked at a time.
    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        for shard in &self.shards {
            for (k, v) in shard.lock().iter() {
                f(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_capacity_and_drops_the_least_recent() {
        let mut m = Bounded::new(4);
        for k in 0..4 {
            *m.get_or_insert_with(k, || 0) += k;
        }
        assert_eq!(m.len(), 4);
        // 0 is refreshed, so it survives the next rotation; 1 is not.
        m.get_or_insert_with(0, || 99);
        for k in 4..6 {
            m.get_or_insert_with(k, || k);
        }
        assert!(m.len() <= 4);
        assert!(m.contains(&0));
        assert_eq!(m.peek(&0), Some(&0));
        assert!(!m.contains(&1));
        assert_eq!(m.get_mut(&1), None);
        *m.get_mut(&0).unwrap() += 7;
        assert_eq!(m.peek(&0), Some(&7));
    }

    #[test]
    fn sharded_map_is_bounded_in_total() {
        let m = Sharded::new(64);
        for k in 0..10_000u32 {
            m.shard(&k).get_or_insert_with(k, || ());
        }
        assert!(m.len() <= 64 + SHARDS, "{}", m.len());
        assert!(!m.is_empty());
        let mut seen = 0;
        m.for_each(|k, ()| {
            assert!(*k < 10_000);
            seen += 1;
        });
        assert_eq!(seen, m.len());
    }
}
