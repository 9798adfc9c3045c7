//! The one typed configuration: CLI flags, `ONREC_*` environment, an optional TOML file.
//!
//! Precedence: flag, then environment, then the file, then the built-in default. A TOML key
//! is the flag's name with `_` for `-` (`--http-addr` is `http_addr`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};
use serde::{Deserialize, Serialize};

use onrec_engine::{EngineConfig, EventWeights, ImpressionSource};
use onrec_model::device::DeviceChoice;
use onrec_policy::{PolicyConfig, SegmentConfig};

/// An exploration policy, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Always the ranking.
    Greedy,
    /// Explore each slot with probability ε.
    EpsilonGreedy,
    /// Upper confidence bound.
    Ucb1,
    /// Beta-Bernoulli Thompson sampling.
    Thompson,
}

/// What a process does in a deployment on Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves, and applies the statistics stream while it holds the learner lease.
    All,
    /// Serves only: another process applies the statistics and trains the encoder and
    /// the Q-network, whose published weights this one follows.
    Serve,
    /// Applies the statistics stream and trains the encoder and the Q-network for the
    /// serve replicas while it holds the learner lease (a second learner waits as a
    /// standby); its API answers too, for health, metrics and reports.
    Learn,
}

/// Whether the items a user bought are left out of their recommendations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HidePurchased {
    /// In the categories whose buyers click what they bought less often than the
    /// category's items at all, learned from the traffic.
    Learned,
    /// Always.
    #[value(alias = "true")]
    Always,
    /// Never.
    #[value(alias = "false")]
    Never,
}

impl<'de> Deserialize<'de> for HidePurchased {
    /// `learned`, `always` or `never`; `true` and `false` (TOML booleans or strings) are
    /// `always` and `never`, as the setting was a boolean once.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Flag(bool),
            Name(String),
        }
        match Given::deserialize(d)? {
            Given::Flag(true) => Ok(Self::Always),
            Given::Flag(false) => Ok(Self::Never),
            Given::Name(name) => <Self as clap::ValueEnum>::from_str(&name, true).map_err(|_| {
                serde::de::Error::custom(format!(
                    "hide_purchased: '{name}' is not learned, always or never"
                ))
            }),
        }
    }
}

impl From<HidePurchased> for onrec_engine::HidePurchased {
    fn from(h: HidePurchased) -> Self {
        match h {
            HidePurchased::Learned => Self::Learned,
            HidePurchased::Always => Self::Always,
            HidePurchased::Never => Self::Never,
        }
    }
}

/// Whether and how the online Q-network takes part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LearnerMode {
    /// No Q-network.
    Off,
    /// Learns and is compared with the ranking, never applied.
    Shadow,
    /// Learns and re-ranks.
    Live,
}

/// A training thread's scheduling priority (the online encoder's, the Q-network's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LearnerPriority {
    /// The lowest (Linux's idle scheduling policy): any serving thread that wakes takes
    /// the CPU from it at once; it trains on what is idle.
    Idle,
    /// The process's own: for machines with cores to spare for training.
    Normal,
}

impl From<LearnerPriority> for onrec_learn::Priority {
    fn from(p: LearnerPriority) -> Self {
        match p {
            LearnerPriority::Idle => Self::Idle,
            LearnerPriority::Normal => Self::Normal,
        }
    }
}

/// Where bandit impressions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImpressionsFrom {
    /// Every served slot.
    Served,
    /// Impression events.
    Events,
}

/// Decision log records queued for the writer; beyond it they are dropped and counted.
const DECISION_LOG_QUEUE: usize = 65_536;

/// Where the decision log is written, besides the recent records kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DecisionLogSink {
    /// Nowhere: only the in-memory window (for `POST /v1/ope`).
    None,
    /// JSON lines in `decision_log_path`, rotated at `decision_log_max_bytes`.
    File,
    /// The Redis stream `decision_log_stream` at `redis_url`, capped near
    /// `decision_log_stream_maxlen` entries.
    Redis,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 6h)"))
}

/// Settings of `onrec serve`.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TOML file with any of these settings (keys as the flags, with `_` for `-`)
    #[arg(long, env = "ONREC_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address of the HTTP API, health checks and metrics
    #[arg(long, env = "ONREC_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Address of the gRPC API
    #[arg(long, env = "ONREC_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// JSON-lines catalog, one item per line; without it a built-in demo catalog is used
    #[arg(long, env = "ONREC_CATALOG")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<PathBuf>,

    /// Items in the built-in demo catalog (used when no catalog file is given)
    #[arg(long, env = "ONREC_DEMO_ITEMS", default_value_t = 3000)]
    pub demo_items: usize,

    /// Transformer checkpoint directory written by `onrec train`: it ranks from the start,
    /// and the online encoder (encoder_online) goes on learning from it
    #[arg(long, env = "ONREC_MODEL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,

    /// A sentence-transformers directory (config.json, tokenizer.json, model.safetensors;
    /// scripts/fetch-datasets.sh extracts all-MiniLM-L6-v2): items the encoder knows
    /// nothing of (added later, or missing from the checkpoint) are placed by their text
    /// (title, category, tags, description) through the model's text projection. Needs a
    /// model trained with item text (onrec train --text-model) and encoder_online
    #[arg(long, env = "ONREC_TEXT_MODEL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_model: Option<PathBuf>,

    /// With the demo catalog and no model: hand the online encoder synthetic sessions as
    /// its first events at start (popularity serves until it publishes)
    #[arg(long, env = "ONREC_DEMO_ENCODER", default_value_t = true, action = clap::ArgAction::Set)]
    pub demo_encoder: bool,

    /// Train the encoder on the interactions of accepted events while serving (from the
    /// model's checkpoint, or from nothing without one), and rank with it as it learns
    #[arg(long, env = "ONREC_ENCODER_ONLINE", default_value_t = true, action = clap::ArgAction::Set)]
    pub encoder_online: bool,

    /// Scheduling priority of the online encoder's training thread: idle lets serving
    /// take the CPU first (under load it then trains on fewer interactions), normal
    /// competes with it
    #[arg(long, env = "ONREC_ENCODER_PRIORITY", default_value = "idle")]
    pub encoder_priority: LearnerPriority,

    /// Training effort of the online encoder: sequence visits each interaction buys (how
    /// often, on average, training goes over it)
    #[arg(long, env = "ONREC_ENCODER_REPLAYS", default_value_t = onrec_model::online::DEFAULT_REPLAYS)]
    pub encoder_replays: f64,

    /// Where the encoder runs: cpu, or cuda (falls back to cpu without a GPU)
    #[arg(long, env = "ONREC_DEVICE", default_value = "cpu")]
    pub device: DeviceChoice,

    /// Requests that may wait for the encoder; beyond it recommend gets 429
    #[arg(long, env = "ONREC_ENCODER_QUEUE", default_value_t = 1024)]
    pub encoder_queue: usize,

    /// Most requests the encoder scores in one batch
    #[arg(long, env = "ONREC_ENCODER_MAX_BATCH", default_value_t = 64)]
    pub encoder_max_batch: usize,

    /// Longest the encoder waits for more requests to batch with the first (0 = only
    /// those already queued); no request waits longer
    #[arg(long, env = "ONREC_ENCODER_BATCH_WINDOW", default_value = "0ms", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub encoder_batch_window: Duration,

    /// Largest n a recommend request may ask for
    #[arg(long, env = "ONREC_MAX_N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_n: u32,

    /// Time for an event's weight in item popularity to halve
    #[arg(long, env = "ONREC_HALF_LIFE", default_value = "6h", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub half_life: Duration,

    /// Leave the items a user bought out of their recommendations: learned (in the
    /// categories whose buyers click what they bought less than other items of it),
    /// always (also `true`) or never (also `false`); clicked items may come back
    #[arg(long, env = "ONREC_HIDE_PURCHASED", default_value = "learned")]
    pub hide_purchased: HidePurchased,

    /// Rest an item for a user once it was shown to them this many times among their last
    /// 50 shown slots without a click; 0 never rests items
    #[arg(long, env = "ONREC_REST_AFTER", default_value_t = onrec_engine::DEFAULT_REST_AFTER)]
    pub rest_after: u32,

    /// Weight of each user's taste for categories in the encoder's ranking: the log-ratio
    /// of their click rate in a category (what they clicked among what they were shown,
    /// shrunk toward everyone's rate there) to everyone's; 0 ranks by the encoder alone
    #[arg(long, env = "ONREC_CATEGORY_TASTE", default_value_t = 1.0)]
    pub category_taste: f64,

    /// Items kept per user history
    #[arg(long, env = "ONREC_HISTORY_LEN", default_value_t = 50)]
    pub history_len: usize,

    /// Users whose state is kept in memory; the least recently active go first
    #[arg(long, env = "ONREC_MAX_USERS", default_value_t = 1_000_000)]
    pub max_users: usize,

    /// Event ids remembered to count duplicates once
    #[arg(long, env = "ONREC_DEDUPE_CAPACITY", default_value_t = 1_000_000)]
    pub dedupe_capacity: usize,

    /// Popularity weight of an impression
    #[arg(long, env = "ONREC_WEIGHT_IMPRESSION", default_value_t = 0.0)]
    pub weight_impression: f64,

    /// Popularity weight of a click
    #[arg(long, env = "ONREC_WEIGHT_CLICK", default_value_t = 1.0)]
    pub weight_click: f64,

    /// Popularity weight of an add-to-cart
    #[arg(long, env = "ONREC_WEIGHT_ADD_TO_CART", default_value_t = 2.0)]
    pub weight_add_to_cart: f64,

    /// Popularity weight of a purchase
    #[arg(long, env = "ONREC_WEIGHT_PURCHASE", default_value_t = 3.0)]
    pub weight_purchase: f64,

    /// Popularity weight of a dislike (the item is also hidden from that user)
    #[arg(long, env = "ONREC_WEIGHT_DISLIKE", default_value_t = -1.0, allow_negative_numbers = true)]
    pub weight_dislike: f64,

    /// How far ahead of the server's clock an event timestamp is taken as given; one
    /// further ahead counts as received now
    #[arg(long, env = "ONREC_MAX_FUTURE_SKEW", default_value = "5m", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,

    /// API keys for the write endpoints (events, items), comma-separated; none = open
    #[arg(
        long,
        env = "ONREC_WRITE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub write_api_keys: Vec<String>,

    /// API keys for recommend, comma-separated (write keys work too); none = open
    #[arg(
        long,
        env = "ONREC_READ_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub read_api_keys: Vec<String>,

    /// Largest JSON request body or gRPC message, in bytes
    #[arg(long, env = "ONREC_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,

    /// Largest NDJSON event stream in one request, in bytes
    #[arg(long, env = "ONREC_MAX_STREAM_BYTES", default_value_t = 256 << 20)]
    pub max_stream_bytes: usize,

    /// Largest single event (one NDJSON line), in bytes
    #[arg(long, env = "ONREC_MAX_EVENT_BYTES", default_value_t = 64 << 10)]
    pub max_event_bytes: usize,

    /// Time limit of a unary request, body included
    #[arg(long, env = "ONREC_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,

    /// Longest wait for the next event of an event stream
    #[arg(long, env = "ONREC_STREAM_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,

    /// On SIGTERM or Ctrl-C, how long the server keeps serving while /readyz and gRPC
    /// health say it is draining, so that load balancers stop sending to it first
    #[arg(long, env = "ONREC_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,

    /// On SIGTERM or Ctrl-C, after the drain delay, how long in-flight requests and
    /// streams may take to finish
    #[arg(long, env = "ONREC_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,

    /// Requests served at once; beyond it requests wait up to admission_wait, then get 429
    /// / RESOURCE_EXHAUSTED. A request
    /// takes its place only once its body has arrived, so slow or idle uploads hold none
    #[arg(long, env = "ONREC_MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// Event streams open at once (NDJSON uploads, gRPC RecordEvents and StreamEvents), a
    /// budget apart from max_concurrent_requests; beyond it streams get 429 /
    /// RESOURCE_EXHAUSTED
    #[arg(long, env = "ONREC_MAX_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams: u32,

    /// How long a request waits for one of the max_concurrent_requests places before it
    /// gets 429 (0: none); streams never wait
    #[arg(long, env = "ONREC_ADMISSION_WAIT", default_value = "50ms", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub admission_wait: Duration,

    /// The largest share of each of those two budgets one client may hold at once; past
    /// it that client gets 429 / RESOURCE_EXHAUSTED while others are still served. A
    /// client is the address it connects from, or behind trusted_proxies the address
    /// they forwarded. 1: no per-client limit
    #[arg(long, env = "ONREC_MAX_CLIENT_SHARE", default_value_t = 0.25)]
    pub max_client_share: f64,

    /// Proxies and load balancers (addresses or networks, e.g. 10.0.0.0/8) whose
    /// X-Forwarded-For header names the client; from any other peer the header is
    /// ignored, so a client cannot pass itself off as many
    #[arg(long, env = "ONREC_TRUSTED_PROXIES", value_delimiter = ',')]
    #[serde(default)]
    pub trusted_proxies: Vec<crate::client::IpNet>,

    /// Longest time a client may take to send a request's headers (HTTP/1); a slower
    /// one's connection is closed
    #[arg(long, env = "ONREC_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,

    /// Longest time a request body may take to arrive; a slower one gets 408
    #[arg(long, env = "ONREC_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,

    /// With redis_url: all (serve, and apply the bandit statistics while holding the
    /// learner lease), serve (only serve), or learn (apply the statistics; a second
    /// learner waits as a standby)
    #[arg(long, env = "ONREC_ROLE", value_enum, default_value = "all")]
    pub role: Role,

    /// Redis for the bandit statistics and the shared state, e.g. redis://127.0.0.1:6379/0,
    /// rediss:// for TLS, redis+sentinel://host:port[,host:port]/master[/db] for the
    /// master a set of Sentinels names, or redis+cluster://host:port[,host:port] for a
    /// Redis Cluster; without it everything is kept in memory
    #[arg(long, env = "ONREC_REDIS_URL", hide_env_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,

    /// PEM file of the certificate authorities a rediss:// (TLS) server is verified
    /// against, instead of the system's roots (for a private CA)
    #[arg(long, env = "ONREC_REDIS_CA_FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_ca_file: Option<PathBuf>,

    /// Latency budget of one bandit statistics read; past it the request is served
    /// without exploration
    #[arg(long, env = "ONREC_REDIS_TIMEOUT", default_value = "20ms", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,

    /// Budget of one write of bandit statistics (off the request path); a write past it
    /// is kept and re-sent under its batch id, which Redis applies once
    #[arg(long, env = "ONREC_REDIS_WRITE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub redis_write_timeout: Duration,

    /// Exploration policy of segments without their own: greedy, epsilon_greedy, ucb1 or thompson
    #[arg(long, env = "ONREC_POLICY", default_value = "thompson")]
    pub policy: PolicyKind,

    /// ε of the epsilon_greedy policy: the probability that a slot explores
    #[arg(long, env = "ONREC_EPSILON", default_value_t = 0.1)]
    pub epsilon: f64,

    /// Exploration constant c of the ucb1 policy
    #[arg(long, env = "ONREC_UCB_C", default_value_t = 1.0)]
    pub ucb_c: f64,

    /// Weight of the user's own ranking in ucb1 and thompson against the segment's
    /// statistics, 0..=1 (0: every user of a segment gets the segment's best items)
    #[arg(long, env = "ONREC_PERSONAL", default_value_t = onrec_policy::policy::DEFAULT_PERSONAL)]
    pub personal: f64,

    /// Pseudo-impressions per item that ucb1 and thompson take from the other configured
    /// segments' statistics (empirical-Bayes prior), so a new or small segment starts from
    /// what the others learned; 0 turns it off
    #[arg(long, env = "ONREC_SEGMENT_PRIOR", default_value_t = onrec_policy::explorer::DEFAULT_PRIOR_IMPRESSIONS)]
    pub segment_prior: f64,

    /// Candidates the ranker proposes to the exploration policy per request (at least n)
    #[arg(long, env = "ONREC_CANDIDATES", default_value_t = 50)]
    pub candidates: usize,

    /// Where bandit impressions come from: served (every returned slot) or events
    /// (impression events only)
    #[arg(long, env = "ONREC_IMPRESSIONS_FROM", default_value = "served")]
    pub impressions_from: ImpressionsFrom,

    /// Exploration and learning reward of a click (the immediate reward)
    #[arg(long, env = "ONREC_REWARD_CLICK", default_value_t = 1.0)]
    pub reward_click: f64,

    /// Reward of an add-to-cart (a later reward, discounted by reward_gamma)
    #[arg(long, env = "ONREC_REWARD_ADD_TO_CART", default_value_t = 2.0)]
    pub reward_add_to_cart: f64,

    /// Reward of a purchase (a later reward, discounted by reward_gamma)
    #[arg(long, env = "ONREC_REWARD_PURCHASE", default_value_t = 3.0)]
    pub reward_purchase: f64,

    /// Discount γ of later rewards (add-to-cart, purchase) against the click
    #[arg(long, env = "ONREC_REWARD_GAMMA", default_value_t = 0.9)]
    pub reward_gamma: f64,

    /// Half-life of bandit statistics, so policies follow drift (e.g. 7d); none keeps
    /// them forever
    #[arg(long, env = "ONREC_STATS_HALF_LIFE", value_parser = parse_duration)]
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stats_half_life: Option<Duration>,

    /// How long after a response its feedback is attributed to it
    #[arg(long, env = "ONREC_ATTRIBUTION_WINDOW", default_value = "24h", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub attribution_window: Duration,

    /// Responses remembered for attributing feedback
    #[arg(long, env = "ONREC_IMPRESSION_LOG_CAPACITY", default_value_t = 100_000)]
    pub impression_log_capacity: usize,

    /// Where the decision log (served slates with propensities, attributed rewards) is
    /// written: none (memory only), file or redis
    #[arg(long, env = "ONREC_DECISION_LOG", default_value = "none")]
    pub decision_log: DecisionLogSink,

    /// Decision log file (JSON lines); rotated files get a numbered suffix
    #[arg(
        long,
        env = "ONREC_DECISION_LOG_PATH",
        default_value = "decisions.jsonl"
    )]
    pub decision_log_path: PathBuf,

    /// Size at which the decision log file is rotated
    #[arg(long, env = "ONREC_DECISION_LOG_MAX_BYTES", default_value_t = 100 << 20)]
    pub decision_log_max_bytes: u64,

    /// Rotated decision log files kept; older ones are deleted
    #[arg(long, env = "ONREC_DECISION_LOG_KEEP", default_value_t = 10)]
    pub decision_log_keep: usize,

    /// Redis stream key of the decision log
    #[arg(
        long,
        env = "ONREC_DECISION_LOG_STREAM",
        default_value = "onrec:decisions"
    )]
    pub decision_log_stream: String,

    /// Approximate length cap of the decision log stream (XADD MAXLEN ~)
    #[arg(
        long,
        env = "ONREC_DECISION_LOG_STREAM_MAXLEN",
        default_value_t = 1_000_000
    )]
    pub decision_log_stream_maxlen: u64,

    /// Decision log records kept in memory for POST /v1/ope (0 turns the endpoint's
    /// data off)
    #[arg(long, env = "ONREC_DECISION_LOG_RECENT", default_value_t = 10_000)]
    pub decision_log_recent: usize,

    /// Online Q-network: off, shadow (computed and compared, never applied) or live
    /// (mixed into the ranking once trained q_min_updates steps)
    #[arg(long, env = "ONREC_LEARNER", default_value = "live")]
    pub learner: LearnerMode,

    /// Weight w of Q in the final score (1 − w)·z(ranker) + w·z(Q); 1 ranks by Q alone
    #[arg(long, env = "ONREC_Q_WEIGHT", default_value_t = 0.3)]
    pub q_weight: f64,

    /// Training steps the published Q weights need before live mode applies them
    #[arg(long, env = "ONREC_Q_MIN_UPDATES", default_value_t = 200)]
    pub q_min_updates: u64,

    /// On a response's first feedback, its other slots become reward-0 transitions
    #[arg(long, env = "ONREC_Q_NEGATIVES", default_value_t = true, action = clap::ArgAction::Set)]
    pub q_negatives: bool,

    /// Discount γ of the bootstrapped next-state value in the Q-learning target
    #[arg(long, env = "ONREC_Q_GAMMA", default_value_t = 0.5)]
    pub q_gamma: f64,

    /// Largest share of the time the learner may train (0 < share ≤ 1), leaving the rest
    /// of its core to serving; less training means more dropped transitions
    #[arg(long, env = "ONREC_Q_MAX_BUSY", default_value_t = 1.0)]
    pub q_max_busy: f64,

    /// Scheduling priority of the learner thread: idle lets serving take the CPU first
    /// (under load the learner then drops more transitions), normal competes with it
    #[arg(long, env = "ONREC_Q_PRIORITY", default_value = "idle")]
    pub q_priority: LearnerPriority,

    /// Directory of the Q-network's checkpoints: resumed from at start, written
    /// periodically and on shutdown; none keeps the learned weights in memory only
    #[arg(long, env = "ONREC_LEARNER_DIR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learner_dir: Option<PathBuf>,

    /// Directory for what outlives a restart: the event log (DIR/events.jsonl), the online
    /// encoder (DIR/encoder), unless learner_dir is set the Q-network (DIR/learner), and
    /// the engine's state (DIR/state.json); none keeps them in memory only
    #[arg(long, env = "ONREC_DATA_DIR")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,

    /// How often the engine's state is written to data_dir/state.json besides at shutdown
    #[arg(long, env = "ONREC_STATE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub state_interval: Duration,

    /// Segment rules and per-segment policies (TOML file only: [[segments.rules]] and
    /// [segments.policies.NAME])
    #[arg(skip)]
    #[serde(default)]
    pub segments: SegmentConfig,

    /// Log format
    #[arg(long, env = "ONREC_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `onrec_server=debug,info` (RUST_LOG syntax)
    #[arg(long, env = "ONREC_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

const SECRET_KEYS: [&str; 2] = ["write_api_keys", "read_api_keys"];

impl Config {
    /// Builds the configuration from parsed arguments, reading the TOML file they name.
    pub fn from_matches(matches: &ArgMatches) -> anyhow::Result<Self> {
        let cli = Self::from_arg_matches(matches)?;
        let Some(path) = cli.config.clone() else {
            return cli.validated();
        };
        let file = read_toml(&path)?;
        let mut merged = toml::Table::try_from(&cli).context("serializing the configuration")?;
        for (key, value) in file {
            // `matches` knows only real settings: an unknown key is left for serde to reject.
            let explicit = matches!(
                matches
                    .try_get_raw(&key)
                    .ok()
                    .and_then(|_| matches.value_source(&key)),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if key == "config" {
                bail!(
                    "{}: `config` cannot be set inside a config file",
                    path.display()
                );
            }
            if !explicit {
                merged.insert(key, value);
            }
        }
        let mut config: Self = merged
            .try_into()
            .with_context(|| format!("{}: invalid configuration", path.display()))?;
        config.config = Some(path);
        config.validated()
    }

    /// The certificate authorities of `redis_ca_file`, read; `None` without one.
    pub fn redis_ca(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.redis_ca_file
            .as_ref()
            .map(|path| {
                std::fs::read(path)
                    .with_context(|| format!("reading redis_ca_file {}", path.display()))
            })
            .transpose()
    }

    /// The same settings in `role`, checked again (`onrec learn` is `serve --role learn`).
    pub fn in_role(mut self, role: Role) -> anyhow::Result<Self> {
        self.role = role;
        self.validated()
    }

    fn validated(self) -> anyhow::Result<Self> {
        for (name, value) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_stream_bytes", self.max_stream_bytes),
            ("max_event_bytes", self.max_event_bytes),
            ("history_len", self.history_len),
            ("max_users", self.max_users),
            ("dedupe_capacity", self.dedupe_capacity),
            ("encoder_queue", self.encoder_queue),
            ("encoder_max_batch", self.encoder_max_batch),
            ("candidates", self.candidates),
            ("impression_log_capacity", self.impression_log_capacity),
        ] {
            if value == 0 {
                bail!("{name} must be at least 1");
            }
        }
        for (name, value) in [
            ("weight_impression", self.weight_impression),
            ("weight_click", self.weight_click),
            ("weight_add_to_cart", self.weight_add_to_cart),
            ("weight_purchase", self.weight_purchase),
            ("weight_dislike", self.weight_dislike),
        ] {
            if !value.is_finite() {
                bail!("{name} must be a finite number");
            }
        }
        if !(0.0..=1.0).contains(&self.epsilon) || !(0.0..=1.0).contains(&self.reward_gamma) {
            bail!("epsilon and reward_gamma must be within 0..=1");
        }
        for (name, value) in [
            ("reward_click", self.reward_click),
            ("reward_add_to_cart", self.reward_add_to_cart),
            ("reward_purchase", self.reward_purchase),
            ("category_taste", self.category_taste),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                bail!("{name} must be a finite, non-negative number");
            }
        }
        if self.text_model.is_some() && (self.model.is_none() || !self.encoder_online) {
            bail!(
                "text_model needs model (a checkpoint trained with item text) and encoder_online: the online encoder places new items by their text"
            );
        }
        if self.redis_ca_file.is_some() && self.redis_url.is_none() {
            bail!("redis_ca_file needs redis_url");
        }
        if self.role != Role::All && self.redis_url.is_none() {
            bail!(
                "role = serve or learn needs redis_url: without Redis one process does everything"
            );
        }
        if self.decision_log == DecisionLogSink::Redis && self.redis_url.is_none() {
            bail!("decision_log = redis needs redis_url");
        }
        if self.decision_log_max_bytes == 0 || self.decision_log_stream_maxlen == 0 {
            bail!("decision_log_max_bytes and decision_log_stream_maxlen must be at least 1");
        }
        if self.decision_log_stream.trim().is_empty() {
            bail!("decision_log_stream must not be empty");
        }
        if !(self.encoder_replays.is_finite() && self.encoder_replays > 0.0) {
            bail!("encoder_replays must be a finite number above 0");
        }
        if !(self.q_max_busy > 0.0 && self.q_max_busy <= 1.0) {
            bail!("q_max_busy must be within (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.q_weight) || !(0.0..=1.0).contains(&self.q_gamma) {
            bail!("q_weight and q_gamma must be within 0..=1");
        }
        if !(0.0..=1.0).contains(&self.personal) {
            bail!("personal must be within 0..=1");
        }
        if !(self.ucb_c.is_finite() && self.ucb_c >= 0.0) {
            bail!("ucb_c must be a finite, non-negative number");
        }
        self.segments_with_default()
            .validate()
            .map_err(|e| anyhow::anyhow!("segments.{e}"))?;
        if self.half_life.is_zero() {
            bail!("half_life must be longer than zero");
        }
        if !(self.max_client_share > 0.0 && self.max_client_share <= 1.0) {
            bail!("max_client_share must be within (0, 1]");
        }
        if self.max_n == 0 || self.max_concurrent_requests == 0 {
            bail!("max_n and max_concurrent_requests must be at least 1");
        }
        for (name, keys) in [
            ("write_api_keys", &self.write_api_keys),
            ("read_api_keys", &self.read_api_keys),
        ] {
            if keys.iter().any(|k| k.trim().is_empty()) {
                bail!("{name} must not contain an empty key");
            }
        }
        Ok(self)
    }

    /// Where the Q-network checkpoints: `learner_dir`, else `data_dir/learner`.
    pub fn q_checkpoints(&self) -> Option<PathBuf> {
        self.learner_dir
            .clone()
            .or_else(|| self.data_dir.as_ref().map(|d| d.join("learner")))
    }

    /// The engine's part of the settings.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            max_n: self.max_n,
            half_life: self.half_life,
            hide_purchased: self.hide_purchased.into(),
            rest_after: self.rest_after,
            category_taste: self.category_taste,
            history_len: self.history_len,
            max_users: self.max_users,
            dedupe_capacity: self.dedupe_capacity,
            weights: EventWeights {
                impression: self.weight_impression,
                click: self.weight_click,
                add_to_cart: self.weight_add_to_cart,
                purchase: self.weight_purchase,
                dislike: self.weight_dislike,
            },
            max_future_skew: self.max_future_skew,
            candidates: self.candidates,
            impressions_from: match self.impressions_from {
                ImpressionsFrom::Served => ImpressionSource::Served,
                ImpressionsFrom::Events => ImpressionSource::Events,
            },
            rewards: EventWeights {
                impression: 0.0,
                click: self.reward_click,
                add_to_cart: self.reward_add_to_cart,
                purchase: self.reward_purchase,
                dislike: 0.0,
            },
            reward_gamma: self.reward_gamma,
            attribution_window: self.attribution_window,
            impression_log_capacity: self.impression_log_capacity,
            decision_log_recent: self.decision_log_recent,
            decision_log_queue: match self.decision_log {
                DecisionLogSink::None => 0,
                DecisionLogSink::File | DecisionLogSink::Redis => DECISION_LOG_QUEUE,
            },
        }
    }

    /// The segment configuration, with the `policy` setting as the `default` segment's
    /// policy unless the file gives one.
    pub fn segments_with_default(&self) -> SegmentConfig {
        let mut segments = self.segments.clone();
        segments
            .policies
            .entry(onrec_policy::DEFAULT_SEGMENT.to_owned())
            .or_insert(match self.policy {
                PolicyKind::Greedy => PolicyConfig::Greedy {},
                PolicyKind::EpsilonGreedy => PolicyConfig::epsilon_greedy(self.epsilon),
                PolicyKind::Ucb1 => PolicyConfig::Ucb1 {
                    c: self.ucb_c,
                    personal: self.personal,
                },
                PolicyKind::Thompson => PolicyConfig::Thompson {
                    alpha: 1.0,
                    beta: 1.0,
                    draws: 200,
                    personal: self.personal,
                },
            });
        segments
    }

    /// The effective settings as one line of JSON, API keys replaced by `***`.
    pub fn masked(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            for key in SECRET_KEYS {
                if let Some(serde_json::Value::Array(keys)) = map.get_mut(key) {
                    keys.iter_mut().for_each(|k| *k = "***".into());
                }
            }
            if let Some(path) = &self.config {
                map.insert("config".into(), path.display().to_string().into());
            }
            if let Some(serde_json::Value::String(url)) = map.get_mut("redis_url") {
                *url = mask_url_password(url);
            }
        }
        value.to_string()
    }
}

/// `redis://user:secret@host` becomes `redis://user:***@host`.
fn mask_url_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let auth = &url[scheme + 3..at];
            let user = auth.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn read_toml(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// The configuration that the command-line arguments `args` (after the program's name)
/// give, for tests.
#[cfg(test)]
pub(crate) fn load(args: &[&str]) -> anyhow::Result<Config> {
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    let matches = Cli::command()
        .try_get_matches_from(std::iter::once("onrec").chain(args.iter().copied()))?;
    Config::from_matches(&matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_toml(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("onrec-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_run() {
        let c = load(&[]).unwrap();
        assert_eq!(c.http_addr.port(), 8080);
        assert_eq!(c.grpc_addr.port(), 50051);
        assert_eq!(c.half_life, Duration::from_secs(6 * 3600));
        assert_eq!(c.engine(), EngineConfig::default());
        // Serving first: both training threads take only idle CPU unless told otherwise.
        assert_eq!(c.encoder_priority, LearnerPriority::Idle);
        assert_eq!(c.q_priority, LearnerPriority::Idle);
    }

    #[test]
    fn file_fills_in_and_flags_win() {
        let path = temp_toml(
            "merge",
            "max_n = 7\nhalf_life = \"2h\"\nhttp_addr = \"127.0.0.1:9\"\nwrite_api_keys = [\"k1\"]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n",
        );
        let p = path.to_str().unwrap();
        let c = load(&["--config", p, "--max-n", "9"]).unwrap();
        assert_eq!(c.max_n, 9);
        assert_eq!(c.half_life, Duration::from_secs(7200));
        assert_eq!(c.http_addr, "127.0.0.1:9".parse().unwrap());
        assert_eq!(c.write_api_keys, vec!["k1"]);
        let proxies: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(proxies, ["10.0.0.0/8", "::1/128"]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn hide_purchased_takes_a_mode_or_the_old_boolean() {
        assert_eq!(load(&[]).unwrap().hide_purchased, HidePurchased::Learned);
        for (flag, mode) in [
            ("never", HidePurchased::Never),
            ("false", HidePurchased::Never),
            ("true", HidePurchased::Always),
        ] {
            assert_eq!(
                load(&["--hide-purchased", flag]).unwrap().hide_purchased,
                mode
            );
        }
        for (text, mode) in [
            ("hide_purchased = true\n", HidePurchased::Always),
            ("hide_purchased = false\n", HidePurchased::Never),
            ("hide_purchased = \"learned\"\n", HidePurchased::Learned),
        ] {
            let path = temp_toml("hide", text);
            let c = load(&["--config", path.to_str().unwrap()]).unwrap();
            assert_eq!(c.hide_purchased, mode, "{text}");
            std::fs::remove_file(path).unwrap();
        }
        let path = temp_toml("hide-bad", "hide_purchased = \"sometimes\"\n");
        let err = format!(
            "{:#}",
            load(&["--config", path.to_str().unwrap()]).unwrap_err()
        );
        assert!(
            err.contains("'sometimes' is not learned, always or never"),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unknown_or_bad_file_keys_are_errors() {
        let path = temp_toml("unknown", "max_nn = 7\n");
        let err = format!(
            "{:#}",
            load(&["--config", path.to_str().unwrap()]).unwrap_err()
        );
        assert!(err.contains("unknown field `max_nn`"), "{err}");
        let path = temp_toml("bad", "half_life = \"soon\"\n");
        let err = format!(
            "{:#}",
            load(&["--config", path.to_str().unwrap()]).unwrap_err()
        );
        assert!(err.contains("half_life"), "{err}");
    }

    #[test]
    fn bad_flags_are_errors() {
        assert!(load(&["--max-n", "0"]).is_err());
        assert!(load(&["--half-life", "0s"]).is_err());
        assert!(load(&["--write-api-keys", "a,,b"]).is_err());
        assert!(load(&["--max-client-share", "0"]).is_err());
        assert!(load(&["--max-client-share", "1.5"]).is_err());
        let err = load(&["--trusted-proxies", "10.0.0.0/8,lb"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("'lb' is not an IP address"), "{err}");
        for args in [
            &["--text-model", "minilm"][..],
            &[
                "--text-model",
                "minilm",
                "--model",
                "m",
                "--encoder-online",
                "false",
            ],
        ] {
            let err = load(args).unwrap_err().to_string();
            assert!(err.contains("text_model needs model"), "{err}");
        }
    }

    #[test]
    fn masked_config_hides_keys() {
        let c = load(&[
            "--write-api-keys",
            "s3cret,other",
            "--read-api-keys",
            "r34d",
        ])
        .unwrap();
        assert_eq!(c.write_api_keys.len(), 2);
        let shown = c.masked();
        assert!(
            !shown.contains("s3cret") && !shown.contains("r34d"),
            "{shown}"
        );
        assert!(
            shown.contains("\"write_api_keys\":[\"***\",\"***\"]"),
            "{shown}"
        );
        let c = load(&["--redis-url", "redis://app:hunter2@cache:6379/0"]).unwrap();
        assert!(
            c.masked().contains("redis://app:***@cache:6379/0"),
            "{}",
            c.masked()
        );
        assert_eq!(
            mask_url_password("redis://cache:6379"),
            "redis://cache:6379"
        );
    }

    #[test]
    fn segments_come_from_the_file_and_the_policy_flag_fills_default() {
        let path = temp_toml(
            "segments",
            "[[segments.rules]]\nname = \"mobile\"\ndevice = \"mobile\"\n\
             [segments.policies.mobile]\nkind = \"ucb1\"\nc = 2.0\n",
        );
        let c = load(&["--config", path.to_str().unwrap(), "--policy", "greedy"]).unwrap();
        let s = c.segments_with_default();
        assert_eq!(s.policy_for("mobile"), &PolicyConfig::ucb1(2.0));
        assert_eq!(s.policy_for("default"), &PolicyConfig::Greedy {});
        let path = temp_toml(
            "bad-segments",
            "[segments.policies.default]\nkind = \"epsilon_greedy\"\nepsilon = 3.0\n",
        );
        let err = format!(
            "{:#}",
            load(&["--config", path.to_str().unwrap()]).unwrap_err()
        );
        assert!(err.contains("epsilon"), "{err}");
        let err = format!("{:#}", load(&["--epsilon", "1.5"]).unwrap_err());
        assert!(err.contains("epsilon"), "{err}");
    }
}
