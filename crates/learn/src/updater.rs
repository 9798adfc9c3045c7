//! The learner: a dedicated OS thread that moves submitted transitions into the replay
//! buffer, trains the online Q-network by Double DQN, keeps a target network, publishes
//! immutable weight snapshots and writes checkpoints.
//!
//! An OS thread rather than a tokio task because a training step is milliseconds of CPU
//! work that would stall every request sharing a runtime worker. By default the thread
//! runs at the lowest scheduling priority (nice 19) and does its tensor work in a rayon
//! pool of its own, so on a machine with few cores serving takes the CPU first and the
//! learner uses what is left. Submission never blocks: the queue is bounded and, when the
//! learner is behind, the newest transition is dropped and counted. Readers load the
//! latest [`Published`] through an `ArcSwap`, so they get the old or the new weights,
//! never a mix, and take no lock.
//!
//! The network's items are named: the learner starts with the catalog's item ids, grows
//! with [`Learner::grow`] as items are added, and a checkpoint records the ids, so a
//! restart with a changed catalog keeps what it learned of the items still there.
//!
//! `onrec_learn_feedback_to_publish_seconds` is recorded per transition at the first
//! publication made after a training step that ran while the transition was in the replay
//! buffer; that step may not have sampled it, so it measures when the transition could
//! first have influenced the live weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::LearnError;
use crate::checkpoint::{self, Resumed};
use crate::optim::{AdamParams, AdamW};
use crate::qnet::{Dense, Items, QConfig, QNet, Rows, State};
use crate::replay::{Replay, Transition};

/// A training thread's scheduling priority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// The lowest: Linux's idle scheduling policy (`SCHED_IDLE`). Any other thread that
    /// wakes takes the CPU from it at once, so serving runs first and training uses idle
    /// CPU. Threads it starts inherit the policy.
    #[default]
    Idle,
    /// The process's own, for machines with cores to spare for training.
    Normal,
}

/// Settings of the learner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnConfig {
    /// The Q-network.
    pub q: QConfig,
    /// Discount of the next state's value, in `[0, 1]`.
    pub gamma: f32,
    /// Transitions per training step.
    pub batch_size: usize,
    /// Transitions in the replay buffer before training starts.
    pub min_replay: usize,
    /// Most transitions kept for replay; the oldest are overwritten.
    pub replay_capacity: usize,
    /// Replayed samples per submitted transition: each transition adds
    /// `replay_ratio / batch_size` training steps.
    pub replay_ratio: f64,
    /// Transitions waiting for the learner before new ones are dropped.
    pub queue: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient norm clip.
    pub max_grad_norm: f64,
    /// Soft target update rate per step; 0 switches to a hard copy every `target_every`.
    pub tau: f64,
    /// Steps between hard target copies when `tau` is 0.
    pub target_every: u64,
    /// Steps between publications (or `publish_interval`, whichever comes first).
    pub publish_every: u64,
    /// Longest time trained weights wait for publication.
    pub publish_interval: Duration,
    /// Time between periodic checkpoints when a directory is given.
    pub checkpoint_interval: Duration,
    /// Largest share of the time the learner may spend training (0 < share ≤ 1): after
    /// a step it rests in proportion. Transitions that arrive meanwhile queue, and are
    /// dropped when it is full.
    pub max_busy: f64,
    /// The learner thread's scheduling priority.
    pub priority: Priority,
}

/// Longest the learner trains without publishing by time and checkpointing.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);
/// Most training steps the learner owes the traffic at once.
const MAX_OWED_STEPS: f64 = 1000.0;

impl Default for LearnConfig {
    /// The network of [`QConfig::default`]: γ 0.5, batches of 64 once 64 transitions are
    /// held, 100 000 replayed transitions, replay ratio 8, a queue of 1024, AdamW at 1e-3
    /// with decay 0.01, clip 5, τ 0.01 (hard copy every 100 steps if τ is 0), publication
    /// every 10 steps or 1 s, checkpoints every 60 s, idle priority.
    fn default() -> Self {
        Self {
            q: QConfig::default(),
            gamma: 0.5,
            batch_size: 64,
            min_replay: 64,
            replay_capacity: 100_000,
            replay_ratio: 8.0,
            queue: 1024,
            lr: 1e-3,
            weight_decay: 0.01,
            max_grad_norm: 5.0,
            tau: 0.01,
            target_every: 100,
            publish_every: 10,
            publish_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(60),
            max_busy: 1.0,
            priority: Priority::Idle,
        }
    }
}

impl LearnConfig {
    /// Checks that every setting is in range.
    pub fn validate(&self) -> Result<(), LearnError> {
        if !(self.max_busy > 0.0 && self.max_busy <= 1.0) {
            return Err(LearnError::Config("max_busy must be within (0, 1]".into()));
        }
        self.q.validate()?;
        let bad = |what: &str| Err(LearnError::Config(what.to_string()));
        if !(0.0..=1.0).contains(&self.gamma) {
            return bad("gamma must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.tau) {
            return bad("tau must be in [0, 1]");
        }
        if self.tau == 0.0 && self.target_every == 0 {
            return bad("target_every must be positive when tau is 0");
        }
        if self.batch_size == 0 || self.queue == 0 || self.replay_capacity == 0 {
            return bad("batch_size, queue and replay_capacity must be positive");
        }
        if self.publish_every == 0 || self.publish_interval.is_zero() {
            return bad("publish_every and publish_interval must be positive");
        }
        if self.checkpoint_interval.is_zero() {
            return bad("checkpoint_interval must be positive");
        }
        if !(self.replay_ratio.is_finite() && self.replay_ratio >= 0.0) {
            return bad("replay_ratio must be a finite number ≥ 0");
        }
        if !(self.lr > 0.0 && self.max_grad_norm > 0.0 && self.weight_decay >= 0.0) {
            return bad("lr and max_grad_norm must be positive, weight_decay ≥ 0");
        }
        Ok(())
    }
}

/// One published set of weights; never changes once published.
#[derive(Debug)]
pub struct Published {
    /// Publication number: 0 for fresh weights, +1 per publication, continued on resume.
    pub version: u64,
    /// Training steps these weights include.
    pub updates: u64,
    /// The network.
    pub net: QNet,
    /// When it was published (in this process).
    pub published_at: Instant,
}

/// Double DQN targets: `r + γ · target_next[a*]` with `a* = argmax online_next`, the
/// online network choosing the next action and the target network valuing it, so the
/// maximisation bias of one network judging its own choice is avoided. An empty
/// `online_next` row is terminal and gives `r`.
pub fn double_dqn_targets(
    rewards: &[f32],
    online_next: &[Vec<f32>],
    target_next: &[Vec<f32>],
    gamma: f32,
) -> Vec<f32> {
    rewards
        .iter()
        .zip(online_next.iter().zip(target_next))
        .map(|(&r, (online, target))| {
            let best = online
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i);
            match best.and_then(|i| target.get(i)) {
                Some(&value) => r + gamma * value,
                None => r,
            }
        })
        .collect()
}

enum Msg {
    Feedback(Transition, Instant),
    Wake,
    /// From now on, train only while a settle waits.
    Pace,
    /// Train on everything queued before it, publish, and answer the version.
    Settle(Sender<u64>),
}

/// The item ids the network knows, in index order (index i + 1 is `ids[i]`), shared by
/// the handle (which grows it) and the thread (which saves it).
#[derive(Debug, Default)]
pub(crate) struct Vocabulary {
    ids: Mutex<Vec<String>>,
    len: AtomicUsize,
}

impl Vocabulary {
    fn new(ids: Vec<String>) -> Self {
        Self {
            len: AtomicUsize::new(ids.len()),
            ids: Mutex::new(ids),
        }
    }

    /// Items known now.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// The ids of the first `n` items.
    pub(crate) fn first(&self, n: usize) -> Vec<String> {
        self.ids.lock()[..n].to_vec()
    }
}

/// The handle to the learner thread; share it (`Arc<Learner>`) between request handlers.
/// Dropping it without [`Learner::shutdown`] lets the thread train on what is queued,
/// then publish and checkpoint as `shutdown` does, unawaited.
#[derive(Debug)]
pub struct Learner {
    tx: SyncSender<Msg>,
    q: QConfig,
    vocabulary: Arc<Vocabulary>,
    published: Arc<ArcSwap<Published>>,
    stop: Arc<AtomicBool>,
    worker: Mutex<Option<JoinHandle<Result<(), LearnError>>>>,
    accepted: AtomicU64,
    dropped: AtomicU64,
}

impl Learner {
    /// Starts the learner thread on the CPU for the items `items` (index i + 1 is
    /// `items[i]`). With `dir`, it resumes from the checkpoint there when there is one
    /// (made for an equal [`QConfig`]; an error otherwise), carrying over what it learned
    /// of every item still in `items`, and writes checkpoints there.
    pub fn start(
        config: LearnConfig,
        items: Vec<String>,
        dir: Option<&Path>,
    ) -> Result<Self, LearnError> {
        config.validate()?;
        let vocabulary = Arc::new(Vocabulary::new(items));
        let trainer = Trainer::new(config.clone(), Device::Cpu, vocabulary.clone(), dir)?;
        let (learner, rx) = Self::unstarted(&config, vocabulary, trainer.published.clone());
        let stop = learner.stop.clone();
        let handle = spawn_training_thread("onrec-learner", config.priority, move || {
            trainer.run(&rx, &stop)
        })
        .map_err(|e| LearnError::Train(format!("cannot start the learner thread: {e}")))?;
        *learner.worker.lock() = Some(handle);
        Ok(learner)
    }

    /// A handle whose queue nobody reads yet; `start` gives the receiver to the thread.
    fn unstarted(
        config: &LearnConfig,
        vocabulary: Arc<Vocabulary>,
        published: Arc<ArcSwap<Published>>,
    ) -> (Self, Receiver<Msg>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue);
        let learner = Self {
            tx,
            q: config.q.clone(),
            vocabulary,
            published,
            stop: Arc::new(AtomicBool::new(false)),
            worker: Mutex::new(None),
            accepted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        };
        (learner, rx)
    }

    /// Adds items after the known ones (their indices follow on), for items added to the
    /// catalog while serving; transitions may use them at once. Ids must be new.
    pub fn grow(&self, ids: impl IntoIterator<Item = String>) {
        let mut known = self.vocabulary.ids.lock();
        known.extend(ids);
        self.vocabulary.len.store(known.len(), Ordering::Release);
        drop(known);
        // The thread grows its tables when it next wakes; a full queue wakes it anyway.
        let _ = self.tx.try_send(Msg::Wake);
    }

    /// Items the learner knows (indices 1..=items); published weights catch up with
    /// [`Learner::grow`] at their next publication.
    pub fn items(&self) -> usize {
        self.vocabulary.len()
    }

    /// The ids of the first `n` items in index order (index i + 1 is the i-th): those of
    /// published weights that know `n` items, for another process, which matches items
    /// by id. `n` is at most [`Learner::items`].
    pub fn item_ids(&self, n: usize) -> Vec<String> {
        self.vocabulary.first(n.min(self.items()))
    }

    /// The Q-network's shape.
    pub fn q_config(&self) -> &QConfig {
        &self.q
    }

    /// Queues a transition for learning without blocking: `Dropped` when the learner is
    /// behind and its queue is full, `Invalid` when it does not fit the network.
    pub fn submit(&self, transition: Transition) -> Result<(), LearnError> {
        self.q.check_transition(&transition, self.items())?;
        match self.tx.try_send(Msg::Feedback(transition, Instant::now())) {
            Ok(()) => {
                self.accepted.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("onrec_learn_transitions_total").increment(1);
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("onrec_learn_transitions_dropped_total").increment(1);
                Err(LearnError::Dropped)
            }
            Err(TrySendError::Disconnected(_)) => Err(LearnError::Stopped),
        }
    }

    /// The latest published weights.
    pub fn current(&self) -> Arc<Published> {
        self.published.load_full()
    }

    /// Transitions queued since start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Transitions dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Makes training follow [`Learner::settle`] calls instead of the clock: the learner
    /// takes transitions as they come but trains only while a settle waits, on everything
    /// it owes, with no rest between steps. With its queue never full between settles,
    /// what it learns then depends only on what it was given: a driver that settles it
    /// at fixed points (the simulator) replays a run exactly.
    pub fn pace(&self) {
        let _ = self.tx.send(Msg::Pace);
    }

    /// Waits until the learner has trained on everything submitted before this call and
    /// published the result, at most `timeout`; returns the published version (`None` on
    /// time-out or when stopped).
    pub fn settle(&self, timeout: Duration) -> Option<u64> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx.send(Msg::Settle(reply)).ok()?;
        answer.recv_timeout(timeout).ok()
    }

    /// Stops the thread promptly: transitions still queued are discarded and training
    /// steps not yet run are skipped, but weights trained and not yet published are
    /// published, and the final checkpoint (with the optimiser's moments and the replay
    /// buffer) is written when there is a directory. A second call does nothing.
    pub fn shutdown(&self) -> Result<(), LearnError> {
        self.stop.store(true, Ordering::Release);
        // A full queue wakes the thread anyway, so a failed wake-up needs no retry.
        let _ = self.tx.try_send(Msg::Wake);
        let handle = self.worker.lock().take();
        match handle {
            Some(h) => h
                .join()
                .map_err(|_| LearnError::Train("the learner thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

/// Starts a thread that trains: at `priority`, with the tensor work that candle
/// parallelises with rayon kept on it instead of the global pool that serving uses.
pub fn spawn_training_thread<T: Send + 'static>(
    name: &str,
    priority: Priority,
    work: impl FnOnce() -> Result<T, LearnError> + Send + 'static,
) -> std::io::Result<JoinHandle<Result<T, LearnError>>> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            if priority == Priority::Idle {
                lower_priority();
                if let Err(e) = crate::yielding::start() {
                    tracing::warn!(error = %e, "a training thread does not yield to serving");
                }
            }
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .use_current_thread()
                .build()
                .map_err(|e| LearnError::Train(format!("a training thread's pool: {e}")))?;
            pool.install(work)
        })
}

/// Gives the calling thread the lowest scheduling priority: the idle policy, which any
/// other thread preempts when it wakes (a lower nice value only shortens the thread's
/// share, and a waking request may still wait out its time slice). A refusal leaves it
/// as it was, with a warning.
#[cfg(target_os = "linux")]
fn lower_priority() {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
    if let Err(e) = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    ) {
        tracing::warn!(error = ?e, "a training thread keeps its priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {
    tracing::warn!("a training thread keeps its priority: lowering it is Linux-only");
}

/// The learner thread's state.
pub(crate) struct Trainer {
    pub(crate) cfg: LearnConfig,
    device: Device,
    pub(crate) online_vars: VarMap,
    online: Dense,
    pub(crate) items: Items,
    pub(crate) target_vars: VarMap,
    target: Dense,
    pub(crate) target_items: Items,
    pub(crate) opt: AdamW,
    pub(crate) replay: Replay,
    pub(crate) vocabulary: Arc<Vocabulary>,
    dir: Option<PathBuf>,
    pub(crate) version: u64,
    pub(crate) updates: u64,
    owed: f64,
    since_publish: u64,
    /// Steps since the target's item tables last followed the online ones.
    since_item_sync: u64,
    last_publish: Instant,
    /// The version last written (or loaded) and when.
    checkpointed: (u64, Instant),
    /// Submission times of transitions no training step has seen in the buffer yet.
    fresh: Vec<Instant>,
    /// Submission times of transitions trained on but not yet published.
    trained: Vec<Instant>,
    published: Arc<ArcSwap<Published>>,
    /// Whether it trains only while a settle waits (see [`Learner::pace`]).
    paced: bool,
    /// Settles waiting for training to catch up.
    waiters: Vec<Sender<u64>>,
}

impl Trainer {
    fn new(
        cfg: LearnConfig,
        device: Device,
        vocabulary: Arc<Vocabulary>,
        dir: Option<&Path>,
    ) -> Result<Self, LearnError> {
        let n = vocabulary.len();
        let (online_vars, online) = Dense::seeded(&cfg.q, &device)?;
        let (target_vars, target) = Dense::seeded(&cfg.q, &device)?;
        let items = Items::seeded(&cfg.q, n);
        let opt = AdamW::new(
            &online_vars,
            &items,
            AdamParams::new(cfg.lr, cfg.weight_decay),
        )?;
        let mut trainer = Self {
            replay: Replay::new(cfg.replay_capacity, cfg.q.seed ^ 0x7e91_a7b0),
            target_items: items.clone(),
            items,
            published: Arc::new(ArcSwap::from_pointee(Published {
                version: 0,
                updates: 0,
                net: QNet::seeded(&cfg.q, 0, &device)?,
                published_at: Instant::now(),
            })),
            cfg,
            device,
            online_vars,
            online,
            target_vars,
            target,
            opt,
            vocabulary,
            dir: dir.map(Path::to_path_buf),
            version: 0,
            updates: 0,
            owed: 0.0,
            since_publish: 0,
            since_item_sync: 0,
            last_publish: Instant::now(),
            checkpointed: (0, Instant::now()),
            fresh: Vec::new(),
            trained: Vec::new(),
            paced: false,
            waiters: Vec::new(),
        };
        if let Some(dir) = dir
            && let Some(resumed) = checkpoint::resume(&mut trainer, dir)?
        {
            let Resumed { kept, new, gone } = resumed;
            tracing::info!(
                dir = %dir.display(),
                version = trainer.version,
                updates = trainer.updates,
                replay = trainer.replay.len(),
                items_kept = kept,
                items_new = new,
                items_gone = gone,
                "learner resumed"
            );
            trainer.checkpointed = (trainer.version, Instant::now());
        }
        trainer.published.store(Arc::new(Published {
            version: trainer.version,
            updates: trainer.updates,
            net: trainer.snapshot()?,
            published_at: Instant::now(),
        }));
        metrics::gauge!("onrec_learn_weights_version").set(trainer.version as f64);
        metrics::gauge!("onrec_learn_items").set(trainer.items.len() as f64);
        metrics::gauge!("onrec_learn_replay_size").set(trainer.replay.len() as f64);
        Ok(trainer)
    }

    fn snapshot(&self) -> Result<QNet, LearnError> {
        QNet::snapshot(&self.online_vars, &self.items, &self.cfg.q, &self.device)
    }

    fn run(mut self, rx: &Receiver<Msg>, stop: &AtomicBool) -> Result<(), LearnError> {
        loop {
            if stop.load(Ordering::Acquire) {
                break;
            }
            self.answer_settled()?;
            let wait = if self.settling() {
                Duration::ZERO
            } else {
                self.wait()
            };
            match crate::yielding::waiting(|| rx.recv_timeout(wait)) {
                Ok(msg) => {
                    self.take(msg);
                    // Bounded, so a steady stream cannot postpone training forever.
                    for _ in 1..self.cfg.queue {
                        match rx.try_recv() {
                            Ok(msg) => self.take(msg),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let training = Instant::now();
            while self.owed >= 1.0
                && (!self.paced || self.settling())
                && !stop.load(Ordering::Acquire)
            {
                self.owed -= 1.0;
                self.follow_vocabulary();
                let started = Instant::now();
                logged("training step", self.step());
                if !self.paced {
                    self.rest(started.elapsed());
                }
                if self.since_publish >= self.cfg.publish_every {
                    logged("publication", self.publish());
                }
                // What arrived during the step is taken now: a long run of steps would
                // otherwise leave the queue to overflow. Every second the loop lets the
                // upkeep below run.
                for _ in 0..self.cfg.queue {
                    match rx.try_recv() {
                        Ok(msg) => self.take(msg),
                        Err(_) => break,
                    }
                }
                if training.elapsed() >= UPKEEP_EVERY {
                    break;
                }
            }
            self.follow_vocabulary();
            // Items added since the last publication reach serving now, trained or not.
            let grown = self.published.load().net.num_items() < self.items.len();
            if grown
                || (!self.paced
                    && self.since_publish > 0
                    && self.last_publish.elapsed() >= self.cfg.publish_interval)
            {
                logged("publication", self.publish());
            }
            if self.checkpoint_due() {
                logged("checkpoint", self.checkpoint(false));
            }
        }
        if self.since_publish > 0 {
            self.publish()?;
        }
        if self.dir.is_some() {
            self.checkpoint(true)?;
        }
        Ok(())
    }

    /// Whether a settle waits for training to catch up.
    fn settling(&self) -> bool {
        !self.waiters.is_empty()
    }

    /// Publishes and answers the waiting settles once nothing is owed.
    fn answer_settled(&mut self) -> Result<(), LearnError> {
        if !self.settling() || self.owed >= 1.0 {
            return Ok(());
        }
        if self.since_publish > 0 {
            self.publish()?;
        }
        for w in self.waiters.drain(..) {
            let _ = w.send(self.version);
        }
        Ok(())
    }

    /// Rests after a step that took `busy`, so training takes at most `max_busy` of the
    /// time (at most 100 ms at once, so shutdown and publication stay prompt).
    fn rest(&self, busy: Duration) {
        if self.cfg.max_busy < 1.0 {
            let idle = busy.mul_f64((1.0 - self.cfg.max_busy) / self.cfg.max_busy);
            crate::yielding::waiting(|| std::thread::sleep(idle.min(Duration::from_millis(100))));
        }
    }

    /// How long to wait for feedback before a time-based publication or checkpoint.
    fn wait(&self) -> Duration {
        let mut wait = self.cfg.publish_interval;
        if self.since_publish > 0 {
            wait = wait.saturating_sub(self.last_publish.elapsed());
        }
        let (version, at) = self.checkpointed;
        if self.dir.is_some() && version != self.version {
            wait = wait.min(self.cfg.checkpoint_interval.saturating_sub(at.elapsed()));
        }
        wait.max(Duration::from_millis(1))
    }

    /// Grows the item tables (and their moments) to the items the handle knows.
    fn follow_vocabulary(&mut self) {
        let n = self.vocabulary.len();
        if n > self.items.len() {
            self.items.grow(&self.cfg.q, n);
            self.target_items.grow(&self.cfg.q, n);
            self.opt.grow(&self.items);
            metrics::gauge!("onrec_learn_items").set(n as f64);
        }
    }

    fn take(&mut self, msg: Msg) {
        let (t, submitted) = match msg {
            Msg::Feedback(t, submitted) => (t, submitted),
            Msg::Wake => return,
            Msg::Pace => {
                self.paced = true;
                return;
            }
            Msg::Settle(reply) => {
                self.waiters.push(reply);
                return;
            }
        };
        self.follow_vocabulary();
        self.replay.push(t);
        push_bounded(&mut self.fresh, submitted, self.cfg.replay_capacity);
        metrics::gauge!("onrec_learn_replay_size").set(self.replay.len() as f64);
        if self.replay.len() >= self.cfg.min_replay.max(1) {
            // Under more traffic than it can train on, the backlog stays bounded: the
            // newest transitions are in the replay, the oldest replays are skipped.
            self.owed = (self.owed + self.cfg.replay_ratio / self.cfg.batch_size as f64)
                .min(MAX_OWED_STEPS);
        }
    }

    /// One Double DQN step on a uniform mini-batch, then the target update. Only the item
    /// rows the batch uses are gathered, differentiated and updated.
    pub(crate) fn step(&mut self) -> Result<(), LearnError> {
        let batch = self.replay.sample(self.cfg.batch_size);
        let b = batch.len();
        let l = self.cfg.q.max_history;
        let mut local: HashMap<u32, u32> = HashMap::from([(0, 0)]);
        let mut used = vec![0u32];
        let mut note = |item: u32| {
            local.entry(item).or_insert_with(|| {
                used.push(item);
                used.len() as u32 - 1
            });
        };
        for t in &batch {
            t.state.recent(l).iter().copied().for_each(&mut note);
            note(t.action);
            if let Some(next) = &t.next_state {
                next.recent(l).iter().copied().for_each(&mut note);
            }
            t.next_candidates.iter().copied().for_each(&mut note);
        }
        let row = |item: u32| local.get(&item).copied().unwrap_or(0);
        let dev = &self.device;
        let history = Var::from_tensor(&self.items.history.gather(&used, dev)?)?;
        let actions = Var::from_tensor(&self.items.actions.gather(&used, dev)?)?;
        let target_history = self.target_items.history.gather(&used, dev)?;
        let target_actions = self.target_items.actions.gather(&used, dev)?;
        let (fixed_history, fixed_actions) =
            (history.as_tensor().detach(), actions.as_tensor().detach());

        let states: Vec<&State> = batch.iter().map(|t| &t.state).collect();
        let taken: Vec<u32> = batch.iter().map(|t| t.action).collect();
        let rewards: Vec<f32> = batch.iter().map(|t| t.reward).collect();
        let live: Vec<usize> = (0..b).filter(|&i| !batch[i].is_terminal()).collect();
        let mut next_states = Vec::with_capacity(live.len());
        let mut next_lists = Vec::with_capacity(live.len());
        for &i in &live {
            if let Some(s) = &batch[i].next_state {
                next_states.push(s);
                next_lists.push(batch[i].next_candidates.as_slice());
            }
        }
        let online_rows = Rows {
            history: &fixed_history,
            actions: &fixed_actions,
            row: &row,
        };
        let target_rows = Rows {
            history: &target_history,
            actions: &target_actions,
            row: &row,
        };
        let online_live = self
            .online
            .q_lists(&online_rows, &next_states, &next_lists)?;
        let target_live = self
            .target
            .q_lists(&target_rows, &next_states, &next_lists)?;
        let mut online_next = vec![Vec::new(); b];
        let mut target_next = vec![Vec::new(); b];
        for ((&i, o), t) in live.iter().zip(online_live).zip(target_live) {
            online_next[i] = o;
            target_next[i] = t;
        }
        let targets = double_dqn_targets(&rewards, &online_next, &target_next, self.cfg.gamma);
        let y = Tensor::from_vec(targets, b, dev)?;
        let trained_rows = Rows {
            history: history.as_tensor(),
            actions: actions.as_tensor(),
            row: &row,
        };
        let q = self.online.forward(&trained_rows, &states, &taken)?;
        let loss = candle_nn::loss::huber(&q, &y, 1.0)?;
        let mut grads = loss.backward()?;
        let mut vars = self.opt.vars();
        vars.extend([history.clone(), actions.clone()]);
        onrec_model::sasrec::clip_grads(&mut grads, &vars, self.cfg.max_grad_norm)?;
        let flat = |v: &Var| -> Result<Option<Vec<f32>>, LearnError> {
            Ok(match grads.get(v.as_tensor()) {
                Some(g) => Some(g.flatten_all()?.to_vec1::<f32>()?),
                None => None,
            })
        };
        let (history_grad, actions_grad) = (flat(&history)?, flat(&actions)?);
        self.opt.step(
            &grads,
            &mut self.items,
            &used,
            history_grad.as_deref(),
            actions_grad.as_deref(),
        )?;

        let td = (&q - &y)?.abs()?.mean_all()?.to_scalar::<f32>()?;
        let q_mean = q.mean_all()?.to_scalar::<f32>()?;
        metrics::gauge!("onrec_learn_loss").set(f64::from(loss.to_scalar::<f32>()?));
        metrics::gauge!("onrec_learn_td_error").set(f64::from(td));
        metrics::gauge!("onrec_learn_q_mean").set(f64::from(q_mean));
        metrics::counter!("onrec_learn_updates_total").increment(1);
        self.updates += 1;
        self.since_publish += 1;
        let cap = self.cfg.replay_capacity;
        for at in self.fresh.drain(..) {
            push_bounded(&mut self.trained, at, cap);
        }
        if self.cfg.tau > 0.0 {
            copy_into(&self.target_vars, &self.online_vars, self.cfg.tau)?;
            self.since_item_sync += 1;
        } else if self.updates.is_multiple_of(self.cfg.target_every) {
            copy_into(&self.target_vars, &self.online_vars, 1.0)?;
            self.target_items.clone_from(&self.items);
        }
        Ok(())
    }

    /// Moves the target's item tables towards the online ones as far as the soft updates
    /// of the steps since the last time would have: `(1 − τ)^k` of the way back for k
    /// steps. Done at publication rather than every step, because it touches every row.
    fn sync_target_items(&mut self) {
        if self.since_item_sync == 0 {
            return;
        }
        let keep = (1.0 - self.cfg.tau)
            .powi(i32::try_from(self.since_item_sync).unwrap_or(i32::MAX))
            as f32;
        for (target, online) in [
            (&mut self.target_items.history, &self.items.history),
            (&mut self.target_items.actions, &self.items.actions),
        ] {
            for (t, &o) in target.values_mut().iter_mut().zip(online.values()) {
                *t = keep * *t + (1.0 - keep) * o;
            }
        }
        self.since_item_sync = 0;
    }

    fn publish(&mut self) -> Result<(), LearnError> {
        self.follow_vocabulary();
        self.sync_target_items();
        let net = self.snapshot()?;
        let now = Instant::now();
        self.version += 1;
        self.published.store(Arc::new(Published {
            version: self.version,
            updates: self.updates,
            net,
            published_at: now,
        }));
        self.since_publish = 0;
        self.last_publish = now;
        metrics::gauge!("onrec_learn_weights_version").set(self.version as f64);
        let latency = metrics::histogram!("onrec_learn_feedback_to_publish_seconds");
        for at in self.trained.drain(..) {
            latency.record(now.duration_since(at).as_secs_f64());
        }
        Ok(())
    }

    fn checkpoint_due(&self) -> bool {
        let (version, at) = self.checkpointed;
        self.dir.is_some()
            && version != self.version
            && at.elapsed() >= self.cfg.checkpoint_interval
    }

    /// Publishes what is trained (so a checkpoint is always a published version), then
    /// writes a checkpoint; `last` (at shutdown) adds the replay buffer.
    fn checkpoint(&mut self, last: bool) -> Result<(), LearnError> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        if self.since_publish > 0 {
            self.publish()?;
        }
        self.sync_target_items();
        checkpoint::write(self, &dir, last)?;
        self.checkpointed = (self.version, Instant::now());
        tracing::debug!(dir = %dir.display(), version = self.version, "learner checkpoint written");
        Ok(())
    }
}

/// Keeps at most `cap` entries, forgetting the oldest: a latency sample lost under
/// overload is better than memory that grows without bound.
fn push_bounded(v: &mut Vec<Instant>, at: Instant, cap: usize) {
    if v.len() >= cap {
        v.drain(..=v.len() - cap);
    }
    v.push(at);
}

fn logged(what: &str, result: Result<(), LearnError>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "learner {what} failed");
    }
}

/// `dst ← (1 − τ) · dst + τ · src`, variable by variable (τ = 1 copies).
fn copy_into(dst: &VarMap, src: &VarMap, tau: f64) -> Result<(), LearnError> {
    let poisoned = |e: String| LearnError::Train(e);
    let dst = dst.data().lock().map_err(|e| poisoned(e.to_string()))?;
    let src = src.data().lock().map_err(|e| poisoned(e.to_string()))?;
    for (name, d) in dst.iter() {
        let s = src
            .get(name)
            .ok_or_else(|| LearnError::Train(format!("no variable {name} to copy")))?;
        let value = if tau >= 1.0 {
            s.as_tensor().copy()?
        } else {
            ((d.as_tensor() * (1.0 - tau))? + (s.as_tensor() * tau)?)?
        };
        d.set(&value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use onrec_model::context::ContextIds;
    use onrec_model::rng::SplitMix64;

    use super::*;
    use crate::checkpoint::STATE;

    fn ctx(hour: u8) -> ContextIds {
        ContextIds::from_parts(Some(hour), Some("mobile"))
    }

    fn state(history: &[u32], hour: u8) -> State {
        State {
            history: history.to_vec(),
            context: ctx(hour),
            user: None,
        }
    }

    fn ids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("sku-{i}")).collect()
    }

    fn trainer(cfg: &LearnConfig) -> Trainer {
        let vocabulary = Arc::new(Vocabulary::new(ids(10)));
        Trainer::new(cfg.clone(), Device::Cpu, vocabulary, None).unwrap()
    }

    fn small() -> LearnConfig {
        LearnConfig {
            q: QConfig {
                embed: 8,
                hidden: 16,
                ..QConfig::default()
            },
            batch_size: 16,
            min_replay: 16,
            replay_capacity: 1000,
            replay_ratio: 16.0,
            publish_every: 5,
            ..LearnConfig::default()
        }
    }

    /// A session step: the user saw `action` after `history`, and, unless `terminal`, was
    /// shown the candidates 1..=10 next.
    fn transition(rng: &mut SplitMix64, hour: u8, terminal: bool) -> Transition {
        let history: Vec<u32> = (0..rng.below(5))
            .map(|_| 1 + rng.below(10) as u32)
            .collect();
        let action = 1 + rng.below(10) as u32;
        let reward = match (hour, action) {
            (9, 7) | (21, 3) => 1.0,
            _ => 0.0,
        };
        let mut next = history.clone();
        next.push(action);
        Transition {
            state: state(&history, hour),
            action,
            reward,
            next_state: (!terminal).then(|| state(&next, hour)),
            next_candidates: if terminal { vec![] } else { (1..=10).collect() },
        }
    }

    /// Submits every transition, waiting out a full queue (the learner is behind).
    fn submit_all(learner: &Learner, ts: &[Transition]) {
        for t in ts {
            let mut tries = 0;
            while let Err(e) = learner.submit(t.clone()) {
                assert!(matches!(e, LearnError::Dropped), "{e}");
                tries += 1;
                assert!(tries < 10_000, "the learner stopped taking transitions");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Waits until the published weights include `updates` steps; a guard against
    /// hanging, not a speed check: ten minutes, since a learner thread on two cores
    /// shared with several builds and simulations took over a minute.
    fn wait_for_updates(learner: &Learner, updates: u64) -> Arc<Published> {
        for _ in 0..12_000 {
            let current = learner.current();
            if current.updates >= updates {
                return current;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "only {} of {updates} updates published",
            learner.current().updates
        );
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("onrec-learn-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn double_dqn_values_the_online_choice_with_the_target_network() {
        let rewards = [1.0, 0.5, 2.0, 0.0];
        let online = [vec![0.1, 0.9, 0.3], vec![], vec![5.0, 1.0], vec![-1.0]];
        let target = [vec![10.0, 2.0, 30.0], vec![], vec![4.0, 100.0], vec![-3.0]];
        let y = double_dqn_targets(&rewards, &online, &target, 0.5);
        // Not max(target) = 30 or 100: the online argmax picks the action.
        assert_eq!(y, vec![1.0 + 0.5 * 2.0, 0.5, 2.0 + 0.5 * 4.0, -1.5]);
        assert_eq!(
            double_dqn_targets(&[1.0], &[vec![3.0]], &[vec![7.0]], 0.0),
            vec![1.0]
        );
    }

    #[test]
    fn a_full_queue_drops_the_newest_and_counts_it() {
        let cfg = LearnConfig {
            queue: 2,
            ..small()
        };
        let trainer = trainer(&cfg);
        let (learner, rx) =
            Learner::unstarted(&cfg, trainer.vocabulary.clone(), trainer.published.clone());
        let mut rng = SplitMix64::new(1);
        learner.submit(transition(&mut rng, 9, true)).unwrap();
        learner.submit(transition(&mut rng, 9, true)).unwrap();
        for _ in 0..3 {
            let e = learner.submit(transition(&mut rng, 9, true)).unwrap_err();
            assert!(matches!(e, LearnError::Dropped), "{e}");
        }
        assert_eq!((learner.accepted(), learner.dropped()), (2, 3));
        let mut bad = transition(&mut rng, 9, true);
        bad.action = 11;
        assert!(matches!(learner.submit(bad), Err(LearnError::Invalid(_))));
        drop(rx);
        let e = learner.submit(transition(&mut rng, 9, true)).unwrap_err();
        assert!(matches!(e, LearnError::Stopped), "{e}");
        assert_eq!(learner.dropped(), 3);
    }

    #[test]
    fn q_learning_finds_the_rewarded_item_per_hour() {
        let cfg = LearnConfig {
            replay_ratio: 32.0,
            queue: 4096,
            ..LearnConfig::default()
        };
        let learner = Learner::start(cfg.clone(), ids(10), None).unwrap();
        let before = learner.current();
        assert_eq!((before.version, before.updates), (0, 0));
        let probe = [state(&[2, 5], 9), state(&[2, 5], 21)];
        let all: Vec<u32> = (1..=10).collect();
        let lists = [all.clone(), all.clone()];
        let q0 = before.net.q_values(&probe, &lists).unwrap();

        let mut rng = SplitMix64::new(3);
        let ts: Vec<Transition> = (0..2000)
            .map(|i| transition(&mut rng, if i % 2 == 0 { 9 } else { 21 }, true))
            .collect();
        submit_all(&learner, &ts);
        let owed = ((ts.len() - cfg.min_replay + 1) as f64 * cfg.replay_ratio
            / cfg.batch_size as f64) as u64;
        let after = wait_for_updates(&learner, owed - cfg.publish_every);
        assert!(after.version > before.version);
        let q = after.net.q_values(&probe, &lists).unwrap();
        let argmax = |row: &[f32]| {
            all[row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap()]
        };
        assert_eq!(argmax(&q[0]), 7, "{q:?}");
        assert_eq!(argmax(&q[1]), 3, "{q:?}");
        assert!(q[0][6] > q0[0][6] && q[0][6] > 0.5, "{q:?} {q0:?}");
        learner.shutdown().unwrap();
        assert!(learner.current().version >= after.version);
        assert!(matches!(
            learner.submit(ts[0].clone()),
            Err(LearnError::Stopped)
        ));
        learner.shutdown().unwrap();
    }

    #[test]
    fn a_paced_learner_trains_only_when_settled_and_replays_exactly() {
        let cfg = LearnConfig {
            queue: 4096,
            ..small()
        };
        let mut rng = SplitMix64::new(8);
        let ts: Vec<Transition> = (0..200)
            .map(|i| transition(&mut rng, if i % 2 == 0 { 9 } else { 21 }, i % 3 == 0))
            .collect();
        let probe = [state(&[2, 5], 9)];
        let lists = [(1..=10).collect::<Vec<u32>>()];
        let run = || {
            let learner = Learner::start(cfg.clone(), ids(10), None).unwrap();
            learner.pace();
            submit_all(&learner, &ts[..100]);
            // Nothing trains between settles, however long it waits.
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(learner.current().updates, 0);
            let first = learner.settle(Duration::from_secs(120)).expect("settled");
            let trained = learner.current();
            assert_eq!(trained.version, first);
            let owed = ((100 - cfg.min_replay + 1) as f64 * cfg.replay_ratio
                / cfg.batch_size as f64) as u64;
            assert_eq!(trained.updates, owed, "every step it owes, at once");
            submit_all(&learner, &ts[100..]);
            learner.settle(Duration::from_secs(120)).expect("settled");
            let q = learner.current().net.q_values(&probe, &lists).unwrap();
            learner.shutdown().unwrap();
            assert_eq!(learner.settle(Duration::from_secs(1)), None, "stopped");
            q
        };
        assert_eq!(
            run(),
            run(),
            "the same transitions and settles, the same weights"
        );
    }

    #[test]
    fn a_restarted_learner_resumes_from_its_checkpoint() {
        let dir = temp_dir("resume");
        let cfg = LearnConfig {
            tau: 0.0,
            target_every: 7,
            ..small()
        };
        let learner = Learner::start(cfg.clone(), ids(10), Some(&dir)).unwrap();
        let mut rng = SplitMix64::new(5);
        let ts: Vec<Transition> = (0..200)
            .map(|i| transition(&mut rng, if i % 2 == 0 { 9 } else { 21 }, i % 3 == 0))
            .collect();
        submit_all(&learner, &ts);
        wait_for_updates(&learner, 150);
        learner.shutdown().unwrap();
        let old = learner.current();
        assert!(old.version > 0);
        let probe = [state(&[1, 2], 9), state(&[], 21)];
        let lists = [vec![1, 3, 7], vec![3, 10]];
        let q_old = old.net.q_values(&probe, &lists).unwrap();

        let resumed = Learner::start(cfg.clone(), ids(10), Some(&dir)).unwrap();
        let now = resumed.current();
        assert_eq!((now.version, now.updates), (old.version, old.updates));
        assert_eq!(now.net.q_values(&probe, &lists).unwrap(), q_old);
        submit_all(&resumed, &ts[..50]);
        let later = wait_for_updates(&resumed, old.updates + 1);
        assert!(later.version > old.version);
        resumed.shutdown().unwrap();
        let last = resumed.current();

        // The optimiser's moments and the replay buffer came back too.
        let at = |ids: Vec<String>| {
            Trainer::new(
                cfg.clone(),
                Device::Cpu,
                Arc::new(Vocabulary::new(ids)),
                Some(&dir),
            )
            .unwrap()
        };
        let same = at(ids(10));
        assert_eq!(
            (same.opt.steps(), same.updates),
            (last.updates, last.updates)
        );
        assert_eq!(same.replay.len(), 250);

        // A changed catalog: items 4..=6 and 8..=10 are gone, the rest moved, one is new.
        let changed: Vec<String> = ["sku-7", "new-1", "sku-3", "sku-1", "sku-2"]
            .map(String::from)
            .to_vec();
        let moved = at(changed.clone());
        let net = moved.snapshot().unwrap();
        let q_moved = net
            .q_values(&[state(&[4, 5], 9)], &[vec![4, 3, 1]])
            .unwrap();
        let q_last = last
            .net
            .q_values(&[state(&[1, 2], 9)], &[vec![1, 3, 7]])
            .unwrap();
        for (a, b) in q_moved[0].iter().zip(&q_last[0]) {
            assert!((a - b).abs() < 1e-6, "{q_moved:?} {q_last:?}");
        }
        let fresh = Items::seeded(&cfg.q, 5);
        assert_eq!(moved.items.actions.row(2), fresh.actions.row(2));
        assert!(moved.replay.len() < 250 && !moved.replay.is_empty());
        for t in moved.replay.iter() {
            assert!([1, 3, 4, 5].contains(&t.action), "{t:?}");
            assert!(t.next_candidates.iter().all(|&c| [1, 3, 4, 5].contains(&c)));
        }
        let learner = Learner::start(cfg.clone(), changed, Some(&dir)).unwrap();
        assert_eq!(learner.current().version, last.version);
        learner.shutdown().unwrap();

        let other = LearnConfig {
            q: QConfig { hidden: 8, ..cfg.q },
            ..small()
        };
        let e = Learner::start(other, ids(10), Some(&dir))
            .unwrap_err()
            .to_string();
        assert!(e.contains("different Q-network"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn checkpoints_are_written_periodically_while_learning() {
        let dir = temp_dir("periodic");
        let cfg = LearnConfig {
            checkpoint_interval: Duration::from_millis(20),
            ..small()
        };
        let learner = Learner::start(cfg, ids(10), Some(&dir)).unwrap();
        let mut rng = SplitMix64::new(6);
        let ts: Vec<Transition> = (0..100).map(|_| transition(&mut rng, 9, true)).collect();
        submit_all(&learner, &ts);
        wait_for_updates(&learner, 80);
        let mut saved = None;
        for _ in 0..400 {
            if let Ok(text) = std::fs::read_to_string(dir.join(STATE)) {
                let s: serde_json::Value = serde_json::from_str(&text).unwrap();
                let version = s["version"].as_u64().unwrap();
                if version > 0 {
                    saved = Some(version);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let saved = saved.expect("no periodic checkpoint");
        assert!(saved <= learner.current().version);
        learner.shutdown().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_target_network_follows_softly_or_by_periodic_copy() {
        let probe = [state(&[4], 9)];
        let lists = [vec![1, 2, 7]];
        let mut rng = SplitMix64::new(8);
        let ts: Vec<Transition> = (0..32).map(|_| transition(&mut rng, 9, false)).collect();
        for (tau, target_every) in [(0.0, 3), (0.5, 1)] {
            let cfg = LearnConfig {
                tau,
                target_every,
                ..small()
            };
            let mut t = trainer(&cfg);
            for x in &ts {
                t.take(Msg::Feedback(x.clone(), Instant::now()));
            }
            let q = |t: &mut Trainer| {
                t.sync_target_items();
                let net =
                    |vars, items| QNet::snapshot(vars, items, &t.cfg.q, &Device::Cpu).unwrap();
                (
                    net(&t.online_vars, &t.items)
                        .q_values(&probe, &lists)
                        .unwrap(),
                    net(&t.target_vars, &t.target_items)
                        .q_values(&probe, &lists)
                        .unwrap(),
                )
            };
            let (start, _) = q(&mut t);
            let weights = |vars: &VarMap, items: &Items| {
                let mut all: Vec<f32> = Vec::new();
                let mut named: Vec<_> = crate::qnet::copy_vars(vars).unwrap().into_iter().collect();
                named.sort_by(|a, b| a.0.cmp(&b.0));
                for (_, v) in named {
                    all.extend(v.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
                all.extend(items.history.values());
                all.extend(items.actions.values());
                all
            };
            let before = weights(&t.online_vars, &t.items);
            t.step().unwrap();
            let (online, target) = q(&mut t);
            assert_ne!(online, start);
            if tau == 0.0 {
                assert_eq!(target, start);
                t.step().unwrap();
                assert_eq!(q(&mut t).1, start);
                t.step().unwrap();
                let (online, target) = q(&mut t);
                assert_eq!(online, target);
            } else {
                assert_ne!(target, start);
                let now = weights(&t.online_vars, &t.items);
                let followed = weights(&t.target_vars, &t.target_items);
                for (x, (a, b)) in followed.iter().zip(before.iter().zip(&now)) {
                    assert!((x - (a + b) / 2.0).abs() < 1e-6, "{x} {a} {b}");
                }
            }
        }
    }

    #[test]
    fn settings_out_of_range_are_rejected() {
        for cfg in [
            LearnConfig {
                gamma: 1.5,
                ..small()
            },
            LearnConfig {
                tau: 0.0,
                target_every: 0,
                ..small()
            },
            LearnConfig {
                batch_size: 0,
                ..small()
            },
            LearnConfig {
                replay_ratio: f64::NAN,
                ..small()
            },
        ] {
            assert!(matches!(
                Learner::start(cfg, ids(10), None),
                Err(LearnError::Config(_))
            ));
        }
    }
}
