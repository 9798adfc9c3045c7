//! onrec's request and feedback pipelines, free of any transport.
//!
//! [`Engine`] is a cheap `Clone` handle around shared state: the catalog, the ranker and
//! the per-user state. The HTTP and gRPC adapters, the simulator and the benchmarks all
//! drive the service through it, so they run the same code.

pub mod background;
pub mod bounded;
pub mod catalog;
pub mod decisions;
pub mod encoder;
pub mod error;
pub mod eventlog;
mod feedback;
pub mod learning;
pub mod online;
pub mod popularity;
mod qsync;
mod ranking;
mod recommend;
pub mod shared;
pub mod state;
pub mod taste;
pub mod types;
mod users;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use onrec_policy::{Explorer, StatUpdate};
use parking_lot::RwLock;

use crate::bounded::Sharded;
use crate::catalog::{Catalog, Inserted};
use crate::decisions::{LogRecord, Recent};
use crate::encoder::EncoderLink;
pub use crate::error::{EngineError, FieldError};
use crate::popularity::Popularity;
use crate::ranking::{EncoderState, Ranking};
use crate::shared::{PeerChange, RedisShared};
pub use crate::types::*;
use crate::users::{Impression, MAX_DISLIKED, MAX_RECENT_REQUESTS, Shown, UserState};
pub use crate::users::{MAX_PURCHASED, SHOWN_WINDOW};
use onrec_model::context::ContextIds;

/// How much each event type moves an item's popularity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventWeights {
    /// Weight of an impression.
    pub impression: f64,
    /// Weight of a click.
    pub click: f64,
    /// Weight of an add-to-cart.
    pub add_to_cart: f64,
    /// Weight of a purchase.
    pub purchase: f64,
    /// Weight of a dislike (negative pushes the item down for everyone).
    pub dislike: f64,
}

impl EventWeights {
    /// The weight of `kind`.
    pub fn of(&self, kind: EventType) -> f64 {
        match kind {
            EventType::Impression => self.impression,
            EventType::Click => self.click,
            EventType::AddToCart => self.add_to_cart,
            EventType::Purchase => self.purchase,
            EventType::Dislike => self.dislike,
        }
    }
}

impl Default for EventWeights {
    fn default() -> Self {
        Self {
            impression: 0.0,
            click: 1.0,
            add_to_cart: 2.0,
            purchase: 3.0,
            dislike: -1.0,
        }
    }
}

/// Whether the items a user bought are left out of their recommendations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HidePurchased {
    /// Left out in the categories whose buyers click what they bought less often than
    /// the category's items at all, learned from the traffic by Thompson sampling: a
    /// shop's consumables come back to their buyers, its durable goods do not.
    #[default]
    Learned,
    /// Always left out.
    Always,
    /// Never left out.
    Never,
}

/// The engine's settings; the server fills them from its configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Largest `n` a request may ask for.
    pub max_n: u32,
    /// Time for an event's weight in popularity to halve.
    pub half_life: Duration,
    /// Whether to leave out the items the user bought (the engine remembers their last
    /// [`MAX_PURCHASED`] purchases).
    pub hide_purchased: HidePurchased,
    /// Rest an item for a user once it was shown to them this many times among their last
    /// [`SHOWN_WINDOW`] shown slots without a click since; it returns when it falls out of
    /// that window (0: never rest).
    pub rest_after: u32,
    /// Weight of the user's taste for categories (see [`taste`]) in the encoder's ranking
    /// (0: none).
    pub category_taste: f64,
    /// Items kept per user history.
    pub history_len: usize,
    /// Users whose state is kept; the least recently active are forgotten first.
    pub max_users: usize,
    /// Event ids remembered for deduplication (at least the most recent half of this).
    pub dedupe_capacity: usize,
    /// Popularity weight per event type.
    pub weights: EventWeights,
    /// How far ahead of the clock an event's timestamp is taken as given (one further
    /// ahead counts as received now).
    pub max_future_skew: Duration,
    /// Candidates the ranker proposes to the exploration policy (at least `n` are).
    pub candidates: usize,
    /// Where impressions for the bandit statistics come from.
    pub impressions_from: ImpressionSource,
    /// Reward per event type for exploration and learning (impressions and dislikes are
    /// never rewarded; rewards are non-negative).
    pub rewards: EventWeights,
    /// Discount γ of later rewards (add-to-cart, purchase) against the click: r = r_i + γ·r_l.
    pub reward_gamma: f64,
    /// How long after a response its feedback is attributed to it.
    pub attribution_window: Duration,
    /// Responses remembered for attribution.
    pub impression_log_capacity: usize,
    /// Decision log records kept in memory for off-policy evaluation (0: none).
    pub decision_log_recent: usize,
    /// Decision log records queued for a writer (see [`Engine::decision_records`]); 0
    /// when nothing writes the log out.
    pub decision_log_queue: usize,
}

/// Where the bandit's impression counts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImpressionSource {
    /// Every served slot counts as shown.
    Served,
    /// Only `impression` events count (for clients that report what was actually seen).
    Events,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_n: 100,
            half_life: Duration::from_secs(6 * 3600),
            hide_purchased: HidePurchased::Learned,
            rest_after: DEFAULT_REST_AFTER,
            category_taste: 1.0,
            history_len: 50,
            max_users: 1_000_000,
            dedupe_capacity: 1_000_000,
            weights: EventWeights::default(),
            max_future_skew: Duration::from_secs(300),
            candidates: 50,
            impressions_from: ImpressionSource::Served,
            rewards: EventWeights {
                impression: 0.0,
                click: 1.0,
                add_to_cart: 2.0,
                purchase: 3.0,
                dislike: 0.0,
            },
            reward_gamma: 0.9,
            attribution_window: Duration::from_secs(24 * 3600),
            impression_log_capacity: 100_000,
            decision_log_recent: 10_000,
            decision_log_queue: 0,
        }
    }
}

/// Bandit statistics updates waiting for the background writer.
const STATS_QUEUE: usize = 65_536;
/// Most updates the writer sends in one store call.
const STATS_BATCH: usize = 1000;

/// A snapshot of the engine's size, for metrics and readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Items in the catalog.
    pub catalog_items: usize,
    /// Items that may be recommended.
    pub available_items: usize,
    /// Users whose state is kept.
    pub users_tracked: usize,
    /// The ranker's name.
    pub ranker: &'static str,
    /// Version of the model that ranks now.
    pub model_version: String,
}

/// Unclicked showings after which an item rests for a user unless configured: in the
/// simulator's fresh shop 10 did better than 5 in each kind of goods and, with the
/// Q-network off, as well as never resting.
pub const DEFAULT_REST_AFTER: u32 = 10;

/// The popularity ranker's name in responses and metrics.
pub const RANKER: &str = "popularity";
/// The Transformer encoder's name in responses and metrics.
pub const RANKER_ENCODER: &str = "transformer";

struct Inner {
    config: EngineConfig,
    ranking: RwLock<Ranking>,
    users: Sharded<String, UserState>,
    /// 128-bit digests of event ids: a fixed size per id, whatever its length.
    seen_events: Sharded<u128, ()>,
    category_rates: taste::CategoryRates,
    /// The clock and request ids: the system's, or a driver's (see
    /// [`Engine::make_deterministic`]).
    pace: Pace,
    explorer: Explorer,
    impressions: Sharded<String, Impression>,
    /// `None` once closed for shutdown.
    stats_tx: RwLock<Option<tokio::sync::mpsc::Sender<StatUpdate>>>,
    stats_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<StatUpdate>>>,
    learner: RwLock<Option<Arc<learning::LearnerLink>>>,
    online: RwLock<Option<Arc<online::OnlineEncoder>>>,
    events: RwLock<Option<eventlog::EventLog>>,
    decisions: DecisionLog,
    /// The state shared with other processes through Redis, when configured.
    shared: OnceLock<Arc<RedisShared>>,
}

/// Where decision log records go: the in-memory window and the writer's queue.
struct DecisionLog {
    /// Whether anything keeps records (a recent window or a writer); if not, none are built.
    enabled: bool,
    recent: parking_lot::Mutex<Recent>,
    /// `None` without a writer, or once closed for shutdown.
    tx: RwLock<Option<tokio::sync::mpsc::Sender<LogRecord>>>,
    rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<LogRecord>>>,
}

/// The pipelines behind a cheap `Clone` handle.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Where the engine's time and request ids come from.
#[derive(Debug)]
struct Pace {
    /// The driver's clock in milliseconds since the Unix epoch; [`i64::MIN`]: the system's.
    clock_ms: std::sync::atomic::AtomicI64,
    /// Draws request ids when a driver seeded them; random v4 ids otherwise.
    ids: parking_lot::Mutex<Option<rand::rngs::SmallRng>>,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            clock_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            ids: parking_lot::Mutex::new(None),
        }
    }
}

impl Pace {
    fn now_ms(&self) -> i64 {
        match self.clock_ms.load(std::sync::atomic::Ordering::Acquire) {
            i64::MIN => now_ms(),
            ms => ms,
        }
    }

    fn request_id(&self) -> uuid::Uuid {
        match self.ids.lock().as_mut() {
            Some(rng) => uuid::Builder::from_random_bytes(rand::Rng::random(rng)).into_uuid(),
            None => uuid::Uuid::new_v4(),
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A 128-bit digest of an event id, the same in every process and build, so that
/// replicas of different versions agree on which events they have seen.
fn event_digest(event_id: &str) -> u128 {
    onrec_policy::stable_digest(event_id)
}

impl Engine {
    /// An engine over `items`, which are validated and inserted in order, exploring with
    /// `explorer`. Its background work (bandit statistics writes, and with a shared state
    /// following the other processes) runs once [`Engine::start_background`] starts it.
    pub fn new(
        config: EngineConfig,
        items: Vec<Item>,
        explorer: Explorer,
    ) -> Result<Self, EngineError> {
        let now = now_ms();
        let mut ranking = Ranking {
            catalog: Arc::default(),
            popularity: parking_lot::Mutex::new(Popularity::new(
                config.half_life.as_secs_f64() * 1000.0,
                now,
            )),
            encoder: EncoderState::None,
            catalog_generation: 1,
        };
        for (i, item) in items.into_iter().enumerate() {
            item.validate().map_err(|e| e.under(&format!("[{i}]")))?;
            Self::insert_item(&mut ranking, item, now);
        }
        let (stats_tx, stats_rx) = tokio::sync::mpsc::channel(STATS_QUEUE);
        let (log_tx, log_rx) = match config.decision_log_queue {
            0 => (None, None),
            queue => {
                let (tx, rx) = tokio::sync::mpsc::channel(queue);
                (Some(tx), Some(rx))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                users: Sharded::new(config.max_users),
                seen_events: Sharded::new(config.dedupe_capacity),
                category_rates: taste::CategoryRates::default(),
                pace: Pace::default(),
                impressions: Sharded::new(config.impression_log_capacity),
                ranking: RwLock::new(ranking),
                explorer,
                stats_tx: RwLock::new(Some(stats_tx)),
                stats_rx: parking_lot::Mutex::new(Some(stats_rx)),
                learner: RwLock::new(None),
                online: RwLock::new(None),
                events: RwLock::new(None),
                decisions: DecisionLog {
                    enabled: config.decision_log_recent > 0 || log_tx.is_some(),
                    recent: parking_lot::Mutex::new(Recent::new(config.decision_log_recent)),
                    tx: RwLock::new(log_tx),
                    rx: parking_lot::Mutex::new(log_rx),
                },
                shared: OnceLock::new(),
                config,
            }),
        })
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The limits users' lists are kept to, for a shared store.
    pub fn user_limits(&self) -> shared::UserLimits {
        shared::UserLimits {
            history: self.inner.config.history_len,
            disliked: MAX_DISLIKED,
            purchased: MAX_PURCHASED,
            shown: SHOWN_WINDOW,
            recent_requests: MAX_RECENT_REQUESTS,
        }
    }

    /// Shares users, event dedupe, attribution and catalog changes with the other
    /// processes on `shared` from now on; [`Engine::start_background`] then takes in what
    /// they change. Once: a second call returns `false` and changes nothing.
    pub fn share(&self, shared: Arc<RedisShared>) -> bool {
        self.inner.shared.set(shared).is_ok()
    }

    /// The shared state, when there is one.
    pub fn shared(&self) -> Option<&Arc<RedisShared>> {
        self.inner.shared.get()
    }

    /// Applies what other processes changed: catalog changes and the popularity of the
    /// events they accepted.
    pub fn apply_peer_changes(&self, changes: Vec<PeerChange>) {
        for change in changes {
            match change {
                PeerChange::Event {
                    item_id,
                    weight,
                    at_ms,
                    user_id,
                    interaction,
                } => {
                    let ranking = self.inner.ranking.read();
                    let Some(idx) = ranking.catalog.index_of(&item_id) else {
                        continue;
                    };
                    if weight != 0.0 {
                        ranking.popularity.lock().add(idx, weight, at_ms);
                    }
                    let Some(interaction) = interaction else {
                        continue;
                    };
                    if let Some(online) = self.inner.online.read().as_ref() {
                        let slate: Vec<u32> = interaction
                            .slate
                            .iter()
                            .filter_map(|id| ranking.catalog.index_of(id))
                            .collect();
                        online.observe(&user_id, idx, interaction.context, &slate);
                    }
                    drop(ranking);
                    if let Some(credit) = &interaction.credit {
                        self.credit_peer(credit, idx);
                    }
                }
                PeerChange::Items(items) => {
                    let valid: Vec<Item> =
                        items.into_iter().filter(|i| i.validate().is_ok()).collect();
                    if !valid.is_empty() {
                        self.apply_items(valid);
                    }
                }
            }
        }
    }

    /// Takes in the catalog changes made through other processes so far, then follows
    /// the shared streams and applies what other processes change, until the task is
    /// dropped. Returns at once without a shared state. Redis being away is retried.
    pub(crate) async fn follow_peers(&self) {
        let Some(shared) = self.shared().cloned() else {
            return;
        };
        let mut cursor = loop {
            match shared.snapshot().await {
                Ok((items, cursor)) => {
                    let count = items.len();
                    self.apply_peer_changes(vec![PeerChange::Items(items)]);
                    tracing::info!(
                        items = count,
                        "catalog changes taken in from the shared state"
                    );
                    break cursor;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the shared catalog is unavailable; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        loop {
            match shared.changes(&mut cursor).await {
                Ok(changes) => self.apply_peer_changes(changes),
                Err(e) => {
                    tracing::warn!(error = %e, "following the shared state failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn insert_item(ranking: &mut Ranking, item: Item, now: i64) -> Inserted {
        let prior = item.popularity;
        let inserted = Arc::make_mut(&mut ranking.catalog).upsert(item);
        let popularity = ranking.popularity.get_mut();
        popularity.grow(ranking.catalog.len());
        if let (Inserted::Created(idx), Some(prior)) = (inserted, prior) {
            popularity.add(idx, prior, now);
        }
        inserted
    }

    /// Says that an encoder is on its way: until [`Engine::attach_encoder`], responses say
    /// they fell back to popularity.
    pub fn expect_encoder(&self) {
        let mut ranking = self.inner.ranking.write();
        if matches!(ranking.encoder, EncoderState::None) {
            ranking.encoder = EncoderState::Loading;
        }
    }

    /// Ranks with `encoder` from now on; `items` is its vocabulary (`items[0]` padding) and
    /// `version` names its weights.
    pub fn attach_encoder(
        &self,
        encoder: onrec_model::serve::Encoder,
        items: &[String],
        version: String,
    ) {
        let (known, catalog) =
            Self::swap_encoder(&self.inner, encoder, items, version.clone(), false);
        tracing::info!(
            %version,
            known_items = known,
            catalog_items = catalog,
            "encoder attached"
        );
    }

    /// Ranks with `encoder` from now on (users with no history too, with `newcomers`);
    /// returns the catalog items it knows and the catalog's size.
    fn swap_encoder(
        inner: &Inner,
        encoder: onrec_model::serve::Encoder,
        items: &[String],
        version: String,
        newcomers: bool,
    ) -> (usize, usize) {
        // The link is built without the lock: at 100,000 items it takes milliseconds, and
        // requests and events would wait on them. It is synced again should the catalog
        // change meanwhile.
        let (catalog, generation) = {
            let ranking = inner.ranking.read();
            (Arc::clone(&ranking.catalog), ranking.catalog_generation)
        };
        let mut link = EncoderLink::new(encoder, items, version, &catalog);
        drop(catalog);
        link.newcomers = newcomers;
        let mut ranking = inner.ranking.write();
        if ranking.catalog_generation != generation {
            link.sync(&ranking.catalog);
        }
        let known = (link.known_items(), ranking.catalog.len());
        let replaced = std::mem::replace(&mut ranking.encoder, EncoderState::Ready(link));
        drop(ranking);
        // The replaced encoder's tables are freed and its thread stopped after the lock.
        drop(replaced);
        known
    }

    /// Trains an encoder online from the interactions of accepted events, starting from
    /// nothing (or the settings' checkpoint), and ranks with each snapshot it publishes.
    /// Items added to the catalog later join it; with `text` (the checkpoint's text
    /// projection), items it knows nothing of are placed by their text. With a shared
    /// state, the process that holds the learner lease also publishes the snapshots'
    /// weights to Redis for the serve replicas.
    pub fn start_online_encoder(
        &self,
        settings: online::OnlineSettings,
        text: Option<onrec_model::text::TextProjection>,
    ) -> Result<Arc<online::OnlineEncoder>, onrec_learn::LearnError> {
        let weak = Arc::downgrade(&self.inner);
        let publish: online::Publish = Box::new(move |encoder, items, version, newcomers| {
            if let Some(inner) = weak.upgrade() {
                Self::swap_encoder(&inner, encoder, items, version, newcomers);
            }
        });
        // With a shared state, the learner lease holder's weights go to the serve replicas.
        let export = match (
            self.shared().cloned(),
            tokio::runtime::Handle::try_current(),
        ) {
            (Some(shared), Ok(runtime)) => {
                let export: online::Export = Box::new(move |exported| {
                    if !shared.is_learning() {
                        return;
                    }
                    let shared = Arc::clone(&shared);
                    runtime.spawn(async move {
                        match shared.publish_encoder(&exported).await {
                            Ok(()) => tracing::debug!(version = %exported.version, "encoder published to the serve replicas"),
                            Err(e) => tracing::warn!(error = %e, "publishing the encoder failed; the next version will be"),
                        }
                    });
                });
                Some(export)
            }
            _ => None,
        };
        let mut ranking = self.inner.ranking.write();
        let items = ranking
            .catalog
            .items()
            .iter()
            .map(online::EncoderItem::from)
            .collect();
        let trainer = Arc::new(online::OnlineEncoder::start(
            settings, items, text, publish, export,
        )?);
        if !matches!(ranking.encoder, EncoderState::Ready(_)) {
            ranking.encoder = EncoderState::Learning;
        }
        *self.inner.online.write() = Some(Arc::clone(&trainer));
        Ok(trainer)
    }

    /// Ranks with the encoders the learner publishes to the shared state, loading each new
    /// version on `device` (requests queue up to `queue`, batched as `batching` says).
    /// Checks every second until the task is dropped; returns at once without a shared
    /// state.
    pub(crate) async fn follow_published_encoder(
        &self,
        device: &candle_core::Device,
        queue: usize,
        batching: onrec_model::serve::Batching,
    ) {
        let Some(shared) = self.shared().cloned() else {
            return;
        };
        {
            let mut ranking = self.inner.ranking.write();
            if matches!(ranking.encoder, EncoderState::None | EncoderState::Loading) {
                ranking.encoder = EncoderState::Learning;
            }
        }
        let mut attached: Option<String> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let latest = match shared.published_encoder_version().await {
                Ok(latest) => latest,
                Err(e) => {
                    tracing::debug!(error = %e, "the published encoder's version is unavailable");
                    continue;
                }
            };
            if latest.is_none() || latest == attached {
                continue;
            }
            let exported = match shared.published_encoder().await {
                Ok(Some(exported)) => exported,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the published encoder failed; retrying");
                    continue;
                }
            };
            let model = match onrec_model::checkpoint::from_bytes(
                &exported.config,
                &exported.weights,
                device,
            ) {
                Ok(model) => model,
                Err(e) => {
                    tracing::error!(error = %e, version = %exported.version, "the published encoder does not load");
                    attached = Some(exported.version);
                    continue;
                }
            };
            match onrec_model::serve::Encoder::start(model, device.clone(), queue, batching) {
                Ok(encoder) => {
                    Self::swap_encoder(
                        &self.inner,
                        encoder,
                        &exported.items,
                        exported.version.clone(),
                        exported.newcomers,
                    );
                    tracing::info!(version = %exported.version, "published encoder loaded");
                    attached = Some(exported.version);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start an encoder thread for new weights")
                }
            }
        }
    }

    /// Appends every accepted event to the event log at `path` from now on.
    pub fn open_event_log(&self, path: &std::path::Path) -> Result<(), EngineError> {
        let log = eventlog::EventLog::open(path)?;
        tracing::info!(path = %log.path().display(), "event log opened");
        *self.inner.events.write() = Some(log);
        Ok(())
    }

    /// Hands the online encoder interactions that happened outside the service (user,
    /// item id, context), as initial events: the demo catalog's synthetic sessions, say.
    /// Items the catalog does not know are skipped; returns how many were handed over.
    pub fn seed_online_encoder<'a>(
        &self,
        interactions: impl IntoIterator<Item = (&'a str, &'a str, ContextIds)>,
    ) -> usize {
        let Some(online) = self.online_encoder() else {
            return 0;
        };
        let ranking = self.inner.ranking.read();
        let mut handed = 0;
        for (user, item, context) in interactions {
            if let Some(idx) = ranking.catalog.index_of(item) {
                online.observe(user, idx, context, &[]);
                handed += 1;
            }
        }
        handed
    }

    /// The online encoder, when one trains.
    pub fn online_encoder(&self) -> Option<Arc<online::OnlineEncoder>> {
        self.inner.online.read().clone()
    }

    /// Hands time, request ids and training to a driver, so that a run replays exactly
    /// (the simulator): the clock stands at the system's time now and moves only by
    /// [`Engine::advance`]; request ids (and so every tie-break and exploration draw) come
    /// from `seed`; the online encoder and the Q-network learner train only in
    /// [`Engine::settle`]. For one process driven by one caller, one request at a time.
    pub fn make_deterministic(&self, seed: u64) {
        let pace = &self.inner.pace;
        pace.clock_ms
            .store(now_ms(), std::sync::atomic::Ordering::Release);
        *pace.ids.lock() = Some(rand::SeedableRng::seed_from_u64(seed));
        if let Some(online) = self.online_encoder() {
            online.pace();
        }
        if let Some(learner) = self.q_learner() {
            learner.pace();
        }
    }

    /// Moves a driver's clock (see [`Engine::make_deterministic`]) `ms` forward.
    pub fn advance(&self, ms: i64) {
        let clock = &self.inner.pace.clock_ms;
        let now = clock.load(std::sync::atomic::Ordering::Acquire);
        if now != i64::MIN {
            clock.store(now.saturating_add(ms), std::sync::atomic::Ordering::Release);
        }
    }

    /// Waits, at most `timeout` for each, until the online encoder and the Q-network
    /// learner have trained on everything handed to them and published it; `false` when
    /// one of them did not answer in time.
    pub fn settle(&self, timeout: Duration) -> bool {
        let encoder = self
            .online_encoder()
            .is_none_or(|online| online.settle(timeout).is_some());
        let learner = self
            .q_learner()
            .is_none_or(|learner| learner.settle(timeout).is_some());
        encoder && learner
    }

    /// Now by the engine's clock, in milliseconds since the Unix epoch.
    pub(crate) fn now(&self) -> i64 {
        self.inner.pace.now_ms()
    }

    /// Stops the online encoder's training, if any.
    pub(crate) fn shutdown_online_encoder(&self) -> Result<(), onrec_learn::LearnError> {
        match self.online_encoder() {
            Some(online) => online.shutdown(),
            None => Ok(()),
        }
    }

    /// Starts an online Q-network learner for the catalog's items (resuming from the
    /// checkpoint in `dir`, if any), re-ranks with it from now on and feeds it the
    /// transitions of attributed feedback. Items added to the catalog later join it.
    pub fn start_learner(
        &self,
        config: onrec_learn::LearnConfig,
        dir: Option<&std::path::Path>,
        settings: learning::QSettings,
    ) -> Result<Arc<onrec_learn::Learner>, onrec_learn::LearnError> {
        let ids = self.inner.ranking.read().catalog.ids();
        let learner = Arc::new(onrec_learn::Learner::start(config, ids, dir)?);
        *self.inner.learner.write() = Some(Arc::new(learning::LearnerLink::new(
            Arc::clone(&learner),
            settings,
        )));
        // Items upserted while it started; later upserts grow it themselves.
        Self::grow_learner(&self.inner.ranking.read().catalog, &learner);
        Ok(learner)
    }

    /// Tells `learner` about catalog items it does not know yet.
    fn grow_learner(catalog: &Catalog, learner: &onrec_learn::Learner) {
        let known = learner.items();
        if catalog.len() > known {
            learner.grow(catalog.items()[known..].iter().map(|i| i.item_id.clone()));
        }
    }

    /// Re-scores with the Q-network the learner process publishes to the shared state
    /// (loaded by the background work, see [`BackgroundSettings`]) and sends it the
    /// feedback on this process's responses. `false` (and nothing attached) without a
    /// shared state.
    pub fn follow_learner(&self, settings: learning::QSettings) -> bool {
        let Some(shared) = self.shared().cloned() else {
            return false;
        };
        *self.inner.learner.write() =
            Some(Arc::new(learning::LearnerLink::following(shared, settings)));
        true
    }

    /// The Q-network link, when one is attached.
    pub(crate) fn q_link(&self) -> Option<Arc<learning::LearnerLink>> {
        self.inner.learner.read().clone()
    }

    /// The Q-network learner, when one trains in this process.
    pub fn q_learner(&self) -> Option<Arc<onrec_learn::Learner>> {
        self.q_link().and_then(|link| link.learner().cloned())
    }

    /// Stops the learner, if any, writing its final checkpoint.
    pub(crate) fn shutdown_learner(&self) -> Result<(), onrec_learn::LearnError> {
        match self.q_learner() {
            Some(learner) => learner.shutdown(),
            None => Ok(()),
        }
    }

    /// The metric label of a segment: its name when configured, else `other`, so that
    /// client-chosen segment names cannot grow the number of series without bound.
    fn segment_label(&self, segment: &str) -> String {
        let config = self.inner.explorer.config();
        let known = segment == onrec_policy::DEFAULT_SEGMENT
            || config.policies.contains_key(segment)
            || config.rules.iter().any(|r| r.name == segment);
        if known {
            segment.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// Hands statistics updates to the background writer; when it is behind, they are
    /// dropped and counted rather than slowing the request.
    fn queue_stats(&self, updates: impl IntoIterator<Item = StatUpdate>) {
        let tx = self.inner.stats_tx.read();
        for update in updates {
            let sent = tx.as_ref().is_some_and(|tx| tx.try_send(update).is_ok());
            if !sent {
                metrics::counter!("onrec_bandit_updates_dropped_total").increment(1);
            }
        }
    }

    /// Stops taking statistics updates; [`Engine::run_stats_writer`] then writes what is
    /// queued and returns. For shutdown.
    pub(crate) fn close_stats(&self) {
        self.inner.stats_tx.write().take();
    }

    /// Writes queued bandit statistics to the store in batches until [`Engine::close_stats`]
    /// and everything queued before it is written. Run it once, as a task; a second call
    /// returns at once.
    pub(crate) async fn run_stats_writer(&self) {
        let Some(mut rx) = self.inner.stats_rx.lock().take() else {
            return;
        };
        let store = Arc::clone(self.inner.explorer.store());
        let mut batch = Vec::with_capacity(STATS_BATCH);
        while rx.recv_many(&mut batch, STATS_BATCH).await > 0 {
            // The resilient store buffers what it cannot write and flushes it later.
            if let Err(e) = store.record(&batch).await {
                tracing::debug!(error = %e, updates = batch.len(), "bandit statistics write deferred");
            }
            batch.clear();
        }
    }

    /// Keeps a decision log record in the recent window and queues it for the writer;
    /// when the writer is behind, it is dropped from the writer's stream and counted.
    fn log_decision(&self, record: LogRecord) {
        let log = &self.inner.decisions;
        let tx = log.tx.read();
        if let Some(tx) = tx.as_ref()
            && tx.try_send(record.clone()).is_err()
        {
            metrics::counter!("onrec_decision_log_dropped_total").increment(1);
        }
        log.recent.lock().push(record);
    }

    /// The decision log's recent records, oldest first (at most `decision_log_recent`).
    pub fn recent_decisions(&self) -> Vec<LogRecord> {
        self.inner.decisions.recent.lock().snapshot()
    }

    /// The stream of decision log records for a writer: `Some` once, when the engine
    /// was configured with a `decision_log_queue`.
    pub fn decision_records(&self) -> Option<tokio::sync::mpsc::Receiver<LogRecord>> {
        self.inner.decisions.rx.lock().take()
    }

    /// Stops queueing decision log records; the writer then drains what is queued and
    /// sees the stream end. For shutdown.
    pub fn close_decision_log(&self) {
        self.inner.decisions.tx.write().take();
    }

    /// Whether the bandit statistics store answers.
    pub async fn ping_store(&self) -> bool {
        self.inner.explorer.store().ping().await.is_ok()
    }

    /// The bandit statistics of every segment, with each segment's policy.
    pub async fn segments(&self, top: usize) -> Result<Vec<SegmentReport>, EngineError> {
        let names = self
            .inner
            .explorer
            .store()
            .segments()
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push(self.segment(&name, top).await?);
        }
        Ok(out)
    }

    /// One segment's policy and bandit statistics, with its `top` best items.
    pub async fn segment(&self, segment: &str, top: usize) -> Result<SegmentReport, EngineError> {
        let summary = self
            .inner
            .explorer
            .store()
            .segment_summary(segment, top)
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        Ok(SegmentReport::new(
            summary,
            self.inner.explorer.policy(segment).kind(),
        ))
    }

    /// Inserts or replaces items, all-or-nothing: if any item is malformed nothing changes
    /// and the error names it (`[2].price`). With a shared state the change is published
    /// first, for every process; when it cannot be, nothing changes.
    pub async fn upsert_items(&self, items: Vec<Item>) -> Result<UpsertSummary, EngineError> {
        for (i, item) in items.iter().enumerate() {
            item.validate().map_err(|e| e.under(&format!("[{i}]")))?;
        }
        if let Some(shared) = self.shared() {
            shared.publish_items(&items).await?;
        }
        Ok(self.apply_items(items))
    }

    /// Inserts or replaces valid items in this process's catalog.
    fn apply_items(&self, items: Vec<Item>) -> UpsertSummary {
        let now = self.now();
        let mut ranking = self.inner.ranking.write();
        let (mut created, mut updated) = (Vec::new(), 0);
        for item in items {
            match Self::insert_item(&mut ranking, item, now) {
                Inserted::Created(idx) => created.push(idx),
                Inserted::Updated(_) => updated += 1,
            }
        }
        if let Some(online) = self.inner.online.read().as_ref() {
            online.grow(
                created
                    .iter()
                    .map(|&i| online::EncoderItem::from(ranking.catalog.get(i)))
                    .collect(),
            );
        }
        ranking.catalog_generation += 1;
        let Ranking {
            catalog, encoder, ..
        } = &mut *ranking;
        if let EncoderState::Ready(link) = encoder {
            link.sync(catalog);
        }
        if let Some(learner) = self.inner.learner.read().as_ref().and_then(|l| l.learner()) {
            Self::grow_learner(catalog, learner);
        }
        UpsertSummary {
            created: created.len() as u64,
            updated,
            catalog_size: ranking.catalog.len() as u64,
        }
    }

    /// The items a user interacted with, oldest first, as the engine recorded them.
    pub fn history(&self, user_id: &str) -> Vec<String> {
        let key = user_id.to_owned();
        let ranking = self.inner.ranking.read();
        let users = self.inner.users.shard(&key);
        users.peek(&key).map_or_else(Vec::new, |u| {
            u.history
                .iter()
                .map(|&i| ranking.catalog.get(i).item_id.clone())
                .collect()
        })
    }

    /// Sizes and the current model version.
    pub fn stats(&self) -> Stats {
        let ranking = self.inner.ranking.read();
        Stats {
            catalog_items: ranking.catalog.len(),
            available_items: ranking.catalog.available(),
            users_tracked: self.inner.users.len(),
            ranker: ranking.ranker(),
            model_version: ranking.model_version(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy() -> Explorer {
        let store = onrec_policy::MemoryStore::new(onrec_policy::StatsConfig::default()).unwrap();
        Explorer::new(onrec_policy::SegmentConfig::default(), Arc::new(store)).unwrap()
    }

    fn engine(items: usize) -> Engine {
        Engine::new(
            EngineConfig::default(),
            catalog::demo_catalog(items),
            greedy(),
        )
        .unwrap()
    }

    fn event(id: &str, user: &str, item: &str, kind: EventType) -> Event {
        Event {
            event_id: id.into(),
            user_id: user.into(),
            item_id: item.into(),
            kind,
            request_id: None,
            value: None,
            timestamp: None,
        }
    }

    fn rec(e: &Engine, req: &RecommendRequest) -> Result<Recommendation, EngineError> {
        block_on(e.recommend(req))
    }

    /// Records one event in an engine without a shared state, which cannot fail.
    fn put(e: &Engine, event: &Event) -> EventOutcome {
        block_on(e.record(event)).expect("an engine without a shared state takes every event")
    }

    /// Runs a future to completion on this thread (the engine's futures only wait on the
    /// encoder thread, which these tests do not start).
    fn block_on<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn ids(r: &Recommendation) -> Vec<&str> {
        r.items.iter().map(|i| i.item_id.as_str()).collect()
    }

    #[test]
    fn a_deterministic_engine_replays_its_ids_draws_and_clock() {
        let run = |seed: u64| {
            let mut segments = onrec_policy::SegmentConfig::default();
            segments.policies.insert(
                onrec_policy::DEFAULT_SEGMENT.to_owned(),
                onrec_policy::PolicyConfig::epsilon_greedy(0.5),
            );
            let store =
                onrec_policy::MemoryStore::new(onrec_policy::StatsConfig::default()).unwrap();
            let explorer = Explorer::new(segments, Arc::new(store)).unwrap();
            let e = Engine::new(
                EngineConfig::default(),
                catalog::demo_catalog(200),
                explorer,
            )
            .unwrap();
            e.make_deterministic(seed);
            let start = e.now();
            e.advance(1500);
            assert_eq!(e.now(), start + 1500, "the clock moves only when told");
            let mut served = Vec::new();
            for round in 0..20 {
                let user = format!("u{}", round % 3);
                let r = rec(&e, &RecommendRequest::new(user.clone(), 5)).unwrap();
                let clicked = r.items[round % 5].item_id.clone();
                let mut click = event(&format!("e{round}"), &user, &clicked, EventType::Click);
                click.request_id = Some(r.request_id.clone());
                assert_eq!(put(&e, &click), EventOutcome::Accepted);
                served.push((r.request_id.clone(), ids(&r).join(",")));
            }
            assert!(e.settle(Duration::from_secs(5)), "nothing to wait for");
            served
        };
        let first = run(7);
        assert_eq!(
            first,
            run(7),
            "the same seed serves the same ids and slates"
        );
        assert_ne!(first, run(8));
    }

    #[test]
    fn returns_n_items_best_first() {
        let e = engine(200);
        let r = rec(&e, &RecommendRequest::new("u", 10)).unwrap();
        assert_eq!(r.items.len(), 10);
        assert!(r.items.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(r.items.iter().all(|i| i.propensity == 1.0 && !i.explored));
        assert_eq!(
            (r.ranker.as_str(), r.segment.as_str()),
            ("popularity", "default")
        );
        let again = rec(&e, &RecommendRequest::new("v", 10)).unwrap();
        assert_eq!(ids(&r), ids(&again));
        assert_ne!(r.request_id, again.request_id);
    }

    #[test]
    fn clicks_move_an_item_up_for_everyone() {
        let e = engine(200);
        let before = rec(&e, &RecommendRequest::new("u", 100)).unwrap();
        let target = before.items[90].item_id.clone();
        let top = before.items[0].score;
        let clicks = (top.ceil() as usize) + 1;
        for i in 0..clicks {
            let ev = event(
                &format!("e{i}"),
                &format!("user{i}"),
                &target,
                EventType::Click,
            );
            assert_eq!(put(&e, &ev), EventOutcome::Accepted);
        }
        let after = rec(&e, &RecommendRequest::new("someone-else", 5)).unwrap();
        assert_eq!(after.items[0].item_id, target);
    }

    #[test]
    fn duplicates_count_once() {
        let e = engine(50);
        let target = rec(&e, &RecommendRequest::new("u", 50)).unwrap().items[49]
            .item_id
            .clone();
        let ev = event("dup", "u1", &target, EventType::Purchase);
        assert_eq!(put(&e, &ev), EventOutcome::Accepted);
        let once = rec(&e, &RecommendRequest::new("x", 50)).unwrap();
        assert_eq!(put(&e, &ev), EventOutcome::Duplicate);
        let twice = rec(&e, &RecommendRequest::new("x", 50)).unwrap();
        let score =
            |r: &Recommendation| r.items.iter().find(|i| i.item_id == target).unwrap().score;
        assert!((score(&once) - score(&twice)).abs() < 1e-6 * score(&once));
    }

    #[test]
    fn purchased_disliked_and_excluded_items_are_hidden_and_clicked_ones_come_back() {
        let config = EngineConfig {
            hide_purchased: HidePurchased::Always,
            ..EngineConfig::default()
        };
        let e = Engine::new(config, catalog::demo_catalog(30), greedy()).unwrap();
        let all = rec(&e, &RecommendRequest::new("u", 30)).unwrap();
        let id = |k: usize| all.items[k].item_id.clone();
        let (a, b, c, d) = (id(0), id(1), id(2), id(3));
        put(&e, &event("1", "u", &a, EventType::Click));
        put(&e, &event("2", "u", &b, EventType::Dislike));
        put(&e, &event("3", "u", &d, EventType::Click));
        put(&e, &event("4", "u", &d, EventType::Purchase));
        let mut req = RecommendRequest::new("u", 30);
        req.exclude = vec![c.clone(), "not-in-catalog".into()];
        let r = rec(&e, &req).unwrap();
        assert_eq!(r.items.len(), 27);
        for hidden in [&b, &c, &d] {
            assert!(!ids(&r).contains(&hidden.as_str()), "{hidden} returned");
        }
        assert!(
            ids(&r).contains(&a.as_str()),
            "a clicked item may come back"
        );
        assert_eq!(e.history("u"), vec![a.clone(), d.clone(), d.clone()]);
        // recent_items in the request replace the recorded history, not what is hidden.
        let mut req = RecommendRequest::new("u", 30);
        req.recent_items = vec![c.clone()];
        let r = rec(&e, &req).unwrap();
        assert!(ids(&r).contains(&c.as_str()) && !ids(&r).contains(&d.as_str()));
    }

    #[test]
    fn items_passed_over_rest_after_times_rest_until_clicked() {
        let e = engine(30);
        let times = EngineConfig::default().rest_after;
        assert!(times > 1);
        let first = rec(&e, &RecommendRequest::new("v", 5)).unwrap();
        for _ in 1..times {
            assert_eq!(
                ids(&rec(&e, &RecommendRequest::new("v", 5)).unwrap()),
                ids(&first)
            );
        }
        let next = rec(&e, &RecommendRequest::new("v", 5)).unwrap();
        assert!(
            ids(&next).iter().all(|i| !ids(&first).contains(i)),
            "shown {times} times without a click, they rest: {:?} then {:?}",
            ids(&first),
            ids(&next)
        );
        put(
            &e,
            &event("c", "v", &first.items[0].item_id, EventType::Click),
        );
        let after = rec(&e, &RecommendRequest::new("v", 5)).unwrap();
        assert!(ids(&after).contains(&first.items[0].item_id.as_str()));
        assert!(
            rec(&e, &RecommendRequest::new("w", 5)).unwrap().items.len() == 5,
            "resting is per user"
        );
    }

    #[test]
    fn empty_catalog_and_unknown_users_get_empty_or_popular_results() {
        let e = Engine::new(EngineConfig::default(), Vec::new(), greedy()).unwrap();
        assert!(
            rec(&e, &RecommendRequest::new("u", 5))
                .unwrap()
                .items
                .is_empty()
        );
        assert_eq!(
            put(&e, &event("e", "u", "nope", EventType::Click)),
            EventOutcome::UnknownItem
        );
        let e = engine(3);
        assert_eq!(
            rec(&e, &RecommendRequest::new("new", 10))
                .unwrap()
                .items
                .len(),
            3
        );
    }

    #[test]
    fn batches_are_validated_before_anything_is_applied() {
        let e = engine(10);
        let good = event("a", "u", "sku-00001", EventType::Click);
        let bad = event("", "u", "sku-00002", EventType::Click);
        let err = e
            .validate_batch(&[good.clone(), bad])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "[1].event_id: must not be empty");
        assert!(e.validate_batch(&[good]).is_ok());
    }

    #[test]
    fn upserts_add_hide_and_version_the_catalog() {
        let e = engine(5);
        let v1 = e.stats().model_version;
        let mut hidden = rec(&e, &RecommendRequest::new("u", 1)).unwrap().items[0]
            .item_id
            .clone();
        let mut item = Item::new(hidden.clone(), "x");
        item.available = false;
        let s = block_on(e.upsert_items(vec![item, Item::new("new-1", "y")])).unwrap();
        assert_eq!((s.created, s.updated, s.catalog_size), (1, 1, 6));
        assert_ne!(e.stats().model_version, v1);
        assert_eq!(e.stats().available_items, 5);
        let r = rec(&e, &RecommendRequest::new("u", 10)).unwrap();
        assert!(!ids(&r).contains(&hidden.as_str()));
        hidden.clear();
        let err =
            block_on(e.upsert_items(vec![Item::new("ok", ""), Item::new(hidden, "")])).unwrap_err();
        assert_eq!(err.to_string(), "[1].item_id: must not be empty");
        assert_eq!(e.stats().catalog_items, 6);
    }

    #[test]
    fn feedback_is_attributed_to_the_segment_that_served_it() {
        block_on(async {
            let e = engine(20);
            let writer = e.clone();
            let task = tokio::spawn(async move { writer.run_stats_writer().await });
            let mut req = RecommendRequest::new("u", 3);
            req.segment = Some("vip".into());
            let served = e.recommend(&req).await.unwrap();
            assert_eq!(
                (served.segment.as_str(), served.policy.as_str()),
                ("vip", "greedy")
            );
            let item = served.items[1].item_id.clone();
            let mut click = event("r1", "u", &item, EventType::Click);
            click.request_id = Some(served.request_id.clone());
            assert_eq!(e.record(&click).await.unwrap(), EventOutcome::Accepted);
            // Without a request id, the user's last segment is used; the purchase is a later
            // reward, discounted by gamma = 0.9 with weight 3.
            assert_eq!(
                e.record(&event("r2", "u", &item, EventType::Purchase))
                    .await
                    .unwrap(),
                EventOutcome::Accepted
            );
            // A request id of another response does not attribute to it.
            let mut stray = event("r3", "other", &item, EventType::Click);
            stray.request_id = Some("not-a-known-request".into());
            e.record(&stray).await.unwrap();
            let mut report = None;
            for _ in 0..200 {
                tokio::task::yield_now().await;
                let r = e.segment("vip", 10).await.unwrap();
                if r.reward >= 3.7 {
                    report = Some(r);
                    break;
                }
            }
            let report = report.expect("the rewards reached the store");
            assert!((report.impressions - 3.0).abs() < 1e-9, "{report:?}");
            assert!(
                (report.reward - (1.0 + 0.9 * 3.0)).abs() < 1e-9,
                "{report:?}"
            );
            assert_eq!(report.top[0].item_id, item);
            let default = e.segment("default", 10).await.unwrap();
            assert!((default.reward - 1.0).abs() < 1e-9, "{default:?}");
            task.abort();
        });
    }

    #[test]
    fn feedback_without_a_request_id_goes_to_the_response_that_showed_the_item() {
        block_on(async {
            let e = engine(20);
            let writer = e.clone();
            let task = tokio::spawn(async move { writer.run_stats_writer().await });
            let mut first = RecommendRequest::new("w", 2);
            first.segment = Some("a".into());
            let shown = e.recommend(&first).await.unwrap().items[0].item_id.clone();
            // A later response in another segment that does not show the item.
            let mut second = RecommendRequest::new("w", 2);
            second.segment = Some("b".into());
            second.exclude = vec![shown.clone()];
            e.recommend(&second).await.unwrap();
            assert_eq!(
                e.record(&event("nr1", "w", &shown, EventType::Click))
                    .await
                    .unwrap(),
                EventOutcome::Accepted
            );
            let mut rewarded = 0.0;
            for _ in 0..200 {
                tokio::task::yield_now().await;
                rewarded = e.segment("a", 5).await.unwrap().reward;
                if rewarded > 0.0 {
                    break;
                }
            }
            assert!((rewarded - 1.0).abs() < 1e-9, "segment a got {rewarded}");
            assert_eq!(e.segment("b", 5).await.unwrap().reward, 0.0);
            task.abort();
        });
    }

    #[test]
    fn items_added_while_learning_join_the_q_network() {
        let e = engine(20);
        let settings = learning::QSettings {
            mode: learning::QMode::Live,
            weight: 0.5,
            min_updates: 0,
            negatives: true,
        };
        let learner = e
            .start_learner(onrec_learn::LearnConfig::default(), None, settings)
            .unwrap();
        assert_eq!(learner.items(), 20);
        block_on(e.upsert_items(vec![Item::new("new-1", "x"), Item::new("new-2", "x")])).unwrap();
        assert_eq!(learner.items(), 22, "the learner grows with the catalog");
        // Whether or not the published weights know the new items yet, every candidate
        // is re-scored: the response carries the Q weights' version.
        let mut req = RecommendRequest::new("u", 22);
        req.exclude = Vec::new();
        let served = rec(&e, &req).unwrap();
        assert!(
            served.model_version.contains("+q"),
            "{}",
            served.model_version
        );
        assert!(ids(&served).contains(&"new-2"));
        let mut click = event("c1", "u", "new-2", EventType::Click);
        click.request_id = Some(served.request_id.clone());
        assert_eq!(put(&e, &click), EventOutcome::Accepted);
        assert_eq!(learner.accepted(), 22, "the click and 21 unclicked slots");
        let mut known = 0;
        for _ in 0..400 {
            known = learner.current().net.num_items();
            if known == 22 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(known, 22, "published weights cover the new items");
        learner.shutdown().unwrap();
    }

    #[test]
    fn served_slates_and_their_rewards_enter_the_decision_log() {
        let config = EngineConfig {
            decision_log_queue: 16,
            ..EngineConfig::default()
        };
        let e = Engine::new(config, catalog::demo_catalog(20), greedy()).unwrap();
        let mut writer = e.decision_records().expect("a queue was configured");
        assert!(e.decision_records().is_none(), "the stream is taken once");
        let mut req = RecommendRequest::new("u", 3);
        req.context = Some(Context {
            device: Some("mobile".into()),
            ..Context::default()
        });
        let served = rec(&e, &req).unwrap();
        let mut click = event("c1", "u", &served.items[2].item_id, EventType::Click);
        click.request_id = Some(served.request_id.clone());
        assert_eq!(put(&e, &click), EventOutcome::Accepted);
        // An impression earns no reward, so it is not logged.
        put(
            &e,
            &event("i1", "u", &served.items[0].item_id, EventType::Impression),
        );

        let recent = e.recent_decisions();
        assert_eq!(recent.len(), 2, "{recent:?}");
        let LogRecord::Decision(d) = &recent[0] else {
            panic!("{recent:?}")
        };
        assert_eq!(d.request_id, served.request_id);
        assert_eq!(d.segment, "default");
        assert_eq!(d.policy, onrec_policy::PolicyConfig::Greedy {});
        assert_eq!(d.model_version, served.model_version);
        assert_eq!(
            d.context.as_ref().and_then(|c| c.device.as_deref()),
            Some("mobile")
        );
        assert_eq!(
            d.candidates.len(),
            20,
            "every available item was a candidate"
        );
        let slate: Vec<&str> = d.slate.iter().map(|s| s.item_id.as_str()).collect();
        assert_eq!(slate, ids(&served));
        assert!(d.slate.iter().all(|s| s.propensity == 1.0 && !s.explored));
        let LogRecord::Reward(r) = &recent[1] else {
            panic!("{recent:?}")
        };
        assert_eq!((r.position, r.reward, r.event), (2, 1.0, EventType::Click));
        assert_eq!(r.request_id, served.request_id);

        e.close_decision_log();
        let mut written = Vec::new();
        while let Ok(record) = writer.try_recv() {
            written.push(record);
        }
        assert_eq!(written, recent, "the writer gets what the window keeps");
    }

    #[test]
    fn event_digests_differ_per_id() {
        assert_ne!(event_digest("a"), event_digest("b"));
        assert_eq!(event_digest("a"), event_digest("a"));
    }
}
