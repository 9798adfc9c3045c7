//! The simulator's one error type.

/// What can go wrong when building a world or running a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A setting is out of range; `field` names it as the command line does.
    #[error("{field}: {message}")]
    Config {
        /// The setting, e.g. `rounds`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A policy name the simulator does not know.
    #[error("unknown policy '{name}' (known: {known})")]
    UnknownPolicy {
        /// The name as given.
        name: String,
        /// The names the simulator knows, comma-separated.
        known: String,
    },
    /// The engine refused the catalog or a request.
    #[error("engine: {0}")]
    Engine(#[from] onrec_engine::EngineError),
    /// The engine did not accept an event the simulator produced.
    #[error("event {event_id} was not accepted: {outcome}")]
    EventRejected {
        /// The event.
        event_id: String,
        /// What the engine said.
        outcome: String,
    },
    /// The segment or policy configuration is invalid.
    #[error("policy configuration: {0}")]
    Policy(#[from] onrec_policy::ConfigError),
    /// The bandit statistics store could not be built.
    #[error(transparent)]
    Store(#[from] onrec_policy::StoreError),
    /// The encoder could not be trained or started.
    #[error("encoder: {0}")]
    Model(#[from] onrec_model::ModelError),
    /// The Q-network learner could not be started.
    #[error("Q-network learner: {0}")]
    Learn(#[from] onrec_learn::LearnError),
    /// Reading or writing a file, or starting a thread or runtime, failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A record could not be written as JSON.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The plot could not be drawn.
    #[error("plot: {0}")]
    Plot(String),
    /// A server driven over HTTP did not answer as it should.
    #[error("{url}: {message}")]
    Http {
        /// What was called.
        url: String,
        /// What went wrong.
        message: String,
    },
}

impl SimError {
    /// A configuration error for `field`.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}
