//! The decision log's sink as configured; the records and their writers and readers
//! are `onrec_engine::decisions`.

use anyhow::Context as _;
use std::time::Duration;

use onrec_engine::decisions::{LogRecord, Sink, spawn_writer, stream::RedisStream};
use onrec_policy::RedisConn;
use redis::aio::ConnectionManagerConfig;
use tokio::sync::mpsc::Receiver;

use crate::config::{Config, DecisionLogSink};

/// Opens the configured sink (so that a bad path or URL fails the start) and spawns the
/// task that writes what `records` yields until the stream ends (after
/// `Engine::close_decision_log`). Must be called inside the runtime.
pub fn spawn(
    records: Receiver<LogRecord>,
    config: &Config,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let sink = match config.decision_log {
        DecisionLogSink::None => Sink::None,
        DecisionLogSink::File => Sink::File {
            path: config.decision_log_path.clone(),
            max_bytes: config.decision_log_max_bytes,
            keep: config.decision_log_keep,
        },
        DecisionLogSink::Redis => {
            let url = config
                .redis_url
                .clone()
                .ok_or_else(|| anyhow::anyhow!("decision_log = redis needs redis_url"))?;
            Sink::Redis(Box::new(RedisStream {
                conn: RedisConn::open(
                    &url,
                    config.redis_ca()?.as_deref(),
                    ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(Duration::from_secs(1)))
                        .set_response_timeout(Some(config.redis_write_timeout)),
                )
                .context("the decision log's redis_url")?,
                key: config.decision_log_stream.clone(),
                maxlen: config.decision_log_stream_maxlen,
            }))
        }
    };
    spawn_writer(records, sink).with_context(|| {
        format!(
            "opening the decision log {}",
            config.decision_log_path.display()
        )
    })
}
