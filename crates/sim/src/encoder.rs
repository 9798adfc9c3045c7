//! The encoder policies' SASRec model: trained once before the runs on organic sessions
//! sampled from the world (as the server's demo encoder is trained on synthetic ones),
//! then started on its own thread for every run that ranks with it.

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use onrec_model::data::{Sequences, Split};
use onrec_model::eval;
use onrec_model::sasrec::{Config, SasRec};
use onrec_model::serve::{Batching, Encoder};
use onrec_model::train::{self, TrainConfig};
use serde::Serialize;

use crate::SimError;
use crate::world::World;

/// Requests waiting for the encoder thread; the simulator asks one at a time.
const QUEUE: usize = 16;

/// How the encoder is trained: small and fast (seconds), like the server's demo encoder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EncoderSettings {
    /// Organic sessions sampled from the world.
    pub sessions: usize,
    /// Interactions per session.
    pub steps: usize,
    /// Most training epochs.
    pub epochs: usize,
    /// Width of item and user vectors.
    pub hidden: usize,
    /// Longest history read.
    pub max_len: usize,
    /// Seed of the sessions and of training.
    pub seed: u64,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self {
            sessions: 2000,
            steps: 20,
            epochs: 4,
            hidden: 32,
            max_len: 20,
            seed: 7,
        }
    }
}

impl EncoderSettings {
    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), SimError> {
        for (field, value) in [
            ("encoder.sessions", self.sessions),
            ("encoder.epochs", self.epochs),
            ("encoder.hidden", self.hidden),
            ("encoder.max_len", self.max_len),
        ] {
            if value == 0 {
                return Err(SimError::config(field, "must be at least 1"));
            }
        }
        if self.steps < 3 {
            return Err(SimError::config(
                "encoder.steps",
                format!(
                    "is {}; at least 3 are needed to train and validate",
                    self.steps
                ),
            ));
        }
        if !self.hidden.is_multiple_of(2) {
            return Err(SimError::config(
                "encoder.hidden",
                format!("is {}; must be even (two attention heads)", self.hidden),
            ));
        }
        Ok(())
    }
}

/// What training achieved, for the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EncoderReport {
    /// Interactions trained on.
    pub interactions: usize,
    /// Epochs run.
    pub epochs_run: usize,
    /// Held-out NDCG@10 (history excluded) of the encoder.
    pub ndcg10: f64,
    /// The same for the popularity baseline.
    pub popularity_ndcg10: f64,
    /// Wall-clock seconds of sampling and training.
    pub seconds: f64,
}

/// A trained encoder, ready to be started for any number of runs.
pub struct TrainedEncoder {
    varmap: VarMap,
    config: Config,
    items: Vec<String>,
    report: EncoderReport,
}

impl std::fmt::Debug for TrainedEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainedEncoder")
            .field("config", &self.config)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl TrainedEncoder {
    /// Samples organic sessions from `world` and trains an encoder on them.
    pub fn train(world: &World, settings: &EncoderSettings) -> Result<Self, SimError> {
        settings.validate()?;
        let started = Instant::now();
        let log = world.sessions(settings.sessions, settings.steps, settings.seed);
        let interactions = log.len();
        let seqs = Sequences::from_interactions(log);
        let split = Split::leave_one_out(&seqs);
        let config = Config {
            num_items: seqs.num_items(),
            max_len: settings.max_len,
            hidden: settings.hidden,
            heads: 2,
            layers: 1,
            ff: 4 * settings.hidden,
            dropout: 0.1,
            repeat: false,
            text_dim: 0,
            text_alone: false,
        };
        let tc = TrainConfig {
            epochs: settings.epochs,
            batch_size: 64,
            lr: 3e-3,
            patience: 2,
            seed: settings.seed,
            progress: false,
            ..TrainConfig::default()
        };
        let trained = train::train(
            &config,
            &tc,
            &split,
            &train::ItemInputs::default(),
            &Device::Cpu,
        )?;
        let test = eval::evaluate(&trained.model, &split.test, &Device::Cpu)?;
        let popularity = eval::evaluate_popularity(&split, seqs.num_items())?;
        Ok(Self {
            varmap: trained.varmap,
            config,
            items: seqs.items,
            report: EncoderReport {
                interactions,
                epochs_run: trained.report.epochs_run,
                ndcg10: test.history_excluded.ndcg10,
                popularity_ndcg10: popularity.history_excluded.ndcg10,
                seconds: started.elapsed().as_secs_f64(),
            },
        })
    }

    /// What training achieved.
    pub fn report(&self) -> &EncoderReport {
        &self.report
    }

    /// The encoder's vocabulary (`items[0]` is padding), for `Engine::attach_encoder`.
    pub fn items(&self) -> &[String] {
        &self.items
    }

    /// Starts a serving thread over the trained weights (shared, never trained further).
    pub fn start(&self) -> Result<Encoder, SimError> {
        let vb = VarBuilder::from_varmap(&self.varmap, DType::F32, &Device::Cpu);
        let model = SasRec::load(vb, &self.config).map_err(onrec_model::ModelError::from)?;
        // The simulator sends one request at a time, so waiting for a batch would only
        // add latency.
        let batching = Batching {
            max_batch: 1,
            window: Duration::ZERO,
        };
        Ok(Encoder::start(model, Device::Cpu, QUEUE, batching)?)
    }
}
