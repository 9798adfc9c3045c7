//! The encoder trained online from the service's own events: a thread owns an
//! [`OnlineTrainer`], takes the interactions the feedback path hands it, trains while
//! there is something new, and publishes a snapshot for serving every few steps and
//! whenever it catches up. Publication swaps the engine's encoder; requests never wait
//! for training.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use onrec_learn::{LearnError, Priority};
use onrec_model::context::ContextIds;
use onrec_model::device::{self, DeviceChoice};
use onrec_model::online::{OnlineConfig, OnlineTrainer};
use onrec_model::serve::{Batching, Encoder};
use onrec_model::text::TextProjection;
use parking_lot::{Mutex, RwLock};

/// How the online encoder trains and serves.
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineSettings {
    /// The encoder's shape and the pace of training.
    pub config: OnlineConfig,
    /// Training steps between publications while training goes on (it also publishes
    /// whenever it has caught up).
    pub publish_every: u64,
    /// Scheduling priority of the training thread.
    pub priority: Priority,
    /// Interactions queued for the thread; beyond it they are dropped and counted.
    pub queue: usize,
    /// Where the encoder trains and serves.
    pub device: DeviceChoice,
    /// Requests that may wait for a published encoder.
    pub encoder_queue: usize,
    /// How a published encoder batches requests.
    pub batching: Batching,
    /// Where it is checkpointed (every minute and at shutdown) and resumed from at start;
    /// `None` keeps it in memory only.
    pub dir: Option<PathBuf>,
    /// A checkpoint written by `onrec train` to start from (in its shape) when nothing
    /// is saved in `dir`; `None` starts from nothing.
    pub start_from: Option<PathBuf>,
}

impl Default for OnlineSettings {
    fn default() -> Self {
        Self {
            config: OnlineConfig::default(),
            publish_every: 50,
            priority: Priority::Idle,
            queue: 65_536,
            device: DeviceChoice::Cpu,
            encoder_queue: 1024,
            batching: Batching {
                max_batch: 64,
                window: Duration::ZERO,
            },
            dir: None,
            start_from: None,
        }
    }
}

/// A published encoder, for other processes: its version, whether it ranks users with
/// no history, its vocabulary (`items[0]` padding), its shape and its weights
/// (safetensors bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// The version it is published as.
    pub version: String,
    /// Whether it ranks users with no history.
    pub newcomers: bool,
    /// Item ids by index; `items[0]` is padding.
    pub items: Vec<String>,
    /// The encoder's shape.
    pub config: onrec_model::sasrec::Config,
    /// The weights, as safetensors bytes.
    pub weights: Vec<u8>,
}

/// Where the thread hands a published encoder: the encoder, its vocabulary (`items[0]`
/// padding), its version, and whether it has learned enough first choices to rank users
/// with no history.
pub(crate) type Publish = Box<dyn Fn(Encoder, &[String], String, bool) + Send>;

/// Where the thread hands a published encoder's weights for other processes.
pub(crate) type Export = Box<dyn Fn(Exported) + Send>;

/// Least time between two exports of the published encoder: other processes need the
/// latest weights, not every publication's. The last publication before training pauses
/// is exported once this much time has passed.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// First choices (interactions of users with no history yet) the encoder learns from
/// before it ranks users with no history: until then popularity, ties broken at random,
/// shows them a spread of the catalog. An encoder that ranked them from its first steps
/// would send every newcomer to the few items its barely trained context vector favours,
/// and learn only from choices among those.
pub const NEWCOMER_EXAMPLES: usize = 500;

/// A catalog item as the online encoder takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderItem {
    /// The item's id.
    pub id: String,
    /// Its category ("" for none).
    pub category: String,
    /// Its text (title, category, tags, description; see [`crate::Item::text`]).
    pub text: String,
}

impl From<&crate::Item> for EncoderItem {
    fn from(item: &crate::Item) -> Self {
        Self {
            id: item.item_id.clone(),
            category: item.category.clone(),
            text: item.text(),
        }
    }
}

enum Msg {
    Observe {
        user: String,
        item: u32,
        context: ContextIds,
        shown: Vec<u32>,
    },
    Grow(Vec<EncoderItem>),
    Settle(Sender<u64>),
    /// From now on, train only while a settle waits.
    Pace,
}

/// A handle to the online encoder's thread.
#[derive(Debug)]
pub struct OnlineEncoder {
    /// `None` once shut down.
    tx: RwLock<Option<SyncSender<Msg>>>,
    published: Arc<AtomicU64>,
    steps: Arc<AtomicU64>,
    dropped: AtomicU64,
    worker: Mutex<Option<std::thread::JoinHandle<Result<(), LearnError>>>>,
}

impl OnlineEncoder {
    /// Starts training a fresh encoder over `items` in catalog order; snapshots go to
    /// `publish`, and their weights to `export` when there is one (at most every
    /// [`EXPORT_EVERY`], and the last one before training pauses). With `text`, items
    /// nothing was learned of (at start, and added later) are placed by their text.
    pub(crate) fn start(
        settings: OnlineSettings,
        items: Vec<EncoderItem>,
        text: Option<TextProjection>,
        publish: Publish,
        export: Option<Export>,
    ) -> Result<Self, LearnError> {
        let categories: Vec<String> = items.iter().map(|i| i.category.clone()).collect();
        let texts: Vec<String> = items.iter().map(|i| i.text.clone()).collect();
        let mut vocabulary = vec![String::new()];
        vocabulary.extend(items.into_iter().map(|i| i.id));
        let (tx, rx) = mpsc::sync_channel(settings.queue.max(1));
        let published = Arc::new(AtomicU64::new(0));
        let steps = Arc::new(AtomicU64::new(0));
        let worker = {
            let (published, steps) = (published.clone(), steps.clone());
            onrec_learn::spawn_training_thread(
                "onrec-encoder-train",
                settings.priority,
                move || {
                    let mut worker = Worker::start(
                        settings,
                        vocabulary,
                        &categories,
                        (publish, export),
                        published,
                        steps,
                    )?;
                    if let Some(text) = text {
                        worker.text = Some(text);
                        let unlearned: Vec<(u32, String)> = worker
                            .trainer
                            .unlearned()
                            .iter()
                            .map(|&i| (i, texts[i as usize - 1].clone()))
                            .collect();
                        worker.place_by_text(unlearned);
                    }
                    worker.run(&rx);
                    worker.save();
                    Ok(())
                },
            )
            .map_err(|e| LearnError::Train(format!("cannot start the encoder trainer: {e}")))?
        };
        Ok(Self {
            tx: RwLock::new(Some(tx)),
            published,
            steps,
            dropped: AtomicU64::new(0),
            worker: Mutex::new(Some(worker)),
        })
    }

    fn send(&self, msg: Msg) -> bool {
        self.tx
            .read()
            .as_ref()
            .is_some_and(|tx| tx.try_send(msg).is_ok())
    }

    /// Hands the trainer an interaction of `user` with catalog item `item` in `context`,
    /// chosen from the slate `shown` (catalog indices; empty when it was not recommended);
    /// when its queue is full it is dropped and counted.
    pub fn observe(&self, user: &str, item: u32, context: ContextIds, shown: &[u32]) {
        let msg = Msg::Observe {
            user: user.to_owned(),
            item: item + 1,
            context,
            shown: shown.iter().map(|&i| i + 1).collect(),
        };
        if !self.send(msg) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("onrec_encoder_online_dropped_total").increment(1);
        }
    }

    /// Adds catalog items, in catalog order after the known ones.
    pub fn grow(&self, items: Vec<EncoderItem>) {
        if !items.is_empty() && !self.send(Msg::Grow(items)) {
            tracing::warn!("the encoder trainer's queue is full; new items join it later");
        }
    }

    /// Makes training follow [`OnlineEncoder::settle`] calls instead of running whenever
    /// there is something to learn: interactions are taken as they come, and trained on
    /// (and published) only while a settle waits. A driver that settles at fixed points
    /// (the simulator) then serves the same weights at the same requests in every run.
    pub fn pace(&self) {
        let _ = self.send(Msg::Pace);
    }

    /// Waits until everything handed over before this call is trained on and published,
    /// at most `timeout`; returns the number of publications then (`None` on time-out).
    pub fn settle(&self, timeout: Duration) -> Option<u64> {
        let (reply, answer) = mpsc::channel();
        let sent = self
            .tx
            .read()
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Settle(reply)).is_ok());
        if !sent {
            return None;
        }
        answer.recv_timeout(timeout).ok()
    }

    /// The number of snapshots published so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Training steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// Interactions dropped because the trainer's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops the thread after what is queued; later interactions are dropped.
    pub fn shutdown(&self) -> Result<(), LearnError> {
        self.tx.write().take();
        match self.worker.lock().take() {
            Some(h) => h
                .join()
                .map_err(|_| LearnError::Train("the encoder trainer panicked".into()))?,
            None => Ok(()),
        }
    }
}

/// Messages taken between two training steps, at most: a flood of events never stops
/// training for long.
const DRAIN: usize = 4096;

struct Worker {
    trainer: OnlineTrainer,
    vocabulary: Vec<String>,
    settings: OnlineSettings,
    device: candle_core::Device,
    publish: Publish,
    export: Option<Export>,
    /// When the weights were last exported, and whether a publication since is not.
    exported_at: Option<Instant>,
    unexported: bool,
    /// The last publication's version and whether it ranks users with no history.
    last: (String, bool),
    published: Arc<AtomicU64>,
    steps: Arc<AtomicU64>,
    since_publish: u64,
    /// When it last checkpointed, and at how many steps.
    saved_at: (Instant, u64),
    /// Whether it trains only while a settle waits (see [`OnlineEncoder::pace`]).
    paced: bool,
    /// Places items nothing was learned of by their text.
    text: Option<TextProjection>,
}

/// Time between checkpoints while training goes on.
const SAVE_EVERY: Duration = Duration::from_secs(60);

impl Worker {
    /// The trainer resumed from the settings' directory, or a fresh one.
    fn start(
        settings: OnlineSettings,
        vocabulary: Vec<String>,
        categories: &[String],
        (publish, export): (Publish, Option<Export>),
        published: Arc<AtomicU64>,
        steps: Arc<AtomicU64>,
    ) -> Result<Self, LearnError> {
        let device = device::select(settings.device);
        let train_err = |e: onrec_model::ModelError| LearnError::Train(e.to_string());
        let resumed = match &settings.dir {
            Some(dir) => OnlineTrainer::resume(
                settings.config.clone(),
                dir,
                &vocabulary,
                categories,
                device.clone(),
            )
            .map_err(train_err)?,
            None => None,
        };
        if let Some(t) = &resumed {
            tracing::info!(
                steps = t.steps(),
                users = t.users(),
                examples = t.examples(),
                "online encoder resumed"
            );
        }
        let started = match (&resumed, &settings.start_from) {
            (None, Some(dir)) => {
                let t = OnlineTrainer::from_checkpoint(
                    settings.config.clone(),
                    dir,
                    &vocabulary,
                    categories,
                    device.clone(),
                )
                .map_err(train_err)?;
                tracing::info!(checkpoint = %dir.display(), "online encoder starts from the checkpoint");
                Some(t)
            }
            _ => None,
        };
        // A resumed encoder, or one from a checkpoint, is published at once.
        let since_publish = u64::from(resumed.is_some() || started.is_some());
        let trainer = match resumed.or(started) {
            Some(t) => t,
            None => OnlineTrainer::new(settings.config.clone(), categories, device.clone())
                .map_err(train_err)?,
        };
        let saved_at = (Instant::now(), trainer.steps());
        Ok(Self {
            trainer,
            vocabulary,
            settings,
            device,
            publish,
            export,
            exported_at: None,
            unexported: false,
            last: (String::new(), false),
            published,
            steps,
            since_publish,
            saved_at,
            paced: false,
            text: None,
        })
    }

    /// Places items (index, text) by their text when there is a text projection, and
    /// publishes them with the next snapshot; items with no text stay where they are.
    fn place_by_text(&mut self, items: Vec<(u32, String)>) {
        let Some(projection) = self.text.as_mut() else {
            return;
        };
        let items: Vec<(u32, String)> = items
            .into_iter()
            .filter(|(_, t)| !t.trim().is_empty())
            .collect();
        if items.is_empty() {
            return;
        }
        let started = Instant::now();
        let texts: Vec<&str> = items.iter().map(|(_, t)| t.as_str()).collect();
        let placed = projection.rows(&texts).and_then(|rows| {
            let rows: Vec<(u32, Vec<f32>)> = items.iter().map(|&(i, _)| i).zip(rows).collect();
            self.trainer.place(&rows)
        });
        match placed {
            Ok(()) => {
                self.since_publish += 1;
                metrics::counter!("onrec_encoder_items_placed_by_text_total")
                    .increment(items.len() as u64);
                tracing::info!(
                    items = items.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "items placed in the encoder by their text"
                );
            }
            Err(e) => tracing::error!(error = %e, "placing items by their text failed"),
        }
    }

    /// Hands the last publication's weights to `export` if they were not yet, and `now`
    /// or [`EXPORT_EVERY`] after the last export.
    fn export(&mut self, now: bool) {
        let Some(export) = &self.export else {
            return;
        };
        let due = now
            || self
                .exported_at
                .is_none_or(|at| at.elapsed() >= EXPORT_EVERY);
        if !self.unexported || !due {
            return;
        }
        self.unexported = false;
        self.exported_at = Some(Instant::now());
        match self.trainer.export() {
            Ok((config, weights)) => export(Exported {
                version: self.last.0.clone(),
                newcomers: self.last.1,
                items: self.vocabulary.clone(),
                config,
                weights,
            }),
            Err(e) => tracing::error!(error = %e, "exporting the online encoder failed"),
        }
    }

    /// Checkpoints to the configured directory when it trained since the last time.
    fn save(&mut self) {
        let Some(dir) = &self.settings.dir else {
            return;
        };
        if self.trainer.steps() == self.saved_at.1 {
            return;
        }
        match self.trainer.save(dir, &self.vocabulary) {
            Ok(()) => self.saved_at = (Instant::now(), self.trainer.steps()),
            Err(e) => tracing::error!(error = %e, "the online encoder's checkpoint failed"),
        }
    }

    fn run(&mut self, rx: &Receiver<Msg>) {
        let mut waiters: Vec<Sender<u64>> = Vec::new();
        loop {
            // Block only when there is nothing to train on (or, paced, no settle waits).
            if !self.trainer.pending() || (self.paced && waiters.is_empty()) {
                self.publish_if_trained();
                for w in waiters.drain(..) {
                    let _ = w.send(self.published.load(Ordering::Acquire));
                }
                let next = onrec_learn::yielding::waiting(|| {
                    if self.unexported {
                        rx.recv_timeout(EXPORT_EVERY)
                    } else {
                        rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                    }
                });
                match next {
                    Ok(msg) => self.take(msg, &mut waiters),
                    Err(RecvTimeoutError::Timeout) => {
                        self.export(true);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        self.export(true);
                        return;
                    }
                }
            }
            for _ in 0..DRAIN {
                match rx.try_recv() {
                    Ok(msg) => self.take(msg, &mut waiters),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.publish_if_trained();
                        self.export(true);
                        return;
                    }
                }
            }
            if self.paced && waiters.is_empty() {
                continue;
            }
            match self.trainer.step() {
                Ok(Some(loss)) => {
                    self.since_publish += 1;
                    self.steps.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("onrec_encoder_online_steps_total").increment(1);
                    metrics::gauge!("onrec_encoder_online_loss").set(f64::from(loss));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "online encoder training step failed");
                }
            }
            if self.since_publish >= self.settings.publish_every {
                self.publish_if_trained();
            }
            if self.saved_at.0.elapsed() >= SAVE_EVERY {
                self.save();
            }
        }
    }

    fn take(&mut self, msg: Msg, waiters: &mut Vec<Sender<u64>>) {
        match msg {
            Msg::Observe {
                user,
                item,
                context,
                shown,
            } => self.trainer.observe(&user, item, context, &shown),
            Msg::Grow(items) => {
                let categories: Vec<String> = items.iter().map(|i| i.category.clone()).collect();
                match self.trainer.grow(&categories) {
                    Ok(()) => {
                        let first = self.vocabulary.len() as u32;
                        let texts = (first..)
                            .zip(items.iter().map(|i| i.text.clone()))
                            .collect();
                        self.vocabulary.extend(items.into_iter().map(|i| i.id));
                        self.place_by_text(texts);
                    }
                    Err(e) => tracing::error!(error = %e, "the online encoder cannot grow"),
                }
            }
            Msg::Settle(reply) => waiters.push(reply),
            Msg::Pace => self.paced = true,
        }
    }

    /// Publishes a snapshot when steps were taken since the last one.
    fn publish_if_trained(&mut self) {
        if self.since_publish == 0 {
            return;
        }
        self.since_publish = 0;
        let started = Instant::now();
        let model = match self.trainer.snapshot() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "online encoder snapshot failed");
                return;
            }
        };
        let encoder = match Encoder::start(
            model,
            self.device.clone(),
            self.settings.encoder_queue,
            self.settings.batching,
        ) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot start an encoder thread for new weights");
                return;
            }
        };
        // The version is the training steps the weights have had: it grows across restarts.
        let version = self.trainer.steps();
        let (name, newcomers) = (
            format!("sasrec-online-{version}"),
            self.trainer.first_choices() >= NEWCOMER_EXAMPLES,
        );
        (self.publish)(encoder, &self.vocabulary, name.clone(), newcomers);
        self.last = (name, newcomers);
        self.unexported = self.export.is_some();
        self.export(false);
        let count = self.published.fetch_add(1, Ordering::AcqRel) + 1;
        metrics::gauge!("onrec_encoder_online_version").set(version as f64);
        metrics::gauge!("onrec_encoder_online_users").set(self.trainer.users() as f64);
        if count == 1 || count.is_multiple_of(100) {
            tracing::info!(
                version,
                publications = count,
                users = self.trainer.users(),
                loss = self.trainer.last_loss(),
                took_us = started.elapsed().as_micros() as u64,
                "online encoder published"
            );
        }
    }
}
