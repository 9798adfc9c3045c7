//! Interaction logs: readers for MovieLens, RecBole atomic files and plain CSV, and the
//! chronological leave-one-out split used for training and evaluation.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use crate::ModelError;

/// One user–item interaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    /// The user's id as in the file.
    pub user: String,
    /// The item's id as in the file.
    pub item: String,
    /// Seconds since the Unix epoch (fractions allowed).
    pub timestamp: f64,
}

/// The file formats `onrec train` and `onrec eval` read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// MovieLens `u.data` (tab-separated) or `ratings.dat` (`::`-separated):
    /// user, item, rating, timestamp.
    MovieLens,
    /// RecBole atomic `.inter` file: a typed header (`user_id:token\titem_id:token\t…`),
    /// then tab-separated rows.
    RecBole,
    /// `user,item,timestamp`, with an optional header line.
    Csv,
    /// onrec's event log (`data_dir/events.jsonl`): one event per line as JSON; clicks,
    /// add-to-carts and purchases are interactions (timestamps in milliseconds), a cart
    /// or purchase right after the same user's click on the same item is the same one.
    Events,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "movielens" => Ok(Self::MovieLens),
            "recbole" => Ok(Self::RecBole),
            "csv" => Ok(Self::Csv),
            "events" => Ok(Self::Events),
            other => Err(format!(
                "unknown format '{other}' (expected movielens, recbole, csv or events)"
            )),
        }
    }
}

pub(crate) fn line_error(path: &Path, line: usize, message: impl Into<String>) -> ModelError {
    ModelError::Data {
        path: path.display().to_string(),
        line,
        message: message.into(),
    }
}

fn parse_timestamp(path: &Path, line: usize, raw: &str) -> Result<f64, ModelError> {
    raw.trim()
        .parse::<f64>()
        .ok()
        .filter(|t| t.is_finite())
        .ok_or_else(|| line_error(path, line, format!("timestamp '{raw}' is not a number")))
}

fn non_empty<'a>(
    path: &Path,
    line: usize,
    what: &str,
    raw: &'a str,
) -> Result<&'a str, ModelError> {
    let v = raw.trim();
    if v.is_empty() {
        Err(line_error(path, line, format!("{what} is empty")))
    } else {
        Ok(v)
    }
}

/// Reads every interaction of `path` in file order. Errors name the line.
pub fn read(path: &Path, format: Format) -> Result<Vec<Interaction>, ModelError> {
    let file = std::fs::File::open(path).map_err(|e| line_error(path, 0, e.to_string()))?;
    read_from(path, std::io::BufReader::new(file), format)
}

/// Like [`read`], from any reader; `path` only names the source in errors.
pub fn read_from(
    path: &Path,
    reader: impl BufRead,
    format: Format,
) -> Result<Vec<Interaction>, ModelError> {
    if format == Format::Events {
        return read_events(path, reader);
    }
    let mut out = Vec::new();
    // RecBole: column positions from the header.
    let mut columns: Option<(usize, usize, usize)> = None;
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| line_error(path, n, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = match format {
            Format::MovieLens if line.contains("::") => line.split("::").collect(),
            Format::MovieLens => line.split('\t').collect(),
            Format::RecBole => line.split('\t').collect(),
            Format::Csv | Format::Events => line.split(',').collect(),
        };
        let (u, it, ts) = match format {
            Format::MovieLens => {
                if fields.len() != 4 {
                    return Err(line_error(
                        path,
                        n,
                        format!(
                            "expected 4 fields (user, item, rating, timestamp), found {}",
                            fields.len()
                        ),
                    ));
                }
                (0, 1, 3)
            }
            Format::RecBole => match columns {
                Some(c) => {
                    if fields.len() <= c.0.max(c.1).max(c.2) {
                        return Err(line_error(
                            path,
                            n,
                            format!(
                                "expected at least {} tab-separated fields, found {}",
                                c.0.max(c.1).max(c.2) + 1,
                                fields.len()
                            ),
                        ));
                    }
                    c
                }
                None => {
                    let find = |name: &str| {
                        fields
                            .iter()
                            .position(|f| f.split(':').next() == Some(name))
                    };
                    match (find("user_id"), find("item_id"), find("timestamp")) {
                        (Some(u), Some(i), Some(t)) => columns = Some((u, i, t)),
                        _ => {
                            return Err(line_error(
                                path,
                                n,
                                "the header must name user_id, item_id and timestamp columns (e.g. user_id:token)",
                            ));
                        }
                    }
                    continue;
                }
            },
            Format::Csv | Format::Events => {
                if fields.len() != 3 {
                    return Err(line_error(
                        path,
                        n,
                        format!(
                            "expected 3 comma-separated fields (user, item, timestamp), found {}",
                            fields.len()
                        ),
                    ));
                }
                if n == 1 && fields[2].trim().parse::<f64>().is_err() {
                    continue; // a header line
                }
                (0, 1, 2)
            }
        };
        out.push(Interaction {
            user: non_empty(path, n, "user", fields[u])?.to_owned(),
            item: non_empty(path, n, "item", fields[it])?.to_owned(),
            timestamp: parse_timestamp(path, n, fields[ts])?,
        });
    }
    if format == Format::RecBole && columns.is_none() {
        return Err(line_error(path, 0, "the file has no header line"));
    }
    Ok(out)
}

/// The interactions of an event log (see [`Format::Events`]).
fn read_events(path: &Path, reader: impl BufRead) -> Result<Vec<Interaction>, ModelError> {
    let mut out = Vec::new();
    let mut last: HashMap<String, String> = HashMap::new();
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| line_error(path, n, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| line_error(path, n, e.to_string()))?;
        let text = |field: &str| -> Result<&str, ModelError> {
            let v = event[field].as_str().ok_or_else(|| {
                line_error(path, n, format!("{field} is missing or not a string"))
            })?;
            non_empty(path, n, field, v)
        };
        if !matches!(text("type")?, "click" | "add_to_cart" | "purchase") {
            continue;
        }
        let (user, item) = (text("user_id")?, text("item_id")?);
        let timestamp = event["timestamp"]
            .as_f64()
            .filter(|t| t.is_finite())
            .ok_or_else(|| line_error(path, n, "timestamp is missing or not a number"))?;
        if last.get(user).is_some_and(|prev| prev == item) {
            continue;
        }
        last.insert(user.to_owned(), item.to_owned());
        out.push(Interaction {
            user: user.to_owned(),
            item: item.to_owned(),
            timestamp: timestamp / 1000.0,
        });
    }
    Ok(out)
}

/// Interactions turned into per-user sequences of dense item indices, oldest first.
///
/// Item indices start at 1; 0 is padding. Users are in order of first appearance.
#[derive(Debug, Clone)]
pub struct Sequences {
    /// Item ids by index; `items[0]` is the padding placeholder.
    pub items: Vec<String>,
    /// Per user, their interactions in chronological order.
    pub users: Vec<Vec<Step>>,
}

/// One interaction in a sequence: the item and the context it happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Dense item index (1-based).
    pub item: u32,
    /// Context bucket of the moment (see [`crate::context`]).
    pub context: crate::context::ContextIds,
}

/// Hour of day (UTC) of a Unix timestamp in seconds.
pub fn hour_of(timestamp: f64) -> u8 {
    (timestamp.rem_euclid(86_400.0) / 3_600.0) as u8
}

impl Sequences {
    /// Sorts by timestamp with a STABLE sort, so interactions with the same timestamp keep
    /// the file's order, then groups them by user. Items are indexed as first seen.
    pub fn from_interactions(log: Vec<Interaction>) -> Self {
        let mut items = vec![String::new()];
        let mut index: HashMap<String, u32> = HashMap::new();
        Self::group(log, |item| {
            let next = items.len() as u32;
            Some(*index.entry(item.to_owned()).or_insert_with(|| {
                items.push(item.to_owned());
                next
            }))
        })
        .with_items(items)
    }

    /// Like [`Sequences::from_interactions`], indexing items by an existing vocabulary
    /// (`items[0]` is padding). Interactions with unknown items are dropped; the second
    /// value counts them.
    pub fn with_vocabulary(log: Vec<Interaction>, items: &[String]) -> (Self, usize) {
        let index = vocabulary_index(items);
        let mut dropped = 0;
        let seqs = Self::group(log, |item| {
            let found = index.get(item).copied();
            dropped += usize::from(found.is_none());
            found
        });
        (seqs.with_items(items.to_vec()), dropped)
    }

    fn with_items(mut self, items: Vec<String>) -> Self {
        self.items = items;
        self
    }

    fn group(mut log: Vec<Interaction>, mut item_index: impl FnMut(&str) -> Option<u32>) -> Self {
        log.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
        let mut user_index: HashMap<String, usize> = HashMap::new();
        let mut users: Vec<Vec<Step>> = Vec::new();
        for it in log {
            let Some(item) = item_index(&it.item) else {
                continue;
            };
            let u = *user_index.entry(it.user).or_insert_with(|| {
                users.push(Vec::new());
                users.len() - 1
            });
            users[u].push(Step {
                item,
                context: crate::context::ContextIds::from_parts(Some(hour_of(it.timestamp)), None),
            });
        }
        Self {
            items: Vec::new(),
            users,
        }
    }

    /// Number of real items (without padding).
    pub fn num_items(&self) -> usize {
        self.items.len() - 1
    }

    /// The same sequences without any interaction with the `withheld` item indices (the
    /// vocabulary is kept).
    pub fn without(&self, withheld: &[u32]) -> Self {
        let out: std::collections::HashSet<u32> = withheld.iter().copied().collect();
        Self {
            items: self.items.clone(),
            users: self
                .users
                .iter()
                .map(|seq| {
                    seq.iter()
                        .filter(|s| !out.contains(&s.item))
                        .copied()
                        .collect()
                })
                .collect(),
        }
    }
}

/// The cold-item protocol's items: a `share` of the item indices `1..=num_items`, drawn
/// with `seed`, ascending.
pub fn cold_items(num_items: usize, share: f64, seed: u64) -> Vec<u32> {
    let mut all: Vec<u32> = (1..=num_items as u32).collect();
    crate::rng::SplitMix64::new(seed ^ 0xc01d_17e5).shuffle(&mut all);
    let n = ((num_items as f64 * share.clamp(0.0, 1.0)).round() as usize).min(num_items);
    let mut cold = all[..n].to_vec();
    cold.sort_unstable();
    cold
}

/// The index of every item id of a vocabulary (`items[0]` is padding and not indexed).
pub fn vocabulary_index(items: &[String]) -> HashMap<String, u32> {
    items
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, id)| (id.clone(), i as u32))
        .collect()
}

/// One evaluation case: the history before the target, and the target.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Items before the target, oldest first.
    pub history: Vec<u32>,
    /// The held-out item.
    pub target: u32,
    /// Context of the held-out interaction.
    pub context: crate::context::ContextIds,
}

/// Chronological leave-one-out: per user, the last interaction is the test case, the
/// second-to-last the validation case, the rest trains. Users with fewer than 3
/// interactions train only.
#[derive(Debug, Clone)]
pub struct Split {
    /// Training sequences, one per user.
    pub train: Vec<Vec<Step>>,
    /// Validation cases: history = the training part.
    pub valid: Vec<Case>,
    /// Test cases: history = training part + validation item.
    pub test: Vec<Case>,
}

impl Split {
    /// Splits every user's sequence.
    pub fn leave_one_out(seqs: &Sequences) -> Self {
        let mut split = Split {
            train: Vec::new(),
            valid: Vec::new(),
            test: Vec::new(),
        };
        for seq in &seqs.users {
            if seq.len() < 3 {
                split.train.push(seq.clone());
                continue;
            }
            let t = seq.len();
            let items: Vec<u32> = seq.iter().map(|s| s.item).collect();
            split.train.push(seq[..t - 2].to_vec());
            split.valid.push(Case {
                history: items[..t - 2].to_vec(),
                target: items[t - 2],
                context: seq[t - 2].context,
            });
            split.test.push(Case {
                history: items[..t - 1].to_vec(),
                target: items[t - 1],
                context: seq[t - 1].context,
            });
        }
        split
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_log_gives_its_clicks_carts_and_purchases_once_per_choice() {
        let log = [
            r#"{"event_id":"1","user_id":"u","item_id":"a","type":"click","timestamp":1000}"#,
            r#"{"event_id":"2","user_id":"u","item_id":"a","type":"purchase","timestamp":2000}"#,
            r#"{"event_id":"3","user_id":"u","item_id":"b","type":"impression","timestamp":3000}"#,
            r#"{"event_id":"4","user_id":"v","item_id":"b","type":"add_to_cart","timestamp":4000}"#,
            "",
            r#"{"event_id":"5","user_id":"u","item_id":"c","type":"click","timestamp":5000}"#,
        ]
        .join("\n");
        let got = read_from(Path::new("events.jsonl"), log.as_bytes(), Format::Events).unwrap();
        let pairs: Vec<(&str, &str, f64)> = got
            .iter()
            .map(|i| (i.user.as_str(), i.item.as_str(), i.timestamp))
            .collect();
        assert_eq!(pairs, [("u", "a", 1.0), ("v", "b", 4.0), ("u", "c", 5.0)]);
        let bad = r#"{"event_id":"1","user_id":"u","type":"click","timestamp":1}"#;
        let err = read_from(Path::new("e.jsonl"), bad.as_bytes(), Format::Events)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "e.jsonl, line 1: item_id is missing or not a string");
    }

    fn parse(text: &str, format: Format) -> Result<Vec<Interaction>, ModelError> {
        read_from(Path::new("test"), text.as_bytes(), format)
    }

    #[test]
    fn reads_movielens_both_layouts() {
        let a = parse(
            "196\t242\t3\t881250949\n186\t302\t3\t891717742\n",
            Format::MovieLens,
        )
        .unwrap();
        let b = parse(
            "196::242::3::881250949\n186::302::3::891717742\n",
            Format::MovieLens,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a[1],
            Interaction {
                user: "186".into(),
                item: "302".into(),
                timestamp: 891717742.0
            }
        );
    }

    #[test]
    fn reads_recbole_by_header() {
        let text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t100\n2\t20\t4\t50\n";
        let log = parse(text, Format::RecBole).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log[1].item, "20");
        let reordered = "timestamp:float\titem_id:token\tuser_id:token\n100\t10\t1\n";
        assert_eq!(parse(reordered, Format::RecBole).unwrap()[0].user, "1");
    }

    #[test]
    fn reads_csv_with_or_without_header() {
        let with = parse("user,item,timestamp\nu1,i1,5\n", Format::Csv).unwrap();
        let without = parse("u1,i1,5\n", Format::Csv).unwrap();
        assert_eq!(with, without);
    }

    #[test]
    fn malformed_lines_name_their_line_number() {
        let err = parse("196\t242\t3\t881250949\n\n186\t302\t3\n", Format::MovieLens)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3") && err.contains("expected 4 fields"),
            "{err}"
        );
        let err = parse("u,i,1\nu,i,soon\n", Format::Csv)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("timestamp 'soon'"),
            "{err}"
        );
        let err = parse(
            "user_id:token\titem_id:token\ttimestamp:float\n1\t\t3\n",
            Format::RecBole,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 2") && err.contains("item is empty"),
            "{err}"
        );
        let err = parse("a\tb\n", Format::RecBole).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("header"), "{err}");
    }

    #[test]
    fn sort_is_stable_and_split_is_chronological() {
        // u1's two interactions at t=5 keep file order (i2 before i3).
        let log = parse("u1,i1,9\nu1,i2,5\nu1,i3,5\nu1,i4,1\nu2,i1,1\n", Format::Csv).unwrap();
        let seqs = Sequences::from_interactions(log);
        let names = |seq: &[Step]| {
            seq.iter()
                .map(|s| seqs.items[s.item as usize].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&seqs.users[0]), ["i4", "i2", "i3", "i1"]);
        let split = Split::leave_one_out(&seqs);
        assert_eq!(names(&split.train[0]), ["i4", "i2"]);
        assert_eq!(seqs.items[split.valid[0].target as usize], "i3");
        assert_eq!(seqs.items[split.test[0].target as usize], "i1");
        assert_eq!(split.test[0].history.len(), 3);
        // u2 has one interaction: training only.
        assert_eq!(
            (split.train.len(), split.valid.len(), split.test.len()),
            (2, 1, 1)
        );

        let log = parse("u1,i3,1\nu1,zz,2\nu1,i1,3\n", Format::Csv).unwrap();
        let (known, dropped) = Sequences::with_vocabulary(log, &seqs.items);
        assert_eq!(dropped, 1);
        assert_eq!(
            known.users[0].iter().map(|s| s.item).collect::<Vec<_>>(),
            vec![4, 2]
        );
    }

    #[test]
    fn hours_wrap_by_day() {
        assert_eq!(hour_of(0.0), 0);
        assert_eq!(hour_of(86_400.0 + 3.5 * 3600.0), 3);
    }
}
