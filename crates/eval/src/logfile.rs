//! Reading the service's decision log files: JSON lines, rotated beside the active file.
//!
//! Rotation convention: the active file is `path` (e.g. `decisions.jsonl`); rotated files
//! are `path` + `.` + a 20-digit zero-padded sequence number (e.g.
//! `decisions.jsonl.00000001732000000000`), the smaller number the older. [`read_log`]
//! reads the rotated files oldest first, then `path`. Blank lines are skipped. A line
//! that does not parse is an error naming file and line, except the last line of a file
//! when it has no trailing newline: that is a write cut off by a crash, skipped and
//! counted.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use onrec_engine::decisions::LogRecord;

use crate::error::EvalError;

/// Digits of a rotated file's sequence number.
const SEQUENCE_DIGITS: usize = 20;

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
pub fn read_log(path: &Path) -> Result<ReadLog, EvalError> {
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
fn log_files(path: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let no_log = || EvalError::NoLog {
        path: path.to_owned(),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(no_log)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!("{name}.");
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(no_log()),
        Err(e) => return Err(EvalError::io(dir, e)),
    };
    let mut rotated: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| EvalError::io(dir, e))?;
        let file_name = entry.file_name();
        let Some(sequence) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .filter(|s| s.len() == SEQUENCE_DIGITS && s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        rotated.push((sequence.to_owned(), path.with_file_name(&file_name)));
    }
    // Zero-padded to a fixed width, so text order is numeric order.
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if path.is_file() {
        files.push(path.to_owned());
    }
    if files.is_empty() {
        return Err(no_log());
    }
    Ok(files)
}

fn read_file(path: &Path, log: &mut ReadLog) -> Result<(), EvalError> {
    let mut reader = BufReader::new(File::open(path).map_err(|e| EvalError::io(path, e))?);
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| EvalError::io(path, e))?;
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
            Err(e) => return Err(EvalError::line(path, line, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use onrec_engine::decisions::RewardRecord;
    use onrec_engine::types::EventType;

    use super::*;

    fn reward(id: &str) -> LogRecord {
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
        serde_json::to_string(&reward(id)).unwrap() + "\n"
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
