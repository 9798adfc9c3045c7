//! The decision log as a capped Redis stream: one entry per record, its JSON in the
//! `record` field.

use std::time::Duration;

use tokio::sync::mpsc::Receiver;

use super::{BATCH, FAILED, LogRecord, WRITTEN};

/// A capped Redis stream; every record is one entry with a `record` field.
#[derive(Debug)]
pub struct RedisStream {
    /// Where the stream is.
    pub conn: onrec_policy::RedisConn,
    /// The stream's key.
    pub key: String,
    /// About how many entries it keeps (`XADD MAXLEN ~`).
    pub maxlen: u64,
}

impl RedisStream {
    /// Writes records until the stream ends. A failed batch is retried with backoff, so
    /// an outage fills the engine's queue, which then drops (and counts) new records.
    pub(crate) async fn drain(&self, mut records: Receiver<LogRecord>) {
        let mut batch = Vec::with_capacity(BATCH);
        while records.recv_many(&mut batch, BATCH).await > 0 {
            let lines: Vec<String> = batch
                .drain(..)
                .filter_map(|r| serde_json::to_string(&r).ok())
                .collect();
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.write(&lines).await {
                    Ok(()) => {
                        metrics::counter!(WRITTEN, "sink" => "redis").increment(lines.len() as u64);
                        break;
                    }
                    Err(e) => {
                        metrics::counter!(FAILED, "sink" => "redis").increment(1);
                        tracing::warn!(error = %e, records = lines.len(), retry_in = ?backoff, "decision log stream write failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    async fn write(&self, lines: &[String]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for line in lines {
            pipe.cmd("XADD")
                .arg(&self.key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.maxlen)
                .arg("*")
                .arg("record")
                .arg(line)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await
    }
}
