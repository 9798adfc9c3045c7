//! Off-policy evaluation of onrec's exploration policies from logged decisions.
//!
//! [`evaluate`] estimates what a target policy would have earned on a decision log (IPS,
//! SNIPS and doubly robust, with bootstrap intervals); [`read_log`] reads the service's
//! rotated JSON-lines log, and [`read_obd`] turns the Open Bandit Dataset into the same
//! records.

pub mod error;
pub mod obd;
pub mod ope;

pub use crate::error::EvalError;
pub use crate::obd::read_obd;
pub use crate::ope::{
    Counts, Estimate, Estimates, OpeOptions, OpeReport, PositionReport, TargetPolicy, evaluate,
};
pub use onrec_engine::decisions::file::{LogError, ReadLog, read_log};
