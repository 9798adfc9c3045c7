//! The closed-loop simulator: a synthetic shop whose truth is known, driving the engine.
//! `onrec simulate`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use onrec_sim::report::{self, Report};
use onrec_sim::{
    DEFAULT_POLICIES, EncoderSettings, LogRecord, PolicyParams, QParams, SimConfig, SimError,
    Simulation, World, WorldConfig, spec,
};

/// The arguments of `onrec simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Rounds (requests) per policy
    #[arg(long, default_value_t = 100_000)]
    rounds: usize,
    /// Seed of the world, its traffic and its users' responses
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Policies to compare, comma-separated: popularity, random, epsilon_greedy, ucb1,
    /// thompson, encoder, encoder_<policy>, each optionally with +q (the Q-network)
    #[arg(long, default_value = DEFAULT_POLICIES)]
    policies: String,
    /// Users in the world
    #[arg(long, default_value_t = 2000)]
    users: usize,
    /// Items in the world's catalog
    #[arg(long, default_value_t = 1000)]
    items: usize,
    /// Item categories
    #[arg(long, default_value_t = 20)]
    categories: usize,
    /// Items per slate
    #[arg(long, default_value_t = 10)]
    n: u32,
    /// Candidates the ranker proposes to the bandit policy
    #[arg(long, default_value_t = 50)]
    candidates: usize,
    /// ε of epsilon_greedy
    #[arg(long, default_value_t = PolicyParams::default().epsilon)]
    epsilon: f64,
    /// Weight c of UCB1's confidence bonus (on the scale of the reward per impression)
    #[arg(long, default_value_t = PolicyParams::default().ucb_c)]
    ucb_c: f64,
    /// Monte Carlo draws of Thompson sampling's propensities
    #[arg(long, default_value_t = PolicyParams::default().thompson_draws)]
    thompson_draws: u32,
    /// Weight of the Q-network in the ranking of +q policies
    #[arg(long, default_value_t = QParams::default().weight)]
    q_weight: f64,
    /// Organic sessions the encoder of encoder* policies is trained on
    #[arg(long, default_value_t = EncoderSettings::default().sessions)]
    encoder_sessions: usize,
    /// Interactions per organic session
    #[arg(long, default_value_t = EncoderSettings::default().steps)]
    encoder_steps: usize,
    /// Most epochs of encoder training
    #[arg(long, default_value_t = EncoderSettings::default().epochs)]
    encoder_epochs: usize,
    /// Freeze the popularity ranker (event weights 0) and keep seen items, so the
    /// bandits face a stationary problem
    #[arg(long)]
    stationary: bool,
    /// Write an SVG plot of reward per round and cumulative regret to this file
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print the results as JSON instead of a table
    #[arg(long)]
    json: bool,
    /// Write each policy's decision log to DIR/<policy>.jsonl
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
}

/// Runs `onrec simulate`.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let specs = spec::parse_list(&args.policies)?;
    let world = World::new(WorldConfig {
        seed: args.seed,
        users: args.users,
        items: args.items,
        categories: args.categories,
        ..WorldConfig::default()
    })?;
    let mut config = SimConfig {
        rounds: args.rounds,
        n: args.n,
        params: PolicyParams {
            epsilon: args.epsilon,
            ucb_c: args.ucb_c,
            thompson_draws: args.thompson_draws,
        },
        q: QParams {
            weight: args.q_weight,
            ..QParams::default()
        },
        encoder: EncoderSettings {
            sessions: args.encoder_sessions,
            steps: args.encoder_steps,
            epochs: args.encoder_epochs,
            ..EncoderSettings::default()
        },
        ..SimConfig::default()
    };
    config.engine.candidates = args.candidates;
    if args.stationary {
        config = config.stationary();
    }
    let mut sim = Simulation::new(world, config)?;
    if let Some(dir) = &args.log_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the log directory {}", dir.display()))?;
    }
    eprintln!(
        "world: seed {}, {} users, {} items in {} categories; {} rounds per policy, slates of {}, {} candidates{}",
        args.seed,
        args.users,
        args.items,
        args.categories,
        args.rounds,
        args.n,
        args.candidates,
        if args.stationary {
            ", stationary ranker"
        } else {
            ""
        },
    );

    let mut encoder = None;
    if specs.iter().any(|s| s.ranker == onrec_sim::Ranker::Encoder) {
        let trained = sim.encoder().context("training the encoder")?;
        let r = trained.report();
        eprintln!(
            "encoder: trained on {} organic interactions in {:.1} s ({} epochs); held-out NDCG@10 {:.4} (popularity {:.4})",
            r.interactions, r.seconds, r.epochs_run, r.ndcg10, r.popularity_ndcg10
        );
        encoder = Some(r.clone());
    }

    let mut runs = Vec::with_capacity(specs.len());
    for spec in &specs {
        let run = match &args.log_dir {
            Some(dir) => {
                let path = dir.join(format!("{}.jsonl", spec.name));
                let file = std::fs::File::create(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                let mut out = std::io::BufWriter::new(file);
                let mut sink = |record: LogRecord| {
                    serde_json::to_writer(&mut out, &record)?;
                    out.write_all(b"\n")?;
                    Ok::<(), SimError>(())
                };
                let run = sim.run(spec, Some(&mut sink))?;
                out.flush()
                    .with_context(|| format!("writing {}", path.display()))?;
                run
            }
            None => sim.run(spec, None)?,
        };
        eprintln!(
            "{}: {:.1} s, cumulative regret {:.1}",
            spec.name, run.summary.wall_seconds, run.summary.cumulative_regret
        );
        runs.push(run);
    }

    if let Some(path) = &args.plot {
        report::plot_svg(&runs, path).with_context(|| format!("plotting to {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    if args.json {
        let report = Report::new(&sim, encoder.as_ref(), &runs);
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let summaries: Vec<_> = runs.iter().map(|r| r.summary.clone()).collect();
        print!("{}", report::table(&summaries));
        println!(
            "regret: the oracle's expected reward minus the served slate's, summed over rounds \
             (cum. regret) and per round over the last 10% of rounds (regret/rd@end)"
        );
    }
    Ok(())
}
