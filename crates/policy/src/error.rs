//! The crate's error types: bad configuration, and failing statistics stores.

use std::time::Duration;

/// A bad value in the segment or policy configuration, named by its path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// Path of the offending setting, e.g. `policies.vip.epsilon` or `rules[2].hours`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// A configuration error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What can go wrong when reading or writing bandit statistics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer within the latency budget.
    #[error("bandit store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store cannot be reached (connection refused, dropped, not yet established).
    #[error("bandit store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with an error.
    #[error("bandit store failed: {0}")]
    Backend(String),
    /// An update was malformed; nothing of its batch was applied.
    #[error("invalid statistics update: {0}")]
    InvalidUpdate(String),
    /// Updates that could not be written were dropped because the retry buffer was full.
    #[error("bandit store retry buffer full: {0} updates dropped")]
    BufferFull(usize),
    /// The store's own settings are unusable.
    #[error("bandit store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether the error is a fault of the store (worth retrying), not of the caller.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Timeout(_) | Self::Unavailable(_) | Self::Backend(_)
        )
    }
}
