//! onrec's exploration: bandit policies per user segment, with statistics in memory or Redis.
//!
//! The ranker proposes the top-M candidates, best first. A request falls into a segment
//! ([`SegmentConfig::resolve`]); the segment's [`Policy`] (greedy, ε-greedy, UCB1 or
//! Thompson sampling) re-ranks the candidates into the final n slots, and every slot
//! carries its `propensity` and whether it was `explored`, for off-policy evaluation.
//! The policies learn from per-(segment, item) impressions and reward sums kept by a
//! [`BanditStore`]: [`MemoryStore`] embedded, or [`RedisStore`] shared by all replicas,
//! behind a [`ResilientStore`] that bounds latency and buffers writes through outages.
//! [`Explorer`] ties them together for the request path.
//!
//! ```
//! use std::sync::Arc;
//! use onrec_policy::{
//!     BanditStore, Candidate, Explorer, MemoryStore, SegmentConfig, StatsConfig, UserFacts,
//! };
//! use rand::{SeedableRng, rngs::SmallRng};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = Arc::new(MemoryStore::new(StatsConfig::default())?);
//! let explorer = Explorer::new(SegmentConfig::default(), store.clone()).expect("valid");
//! let segment = explorer.segment(None, &UserFacts::default());
//! let candidates = vec![Candidate::new("sku-1", 9.0), Candidate::new("sku-2", 7.5)];
//! let slate = explorer.rerank(&segment, (&candidates, true), 1, &mut SmallRng::seed_from_u64(1)).await;
//! assert_eq!(slate.slots[0].item_id, "sku-1");
//! store.record(&Explorer::impressions(&segment, &slate.slots)).await?;
//! # Ok::<(), onrec_policy::StoreError>(()) }).unwrap();
//! ```

mod beta;
mod draws;
pub mod error;
pub mod explorer;
pub mod policy;
pub mod segment;
pub mod stats;
pub mod store;

pub use crate::error::{ConfigError, StoreError};
pub use crate::explorer::{Explorer, Reranked};
pub use crate::policy::{Candidate, Policy, PolicyConfig, Slot, exploit};
pub use crate::segment::{DEFAULT_SEGMENT, SegmentConfig, SegmentRule, UserFacts};
pub use crate::stats::{
    ArmStats, ArmSummary, BatchId, Clock, ManualClock, SegmentStats, SegmentSummary, StatUpdate,
    StatsConfig, SystemClock, stable_digest,
};
pub use crate::store::connection::RedisConn;
pub use crate::store::memory::MemoryStore;
pub use crate::store::redis::{RedisConfig, RedisStore};
pub use crate::store::resilient::{ResilientConfig, ResilientStore};
pub use crate::store::{BanditStore, StoreFuture};
