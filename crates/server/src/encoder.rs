//! Putting a Transformer encoder behind the engine: a checkpoint loaded at start, the
//! demo encoder trained on synthetic sessions in the background, or an encoder trained
//! online from the service's own events.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use onrec_engine::Engine;
use onrec_engine::online::OnlineSettings;
use onrec_model::data::{Sequences, Split};
use onrec_model::online::OnlineConfig;
use onrec_model::sasrec::Config as ModelConfig;
use onrec_model::serve::{Batching, Encoder};
use onrec_model::train::{self, TrainConfig};
use onrec_model::{checkpoint, device, eval, synth};

use crate::Config;

fn batching(config: &Config) -> Batching {
    Batching {
        max_batch: config.encoder_max_batch,
        window: config.encoder_batch_window,
    }
}

/// Loads the checkpoint in `dir` and attaches it; its version names a digest of the weights.
pub fn attach_checkpoint(engine: &Engine, config: &Config, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let device = device::select(config.device);
    let ckpt = checkpoint::load(dir, &device)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    let weights = std::fs::read(dir.join(checkpoint::WEIGHTS)).context("reading the weights")?;
    let mut h = std::hash::DefaultHasher::new();
    weights.hash(&mut h);
    let version = format!("sasrec-{:08x}", h.finish() as u32);
    let encoder = Encoder::start(ckpt.model, device, config.encoder_queue, batching(config))?;
    engine.attach_encoder(encoder, &ckpt.items, version);
    tracing::info!(dir = %dir.display(), took_ms = started.elapsed().as_millis() as u64, "model loaded");
    Ok(())
}

/// The demo encoder's shape for `num_items` items.
fn demo_model(num_items: usize) -> ModelConfig {
    ModelConfig {
        num_items,
        max_len: 20,
        hidden: 32,
        heads: 2,
        layers: 1,
        ff: 128,
        dropout: 0.1,
    }
}

/// Width of the user vectors of the encoder `config` attaches (0 without one): the
/// Q-network's state takes them.
pub fn user_width(config: &Config) -> anyhow::Result<usize> {
    Ok(match &config.model {
        Some(dir) => {
            checkpoint::read_config(dir)
                .with_context(|| format!("reading the model in {}", dir.display()))?
                .hidden
        }
        None if demo_encoder(config) => demo_model(0).hidden,
        None if config.encoder_online => OnlineConfig::default().hidden,
        None => 0,
    })
}

/// Whether the demo encoder is trained: asked for, with the demo catalog.
pub fn demo_encoder(config: &Config) -> bool {
    config.demo_encoder && config.catalog.is_none() && config.demo_items > 0
}

/// Starts training an encoder online from accepted events, unless a checkpoint or the
/// demo encoder ranks.
pub fn start_online(engine: &Engine, config: &Config) -> anyhow::Result<()> {
    if config.model.is_some() || demo_encoder(config) || !config.encoder_online {
        return Ok(());
    }
    let settings = OnlineSettings {
        config: OnlineConfig {
            replays: config.encoder_replays,
            ..OnlineConfig::default()
        },
        device: config.device,
        encoder_queue: config.encoder_queue,
        batching: batching(config),
        dir: config.data_dir.as_ref().map(|d| d.join("encoder")),
        ..OnlineSettings::default()
    };
    let cfg = settings.config.clone();
    engine
        .start_online_encoder(settings)
        .context("starting the online encoder")?;
    tracing::info!(
        width = cfg.hidden,
        layers = cfg.layers,
        history = cfg.max_len,
        "online encoder started: it learns from accepted events; popularity ranks until it publishes"
    );
    Ok(())
}

/// Users and interactions per user of the demo encoder's synthetic sessions.
const DEMO_USERS: usize = 1000;
const DEMO_STEPS: usize = 20;
const DEMO_SEED: u64 = 7;

/// Trains the demo encoder on its own thread and attaches it when done; popularity serves
/// until then (responses say so in `fallback`).
pub fn spawn_demo(
    engine: &Engine,
    config: &Config,
    items: Vec<(String, String)>,
) -> anyhow::Result<()> {
    engine.expect_encoder();
    let (engine, choice) = (engine.clone(), config.device);
    let (queue, batching) = (config.encoder_queue, batching(config));
    std::thread::Builder::new().name("onrec-demo-train".into()).spawn(move || {
        let started = Instant::now();
        let device = device::select(choice);
        let seqs = Sequences::from_interactions(synth::sessions(&items, DEMO_USERS, DEMO_STEPS, DEMO_SEED));
        let split = Split::leave_one_out(&seqs);
        let model = demo_model(seqs.num_items());
        let tc = TrainConfig { epochs: 4, batch_size: 64, lr: 3e-3, patience: 2, seed: DEMO_SEED, progress: false, ..TrainConfig::default() };
        let trained = match train::train(&model, &tc, &split, &device) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "demo encoder training failed; popularity keeps serving");
                return;
            }
        };
        let test = eval::evaluate(&trained.model, &split.test, &device);
        let popularity = eval::evaluate_popularity(&split, seqs.num_items());
        if let (Ok(t), Ok(p)) = (&test, &popularity) {
            tracing::info!(
                epochs = trained.report.epochs_run,
                took_ms = started.elapsed().as_millis() as u64,
                ndcg10 = t.history_excluded.ndcg10,
                popularity_ndcg10 = p.history_excluded.ndcg10,
                "demo encoder trained on synthetic sessions"
            );
        }
        match Encoder::start(trained.model, device, queue, batching) {
            Ok(encoder) => engine.attach_encoder(encoder, &seqs.items, "sasrec-demo".to_owned()),
            Err(e) => tracing::error!(error = %e, "cannot start the encoder thread; popularity keeps serving"),
        }
    })?;
    Ok(())
}
