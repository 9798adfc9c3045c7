//! The Open Bandit Dataset (OBD, ZOZOTOWN; Saito et al. 2021) as a decision log.
//!
//! An OBD file (e.g. `bts/all/all.csv`) is a CSV whose header is
//! `,timestamp,item_id,position,click,propensity_score,user_feature_0,…,
//! user-item_affinity_0,…`: a row index, the time (`2019-11-24 00:00:34.762830+00:00`),
//! the item shown, its position (1, 2, 3), whether it was clicked, the behaviour
//! policy's probability of that item at that position, hashed user features and one
//! user-item affinity per item. Fields are plain values (no quoting).
//!
//! Every row becomes one decision with one slot, followed by a reward record of 1 when
//! the item was clicked:
//! - `request_id` `obd-LINE`, `timestamp` the row's time;
//! - `segment` `position_P`, so per-position targets and statistics stay apart;
//! - `context.attributes` the user features by column name;
//! - `candidates` every item of the dataset (n_items = the number of affinity columns,
//!   else 1 + the largest item id), best first by the user's affinity, ties by item id,
//!   with the affinity as score;
//! - `slate` the shown item with `propensity_score` as its propensity; `explored` when it
//!   is not the first candidate;
//! - `policy` `epsilon_greedy` with ε = 1 when every propensity is 1/n_items (the uniform
//!   random log, exactly); otherwise `thompson` with the default prior, naming the kind
//!   of the OBD's other behaviour policy (Bernoulli Thompson sampling) whose parameters
//!   the data does not carry. Only the logged propensities enter the estimates.
//!
//! The uniform random target is then `{"policy": {"kind": "epsilon_greedy", "epsilon":
//! 1.0}}`, with πₑ = 1/n_items.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use onrec_engine::decisions::{
    DecisionRecord, LogRecord, LoggedCandidate, LoggedSlot, RewardRecord,
};
use onrec_engine::types::{Context, EventType};
use onrec_policy::PolicyConfig;

use crate::error::EvalError;

const USER_FEATURE: &str = "user_feature_";
const AFFINITY: &str = "user-item_affinity_";
/// Propensity difference within which a log counts as uniformly random.
const UNIFORM_SLACK: f64 = 1e-12;

/// Reads an OBD CSV file as decision and reward records (see the module documentation).
pub fn read_obd(path: &Path) -> Result<Vec<LogRecord>, EvalError> {
    let file = File::open(path).map_err(|e| EvalError::io(path, e))?;
    let mut lines = BufReader::new(file).lines();
    let header = match lines.next() {
        Some(line) => line.map_err(|e| EvalError::io(path, e))?,
        None => {
            return Err(EvalError::line(
                path,
                1,
                "the file is empty; expected a header",
            ));
        }
    };
    let columns = Columns::new(path, &header)?;
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let line_no = i + 2;
        let text = line.map_err(|e| EvalError::io(path, e))?;
        let text = text.trim_end_matches('\r');
        if text.is_empty() {
            continue;
        }
        rows.push(
            columns
                .row(text, line_no)
                .map_err(|m| EvalError::line(path, line_no, m))?,
        );
    }
    let n_items = if columns.affinities.is_empty() {
        rows.iter().map(|r| r.item + 1).max().unwrap_or(0)
    } else {
        columns.affinities.len()
    };
    if let Some(row) = rows.iter().find(|r| r.item >= n_items) {
        return Err(EvalError::line(
            path,
            row.line,
            format!(
                "column item_id: {} is out of range; the file has {n_items} items",
                row.item
            ),
        ));
    }
    let uniform = rows
        .iter()
        .all(|r| (r.propensity - 1.0 / n_items as f64).abs() <= UNIFORM_SLACK);
    let policy = if uniform {
        PolicyConfig::epsilon_greedy(1.0)
    } else {
        // The OBD's behaviour policy is Thompson sampling on the statistics alone.
        PolicyConfig::Thompson {
            alpha: 1.0,
            beta: 1.0,
            draws: 200,
            personal: 0.0,
        }
    };
    let item_ids: Vec<String> = (0..n_items).map(|i| i.to_string()).collect();
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        records.extend(row.into_records(&columns, &item_ids, &policy));
    }
    Ok(records)
}

/// Where the needed columns are.
struct Columns {
    count: usize,
    timestamp: usize,
    item: usize,
    position: usize,
    click: usize,
    propensity: usize,
    /// (column, name) of every user feature.
    features: Vec<(usize, String)>,
    /// Column of each item's affinity, by item id.
    affinities: Vec<usize>,
}

impl Columns {
    fn new(path: &Path, header: &str) -> Result<Self, EvalError> {
        let names: Vec<&str> = header.trim_end_matches('\r').split(',').collect();
        let find = |name: &str| {
            names
                .iter()
                .position(|n| *n == name)
                .ok_or_else(|| EvalError::line(path, 1, format!("the header has no column {name}")))
        };
        let mut affinities = Vec::new();
        for (column, name) in names.iter().enumerate() {
            if let Some(suffix) = name.strip_prefix(AFFINITY) {
                let item: usize = suffix.parse().map_err(|_| {
                    EvalError::line(path, 1, format!("column {name} does not name an item"))
                })?;
                affinities.push((item, column));
            }
        }
        affinities.sort_unstable();
        if let Some((expected, (item, _))) = affinities
            .iter()
            .enumerate()
            .find(|(expected, (item, _))| expected != item)
        {
            return Err(EvalError::line(
                path,
                1,
                format!("the affinity columns skip item {expected} (next is {AFFINITY}{item})"),
            ));
        }
        Ok(Self {
            count: names.len(),
            timestamp: find("timestamp")?,
            item: find("item_id")?,
            position: find("position")?,
            click: find("click")?,
            propensity: find("propensity_score")?,
            features: names
                .iter()
                .enumerate()
                .filter(|(_, n)| n.starts_with(USER_FEATURE))
                .map(|(i, n)| (i, (*n).to_owned()))
                .collect(),
            affinities: affinities.into_iter().map(|(_, column)| column).collect(),
        })
    }

    /// Parses data line `line`; the error names the bad column.
    fn row(&self, text: &str, line: usize) -> Result<Row, String> {
        let fields: Vec<&str> = text.split(',').collect();
        if fields.len() != self.count {
            return Err(format!(
                "has {} fields; the header has {}",
                fields.len(),
                self.count
            ));
        }
        let bad = |name: &str, value: &str, what: &str| format!("column {name}: {value:?} {what}");
        let integer = |column: usize, name: &str| {
            fields[column]
                .parse::<usize>()
                .map_err(|_| bad(name, fields[column], "is not a non-negative integer"))
        };
        let number = |column: usize, name: String| {
            fields[column]
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(&name, fields[column], "is not a finite number"))
        };
        let timestamp = parse_timestamp(fields[self.timestamp]).ok_or_else(|| {
            bad(
                "timestamp",
                fields[self.timestamp],
                "is not a date and time",
            )
        })?;
        let clicked = match fields[self.click] {
            "0" => false,
            "1" => true,
            other => return Err(bad("click", other, "is not 0 or 1")),
        };
        let propensity = number(self.propensity, "propensity_score".into())?;
        if !(propensity > 0.0 && propensity <= 1.0) {
            return Err(bad(
                "propensity_score",
                fields[self.propensity],
                "is not in (0, 1]",
            ));
        }
        let affinity = self
            .affinities
            .iter()
            .enumerate()
            .map(|(item, &column)| number(column, format!("{AFFINITY}{item}")))
            .collect::<Result<_, _>>()?;
        Ok(Row {
            line,
            timestamp,
            item: integer(self.item, "item_id")?,
            position: integer(self.position, "position")?,
            clicked,
            propensity,
            features: self
                .features
                .iter()
                .map(|&(column, _)| fields[column].to_owned())
                .collect(),
            affinity,
        })
    }
}

/// One parsed data line.
struct Row {
    line: usize,
    timestamp: i64,
    item: usize,
    position: usize,
    clicked: bool,
    propensity: f64,
    /// User feature values, in the order of [`Columns::features`].
    features: Vec<String>,
    /// Affinity by item id (empty without affinity columns).
    affinity: Vec<f64>,
}

impl Row {
    fn into_records(
        self,
        columns: &Columns,
        item_ids: &[String],
        policy: &PolicyConfig,
    ) -> impl Iterator<Item = LogRecord> {
        let score = |i: usize| self.affinity.get(i).copied().unwrap_or(0.0);
        let mut order: Vec<usize> = (0..item_ids.len()).collect();
        // Stable: equal affinities keep item id order.
        order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
        let request_id = format!("obd-{}", self.line);
        let item_id = item_ids[self.item].clone();
        let attributes: BTreeMap<String, String> = columns
            .features
            .iter()
            .map(|(_, name)| name.clone())
            .zip(self.features)
            .collect();
        let decision = DecisionRecord {
            request_id: request_id.clone(),
            timestamp: self.timestamp,
            segment: format!("position_{}", self.position),
            context: (!attributes.is_empty()).then(|| Context {
                attributes,
                ..Context::default()
            }),
            policy: policy.clone(),
            fallback: false,
            ranker: "obd".into(),
            model_version: "obd".into(),
            candidates: order
                .iter()
                .map(|&i| LoggedCandidate {
                    item_id: item_ids[i].clone(),
                    score: score(i),
                })
                .collect(),
            slate: vec![LoggedSlot {
                item_id: item_id.clone(),
                propensity: self.propensity,
                explored: order.first() != Some(&self.item),
            }],
        };
        let reward = self.clicked.then_some(LogRecord::Reward(RewardRecord {
            request_id,
            timestamp: self.timestamp,
            item_id,
            position: 0,
            event: EventType::Click,
            reward: 1.0,
        }));
        std::iter::once(LogRecord::Decision(Box::new(decision))).chain(reward)
    }
}

/// Milliseconds since the Unix epoch of `YYYY-MM-DD HH:MM:SS[.fraction][Z|±HH:MM]` (`T`
/// also separates date and time; no offset means UTC).
fn parse_timestamp(s: &str) -> Option<i64> {
    let digits = |from: usize, len: usize| -> Option<i64> {
        let t = s.get(from..from + len)?;
        t.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| t.parse().ok())
            .flatten()
    };
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b' ' | b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut pos = 19;
    let mut millis = 0;
    if b.get(pos) == Some(&b'.') {
        let len = b[pos + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if len == 0 {
            return None;
        }
        // Milliseconds: the first three digits, padded.
        let head = digits(pos + 1, len.min(3))?;
        millis = head * 10_i64.pow(3 - len.min(3) as u32);
        pos += 1 + len;
    }
    let offset_minutes = match &s[pos..] {
        "" | "Z" => 0,
        rest if rest.len() == 6 && b[pos + 3] == b':' => {
            let sign = match b[pos] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            sign * (digits(pos + 1, 2)? * 60 + digits(pos + 4, 2)?)
        }
        _ => return None,
    };
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::ope::{OpeOptions, TargetPolicy, evaluate};

    const HEADER: &str = concat!(
        ",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,",
        "user-item_affinity_0,user-item_affinity_1,user-item_affinity_2"
    );

    /// Writes `text` to a fresh file in the system's temporary directory.
    fn file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("onrec-eval-obd-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn read(name: &str, rows: &[&str]) -> Result<Vec<LogRecord>, EvalError> {
        let path = file(
            name,
            &(std::iter::once(HEADER).chain(rows.iter().copied()))
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        );
        let out = read_obd(&path);
        std::fs::remove_file(&path).unwrap();
        out
    }

    fn decisions(records: &[LogRecord]) -> Vec<&DecisionRecord> {
        records
            .iter()
            .filter_map(|r| match r {
                LogRecord::Decision(d) => Some(&**d),
                LogRecord::Reward(_) => None,
            })
            .collect()
    }

    #[test]
    fn rows_become_one_slot_decisions_and_clicks_rewards() {
        let third = 1.0 / 3.0;
        let records = read(
            "ok",
            &[
                &format!("0,2019-11-24 00:00:34.762830+00:00,1,2,1,{third},u0,v0,0.0,0.5,0.5"),
                &format!("1,2019-11-24 00:00:35+00:00,2,1,0,{third},u1,v1,0.0,0.0,0.0"),
            ],
        )
        .unwrap();
        assert_eq!(records.len(), 3);
        let LogRecord::Decision(first) = &records[0] else {
            panic!("{:?}", records[0])
        };
        assert_eq!(first.request_id, "obd-2");
        assert_eq!(first.timestamp, 1_574_553_634_762);
        assert_eq!(first.segment, "position_2");
        assert_eq!(first.policy, PolicyConfig::epsilon_greedy(1.0));
        // Best first by affinity, ties by item id.
        let order: Vec<(&str, f64)> = first
            .candidates
            .iter()
            .map(|c| (c.item_id.as_str(), c.score))
            .collect();
        assert_eq!(order, [("1", 0.5), ("2", 0.5), ("0", 0.0)]);
        assert_eq!(first.slate.len(), 1);
        assert_eq!(first.slate[0].item_id, "1");
        assert_eq!(first.slate[0].propensity, third);
        assert!(!first.slate[0].explored);
        let attributes = &first.context.as_ref().unwrap().attributes;
        assert_eq!(attributes["user_feature_0"], "u0");
        assert_eq!(attributes["user_feature_1"], "v0");
        let LogRecord::Reward(click) = &records[1] else {
            panic!("{:?}", records[1])
        };
        assert_eq!(
            (
                click.request_id.as_str(),
                click.item_id.as_str(),
                click.position,
                click.reward
            ),
            ("obd-2", "1", 0, 1.0)
        );
        let LogRecord::Decision(second) = &records[2] else {
            panic!("{:?}", records[2])
        };
        assert_eq!(second.segment, "position_1");
        assert!(second.slate[0].explored);

        // The uniform target on a uniform log: every weight is 1, IPS is the click rate.
        let target =
            TargetPolicy::from_json(r#"{"policy": {"kind": "epsilon_greedy", "epsilon": 1.0}}"#)
                .unwrap();
        let report = evaluate(&records, &target, &OpeOptions::default()).unwrap();
        assert!((report.per_decision.ips.value - 0.5).abs() < 1e-12);
        assert!((report.max_weight - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_log_that_is_not_uniform_is_labelled_thompson() {
        let records = read(
            "bts",
            &[
                "0,2019-11-24 00:00:34+00:00,1,1,0,0.5,u,v,0,0,0",
                "1,2019-11-24 00:00:35+00:00,2,1,0,0.25,u,v,0,0,0",
            ],
        )
        .unwrap();
        assert!(
            decisions(&records)
                .iter()
                .all(|d| d.policy.kind() == "thompson")
        );
    }

    #[test]
    fn bad_rows_name_line_and_column() {
        let ok = "0,2019-11-24 00:00:34+00:00,1,1,0,0.5,u,v,0,0,0";
        let cases = [
            (
                "0,2019-11-24 00:00:34+00:00,1,1,2,0.5,u,v,0,0,0",
                ":3: column click: \"2\" is not 0 or 1",
            ),
            (
                "0,2019-11-24 00:00:34+00:00,1,1,0,0,u,v,0,0,0",
                ":3: column propensity_score: \"0\" is not in (0, 1]",
            ),
            (
                "0,2019-11-24 00:00:34+00:00,1,1,0,abc,u,v,0,0,0",
                ":3: column propensity_score: \"abc\" is not a finite number",
            ),
            (
                "0,2019-11-24 00:00:34+00:00,x,1,0,0.5,u,v,0,0,0",
                ":3: column item_id: \"x\" is not a non-negative integer",
            ),
            (
                "0,2019-11-24 00:00:34+00:00,7,1,0,0.5,u,v,0,0,0",
                ":3: column item_id: 7 is out of range; the file has 3 items",
            ),
            (
                "0,2019-11-24 00:00:34+00:00,1,-1,0,0.5,u,v,0,0,0",
                ":3: column position: \"-1\" is not a non-negative integer",
            ),
            (
                "0,24.11.2019,1,1,0,0.5,u,v,0,0,0",
                ":3: column timestamp: \"24.11.2019\" is not a date and time",
            ),
            (
                "0,2019-11-24 00:00:34+00:00,1,1,0,0.5,u,v,0,NaN,0",
                ":3: column user-item_affinity_1: \"NaN\" is not a finite number",
            ),
            (
                "0,2019-11-24 00:00:34+00:00,1,1,0,0.5",
                ":3: has 6 fields; the header has 11",
            ),
        ];
        for (row, expected) in cases {
            let err = read("bad", &[ok, row]).unwrap_err().to_string();
            assert!(
                err.ends_with(expected),
                "{err} does not end with {expected}"
            );
        }
    }

    #[test]
    fn a_bad_header_is_an_error() {
        let path = file("header", ",timestamp,item_id,position,propensity_score\n");
        let err = read_obd(&path).unwrap_err().to_string();
        assert!(err.ends_with(":1: the header has no column click"), "{err}");
        std::fs::write(
            &path,
            ",timestamp,item_id,position,click,propensity_score,user-item_affinity_1\n",
        )
        .unwrap();
        let err = read_obd(&path).unwrap_err().to_string();
        assert!(
            err.ends_with(":1: the affinity columns skip item 0 (next is user-item_affinity_1)"),
            "{err}"
        );
        std::fs::write(&path, "").unwrap();
        let err = read_obd(&path).unwrap_err().to_string();
        assert!(
            err.ends_with(":1: the file is empty; expected a header"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(read_obd(&path).is_err());
    }

    #[test]
    fn timestamps_parse_with_fraction_and_offset() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse_timestamp("1969-12-31T23:59:59Z"), Some(-1000));
        assert_eq!(
            parse_timestamp("2000-02-29 12:00:00+00:00"),
            Some(951_825_600_000)
        );
        assert_eq!(
            parse_timestamp("2019-11-24 00:00:34.762830+09:00"),
            Some(1_574_521_234_762)
        );
        assert_eq!(
            parse_timestamp("2019-11-24 00:00:34.7+00:00"),
            Some(1_574_553_634_700)
        );
        for bad in [
            "2019-11-24",
            "2019-13-01 00:00:00",
            "2019-11-24 00:00:34.",
            "2019-11-24 00:00:34+0900",
            "2019-11-24 00:00:34 UTC",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    /// Estimates the uniform random policy from an OBD behaviour log and prints it.
    fn uniform_from(dir: &Path, campaign: &str) -> (f64, crate::ope::OpeReport) {
        let random = read_obd(&dir.join(format!("random/{campaign}/{campaign}.csv"))).unwrap();
        let bts = read_obd(&dir.join(format!("bts/{campaign}/{campaign}.csv"))).unwrap();
        let random_decisions = decisions(&random).len();
        let clicks = random.len() - random_decisions;
        let ctr = clicks as f64 / random_decisions as f64;
        let target =
            TargetPolicy::from_json(r#"{"policy": {"kind": "epsilon_greedy", "epsilon": 1.0}}"#)
                .unwrap();
        let report = evaluate(&bts, &target, &OpeOptions::default()).unwrap();
        let v = &report.per_decision;
        eprintln!(
            "OBD {campaign}: random CTR {ctr:.5} ({clicks}/{random_decisions}); uniform from \
             BTS: IPS {:.5} [{:.5}, {:.5}], SNIPS {:.5} [{:.5}, {:.5}], DR {:.5} [{:.5}, \
             {:.5}]; BTS CTR {:.5}; ESS {:.0}, max weight {:.1}",
            v.ips.value,
            v.ips.low,
            v.ips.high,
            v.snips.value,
            v.snips.low,
            v.snips.high,
            v.dr.value,
            v.dr.low,
            v.dr.high,
            v.logged.value,
            report.ess,
            report.max_weight
        );
        (ctr, report)
    }

    #[test]
    fn the_uniform_policy_estimated_from_bts_matches_the_random_log() {
        let Some(dir) = std::env::var_os("ONREC_OBD_DIR") else {
            eprintln!("ONREC_OBD_DIR is unset; skipping the Open Bandit Dataset test");
            return;
        };
        let dir = PathBuf::from(dir);
        let (ctr, report) = uniform_from(&dir, "all");
        let v = &report.per_decision;
        for e in [v.logged, v.ips, v.snips, v.dr] {
            assert!(
                e.value.is_finite() && e.low.is_finite() && e.high.is_finite(),
                "{e:?}"
            );
        }
        assert!(
            v.ips.low <= ctr && ctr <= v.ips.high,
            "IPS {:?} misses {ctr}",
            v.ips
        );
        assert!(
            v.snips.low <= ctr && ctr <= v.snips.high,
            "SNIPS {:?} misses {ctr}",
            v.snips
        );
        let c = report.counts;
        assert_eq!(
            (c.decisions, c.slots, c.orphan_rewards),
            (10_000, 10_000, 0)
        );
        assert!(c.rewards > 0 && c.rewards < c.decisions, "{c:?}");
        assert!((v.logged.value - c.rewards as f64 / 1e4).abs() < 1e-12);
        assert_eq!(report.positions.len(), 1);
        for campaign in ["men", "women"] {
            uniform_from(&dir, campaign);
        }
    }
}
