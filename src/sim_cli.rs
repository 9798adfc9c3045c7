//! The closed-loop simulator: a synthetic shop whose truth is known, driving the engine.
//! `onrec simulate`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use onrec_sim::report::{self, Report};
use onrec_sim::{
    DEFAULT_POLICIES, EncoderSettings, HttpShop, LogRecord, PolicyParams, QParams, Repeats,
    SimConfig, SimError, Simulation, World, WorldConfig, spec,
};

/// Which shop to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[clap(rename_all = "snake_case")]
pub enum Scenario {
    /// A shop with a sales history in its catalog; compares the policies and rankers one
    /// by one (100,000 rounds, slates of 10)
    Classic,
    /// A fresh shop: a few hundred products in 8 categories, no sales history, the
    /// service exactly as shipped (`onrec`) beside a uniformly random slate and the
    /// oracle (20,000 rounds, slates of 5)
    Fresh,
}

/// The arguments of `onrec simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The shop and the default policies, rounds and shape that go with it
    #[arg(long, value_enum, default_value = "classic")]
    scenario: Scenario,
    /// What buying does to a buyer's later interest: indifferent, consumable (bought
    /// again) or durable (bought once)
    #[arg(long, default_value = "indifferent")]
    repeats: Repeats,
    /// Rounds (requests) per policy [classic: 100000, fresh: 20000]
    #[arg(long)]
    rounds: Option<usize>,
    /// Seed of the world, its traffic and its users' responses
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run in the worlds of several seeds instead (a list such as 1,2,3, ranges such as
    /// 1-6), as many at once as there are cores, and print each policy's mean and
    /// standard error over them
    #[arg(long, value_name = "SEEDS", conflicts_with_all = ["seed", "plot", "json", "log_dir", "url", "write_catalog"])]
    seeds: Option<String>,
    /// Policies to compare, comma-separated: onrec (the service as shipped), oracle,
    /// oracle_average (the best slate for the average user: no personalisation),
    /// oracle_learning (the truth about items and moments, each user's tastes learned
    /// from their responses by Bayes' rule), uniform (a random slate from the whole catalog), popularity, random (uniform among
    /// the popularity candidates), epsilon_greedy, ucb1, thompson, encoder, encoder_<policy>, each
    /// but onrec and the oracles optionally with +q (the Q-network) [classic: the rankers and
    /// policies one by one, fresh: uniform,onrec,oracle_average,oracle_learning,oracle]
    #[arg(long)]
    policies: Option<String>,
    /// Users in the world [classic: 2000, fresh: 3000]
    #[arg(long)]
    users: Option<usize>,
    /// Items in the world's catalog [classic: 1000, fresh: 400]
    #[arg(long)]
    items: Option<usize>,
    /// Item categories [classic: 20, fresh: 8]
    #[arg(long)]
    categories: Option<usize>,
    /// Items per slate [classic: 10, fresh: 5]
    #[arg(long)]
    n: Option<u32>,
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
    /// Weight of the personal ranking in ucb1 and thompson (0: the segment's bandit alone)
    #[arg(long, default_value_t = PolicyParams::default().personal)]
    personal: f64,
    /// Pseudo-impressions per item ucb1 and thompson take from the other segments'
    /// statistics (0: none); `onrec` takes the service's `segment_prior`
    #[arg(long, default_value_t = PolicyParams::default().segment_prior)]
    segment_prior: f64,
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
    /// Drive running servers instead of the service in process (the onrec policy),
    /// round-robin over them: each request and each round's events go to the next. They
    /// must serve the world's catalog (see --write-catalog)
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    url: Vec<String>,
    /// Write the world's catalog as a JSON-lines file for `onrec serve --catalog`, and exit
    #[arg(long, value_name = "FILE")]
    write_catalog: Option<PathBuf>,
}

/// Writes `items` as a JSON-lines catalog file.
fn write_catalog(items: &[onrec_engine::Item], path: &std::path::Path) -> Result<(), SimError> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for item in items {
        serde_json::to_writer(&mut out, item)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// The service as shipped over a catalog: the server's default configuration with the
/// catalog written to a file, built by the same code `onrec serve` runs. With `logging`,
/// its decision log is on (the run takes the records; nothing else writes them).
fn shipped_service(
    items: Vec<onrec_engine::Item>,
    logging: bool,
) -> Result<onrec_engine::Engine, SimError> {
    static BUILT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "onrec-sim-{}-{}",
        std::process::id(),
        BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("catalog.jsonl");
    write_catalog(&items, &path)?;
    let command = <onrec_server::Config as clap::Args>::augment_args(clap::Command::new("onrec"));
    let catalog = path.display().to_string();
    let mut args = vec!["onrec", "--catalog", catalog.as_str()];
    if logging {
        args.extend(["--decision-log", "file"]);
    }
    let matches = command
        .try_get_matches_from(args)
        .map_err(|e| SimError::config("service", e.to_string()))?;
    let engine = onrec_server::Config::from_matches(&matches)
        .and_then(|config| onrec_server::build_engine(&config))
        .map_err(|e| SimError::config("service", format!("{e:#}")));
    std::fs::remove_dir_all(&dir)?;
    engine
}

/// The simulation `args` describe in the world of `seed`; `None` once the world's catalog
/// is written, when `--write-catalog` asks only for that.
fn simulation(args: &SimulateArgs, seed: u64) -> anyhow::Result<Option<Simulation>> {
    let fresh = args.scenario == Scenario::Fresh;
    let pick = |given: Option<usize>, classic: usize, fresh_shop: usize| {
        given.unwrap_or(if fresh { fresh_shop } else { classic })
    };
    let shape = if fresh {
        WorldConfig::fresh_shop(seed)
    } else {
        WorldConfig::default()
    };
    let world_config = WorldConfig {
        seed,
        users: args.users.unwrap_or(shape.users),
        items: args.items.unwrap_or(shape.items),
        categories: args.categories.unwrap_or(shape.categories),
        repeats: args.repeats,
        ..shape
    };
    let (users, items, categories) = (
        world_config.users,
        world_config.items,
        world_config.categories,
    );
    let world = World::new(world_config)?;
    if let Some(path) = &args.write_catalog {
        write_catalog(&world.catalog(), path)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("{} items written to {}", world.num_items(), path.display());
        return Ok(None);
    }
    let rounds = pick(args.rounds, 100_000, 20_000);
    let n = args.n.unwrap_or(if fresh { 5 } else { 10 });
    let mut config = SimConfig {
        rounds,
        n,
        params: PolicyParams {
            epsilon: args.epsilon,
            ucb_c: args.ucb_c,
            thompson_draws: args.thompson_draws,
            personal: args.personal,
            segment_prior: args.segment_prior,
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
    if fresh {
        // The service's own settings, as shipped: no segment rules of the simulator's.
        config.segment_rules.clear();
    }
    let mut sim = Simulation::new(world, config)?.with_service(Box::new(shipped_service));
    if !args.url.is_empty() {
        let shop = HttpShop::new(args.url.clone())?;
        eprintln!("onrec: driving {} over HTTP", shop.urls().join(", "));
        sim = sim.with_http(shop);
    }
    eprintln!(
        "world: seed {}, {} users, {} items in {} categories ({:?} goods{}); {} rounds per policy, slates of {}, {} candidates{}",
        seed,
        users,
        items,
        categories,
        args.repeats,
        if fresh { ", no sales history" } else { "" },
        rounds,
        n,
        args.candidates,
        if args.stationary {
            ", stationary ranker"
        } else {
            ""
        },
    );
    Ok(Some(sim))
}

/// Trains the encoder of `encoder*` policies when `specs` has one, and reports it.
fn train_encoder(
    sim: &mut Simulation,
    specs: &[spec::PolicySpec],
) -> anyhow::Result<Option<onrec_sim::EncoderReport>> {
    if !specs.iter().any(|s| s.ranker == onrec_sim::Ranker::Encoder) {
        return Ok(None);
    }
    let trained = sim.encoder().context("training the encoder")?;
    let r = trained.report();
    eprintln!(
        "encoder: trained on {} organic interactions in {:.1} s ({} epochs); held-out NDCG@10 {:.4} (popularity {:.4})",
        r.interactions, r.seconds, r.epochs_run, r.ndcg10, r.popularity_ndcg10
    );
    Ok(Some(r.clone()))
}

/// The seeds of a list such as `1,2,5-8`, in order, each once.
fn parse_seeds(list: &str) -> anyhow::Result<Vec<u64>> {
    let mut seeds: Vec<u64> = Vec::new();
    for part in list.split(',').map(str::trim) {
        let number = |s: &str| -> anyhow::Result<u64> {
            s.trim().parse().with_context(|| {
                format!("--seeds: '{s}' in '{list}' is not a seed (a whole number)")
            })
        };
        let (from, to) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        anyhow::ensure!(
            from <= to,
            "--seeds: the range '{part}' runs backwards (write {to}-{from})"
        );
        anyhow::ensure!(
            to - from < MAX_SEEDS as u64,
            "--seeds: at most {MAX_SEEDS} seeds"
        );
        for seed in from..=to {
            anyhow::ensure!(
                !seeds.contains(&seed),
                "--seeds: seed {seed} is listed twice"
            );
            seeds.push(seed);
        }
    }
    anyhow::ensure!(
        seeds.len() <= MAX_SEEDS,
        "--seeds: at most {MAX_SEEDS} seeds"
    );
    Ok(seeds)
}

/// Most seeds one `--seeds` run takes.
const MAX_SEEDS: usize = 1000;

/// Runs `specs` in the world of `seed`: their summaries, in order.
fn run_seed(
    args: &SimulateArgs,
    specs: &[spec::PolicySpec],
    seed: u64,
) -> anyhow::Result<Vec<onrec_sim::Summary>> {
    let Some(mut sim) = simulation(args, seed)? else {
        return Ok(Vec::new());
    };
    train_encoder(&mut sim, specs)?;
    let mut summaries = Vec::with_capacity(specs.len());
    for spec in specs {
        let run = sim
            .run(spec, None)
            .with_context(|| format!("seed {seed}, {}", spec.name))?;
        eprintln!(
            "seed {seed}: {}: {:.1} s, CTR {:.2}%",
            spec.name,
            run.summary.wall_seconds,
            100.0 * run.summary.ctr
        );
        summaries.push(run.summary);
    }
    Ok(summaries)
}

/// Runs `specs` in the world of every seed, as many worlds at once as there are cores,
/// and prints each policy's mean over them.
fn across_seeds(
    args: &SimulateArgs,
    specs: &[spec::PolicySpec],
    seeds: &[u64],
) -> anyhow::Result<()> {
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(seeds.len())
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<(u64, Vec<onrec_sim::Summary>)>> =
        std::sync::Mutex::new(Vec::with_capacity(seeds.len()));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&seed) = seeds.get(k) else {
                            return Ok(());
                        };
                        match run_seed(args, specs, seed) {
                            Ok(summaries) => results
                                .lock()
                                .map_err(|_| anyhow::anyhow!("a seed's run panicked"))?
                                .push((seed, summaries)),
                            Err(e) => {
                                // The other workers take no further seed.
                                next.store(seeds.len(), std::sync::atomic::Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a seed's run panicked"))??;
        }
        Ok(())
    })?;
    let mut results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a seed's run panicked"))?;
    results.sort_by_key(|(seed, _)| *seed);
    print!("{}", report::across_seeds(&results));
    Ok(())
}

/// Runs `onrec simulate`.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let default_policies = if args.scenario == Scenario::Fresh {
        "uniform,onrec,oracle_average,oracle_learning,oracle"
    } else {
        DEFAULT_POLICIES
    };
    let specs = spec::parse_list(args.policies.as_deref().unwrap_or(default_policies))?;
    if let Some(list) = &args.seeds {
        return across_seeds(&args, &specs, &parse_seeds(list)?);
    }
    let Some(mut sim) = simulation(&args, args.seed)? else {
        return Ok(());
    };
    if let Some(dir) = &args.log_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the log directory {}", dir.display()))?;
    }
    let encoder = train_encoder(&mut sim, &specs)?;

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
        print!("{}", report::tenths(&summaries));
        print!("{}", report::visits(&summaries));
        print!(
            "{}",
            report::logit_terms(summaries.iter().map(|s| (s.policy.as_str(), s.logit_terms)))
        );
        println!(
            "regret: the oracle's expected reward minus the served slate's, summed over rounds \
             (cum. regret) and per round over the last 10% of rounds (regret/rd@end); \
             pref-cat: share of slots in the user's preferred category; by visit: by how \
             many requests the user had made before in the run (1 = their first); click \
             logit: the mean per served slot, over the second half of the run, of each term \
             of the truth's click logit past its base rate (item appeal, the user's taste \
             for its category, their latent affinity for it, the moment's shift of its \
             category)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_lists_take_numbers_and_ranges_once_each() {
        assert_eq!(parse_seeds("1-3,7, 9").unwrap(), [1, 2, 3, 7, 9]);
        assert_eq!(parse_seeds("4").unwrap(), [4]);
        for (bad, says) in [
            ("3-1", "runs backwards"),
            ("1,x", "'x' in '1,x' is not a seed"),
            ("1-2,2", "seed 2 is listed twice"),
            ("", "is not a seed"),
            ("1-5000", "at most 1000 seeds"),
        ] {
            let e = parse_seeds(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
