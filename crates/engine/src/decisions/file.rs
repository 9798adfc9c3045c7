//! The decision log as files: JSON lines, one record per line, written to `PATH` and
//! renamed to `PATH.<sequence>` (20 zero-padded digits, the smaller the older) once it
//! reaches its size, the newest `keep` rotated files kept; read back oldest first, then
//! `PATH`. Blank lines are skipped. A line that does not parse is an error naming file
//! and line, except the last line of a file when it has no trailing newline: that is a
//! write cut off by a crash, skipped and counted.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc::Receiver;

use super::{BATCH, DROPPED, FAILED, LogRecord, WRITTEN};

/// Digits of a rotated file's sequence number.
const SEQUENCE_DIGITS: usize = 20;

/// Why a decision log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Neither the log file nor any rotated file beside it exists.
    #[error("{}: no such decision log (nor rotated files beside it)", path.display())]
    NoLog {
        /// The path asked for.
        path: PathBuf,
    },
    /// A line does not parse.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A file or directory cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl LogError {
    fn line(path: &Path, line: usize, message: impl Into<String>) -> Self {
        Self::Line {
            path: path.to_owned(),
            line,
            message: message.into(),
        }
    }

    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
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
    pub fn open(path: PathBuf, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
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
    pub fn write(&mut self, record: &LogRecord) -> std::io::Result<()> {
        if self.written >= self.max_bytes {
            self.rotate()?;
        }
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.written += line.len() as u64;
        Ok(())
    }

    /// Flushes buffered lines to the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        // Milliseconds since the epoch, kept increasing, so names sort in age order.
        let sequence = (crate::now_ms().max(0) as u64).max(self.last_sequence + 1);
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
    pub(crate) fn drain(&mut self, mut records: Receiver<LogRecord>) {
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
    name.push(format!(".{sequence:0width$}", width = SEQUENCE_DIGITS));
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
        if rest.len() == SEQUENCE_DIGITS
            && rest.bytes().all(|b| b.is_ascii_digit())
            && let Ok(seq) = rest.parse::<u64>()
        {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The records of a decision log and what reading it found.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadLog {
    /// The records, oldest first.
    pub records: Vec<LogRecord>,
    /// The files read, oldest first.
    pub files: Vec<PathBuf>,
    /// Cut-off last lines skipped.
    pub truncated: usize,
}

/// Reads the decision log at `path` with its rotated files (see the module documentation).
pub fn read_log(path: &Path) -> Result<ReadLog, LogError> {
    let files = log_files(path)?;
    let mut log = ReadLog {
        records: Vec::new(),
        files: Vec::with_capacity(files.len()),
        truncated: 0,
    };
    for file in files {
        read_file(&file, &mut log)?;
        log.files.push(file);
    }
    Ok(log)
}

/// The rotated files beside `path`, oldest first, then `path` if it exists.
fn log_files(path: &Path) -> Result<Vec<PathBuf>, LogError> {
    let no_log = || LogError::NoLog {
        path: path.to_owned(),
    };
    let mut files: Vec<PathBuf> = match rotated(path) {
        Ok(rotated) => rotated.into_iter().map(|(_, p)| p).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(no_log()),
        Err(e) => return Err(LogError::io(path, e)),
    };
    if path.is_file() {
        files.push(path.to_owned());
    }
    if files.is_empty() {
        return Err(no_log());
    }
    Ok(files)
}

fn read_file(path: &Path, log: &mut ReadLog) -> Result<(), LogError> {
    let mut reader = BufReader::new(File::open(path).map_err(|e| LogError::io(path, e))?);
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| LogError::io(path, e))?;
        if read == 0 {
            return Ok(());
        }
        line += 1;
        let complete = buf.last() == Some(&b'\n');
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<LogRecord>(&buf) {
            Ok(record) => log.records.push(record),
            Err(_) if !complete => log.truncated += 1,
            Err(e) => return Err(LogError::line(path, line, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::decisions::RewardRecord;
    use crate::types::EventType;

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
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn the_file_rotates_in_order_and_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("onrec-dlog-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
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
        // The reader follows the writer's naming: the same records, in order.
        assert_eq!(read_log(&path).unwrap().records, read);

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
        fs::remove_dir_all(&dir).unwrap();
    }

    fn reward_of(id: &str) -> LogRecord {
        LogRecord::Reward(RewardRecord {
            request_id: id.into(),
            timestamp: 1,
            item_id: "i".into(),
            position: 0,
            event: EventType::Click,
            reward: 1.0,
        })
    }

    fn line(id: &str) -> String {
        serde_json::to_string(&reward_of(id)).unwrap() + "\n"
    }

    fn ids(log: &ReadLog) -> Vec<String> {
        log.records
            .iter()
            .map(|r| match r {
                LogRecord::Reward(r) => r.request_id.clone(),
                LogRecord::Decision(d) => d.request_id.clone(),
            })
            .collect()
    }

    /// A fresh directory in the system's temporary directory.
    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("onrec-eval-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rotated_files_are_read_oldest_first_then_the_active_one() {
        let dir = dir("rotation");
        let path = dir.join("decisions.jsonl");
        fs::write(&path, line("active")).unwrap();
        fs::write(
            dir.join("decisions.jsonl.00000000000000000010"),
            line("r10"),
        )
        .unwrap();
        fs::write(dir.join("decisions.jsonl.00000000000000000002"), line("r2")).unwrap();
        fs::write(
            dir.join("decisions.jsonl.00000001732000000000"),
            line("r1732") + &line("r1732b"),
        )
        .unwrap();
        // Not rotated files of this log: wrong width, other log, other suffix.
        fs::write(dir.join("decisions.jsonl.123"), "junk").unwrap();
        fs::write(dir.join("other.jsonl.00000000000000000001"), "junk").unwrap();
        fs::write(dir.join("decisions.jsonl.00000000000000000001.gz"), "junk").unwrap();

        let log = read_log(&path).unwrap();
        assert_eq!(ids(&log), ["r2", "r10", "r1732", "r1732b", "active"]);
        assert_eq!(log.files.len(), 4);
        assert_eq!(log.files.last(), Some(&path));
        assert_eq!(log.truncated, 0);

        // Without the active file, the rotated ones are the log.
        fs::remove_file(&path).unwrap();
        assert_eq!(read_log(&path).unwrap().records.len(), 4);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cut_off_last_line_is_skipped_and_counted() {
        let dir = dir("truncated");
        let path = dir.join("log.jsonl");
        let cut = &line("c")[..20];
        fs::write(&path, line("a") + "\n" + &line("b") + cut).unwrap();
        let log = read_log(&path).unwrap();
        assert_eq!(ids(&log), ["a", "b"]);
        assert_eq!(log.truncated, 1);

        // A last line without newline that parses is kept.
        fs::write(&path, line("a") + line("b").trim_end()).unwrap();
        let log = read_log(&path).unwrap();
        assert_eq!(
            (ids(&log), log.truncated),
            (vec!["a".into(), "b".into()], 0)
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_malformed_line_names_file_and_line() {
        let dir = dir("malformed");
        let path = dir.join("log.jsonl");
        fs::write(&path, line("a") + "{\"type\":\"reward\"}\n" + &line("c")).unwrap();
        let err = read_log(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:2: ", path.display())), "{err}");
        assert!(err.contains("missing field"), "{err}");

        // Cut off in the middle of a file, with lines after it: an error too.
        fs::write(&path, line("a") + "{\"type\":\"rew\n" + &line("c")).unwrap();
        let err = read_log(&path).unwrap_err().to_string();
        assert!(err.contains("log.jsonl:2: "), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_log_says_so() {
        let dir = dir("missing");
        let err = read_log(&dir.join("nothing.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nothing.jsonl: no such decision log"), "{err}");
        let err = read_log(&dir.join("no-dir/x.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such decision log"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
