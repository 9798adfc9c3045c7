//! The decision log: every served slate with what off-policy evaluation needs (the
//! candidates the policy chose from, the propensity of each slot, the policy and model),
//! and every reward later attributed to one of its slots.
//!
//! The log is a sequence of [`LogRecord`]s, one JSON object per line when written out.
//! Rewards are records of their own that name the decision's `request_id` and slot, so
//! the log is append-only; readers join them (see [`join`]). The engine keeps the most
//! recent records in memory (for `POST /v1/ope`) and hands every record to a writer
//! through a bounded queue: a rotating file ([`file`], which also reads the files back)
//! or a capped Redis stream ([`stream`]), started by [`spawn_writer`].

pub mod file;
pub mod stream;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use onrec_policy::PolicyConfig;
use serde::{Deserialize, Serialize};

use crate::types::{Context, EventType};

/// Records written out, by `sink`.
pub const WRITTEN: &str = "onrec_decision_log_records_total";
/// Failed writes, by `sink`: a record the file could not take (lost, also counted in
/// `onrec_decision_log_dropped_total`), or a Redis batch (retried).
pub const FAILED: &str = "onrec_decision_log_write_errors_total";
/// Records dropped: the writer's queue was full, or the file could not take them.
pub const DROPPED: &str = "onrec_decision_log_dropped_total";

/// Most records written in one go.
const BATCH: usize = 512;

/// Where the decision log is written.
#[derive(Debug)]
pub enum Sink {
    /// Nowhere (the in-memory window only).
    None,
    /// A rotating file (see [`file`]).
    File {
        /// The active file.
        path: PathBuf,
        /// Size at which it rotates.
        max_bytes: u64,
        /// Rotated files kept.
        keep: usize,
    },
    /// A capped Redis stream.
    Redis(Box<stream::RedisStream>),
}

/// Opens `sink` (so that a bad path fails at once) and spawns the task that writes what
/// `records` yields until the stream ends (after `Engine::close_decision_log`). Must be
/// called inside a tokio runtime.
pub fn spawn_writer(
    records: tokio::sync::mpsc::Receiver<LogRecord>,
    sink: Sink,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    Ok(match sink {
        Sink::None => tokio::spawn(async {}),
        Sink::File {
            path,
            max_bytes,
            keep,
        } => {
            let mut file = file::RotatingFile::open(path, max_bytes, keep)?;
            tokio::task::spawn_blocking(move || file.drain(records))
        }
        Sink::Redis(stream) => tokio::spawn(async move { stream.drain(records).await }),
    })
}

/// One line of the decision log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LogRecord {
    /// A served slate (boxed: it is several times the size of a reward).
    Decision(Box<DecisionRecord>),
    /// A reward attributed to a slot of an earlier decision.
    Reward(RewardRecord),
}

/// A served slate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// The response's `request_id`.
    pub request_id: String,
    /// When it was served, in milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The segment that served it.
    pub segment: String,
    /// The request's context, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Context>,
    /// The segment's policy as configured (`kind` and parameters).
    pub policy: PolicyConfig,
    /// Whether the policy fell back to the ranker's order (statistics unavailable); its
    /// slots then have propensity 1.
    #[serde(default)]
    pub fallback: bool,
    /// The ranker that proposed the candidates.
    pub ranker: String,
    /// The model version of the response.
    pub model_version: String,
    /// What the policy chose from, best first, with the scores it saw.
    pub candidates: Vec<LoggedCandidate>,
    /// The served slots, in order.
    pub slate: Vec<LoggedSlot>,
}

/// One candidate the policy could place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedCandidate {
    /// The item.
    pub item_id: String,
    /// Its score (ranker, mixed with Q when the Q-network is live).
    pub score: f64,
}

/// One served slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedSlot {
    /// The item placed here.
    pub item_id: String,
    /// Probability that the logging policy placed this item here, given the earlier slots.
    pub propensity: f64,
    /// Whether the item differs from what exploiting would have placed here.
    pub explored: bool,
}

/// A reward attributed to one slot of a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardRecord {
    /// The decision's `request_id`.
    pub request_id: String,
    /// When the event happened, in milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The item the event was about.
    pub item_id: String,
    /// Its slot in the decision's slate, from 0.
    pub position: usize,
    /// The event type.
    pub event: EventType,
    /// The reward it earned (see the reward settings).
    pub reward: f64,
}

/// A decision with the rewards of its slots, as read back from a log.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    /// The decision.
    pub decision: DecisionRecord,
    /// The summed reward of each slot, in slate order.
    pub rewards: Vec<f64>,
}

/// Joins rewards to their decisions. Rewards whose decision is not in `records` (it
/// is older than the log's start) or whose position is outside its slate are skipped and
/// counted in the second value. Decisions keep their order in the log.
pub fn join<I: IntoIterator<Item = LogRecord>>(records: I) -> (Vec<Logged>, usize) {
    let mut out: Vec<Logged> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut orphans = 0;
    for record in records {
        match record {
            LogRecord::Decision(decision) => {
                index.insert(decision.request_id.clone(), out.len());
                let rewards = vec![0.0; decision.slate.len()];
                out.push(Logged {
                    decision: *decision,
                    rewards,
                });
            }
            LogRecord::Reward(reward) => {
                let slot = index
                    .get(&reward.request_id)
                    .and_then(|&i| out[i].rewards.get_mut(reward.position));
                match slot {
                    Some(r) => *r += reward.reward,
                    None => orphans += 1,
                }
            }
        }
    }
    (out, orphans)
}

/// The newest records, bounded.
#[derive(Debug)]
pub(crate) struct Recent {
    records: VecDeque<LogRecord>,
    capacity: usize,
}

impl Recent {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            records: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
        }
    }

    pub(crate) fn push(&mut self, record: LogRecord) {
        if self.capacity == 0 {
            return;
        }
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        self.records.push_back(record);
    }

    pub(crate) fn snapshot(&self) -> Vec<LogRecord> {
        self.records.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(id: &str, items: &[&str]) -> LogRecord {
        LogRecord::Decision(Box::new(DecisionRecord {
            request_id: id.into(),
            timestamp: 1,
            segment: "default".into(),
            context: None,
            policy: PolicyConfig::Greedy {},
            fallback: false,
            ranker: "popularity".into(),
            model_version: "popularity-c0".into(),
            candidates: items
                .iter()
                .map(|i| LoggedCandidate {
                    item_id: (*i).into(),
                    score: 1.0,
                })
                .collect(),
            slate: items
                .iter()
                .map(|i| LoggedSlot {
                    item_id: (*i).into(),
                    propensity: 1.0,
                    explored: false,
                })
                .collect(),
        }))
    }

    fn reward(id: &str, position: usize, value: f64) -> LogRecord {
        LogRecord::Reward(RewardRecord {
            request_id: id.into(),
            timestamp: 2,
            item_id: "x".into(),
            position,
            event: EventType::Click,
            reward: value,
        })
    }

    #[test]
    fn rewards_join_their_slot_and_strays_are_counted() {
        let (logged, orphans) = join([
            reward("early", 0, 1.0),
            decision("a", &["i1", "i2"]),
            decision("b", &["i3"]),
            reward("a", 1, 1.0),
            reward("a", 1, 2.7),
            reward("b", 5, 1.0),
        ]);
        assert_eq!(orphans, 2);
        assert_eq!(logged.len(), 2);
        assert_eq!(logged[0].rewards, vec![0.0, 3.7]);
        assert_eq!(logged[1].rewards, vec![0.0]);
    }

    #[test]
    fn records_round_trip_as_tagged_json_lines() {
        let line = serde_json::to_string(&reward("a", 1, 2.0)).unwrap();
        assert!(line.starts_with(r#"{"type":"reward""#), "{line}");
        let back: LogRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, reward("a", 1, 2.0));
        let line = serde_json::to_string(&decision("a", &["i1"])).unwrap();
        assert!(line.contains(r#""policy":{"kind":"greedy"}"#), "{line}");
        assert_eq!(
            serde_json::from_str::<LogRecord>(&line).unwrap(),
            decision("a", &["i1"])
        );
    }

    #[test]
    fn the_recent_window_keeps_the_newest() {
        let mut recent = Recent::new(2);
        for id in ["a", "b", "c"] {
            recent.push(decision(id, &[]));
        }
        let ids: Vec<String> = recent
            .snapshot()
            .into_iter()
            .map(|r| match r {
                LogRecord::Decision(d) => d.request_id,
                LogRecord::Reward(r) => r.request_id,
            })
            .collect();
        assert_eq!(ids, ["b", "c"]);
    }
}
