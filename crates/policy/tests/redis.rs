//! The Redis store against real `redis-server` processes, one per test, on free ports.
//!
//! Needs `redis-server` on the PATH (CI installs it).

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use onrec_policy::{
    BanditStore, BatchId, ManualClock, MemoryStore, RedisConfig, RedisStore, ResilientConfig,
    ResilientStore, SegmentStats, StatUpdate, StatsConfig, StoreError,
};

const HOUR: i64 = 3_600_000;

/// A `redis-server` of this test's own, killed on drop.
struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Arguments before the port: a config file and `--sentinel` for a Sentinel.
    leading: Vec<String>,
    /// Arguments after the defaults, e.g. `--replicaof`.
    extra: Vec<String>,
}

impl RedisServer {
    fn start() -> Self {
        Self::start_with(Vec::new(), Vec::new())
    }

    fn start_with(leading: Vec<String>, extra: Vec<String>) -> Self {
        let mut server = Self::reserve();
        (server.leading, server.extra) = (leading, extra);
        server.restart();
        server
    }

    /// A Sentinel monitoring `master` as `shop` (quorum 1), with short failure timers.
    fn sentinel(master: &RedisServer) -> Self {
        let port = Self::reserve().port;
        let conf =
            std::env::temp_dir().join(format!("onrec-sentinel-{}-{port}.conf", std::process::id()));
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor shop 127.0.0.1 {} 1\nsentinel down-after-milliseconds shop 1000\nsentinel failover-timeout shop 5000\n",
                master.port
            ),
        )
        .unwrap();
        let mut server = Self {
            port,
            child: None,
            leading: vec![conf.display().to_string(), "--sentinel".into()],
            extra: Vec::new(),
        };
        server.restart();
        server
    }

    /// A port nothing listens on yet, for a server started later.
    fn reserve() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            port,
            child: None,
            leading: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Starts a server on this port (again), empty, and waits until it answers PING.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        // Its own directory: a replica's full sync writes an RDB file there, which a server
        // started later in the same directory would load.
        let dir =
            std::env::temp_dir().join(format!("onrec-redis-{}-{}", std::process::id(), self.port));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(&self.leading)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &dir.display().to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed and on the PATH");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (STOP freezes the server with its connections open; CONT thaws it).
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn config(&self, half_life: Option<Duration>) -> RedisConfig {
        RedisConfig {
            url: self.url(),
            stats: StatsConfig {
                half_life,
                ..StatsConfig::default()
            },
            ..RedisConfig::default()
        }
    }

    /// A raw command, for inspecting keys.
    async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args).await.unwrap()
    }

    /// A raw command that may meet a closed connection: a Sentinel reconfiguring a
    /// server kills its normal clients.
    async fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn assert_stats_close(a: &SegmentStats, b: &SegmentStats) {
    assert!(
        close(a.total_impressions, b.total_impressions) && close(a.total_reward, b.total_reward),
        "totals differ: {a:?} vs {b:?}"
    );
    let mut ids: Vec<_> = a.arms.keys().collect();
    ids.sort();
    let mut other: Vec<_> = b.arms.keys().collect();
    other.sort();
    assert_eq!(ids, other, "arms differ: {a:?} vs {b:?}");
    for id in ids {
        let (x, y) = (a.arm(id), b.arm(id));
        assert!(
            close(x.impressions, y.impressions) && close(x.reward, y.reward),
            "{id}: {x:?} vs {y:?}"
        );
    }
}

/// A mixed workload: several segments, late updates, rewards without impressions.
fn workload(step: usize) -> Vec<StatUpdate> {
    let mut updates = Vec::new();
    for k in 0..6 {
        let item = format!("sku-{:03}", (step * 7 + k * 3) % 20);
        let segment = ["default", "mobile-de", "new"][(step + k) % 3];
        updates.push(StatUpdate::impression(segment, &item));
        if (step + k).is_multiple_of(4) {
            updates.push(StatUpdate::reward(segment, &item, 1.0 + k as f64 * 0.25));
        }
    }
    // A purchase that arrives two hours late.
    updates
        .push(StatUpdate::reward("default", "sku-001", 3.0).at(step as i64 * HOUR / 4 - 2 * HOUR));
    updates
}

async fn compare_with_memory(half_life: Option<Duration>) {
    let server = RedisServer::start();
    let clock = Arc::new(ManualClock::new(1_000 * HOUR));
    let redis = RedisStore::with_clock(server.config(half_life), clock.clone()).unwrap();
    let memory = MemoryStore::with_clock(
        StatsConfig {
            half_life,
            ..StatsConfig::default()
        },
        clock.clone(),
    )
    .unwrap();
    let ids: Vec<String> = (0..22).map(|i| format!("sku-{i:03}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    // 120 steps of 15 minutes; then a 70-hour gap, past the rebase point.
    for step in 0..121 {
        clock.set(1_000 * HOUR + step as i64 * HOUR / 4);
        if step == 120 {
            clock.set(1_000 * HOUR + 100 * HOUR);
        }
        let updates: Vec<StatUpdate> = workload(step)
            .into_iter()
            .map(|u| match u.at_ms {
                Some(at) => u.at(1_000 * HOUR + at),
                None => u,
            })
            .collect();
        redis.record(&updates).await.unwrap();
        memory.record(&updates).await.unwrap();
        if step.is_multiple_of(20) || step == 120 {
            for segment in ["default", "mobile-de", "new", "nobody"] {
                let r = redis.fetch(segment, &ids).await.unwrap();
                let m = memory.fetch(segment, &ids).await.unwrap();
                assert_stats_close(&r, &m);
            }
            // A segment's prior: the others pooled, in the same round trip.
            let others = ["default", "mobile-de", "nobody"];
            let (r_own, r_prior) = redis.fetch_with_prior("new", &others, &ids).await.unwrap();
            let (m_own, m_prior) = memory.fetch_with_prior("new", &others, &ids).await.unwrap();
            assert_stats_close(&r_own, &m_own);
            assert_stats_close(&r_prior, &m_prior);
        }
    }
    let r = redis.segment_summary("default", 5).await.unwrap();
    let m = memory.segment_summary("default", 5).await.unwrap();
    assert_eq!(r.arms, m.arms);
    assert!(close(r.impressions, m.impressions) && close(r.reward, m.reward));
    let top = |s: &onrec_policy::SegmentSummary| {
        s.top.iter().map(|a| a.item_id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(top(&r), top(&m));
    for segment in ["default", "mobile-de", "nobody"] {
        let sorted = |mut arms: Vec<(String, onrec_policy::ArmStats)>| {
            arms.sort_by(|a, b| a.0.cmp(&b.0));
            arms
        };
        let (ra, ma) = (
            sorted(redis.arms(segment).await.unwrap()),
            sorted(memory.arms(segment).await.unwrap()),
        );
        assert_eq!(ra.len(), ma.len());
        for ((rid, r), (mid, m)) in ra.iter().zip(&ma) {
            assert_eq!(rid, mid);
            assert!(close(r.impressions, m.impressions) && close(r.reward, m.reward));
        }
    }
    assert_eq!(
        redis.segments().await.unwrap(),
        memory.segments().await.unwrap()
    );
    assert_eq!(
        redis.segments().await.unwrap(),
        ["default", "mobile-de", "new"]
    );
}

#[tokio::test]
async fn round_trip_equals_the_memory_store() {
    compare_with_memory(None).await;
}

#[tokio::test]
async fn round_trip_with_decay_equals_the_memory_store() {
    compare_with_memory(Some(Duration::from_secs(3600))).await;
}

#[tokio::test]
async fn old_statistics_weigh_less_in_redis() {
    let server = RedisServer::start();
    let clock = Arc::new(ManualClock::new(500 * HOUR));
    let store = RedisStore::with_clock(
        server.config(Some(Duration::from_secs(3600))),
        clock.clone(),
    )
    .unwrap();
    let ten = |item: &str| StatUpdate {
        impressions: 10.0,
        reward: 4.0,
        ..StatUpdate::impression("s", item)
    };
    store.record(&[ten("old")]).await.unwrap();
    clock.advance(Duration::from_secs(3 * 3600));
    store.record(&[ten("new")]).await.unwrap();
    let s = store.fetch("s", &["old", "new"]).await.unwrap();
    assert!(close(s.arm("old").impressions, 1.25), "{s:?}");
    assert!(close(s.arm("old").reward, 0.5));
    assert!(close(s.arm("new").impressions, 10.0));
    assert!(close(s.total_impressions, 11.25));
    // After 70 more hours the segment is rebased on the next write; values stay right.
    clock.advance(Duration::from_secs(70 * 3600));
    store.record(&[ten("new")]).await.unwrap();
    let s = store.fetch("s", &["old", "new"]).await.unwrap();
    assert!(close(
        s.arm("new").impressions,
        10.0 + 10.0 * 2f64.powi(-70)
    ));
    assert!(
        !s.arms.contains_key("old"),
        "forgotten at the rebase: {s:?}"
    );
    let landmark: String = server.cmd(&["HGET", &store.total_key("s"), "l"]).await;
    assert_eq!(landmark.parse::<i64>().unwrap(), clock_now(&clock));
}

fn clock_now(clock: &ManualClock) -> i64 {
    onrec_policy::Clock::now_ms(clock)
}

#[tokio::test]
async fn two_instances_share_a_segment() {
    let server = RedisServer::start();
    let a = RedisStore::new(server.config(None)).unwrap();
    let b = RedisStore::new(server.config(None)).unwrap();
    a.record(&[
        StatUpdate::impression("vip", "x"),
        StatUpdate::reward("vip", "x", 1.0),
    ])
    .await
    .unwrap();
    b.record(&[
        StatUpdate::impression("vip", "x"),
        StatUpdate::impression("vip", "y"),
    ])
    .await
    .unwrap();
    for store in [&a, &b] {
        let s = store.fetch("vip", &["x", "y", "z"]).await.unwrap();
        assert_eq!(s.total_impressions, 3.0);
        assert_eq!(s.arm("x").impressions, 2.0);
        assert_eq!(s.arm("x").reward, 1.0);
        assert_eq!(s.arm("y").impressions, 1.0);
        assert_eq!(s.arms.len(), 2);
    }
    // Concurrent increments from both are all counted.
    let (ra, rb) = tokio::join!(
        async {
            for _ in 0..100 {
                a.record(&[StatUpdate::impression("vip", "z")])
                    .await
                    .unwrap();
            }
        },
        async {
            for _ in 0..100 {
                b.record(&[StatUpdate::impression("vip", "z")])
                    .await
                    .unwrap();
            }
        }
    );
    let ((), ()) = (ra, rb);
    assert_eq!(
        a.fetch("vip", &["z"]).await.unwrap().arm("z").impressions,
        200.0
    );
}

fn resilient(
    store: RedisStore,
    timeout: Duration,
    flush_interval: Duration,
) -> Arc<ResilientStore> {
    Arc::new(ResilientStore::new(
        Arc::new(store),
        ResilientConfig {
            timeout,
            write_timeout: Duration::from_secs(2),
            flush_interval,
            ..ResilientConfig::default()
        },
    ))
}

#[tokio::test]
async fn killing_redis_fails_fetches_fast_buffers_writes_and_loses_none_after_restart() {
    let mut server = RedisServer::start();
    // A budget wide enough that a loaded test machine never times out a healthy call
    // (a timed-out write may still be applied, and then be retried).
    let budget = Duration::from_millis(500);
    let store = resilient(
        RedisStore::new(server.config(None)).unwrap(),
        budget,
        Duration::from_secs(3600),
    );
    store
        .record(&[StatUpdate::impression("s", "a")])
        .await
        .unwrap();
    assert!(store.is_healthy());
    assert_eq!(
        store.fetch("s", &["a"]).await.unwrap().arm("a").impressions,
        1.0
    );

    server.kill();
    let started = Instant::now();
    let err = store.fetch("s", &["a"]).await.unwrap_err();
    // Not a latency check: it proves the call neither hangs nor waits out reconnects.
    assert!(started.elapsed() < budget + Duration::from_secs(5), "{err}");
    assert!(err.is_transient(), "{err}");
    assert!(!store.is_healthy());

    let mut expected = [0.0f64; 3];
    for round in 0..30 {
        let item = ["a", "b", "c"][round % 3];
        let updates = [
            StatUpdate::impression("s", item),
            StatUpdate::reward("s", item, 0.5),
        ];
        store.record(&updates).await.unwrap();
        expected[round % 3] += 1.0;
    }
    assert_eq!(store.buffered(), 60);
    assert!(store.flush().await.is_err());
    assert_eq!(store.buffered(), 60);

    // The new server starts empty: what it holds afterwards is exactly the buffer.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.flush().await.is_err() {
        assert!(Instant::now() < deadline, "no flush after restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.buffered(), 0);
    assert!(store.is_healthy());
    store
        .record(&[StatUpdate::impression("s", "a")])
        .await
        .unwrap();
    let s = store.fetch("s", &["a", "b", "c"]).await.unwrap();
    assert_eq!(s.arm("a").impressions, expected[0] + 1.0);
    assert_eq!(s.arm("b").impressions, expected[1]);
    assert_eq!(s.arm("c").impressions, expected[2]);
    assert_eq!(s.arm("b").reward, expected[1] * 0.5);
    assert_eq!(s.total_impressions, 31.0);
    assert_eq!(s.total_reward, 15.0);
    assert_eq!(store.dropped(), 0);
}

#[tokio::test]
async fn a_batch_is_applied_once_per_id() {
    let server = RedisServer::start();
    let store = RedisStore::new(server.config(None)).unwrap();
    let id = BatchId::new();
    let batch = [
        StatUpdate::impression("s", "a"),
        StatUpdate::reward("s", "a", 1.0),
    ];
    store.record_batch(id, &batch).await.unwrap();
    store.record_batch(id, &batch).await.unwrap();
    store.record(&batch).await.unwrap();
    let s = store.fetch("s", &["a"]).await.unwrap();
    assert_eq!(s.arm("a").impressions, 2.0);
    assert_eq!(s.total_reward, 2.0);
    let ttl: i64 = server.cmd(&["PTTL", &store.batch_key(id)]).await;
    assert!(ttl > 0 && ttl <= 3_600_000, "{ttl}");
}

#[tokio::test]
async fn a_write_whose_answer_was_lost_is_re_sent_and_counts_once() {
    let server = RedisServer::start();
    let store = Arc::new(ResilientStore::new(
        Arc::new(RedisStore::new(server.config(None)).unwrap()),
        ResilientConfig {
            write_timeout: Duration::from_millis(200),
            flush_interval: Duration::from_secs(3600),
            ..ResilientConfig::default()
        },
    ));
    // A first write loads the script, so the frozen one below is applied when thawed.
    store
        .record(&[StatUpdate::impression("warm-up", "a")])
        .await
        .unwrap();
    // Frozen, Redis takes the write on its socket but answers nothing: the write times
    // out and is kept. Thawed, Redis applies it; the re-sent batch must not count again.
    server.signal("STOP");
    let batch = [
        StatUpdate::impression("s", "a"),
        StatUpdate::reward("s", "a", 1.0),
    ];
    store.record(&batch).await.unwrap();
    assert_eq!(store.buffered(), 2);
    server.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.flush().await.is_err() {
        assert!(Instant::now() < deadline, "no flush after CONT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.buffered(), 0);
    let s = store.fetch("s", &["a"]).await.unwrap();
    assert_eq!(s.arm("a").impressions, 1.0);
    assert_eq!(s.arm("a").reward, 1.0);
    assert_eq!(s.total_impressions, 1.0);
}

#[tokio::test]
async fn a_frozen_redis_times_out_at_the_budget() {
    let server = RedisServer::start();
    let budget = Duration::from_millis(100);
    let store = resilient(
        RedisStore::new(server.config(None)).unwrap(),
        budget,
        Duration::from_secs(3600),
    );
    assert!(store.check().await);
    server.signal("STOP");
    assert_eq!(
        store.fetch("s", &["a"]).await.unwrap_err(),
        StoreError::Timeout(budget)
    );
    assert!(!store.is_healthy());
    server.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.check().await {
        assert!(Instant::now() < deadline, "not healthy after CONT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.fetch("s", &["a"]).await.is_ok());
}

#[tokio::test]
async fn starts_while_redis_is_down_and_becomes_healthy_when_it_comes_up() {
    let mut server = RedisServer::reserve();
    let store = resilient(
        RedisStore::new(server.config(None)).expect("built without Redis"),
        Duration::from_millis(500),
        Duration::from_millis(50),
    );
    let maintenance = store.spawn_maintenance();
    assert!(store.fetch("s", &["a"]).await.is_err());
    store
        .record(&[StatUpdate::impression("s", "a")])
        .await
        .unwrap();
    assert!(!store.is_healthy());
    assert_eq!(store.buffered(), 1);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(store.is_healthy() && store.buffered() == 0) {
        assert!(Instant::now() < deadline, "not healthy after start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.fetch("s", &["a"]).await.unwrap().arm("a").impressions,
        1.0
    );
    maintenance.abort();
}

#[tokio::test]
async fn keys_expire_and_segments_and_items_are_bounded() {
    let server = RedisServer::start();
    let clock = Arc::new(ManualClock::new(1_000 * HOUR));
    let ttl = Duration::from_secs(3600);
    let config = RedisConfig {
        ttl: Some(ttl),
        stats: StatsConfig {
            half_life: None,
            max_segments: 8,
            max_arms_per_segment: 16,
        },
        ..server.config(None)
    };
    let store = RedisStore::with_clock(config, clock.clone()).unwrap();
    for i in 0..40 {
        clock.advance(Duration::from_millis(1));
        store
            .record(&[
                StatUpdate::impression("busy", format!("item-{i}")),
                StatUpdate::impression(format!("seg-{i}"), "x"),
                StatUpdate::impression("busy", "star"),
            ])
            .await
            .unwrap();
        let fields: usize = server.cmd(&["HLEN", &store.arms_key("busy")]).await;
        assert!(fields <= 32, "{fields} fields");
        let segments = store.segments().await.unwrap();
        assert!(segments.len() <= 8, "{segments:?}");
    }
    let segments = store.segments().await.unwrap();
    assert!(segments.contains(&"busy".to_string()) && segments.contains(&"seg-39".to_string()));
    let evicted: i64 = server.cmd(&["EXISTS", &store.arms_key("seg-0")]).await;
    assert_eq!(evicted, 0);
    let s = store.fetch("busy", &["star"]).await.unwrap();
    assert_eq!(s.arm("star").impressions, 40.0);
    for key in [
        store.arms_key("busy"),
        store.total_key("busy"),
        store.segments_key(),
    ] {
        let pttl: i64 = server.cmd(&["PTTL", &key]).await;
        assert!(pttl > 0 && pttl <= 3_600_000, "{key}: {pttl}");
    }
    // Past the TTL by the store's clock, a write drops the stale members of the set.
    clock.advance(ttl + Duration::from_secs(1));
    store
        .record(&[StatUpdate::impression("fresh", "x")])
        .await
        .unwrap();
    assert_eq!(store.segments().await.unwrap(), ["fresh"]);
}

/// Memory per (segment, item), as reported by `MEMORY USAGE`; printed for the docs.
#[tokio::test]
async fn memory_per_item_is_small() {
    let server = RedisServer::start();
    let store = RedisStore::new(server.config(None)).unwrap();
    let mut report = Vec::new();
    for (segment, items, with_reward) in [
        ("small", 100, false),
        ("small-rewarded", 100, true),
        ("large", 10_000, false),
        ("large-rewarded", 10_000, true),
    ] {
        let updates: Vec<StatUpdate> = (0..items)
            .flat_map(|i| {
                let item = format!("sku-{i:05}");
                let mut u = vec![StatUpdate::impression(segment, &item)];
                if with_reward {
                    u.push(StatUpdate::reward(segment, &item, 1.0));
                }
                u
            })
            .collect();
        for chunk in updates.chunks(1000) {
            store.record(chunk).await.unwrap();
        }
        let arms: i64 = server
            .cmd(&["MEMORY", "USAGE", &store.arms_key(segment), "SAMPLES", "0"])
            .await;
        let encoding: String = server
            .cmd(&["OBJECT", "ENCODING", &store.arms_key(segment)])
            .await;
        let per_item = arms as f64 / items as f64;
        report.push(format!(
            "{segment}: {items} items, {encoding}, {per_item:.1} bytes per item"
        ));
        assert!(per_item < 200.0, "{segment}: {per_item} bytes per item");
    }
    let total: i64 = server
        .cmd(&["MEMORY", "USAGE", &store.total_key("large"), "SAMPLES", "0"])
        .await;
    report.push(format!("per segment: totals hash {total} bytes"));
    eprintln!("{}", report.join("\n"));
}

#[tokio::test]
async fn a_sentinel_url_follows_the_master_across_a_failover() {
    let master = RedisServer::start();
    let replica = RedisServer::start_with(
        Vec::new(),
        vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port.to_string(),
        ],
    );
    let sentinel = RedisServer::sentinel(&master);
    let master_port = async || -> u16 {
        let addr: Vec<String> = sentinel
            .cmd(&["SENTINEL", "get-master-addr-by-name", "shop"])
            .await;
        addr[1].parse().unwrap()
    };
    assert_eq!(master_port().await, master.port);
    let store = RedisStore::new(RedisConfig {
        url: format!("redis+sentinel://127.0.0.1:{}/shop", sentinel.port),
        ..RedisConfig::default()
    })
    .unwrap();
    let shown = |n: usize| -> Vec<StatUpdate> {
        (0..n)
            .map(|_| StatUpdate::impression("default", "a"))
            .collect()
    };
    store.record(&shown(10)).await.unwrap();
    assert_eq!(
        store
            .fetch("default", &["a"])
            .await
            .unwrap()
            .arm("a")
            .impressions,
        10.0
    );

    // The Sentinel learns of the replica from the master (every few seconds); once the
    // replica has the writes, it is promoted and the old master becomes its replica.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replicas: Vec<redis::Value> = sentinel.cmd(&["SENTINEL", "replicas", "shop"]).await;
        let synced: i64 = master.cmd(&["WAIT", "1", "100"]).await;
        if !replicas.is_empty() && synced == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Sentinel never saw the replica"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _: String = sentinel.cmd(&["SENTINEL", "FAILOVER", "shop"]).await;
    while master_port().await != replica.port {
        assert!(Instant::now() < deadline, "the failover did not happen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Once the old master knows it is a replica, writes that still reach it fail
    // (read-only) and the store asks the Sentinel again; the batch counts once. The
    // Sentinel kills the old master's clients as it reconfigures it, so a poll may fail.
    loop {
        let role = master.try_cmd::<Vec<redis::Value>>(&["ROLE"]).await;
        if matches!(role.as_deref(), Ok([redis::Value::BulkString(r), ..]) if r == b"slave") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old master was never demoted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = BatchId::new();
    while let Err(e) = store.record_batch(id, &shown(5)).await {
        assert!(
            Instant::now() < deadline,
            "writes never reached the new master: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = store
        .fetch("default", &["a"])
        .await
        .unwrap()
        .arm("a")
        .impressions;
    assert_eq!(
        now, 15.0,
        "the writes before the failover and after it, once each"
    );
    let on_new_master: Option<String> = replica
        .cmd(&["HGET", "onrec:bandit:default:arms", "i:a"])
        .await;
    assert_eq!(on_new_master.as_deref(), Some("15"));
}
