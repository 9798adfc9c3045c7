//! onrec's models in candle: the SASRec-style Transformer encoder of users and items,
//! its training and full-ranking evaluation, checkpoints, and the data readers they use.

pub mod checkpoint;
pub mod context;
pub mod data;
pub mod device;
pub mod eval;
pub mod infer;
pub mod metrics;
pub mod online;
pub mod optim;
pub mod rng;
pub mod sasrec;
mod scan;
pub mod serve;
pub mod synth;
pub mod text;
pub mod train;

/// What can go wrong in the model crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A data file could not be read; `line` is 0 when no line is at fault.
    #[error("{path}, line {line}: {message}")]
    Data {
        /// The file.
        path: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint {0}")]
    Checkpoint(String),
    /// Training could not run.
    #[error("training: {0}")]
    Train(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}
