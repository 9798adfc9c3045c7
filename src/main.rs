//! The `onrec` command line: `onrec serve` (also what plain `onrec` runs), `onrec learn`,
//! `onrec train`, `onrec eval`, `onrec simulate`, `onrec ope`.

mod model_cli;
mod ope_cli;
mod sim_cli;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use onrec_server::{App, Config, Listeners};

/// mimalloc: the request path and the learners allocate many short-lived buffers across
/// threads, which glibc's allocator serves more slowly.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// onrec: online recommendations over HTTP and gRPC, learning from feedback as it serves.
#[derive(Debug, Parser)]
#[command(name = "onrec", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, onrec serves with these settings.
    #[command(flatten)]
    serve: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve recommendations and take feedback (the default)
    Serve(Box<Config>),
    /// Learn for the serve replicas on Redis (`serve --role learn`): apply the bandit
    /// statistics and train the encoder and the Q-network on what they publish, one at a
    /// time, under a lease; a second learner waits as a standby
    Learn(Box<Config>),
    /// Train the Transformer encoder on an interaction log and write a checkpoint
    Train(model_cli::TrainArgs),
    /// Evaluate a checkpoint with chronological leave-one-out and full ranking
    Eval(model_cli::EvalArgs),
    /// Compare exploration policies in a simulated shop whose truth is known
    Simulate(sim_cli::SimulateArgs),
    /// Estimate a candidate policy's value from a decision log (IPS, SNIPS, doubly robust)
    Ope(ope_cli::OpeArgs),
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Some(Command::Serve(_)) => {
            let serve_matches = matches
                .subcommand_matches("serve")
                .ok_or_else(|| anyhow::anyhow!("the serve subcommand's arguments are missing"))?;
            serve(Config::from_matches(serve_matches)?)
        }
        Some(Command::Learn(_)) => {
            let learn_matches = matches
                .subcommand_matches("learn")
                .ok_or_else(|| anyhow::anyhow!("the learn subcommand's arguments are missing"))?;
            serve(Config::from_matches(learn_matches)?.in_role(onrec_server::config::Role::Learn)?)
        }
        Some(Command::Train(args)) => model_cli::train(args),
        Some(Command::Eval(args)) => model_cli::eval(args),
        Some(Command::Simulate(args)) => sim_cli::run(args),
        Some(Command::Ope(args)) => ope_cli::run(args),
        None => serve(Config::from_matches(&matches)?),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    onrec_server::telemetry::init(config.log_format, &config.log_level)?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config.masked(), "starting onrec");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = shutdown_signal()?;
        let engine = onrec_server::build_engine(&config)?;
        let listeners = Listeners::bind(&config).await?;
        onrec_server::run(App::new(engine, config), listeners, shutdown).await
    })
}

/// A future that completes on Ctrl-C or SIGTERM. The handlers are installed now, before
/// the listeners open: a signal that comes as soon as the port answers is a shutdown,
/// not the default action that kills the process.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("Ctrl-C received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

/// A future that completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    Ok(async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("Ctrl-C received");
    })
}
