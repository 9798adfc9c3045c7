//! The engine's one error type.

use std::fmt;

/// A bad value in a request, named by its path (`n`, `context.hour`, `[3].type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field, as the caller spelled it in JSON or protobuf.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A field error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error, with its path nested under `parent` (`[3]` + `type` = `[3].type`).
    pub fn under(mut self, parent: &str) -> Self {
        self.field = if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The caller sent something malformed; nothing was changed.
    #[error("{0}")]
    InvalidArgument(FieldError),
    /// The engine is at capacity; retrying later is safe.
    #[error("{0}")]
    Overloaded(String),
    /// A backing store did not answer.
    #[error("{0}")]
    Unavailable(String),
    /// A catalog file could not be read or parsed.
    #[error("catalog {path}: {message}")]
    Catalog {
        /// The file.
        path: String,
        /// What went wrong, with the line number where there is one.
        message: String,
    },
    /// The event log could not be opened.
    #[error("event log {0}")]
    EventLog(String),
    /// The engine's state could not be saved or loaded.
    #[error("engine state {0}")]
    State(String),
}

impl From<FieldError> for EngineError {
    fn from(e: FieldError) -> Self {
        Self::InvalidArgument(e)
    }
}
