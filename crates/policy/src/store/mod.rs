//! Where bandit statistics live: in memory, in Redis, and behind a fault-tolerant wrapper.
//!
//! [`BanditStore`] is object-safe (methods return boxed futures), so the service holds an
//! `Arc<dyn BanditStore>` and picks the implementation from its configuration.

pub mod connection;
pub mod memory;
pub mod redis;
pub mod resilient;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::error::StoreError;
use crate::stats::{ArmStats, BatchId, SegmentStats, SegmentSummary, StatUpdate};

/// How long a store remembers the ids of the batches it applied: a batch re-sent within
/// this time is acknowledged without counting it again.
pub const BATCH_MEMORY: Duration = Duration::from_secs(3600);

/// The future a store method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Per-(segment, item) impressions and reward sums, and per-segment totals.
pub trait BanditStore: Send + Sync + fmt::Debug {
    /// The segment's totals and the statistics of `item_ids` (absent items are left out),
    /// decayed to now. One round trip.
    fn fetch<'a>(
        &'a self,
        segment: &'a str,
        item_ids: &'a [&'a str],
    ) -> StoreFuture<'a, SegmentStats>;

    /// [`BanditStore::fetch`] of `segment`, and the statistics of `others` pooled (summed
    /// after decay) for the same items: a prior for `segment`. One round trip where the
    /// store has them.
    fn fetch_with_prior<'a>(
        &'a self,
        segment: &'a str,
        others: &'a [&'a str],
        item_ids: &'a [&'a str],
    ) -> StoreFuture<'a, (SegmentStats, SegmentStats)> {
        Box::pin(async move {
            let own = self.fetch(segment, item_ids).await?;
            let mut prior = SegmentStats::default();
            for other in others {
                prior.pool(&self.fetch(other, item_ids).await?);
            }
            Ok((own, prior))
        })
    }

    /// Adds the updates to their items and segments, all or nothing, and at most once per
    /// batch `id`: a batch whose id was applied within [`BATCH_MEMORY`] is acknowledged
    /// and not applied again, so a batch re-sent after its answer was lost counts once. A
    /// batch with a bad update ([`StatUpdate::check`]) is refused whole.
    fn record_batch<'a>(&'a self, id: BatchId, updates: &'a [StatUpdate]) -> StoreFuture<'a, ()>;

    /// [`BanditStore::record_batch`] under a new batch id.
    fn record<'a>(&'a self, updates: &'a [StatUpdate]) -> StoreFuture<'a, ()> {
        self.record_batch(BatchId::new(), updates)
    }

    /// The segment's totals and its `top` items by mean reward.
    fn segment_summary<'a>(
        &'a self,
        segment: &'a str,
        top: usize,
    ) -> StoreFuture<'a, SegmentSummary>;

    /// Every item's statistics in the segment, decayed to now, in no particular order:
    /// the whole segment, for a snapshot.
    fn arms<'a>(&'a self, segment: &'a str) -> StoreFuture<'a, Vec<(String, ArmStats)>>;

    /// The segments with statistics, sorted by name.
    fn segments(&self) -> StoreFuture<'_, Vec<String>>;

    /// Answers when the store is reachable.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// The half-life the store decays statistics with, if any.
    fn half_life(&self) -> Option<Duration> {
        None
    }
}
