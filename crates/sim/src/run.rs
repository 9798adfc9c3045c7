//! Running policies in a world through the real engine: per round, a user and a moment
//! are drawn, the engine recommends, the world responds, and the engine records the
//! events, as the HTTP and gRPC adapters would have it do.
//!
//! Each policy gets a fresh engine over the world's catalog with an in-memory bandit
//! store, its statistics written by the engine's background work
//! ([`Engine::start_background`]) on a current-thread tokio runtime (the loop yields after
//! every round so the writer keeps up). The service as shipped (`onrec`) comes from a factory the caller gives
//! ([`Simulation::with_service`]).
//!
//! A run in process replays exactly for a seed ([`Engine::make_deterministic`]): the
//! world, the traffic and the outcome draws come from the world's seed, so every policy
//! meets the same users in the same moments; the engine's request ids, and with them its
//! tie-breaks and exploration draws, come from it too; its clock advances [`ROUND_MS`]
//! per round; and its online encoder and Q-network learner train only every
//! [`SETTLE_EVERY`] rounds, on everything they were sent, as they would keep up with a
//! shop's traffic. Driven over HTTP (`--url`), the servers keep their own clocks, ids and
//! threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use onrec_engine::background::BackgroundSettings;
use onrec_engine::decisions::LogRecord;
use onrec_engine::learning::{QMode, QSettings};
use onrec_engine::{
    Engine, EngineConfig, Event, EventOutcome, EventType, ImpressionSource, RANKER_ENCODER,
    RecommendRequest,
};
use onrec_learn::{LearnConfig, Learner, Priority};
use onrec_policy::segment::OneOrMany;
use onrec_policy::{Explorer, MemoryStore, SegmentConfig, SegmentRule, StatsConfig};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::SimError;
use crate::bayes::LearningOracle;
use crate::encoder::{EncoderSettings, TrainedEncoder};
use crate::http::HttpShop;
use crate::spec::{PolicyParams, PolicySpec, Ranker};
use crate::world::{DEVICES, LogitTerms, Oracle, Rewards, World};

/// Decision log records queued between the engine and a sink; drained every round.
const LOG_QUEUE: usize = 4096;

/// Rounds between waits for the online encoder and the Q-network learner to catch up.
pub const SETTLE_EVERY: usize = 50;

/// Milliseconds the engine's clock advances per round: about the pace of a run on two
/// cores, so the popularity half-life hardly acts in it.
pub const ROUND_MS: i64 = 2;

/// The stream of the engine's request ids, from the world's seed.
const STREAM_ENGINE: u64 = 0x00e4_9100;

/// The first visit number of each bucket of [`Summary::ctr_by_visit`]: a user's 1st
/// visit, 2nd–3rd, 4th–7th, 8th–15th, 16th on.
pub const VISIT_BUCKETS: [u32; 5] = [0, 1, 3, 7, 15];

/// The bucket of [`VISIT_BUCKETS`] of a user's `earlier` requests.
fn visit_bucket(earlier: u32) -> usize {
    VISIT_BUCKETS
        .iter()
        .rposition(|&b| earlier >= b)
        .unwrap_or(0)
}

/// Longest wait for the online encoder or the learner to catch up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Builds the service as shipped over a catalog; with `true`, one whose decision log
/// records can be taken ([`Engine::decision_records`]).
pub type ServiceFactory = dyn Fn(Vec<onrec_engine::Item>, bool) -> Result<Engine, SimError>;

/// How the Q-network takes part in `+q` policies (live mode always).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QParams {
    /// Weight w of Q in the mixed score (1 − w)·z(ranker) + w·z(Q).
    pub weight: f64,
    /// Training steps before the weights are applied.
    pub min_updates: u64,
    /// Whether the other slots of a response with feedback become reward-0 transitions.
    pub negatives: bool,
}

impl Default for QParams {
    /// The server's defaults.
    fn default() -> Self {
        Self {
            weight: 0.3,
            min_updates: 200,
            negatives: true,
        }
    }
}

/// How to run policies: rounds, slate size, the engine's settings, segments and the
/// policies' parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Rounds (requests) per policy.
    pub rounds: usize,
    /// Items per slate.
    pub n: u32,
    /// The engine's settings (rewards, candidates, popularity weights, seen items …).
    pub engine: EngineConfig,
    /// Segment rules; the policy under test serves every segment.
    pub segment_rules: Vec<SegmentRule>,
    /// Parameters of the bandit policies.
    pub params: PolicyParams,
    /// How `+q` policies use the Q-network.
    pub q: QParams,
    /// How the encoder of `encoder*` policies is trained.
    pub encoder: EncoderSettings,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            rounds: 100_000,
            n: 10,
            engine: EngineConfig {
                // Nothing reads the in-memory window during a run; a sink gets every record.
                decision_log_recent: 0,
                ..EngineConfig::default()
            },
            segment_rules: device_segments(),
            params: PolicyParams::default(),
            q: QParams::default(),
            encoder: EncoderSettings::default(),
        }
    }
}

/// One segment per device class, so that the bandits can learn what each device favours.
pub fn device_segments() -> Vec<SegmentRule> {
    DEVICES
        .iter()
        .map(|&(device, _)| SegmentRule {
            name: device.to_owned(),
            device: Some(OneOrMany::One(device.to_owned())),
            country: None,
            page: None,
            hours: None,
            returning: None,
        })
        .collect()
}

impl SimConfig {
    /// The same settings with a ranker that never moves: popularity weights all 0 (the
    /// ranking stays the catalog's prior popularity) and seen items not excluded, so every
    /// request chooses from the same candidates and the bandits face a stationary problem.
    pub fn stationary(mut self) -> Self {
        self.engine.weights = onrec_engine::EventWeights {
            impression: 0.0,
            click: 0.0,
            add_to_cart: 0.0,
            purchase: 0.0,
            dislike: 0.0,
        };
        self.engine.hide_purchased = onrec_engine::HidePurchased::Never;
        self.engine.rest_after = 0;
        self
    }

    /// Checks the settings against `world`; the error names the first bad one.
    pub fn validate(&self, world: &World) -> Result<(), SimError> {
        if self.rounds == 0 {
            return Err(SimError::config("rounds", "must be at least 1"));
        }
        if self.n == 0 || self.n > self.engine.max_n {
            return Err(SimError::config(
                "n",
                format!("is {}; must be 1..={}", self.n, self.engine.max_n),
            ));
        }
        if self.n as usize > world.num_items() {
            return Err(SimError::config(
                "n",
                format!(
                    "is {}; the world has only {} items",
                    self.n,
                    world.num_items()
                ),
            ));
        }
        if self.engine.candidates == 0 {
            return Err(SimError::config("candidates", "must be at least 1"));
        }
        let p = &self.params;
        if !(0.0..=1.0).contains(&p.epsilon) {
            return Err(SimError::config(
                "epsilon",
                format!("is {}; must be 0..=1", p.epsilon),
            ));
        }
        if !(p.ucb_c.is_finite() && p.ucb_c >= 0.0) {
            return Err(SimError::config(
                "ucb_c",
                format!("is {}; must be a finite number >= 0", p.ucb_c),
            ));
        }
        if !(0.0..=1.0).contains(&p.personal) {
            return Err(SimError::config(
                "personal",
                format!("is {}; must be 0..=1", p.personal),
            ));
        }
        if !(p.segment_prior.is_finite() && p.segment_prior >= 0.0) {
            return Err(SimError::config(
                "segment_prior",
                format!("is {}; must be a finite number >= 0", p.segment_prior),
            ));
        }
        if !(1..=onrec_policy::policy::MAX_DRAWS).contains(&p.thompson_draws) {
            return Err(SimError::config(
                "thompson_draws",
                format!(
                    "is {}; must be 1..={}",
                    p.thompson_draws,
                    onrec_policy::policy::MAX_DRAWS
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.q.weight) {
            return Err(SimError::config(
                "q_weight",
                format!("is {}; must be 0..=1", self.q.weight),
            ));
        }
        self.encoder.validate()
    }
}

/// A run's totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The policy.
    pub policy: String,
    /// Rounds run.
    pub rounds: usize,
    /// Items served over all rounds.
    pub impressions: u64,
    /// Clicks.
    pub clicks: u64,
    /// Clicks per impression.
    pub ctr: f64,
    /// Realised reward (clicks and the discounted funnel).
    pub reward: f64,
    /// Realised reward per impression.
    pub reward_per_impression: f64,
    /// Realised reward per round.
    pub reward_per_round: f64,
    /// Expected reward of the served slates per round.
    pub expected_reward_per_round: f64,
    /// Expected reward of the oracle's slates per round.
    pub oracle_reward_per_round: f64,
    /// Sum over rounds of the oracle's expected reward minus the served slate's.
    pub cumulative_regret: f64,
    /// Mean regret per round over the last 10% of rounds.
    pub final_regret_per_round: f64,
    /// Rounds the encoder ranked (the others fell back to popularity).
    pub encoder_rounds: u64,
    /// Rounds the Q-network re-ranked.
    pub q_rounds: u64,
    /// Share of served slots in the user's preferred category.
    pub preferred_share: f64,
    /// CTR in each tenth of the run, in order.
    pub ctr_by_tenth: Vec<f64>,
    /// CTR by the user's visit: the rounds where the user had had as many earlier
    /// requests in the run as each bucket of [`VISIT_BUCKETS`] spans.
    pub ctr_by_visit: Vec<f64>,
    /// Share of served slots in the user's preferred category, by the same buckets.
    pub preferred_by_visit: Vec<f64>,
    /// Impressions served in each bucket of [`VISIT_BUCKETS`].
    pub impressions_by_visit: Vec<u64>,
    /// The terms of the click logit of the served slots, per slot, over the second half
    /// of the run: which of the truth's parts (the items' appeal, the users' category
    /// tastes, their latent affinities, the moment) the policy had learned to serve.
    pub logit_terms: LogitTerms,
    /// Snapshots the online encoder published, when one trained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_versions: Option<u64>,
    /// The Q-network learner's counts, for `+q` policies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learner: Option<LearnerCounts>,
    /// Wall-clock seconds of the run (without training the encoder).
    pub wall_seconds: f64,
}

/// What the Q-network learner did in a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LearnerCounts {
    /// Transitions it took.
    pub accepted: u64,
    /// Transitions dropped because it was behind.
    pub dropped: u64,
    /// Training steps in its last published weights.
    pub updates: u64,
}

/// One policy's run: its totals and its per-round series.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRun {
    /// Totals.
    pub summary: Summary,
    /// Expected reward of the served slate, per round.
    pub expected: Vec<f64>,
    /// Expected reward of the oracle's slate, per round.
    pub oracle: Vec<f64>,
    /// Realised reward, per round.
    pub realised: Vec<f64>,
}

impl PolicyRun {
    /// Regret per round: the oracle's expected reward minus the served slate's.
    pub fn regret(&self) -> Vec<f64> {
        self.oracle
            .iter()
            .zip(&self.expected)
            .map(|(o, e)| o - e)
            .collect()
    }

    /// Cumulative regret after each round.
    pub fn cumulative_regret(&self) -> Vec<f64> {
        let mut total = 0.0;
        self.regret()
            .into_iter()
            .map(|r| {
                total += r;
                total
            })
            .collect()
    }
}

/// Where a run's decision log records go, in order.
pub type DecisionSink<'a> = dyn FnMut(LogRecord) -> Result<(), SimError> + 'a;

/// A world, the settings to run policies in it, and the encoder once trained.
pub struct Simulation {
    world: World,
    config: SimConfig,
    encoder: Option<TrainedEncoder>,
    service: Option<Box<ServiceFactory>>,
    http: Option<HttpShop>,
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("world", &self.world.config())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Simulation {
    /// A simulation of `world` under `config`, which is validated.
    pub fn new(world: World, config: SimConfig) -> Result<Self, SimError> {
        config.validate(&world)?;
        SegmentConfig {
            rules: config.segment_rules.clone(),
            ..SegmentConfig::default()
        }
        .validate()?;
        Ok(Self {
            world,
            config,
            encoder: None,
            service: None,
            http: None,
        })
    }

    /// Runs the `onrec` policy against running servers over HTTP instead (see
    /// [`HttpShop`]): they must serve the world's catalog (write it with
    /// [`World::catalog`]), and nothing waits for their learners.
    pub fn with_http(mut self, shop: HttpShop) -> Self {
        self.http = Some(shop);
        self
    }

    /// Runs the `onrec` policy on engines `factory` builds over the world's catalog: the
    /// service as shipped.
    pub fn with_service(mut self, factory: Box<ServiceFactory>) -> Self {
        self.service = Some(factory);
        self
    }

    /// The world.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The settings.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The encoder of `encoder*` policies, trained on first use.
    pub fn encoder(&mut self) -> Result<&TrainedEncoder, SimError> {
        if self.encoder.is_none() {
            self.encoder = Some(TrainedEncoder::train(&self.world, &self.config.encoder)?);
        }
        self.encoder
            .as_ref()
            .ok_or_else(|| SimError::config("encoder", "was not trained"))
    }

    /// Runs every policy in order, without decision logs.
    pub fn run_all(&mut self, specs: &[PolicySpec]) -> Result<Vec<PolicyRun>, SimError> {
        specs.iter().map(|spec| self.run(spec, None)).collect()
    }

    /// Runs one policy for the configured rounds; its decision log records go to `sink`
    /// when given.
    pub fn run(
        &mut self,
        spec: &PolicySpec,
        sink: Option<&mut DecisionSink<'_>>,
    ) -> Result<PolicyRun, SimError> {
        if spec.ranker == Ranker::Encoder {
            self.encoder()?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let started = Instant::now();
        if let (Ranker::Service, Some(shop)) = (spec.ranker, &self.http) {
            let mut run = runtime.block_on(self.drive(Target::Http(shop), spec, None))?;
            run.summary.wall_seconds = started.elapsed().as_secs_f64();
            return Ok(run);
        }
        let (engine, learner) = self.engine(spec, sink.is_some())?;
        engine.make_deterministic(self.world.config().seed ^ STREAM_ENGINE);
        let background = {
            let _runtime = runtime.enter();
            engine.start_background(BackgroundSettings::default())
        };
        let result = runtime.block_on(self.drive(Target::Engine(&engine), spec, sink));
        let encoder_versions = engine.online_encoder().map(|o| o.published());
        let learner_counts = learner
            .or_else(|| engine.q_learner())
            .map(|l| LearnerCounts {
                accepted: l.accepted(),
                dropped: l.dropped(),
                updates: l.current().updates,
            });
        // The statistics queue drains, then the learners stop.
        runtime.block_on(background.shutdown(Duration::from_secs(60)))?;
        let mut run = result?;
        run.summary.learner = learner_counts;
        run.summary.encoder_versions = encoder_versions;
        run.summary.wall_seconds = started.elapsed().as_secs_f64();
        Ok(run)
    }

    /// A fresh engine for `spec`, with its encoder and learner attached.
    fn engine(
        &self,
        spec: &PolicySpec,
        logging: bool,
    ) -> Result<(Engine, Option<Arc<Learner>>), SimError> {
        if spec.ranker == Ranker::Service {
            let factory = self.service.as_ref().ok_or_else(|| {
                SimError::config("policies", "'onrec' needs the service (with_service)")
            })?;
            return Ok((factory(self.world.catalog(), logging)?, None));
        }
        let mut segments = SegmentConfig {
            rules: self.config.segment_rules.clone(),
            ..SegmentConfig::default()
        };
        segments.policies.insert(
            onrec_policy::DEFAULT_SEGMENT.to_owned(),
            spec.policy_config(&self.config.params),
        );
        let store = Arc::new(MemoryStore::new(StatsConfig::default())?);
        let explorer =
            Explorer::new(segments, store)?.with_prior(self.config.params.segment_prior)?;
        let mut engine_config = self.config.engine.clone();
        if logging {
            engine_config.decision_log_queue = engine_config.decision_log_queue.max(LOG_QUEUE);
        }
        let engine = Engine::new(engine_config, self.world.catalog(), explorer)?;
        // No serving latency to protect here: the learner competes for the CPU as an equal.
        let mut learn = LearnConfig {
            priority: Priority::Normal,
            ..LearnConfig::default()
        };
        if spec.ranker == Ranker::Encoder {
            let trained = self
                .encoder
                .as_ref()
                .ok_or_else(|| SimError::config("encoder", "was not trained"))?;
            let encoder = trained.start()?;
            learn.q.user_dim = encoder.width();
            engine.attach_encoder(encoder, trained.items(), "sasrec-sim".to_owned());
        }
        let learner = if spec.q_network {
            Some(engine.start_learner(
                learn,
                None,
                QSettings {
                    mode: QMode::Live,
                    weight: self.config.q.weight,
                    min_updates: self.config.q.min_updates,
                    negatives: self.config.q.negatives,
                },
            )?)
        } else {
            None
        };
        Ok((engine, learner))
    }

    /// The rounds of one run.
    async fn drive(
        &self,
        target: Target<'_>,
        spec: &PolicySpec,
        mut sink: Option<&mut DecisionSink<'_>>,
    ) -> Result<PolicyRun, SimError> {
        let engine = match target {
            Target::Engine(engine) => Some(engine),
            Target::Http(_) => None,
        };
        let mut log = match (sink.as_ref(), engine) {
            (Some(_), Some(engine)) => engine.decision_records(),
            _ => None,
        };
        let world = &self.world;
        let config = &self.config;
        let n = config.n as usize;
        let mut oracle = Oracle::new(world, Rewards::of(&config.engine), n);
        let mut learning = (spec.ranker == Ranker::OracleLearning)
            .then(|| LearningOracle::new(world, Rewards::of(&config.engine), n));
        let mut outcomes = world.outcomes();
        let nothing_hidden = vec![false; world.num_items()];
        // The uniform policy's draws, the same for every run of this world.
        let mut uniform = rand::rngs::SmallRng::seed_from_u64(world.config().seed ^ 0x0001_f0a1);
        let mut run = PolicyRun {
            summary: Summary {
                policy: spec.name.clone(),
                rounds: config.rounds,
                impressions: 0,
                clicks: 0,
                ctr: 0.0,
                reward: 0.0,
                reward_per_impression: 0.0,
                reward_per_round: 0.0,
                expected_reward_per_round: 0.0,
                oracle_reward_per_round: 0.0,
                cumulative_regret: 0.0,
                final_regret_per_round: 0.0,
                encoder_rounds: 0,
                q_rounds: 0,
                preferred_share: 0.0,
                ctr_by_tenth: Vec::new(),
                ctr_by_visit: Vec::new(),
                preferred_by_visit: Vec::new(),
                impressions_by_visit: Vec::new(),
                logit_terms: LogitTerms::default(),
                encoder_versions: None,
                learner: None,
                wall_seconds: 0.0,
            },
            expected: Vec::with_capacity(config.rounds),
            oracle: Vec::with_capacity(config.rounds),
            realised: Vec::with_capacity(config.rounds),
        };
        let tenth = config.rounds.div_ceil(10);
        let (mut tenth_clicks, mut tenth_impressions) = (0u64, 0u64);
        let mut preferred = 0u64;
        // Summed logit terms of the slots served in the second half, and their count.
        let (mut terms, mut terms_slots) = (LogitTerms::default(), 0u64);
        let mut visits: std::collections::HashMap<usize, u32> = std::collections::HashMap::new();
        // [clicks, impressions, slots in the preferred category] by visit bucket.
        let mut by_visit = [[0u64; 3]; VISIT_BUCKETS.len()];
        for (round, (u, moment)) in world.traffic().take(config.rounds).enumerate() {
            if let Some(engine) = engine {
                if round > 0 && round % SETTLE_EVERY == 0 && !engine.settle(SETTLE_TIMEOUT) {
                    return Err(SimError::config(
                        "learners",
                        format!(
                            "the online encoder or the learner did not catch up within {SETTLE_TIMEOUT:?}"
                        ),
                    ));
                }
                engine.advance(ROUND_MS);
            }
            let user_id = World::user_id(u);
            // The oracle's slate is the best the truth allows, whatever the engine hides.
            let (best, best_slate) = oracle.best(u, moment, &nothing_hidden, n);
            let (slate, request_id) = if spec.ranker == Ranker::Oracle {
                (best_slate, None)
            } else if spec.ranker == Ranker::OracleAverage {
                (oracle.best_for_anyone(moment, n), None)
            } else if let Some(learning) = learning.as_mut() {
                (learning.best(u, moment, oracle.owned(u), n), None)
            } else if spec.ranker == Ranker::Uniform {
                let mut slate = Vec::with_capacity(n);
                while slate.len() < n.min(world.num_items()) {
                    let i = uniform.random_range(0..world.num_items() as u32);
                    if !slate.contains(&i) {
                        slate.push(i);
                    }
                }
                (slate, None)
            } else {
                let mut request = RecommendRequest::new(user_id.clone(), config.n);
                request.context = Some(moment.context());
                let served = target.recommend(&request).await?;
                let slate: Vec<u32> = served
                    .items
                    .iter()
                    .map(|item| {
                        world.item_index(&item.item_id).ok_or_else(|| {
                            SimError::config("catalog", format!("unknown item {}", item.item_id))
                        })
                    })
                    .collect::<Result<_, _>>()?;
                if served.ranker == RANKER_ENCODER {
                    run.summary.encoder_rounds += 1;
                }
                if served.model_version.contains("+q") {
                    run.summary.q_rounds += 1;
                }
                (slate, Some(served.request_id))
            };
            if round >= config.rounds / 2 {
                for &i in &slate {
                    terms.add(&world.logit_terms(u, i, moment));
                }
                terms_slots += slate.len() as u64;
            }
            let liked = world.preferred_category(u);
            let liked_slots = slate
                .iter()
                .filter(|&&i| world.category_index(i) == liked)
                .count() as u64;
            preferred += liked_slots;
            let expected = oracle.slate_value(u, moment, &slate);
            // What the user owned before this response is what their response is judged by.
            let owned_before = learning.as_ref().map(|_| oracle.owned(u).to_vec());
            let response = oracle.respond(u, moment, &slate, outcomes.next_round(n));
            if let (Some(learning), Some(owned)) = (learning.as_mut(), owned_before) {
                learning.observe(u, moment, &slate, &owned, &response);
            }
            let event = |slot: usize, item: u32, kind: EventType| Event {
                event_id: format!("{round}-{slot}-{}", kind.as_str()),
                user_id: user_id.clone(),
                item_id: world.item_id(item).to_owned(),
                kind,
                request_id: request_id.clone(),
                value: None,
                timestamp: None,
            };
            let mut events: Vec<Event> = Vec::with_capacity(response.actions.len() + n);
            if config.engine.impressions_from == ImpressionSource::Events {
                events.extend(
                    slate
                        .iter()
                        .enumerate()
                        .map(|(slot, &i)| event(slot, i, EventType::Impression)),
                );
            }
            events.extend(
                response
                    .actions
                    .iter()
                    .map(|a| event(a.slot, a.item, a.kind)),
            );
            let events = if matches!(
                spec.ranker,
                Ranker::Oracle | Ranker::OracleAverage | Ranker::OracleLearning | Ranker::Uniform
            ) {
                Vec::new()
            } else {
                events
            };
            target.record(&events).await?;
            run.summary.impressions += slate.len() as u64;
            run.summary.clicks += response.clicks;
            tenth_impressions += slate.len() as u64;
            tenth_clicks += response.clicks;
            let earlier = visits.entry(u).or_insert(0);
            let bucket = &mut by_visit[visit_bucket(*earlier)];
            *earlier += 1;
            bucket[0] += response.clicks;
            bucket[1] += slate.len() as u64;
            bucket[2] += liked_slots;
            if (round + 1) % tenth == 0 || round + 1 == config.rounds {
                run.summary.ctr_by_tenth.push(if tenth_impressions > 0 {
                    tenth_clicks as f64 / tenth_impressions as f64
                } else {
                    0.0
                });
                (tenth_clicks, tenth_impressions) = (0, 0);
            }
            run.summary.reward += response.reward;
            run.expected.push(expected);
            run.oracle.push(best);
            run.realised.push(response.reward);
            if let (Some(rx), Some(sink)) = (log.as_mut(), sink.as_deref_mut()) {
                while let Ok(record) = rx.try_recv() {
                    sink(record)?;
                }
            }
            tokio::task::yield_now().await;
        }
        if let Some(engine) = engine {
            engine.close_decision_log();
        }
        if let (Some(rx), Some(sink)) = (log.as_mut(), sink) {
            while let Some(record) = rx.recv().await {
                sink(record)?;
            }
        }
        let share = |part: u64, of: u64| if of > 0 { part as f64 / of as f64 } else { 0.0 };
        run.summary.ctr_by_visit = by_visit
            .iter()
            .map(|&[clicks, impressions, _]| share(clicks, impressions))
            .collect();
        run.summary.preferred_by_visit = by_visit
            .iter()
            .map(|&[_, impressions, liked]| share(liked, impressions))
            .collect();
        run.summary.impressions_by_visit = by_visit.iter().map(|&[_, i, _]| i).collect();
        run.summary.preferred_share = share(preferred, run.summary.impressions);
        run.summary.logit_terms = terms.scaled(1.0 / terms_slots.max(1) as f64);
        finish(&mut run.summary, &run.expected, &run.oracle);
        Ok(run)
    }
}

/// What a run serves from: an engine in process, or running servers over HTTP.
#[derive(Clone, Copy)]
enum Target<'a> {
    Engine(&'a Engine),
    Http(&'a HttpShop),
}

impl Target<'_> {
    async fn recommend(
        self,
        request: &RecommendRequest,
    ) -> Result<onrec_engine::Recommendation, SimError> {
        match self {
            Target::Engine(engine) => Ok(engine.recommend(request).await?),
            Target::Http(shop) => shop.recommend(request).await,
        }
    }

    /// Records a round's events; every one must be accepted.
    async fn record(self, events: &[Event]) -> Result<(), SimError> {
        match self {
            Target::Engine(engine) => {
                for e in events {
                    match engine.record(e).await? {
                        EventOutcome::Accepted => {}
                        other => {
                            return Err(SimError::EventRejected {
                                event_id: e.event_id.clone(),
                                outcome: other
                                    .error(&e.item_id)
                                    .unwrap_or_else(|| other.as_str().to_owned()),
                            });
                        }
                    }
                }
                Ok(())
            }
            Target::Http(shop) => shop.record(events).await,
        }
    }
}

/// Fills in the ratios and regrets of a summary from its counts and series.
fn finish(s: &mut Summary, expected: &[f64], oracle: &[f64]) {
    let rounds = expected.len().max(1) as f64;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    s.ctr = ratio(s.clicks as f64, s.impressions as f64);
    s.reward_per_impression = ratio(s.reward, s.impressions as f64);
    s.reward_per_round = s.reward / rounds;
    s.expected_reward_per_round = expected.iter().sum::<f64>() / rounds;
    s.oracle_reward_per_round = oracle.iter().sum::<f64>() / rounds;
    let regret: Vec<f64> = oracle.iter().zip(expected).map(|(o, e)| o - e).collect();
    s.cumulative_regret = regret.iter().sum();
    let tail = (regret.len() / 10).max(1).min(regret.len());
    s.final_regret_per_round = ratio(
        regret[regret.len() - tail..].iter().sum::<f64>(),
        tail as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visits_fall_into_their_buckets() {
        let buckets: Vec<usize> = [0, 1, 2, 3, 6, 7, 14, 15, 1000]
            .into_iter()
            .map(visit_bucket)
            .collect();
        assert_eq!(buckets, [0, 1, 1, 2, 2, 3, 3, 4, 4]);
    }
}
