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
//! | `P:events` | stream | accepted events' popularity (`o` origin, `i` item, `w` weight, `t` time ms) |
//!
//! An event is applied by one Lua script: it claims the event id (`SET NX PX`) and, only
//! if that succeeds, updates the user's lists and appends to `P:events`, so an event id
//! posted to two processes, or re-sent after a lost answer, counts once. Serving reads a
//! user in one pipelined round trip; what a response changes (shown slots, latest
//! responses, the response itself) is written off the request path by a background
//! writer. Every process follows `P:catalog` and `P:events` with a blocking `XREAD` on a
//! connection of its own and applies what other processes accepted, so popularity and
//! the catalog agree everywhere. User keys expire `user_ttl` after their last write.
//!
//! The script touches keys of several users and streams, so this layout targets a
//! standalone Redis (or a primary with replicas), not Redis Cluster.

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisError, Script, Value};
use onrec_model::context::ContextIds;
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::types::{EventType, Item};

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

/// Settings of the shared state.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
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
}

/// What the shared state knows of an event's user once the event is claimed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    /// Ids of the user's latest responses, oldest first, for attribution.
    pub recent_requests: Vec<String>,
    /// The segment the user was last served as.
    pub last_segment: Option<String>,
}

/// What another process changed, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerChange {
    /// An event another process accepted: its item's popularity moves by `weight`.
    Popularity {
        /// The item.
        item_id: String,
        /// The event's popularity weight.
        weight: f64,
        /// When it happened (ms since the epoch).
        at_ms: i64,
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

/// The shared state in Redis.
pub struct RedisShared {
    conn: ConnectionManager,
    /// The followers' own connection: a blocking `XREAD` holds up its connection.
    follow_conn: ConnectionManager,
    config: SharedConfig,
    limits: UserLimits,
    /// This process's id in the streams, so that it skips its own entries.
    origin: String,
    apply: Script,
    writes: parking_lot::RwLock<Option<tokio::sync::mpsc::Sender<Served>>>,
    queued: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Served>>>,
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

fn manager(client: Client, response_timeout: Duration) -> Result<ConnectionManager, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(200));
    ConnectionManager::new_lazy_with_config(client, config)
}

/// A string from a reply element, if it is one.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

impl RedisShared {
    /// The shared state at `config.url`, trimming users' lists to `limits`. It does not
    /// connect yet, so it is built whether or not Redis answers. Must be called inside a
    /// Tokio runtime.
    pub fn new(config: SharedConfig, limits: UserLimits) -> Result<Self, EngineError> {
        if config.key_prefix.is_empty() {
            return Err(unavailable("configuration", "key_prefix must not be empty"));
        }
        let client = Client::open(config.url.as_str()).map_err(|e| unavailable("redis url", e))?;
        let conn = manager(client.clone(), config.write_timeout.max(config.timeout))
            .map_err(|e| unavailable("connecting", e))?;
        let follow_conn = manager(client, FOLLOW_BLOCK + config.write_timeout)
            .map_err(|e| unavailable("connecting", e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(WRITE_QUEUE);
        Ok(Self {
            conn,
            follow_conn,
            config,
            limits,
            origin: uuid::Uuid::new_v4().simple().to_string(),
            apply: Script::new(APPLY_SCRIPT),
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

    /// Applies an accepted event unless its id was applied before (`None` then).
    pub async fn apply(&self, event: &SharedEvent<'_>) -> Result<Option<Claimed>, EngineError> {
        let l = &self.limits;
        let mut invocation = self.apply.key(self.event_key(event.digest));
        for part in ["h", "d", "p", "s", "r"] {
            invocation.key(self.user_key(event.user_id, part));
        }
        invocation
            .key(self.events_stream())
            .key(self.user_key(event.user_id, "seg"))
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
            .arg(self.config.events_cap);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self
            .within(
                "applying an event",
                self.config.write_timeout,
                invocation.invoke_async(&mut conn),
            )
            .await?;
        match reply.first() {
            Some(Value::Int(1)) => Ok(Some(Claimed {
                last_segment: reply.get(1).and_then(text).filter(|s| !s.is_empty()),
                recent_requests: reply.iter().skip(2).filter_map(text).collect(),
            })),
            Some(Value::Int(0)) => Ok(None),
            other => Err(unavailable(
                "applying an event",
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// Queues what serving a response changes for the background writer; when the
    /// writer is behind, the write is dropped and counted rather than slowing the request.
    pub fn served(&self, served: Served) {
        let sent = self
            .writes
            .read()
            .as_ref()
            .is_some_and(|tx| tx.try_send(served).is_ok());
        if !sent {
            metrics::counter!("onrec_shared_writes_dropped_total").increment(1);
        }
    }

    /// Stops taking writes; [`RedisShared::run_writer`] then writes what is queued and
    /// returns. For shutdown.
    pub fn close_writer(&self) {
        self.writes.write().take();
    }

    /// Writes queued responses until [`RedisShared::close_writer`]. Run it once, as a
    /// task; a second call returns at once.
    pub async fn run_writer(&self) {
        let Some(mut rx) = self.queued.lock().take() else {
            return;
        };
        while let Some(served) = rx.recv().await {
            if let Err(e) = self.write_served(&served).await {
                metrics::counter!("onrec_shared_write_errors_total").increment(1);
                tracing::warn!(error = %e, request_id = %served.request_id, "a response is not in the shared state");
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
                        out.push(PeerChange::Popularity {
                            item_id,
                            weight,
                            at_ms,
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
}
