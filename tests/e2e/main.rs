//! End-to-end tests: the real `onrec` binary on free ports, real HTTP and gRPC clients.

#![allow(clippy::unwrap_used, missing_docs)]

mod bandit;
mod common;
mod evaluation;
mod grpc;
mod hostile;
mod http;
mod learning;
mod lifecycle;
mod model;
mod online;
mod replicas;
