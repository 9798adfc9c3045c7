//! onrec's online learning: feedback stream → replay buffer → Q-network updater → live
//! weights.
//!
//! A recommendation is an action a (the item shown) in a state s = (the user's recent
//! items, the request context); the engine turns what the user did next into a reward r
//! and, when the session goes on, the next state s' with the candidates available there.
//! [`Learner::submit`] hands such a [`Transition`] to a learner on its own OS thread over
//! a bounded queue (when the queue is full the newest transition is dropped, never the
//! request path blocked). The learner keeps a [`Replay`] buffer and trains a [`QNet`] by
//! Double DQN with a target network, Huber loss, gradient clipping and AdamW, and every
//! few updates publishes an immutable copy of the weights; [`Learner::current`] hands
//! readers the latest one without a lock, and serving re-ranks the ranker's top-M
//! candidates with one batched [`QNet::q_values`].
//!
//! ```
//! use onrec_learn::{LearnConfig, Learner, State, Transition};
//! use onrec_model::context::ContextIds;
//!
//! let items: Vec<String> = (1..=10).map(|i| format!("sku-{i}")).collect();
//! let learner = Learner::start(LearnConfig::default(), items, None)?;
//! let state = State {
//!     history: vec![1, 2],
//!     context: ContextIds::from_parts(Some(9), None),
//!     user: None,
//! };
//! learner.submit(Transition {
//!     state: state.clone(),
//!     action: 7,
//!     reward: 1.0,
//!     next_state: None,
//!     next_candidates: vec![],
//! })?;
//! let live = learner.current();
//! let q = live.net.q_values(&[state], &[vec![3, 7]])?;
//! assert_eq!(q[0].len(), 2);
//! learner.shutdown()?;
//! # Ok::<(), onrec_learn::LearnError>(())
//! ```

pub mod checkpoint;
pub mod optim;
mod qhost;
pub mod qnet;
pub mod replay;
pub mod updater;
pub mod yielding;

pub use crate::qnet::{QConfig, QNet, State};
pub use crate::replay::{Replay, Transition};
pub use crate::updater::{
    LearnConfig, Learner, Priority, Published, double_dqn_targets, spawn_training_thread,
};

/// What can go wrong in online learning.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    /// The updater is behind and its queue is full: the transition was dropped.
    #[error("the learner queue is full; the transition was dropped")]
    Dropped,
    /// The updater thread is not running.
    #[error("the learner is not running")]
    Stopped,
    /// A setting is out of range.
    #[error("learner config: {0}")]
    Config(String),
    /// An input does not fit the network (item index or context bucket out of range).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A checkpoint could not be written or read, or does not fit the configuration.
    #[error("checkpoint {0}")]
    Checkpoint(String),
    /// The updater thread could not be started or failed.
    #[error("learner: {0}")]
    Train(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}
