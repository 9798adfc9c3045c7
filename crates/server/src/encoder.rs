//! Putting a Transformer encoder behind the engine: a checkpoint loaded at start, and an
//! encoder trained online from the service's own events, from that checkpoint or from
//! nothing (with the demo catalog, its synthetic sessions are then the first events).

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use onrec_engine::Engine;
use onrec_engine::background::FollowEncoder;
use onrec_engine::online::OnlineSettings;
use onrec_model::context::ContextIds;
use onrec_model::online::{ONLINE_STATE, OnlineConfig};
use onrec_model::serve::{Batching, Encoder};
use onrec_model::text::TextProjection;
use onrec_model::{checkpoint, data, device, synth};

use crate::Config;
use crate::config::Role;

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

/// Width of the user vectors of the encoder `config` attaches (0 without one): the
/// Q-network's state takes them.
pub fn user_width(config: &Config) -> anyhow::Result<usize> {
    Ok(match &config.model {
        Some(dir) => {
            checkpoint::read_config(dir)
                .with_context(|| format!("reading the model in {}", dir.display()))?
                .hidden
        }
        None if config.encoder_online => OnlineConfig::default().hidden,
        None => 0,
    })
}

/// Whether the demo catalog's synthetic sessions seed the online encoder: asked for, with
/// the demo catalog and no model.
pub fn demo_encoder(config: &Config) -> bool {
    config.demo_encoder
        && config.catalog.is_none()
        && config.demo_items > 0
        && config.model.is_none()
}

/// Starts training an encoder online from accepted events: from the `model` checkpoint
/// when there is one, else from nothing. Without a model, with the demo catalog (and
/// `demo_encoder`), its synthetic sessions (of `items`: id, category) are the first
/// events, unless the encoder resumed from `data_dir`.
pub fn start_online(
    engine: &Engine,
    config: &Config,
    items: &[(String, String)],
) -> anyhow::Result<()> {
    if !config.encoder_online {
        return Ok(());
    }
    if config.role == Role::Serve {
        // Serve replicas rank with what the learner publishes (see `follow_published`),
        // and with the checkpoint until then.
        if config.model.is_none() {
            engine.expect_encoder();
        }
        return Ok(());
    }
    let dir = config.data_dir.as_ref().map(|d| d.join("encoder"));
    let resumes = dir.as_ref().is_some_and(|d| d.join(ONLINE_STATE).exists());
    let settings = OnlineSettings {
        config: OnlineConfig {
            replays: config.encoder_replays,
            ..OnlineConfig::default()
        },
        device: config.device,
        encoder_queue: config.encoder_queue,
        batching: batching(config),
        dir,
        start_from: config.model.clone(),
        priority: config.encoder_priority.into(),
        ..OnlineSettings::default()
    };
    let text = match (&config.text_model, &config.model) {
        (Some(text_model), Some(model)) => Some(
            TextProjection::load(text_model, model, &device::select(config.device))
                .context("loading the text model")?,
        ),
        _ => None,
    };
    engine
        .start_online_encoder(settings, text)
        .context("starting the online encoder")?;
    if config.model.is_some() {
        tracing::info!("online encoder started: it goes on learning from accepted events");
        return Ok(());
    }
    tracing::info!(
        "online encoder started: it learns from accepted events; popularity ranks until it publishes"
    );
    if demo_encoder(config) && !resumes {
        seed_demo(engine, items);
    }
    Ok(())
}

/// Users and interactions per user of the demo catalog's synthetic sessions.
const DEMO_USERS: usize = 1000;
const DEMO_STEPS: usize = 20;
const DEMO_SEED: u64 = 7;

/// Hands the online encoder the demo catalog's synthetic sessions as initial events, so
/// users with a history get personal rankings within seconds of start.
fn seed_demo(engine: &Engine, items: &[(String, String)]) {
    let sessions = synth::sessions(items, DEMO_USERS, DEMO_STEPS, DEMO_SEED);
    let handed = engine.seed_online_encoder(sessions.iter().map(|i| {
        (
            i.user.as_str(),
            i.item.as_str(),
            ContextIds::from_parts(Some(data::hour_of(i.timestamp)), None),
        )
    }));
    tracing::info!(
        interactions = handed,
        "demo sessions handed to the online encoder"
    );
}

/// On a serve replica with an online encoder: how it loads each encoder the learner
/// publishes to Redis (`None` elsewhere).
pub fn follow_published(config: &Config) -> Option<FollowEncoder> {
    (config.role == Role::Serve && config.encoder_online).then(|| FollowEncoder {
        device: device::select(config.device),
        queue: config.encoder_queue,
        batching: batching(config),
    })
}
