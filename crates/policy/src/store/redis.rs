//! Statistics in Redis, shared by every replica of the service.
//!
//! Key layout, with `P` the key prefix (`onrec:bandit` by default) and `S` a segment:
//!
//! | key | type | content |
//! | --- | --- | --- |
//! | `P:S:arms` | hash | `i:{item}` → impressions, `r:{item}` → reward sum (fields only once non-zero) |
//! | `P:S:total` | hash | `i` → impressions, `r` → reward over all items; `l` → decay landmark (ms), with decay only |
//! | `P:segments` | sorted set | segment names, scored by their last write (ms) |
//! | `P:batch:{id}` | string | set when the batch `id` was applied; expires after [`BATCH_MEMORY`] |
//!
//! Values are floats written with `HINCRBYFLOAT`; with a half-life they are stored
//! against the landmark as [`crate::stats`] describes. Every write refreshes a TTL
//! (`PEXPIRE`, 30 days by default) on the keys it touches, so abandoned segments vanish;
//! the sorted set drops members older than the TTL on each write. A segment with more
//! than 2 × `max_arms_per_segment` fields is pruned to its 7/8 × `max_arms_per_segment`
//! most shown items, and beyond `max_segments` segments the least recently written are
//! deleted.
//!
//! [`BanditStore::fetch`] is one `MULTI`/`EXEC` pipeline of two `HMGET`s;
//! [`BanditStore::record_batch`] is one Lua script (`EVALSHA`) that applies the whole
//! batch atomically and at most once: it sets the batch's key first and does nothing
//! when the key was already set, so a batch re-sent after its answer was lost (a timeout,
//! a dropped connection) counts once. Then decay bookkeeping, increments, TTLs, limits. The script derives the keys
//! of evicted segments from the prefix, which a Redis Cluster allows only within one
//! slot: on a cluster (`redis+cluster://`) `P` is a hash tag (`{onrec:bandit}`), so every
//! key of the store lives on one node of it.
//!
//! The connection is a [`ConnectionManager`] created lazily: the store is built without
//! Redis answering, connects on first use, and reconnects after failures.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::ConnectionManagerConfig;

use super::connection::{RedisConn, cluster_prefix};
use ::redis::{RedisError, Script};

use super::{BATCH_MEMORY, BanditStore, StoreFuture};
use crate::error::StoreError;
use crate::stats::{
    ArmStats, BatchId, Clock, Decay, REBASE_HALF_LIVES, SegmentStats, SegmentSummary, StatUpdate,
    StatsConfig, SystemClock, check_all, summarize,
};

/// The script behind [`BanditStore::record`].
const RECORD_SCRIPT: &str = include_str!("record.lua");

/// Settings of the Redis store.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// PEM certificates to verify a TLS server against instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Lifetime of a segment's keys after its last write; `None` keeps them forever.
    pub ttl: Option<Duration>,
    /// Decay and limits.
    pub stats: StatsConfig,
    /// Longest wait for a connection to open.
    pub connect_timeout: Duration,
    /// Longest wait for any answer on an open connection.
    pub response_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            ca_pem: None,
            key_prefix: "onrec:bandit".into(),
            ttl: Some(Duration::from_secs(30 * 24 * 3600)),
            stats: StatsConfig::default(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
        }
    }
}

/// Statistics in Redis.
pub struct RedisStore {
    conn: RedisConn,
    config: RedisConfig,
    decay: Decay,
    clock: Arc<dyn Clock>,
    script: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.config.key_prefix)
            .field("ttl", &self.config.ttl)
            .field("stats", &self.config.stats)
            .finish_non_exhaustive()
    }
}

fn store_error(e: RedisError) -> StoreError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl RedisStore {
    /// A store on the system clock. It does not connect yet, so it is built whether or not
    /// Redis answers. Must be called inside a Tokio runtime.
    pub fn new(config: RedisConfig) -> Result<Self, StoreError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A store on `clock` (see [`RedisStore::new`]).
    pub fn with_clock(mut config: RedisConfig, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        config.stats.validate()?;
        if config.key_prefix.is_empty() {
            return Err(StoreError::Config("key_prefix must not be empty".into()));
        }
        config.key_prefix = cluster_prefix(&config.url, &config.key_prefix);
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::Config(
                "the Redis store must be created inside a Tokio runtime".into(),
            ));
        }
        // Few, short reconnect retries: callers wait on a reconnect in progress, and the
        // next failed call starts a new one anyway.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        let conn = RedisConn::open(&config.url, config.ca_pem.as_deref(), manager_config)
            .map_err(|e| StoreError::Config(format!("redis url: {e}")))?;
        Ok(Self {
            conn,
            decay: Decay::new(config.stats.half_life),
            config,
            clock,
            script: Script::new(RECORD_SCRIPT),
        })
    }

    /// The hash of `segment`'s per-item statistics.
    pub fn arms_key(&self, segment: &str) -> String {
        format!("{}:{segment}:arms", self.config.key_prefix)
    }

    /// The hash of `segment`'s totals.
    pub fn total_key(&self, segment: &str) -> String {
        format!("{}:{segment}:total", self.config.key_prefix)
    }

    /// The sorted set of segments.
    pub fn segments_key(&self) -> String {
        format!("{}:segments", self.config.key_prefix)
    }

    /// The key that marks batch `id` as applied.
    pub fn batch_key(&self, id: BatchId) -> String {
        format!("{}:batch:{id:032x}", self.config.key_prefix)
    }

    /// Decayed (impressions, reward) from stored values and the segment's landmark.
    fn read(&self, stored: ArmStats, landmark: Option<f64>, now: i64) -> ArmStats {
        let f = match landmark {
            Some(l) if self.decay.enabled() => self.decay.weight(l as i64, now),
            _ => 1.0,
        };
        ArmStats {
            impressions: stored.impressions * f,
            reward: stored.reward * f,
        }
    }

    /// The statistics of each of `segments` for `item_ids`, in one atomic pipeline.
    async fn fetch_inner(
        &self,
        segments: &[&str],
        item_ids: &[&str],
    ) -> Result<Vec<SegmentStats>, StoreError> {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for segment in segments {
            pipe.cmd("HMGET")
                .arg(self.total_key(segment))
                .arg("i")
                .arg("r")
                .arg("l");
            if !item_ids.is_empty() {
                pipe.cmd("HMGET").arg(self.arms_key(segment));
                for id in item_ids {
                    pipe.arg(format!("i:{id}")).arg(format!("r:{id}"));
                }
            }
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Vec<Option<f64>>> =
            pipe.query_async(&mut conn).await.map_err(store_error)?;
        let now = self.clock.now_ms();
        let per_segment = if item_ids.is_empty() { 1 } else { 2 };
        Ok((0..segments.len())
            .map(|k| {
                let replies = replies.get(k * per_segment..).unwrap_or_default();
                self.decode(replies, item_ids, now)
            })
            .collect())
    }

    /// One segment's statistics from its replies: the totals, then (with items) the arms.
    fn decode(&self, replies: &[Vec<Option<f64>>], item_ids: &[&str], now: i64) -> SegmentStats {
        let value = |v: Option<&Option<f64>>| v.copied().flatten().filter(|x| x.is_finite());
        let totals = replies.first().map_or(&[][..], Vec::as_slice);
        let landmark = value(totals.get(2));
        let t = self.read(
            ArmStats {
                impressions: value(totals.first()).unwrap_or(0.0),
                reward: value(totals.get(1)).unwrap_or(0.0),
            },
            landmark,
            now,
        );
        let mut arms = HashMap::new();
        if let Some(values) = replies.get(1).filter(|_| !item_ids.is_empty()) {
            for (id, pair) in item_ids.iter().zip(values.chunks_exact(2)) {
                let (i, r) = (value(pair.first()), value(pair.get(1)));
                if i.is_none() && r.is_none() {
                    continue;
                }
                let stored = ArmStats {
                    impressions: i.unwrap_or(0.0),
                    reward: r.unwrap_or(0.0),
                };
                arms.insert((*id).to_owned(), self.read(stored, landmark, now));
            }
        }
        SegmentStats {
            total_impressions: t.impressions,
            total_reward: t.reward,
            arms,
        }
    }

    async fn record_inner(&self, id: BatchId, updates: &[StatUpdate]) -> Result<(), StoreError> {
        check_all(updates)?;
        let now = self.clock.now_ms();
        // Group by segment, in order of first appearance.
        let mut groups: Vec<(&str, Vec<&StatUpdate>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for u in updates {
            if u.impressions == 0.0 && u.reward == 0.0 {
                continue;
            }
            let i = *index.entry(u.segment.as_str()).or_insert_with(|| {
                groups.push((u.segment.as_str(), Vec::new()));
                groups.len() - 1
            });
            groups[i].1.push(u);
        }
        if groups.is_empty() {
            return Ok(());
        }
        let mut inv = self.script.prepare_invoke();
        inv.key(self.segments_key());
        for (segment, _) in &groups {
            inv.key(self.arms_key(segment)).key(self.total_key(segment));
        }
        inv.key(self.batch_key(id));
        let stats = &self.config.stats;
        inv.arg(now)
            .arg(self.decay.half_life_ms())
            .arg(self.config.ttl.map_or(0, millis))
            .arg(stats.max_arms_per_segment)
            .arg(stats.max_segments)
            .arg(&self.config.key_prefix)
            .arg(REBASE_HALF_LIVES)
            .arg(millis(BATCH_MEMORY));
        for (segment, group) in &groups {
            inv.arg(*segment).arg(group.len());
            for u in group {
                inv.arg(&u.item_id)
                    .arg(u.impressions)
                    .arg(u.reward)
                    .arg(u.at_ms.unwrap_or(now).min(now));
            }
        }
        let mut conn = self.conn.clone();
        inv.invoke_async::<()>(&mut conn).await.map_err(store_error)
    }

    /// The segment's decayed totals and every item's decayed statistics.
    async fn read_segment(
        &self,
        segment: &str,
    ) -> Result<(ArmStats, HashMap<String, ArmStats>), StoreError> {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        pipe.cmd("HMGET")
            .arg(self.total_key(segment))
            .arg("i")
            .arg("r")
            .arg("l");
        pipe.cmd("HGETALL").arg(self.arms_key(segment));
        let mut conn = self.conn.clone();
        let (totals, fields): (Vec<Option<f64>>, HashMap<String, f64>) =
            pipe.query_async(&mut conn).await.map_err(store_error)?;
        let now = self.clock.now_ms();
        let value = |i: usize| totals.get(i).copied().flatten().filter(|x| x.is_finite());
        let landmark = value(2);
        let mut arms: HashMap<String, ArmStats> = HashMap::new();
        for (field, v) in fields {
            let (kind, id) = field.split_at_checked(2).unwrap_or(("", ""));
            let arm = arms.entry(id.to_owned()).or_default();
            match kind {
                "i:" => arm.impressions = v,
                "r:" => arm.reward = v,
                _ => {}
            }
        }
        let totals = ArmStats {
            impressions: value(0).unwrap_or(0.0),
            reward: value(1).unwrap_or(0.0),
        };
        let arms = arms
            .into_iter()
            .map(|(id, a)| (id, self.read(a, landmark, now)))
            .collect();
        Ok((self.read(totals, landmark, now), arms))
    }

    async fn summary_inner(&self, segment: &str, top: usize) -> Result<SegmentSummary, StoreError> {
        let (totals, arms) = self.read_segment(segment).await?;
        Ok(summarize(segment, totals, arms, top))
    }

    async fn arms_inner(&self, segment: &str) -> Result<Vec<(String, ArmStats)>, StoreError> {
        Ok(self.read_segment(segment).await?.1.into_iter().collect())
    }

    async fn segments_inner(&self) -> Result<Vec<String>, StoreError> {
        let min = match self.config.ttl {
            Some(ttl) => (self.clock.now_ms() - millis(ttl)).to_string(),
            None => "-inf".to_owned(),
        };
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = ::redis::cmd("ZRANGEBYSCORE")
            .arg(self.segments_key())
            .arg(min)
            .arg("+inf")
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        names.sort();
        Ok(names)
    }

    async fn ping_inner(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(store_error)
    }
}

impl BanditStore for RedisStore {
    fn fetch<'a>(
        &'a self,
        segment: &'a str,
        item_ids: &'a [&'a str],
    ) -> StoreFuture<'a, SegmentStats> {
        Box::pin(async move {
            let mut stats = self.fetch_inner(&[segment], item_ids).await?;
            Ok(stats.pop().unwrap_or_default())
        })
    }

    fn fetch_with_prior<'a>(
        &'a self,
        segment: &'a str,
        others: &'a [&'a str],
        item_ids: &'a [&'a str],
    ) -> StoreFuture<'a, (SegmentStats, SegmentStats)> {
        Box::pin(async move {
            let segments: Vec<&str> = std::iter::once(segment)
                .chain(others.iter().copied())
                .collect();
            let mut stats = self.fetch_inner(&segments, item_ids).await?.into_iter();
            let own = stats.next().unwrap_or_default();
            let mut prior = SegmentStats::default();
            for other in stats {
                prior.pool(&other);
            }
            Ok((own, prior))
        })
    }

    fn record_batch<'a>(&'a self, id: BatchId, updates: &'a [StatUpdate]) -> StoreFuture<'a, ()> {
        Box::pin(self.record_inner(id, updates))
    }

    fn segment_summary<'a>(
        &'a self,
        segment: &'a str,
        top: usize,
    ) -> StoreFuture<'a, SegmentSummary> {
        Box::pin(self.summary_inner(segment, top))
    }

    fn arms<'a>(&'a self, segment: &'a str) -> StoreFuture<'a, Vec<(String, ArmStats)>> {
        Box::pin(self.arms_inner(segment))
    }

    fn segments(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.segments_inner())
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.ping_inner())
    }

    fn half_life(&self) -> Option<Duration> {
        self.config.stats.half_life
    }
}
