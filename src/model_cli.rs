//! `onrec train` and `onrec eval`: fit the encoder on an interaction log and measure it
//! with chronological leave-one-out and full ranking.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use onrec_model::data::{self, Format, Sequences, Split};
use onrec_model::device::{self, DeviceChoice};
use onrec_model::eval::{self, Report};
use onrec_model::sasrec::Config;
use onrec_model::train::{self, TrainConfig};
use onrec_model::{checkpoint, metrics::Metrics};

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
    /// Most epochs (training stops earlier when validation NDCG@10 stops improving)
    #[arg(long, default_value_t = 200)]
    epochs: usize,
    /// Epochs without improvement before stopping
    #[arg(long, default_value_t = 15)]
    patience: usize,
    /// Sequences per step
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// AdamW learning rate
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
}

fn row(label: &str, m: &Metrics) -> String {
    format!(
        "{label:<28}{:>8.4}{:>8.4}{:>9.4}{:>9.4}{:>8.4}",
        m.hr10, m.hr20, m.ndcg10, m.ndcg20, m.mrr10
    )
}

/// The metrics table: encoder and popularity, history included and excluded.
fn table(model: &Report, popularity: &Report) -> String {
    [
        format!(
            "{:<28}{:>8}{:>8}{:>9}{:>9}{:>8}",
            "", "HR@10", "HR@20", "NDCG@10", "NDCG@20", "MRR@10"
        ),
        row("history included  encoder", &model.history_included),
        row("                  popularity", &popularity.history_included),
        row("history excluded  encoder", &model.history_excluded),
        row("                  popularity", &popularity.history_excluded),
    ]
    .join("\n")
}

/// Trains, evaluates on the test cases, and writes the checkpoint.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let log = data::read(&args.interactions, args.format)?;
    let seqs = Sequences::from_interactions(log);
    let split = Split::leave_one_out(&seqs);
    eprintln!(
        "{}: {} users, {} items, {} interactions; {} validation and test cases",
        args.interactions.display(),
        seqs.users.len(),
        seqs.num_items(),
        seqs.users.iter().map(Vec::len).sum::<usize>(),
        split.test.len()
    );
    let config = Config {
        num_items: seqs.num_items(),
        max_len: args.max_len,
        hidden: args.hidden,
        heads: args.heads,
        layers: args.layers,
        ff: args.hidden * 4,
        dropout: args.dropout,
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
    };
    let device = device::select(args.device);
    let trained = train::train(&config, &tc, &split, &device)?;
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
    println!("{}", table(&test, &popularity));
    let record = serde_json::json!({
        "interactions": args.interactions.display().to_string(),
        "train": tc,
        "report": trained.report,
        "test": test,
        "test_popularity": popularity,
    });
    checkpoint::save(&args.out, &trained.varmap, &config, &seqs.items, &record)?;
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
    let test = eval::evaluate(&ckpt.model, &split.test, &device)?;
    let popularity = eval::evaluate_popularity(&split, seqs.num_items())?;
    println!(
        "test, chronological leave-one-out, full ranking over {} items, {} users ({:.1}s):",
        seqs.num_items(),
        split.test.len(),
        started.elapsed().as_secs_f64()
    );
    println!("{}", table(&test, &popularity));
    Ok(())
}
