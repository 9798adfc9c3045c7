//! Writes the engine's decision log out: JSON lines to a rotating file, or entries of a
//! capped Redis stream. Either way one record is one JSON object (see
//! `onrec_engine::decisions`); `onrec ope` reads the files back.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use onrec_engine::decisions::LogRecord;
use tokio::sync::mpsc::Receiver;

use crate::config::{Config, DecisionLogSink};

/// Records written out, by `sink`.
pub const WRITTEN: &str = "onrec_decision_log_records_total";
/// Failed writes, by `sink`: a record the file could not take (lost, also counted in
/// `onrec_decision_log_dropped_total`), or a Redis batch (retried).
pub const FAILED: &str = "onrec_decision_log_write_errors_total";
/// Records dropped: the writer's queue was full, or the file could not take them.
pub const DROPPED: &str = "onrec_decision_log_dropped_total";

/// Most records written in one go.
const BATCH: usize = 512;

/// Opens the configured sink (so that a bad path or URL fails the start) and spawns the
/// task that writes what `records` yields until the stream ends (after
/// `Engine::close_decision_log`). Must be called inside the runtime.
pub fn spawn(
    records: Receiver<LogRecord>,
    config: &Config,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    Ok(match config.decision_log {
        DecisionLogSink::None => tokio::spawn(async {}),
        DecisionLogSink::File => {
            let mut file = RotatingFile::open(
                config.decision_log_path.clone(),
                config.decision_log_max_bytes,
                config.decision_log_keep,
            )
            .with_context(|| {
                format!(
                    "opening the decision log {}",
                    config.decision_log_path.display()
                )
            })?;
            tokio::task::spawn_blocking(move || file.drain(records))
        }
        DecisionLogSink::Redis => {
            let url = config
                .redis_url
                .clone()
                .ok_or_else(|| anyhow::anyhow!("decision_log = redis needs redis_url"))?;
            let stream = RedisStream {
                client: onrec_policy::redis_client(&url, config.redis_ca()?.as_deref())
                    .context("the decision log's redis_url")?,
                key: config.decision_log_stream.clone(),
                maxlen: config.decision_log_stream_maxlen,
            };
            tokio::spawn(async move { stream.drain(records).await })
        }
    })
}

/// A JSON-lines file that is renamed to `PATH.<20-digit sequence>` once it reaches
/// `max_bytes`, keeping the newest `keep` rotated files.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    out: BufWriter<File>,
    written: u64,
    last_sequence: u64,
}

impl RotatingFile {
    /// Opens `path` for appending (creating it and its directory).
    pub fn open(path: PathBuf, max_bytes: u64, keep: usize) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let (out, written) = Self::append(&path)?;
        let last_sequence = rotated(&path)?.last().map_or(0, |(seq, _)| *seq);
        Ok(Self {
            path,
            max_bytes,
            keep,
            out,
            written,
            last_sequence,
        })
    }

    fn append(path: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok((BufWriter::new(file), len))
    }

    /// Writes one record as a line, rotating first when the file is full.
    pub fn write(&mut self, record: &LogRecord) -> anyhow::Result<()> {
        if self.written >= self.max_bytes {
            self.rotate()?;
        }
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.written += line.len() as u64;
        Ok(())
    }

    /// Flushes buffered lines to the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn rotate(&mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        // Milliseconds since the epoch, kept increasing, so names sort in age order.
        let sequence = (onrec_engine::now_ms().max(0) as u64).max(self.last_sequence + 1);
        std::fs::rename(&self.path, sequence_path(&self.path, sequence))?;
        self.last_sequence = sequence;
        (self.out, self.written) = Self::append(&self.path)?;
        let old = rotated(&self.path)?;
        for (_, path) in old.iter().take(old.len().saturating_sub(self.keep)) {
            std::fs::remove_file(path)?;
        }
        Ok(())
    }

    /// Writes records until the stream ends, flushing whenever it runs dry.
    fn drain(&mut self, mut records: Receiver<LogRecord>) {
        let mut batch = Vec::with_capacity(BATCH);
        while records.blocking_recv_many(&mut batch, BATCH) > 0 {
            let (mut written, mut failed) = (0u64, 0u64);
            for record in batch.drain(..) {
                match self.write(&record) {
                    Ok(()) => written += 1,
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(error = %e, path = %self.path.display(), "decision log write failed");
                    }
                }
            }
            if let Err(e) = self.flush() {
                tracing::warn!(error = %e, path = %self.path.display(), "decision log flush failed");
            }
            metrics::counter!(WRITTEN, "sink" => "file").increment(written);
            metrics::counter!(FAILED, "sink" => "file").increment(failed);
            metrics::counter!(DROPPED).increment(failed);
        }
    }
}

/// `PATH.<sequence, 20 digits>`.
fn sequence_path(path: &Path, sequence: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{sequence:020}"));
    PathBuf::from(name)
}

/// The rotated siblings of `path`, oldest first.
fn rotated(path: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(base) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{base}.");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if rest.len() == 20
            && let Ok(seq) = rest.parse::<u64>()
        {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// A capped Redis stream; every record is one entry with a `record` field.
struct RedisStream {
    client: redis::Client,
    key: String,
    maxlen: u64,
}

impl RedisStream {
    /// Writes records until the stream ends. A failed batch is retried with backoff, so
    /// an outage fills the engine's queue, which then drops (and counts) new records.
    async fn drain(&self, mut records: Receiver<LogRecord>) {
        let mut conn = None;
        let mut batch = Vec::with_capacity(BATCH);
        while records.recv_many(&mut batch, BATCH).await > 0 {
            let lines: Vec<String> = batch
                .drain(..)
                .filter_map(|r| serde_json::to_string(&r).ok())
                .collect();
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.write(&mut conn, &lines).await {
                    Ok(()) => {
                        metrics::counter!(WRITTEN, "sink" => "redis").increment(lines.len() as u64);
                        break;
                    }
                    Err(e) => {
                        metrics::counter!(FAILED, "sink" => "redis").increment(1);
                        conn = None;
                        tracing::warn!(error = %e, records = lines.len(), retry_in = ?backoff, "decision log stream write failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    async fn write(
        &self,
        conn: &mut Option<redis::aio::MultiplexedConnection>,
        lines: &[String],
    ) -> redis::RedisResult<()> {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(self.client.get_multiplexed_async_connection().await?),
        };
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
        pipe.query_async::<()>(c).await
    }
}

#[cfg(test)]
mod tests {
    use onrec_engine::EventType;
    use onrec_engine::decisions::RewardRecord;

    use super::*;

    fn reward(i: usize) -> LogRecord {
        LogRecord::Reward(RewardRecord {
            request_id: format!("r{i}"),
            timestamp: i as i64,
            item_id: "item".into(),
            position: 0,
            event: EventType::Click,
            reward: 1.0,
        })
    }

    fn lines(path: &Path) -> Vec<LogRecord> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn the_file_rotates_in_order_and_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("onrec-dlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("decisions.jsonl");
        let one_line = serde_json::to_vec(&reward(0)).unwrap().len() as u64 + 1;
        // Three records per file; 10 records make three full rotated files and one active.
        let mut file = RotatingFile::open(path.clone(), 3 * one_line, 2).unwrap();
        for i in 0..10 {
            file.write(&reward(i)).unwrap();
        }
        file.flush().unwrap();
        let old = rotated(&path).unwrap();
        assert_eq!(old.len(), 2, "only the newest two rotated files are kept");
        let mut read: Vec<LogRecord> = old.iter().flat_map(|(_, p)| lines(p)).collect();
        read.extend(lines(&path));
        assert_eq!(read, (3..10).map(reward).collect::<Vec<_>>());

        // Reopening appends and continues the sequence after the existing files.
        drop(file);
        let mut file = RotatingFile::open(path.clone(), 3 * one_line, 2).unwrap();
        for i in 10..13 {
            file.write(&reward(i)).unwrap();
        }
        file.flush().unwrap();
        let newest = rotated(&path).unwrap();
        assert!(newest.last().unwrap().0 > old.last().unwrap().0);
        assert_eq!(
            lines(&newest.last().unwrap().1),
            (9..12).map(reward).collect::<Vec<_>>()
        );
        assert_eq!(lines(&path), vec![reward(12)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
