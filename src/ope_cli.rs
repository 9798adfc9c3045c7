//! `onrec ope`: estimate a target policy's value from a decision log or an Open Bandit
//! Dataset file (IPS, SNIPS and doubly robust, with bootstrap intervals).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use onrec_engine::decisions::LogRecord;
use onrec_eval::ope::{DEFAULT_BOOTSTRAP, DEFAULT_CONFIDENCE, DEFAULT_SEED};
use onrec_eval::{Estimate, OpeOptions, OpeReport, TargetPolicy, evaluate, read_log, read_obd};
use onrec_policy::RedisConn;
use redis::aio::ConnectionManagerConfig;

/// The format of `--log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// onrec's JSON-lines decision log, with its rotated files
    Onrec,
    /// An Open Bandit Dataset CSV file, e.g. bts/all/all.csv
    Obd,
    /// The service's decision log stream in Redis: --log is the Redis URL (redis://,
    /// rediss://, redis+sentinel:// or redis+cluster://, as the service's redis_url)
    Redis,
}

/// The arguments of `onrec ope`.
#[derive(Debug, clap::Args)]
pub struct OpeArgs {
    /// Decision log to estimate from (rotated files beside it are read too); with
    /// --format obd, an Open Bandit Dataset CSV file; with --format redis, the Redis URL
    #[arg(long)]
    log: PathBuf,
    /// Format of the log
    #[arg(long, value_enum, default_value_t = LogFormat::Onrec)]
    format: LogFormat,
    /// With --format redis: the stream the service writes (its decision_log_stream)
    #[arg(long, default_value = "onrec:decisions")]
    stream: String,
    /// With --format redis over TLS: CA certificates (PEM) to verify the server against
    /// instead of the system's roots
    #[arg(long)]
    redis_ca_file: Option<PathBuf>,
    /// Target policy: a JSON or TOML (.toml) file holding {"policy": {...}, "segments":
    /// {...}}, or that JSON inline when the value starts with `{`
    #[arg(long)]
    policy: String,
    /// Bootstrap resamples behind the intervals, 0..=10000
    #[arg(long, default_value_t = DEFAULT_BOOTSTRAP)]
    bootstrap: usize,
    /// Confidence of the intervals, in (0, 1)
    #[arg(long, default_value_t = DEFAULT_CONFIDENCE)]
    confidence: f64,
    /// Seed of the bootstrap and of Thompson sampling targets
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Print the report as JSON instead of a table
    #[arg(long)]
    json: bool,
}

/// Runs `onrec ope`.
pub fn run(args: OpeArgs) -> anyhow::Result<()> {
    let target = target(&args.policy)?;
    let options = OpeOptions {
        bootstrap: args.bootstrap,
        confidence: args.confidence,
        seed: args.seed,
    };
    // Before reading what may be a large log.
    options.validate()?;
    let records = match args.format {
        LogFormat::Onrec => {
            let log = read_log(&args.log)?;
            eprintln!(
                "{}: {} records from {} file(s){}",
                args.log.display(),
                log.records.len(),
                log.files.len(),
                match log.truncated {
                    0 => String::new(),
                    n => format!(", {n} cut-off last line(s) skipped"),
                }
            );
            log.records
        }
        LogFormat::Obd => read_obd(&args.log)?,
        LogFormat::Redis => {
            let url = args.log.to_string_lossy();
            let ca = match &args.redis_ca_file {
                Some(path) => Some(
                    std::fs::read(path)
                        .with_context(|| format!("reading the CA file {}", path.display()))?,
                ),
                None => None,
            };
            let records = read_stream(&url, ca.as_deref(), &args.stream)
                .with_context(|| format!("reading the stream {} at {url}", args.stream))?;
            eprintln!("{}: {} records", args.stream, records.len());
            records
        }
    };
    let report = evaluate(&records, &target, &options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// Entries read per XRANGE call.
const STREAM_PAGE: usize = 10_000;

/// Every record of the Redis stream `key`, oldest first: each entry's `record` field. The
/// URL is one server's or a Sentinel URL, as the service takes it.
fn read_stream(url: &str, ca_pem: Option<&[u8]>, key: &str) -> anyhow::Result<Vec<LogRecord>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(read_stream_async(url, ca_pem, key))
}

async fn read_stream_async(
    url: &str,
    ca_pem: Option<&[u8]>,
    key: &str,
) -> anyhow::Result<Vec<LogRecord>> {
    let mut conn = RedisConn::open(
        url,
        ca_pem,
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_number_of_retries(1),
    )?;
    let mut records = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(STREAM_PAGE)
            .query_async(&mut conn)
            .await?;
        for (id, fields) in &page {
            let json = fields
                .chunks_exact(2)
                .find(|kv| kv[0] == "record")
                .map(|kv| &kv[1])
                .ok_or_else(|| anyhow::anyhow!("entry {id} has no record field"))?;
            records.push(serde_json::from_str(json).with_context(|| format!("entry {id}"))?);
        }
        match page.last() {
            Some((id, _)) if page.len() == STREAM_PAGE => start = format!("({id}"),
            _ => break,
        }
    }
    Ok(records)
}

/// The target policy from a file or inline JSON.
fn target(spec: &str) -> anyhow::Result<TargetPolicy> {
    if spec.trim_start().starts_with('{') {
        return Ok(TargetPolicy::from_json(spec)?);
    }
    let path = Path::new(spec);
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the target policy {}", path.display()))?;
    let target = if path.extension().is_some_and(|e| e == "toml") {
        TargetPolicy::from_toml(&text)
    } else {
        TargetPolicy::from_json(&text)
    };
    target.with_context(|| format!("in {}", path.display()))
}

fn cell(e: &Estimate) -> String {
    format!("{:>12.6}  [{:>10.6}, {:>10.6}]", e.value, e.low, e.high)
}

/// The report as a table: estimates per decision and per slot, then per position.
fn table(r: &OpeReport) -> String {
    let c = &r.counts;
    let level = format!("{}%", (r.confidence * 1000.0).round() / 10.0);
    let mut out = format!(
        "{} decisions, {} slots, {} rewards ({} orphaned), {} fallback decisions\n\n",
        c.decisions, c.slots, c.rewards, c.orphan_rewards, c.fallbacks
    );
    let _ = writeln!(
        out,
        "{:<8}{:>12}  {:<24}  {:>12}  {level} interval",
        "",
        "per decision",
        format!("{level} interval"),
        "per slot",
    );
    let (d, s) = (&r.per_decision, &r.per_slot);
    for (name, per_decision, per_slot) in [
        ("logged", &d.logged, &s.logged),
        ("IPS", &d.ips, &s.ips),
        ("SNIPS", &d.snips, &s.snips),
        ("DR", &d.dr, &s.dr),
    ] {
        let _ = writeln!(out, "{name:<8}{}  {}", cell(per_decision), cell(per_slot));
    }
    let _ = writeln!(
        out,
        "\neffective sample size {:.1} of {} slot weights; largest weight {:.3}; \
         {} bootstrap resamples, seed {}\n",
        r.ess, c.slots, r.max_weight, r.bootstrap, r.seed
    );
    let _ = writeln!(
        out,
        "{:>8}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}{:>13}",
        "position", "decisions", "logged", "IPS", "SNIPS", "DR", "ESS", "max weight"
    );
    for p in &r.positions {
        let _ = writeln!(
            out,
            "{:>8}{:>11}{:>11.6}{:>11.6}{:>11.6}{:>11.6}{:>11.1}{:>13.3}",
            p.position, p.decisions, p.logged, p.ips, p.snips, p.dr, p.ess, p.max_weight
        );
    }
    out
}
