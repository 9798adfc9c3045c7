//! The crate's error type: bad options or target policies, and unusable logs.

use std::path::{Path, PathBuf};

/// What can go wrong when reading a log or estimating a policy's value from it.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// An estimation option is out of range.
    #[error("ope options: {field}: {message}")]
    Options {
        /// The option, e.g. `confidence`.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The target policy is malformed or has a bad parameter.
    #[error("target policy: {field}: {message}")]
    Target {
        /// Path of the offending setting, e.g. `segments.mobile.epsilon`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The log holds no decisions, so there is nothing to estimate from.
    #[error("the log holds no decisions")]
    EmptyLog,
    /// A decision or reward record cannot be used.
    #[error("decision {request_id}: {message}")]
    Record {
        /// The `request_id` of the record.
        request_id: String,
        /// What is wrong with it.
        message: String,
    },
    /// A line of a log or data file does not parse.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The decision log cannot be read.
    #[error(transparent)]
    Log(#[from] onrec_engine::decisions::file::LogError),
    /// A file or directory cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl EvalError {
    pub(crate) fn record(request_id: &str, message: impl Into<String>) -> Self {
        Self::Record {
            request_id: request_id.to_owned(),
            message: message.into(),
        }
    }

    pub(crate) fn line(path: &Path, line: usize, message: impl Into<String>) -> Self {
        Self::Line {
            path: path.to_owned(),
            line,
            message: message.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}
