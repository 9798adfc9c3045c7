//! onrec's closed-loop simulator: a synthetic shop whose truth is known, driving the real
//! engine in process, to compare exploration policies by CTR, reward and regret.
//!
//! A [`World`] (items, users with latent tastes, context effects, position bias, a
//! purchase funnel; see [`world`]) is fixed by its seed. A [`Simulation`] runs each
//! [`PolicySpec`] against a fresh [`onrec_engine::Engine`] for a number of rounds: the
//! engine recommends, the world responds, the engine records the events. The world's
//! [`Oracle`] knows the expected reward of every slate, so each round's regret is exact
//! in expectation.
//!
//! ```no_run
//! use onrec_sim::{SimConfig, Simulation, World, WorldConfig, spec};
//!
//! let world = World::new(WorldConfig { seed: 3, ..WorldConfig::default() })?;
//! let config = SimConfig { rounds: 5000, ..SimConfig::default() }.stationary();
//! let mut sim = Simulation::new(world, config)?;
//! let runs = sim.run_all(&spec::parse_list("random,ucb1")?)?;
//! assert!(runs[1].summary.cumulative_regret < runs[0].summary.cumulative_regret);
//! # Ok::<(), onrec_sim::SimError>(())
//! ```

pub mod bayes;
pub mod encoder;
pub mod error;
pub mod http;
pub mod report;
pub mod run;
pub mod spec;
pub mod world;

pub use crate::bayes::LearningOracle;
pub use crate::encoder::{EncoderReport, EncoderSettings, TrainedEncoder};
pub use crate::error::SimError;
pub use crate::http::HttpShop;
pub use crate::run::{
    DecisionSink, LearnerCounts, PolicyRun, QParams, SimConfig, Simulation, Summary, VISIT_BUCKETS,
    device_segments,
};
pub use crate::spec::{DEFAULT_POLICIES, Exploration, PolicyParams, PolicySpec, Ranker};
pub use crate::world::{LogitTerms, Moment, Oracle, Repeats, Rewards, World, WorldConfig};
pub use onrec_engine::decisions::LogRecord;
