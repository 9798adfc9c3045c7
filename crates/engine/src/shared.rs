//! State that every process of a deployment shares through Redis, when `redis_url` is
//! set: which event ids were applied, each user's history, dislikes, purchases, shown
//! slots and latest responses, the served responses that feedback is attributed to, and
//! the catalog changes made through the API. Without Redis the engine keeps all of it in
//! process (and in `state.json`); with Redis, the process's own copy is a cache that
//! every request refreshes.
//!
//! Key layout, with `P` the key prefix (`onrec:state` by default) and `U` a user id:
//!
//! | key | type | content |
//! | --- | --- | --- |
//! | `P:ev:{digest}` | string | set when the event id with that digest was applied; expires after `dedupe_ttl` |
//! | `P:u:U:h`, `:d`, `:p`, `:s` | lists | history, dislikes, purchases, shown slots (item ids), oldest first |
//! | `P:u:U:r` | list | the user's latest response ids, oldest first |
//! | `P:u:U:seg` | string | the segment the user was last served as |
//! | `P:imp:{request_id}` | string | a served response (JSON), for attribution; expires after the attribution window |
//! | `P:items` | hash | item id → item (JSON): every change made through `PUT /v1/items` |
//! | `P:catalog` | stream | the same changes in order (`o` origin, `items` JSON), for running processes |
//! | `P:events` | stream | accepted events (`o` origin, `i` item, `w` popularity weight, `t` time ms, `u` user, `x` an interaction's context and slate as JSON) |
//! | `P:stats` | stream | bandit statistics updates (`b` batch key, `u` updates JSON), read by the learner's consumer group `learners` and deleted once applied |
//! | `P:learner` | string | the learner lease: the id of the process that applies `P:stats`; expires unless renewed |
//! | `P:encoder` | hash | the online encoder the lease holder published last: `version`, `newcomers`, `config`, `items` (JSON), `weights` (safetensors) |
//! | `P:feedback` | stream | feedback on serve replicas' responses for the Q-network (`f` JSON: the decision by item id, the item, its reward), read by the group `learners` and deleted once trained on |
//! | `P:qnet` | hash | the Q-network the lease holder published last: `id`, `version`, `updates`, `config`, `items` (JSON), `weights` (safetensors) |
//!
//! Statistics reach the bandit store through `P:stats` only: an event's updates are
//! appended by the same script that claims it, so an event answered `accepted` is in the
//! stream; a response's impressions are appended with the response. One process at a time
//! holds the learner lease and applies the stream with `XREADGROUP`, acknowledging (and
//! deleting) entries once the store took them. A learner that dies holding entries leaves
//! them pending; the next one to take the lease claims them (`XAUTOCLAIM`). Each entry is
//! applied under a batch id derived from its key (`e:{event digest}` or `r:{request id}`),
//! so an entry applied twice (claimed again after a crash, or written twice after a lost
//! answer) counts once.
//!
//! An event is applied by one Lua script: it claims the event id (`SET NX PX`) and, only
//! if that succeeds, updates the user's lists and appends to `P:events`, so an event id
//! posted to two processes, or re-sent after a lost answer, counts once. Serving reads a
//! user in one pipelined round trip; what a response changes (shown slots, latest
//! responses, the response itself) is written off the request path by a background
//! writer. Every process follows `P:catalog` and `P:events` with a blocking `XREAD` on a
//! connection of its own and applies what other processes accepted, so popularity and
//! the catalog agree everywhere, and every online encoder learns from every interaction.
//! An event credited to a response another process served names that response
//! (`credit` in `x`), so the process that made the decision learns from it: it trains its
//! own Q-network, or, as a serve replica, sends the feedback to `P:feedback` for the
//! lease holder, whose weights it follows through `P:qnet`. User keys expire `user_ttl`
//! after their last write.
//!
//! The script touches keys of several users and streams, which a Redis Cluster runs only
//! within one slot: on a cluster (`redis+cluster://`) `P` is a hash tag (`{onrec:state}`),
//! so all of these keys live on one node of it.

mod qnet;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::ConnectionManagerConfig;
use ::redis::{RedisError, Script};
use onrec_model::context::ContextIds;
use onrec_policy::RedisConn;
use onrec_policy::store::connection::cluster_prefix;
use serde::{Deserialize, Serialize};

use onrec_policy::{BanditStore, BatchId, StatUpdate, StoreError};

use crate::error::EngineError;
use crate::learning::SharedFeedback;
use crate::online::Exported;
use crate::types::{EventType, Item};

pub use self::qnet::PublishedQ;

/// The script that applies an event at most once.
const APPLY_SCRIPT: &str = include_str!("shared/apply.lua");
/// Responses waiting for the background writer.
const WRITE_QUEUE: usize = 16_384;
/// Longest a follower's `XREAD` blocks before it asks again.
const FOLLOW_BLOCK: Duration = Duration::from_secs(1);
/// Most stream entries a follower reads at once.
const FOLLOW_COUNT: usize = 1000;
/// Approximate cap of the catalog changes stream (the `P:items` hash keeps every item).
const CATALOG_STREAM_CAP: usize = 10_000;
/// Approximate cap of the feedback stream: a learner that is away loses the oldest.
const FEEDBACK_STREAM_CAP: usize = 100_000;
/// The consumer group that applies the statistics stream.
const LEARNERS: &str = "learners";
/// Most statistics entries the learner applies at once.
const LEARN_COUNT: usize = 500;
/// Lifetime of the learner lease; its holder renews it well before.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// The script that takes or renews the learner lease.
const LEASE_SCRIPT: &str = "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end \
    if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end \
    return 0";
/// The script that gives the learner lease up, if this process holds it.
const RELEASE_SCRIPT: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Settings of the shared state.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// PEM certificates to verify a TLS server against instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Longest wait for a read on the request path; past it the request is served from
    /// the process's own copy.
    pub timeout: Duration,
    /// Longest wait for a write (applying an event, a response, a catalog change).
    pub write_timeout: Duration,
    /// How long an applied event id is remembered.
    pub dedupe_ttl: Duration,
    /// How long a user's state lives after its last write.
    pub user_ttl: Duration,
    /// How long a served response can be credited with feedback.
    pub attribution_window: Duration,
    /// Approximate cap of the accepted events stream (what a starting process replays).
    pub events_cap: usize,
}

impl Default for SharedConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            ca_pem: None,
            key_prefix: "onrec:state".into(),
            timeout: Duration::from_millis(20),
            write_timeout: Duration::from_secs(2),
            dedupe_ttl: Duration::from_secs(24 * 3600),
            user_ttl: Duration::from_secs(30 * 24 * 3600),
            attribution_window: Duration::from_secs(3600),
            events_cap: 100_000,
        }
    }
}

/// A user's state as the shared store keeps it: item ids, oldest first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SharedUser {
    /// Items interacted with.
    pub history: Vec<String>,
    /// Items disliked.
    pub disliked: Vec<String>,
    /// Items bought.
    pub purchased: Vec<String>,
    /// Items of the latest shown slots.
    pub shown: Vec<String>,
    /// Ids of the latest responses.
    pub recent_requests: Vec<String>,
    /// The segment the user was last served as.
    pub last_segment: Option<String>,
}

/// A served response as the shared store keeps it, so that feedback reaching any
/// process is credited to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedImpression {
    /// The segment that served it.
    pub segment: String,
    /// The served items, in slot order.
    pub items: Vec<String>,
    /// When it was served (ms since the epoch).
    pub at_ms: i64,
    /// The request's context.
    pub context: ContextIds,
}

/// What serving a response changes for its user.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    /// The user served.
    pub user_id: String,
    /// The response's id.
    pub request_id: String,
    /// The response.
    pub impression: SharedImpression,
    /// The bandit statistics updates it makes (its impressions).
    pub updates: Vec<StatUpdate>,
}

/// An accepted event, as the shared store applies it.
#[derive(Debug, Clone, Copy)]
pub struct SharedEvent<'a> {
    /// Digest of the event id.
    pub digest: u128,
    /// The user.
    pub user_id: &'a str,
    /// The event type.
    pub kind: EventType,
    /// The item.
    pub item_id: &'a str,
    /// How much it moves the item's popularity.
    pub weight: f64,
    /// When it happened (ms since the epoch).
    pub at_ms: i64,
    /// The bandit statistics updates it makes.
    pub updates: &'a [StatUpdate],
    /// For an interaction, what other processes' online encoders learn from it.
    pub interaction: Option<&'a Interaction>,
}

/// An interaction as every process's online encoder learns from it: its context and the
/// items of the slate it was chosen from (empty when unattributed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// The request's context.
    pub context: ContextIds,
    /// The served items the item was chosen over.
    pub slate: Vec<String>,
    /// The response it is credited to, when another process served it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit: Option<Credit>,
}

/// Feedback credited to a response, for the process that served it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Credit {
    /// The response's id.
    pub request_id: String,
    /// The feedback's reward.
    pub reward: f64,
}

/// One entry of the statistics stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsEntry {
    /// The stream entry's id.
    pub id: String,
    /// What it counts (`e:{event digest}`, `r:{request id}`): its batch id's key.
    pub batch: String,
    /// The updates; empty when the entry could not be read.
    pub updates: Vec<StatUpdate>,
}

/// A statistics update as the stream carries it: segment, item, impressions, reward, time.
type WireUpdate = (String, String, f64, f64, Option<i64>);

fn encode_updates(updates: &[StatUpdate]) -> Result<String, EngineError> {
    let wire: Vec<WireUpdate> = updates
        .iter()
        .map(|u| {
            (
                u.segment.clone(),
                u.item_id.clone(),
                u.impressions,
                u.reward,
                u.at_ms,
            )
        })
        .collect();
    encode(&wire)
}

fn decode_updates(json: &str) -> Option<Vec<StatUpdate>> {
    let wire: Vec<WireUpdate> = serde_json::from_str(json).ok()?;
    Some(
        wire.into_iter()
            .map(
                |(segment, item_id, impressions, reward, at_ms)| StatUpdate {
                    segment,
                    item_id,
                    impressions,
                    reward,
                    at_ms,
                },
            )
            .collect(),
    )
}

/// What another process changed, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerChange {
    /// An event another process accepted: its item's popularity moves by `weight`, and
    /// an interaction teaches the online encoder.
    Event {
        /// The item.
        item_id: String,
        /// The event's popularity weight.
        weight: f64,
        /// When it happened (ms since the epoch).
        at_ms: i64,
        /// The user.
        user_id: String,
        /// For an interaction, its context and slate.
        interaction: Option<Interaction>,
    },
    /// Items another process inserted or replaced.
    Items(Vec<Item>),
}

/// Where a follower is in the shared streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    events: String,
    catalog: String,
}

/// Per-user limits the shared lists are trimmed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimits {
    /// History length.
    pub history: usize,
    /// Dislikes kept.
    pub disliked: usize,
    /// Purchases kept.
    pub purchased: usize,
    /// Shown slots kept.
    pub shown: usize,
    /// Latest responses kept.
    pub recent_requests: usize,
}

/// A user's lists (history, dislikes, purchases, shown, latest responses) and segment, as
/// one pipelined read returns them.
type UserReply = (
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Option<String>,
);

/// A published encoder's fields (version, newcomers, config, items, weights), as one
/// read returns them.
type EncoderReply = (
    Option<String>,
    Option<u8>,
    Option<String>,
    Option<String>,
    Option<Vec<u8>>,
);

/// What the background writer writes.
enum Write {
    /// A served response.
    Served(Served),
    /// Feedback for the learner's Q-network.
    Feedback(SharedFeedback),
}

/// The shared state in Redis.
pub struct RedisShared {
    conn: RedisConn,
    /// The followers' own connection: a blocking `XREAD` holds up its connection.
    follow_conn: RedisConn,
    /// The learner's own connection, for its blocking `XREADGROUP`.
    learn_conn: RedisConn,
    /// The Q-network learner's own connection, for its blocking `XREADGROUP`.
    feedback_conn: RedisConn,
    config: SharedConfig,
    limits: UserLimits,
    /// This process's id in the streams, so that it skips its own entries.
    origin: String,
    apply: Script,
    lease: Script,
    release: Script,
    /// Whether this process holds the learner lease.
    learning: std::sync::atomic::AtomicBool,
    writes: parking_lot::RwLock<Option<tokio::sync::mpsc::Sender<Write>>>,
    queued: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Write>>>,
}

impl std::fmt::Debug for RedisShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("RedisShared")
            .field("key_prefix", &self.config.key_prefix)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("the shared state in Redis: {what}: {e}"))
}

fn encode<T: Serialize + ?Sized>(v: &T) -> Result<String, EngineError> {
    serde_json::to_string(v).map_err(|e| unavailable("encoding", e))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A connection to `config`'s Redis (one server, or the master its Sentinels name) whose
/// commands wait at most `response_timeout`.
fn connect(config: &SharedConfig, response_timeout: Duration) -> Result<RedisConn, RedisError> {
    let manager = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(200));
    RedisConn::open(&config.url, config.ca_pem.as_deref(), manager)
}

impl RedisShared {
    /// The shared state at `config.url`, trimming users' lists to `limits`. It does not
    /// connect yet, so it is built whether or not Redis answers. Must be called inside a
    /// Tokio runtime.
    pub fn new(mut config: SharedConfig, limits: UserLimits) -> Result<Self, EngineError> {
        if config.key_prefix.is_empty() {
            return Err(unavailable("configuration", "key_prefix must not be empty"));
        }
        config.key_prefix = cluster_prefix(&config.url, &config.key_prefix);
        let conn = connect(&config, config.write_timeout.max(config.timeout))
            .map_err(|e| unavailable("redis url", e))?;
        let follow_conn = connect(&config, FOLLOW_BLOCK + config.write_timeout)
            .map_err(|e| unavailable("redis url", e))?;
        let learn_conn = connect(&config, FOLLOW_BLOCK + config.write_timeout)
            .map_err(|e| unavailable("redis url", e))?;
        let feedback_conn = connect(&config, FOLLOW_BLOCK + config.write_timeout)
            .map_err(|e| unavailable("redis url", e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(WRITE_QUEUE);
        Ok(Self {
            conn,
            follow_conn,
            learn_conn,
            feedback_conn,
            config,
            limits,
            origin: uuid::Uuid::new_v4().simple().to_string(),
            apply: Script::new(APPLY_SCRIPT),
            lease: Script::new(LEASE_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            learning: std::sync::atomic::AtomicBool::new(false),
            writes: parking_lot::RwLock::new(Some(tx)),
            queued: parking_lot::Mutex::new(Some(rx)),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SharedConfig {
        &self.config
    }

    /// The key that marks an event id as applied.
    pub fn event_key(&self, digest: u128) -> String {
        format!("{}:ev:{digest:032x}", self.config.key_prefix)
    }

    /// The key of one of a user's lists (`h`, `d`, `p`, `s`, `r`) or their segment (`seg`).
    pub fn user_key(&self, user_id: &str, part: &str) -> String {
        format!("{}:u:{user_id}:{part}", self.config.key_prefix)
    }

    /// The key of a served response.
    pub fn impression_key(&self, request_id: &str) -> String {
        format!("{}:imp:{request_id}", self.config.key_prefix)
    }

    /// The hash of items changed through the API.
    pub fn items_key(&self) -> String {
        format!("{}:items", self.config.key_prefix)
    }

    /// The stream of catalog changes.
    pub fn catalog_stream(&self) -> String {
        format!("{}:catalog", self.config.key_prefix)
    }

    /// The stream of accepted events' popularity.
    pub fn events_stream(&self) -> String {
        format!("{}:events", self.config.key_prefix)
    }

    /// The stream of bandit statistics updates.
    pub fn stats_stream(&self) -> String {
        format!("{}:stats", self.config.key_prefix)
    }

    /// The learner lease.
    pub fn lease_key(&self) -> String {
        format!("{}:learner", self.config.key_prefix)
    }

    /// The last published online encoder.
    pub fn encoder_key(&self) -> String {
        format!("{}:encoder", self.config.key_prefix)
    }

    /// The stream of feedback for the learner's Q-network.
    pub fn feedback_stream(&self) -> String {
        format!("{}:feedback", self.config.key_prefix)
    }

    /// The last published Q-network.
    pub fn qnet_key(&self) -> String {
        format!("{}:qnet", self.config.key_prefix)
    }

    /// Whether this process holds the learner lease (and so publishes the encoder).
    pub fn is_learning(&self) -> bool {
        self.learning.load(std::sync::atomic::Ordering::Acquire)
    }

    /// This process's id in the streams and the lease.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    async fn within<T>(
        &self,
        what: &str,
        limit: Duration,
        work: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(what, e)),
            Err(_) => Err(unavailable(what, format!("no answer within {limit:?}"))),
        }
    }

    /// A user's state, in one pipelined round trip; `None` when Redis has none.
    pub async fn user(&self, user_id: &str) -> Result<Option<SharedUser>, EngineError> {
        let mut pipe = ::redis::pipe();
        for part in ["h", "d", "p", "s", "r"] {
            pipe.cmd("LRANGE")
                .arg(self.user_key(user_id, part))
                .arg(0)
                .arg(-1);
        }
        pipe.cmd("GET").arg(self.user_key(user_id, "seg"));
        let mut conn = self.conn.clone();
        let (history, disliked, purchased, shown, recent_requests, last_segment): UserReply = self
            .within(
                "reading a user",
                self.config.timeout,
                pipe.query_async(&mut conn),
            )
            .await?;
        let user = SharedUser {
            history,
            disliked,
            purchased,
            shown,
            recent_requests,
            last_segment,
        };
        Ok((user != SharedUser::default()).then_some(user))
    }

    /// The user's latest response ids (oldest first) and last segment, in one round
    /// trip: what feedback without a `request_id` is attributed by.
    pub async fn recent(
        &self,
        user_id: &str,
    ) -> Result<(Vec<String>, Option<String>), EngineError> {
        let mut pipe = ::redis::pipe();
        pipe.cmd("LRANGE")
            .arg(self.user_key(user_id, "r"))
            .arg(0)
            .arg(-1);
        pipe.cmd("GET").arg(self.user_key(user_id, "seg"));
        let mut conn = self.conn.clone();
        self.within(
            "reading a user's responses",
            self.config.write_timeout,
            pipe.query_async(&mut conn),
        )
        .await
    }

    /// Applies an accepted event, with its statistics updates, unless its id was applied
    /// before: `false` then.
    pub async fn apply(&self, event: &SharedEvent<'_>) -> Result<bool, EngineError> {
        let l = &self.limits;
        let updates = if event.updates.is_empty() {
            String::new()
        } else {
            encode_updates(event.updates)?
        };
        let mut invocation = self.apply.key(self.event_key(event.digest));
        for part in ["h", "d", "p", "s", "r"] {
            invocation.key(self.user_key(event.user_id, part));
        }
        invocation
            .key(self.events_stream())
            .key(self.stats_stream())
            .arg(millis(self.config.dedupe_ttl))
            .arg(event.kind.as_str())
            .arg(event.item_id)
            .arg(l.history)
            .arg(l.disliked)
            .arg(l.purchased)
            .arg(millis(self.config.user_ttl))
            .arg(&self.origin)
            .arg(event.weight)
            .arg(event.at_ms)
            .arg(self.config.events_cap)
            .arg(updates)
            .arg(format!("e:{:032x}", event.digest))
            .arg(event.user_id)
            .arg(match event.interaction {
                Some(interaction) => encode(interaction)?,
                None => String::new(),
            });
        let mut conn = self.conn.clone();
        let applied: i64 = self
            .within(
                "applying an event",
                self.config.write_timeout,
                invocation.invoke_async(&mut conn),
            )
            .await?;
        Ok(applied == 1)
    }

    /// Queues what serving a response changes for the background writer; when the
    /// writer is behind, the write is dropped and counted rather than slowing the request.
    pub fn served(&self, served: Served) {
        self.queue(Write::Served(served));
    }

    /// Queues feedback for the learner's Q-network for the background writer, dropped
    /// and counted as [`RedisShared::served`] is.
    pub fn feedback(&self, feedback: SharedFeedback) {
        self.queue(Write::Feedback(feedback));
    }

    fn queue(&self, write: Write) {
        let sent = self
            .writes
            .read()
            .as_ref()
            .is_some_and(|tx| tx.try_send(write).is_ok());
        if !sent {
            metrics::counter!("onrec_shared_writes_dropped_total").increment(1);
        }
    }

    /// Stops taking writes; [`RedisShared::run_writer`] then writes what is queued and
    /// returns. For shutdown.
    pub fn close_writer(&self) {
        self.writes.write().take();
    }

    /// Writes queued responses and feedback until [`RedisShared::close_writer`]. Run it
    /// once, as a task; a second call returns at once.
    pub async fn run_writer(&self) {
        let Some(mut rx) = self.queued.lock().take() else {
            return;
        };
        while let Some(write) = rx.recv().await {
            // Retried until Redis takes it: a response's impressions are counted once
            // however often it is written (their batch id is the response's). Meanwhile
            // the queue fills and what does not fit is dropped and counted.
            loop {
                let (written, what) = match &write {
                    Write::Served(served) => (self.write_served(served).await, "a response"),
                    Write::Feedback(feedback) => (
                        self.write_feedback(feedback).await,
                        "feedback for the learner",
                    ),
                };
                let Err(e) = written else {
                    break;
                };
                metrics::counter!("onrec_shared_write_errors_total").increment(1);
                tracing::warn!(error = %e, "{what} is not in the shared state yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// Writes one response: the user's shown slots, latest responses and segment, and the
    /// response itself for attribution, in one transaction.
    pub async fn write_served(&self, served: &Served) -> Result<(), EngineError> {
        let l = &self.limits;
        let user_ttl = millis(self.config.user_ttl);
        let impression = encode(&served.impression)?;
        let (shown, recent, segment) = (
            self.user_key(&served.user_id, "s"),
            self.user_key(&served.user_id, "r"),
            self.user_key(&served.user_id, "seg"),
        );
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        if !served.impression.items.is_empty() {
            pipe.cmd("RPUSH")
                .arg(&shown)
                .arg(&served.impression.items)
                .ignore();
            pipe.cmd("LTRIM")
                .arg(&shown)
                .arg(-(l.shown as i64))
                .arg(-1)
                .ignore();
        }
        pipe.cmd("RPUSH")
            .arg(&recent)
            .arg(&served.request_id)
            .ignore();
        pipe.cmd("LTRIM")
            .arg(&recent)
            .arg(-(l.recent_requests as i64))
            .arg(-1)
            .ignore();
        pipe.cmd("SET")
            .arg(&segment)
            .arg(&served.impression.segment)
            .arg("PX")
            .arg(user_ttl)
            .ignore();
        for key in [&shown, &recent] {
            pipe.cmd("PEXPIRE").arg(key).arg(user_ttl).ignore();
        }
        pipe.cmd("SET")
            .arg(self.impression_key(&served.request_id))
            .arg(impression)
            .arg("PX")
            .arg(millis(self.config.attribution_window).max(1))
            .ignore();
        if !served.updates.is_empty() {
            pipe.cmd("XADD")
                .arg(self.stats_stream())
                .arg("*")
                .arg("b")
                .arg(format!("r:{}", served.request_id))
                .arg("u")
                .arg(encode_updates(&served.updates)?)
                .ignore();
        }
        let mut conn = self.conn.clone();
        self.within(
            "writing a response",
            self.config.write_timeout,
            pipe.query_async::<()>(&mut conn),
        )
        .await
    }

    /// The served responses `request_ids` name, in one round trip (`None` for those
    /// Redis does not have: never served, or older than the attribution window).
    pub async fn impressions(
        &self,
        request_ids: &[String],
    ) -> Result<Vec<Option<SharedImpression>>, EngineError> {
        if request_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = request_ids.iter().map(|r| self.impression_key(r)).collect();
        let mut conn = self.conn.clone();
        let found: Vec<Option<String>> = self
            .within(
                "reading responses",
                self.config.write_timeout,
                ::redis::cmd("MGET").arg(keys).query_async(&mut conn),
            )
            .await?;
        Ok(found
            .into_iter()
            .map(|json| json.and_then(|j| serde_json::from_str(&j).ok()))
            .collect())
    }

    /// Records inserted or replaced items for every process: in the items hash and, in
    /// the same transaction, on the catalog stream.
    pub async fn publish_items(&self, items: &[Item]) -> Result<(), EngineError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        pipe.cmd("HSET").arg(self.items_key());
        for item in items {
            pipe.arg(&item.item_id).arg(encode(item)?);
        }
        pipe.ignore();
        pipe.cmd("XADD")
            .arg(self.catalog_stream())
            .arg("MAXLEN")
            .arg("~")
            .arg(CATALOG_STREAM_CAP)
            .arg("*")
            .arg("o")
            .arg(&self.origin)
            .arg("items")
            .arg(encode(items)?)
            .ignore();
        let mut conn = self.conn.clone();
        self.within(
            "publishing items",
            self.config.write_timeout,
            pipe.query_async::<()>(&mut conn),
        )
        .await
    }

    /// Every item changed through the API so far, and the cursor to follow the streams
    /// from: catalog changes after this snapshot, and every accepted event still in the
    /// events stream (popularity a starting process catches up on).
    pub async fn snapshot(&self) -> Result<(Vec<Item>, Cursor), EngineError> {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        pipe.cmd("XREVRANGE")
            .arg(self.catalog_stream())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        pipe.cmd("HVALS").arg(self.items_key());
        let mut conn = self.conn.clone();
        let (last, values): (::redis::streams::StreamRangeReply, Vec<String>) = self
            .within(
                "reading the catalog",
                self.config.write_timeout,
                pipe.query_async(&mut conn),
            )
            .await?;
        let mut items = Vec::with_capacity(values.len());
        for json in values {
            match serde_json::from_str::<Item>(&json) {
                Ok(item) => items.push(item),
                Err(e) => {
                    tracing::warn!(error = %e, "an item in the shared catalog does not parse; skipped")
                }
            }
        }
        let catalog = last
            .ids
            .first()
            .map_or_else(|| "0".to_owned(), |e| e.id.clone());
        Ok((
            items,
            Cursor {
                events: "0".to_owned(),
                catalog,
            },
        ))
    }

    /// What other processes changed after `cursor`, waiting up to a second for something;
    /// moves the cursor past what it returns.
    pub async fn changes(&self, cursor: &mut Cursor) -> Result<Vec<PeerChange>, EngineError> {
        let options = ::redis::streams::StreamReadOptions::default()
            .block(millis(FOLLOW_BLOCK) as usize)
            .count(FOLLOW_COUNT);
        let keys = [self.events_stream(), self.catalog_stream()];
        let ids = [cursor.events.as_str(), cursor.catalog.as_str()];
        let mut conn = self.follow_conn.clone();
        let reply: Option<::redis::streams::StreamReadReply> = self
            .within(
                "following the streams",
                FOLLOW_BLOCK + self.config.write_timeout,
                ::redis::cmd("XREAD")
                    .arg(&options)
                    .arg("STREAMS")
                    .arg(&keys)
                    .arg(&ids)
                    .query_async(&mut conn),
            )
            .await?;
        let mut out = Vec::new();
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let events = stream.key == keys[0];
            for entry in stream.ids {
                if events {
                    cursor.events.clone_from(&entry.id);
                } else {
                    cursor.catalog.clone_from(&entry.id);
                }
                if entry.get::<String>("o").as_deref() == Some(self.origin.as_str()) {
                    continue;
                }
                if events {
                    if let (Some(item_id), Some(weight), Some(at_ms)) =
                        (entry.get("i"), entry.get("w"), entry.get("t"))
                    {
                        out.push(PeerChange::Event {
                            item_id,
                            weight,
                            at_ms,
                            user_id: entry.get("u").unwrap_or_default(),
                            interaction: entry
                                .get::<String>("x")
                                .and_then(|x| serde_json::from_str(&x).ok()),
                        });
                    }
                } else if let Some(items) = entry
                    .get::<String>("items")
                    .and_then(|j| serde_json::from_str(&j).ok())
                {
                    out.push(PeerChange::Items(items));
                }
            }
        }
        Ok(out)
    }

    /// Takes the learner lease, or renews it when this process holds it; `false` when
    /// another process holds it.
    pub async fn hold_lease(&self) -> Result<bool, EngineError> {
        let mut invocation = self.lease.key(self.lease_key());
        invocation.arg(&self.origin).arg(millis(LEASE_TTL));
        let mut conn = self.conn.clone();
        let held: i64 = self
            .within(
                "taking the learner lease",
                self.config.write_timeout,
                invocation.invoke_async(&mut conn),
            )
            .await?;
        Ok(held == 1)
    }

    /// Gives the learner lease up if this process holds it, so that a standby takes over
    /// at once. For shutdown.
    pub async fn release_lease(&self) -> Result<(), EngineError> {
        let mut invocation = self.release.key(self.lease_key());
        invocation.arg(&self.origin);
        let mut conn = self.conn.clone();
        self.within(
            "giving the learner lease up",
            self.config.write_timeout,
            invocation.invoke_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
    }

    /// Creates the learners' consumer group (and the stream) of `stream` unless it
    /// exists: after Redis lost its data, the group starts again from the stream's
    /// beginning.
    async fn ensure_group(&self, conn: &RedisConn, stream: &str) -> Result<(), EngineError> {
        let mut conn = conn.clone();
        let created: Result<(), RedisError> = ::redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(LEARNERS)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => {
                Err(unavailable("creating the learners' group", e))
            }
            _ => Ok(()),
        }
    }

    /// Statistics entries for this process to apply: with `pending`, those delivered to
    /// any learner and never acknowledged (a learner that died with them); else new ones,
    /// waiting up to a second.
    pub async fn stats_entries(&self, pending: bool) -> Result<Vec<StatsEntry>, EngineError> {
        let entries = self
            .group_entries(&self.learn_conn, &self.stats_stream(), pending)
            .await?;
        Ok(entries
            .into_iter()
            .map(|e| StatsEntry {
                batch: e.get("b").unwrap_or_default(),
                updates: e
                    .get::<String>("u")
                    .and_then(|u| decode_updates(&u))
                    .unwrap_or_default(),
                id: e.id,
            })
            .collect())
    }

    /// Entries of `stream` for the learners' group, read on `conn` (a connection of the
    /// reader's own: the read blocks it): with `pending`, those delivered to any learner
    /// and never acknowledged; else new ones, waiting up to a second.
    async fn group_entries(
        &self,
        conn: &RedisConn,
        stream: &str,
        pending: bool,
    ) -> Result<Vec<::redis::streams::StreamId>, EngineError> {
        self.ensure_group(conn, stream).await?;
        let mut conn = conn.clone();
        let limit = FOLLOW_BLOCK + self.config.write_timeout;
        let entries: Vec<::redis::streams::StreamId> = if pending {
            let reply: ::redis::streams::StreamAutoClaimReply = self
                .within(
                    "claiming pending entries",
                    limit,
                    ::redis::cmd("XAUTOCLAIM")
                        .arg(stream)
                        .arg(LEARNERS)
                        .arg(&self.origin)
                        .arg(0)
                        .arg("0-0")
                        .arg("COUNT")
                        .arg(LEARN_COUNT)
                        .query_async(&mut conn),
                )
                .await?;
            reply.claimed
        } else {
            let options = ::redis::streams::StreamReadOptions::default()
                .group(LEARNERS, &self.origin)
                .block(millis(FOLLOW_BLOCK) as usize)
                .count(LEARN_COUNT);
            let reply: Option<::redis::streams::StreamReadReply> = self
                .within(
                    "reading a stream",
                    limit,
                    ::redis::cmd("XREADGROUP")
                        .arg(&options)
                        .arg("STREAMS")
                        .arg(stream)
                        .arg(">")
                        .query_async(&mut conn),
                )
                .await?;
            reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .collect()
        };
        Ok(entries)
    }

    /// Acknowledges applied statistics entries and deletes them from the stream.
    pub async fn ack_stats(&self, ids: &[String]) -> Result<(), EngineError> {
        self.ack(&self.stats_stream(), ids).await
    }

    /// Acknowledges entries of `stream` the learners' group took and deletes them.
    async fn ack(&self, stream: &str, ids: &[String]) -> Result<(), EngineError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        pipe.cmd("XACK").arg(stream).arg(LEARNERS).arg(ids).ignore();
        pipe.cmd("XDEL").arg(stream).arg(ids).ignore();
        let mut conn = self.conn.clone();
        self.within(
            "acknowledging stream entries",
            self.config.write_timeout,
            pipe.query_async::<()>(&mut conn),
        )
        .await
    }

    /// Applies the statistics stream to `store` whenever this process holds the learner
    /// lease, and waits as a standby while another one holds it. Runs until the task is
    /// dropped; a learner that is dropped or killed mid-batch leaves its entries pending
    /// for the next holder, and their batch ids make applying them again a no-op.
    pub async fn run_learner(&self, store: Arc<dyn BanditStore>) {
        let mut holding = false;
        let mut renewed = Instant::now();
        // Whether to claim pending entries (taken over from a learner that died) first.
        let mut pending = true;
        let mut said_standby = false;
        loop {
            if !holding || renewed.elapsed() >= LEASE_TTL / 3 {
                match self.hold_lease().await {
                    Ok(true) => {
                        if !holding {
                            tracing::info!(learner = %self.origin, "took the learner lease: applying the statistics stream");
                            pending = true;
                        }
                        holding = true;
                        renewed = Instant::now();
                        self.learning
                            .store(true, std::sync::atomic::Ordering::Release);
                    }
                    Ok(false) => {
                        if holding {
                            tracing::warn!("lost the learner lease to another process");
                        } else if !said_standby {
                            tracing::info!("standby: another process holds the learner lease");
                        }
                        said_standby = true;
                        holding = false;
                        self.learning
                            .store(false, std::sync::atomic::Ordering::Release);
                        tokio::time::sleep(LEASE_TTL / 5).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the learner lease cannot be checked; retrying");
                        holding = false;
                        self.learning
                            .store(false, std::sync::atomic::Ordering::Release);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let entries = match self.stats_entries(pending).await {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the statistics stream failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if pending && entries.is_empty() {
                pending = false;
                continue;
            }
            let mut applied = Vec::with_capacity(entries.len());
            for entry in entries {
                if entry.updates.is_empty() {
                    metrics::counter!("onrec_learner_bad_entries_total").increment(1);
                    tracing::warn!(entry = %entry.id, "a statistics entry cannot be read; skipped");
                    applied.push(entry.id);
                    continue;
                }
                match store
                    .record_batch(BatchId::of(&entry.batch), &entry.updates)
                    .await
                {
                    Ok(()) => {}
                    Err(StoreError::InvalidUpdate(e)) => {
                        metrics::counter!("onrec_learner_bad_entries_total").increment(1);
                        tracing::warn!(error = %e, entry = %entry.id, "a statistics entry is malformed; skipped");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the bandit store did not take the statistics; retrying");
                        pending = true;
                        break;
                    }
                }
                applied.push(entry.id);
            }
            metrics::counter!("onrec_learner_entries_total").increment(applied.len() as u64);
            if let Err(e) = self.ack_stats(&applied).await {
                tracing::warn!(error = %e, "acknowledging statistics failed; they are applied again (once)");
                pending = true;
            }
            if pending {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// Publishes an online encoder for the serve replicas, replacing the last one.
    pub async fn publish_encoder(&self, encoder: &Exported) -> Result<(), EngineError> {
        let mut conn = self.conn.clone();
        self.within(
            "publishing the encoder",
            self.config.write_timeout,
            ::redis::cmd("HSET")
                .arg(self.encoder_key())
                .arg("version")
                .arg(&encoder.version)
                .arg("newcomers")
                .arg(u8::from(encoder.newcomers))
                .arg("config")
                .arg(encode(&encoder.config)?)
                .arg("items")
                .arg(encode(&encoder.items)?)
                .arg("weights")
                .arg(&encoder.weights)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// The version of the last published encoder, if any.
    pub async fn published_encoder_version(&self) -> Result<Option<String>, EngineError> {
        let mut conn = self.conn.clone();
        self.within(
            "reading the encoder's version",
            self.config.write_timeout,
            ::redis::cmd("HGET")
                .arg(self.encoder_key())
                .arg("version")
                .query_async(&mut conn),
        )
        .await
    }

    /// The last published encoder, if any.
    pub async fn published_encoder(&self) -> Result<Option<Exported>, EngineError> {
        let mut conn = self.conn.clone();
        let (version, newcomers, config, items, weights): EncoderReply = self
            .within(
                "reading the encoder",
                self.config.write_timeout,
                ::redis::cmd("HMGET")
                    .arg(self.encoder_key())
                    .arg("version")
                    .arg("newcomers")
                    .arg("config")
                    .arg("items")
                    .arg("weights")
                    .query_async(&mut conn),
            )
            .await?;
        let (Some(version), Some(newcomers), Some(config), Some(items), Some(weights)) =
            (version, newcomers, config, items, weights)
        else {
            return Ok(None);
        };
        let bad = |e: serde_json::Error| unavailable("reading the encoder", e);
        Ok(Some(Exported {
            version,
            newcomers: newcomers == 1,
            config: serde_json::from_str(&config).map_err(bad)?,
            items: serde_json::from_str(&items).map_err(bad)?,
            weights,
        }))
    }
}
