//! onrec's transports: axum HTTP and tonic gRPC over one [`onrec_engine::Engine`].
//!
//! [`run`] takes bound listeners and a shutdown future (so tests bind port 0 and stop the
//! server cleanly); both transports share [`App`]: the engine, the API keys, the admission
//! semaphore and the shutdown token. Errors map to HTTP and gRPC in [`error`] only.

pub mod auth;
pub mod client;
pub mod config;
pub mod contract;
pub mod decision_log;
pub mod encoder;
pub mod error;
pub mod events;
#[cfg(test)]
mod fuzz;
pub mod grpc;
pub mod grpc_status;
pub mod http;
pub mod metrics;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use onrec_engine::background::BackgroundSettings;
use onrec_engine::learning::{QMode, QSettings};
use onrec_engine::shared::{RedisShared, SharedConfig};
use onrec_engine::{Engine, catalog};
use onrec_learn::LearnConfig;
use onrec_policy::{
    BanditStore, Explorer, MemoryStore, RedisConfig, RedisStore, ResilientConfig, ResilientStore,
    StatsConfig,
};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::auth::{Access, ApiKeys};
use crate::client::{Caller, Client, ClientLimit, ClientPlace};
pub use crate::config::Config;
use crate::config::{LearnerMode, Role};
use crate::error::ApiError;
use crate::metrics::{Inflight, Transport};

/// State shared by both transports; a cheap `Clone`.
#[derive(Clone, Debug)]
pub struct App {
    engine: Engine,
    config: Arc<Config>,
    keys: ApiKeys,
    admission: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    /// The most places of each budget one client may hold; `None`: no per-client limit.
    client_requests: Option<Arc<ClientLimit>>,
    client_streams: Option<Arc<ClientLimit>>,
    shutdown: CancellationToken,
    ready: Arc<AtomicBool>,
    /// Set at SIGTERM: the server still serves, but says it is draining.
    draining: Arc<AtomicBool>,
    store_seen: Arc<AtomicBool>,
    model_version: Arc<Mutex<Option<String>>>,
}

/// Posterior samples one evaluation may draw (about two seconds of a core): a Thompson
/// target is evaluated on the newest logged decisions that fit (decisions × draws ×
/// candidates), which the report's `counts.decisions` says.
pub const OPE_SAMPLE_BUDGET: u64 = 20_000_000;

/// Concurrent HTTP/2 streams one connection (HTTP or gRPC) may open, advertised in its
/// settings: one client cannot open thousands of calls on a single connection.
pub(crate) const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// Which concurrency budget a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Requests with a whole body (`max_concurrent_requests`).
    Requests,
    /// Event streams, open as long as the client sends (`max_streams`).
    Streams,
}

/// What a request holds while it runs: its admission permit, its client's place and
/// the in-flight count.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    _client: Option<ClientPlace>,
    _inflight: Inflight,
}

impl App {
    /// State for `engine` under `config`.
    pub fn new(engine: Engine, config: Config) -> Self {
        Self {
            keys: ApiKeys::new(&config.read_api_keys, &config.write_api_keys),
            admission: Arc::new(Semaphore::new(config.max_concurrent_requests as usize)),
            streams: Arc::new(Semaphore::new(config.max_streams as usize)),
            client_requests: ClientLimit::new(
                config.max_concurrent_requests,
                config.max_client_share,
            ),
            client_streams: ClientLimit::new(config.max_streams, config.max_client_share),
            engine,
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
            ready: Arc::new(AtomicBool::new(false)),
            draining: Arc::new(AtomicBool::new(false)),
            store_seen: Arc::new(AtomicBool::new(false)),
            model_version: Arc::new(Mutex::new(None)),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Cancelled when the server starts shutting down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Whether a shutdown has begun: from the signal on, through the drain delay and
    /// the grace period.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.shutdown.is_cancelled()
    }

    /// Whether the server takes traffic: started, its bandit store reached at least once,
    /// and not draining. A store that fails later does not make it unready: requests then
    /// go on without exploration.
    pub async fn is_ready(&self) -> bool {
        if !self.ready.load(Ordering::Acquire) || self.is_draining() {
            return false;
        }
        if self.store_seen.load(Ordering::Acquire) {
            return true;
        }
        let reachable = self.engine.ping_store().await;
        if reachable {
            self.store_seen.store(true, Ordering::Release);
        }
        reachable
    }

    /// Checks the API key, or says why not.
    pub fn authorize(&self, access: Access, authorization: Option<&str>) -> Result<(), ApiError> {
        self.keys.check(access, authorization)
    }

    /// Takes a place in `budget` for a request from `client` whose key was checked, or
    /// says why not: the budget is full, or the client holds its share of it already.
    pub async fn admit(
        &self,
        transport: Transport,
        budget: Budget,
        client: Client,
    ) -> Result<Admitted, ApiError> {
        let (permits, per_client, limit, what) = match budget {
            Budget::Requests => (
                &self.admission,
                &self.client_requests,
                self.config.max_concurrent_requests,
                "requests",
            ),
            Budget::Streams => (
                &self.streams,
                &self.client_streams,
                self.config.max_streams,
                "event streams",
            ),
        };
        let place = match per_client {
            Some(per_client) => Some(per_client.take(client).ok_or_else(|| {
                metrics::client_limited(transport, what);
                ApiError::ClientLimit(per_client.most, what)
            })?),
            None => None,
        };
        let overloaded = || ApiError::Overloaded(limit, what);
        let permit = match Arc::clone(permits).try_acquire_owned() {
            Ok(permit) => permit,
            // A request waits a moment for a place: turning it away at once would have
            // it back at once, and answering those retries costs the places' work.
            Err(_) if budget == Budget::Requests && !self.config.admission_wait.is_zero() => {
                tokio::time::timeout(
                    self.config.admission_wait,
                    Arc::clone(permits).acquire_owned(),
                )
                .await
                .map_err(|_| overloaded())?
                .map_err(|_| overloaded())?
            }
            Err(_) => return Err(overloaded()),
        };
        Ok(Admitted {
            _permit: permit,
            _client: place,
            _inflight: Inflight::start(transport),
        })
    }

    /// The caller's key check, then admission to `budget` (see [`App::admit`]).
    pub async fn enter(
        &self,
        transport: Transport,
        (access, budget): (Access, Budget),
        caller: &Caller,
    ) -> Result<Admitted, ApiError> {
        self.authorize(access, caller.authorization.as_deref())?;
        self.admit(transport, budget, caller.client).await
    }

    /// Runs one request: the caller's key check and admission to `budget`, then `work`,
    /// counted in the request metrics under `transport` and `endpoint` with its outcome
    /// and duration.
    pub async fn serve<T>(
        &self,
        (transport, endpoint): (Transport, &'static str),
        (access, budget): (Access, Budget),
        caller: &Caller,
        work: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let started = Instant::now();
        let result = match self.enter(transport, (access, budget), caller).await {
            Ok(_admitted) => work.await,
            Err(e) => Err(e),
        };
        metrics::finish(transport, endpoint, started, &result);
        result
    }

    /// Bounds `work` by the unary request timeout.
    pub async fn timed<T>(
        &self,
        work: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let limit = self.config.request_timeout;
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| ApiError::Timeout(format!("request not completed within {limit:?}")))?
    }

    /// Estimates `target`'s value from the engine's recent decision log, off the async
    /// threads (the bootstrap is CPU work).
    pub async fn evaluate(
        &self,
        target: onrec_eval::TargetPolicy,
        options: onrec_eval::OpeOptions,
    ) -> Result<onrec_eval::OpeReport, ApiError> {
        target.validate()?;
        options.validate()?;
        let records = self.engine.recent_decisions();
        tokio::task::spawn_blocking(move || {
            let records = target.affordable(&records, OPE_SAMPLE_BUDGET);
            onrec_eval::evaluate(records, &target, &options)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("the evaluation task failed: {e}")))?
        .map_err(ApiError::from)
    }

    /// Where the engine's state is kept across restarts: `data_dir` when there is no
    /// Redis (with Redis, the shared state and the statistics live there).
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        match (&self.config.data_dir, &self.config.redis_url) {
            (Some(dir), None) => Some(dir),
            _ => None,
        }
    }

    /// Refreshes the metrics that mirror the engine's state.
    pub fn refresh_gauges(&self) {
        let stats = self.engine.stats();
        let mut last = self.model_version.lock();
        metrics::engine_state(&stats, last.as_deref());
        *last = Some(stats.model_version);
    }
}

/// The event log's file name in `data_dir`.
pub const EVENT_LOG: &str = "events.jsonl";
/// The engine state's file name in `data_dir`: written at shutdown, read at start.
pub const ENGINE_STATE: &str = "state.json";

/// Builds the engine from the configured catalog (or the demo catalog), and attaches the
/// configured encoder: a checkpoint loaded now, or one trained online from events (with
/// the demo catalog, its synthetic sessions first).
pub fn build_engine(config: &Config) -> anyhow::Result<Engine> {
    let started = Instant::now();
    let (items, source) = match &config.catalog {
        Some(path) => (
            catalog::Catalog::read_jsonl(path)?,
            path.display().to_string(),
        ),
        None => (
            catalog::demo_catalog(config.demo_items),
            "built-in demo".to_owned(),
        ),
    };
    let pairs: Vec<(String, String)> = items
        .iter()
        .map(|i| (i.item_id.clone(), i.category.clone()))
        .collect();
    let explorer = Explorer::new(config.segments_with_default(), bandit_store(config)?)
        .and_then(|e| e.with_prior(config.segment_prior))
        .context("the segment configuration")?;
    let engine = Engine::new(config.engine(), items, explorer).context("building the catalog")?;
    if let Some(url) = &config.redis_url {
        let shared = RedisShared::new(
            SharedConfig {
                url: url.clone(),
                ca_pem: config.redis_ca()?,
                timeout: config.redis_timeout,
                write_timeout: config.redis_write_timeout,
                attribution_window: config.attribution_window,
                ..SharedConfig::default()
            },
            engine.user_limits(),
        )
        .context("configuring the shared state in Redis")?;
        engine.share(Arc::new(shared));
    }
    let stats = engine.stats();
    tracing::info!(
        source,
        items = stats.catalog_items,
        available = stats.available_items,
        took_ms = started.elapsed().as_millis() as u64,
        "catalog loaded"
    );
    if let Some(dir) = &config.data_dir {
        engine
            .open_event_log(&dir.join(EVENT_LOG))
            .context("opening the event log")?;
    }
    attach_learner(&engine, config)?;
    if let Some(dir) = &config.model {
        encoder::attach_checkpoint(&engine, config, dir)?;
    }
    encoder::start_online(&engine, config, &pairs)?;
    Ok(engine)
}

/// The bandit statistics store: Redis (behind a latency budget and a write buffer) when
/// configured, else memory. Must be called inside the runtime.
fn bandit_store(config: &Config) -> anyhow::Result<Arc<dyn BanditStore>> {
    let Some(redis) = redis_store(config)? else {
        let stats = StatsConfig {
            half_life: config.stats_half_life,
            ..StatsConfig::default()
        };
        return Ok(Arc::new(MemoryStore::new(stats)?));
    };
    let resilient = Arc::new(ResilientStore::new(
        Arc::new(redis),
        ResilientConfig {
            timeout: config.redis_timeout,
            write_timeout: config.redis_write_timeout,
            ..ResilientConfig::default()
        },
    ));
    resilient.spawn_maintenance();
    Ok(resilient)
}

/// The bandit statistics in Redis, when `redis_url` is set: a connection of its own.
fn redis_store(config: &Config) -> anyhow::Result<Option<RedisStore>> {
    let Some(url) = &config.redis_url else {
        return Ok(None);
    };
    let stats = StatsConfig {
        half_life: config.stats_half_life,
        ..StatsConfig::default()
    };
    RedisStore::new(RedisConfig {
        url: url.clone(),
        ca_pem: config.redis_ca()?,
        stats,
        ..RedisConfig::default()
    })
    .map(Some)
    .context("configuring the Redis bandit store")
}

/// Starts the online Q-network learner (resuming from its checkpoints) and attaches it;
/// a serve replica instead follows the weights the learner process publishes.
fn attach_learner(engine: &Engine, config: &Config) -> anyhow::Result<()> {
    let mode = match config.learner {
        LearnerMode::Off => return Ok(()),
        LearnerMode::Shadow => QMode::Shadow,
        LearnerMode::Live => QMode::Live,
    };
    let settings = QSettings {
        mode,
        weight: config.q_weight,
        min_updates: config.q_min_updates,
        negatives: config.q_negatives,
    };
    if config.role == Role::Serve {
        anyhow::ensure!(
            engine.follow_learner(settings),
            "a serve replica needs redis_url: it follows the learner's Q-network there"
        );
        tracing::info!(
            ?mode,
            "Q-network: re-scoring with the weights the learner publishes"
        );
        return Ok(());
    }
    let mut learn = LearnConfig::default();
    learn.q.user_dim = encoder::user_width(config)?;
    learn.gamma = config.q_gamma as f32;
    learn.max_busy = config.q_max_busy;
    learn.priority = config.q_priority.into();
    let learner = engine
        .start_learner(learn, config.q_checkpoints().as_deref(), settings)
        .with_context(|| match config.q_checkpoints() {
            Some(dir) => format!(
                "starting the Q-network learner from {} (move it away to start afresh)",
                dir.display()
            ),
            None => "starting the Q-network learner".to_owned(),
        })?;
    let published = learner.current();
    tracing::info!(
        version = published.version,
        updates = published.updates,
        items = learner.items(),
        user_dim = learner.q_config().user_dim,
        ?mode,
        "Q-network learner started"
    );
    Ok(())
}

/// Longest a queue of writes (statistics, shared responses, decision log records) is
/// waited for at shutdown.
const QUEUE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The engine's background work for this process's role: with Redis, a process that may
/// learn applies the statistics stream under the lease, and a serve replica ranks with
/// the encoder the learner publishes.
fn background_settings(config: &Config) -> anyhow::Result<BackgroundSettings> {
    let learn_into = match (config.role, redis_store(config)?) {
        (Role::All | Role::Learn, Some(store)) => Some(Arc::new(store) as Arc<dyn BanditStore>),
        _ => None,
    };
    Ok(BackgroundSettings {
        learn_into,
        follow_encoder: encoder::follow_published(config),
    })
}

/// The listeners [`run`] serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// For the HTTP API.
    pub http: TcpListener,
    /// For the gRPC API.
    pub grpc: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding HTTP to {}", config.http_addr))?;
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC to {}", config.grpc_addr))?;
        Ok(Self { http, grpc })
    }
}

/// Serves HTTP and gRPC until `shutdown` completes, then drains in-flight requests and
/// streams for at most `shutdown_grace` and returns.
pub async fn run(
    app: App,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let http_addr = listeners.http.local_addr()?;
    let grpc_addr = listeners.grpc.local_addr()?;
    metrics::handle();
    if let Some(dir) = app.state_dir() {
        let path = dir.join(ENGINE_STATE);
        if let Some(c) = app
            .engine
            .load_state(&path)
            .await
            .context("resuming the engine state")?
        {
            tracing::info!(
                users = c.users,
                items = c.items,
                events = c.events,
                bandit_arms = c.arms,
                "engine state resumed"
            );
        }
    }
    app.refresh_gauges();

    let log_writer = app
        .engine
        .decision_records()
        .map(|records| decision_log::spawn(records, &app.config))
        .transpose()?;
    let token = app.shutdown.clone();
    let (health, grpc_server) = grpc::server(app.clone())?;
    let http = tokio::spawn(http::serve(app.clone(), listeners.http));
    let grpc = tokio::spawn(grpc::serve(grpc_server, listeners.grpc, token.clone()));
    let upkeep = tokio::spawn(metrics_upkeep(app.engine.clone(), token.clone()));
    let keeper = app
        .state_dir()
        .map(|dir| tokio::spawn(keep_state(app.clone(), dir.to_owned(), token.clone())));
    let background = app
        .engine
        .start_background(background_settings(&app.config)?);

    app.ready.store(true, Ordering::Release);
    health
        .set_serving::<onrec_proto::v1::recommender_server::RecommenderServer<grpc::GrpcApi>>()
        .await;
    tracing::info!(%http_addr, %grpc_addr, "listening");

    shutdown.await;
    app.draining.store(true, Ordering::Release);
    app.ready.store(false, Ordering::Release);
    health
        .set_not_serving::<onrec_proto::v1::recommender_server::RecommenderServer<grpc::GrpcApi>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    if !app.config.drain_delay.is_zero() {
        tracing::info!(delay = ?app.config.drain_delay, "draining: /readyz answers 503 and gRPC health NOT_SERVING while requests are still served");
        tokio::time::sleep(app.config.drain_delay).await;
    }
    tracing::info!(grace = ?app.config.shutdown_grace, "shutting down: the listeners close; finishing requests and streams");
    token.cancel();

    let drained = tokio::time::timeout(app.config.shutdown_grace, async {
        let (h, g) = tokio::join!(http, grpc);
        h.context("HTTP server task")??;
        g.context("gRPC server task")??;
        anyhow::Ok(())
    })
    .await;
    upkeep.abort();
    // Queued statistics and responses are written (bounded), the learner lease is
    // released, and the learners stop after their final checkpoints (failures are
    // logged as they happen).
    let _ = background.shutdown(QUEUE_GRACE).await;
    if let Some(keeper) = keeper {
        // It stops at the cancellation; a save it started completes first.
        let _ = keeper.await;
    }
    if let Some(dir) = app.state_dir() {
        save_state(&app, dir, true).await;
    }
    app.engine.close_decision_log();
    if let Some(log_writer) = log_writer
        && tokio::time::timeout(QUEUE_GRACE, log_writer).await.is_err()
    {
        tracing::warn!("decision log records still queued after 5 s; exiting without them");
    }
    match drained {
        Ok(result) => {
            result?;
            tracing::info!("drained; bye");
        }
        Err(_) => tracing::warn!(
            grace = ?app.config.shutdown_grace,
            "requests still running after the shutdown grace period; stopping anyway"
        ),
    }
    Ok(())
}

/// Writes the engine's state to `dir` (see [`ENGINE_STATE`]), logging the outcome.
async fn save_state(app: &App, dir: &std::path::Path, at_shutdown: bool) {
    match app.engine.save_state(&dir.join(ENGINE_STATE), true).await {
        Ok(c) if at_shutdown => tracing::info!(
            users = c.users,
            items = c.items,
            events = c.events,
            bandit_arms = c.arms,
            "engine state saved"
        ),
        Ok(c) => tracing::debug!(users = c.users, events = c.events, "engine state saved"),
        Err(e) => tracing::error!(error = %e, "saving the engine state failed"),
    }
}

/// Saves the engine's state every `state_interval` until cancelled, so that a process
/// that is killed rather than stopped loses at most that much.
async fn keep_state(app: App, dir: std::path::PathBuf, token: CancellationToken) {
    let period = app
        .config
        .state_interval
        .max(std::time::Duration::from_secs(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while token.run_until_cancelled(tick.tick()).await.is_some() {
        save_state(&app, &dir, false).await;
    }
}

async fn metrics_upkeep(engine: Engine, token: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    let mut starved = Starved::default();
    while token.run_until_cancelled(tick.tick()).await.is_some() {
        metrics::handle().run_upkeep();
        starved.check(&engine);
    }
}

/// What the learners had dropped at the last look, to say in the log when they starve.
#[derive(Default)]
struct Starved {
    transitions: u64,
    interactions: u64,
}

impl Starved {
    /// Warns when a learner dropped work since the last look (it is behind the traffic).
    fn check(&mut self, engine: &Engine) {
        if let Some(learner) = engine.q_learner() {
            let (dropped, taken) = (learner.dropped(), learner.accepted());
            if dropped > self.transitions {
                tracing::warn!(
                    dropped = dropped - self.transitions,
                    taken_total = taken,
                    "the Q-network learner is starved: it dropped transitions it had no time to train on (onrec_learn_transitions_dropped_total)"
                );
            }
            self.transitions = dropped;
        }
        if let Some(online) = engine.online_encoder() {
            let dropped = online.dropped();
            if dropped > self.interactions {
                tracing::warn!(
                    dropped = dropped - self.interactions,
                    "the online encoder is starved: interactions were dropped (onrec_encoder_online_dropped_total)"
                );
            }
            self.interactions = dropped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(args: &[&str]) -> App {
        let config = config::load(args).unwrap();
        let store = MemoryStore::new(StatsConfig::default()).unwrap();
        let explorer = Explorer::new(config.segments_with_default(), Arc::new(store)).unwrap();
        let engine = Engine::new(config.engine(), catalog::demo_catalog(10), explorer).unwrap();
        App::new(engine, config)
    }

    #[tokio::test]
    async fn a_request_waits_a_moment_for_a_place_and_then_is_turned_away() {
        let waits = app(&["--max-concurrent-requests", "1", "--admission-wait", "30s"]);
        let client = Client::default();
        let first = waits
            .admit(Transport::Http, Budget::Requests, client)
            .await
            .unwrap();
        let second = tokio::spawn({
            let waits = waits.clone();
            async move {
                waits
                    .admit(Transport::Http, Budget::Requests, client)
                    .await
                    .map(drop)
            }
        });
        // The second request waits for the place rather than being turned away ...
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        // ... and takes it once the first gives it back.
        drop(first);
        second.await.unwrap().expect("admitted after the wait");

        let at_once = app(&["--max-concurrent-requests", "1", "--admission-wait", "0s"]);
        let _held = at_once
            .admit(Transport::Http, Budget::Requests, client)
            .await
            .unwrap();
        let refused = at_once
            .admit(Transport::Http, Budget::Requests, client)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, ApiError::Overloaded(1, "requests")),
            "{refused}"
        );
        // Streams never wait.
        let streams = app(&["--max-streams", "1", "--admission-wait", "30s"]);
        let _open = streams
            .admit(Transport::Grpc, Budget::Streams, client)
            .await
            .unwrap();
        let refused = streams
            .admit(Transport::Grpc, Budget::Streams, client)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, ApiError::Overloaded(1, "event streams")),
            "{refused}"
        );
    }
}
