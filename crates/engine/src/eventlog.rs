//! The event log: every accepted event as one JSON line (the event as posted, with the
//! timestamp it was counted at), appended to a file before the event is answered, so a
//! shop keeps its own traffic and can retrain offline from it (`onrec train --format
//! events`). Lines are written through to the file at once; they are not fsynced.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::EngineError;
use crate::types::Event;

/// An append-only file of accepted events.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl EventLog {
    /// Opens (creating it and its directory if missing) the log at `path` for appending.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let err = |e: std::io::Error| EngineError::EventLog(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event`, counted at `at` (milliseconds since the Unix epoch), as one line.
    pub fn append(&self, event: &Event, at: i64) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&Event {
            timestamp: Some(at),
            ..event.clone()
        })?;
        line.push(b'\n');
        // One write per line, under the lock: lines never interleave.
        self.file.lock().write_all(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::EventType;

    #[test]
    fn events_are_appended_as_json_lines_across_reopenings() {
        let dir = std::env::temp_dir().join(format!("onrec-eventlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("nested").join("events.jsonl");
        let event = |id: &str| Event {
            event_id: id.into(),
            user_id: "u".into(),
            item_id: "i".into(),
            kind: EventType::Click,
            request_id: None,
            value: None,
            timestamp: None,
        };
        EventLog::open(&path)
            .unwrap()
            .append(&event("a"), 5)
            .unwrap();
        EventLog::open(&path)
            .unwrap()
            .append(&event("b"), 6)
            .unwrap();
        let lines: Vec<Event> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            (lines[0].event_id.as_str(), lines[0].timestamp),
            ("a", Some(5))
        );
        assert_eq!(
            (lines[1].event_id.as_str(), lines[1].timestamp),
            ("b", Some(6))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
