//! The ranker's state behind one lock (catalog, popularity, the encoder's view of the
//! catalog) and the popularity ranking that fills what the encoder does not.

use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;

use onrec_model::rng::SplitMix64;
use parking_lot::Mutex;

use crate::catalog::Catalog;
use crate::encoder::EncoderLink;
use crate::popularity::Popularity;
use crate::{RANKER, RANKER_ENCODER};

/// Whether the engine ranks with an encoder.
#[derive(Debug)]
pub(crate) enum EncoderState {
    /// Popularity only, by configuration.
    None,
    /// An encoder is being loaded or trained; popularity serves meanwhile.
    Loading,
    /// The online encoder has not published anything yet: no events have come.
    Learning,
    /// The encoder ranks users with a known history.
    Ready(EncoderLink),
}

/// The ranker's state: catalog, scores and the encoder's view of the catalog change
/// together under one lock.
#[derive(Debug)]
pub(crate) struct Ranking {
    /// Shared so that a new encoder is linked to it without holding the lock; a change
    /// copies it only while such a link is being built.
    pub(crate) catalog: Arc<Catalog>,
    /// Behind its own lock, so that an event adds to it under the shared (read) lock of
    /// the ranking and never holds up requests.
    pub(crate) popularity: Mutex<Popularity>,
    pub(crate) encoder: EncoderState,
    /// Bumped by every catalog change; part of the model version.
    pub(crate) catalog_generation: u64,
}

impl Ranking {
    pub(crate) fn ranker(&self) -> &'static str {
        match self.encoder {
            EncoderState::Ready(_) => RANKER_ENCODER,
            EncoderState::None | EncoderState::Loading | EncoderState::Learning => RANKER,
        }
    }

    pub(crate) fn model_version(&self) -> String {
        match &self.encoder {
            EncoderState::Ready(link) => format!("{}-c{}", link.version, self.catalog_generation),
            EncoderState::None | EncoderState::Loading | EncoderState::Learning => {
                format!("{RANKER}-c{}", self.catalog_generation)
            }
        }
    }

    /// The `n` most popular available items outside `skip`. Ties (a fresh catalog is all
    /// ties) are broken by a hash of the item and `salt`, so each request draws them in
    /// another order, never in catalog order.
    ///
    /// A full heap admits only an item that beats its worst, and only such an item is
    /// looked up in `skip`: most of a large catalog costs a key, a hash and a comparison.
    pub(crate) fn popular(&self, skip: &HashSet<u32>, n: usize, salt: u64) -> Vec<u32> {
        let mut heap: BinaryHeap<Ranked> = BinaryHeap::with_capacity(n + 1);
        let popularity = self.popularity.lock();
        for (idx, &available) in self.catalog.availability().iter().enumerate() {
            if !available {
                continue;
            }
            let idx = idx as u32;
            let ranked = Ranked {
                key: popularity.rank_key(idx),
                // SplitMix64's first output: nearby inputs give unrelated values.
                tie: SplitMix64::new(u64::from(idx) ^ salt).next_u64(),
                idx,
            };
            if heap.len() == n && heap.peek().is_some_and(|worst| ranked >= *worst) {
                continue;
            }
            if skip.contains(&idx) {
                continue;
            }
            heap.push(ranked);
            if heap.len() > n {
                heap.pop();
            }
        }
        heap.into_sorted_vec().into_iter().map(|c| c.idx).collect()
    }
}

/// How a request will be ranked, decided under the lock and carried out after it.
pub(crate) enum Plan {
    Popularity(Option<&'static str>),
    Encoder(onrec_model::serve::Encoder, onrec_model::serve::Query),
}

/// An item in the top-n heap, ordered so the heap's top is the worst one kept.
#[derive(Debug, PartialEq)]
pub(crate) struct Ranked {
    pub(crate) key: f64,
    /// Breaks ties of `key`.
    pub(crate) tie: u64,
    pub(crate) idx: u32,
}

impl Eq for Ranked {}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Higher key is better; on ties the lower tie-breaker is better.
        other
            .key
            .total_cmp(&self.key)
            .then(self.tie.cmp(&other.tie))
            .then(self.idx.cmp(&other.idx))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Item;

    #[test]
    fn popular_items_are_the_best_of_a_full_sort() {
        let mut rng = SplitMix64::new(3);
        let mut catalog = Catalog::default();
        let mut popularity = Popularity::new(3_600_000.0, 0);
        let items = 3_000u32;
        for i in 0..items {
            let mut item = Item::new(format!("sku-{i}"), "c");
            item.available = !rng.next_u64().is_multiple_of(10);
            catalog.upsert(item);
        }
        // Replacing an item may change whether it is available.
        for i in (0..items).step_by(7) {
            let mut item = Item::new(format!("sku-{i}"), "c");
            item.available = !catalog.get(i).available;
            catalog.upsert(item);
        }
        popularity.grow(items as usize);
        // Most items tie at 0; the others tie in small groups, some below 0 (dislikes).
        for _ in 0..400 {
            let idx = (rng.next_u64() % u64::from(items)) as u32;
            let weight = [1.0, 2.0, 3.0, -1.0][(rng.next_u64() % 4) as usize];
            popularity.add(idx, weight, 0);
        }
        let ranking = Ranking {
            catalog: Arc::new(catalog),
            popularity: Mutex::new(popularity),
            encoder: EncoderState::None,
            catalog_generation: 1,
        };
        for (salt, n, skipped) in [
            (1, 50, 0),
            (2, 5, 30),
            (3, 1, 300),
            (4, 0, 10),
            (5, 4_000, 50),
        ] {
            let skip: HashSet<u32> = (0..skipped)
                .map(|_| (rng.next_u64() % u64::from(items)) as u32)
                .collect();
            let mut all: Vec<Ranked> = (0..items)
                .filter(|&i| ranking.catalog.get(i).available && !skip.contains(&i))
                .map(|idx| Ranked {
                    key: ranking.popularity.lock().rank_key(idx),
                    tie: SplitMix64::new(u64::from(idx) ^ salt).next_u64(),
                    idx,
                })
                .collect();
            all.sort();
            let want: Vec<u32> = all.iter().take(n).map(|r| r.idx).collect();
            assert_eq!(ranking.popular(&skip, n, salt), want, "salt {salt}, n {n}");
        }
    }
}
