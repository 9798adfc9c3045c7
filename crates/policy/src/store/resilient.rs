//! A fault-tolerant wrapper: latency budget, retry buffer, health, logs and metrics.
//!
//! Every read runs under a timeout (the latency budget); every write under its own,
//! longer one (`write_timeout`), because writes run off the request path and a write cut
//! short is a write in doubt. When a call fails or times out:
//!
//! - `fetch`, `segment_summary`, `segments`, `ping` return the error at once; the caller
//!   of `fetch` falls back to exploit-only ranking ([`crate::Explorer`] does).
//! - `record` keeps the batch, whole and under its batch id, in a bounded buffer: a batch
//!   that does not fit beside `max_buffered` buffered updates is dropped and counted. The
//!   buffer is written back, batch by batch under the same ids, by
//!   [`ResilientStore::flush`]: after the next successful `record`, and from the task of
//!   [`ResilientStore::spawn_maintenance`], which every `flush_interval` flushes the
//!   buffer or, when it is empty, pings the store.
//!
//! Delivery: exactly once. A batch whose answer was lost (a timeout after Redis applied
//! it, a connection dropped before the reply) is re-sent under its id, and the store
//! applies an id at most once (see [`BanditStore::record_batch`]).
//!
//! Failures are logged at most once per `log_interval` (with the count suppressed in
//! between) and counted in the metrics `onrec_bandit_store_errors_total{op}`,
//! `onrec_bandit_store_latency_seconds{op}` (histogram of every call, failures included),
//! `onrec_bandit_store_buffered_updates` (gauge) and
//! `onrec_bandit_store_dropped_updates_total`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{BanditStore, StoreFuture};
use crate::error::StoreError;
use crate::stats::{
    ArmStats, BatchId, Clock, SegmentStats, SegmentSummary, StatUpdate, SystemClock, check_all,
};

/// Settings of the wrapper.
#[derive(Debug, Clone, PartialEq)]
pub struct ResilientConfig {
    /// Latency budget of one read.
    pub timeout: Duration,
    /// Budget of one write (a batch, or a buffered batch written back).
    pub write_timeout: Duration,
    /// Period of the maintenance task.
    pub flush_interval: Duration,
    /// Most updates buffered.
    pub max_buffered: usize,
    /// Least time between two failure log lines.
    pub log_interval: Duration,
}

impl Default for ResilientConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(20),
            write_timeout: Duration::from_secs(2),
            flush_interval: Duration::from_secs(1),
            max_buffered: 100_000,
            log_interval: Duration::from_secs(10),
        }
    }
}

/// Batches waiting to be written, oldest first, with their update count.
#[derive(Debug, Default)]
struct Buffer {
    batches: VecDeque<(BatchId, Vec<StatUpdate>)>,
    updates: usize,
}

/// Allows one event per interval and counts the others.
#[derive(Debug)]
struct RateLimit {
    interval_ms: i64,
    last_ms: AtomicI64,
    suppressed: AtomicU64,
}

impl RateLimit {
    fn new(interval: Duration) -> Self {
        Self {
            interval_ms: i64::try_from(interval.as_millis()).unwrap_or(i64::MAX),
            last_ms: AtomicI64::new(i64::MIN),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(events suppressed since the last allowed one)` when this one may pass.
    fn allow(&self, now_ms: i64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == i64::MIN || now_ms.saturating_sub(last) >= self.interval_ms;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A store behind a latency budget, with a retry buffer for writes.
#[derive(Debug)]
pub struct ResilientStore {
    inner: Arc<dyn BanditStore>,
    config: ResilientConfig,
    clock: Arc<dyn Clock>,
    buffer: Mutex<Buffer>,
    dropped: AtomicU64,
    healthy: AtomicBool,
    failure_log: RateLimit,
}

impl ResilientStore {
    /// Wraps `inner`, on the system clock. It reports unhealthy until its first answer.
    pub fn new(inner: Arc<dyn BanditStore>, config: ResilientConfig) -> Self {
        Self::with_clock(inner, config, Arc::new(SystemClock))
    }

    /// Wraps `inner`, stamping updates without a time with `clock`.
    pub fn with_clock(
        inner: Arc<dyn BanditStore>,
        config: ResilientConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            failure_log: RateLimit::new(config.log_interval),
            inner,
            config,
            clock,
            buffer: Mutex::new(Buffer::default()),
            dropped: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
        }
    }

    /// Whether the last call to the store succeeded (for readiness).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Updates waiting in the retry buffer.
    pub fn buffered(&self) -> usize {
        self.buffer.lock().updates
    }

    /// Updates dropped because the buffer was full, since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Pings the store; updates and returns the health.
    pub async fn check(&self) -> bool {
        let budget = self.config.timeout;
        self.call("ping", budget, self.inner.ping()).await.is_ok()
    }

    /// Writes the buffered batches to the store, oldest first, each under its own id;
    /// returns the updates written. On a failure the batch and those after it stay
    /// buffered.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let mut written = 0;
        loop {
            let Some((id, batch)) = self.buffer.lock().batches.front().cloned() else {
                break;
            };
            let budget = self.config.write_timeout;
            self.call("flush", budget, self.inner.record_batch(id, &batch))
                .await?;
            let mut buffer = self.buffer.lock();
            // Only this task's flush or a concurrent one removes batches, front first.
            if buffer
                .batches
                .front()
                .is_some_and(|(front, _)| *front == id)
            {
                buffer.batches.pop_front();
                buffer.updates -= batch.len();
            }
            drop(buffer);
            written += batch.len();
        }
        self.publish_buffered();
        Ok(written)
    }

    /// Starts the task that flushes the buffer (or pings the store when it is empty) every
    /// `flush_interval`, beginning now. It ends when the store is dropped.
    pub fn spawn_maintenance(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        // A zero period would make `interval` panic.
        let period = self.config.flush_interval.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::spawn(async move {
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else {
                    return;
                };
                if store.buffered() > 0 {
                    // Failures are already logged and counted.
                    let _ = store.flush().await;
                } else {
                    store.check().await;
                }
            }
        })
    }

    /// Runs one call under `budget`, with metrics, health and logging.
    async fn call<T>(
        &self,
        op: &'static str,
        budget: Duration,
        fut: StoreFuture<'_, T>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(budget, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(budget)),
        };
        metrics::histogram!("onrec_bandit_store_latency_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(op, "bandit store answers");
                }
            }
            // The caller's mistake says nothing about the store's health.
            Err(StoreError::InvalidUpdate(_)) => {}
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                metrics::counter!("onrec_bandit_store_errors_total", "op" => op).increment(1);
                if let Some(suppressed) = self.failure_log.allow(self.clock.now_ms()) {
                    tracing::warn!(
                        op,
                        error = %e,
                        suppressed,
                        buffered = self.buffered(),
                        "bandit store call failed; fetches fall back to the ranker's order and writes are buffered"
                    );
                }
            }
        }
        result
    }

    /// Buffers a batch under its id; returns how many updates were dropped (the whole
    /// batch, when it does not fit).
    fn buffer_batch(&self, id: BatchId, updates: Vec<StatUpdate>) -> usize {
        let dropped = {
            let mut buffer = self.buffer.lock();
            if buffer.updates + updates.len() > self.config.max_buffered {
                updates.len()
            } else {
                buffer.updates += updates.len();
                buffer.batches.push_back((id, updates));
                0
            }
        };
        if dropped > 0 {
            self.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
            metrics::counter!("onrec_bandit_store_dropped_updates_total").increment(dropped as u64);
        }
        self.publish_buffered();
        dropped
    }

    fn publish_buffered(&self) {
        metrics::gauge!("onrec_bandit_store_buffered_updates").set(self.buffered() as f64);
    }

    async fn record_inner(&self, id: BatchId, updates: &[StatUpdate]) -> Result<(), StoreError> {
        check_all(updates)?;
        let now = self.clock.now_ms();
        // Stamped now, so a retry later lands where the update belongs in time.
        let stamped: Vec<StatUpdate> = updates
            .iter()
            .map(|u| StatUpdate {
                at_ms: Some(u.at_ms.unwrap_or(now)),
                ..u.clone()
            })
            .collect();
        let budget = self.config.write_timeout;
        match self
            .call("record", budget, self.inner.record_batch(id, &stamped))
            .await
        {
            Ok(()) => {
                if self.buffered() > 0 {
                    // Failures stay buffered for the next try.
                    let _ = self.flush().await;
                }
                Ok(())
            }
            Err(e @ StoreError::InvalidUpdate(_)) => Err(e),
            Err(_) => match self.buffer_batch(id, stamped) {
                0 => Ok(()),
                n => Err(StoreError::BufferFull(n)),
            },
        }
    }
}

impl BanditStore for ResilientStore {
    fn fetch<'a>(
        &'a self,
        segment: &'a str,
        item_ids: &'a [&'a str],
    ) -> StoreFuture<'a, SegmentStats> {
        Box::pin(self.call(
            "fetch",
            self.config.timeout,
            self.inner.fetch(segment, item_ids),
        ))
    }

    fn fetch_with_prior<'a>(
        &'a self,
        segment: &'a str,
        others: &'a [&'a str],
        item_ids: &'a [&'a str],
    ) -> StoreFuture<'a, (SegmentStats, SegmentStats)> {
        Box::pin(self.call(
            "fetch",
            self.config.timeout,
            self.inner.fetch_with_prior(segment, others, item_ids),
        ))
    }

    /// Writes through, or buffers on failure (then `Ok`, or [`StoreError::BufferFull`]).
    fn record_batch<'a>(&'a self, id: BatchId, updates: &'a [StatUpdate]) -> StoreFuture<'a, ()> {
        Box::pin(self.record_inner(id, updates))
    }

    fn segment_summary<'a>(
        &'a self,
        segment: &'a str,
        top: usize,
    ) -> StoreFuture<'a, SegmentSummary> {
        Box::pin(self.call(
            "segment_summary",
            self.config.timeout,
            self.inner.segment_summary(segment, top),
        ))
    }

    fn arms<'a>(&'a self, segment: &'a str) -> StoreFuture<'a, Vec<(String, ArmStats)>> {
        Box::pin(self.call("arms", self.config.write_timeout, self.inner.arms(segment)))
    }

    fn segments(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.call("segments", self.config.timeout, self.inner.segments()))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.call("ping", self.config.timeout, self.inner.ping()))
    }

    fn half_life(&self) -> Option<Duration> {
        self.inner.half_life()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{ManualClock, StatsConfig};
    use crate::store::memory::MemoryStore;

    /// A memory store that can be switched to failing (fast), hanging, or applying a
    /// batch and then hanging (its answer lost).
    #[derive(Debug)]
    struct Flaky {
        store: MemoryStore,
        mode: Mutex<Mode>,
        calls: AtomicU64,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Mode {
        Up,
        Down,
        Hung,
        Lost,
    }

    impl Flaky {
        fn new(half_life: Option<Duration>, clock: Arc<ManualClock>) -> Arc<Self> {
            let config = StatsConfig {
                half_life,
                ..StatsConfig::default()
            };
            Arc::new(Self {
                store: MemoryStore::with_clock(config, clock).unwrap(),
                mode: Mutex::new(Mode::Up),
                calls: AtomicU64::new(0),
            })
        }

        fn set(&self, mode: Mode) {
            *self.mode.lock() = mode;
        }

        fn gate<'a, T: Send + 'a>(&'a self, f: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let mode = *self.mode.lock();
            Box::pin(async move {
                match mode {
                    Mode::Up => f.await,
                    Mode::Down => Err(StoreError::Unavailable("connection refused".into())),
                    Mode::Hung => std::future::pending().await,
                    Mode::Lost => {
                        f.await?;
                        std::future::pending().await
                    }
                }
            })
        }
    }

    impl BanditStore for Flaky {
        fn fetch<'a>(
            &'a self,
            segment: &'a str,
            item_ids: &'a [&'a str],
        ) -> StoreFuture<'a, SegmentStats> {
            self.gate(self.store.fetch(segment, item_ids))
        }
        fn record_batch<'a>(
            &'a self,
            id: BatchId,
            updates: &'a [StatUpdate],
        ) -> StoreFuture<'a, ()> {
            // Only a store that is up (or loses answers) applies the batch.
            let mode = *self.mode.lock();
            match mode {
                Mode::Up | Mode::Lost => self.gate(self.store.record_batch(id, updates)),
                Mode::Down | Mode::Hung => self.gate(Box::pin(async { Ok(()) })),
            }
        }
        fn segment_summary<'a>(
            &'a self,
            segment: &'a str,
            top: usize,
        ) -> StoreFuture<'a, SegmentSummary> {
            self.gate(self.store.segment_summary(segment, top))
        }
        fn arms<'a>(&'a self, segment: &'a str) -> StoreFuture<'a, Vec<(String, ArmStats)>> {
            self.gate(self.store.arms(segment))
        }
        fn segments(&self) -> StoreFuture<'_, Vec<String>> {
            self.gate(self.store.segments())
        }
        fn ping(&self) -> StoreFuture<'_, ()> {
            self.gate(self.store.ping())
        }
        fn half_life(&self) -> Option<Duration> {
            self.store.half_life()
        }
    }

    fn wrap(inner: &Arc<Flaky>, clock: &Arc<ManualClock>, max_buffered: usize) -> ResilientStore {
        ResilientStore::with_clock(
            inner.clone(),
            ResilientConfig {
                max_buffered,
                write_timeout: Duration::from_millis(100),
                ..ResilientConfig::default()
            },
            clock.clone(),
        )
    }

    #[tokio::test]
    async fn buffers_while_down_and_flushes_exactly_once_back() {
        let clock = Arc::new(ManualClock::new(0));
        let inner = Flaky::new(None, clock.clone());
        let store = wrap(&inner, &clock, 200);
        assert!(!store.is_healthy());
        store
            .record(&[StatUpdate::impression("s", "a")])
            .await
            .unwrap();
        assert!(store.is_healthy());

        inner.set(Mode::Down);
        assert!(matches!(
            store.fetch("s", &["a"]).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(!store.is_healthy());
        for _ in 0..50 {
            let batch = [
                StatUpdate::impression("s", "a"),
                StatUpdate::reward("s", "a", 0.5),
                StatUpdate::impression("t", "b"),
            ];
            store.record(&batch).await.unwrap();
        }
        assert_eq!(store.buffered(), 150);
        assert!(store.flush().await.is_err());
        assert_eq!(store.buffered(), 150);

        inner.set(Mode::Up);
        // The next successful write flushes the buffer too.
        store
            .record(&[StatUpdate::impression("s", "a")])
            .await
            .unwrap();
        assert_eq!(store.buffered(), 0);
        assert!(store.is_healthy());
        let s = store.fetch("s", &["a"]).await.unwrap();
        assert_eq!(s.arm("a").impressions, 52.0);
        assert_eq!(s.arm("a").reward, 25.0);
        let t = store.fetch("t", &["b"]).await.unwrap();
        assert_eq!(t.arm("b").impressions, 50.0);
    }

    #[tokio::test]
    async fn hung_store_times_out_within_the_budget() {
        let clock = Arc::new(ManualClock::new(0));
        let inner = Flaky::new(None, clock.clone());
        let store = wrap(&inner, &clock, 100);
        inner.set(Mode::Hung);
        let err = store.fetch("s", &["a"]).await.unwrap_err();
        assert_eq!(err, StoreError::Timeout(Duration::from_millis(20)));
        assert!(!store.check().await);
        store
            .record(&[StatUpdate::impression("s", "a")])
            .await
            .unwrap();
        assert_eq!(store.buffered(), 1);
    }

    #[tokio::test]
    async fn a_batch_that_does_not_fit_is_dropped_whole_and_counted() {
        let clock = Arc::new(ManualClock::new(0));
        let inner = Flaky::new(None, clock.clone());
        let store = wrap(&inner, &clock, 3);
        inner.set(Mode::Down);
        let batch: Vec<_> = (0..5)
            .map(|i| StatUpdate::impression("s", format!("i{i}")))
            .collect();
        assert_eq!(store.record(&batch).await, Err(StoreError::BufferFull(5)));
        assert_eq!(store.buffered(), 0);
        for item in ["i0", "i1"] {
            store
                .record(&[StatUpdate::impression("s", item)])
                .await
                .unwrap();
        }
        assert_eq!(
            store.record(&batch[..2]).await,
            Err(StoreError::BufferFull(2))
        );
        assert_eq!(store.buffered(), 2);
        assert_eq!(store.dropped(), 7);
        inner.set(Mode::Up);
        assert_eq!(store.flush().await, Ok(2));
        let s = store.fetch("s", &["i0", "i1", "i4"]).await.unwrap();
        assert_eq!(s.arm("i0").impressions, 1.0);
        assert_eq!(s.arm("i1").impressions, 1.0);
        assert!(!s.arms.contains_key("i4"));
    }

    #[tokio::test]
    async fn a_batch_whose_answer_was_lost_counts_once() {
        let clock = Arc::new(ManualClock::new(0));
        let inner = Flaky::new(None, clock.clone());
        let store = wrap(&inner, &clock, 100);
        inner.set(Mode::Lost);
        let batch = [
            StatUpdate::impression("s", "a"),
            StatUpdate::reward("s", "a", 1.0),
        ];
        // The store applied it; the wrapper saw a timeout and keeps the batch.
        store.record(&batch).await.unwrap();
        assert_eq!(store.buffered(), 2);
        inner.set(Mode::Up);
        assert_eq!(store.flush().await, Ok(2));
        assert_eq!(store.buffered(), 0);
        let s = store.fetch("s", &["a"]).await.unwrap();
        assert_eq!(s.arm("a").impressions, 1.0);
        assert_eq!(s.arm("a").reward, 1.0);
        assert_eq!(s.total_impressions, 1.0);
    }

    #[tokio::test]
    async fn buffered_updates_keep_their_time_under_decay() {
        const HOUR: i64 = 3_600_000;
        let clock = Arc::new(ManualClock::new(10 * HOUR));
        let inner = Flaky::new(Some(Duration::from_secs(3600)), clock.clone());
        let store = wrap(&inner, &clock, 100);
        inner.set(Mode::Down);
        store
            .record(&[StatUpdate::impression("s", "a")])
            .await
            .unwrap();
        clock.advance(Duration::from_secs(3600));
        store
            .record(&[StatUpdate::impression("s", "a")])
            .await
            .unwrap();
        clock.advance(Duration::from_secs(3600));
        inner.set(Mode::Up);
        store.flush().await.unwrap();
        // 1 impression two half-lives ago and 1 one half-life ago.
        let s = store.fetch("s", &["a"]).await.unwrap();
        assert!((s.arm("a").impressions - 0.75).abs() < 1e-12, "{s:?}");
    }

    #[tokio::test]
    async fn invalid_updates_are_refused_not_buffered() {
        let clock = Arc::new(ManualClock::new(0));
        let inner = Flaky::new(None, clock.clone());
        let store = wrap(&inner, &clock, 100);
        inner.set(Mode::Down);
        let bad = [StatUpdate::reward("s", "a", f64::NAN)];
        assert!(matches!(
            store.record(&bad).await,
            Err(StoreError::InvalidUpdate(_))
        ));
        assert_eq!(store.buffered(), 0);
        assert_eq!(inner.calls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn maintenance_flushes_in_the_background_and_stops_with_the_store() {
        let clock = Arc::new(ManualClock::new(0));
        let inner = Flaky::new(None, clock.clone());
        let store = Arc::new(wrap(&inner, &clock, 100));
        inner.set(Mode::Down);
        store
            .record(&[StatUpdate::impression("s", "a")])
            .await
            .unwrap();
        let task = store.spawn_maintenance();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(store.buffered(), 1);
        inner.set(Mode::Up);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(store.buffered(), 0);
        assert!(store.is_healthy());
        assert_eq!(
            inner
                .store
                .fetch("s", &["a"])
                .await
                .unwrap()
                .arm("a")
                .impressions,
            1.0
        );
        drop(store);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(task.is_finished());
    }

    #[test]
    fn failure_logs_are_rate_limited() {
        let limit = RateLimit::new(Duration::from_secs(10));
        assert_eq!(limit.allow(0), Some(0));
        assert_eq!(limit.allow(1_000), None);
        assert_eq!(limit.allow(9_999), None);
        assert_eq!(limit.allow(10_000), Some(2));
        assert_eq!(limit.allow(10_001), None);
    }
}
