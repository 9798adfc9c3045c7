//! The ranker's state behind one lock (catalog, popularity, the encoder's view of the
//! catalog) and the popularity ranking that fills what the encoder does not.

use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;

use onrec_model::rng::SplitMix64;

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
    pub(crate) popularity: Popularity,
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
    pub(crate) fn popular(&self, skip: &HashSet<u32>, n: usize, salt: u64) -> Vec<u32> {
        let mut heap = BinaryHeap::with_capacity(n + 1);
        for (idx, item) in self.catalog.items().iter().enumerate() {
            let idx = idx as u32;
            if !item.available || skip.contains(&idx) {
                continue;
            }
            heap.push(Ranked {
                key: self.popularity.rank_key(idx),
                // SplitMix64's first output: nearby inputs give unrelated values.
                tie: SplitMix64::new(u64::from(idx) ^ salt).next_u64(),
                idx,
            });
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
