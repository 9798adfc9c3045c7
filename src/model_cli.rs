//! `onrec train` and `onrec eval`: fit the encoder on an interaction log and measure it
//! with chronological leave-one-out and full ranking.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use onrec_model::checkpoint;
use onrec_model::data::{self, Case, Format, Sequences, Split};
use onrec_model::device::{self, DeviceChoice};
use onrec_model::eval::{self, Ranks, Report};
use onrec_model::metrics::{Interval, METRIC_NAMES, Metrics, bootstrap};
use onrec_model::sasrec::Config;
use onrec_model::text::{self, TextModel};
use onrec_model::train::{self, ItemInputs, TrainConfig};

/// Settings of `onrec train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Interaction log to learn from
    #[arg(long)]
    interactions: PathBuf,
    /// Its format: movielens (u.data, ratings.dat), recbole (.inter), csv
    /// (user,item,timestamp) or events (onrec's own event log, DATA_DIR/events.jsonl)
    #[arg(long)]
    format: Format,
    /// Directory to write the checkpoint to
    #[arg(long)]
    out: PathBuf,
    /// Epochs: the learning rate decays to zero at the last one (training stops earlier
    /// when validation NDCG@10 stops improving)
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Epochs without improvement before stopping
    #[arg(long, default_value_t = 10)]
    patience: usize,
    /// Sequences per step
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// AdamW's peak learning rate, after a warm-up over the first epoch
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW weight decay
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Seed of initial weights, dropout and batch order
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Longest history read
    #[arg(long, default_value_t = 50)]
    max_len: usize,
    /// Width of item and user vectors
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Transformer blocks
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Attention heads
    #[arg(long, default_value_t = 2)]
    heads: usize,
    /// Dropout probability
    #[arg(long, default_value_t = 0.5)]
    dropout: f32,
    /// Learn a weight for items already in the user's history (whether people come back
    /// to what they had or move on from it)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    repeat: bool,
    /// A sentence-transformers model directory (BERT: config.json, tokenizer.json,
    /// model.safetensors): the item tower adds a learned projection of each item's text
    /// vector, so items are also known by what they are. Needs --item-text
    #[arg(long, requires = "item_text")]
    text_model: Option<PathBuf>,
    /// The items' text: a catalog file (.jsonl, one item per line: item_id, title,
    /// category, tags, description) or a RecBole .item file (every column but item_id)
    #[arg(long, requires = "text_model")]
    item_text: Option<PathBuf>,
    /// With item text: the share of items whose own embedding each training step leaves
    /// out where they are scored as the next item, so that a second projection of the
    /// text learns to rank items on its own, as it must for items never trained on (0: no
    /// such projection; never-trained items then get the shared one)
    #[arg(long, default_value_t = train::DEFAULT_ID_DROPOUT)]
    id_dropout: f64,
    /// Cold-item protocol: withhold this share of the items (drawn with --seed) from
    /// training entirely; `onrec eval` then scores the users whose test item is one of them
    /// apart from the rest
    #[arg(long, default_value_t = 0.0)]
    cold_share: f64,
    /// cpu, or cuda (falls back to cpu without a GPU)
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
}

/// Settings of `onrec eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Checkpoint directory written by `onrec train`
    #[arg(long)]
    checkpoint: PathBuf,
    /// Interaction log to evaluate on (the last interaction of each user is the test case)
    #[arg(long)]
    interactions: PathBuf,
    /// Its format: movielens, recbole, csv or events
    #[arg(long)]
    format: Format,
    /// cpu, or cuda (falls back to cpu without a GPU)
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// A second checkpoint to compare with the first on the same users: its metrics, and
    /// the paired differences (second − first) with their intervals. It must know the
    /// same items
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Resamples of the users for the bootstrap 95% intervals (0: no intervals)
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Seed of the bootstrap
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Confidence of the printed intervals.
const CONFIDENCE: f64 = 0.95;

/// One table row: a label, then one cell per metric, right-aligned in `width`.
fn row(label: &str, cells: [String; 5], width: usize) -> String {
    let cells: String = cells.iter().map(|c| format!("{c:>width$}")).collect();
    format!("{label:<30}{cells}")
}

fn values(m: &Metrics) -> [String; 5] {
    m.values().map(|v| format!("{v:.4}"))
}

/// The metrics table: one row per ranker (label, report), history included, then
/// excluded.
fn table(rankers: &[(&str, Report)]) -> String {
    let mut lines = vec![row("", METRIC_NAMES.map(String::from), 9)];
    for (mode, pick) in [
        (
            "history included",
            (|r: &Report| r.history_included) as fn(&Report) -> Metrics,
        ),
        ("history excluded", |r: &Report| r.history_excluded),
    ] {
        for (i, (label, report)) in rankers.iter().enumerate() {
            let head = if i == 0 { mode } else { "" };
            lines.push(row(&format!("{head:<18}{label}"), values(&pick(report)), 9));
        }
    }
    lines.join("\n")
}

/// Bootstrap intervals of every metric, both ways, from per-case rows.
fn intervals(
    args: &EvalArgs,
    rows: impl Fn(&[usize], &[usize]) -> Vec<[f64; 5]>,
    ranks: (&Ranks, &Ranks),
) -> [[Interval; 5]; 2] {
    let (a, b) = ranks;
    [
        bootstrap(
            &rows(&a.included, &b.included),
            args.bootstrap,
            CONFIDENCE,
            args.seed,
        ),
        bootstrap(
            &rows(&a.excluded, &b.excluded),
            args.bootstrap,
            CONFIDENCE,
            args.seed,
        ),
    ]
}

/// The interval table: one row per ranker (label, intervals both ways).
fn interval_table(rankers: &[(&str, [[Interval; 5]; 2])], signed: bool) -> String {
    let cell = |iv: &Interval| {
        if signed {
            format!("[{:+.4}, {:+.4}]", iv.low, iv.high)
        } else {
            format!("[{:.4}, {:.4}]", iv.low, iv.high)
        }
    };
    let mut lines = vec![row("", METRIC_NAMES.map(String::from), 20)];
    for (k, mode) in ["history included", "history excluded"].iter().enumerate() {
        for (i, (label, ivs)) in rankers.iter().enumerate() {
            let head = if i == 0 { *mode } else { "" };
            lines.push(row(
                &format!("{head:<18}{label}"),
                ivs[k].each_ref().map(cell),
                20,
            ));
        }
    }
    lines.join("\n")
}

/// Trains, evaluates on the test cases, and writes the checkpoint.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&args.id_dropout) {
        anyhow::bail!("--id-dropout must be in [0, 1), not {}", args.id_dropout);
    }
    if !(0.0..1.0).contains(&args.cold_share) {
        anyhow::bail!("--cold-share must be in [0, 1), not {}", args.cold_share);
    }
    let device = device::select(args.device);
    let log = data::read(&args.interactions, args.format)?;
    let all = Sequences::from_interactions(log);
    let withheld = data::cold_items(all.num_items(), args.cold_share, args.seed);
    let seqs = all.without(&withheld);
    let split = Split::leave_one_out(&seqs);
    eprintln!(
        "{}: {} users, {} items, {} interactions; {} validation and test cases",
        args.interactions.display(),
        seqs.users.len(),
        seqs.num_items(),
        seqs.users.iter().map(Vec::len).sum::<usize>(),
        split.test.len()
    );
    if !withheld.is_empty() {
        eprintln!(
            "cold-item protocol: {} items and their {} interactions withheld from training",
            withheld.len(),
            all.users.iter().map(Vec::len).sum::<usize>()
                - seqs.users.iter().map(Vec::len).sum::<usize>()
        );
    }
    let text = match (&args.text_model, &args.item_text) {
        (Some(dir), Some(file)) => {
            let mut model = TextModel::load(dir, &device)
                .with_context(|| format!("loading the text model in {}", dir.display()))?;
            let texts = text::read_item_texts(file)?;
            let started = Instant::now();
            let table = model.table(&seqs.items, &texts)?;
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "embedded {} distinct item texts of {} items in {seconds:.1}s ({:.0} texts/s)",
                model.cached(),
                seqs.num_items(),
                model.cached() as f64 / seconds
            );
            Some(table)
        }
        _ => None,
    };
    let config = Config {
        num_items: seqs.num_items(),
        max_len: args.max_len,
        hidden: args.hidden,
        heads: args.heads,
        layers: args.layers,
        ff: args.hidden * 4,
        dropout: args.dropout,
        repeat: args.repeat,
        text_dim: text.as_ref().map_or(Ok(0), |t| t.dim(1))?,
        text_alone: text.is_some() && args.id_dropout > 0.0,
    };
    let tc = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        patience: args.patience,
        seed: args.seed,
        max_grad_norm: 5.0,
        progress: true,
        id_dropout: args.id_dropout,
    };
    let inputs = ItemInputs {
        text,
        withheld: withheld.clone(),
    };
    let trained = train::train(&config, &tc, &split, &inputs, &device)?;
    let test = eval::evaluate(&trained.model, &split.test, &device)?;
    let popularity = eval::evaluate_popularity(&split, seqs.num_items())?;
    println!(
        "trained {} epochs in {:.1}s (best epoch {}); test, full ranking over {} items, {} users:",
        trained.report.epochs_run,
        trained.report.seconds,
        trained.report.best_epoch,
        seqs.num_items(),
        split.test.len()
    );
    println!(
        "{}",
        table(&[("encoder", test), ("popularity", popularity)])
    );
    let record = serde_json::json!({
        "interactions": args.interactions.display().to_string(),
        "train": tc,
        "report": trained.report,
        "test": test,
        "test_popularity": popularity,
    });
    checkpoint::save(
        &args.out,
        &trained.varmap,
        &config,
        &seqs.items,
        trained.model.text_vectors(),
        &record,
    )?;
    let ids: Vec<&str> = withheld
        .iter()
        .map(|&i| seqs.items[i as usize].as_str())
        .collect();
    checkpoint::write_withheld(&args.out, &ids)?;
    println!("checkpoint written to {}", args.out.display());
    Ok(())
}

/// Evaluates a checkpoint on an interaction log.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let device = device::select(args.device);
    let ckpt = checkpoint::load(&args.checkpoint, &device)
        .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let log = data::read(&args.interactions, args.format)?;
    let (seqs, dropped) = Sequences::with_vocabulary(log, &ckpt.items);
    if dropped > 0 {
        eprintln!(
            "{dropped} interactions name items the checkpoint does not know; they are left out"
        );
    }
    let split = Split::leave_one_out(&seqs);
    let withheld_ids = checkpoint::read_withheld(&args.checkpoint)?;
    let withheld: HashSet<u32> = withheld_ids
        .iter()
        .filter_map(|id| ckpt.index.get(id).copied())
        .collect();
    let other = match &args.compare {
        Some(path) => {
            let other = checkpoint::load(path, &device)
                .with_context(|| format!("loading {}", path.display()))?;
            if other.items != ckpt.items {
                anyhow::bail!(
                    "{} and {} know different items; a paired comparison needs checkpoints trained on the same catalog",
                    args.checkpoint.display(),
                    path.display()
                );
            }
            if checkpoint::read_withheld(path)? != withheld_ids {
                anyhow::bail!(
                    "{} and {} withheld different items from training; a paired comparison needs the same cold items (--cold-share and --seed)",
                    args.checkpoint.display(),
                    path.display()
                );
            }
            Some(other)
        }
        None => None,
    };
    // Popularity counts what the encoder was trained on: withheld items have none.
    let mut counts = eval::popularity_scores(&split, seqs.num_items(), true);
    for &i in &withheld {
        counts[i as usize] = 0.0;
    }
    let groups: Vec<(String, Vec<Case>)> = if withheld.is_empty() {
        vec![(String::new(), split.test.clone())]
    } else {
        let (cold, warm): (Vec<Case>, Vec<Case>) = split
            .test
            .iter()
            .cloned()
            .partition(|c| withheld.contains(&c.target));
        vec![
            (
                format!(
                    "cold items (the {} withheld from training), users whose test item is one of them: ",
                    withheld.len()
                ),
                cold,
            ),
            ("warm items, the other users: ".to_owned(), warm),
        ]
    };
    for (heading, cases) in groups {
        let test = eval::encoder_ranks(&ckpt.model, &cases, &device)?;
        let popularity =
            eval::rank_all(&cases, 256, |chunk| Ok(vec![counts.clone(); chunk.len()]))?;
        let other = other
            .as_ref()
            .map(|o| eval::encoder_ranks(&o.model, &cases, &device))
            .transpose()?;
        println!(
            "{heading}test, chronological leave-one-out, full ranking over {} items, {} users ({:.1}s):",
            seqs.num_items(),
            cases.len(),
            started.elapsed().as_secs_f64()
        );
        report(&args, &test, other.as_ref(), &popularity);
    }
    Ok(())
}

/// Prints the metrics of the encoder, the compared checkpoint and popularity on the same
/// cases, their bootstrap intervals, and the paired differences.
fn report(args: &EvalArgs, test: &Ranks, other: Option<&Ranks>, popularity: &Ranks) {
    let mut rankers = vec![("encoder", test)];
    rankers.extend(other.iter().map(|o| ("compared", *o)));
    rankers.push(("popularity", popularity));
    let reports: Vec<(&str, Report)> = rankers.iter().map(|(l, r)| (*l, r.report())).collect();
    println!("{}", table(&reports));
    if args.bootstrap == 0 {
        return;
    }
    let own = |a: &[usize], _: &[usize]| a.iter().map(|&r| Metrics::of_rank(r)).collect();
    let own_intervals: Vec<(&str, [[Interval; 5]; 2])> = rankers
        .iter()
        .map(|(label, r)| (*label, intervals(args, own, (r, r))))
        .collect();
    println!(
        "95% intervals, bootstrap over the users ({} resamples, seed {}):",
        args.bootstrap, args.seed
    );
    println!("{}", interval_table(&own_intervals, false));
    if let Some(other) = other {
        let diff = |a: &[usize], b: &[usize]| {
            a.iter()
                .zip(b)
                .map(|(&ra, &rb)| {
                    let (ma, mb) = (Metrics::of_rank(ra), Metrics::of_rank(rb));
                    std::array::from_fn(|k| mb[k] - ma[k])
                })
                .collect()
        };
        let (a, b) = (test.report(), other.report());
        let mean_diff = |pick: fn(&Report) -> Metrics| {
            let (ma, mb) = (pick(&a).values(), pick(&b).values());
            std::array::from_fn::<String, 5, _>(|k| format!("{:+.4}", mb[k] - ma[k]))
        };
        println!(
            "compared − encoder, paired on the same {} users ({}):",
            test.included.len(),
            args.compare
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        );
        let table = interval_table(&[("95%", intervals(args, diff, (test, other)))], true);
        let (header, rest) = table.split_once('\n').unwrap_or((&table, ""));
        println!("{header}");
        println!(
            "{}",
            row(
                "history included  mean",
                mean_diff(|r| r.history_included),
                20
            )
        );
        println!(
            "{}",
            row(
                "history excluded  mean",
                mean_diff(|r| r.history_excluded),
                20
            )
        );
        println!("{rest}");
    }
}
