//! Serving the encoder: a dedicated OS thread owns the model; async callers send it jobs
//! over a bounded channel and await a oneshot reply. Requests are batched dynamically:
//! after the first job arrives, the worker waits at most the batch window for more (never
//! past `max_batch`), then encodes and scores them all at once, reading the item table
//! once for the batch. A request is never held longer than the window. On the CPU the
//! worker runs the encoder's written-out path ([`crate::infer`]) and keeps each
//! history's encoding, so a user's requests between two of their events cost only the
//! context and the scoring; elsewhere candle runs it (one forward pass, one product).
//!
//! On the CPU a request that finds the written-out path free is scored on its own thread
//! instead, with the same code and the same kept encodings: it then waits for no other
//! thread to be scheduled, twice (there and back), which is what a request waited for
//! when the cores were busy. Requests that find it busy go to the worker, so under load
//! they are still batched.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::context::ContextIds;
use crate::infer::{HostEncoder, TopK};
use crate::sasrec::SasRec;

/// One user to score.
#[derive(Debug, Clone)]
pub struct Query {
    /// Model item indices, oldest first (empty is allowed but gives a context-only vector).
    pub history: Vec<u32>,
    /// The moment of the request.
    pub context: ContextIds,
    /// Model item indices that must not be returned.
    pub exclude: Vec<u32>,
    /// How many items to return.
    pub k: usize,
    /// A shift of the scores of groups of items: item i's score gains
    /// `shift.offsets[shift.groups[i]]`.
    pub shift: Option<GroupShift>,
}

/// Why a query got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// The queue is full.
    #[error("the encoder queue is full")]
    Overloaded,
    /// The worker thread is gone.
    #[error("the encoder is not running")]
    Stopped,
    /// The forward pass failed.
    #[error("encoder: {0}")]
    Failed(String),
}

/// The encoder's answer for one user.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The top `k` (index, score) pairs, best first.
    pub items: Vec<(u32, f32)>,
    /// The user vector u the scores are products with (`hidden` wide).
    pub user: Vec<f32>,
}

type Reply = tokio::sync::oneshot::Sender<Result<Scored, ServeError>>;

/// Starts an encoder's worker thread.
type Start = Box<dyn FnOnce() -> std::io::Result<()> + Send>;

/// A cheap handle to the encoder thread.
#[derive(Clone)]
pub struct Encoder {
    tx: SyncSender<(Query, Reply)>,
    shared: Arc<Shared>,
}

/// What the handles of one encoder share.
struct Shared {
    /// The worker thread's start, made by the first query. A thread takes its scheduling
    /// policy from the thread that creates it, and encoders are built by training
    /// threads, which run at idle priority; requests come from serving threads.
    start: Mutex<Option<Start>>,
    /// Set once the first query has started the thread: later queries read only this.
    started: OnceLock<Result<(), String>>,
    /// The written-out path and its kept encodings, shared by the worker and the
    /// requests that find it free; `None` where candle serves.
    host: Option<Arc<Mutex<HostPath>>>,
    num_items: usize,
    width: usize,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("num_items", &self.shared.num_items)
            .field("width", &self.shared.width)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// Readies the worker for `model` on `device`; its thread starts with the first query
    /// (see [`Encoder`]). At most `queue` jobs wait, and batches are gathered as
    /// `batching` says. On the CPU the written-out serving path is built here, on the
    /// caller's thread, so that a new encoder is ready before the first request reaches it.
    pub fn start(
        model: SasRec,
        device: Device,
        queue: usize,
        batching: Batching,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(queue.max(1));
        let (num_items, width) = (model.config().num_items, model.config().hidden);
        // Candle serves where the written-out path fails to build.
        let host = if device.is_cpu() {
            HostEncoder::of(&model)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "the CPU serving path failed to build; candle serves");
                })
                .ok()
        } else {
            None
        };
        let host = host.map(|encoder| {
            Arc::new(Mutex::new(HostPath {
                encoder,
                encoded: Encoded::default(),
            }))
        });
        let worker_host = host.clone();
        let start: Start = Box::new(move || {
            std::thread::Builder::new()
                .name("onrec-encoder".into())
                .spawn(move || worker(&model, worker_host.as_deref(), &device, &rx, batching))
                .map(drop)
        });
        Ok(Self {
            tx,
            shared: Arc::new(Shared {
                start: Mutex::new(Some(start)),
                started: OnceLock::new(),
                host,
                num_items,
                width,
            }),
        })
    }

    /// Items the model knows (indices 1..=num_items).
    pub fn num_items(&self) -> usize {
        self.shared.num_items
    }

    /// Width of its user vectors.
    pub fn width(&self) -> usize {
        self.shared.width
    }

    /// The top `k` (index, score) pairs for one user, best first, and the user's vector.
    /// Scored on the caller's thread when the written-out path is free, else by the
    /// worker (see the module documentation).
    pub async fn top_k(&self, query: Query) -> Result<Scored, ServeError> {
        let shared = &self.shared;
        // Started even when this request is scored here, so that the worker is there (and
        // at the serving threads' priority) for the requests that will find the path busy.
        shared
            .started
            .get_or_init(|| {
                let start = shared
                    .start
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                start.map_or(Ok(()), |start| start().map_err(|e| e.to_string()))
            })
            .clone()
            .map_err(|e| ServeError::Failed(format!("cannot start the encoder thread: {e}")))?;
        if let Some(Ok(mut host)) = shared.host.as_ref().map(|h| h.try_lock()) {
            metrics::histogram!("onrec_encoder_batch_size").record(1.0);
            return host
                .score(&[&query])
                .pop()
                .ok_or_else(|| ServeError::Failed("no answer for the request".into()));
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.try_send((query, reply)).map_err(|e| match e {
            TrySendError::Full(_) => ServeError::Overloaded,
            TrySendError::Disconnected(_) => ServeError::Stopped,
        })?;
        rx.await.map_err(|_| ServeError::Stopped)?
    }
}

/// How the worker gathers requests into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most requests scored together.
    pub max_batch: usize,
    /// Longest wait for more requests after the first; zero takes only what is queued.
    pub window: Duration,
}

fn worker(
    model: &SasRec,
    host: Option<&Mutex<HostPath>>,
    device: &Device,
    rx: &Receiver<(Query, Reply)>,
    batching: Batching,
) {
    let max_batch = batching.max_batch.max(1);
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + batching.window;
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            let next = match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => rx.recv_timeout(left).ok(),
                _ => rx.try_recv().ok(),
            };
            match next {
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        metrics::histogram!("onrec_encoder_batch_size").record(jobs.len() as f64);
        let queries: Vec<&Query> = jobs.iter().map(|(q, _)| q).collect();
        let scored = match host {
            Some(host) => Ok(host
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .score(&queries)),
            None => score_with_users(model, device, &queries),
        };
        match scored {
            Ok(results) => {
                for ((_, reply), result) in jobs.into_iter().zip(results) {
                    // The caller may have given up (timeout); nothing to do then.
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                let e = ServeError::Failed(e.to_string());
                for (_, reply) in jobs {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Most histories whose encoding a worker keeps; past it, it starts again.
const ENCODED_HISTORIES: usize = 50_000;

/// Encoded histories (the last position, before the context joins) by the history the
/// encoder reads: a user's next request with the same history costs no forward pass.
/// A worker serves one set of weights, so its entries never go stale.
#[derive(Debug, Default)]
struct Encoded(HashMap<Vec<u32>, Arc<[f32]>>);

impl Encoded {
    fn get(&mut self, host: &HostEncoder, history: &[u32]) -> Arc<[f32]> {
        let key = &history[history.len().saturating_sub(host.config().max_len)..];
        if let Some(e) = self.0.get(key) {
            metrics::counter!("onrec_encoder_cached_histories_total").increment(1);
            return e.clone();
        }
        if self.0.len() >= ENCODED_HISTORIES {
            self.0.clear();
        }
        let e: Arc<[f32]> = Arc::from(host.encode(key));
        self.0.insert(key.to_vec(), e.clone());
        e
    }
}

/// The CPU's written-out path with the encodings it keeps.
struct HostPath {
    encoder: HostEncoder,
    encoded: Encoded,
}

impl HostPath {
    /// [`score_with_users`] on this path.
    fn score(&mut self, queries: &[&Query]) -> Vec<Scored> {
        let (host, encoded) = (&self.encoder, &mut self.encoded);
        let users: Vec<Vec<f32>> = queries
            .iter()
            .map(|q| host.head(&encoded.get(host, &q.history), q.context))
            .collect();
        let asks: Vec<TopK> = queries
            .iter()
            .zip(&users)
            .map(|(q, user)| TopK {
                user,
                exclude: &q.exclude,
                history: &q.history,
                offsets: q
                    .shift
                    .as_ref()
                    .map(|s| (&s.groups[..], s.offsets.as_slice())),
                k: q.k,
            })
            .collect();
        host.top_ks(&asks)
            .into_iter()
            .zip(users)
            .map(|(items, user)| Scored { items, user })
            .collect()
    }
}

/// Scores every item for every query in one product, then keeps each query's top k.
pub fn score_batch(
    model: &SasRec,
    device: &Device,
    queries: &[&Query],
) -> candle_core::Result<Vec<Vec<(u32, f32)>>> {
    let users = user_vectors(model, device, queries)?;
    top_ks(model, &users, queries)
}

fn top_ks(
    model: &SasRec,
    users: &Tensor,
    queries: &[&Query],
) -> candle_core::Result<Vec<Vec<(u32, f32)>>> {
    let scores = model.scores(users)?.to_vec2::<f32>()?;
    let repeat = model.repeat_weight()?;
    Ok(queries
        .iter()
        .zip(scores)
        .map(|(q, mut s)| {
            if let Some(w) = repeat {
                SasRec::add_repeat(w, &mut s, &q.history);
            }
            if let Some(shift) = &q.shift {
                shift.apply(&mut s);
            }
            top_k(s, &q.exclude, q.k)
        })
        .collect())
}

/// [`score_batch`] with each query's user vector.
pub fn score_with_users(
    model: &SasRec,
    device: &Device,
    queries: &[&Query],
) -> candle_core::Result<Vec<Scored>> {
    let users = user_vectors(model, device, queries)?;
    let items = top_ks(model, &users, queries)?;
    Ok(items
        .into_iter()
        .zip(users.to_vec2::<f32>()?)
        .map(|(items, user)| Scored { items, user })
        .collect())
}

/// Score offsets by group of items (e.g. by category).
#[derive(Debug, Clone)]
pub struct GroupShift {
    /// The group of every model item index (index 0, padding, too).
    pub groups: Arc<[u32]>,
    /// The offset of every group.
    pub offsets: Vec<f32>,
}

impl GroupShift {
    /// Adds the groups' offsets to `scores` (by model item index).
    pub fn apply(&self, scores: &mut [f32]) {
        for (s, &g) in scores.iter_mut().zip(self.groups.iter()) {
            if let Some(o) = self.offsets.get(g as usize) {
                *s += o;
            }
        }
    }
}

/// The `k` best (index, score) pairs of `scores[1..]`, best first, skipping `exclude`.
pub fn top_k(mut scores: Vec<f32>, exclude: &[u32], k: usize) -> Vec<(u32, f32)> {
    for &e in exclude {
        if let Some(s) = scores.get_mut(e as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
    let mut ranked: Vec<(u32, f32)> = scores
        .into_iter()
        .enumerate()
        .skip(1)
        .filter(|(_, s)| s.is_finite())
        .map(|(i, s)| (i as u32, s))
        .collect();
    let k = k.min(ranked.len());
    if k == 0 {
        return Vec::new();
    }
    let by_score = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    ranked.select_nth_unstable_by(k - 1, by_score);
    ranked.truncate(k);
    ranked.sort_by(by_score);
    ranked
}

/// User vectors `[b, hidden]` for a batch of queries.
pub fn user_vectors(
    model: &SasRec,
    device: &Device,
    queries: &[&Query],
) -> candle_core::Result<Tensor> {
    let histories: Vec<&[u32]> = queries.iter().map(|q| q.history.as_slice()).collect();
    let contexts: Vec<ContextIds> = queries.iter().map(|q| q.context).collect();
    let (ids, hours, devices) = model.batch(&histories, &contexts, device)?;
    model.user_vectors(&ids, &hours, &devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shift_moves_the_scores_of_its_groups() {
        let shift = GroupShift {
            groups: Arc::from(vec![u32::MAX, 0, 1, 0, 2]),
            offsets: vec![1.0, -0.5],
        };
        let mut scores = vec![100.0, 0.1, 0.9, 0.5, 0.7];
        shift.apply(&mut scores);
        let want = [100.0, 1.1, 0.4, 1.5, 0.7];
        assert!(
            scores.iter().zip(want).all(|(s, w)| (s - w).abs() < 1e-6),
            "group 2 has no offset: {scores:?}"
        );
    }

    /// A request answered on its own thread and one queued for the worker (because the
    /// written-out path was busy) get the same answer.
    #[test]
    fn a_request_scored_inline_and_one_queued_for_the_worker_agree() {
        use candle_nn::{VarBuilder, VarMap};
        let cfg = crate::sasrec::Config {
            num_items: 40,
            max_len: 6,
            hidden: 8,
            heads: 2,
            layers: 1,
            ff: 16,
            dropout: 0.0,
            repeat: true,
            text_dim: 0,
            text_alone: false,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
        let model = SasRec::load(vb, &cfg).unwrap();
        crate::sasrec::init_seeded(&varmap, 3).unwrap();
        let batching = Batching {
            max_batch: 8,
            window: Duration::ZERO,
        };
        let encoder = Encoder::start(model, Device::Cpu, 4, batching).unwrap();
        let query = Query {
            history: vec![3, 9, 4],
            context: ContextIds::from_parts(Some(7), Some("app")),
            exclude: vec![9],
            k: 5,
            shift: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let inline = runtime.block_on(encoder.top_k(query.clone())).unwrap();
        let host = encoder.shared.host.as_ref().unwrap();
        let mut queued = std::pin::pin!(encoder.top_k(query));
        {
            let _busy = host.lock().unwrap();
            // The first poll finds the path busy, hands the request to the worker and
            // waits for its answer; the worker waits for the path.
            let poll = queued
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            assert!(poll.is_pending(), "answered while the path was busy");
        }
        let queued = runtime.block_on(queued).unwrap();
        assert_eq!(inline.items.len(), 5);
        assert!(inline.items.iter().all(|&(i, _)| i != 9 && i != 0));
        assert_eq!(inline, queued);
    }

    #[test]
    fn top_k_skips_padding_and_exclusions() {
        let scores = vec![100.0, 0.1, 0.9, 0.5, 0.7];
        assert_eq!(top_k(scores.clone(), &[], 2), vec![(2, 0.9), (4, 0.7)]);
        assert_eq!(top_k(scores.clone(), &[2], 2), vec![(4, 0.7), (3, 0.5)]);
        assert_eq!(top_k(scores, &[1, 2, 3, 4], 3), vec![]);
    }
}
