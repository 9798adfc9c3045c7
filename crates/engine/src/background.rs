//! The engine's background work, owned in one place: [`Engine::start_background`] starts
//! it on the current tokio runtime and [`Background::shutdown`] stops it in order, so the
//! server and the simulator assemble and stop the engine the same way.
//!
//! - Always: the bandit statistics writer, which writes what requests and feedback queue
//!   for the store.
//! - With a shared state: following other processes' catalog changes and events, writing
//!   this process's responses to Redis ([`RedisShared::run_writer`]), applying the
//!   statistics stream while holding the learner lease ([`RedisShared::run_learner`], when
//!   the process may learn), and ranking with the encoder the lease holder publishes (on
//!   serve replicas).
//! - With a shared state and a Q-network: where it may learn, training it on the feedback
//!   serve replicas send and publishing its weights while holding the lease
//!   ([`Engine::run_q_learner`]); on serve replicas, re-scoring with the weights the lease
//!   holder publishes.

use std::sync::Arc;
use std::time::Duration;

use onrec_model::serve::Batching;
use onrec_policy::BanditStore;
use tokio::task::JoinHandle;

use crate::Engine;
use crate::shared::RedisShared;

/// What runs in the background beside the always-on statistics writer.
#[derive(Default)]
pub struct BackgroundSettings {
    /// With a shared state: the store this process applies the statistics stream to while
    /// it holds the learner lease; `None` never learns.
    pub learn_into: Option<Arc<dyn BanditStore>>,
    /// With a shared state: rank with the encoder the lease holder publishes, loaded like
    /// this.
    pub follow_encoder: Option<FollowEncoder>,
}

impl std::fmt::Debug for BackgroundSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundSettings")
            .field("learns", &self.learn_into.is_some())
            .field("follow_encoder", &self.follow_encoder)
            .finish()
    }
}

/// How a serve replica loads the encoders the learner publishes.
#[derive(Debug, Clone)]
pub struct FollowEncoder {
    /// Where they run.
    pub device: candle_core::Device,
    /// Requests that may wait for them.
    pub queue: usize,
    /// How they batch requests.
    pub batching: Batching,
}

/// The tasks that follow and feed the shared state.
struct SharedTasks {
    shared: Arc<RedisShared>,
    peers: JoinHandle<()>,
    writer: JoinHandle<()>,
    learner: Option<JoinHandle<()>>,
    weights: Option<JoinHandle<()>>,
    /// Training the Q-network on serve replicas' feedback (where it may learn), or
    /// following the weights the learner publishes (on serve replicas).
    q: Option<JoinHandle<()>>,
}

/// The engine's running background work; stop it with [`Background::shutdown`].
#[must_use = "the background work is stopped in order only by Background::shutdown"]
pub struct Background {
    engine: Engine,
    stats: JoinHandle<()>,
    shared: Option<SharedTasks>,
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Background")
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the engine's background work on the current tokio runtime (see the module
    /// documentation); call it once.
    pub fn start_background(&self, settings: BackgroundSettings) -> Background {
        let stats = {
            let engine = self.clone();
            tokio::spawn(async move { engine.run_stats_writer().await })
        };
        let shared = self.shared().cloned().map(|shared| {
            let engine = self.clone();
            let peers = tokio::spawn(async move { engine.follow_peers().await });
            let writer = {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move { shared.run_writer().await })
            };
            let q = match self.q_link().map(|link| link.learner().is_some()) {
                Some(true) if settings.learn_into.is_some() => {
                    let (engine, shared) = (self.clone(), Arc::clone(&shared));
                    Some(tokio::spawn(
                        async move { engine.run_q_learner(shared).await },
                    ))
                }
                Some(false) => {
                    let (engine, shared) = (self.clone(), Arc::clone(&shared));
                    Some(tokio::spawn(async move {
                        engine.follow_published_q(shared).await
                    }))
                }
                _ => None,
            };
            let learner = settings.learn_into.map(|store| {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move { shared.run_learner(store).await })
            });
            let weights = settings.follow_encoder.map(|follow| {
                let engine = self.clone();
                tokio::spawn(async move {
                    engine
                        .follow_published_encoder(&follow.device, follow.queue, follow.batching)
                        .await;
                })
            });
            SharedTasks {
                shared,
                peers,
                writer,
                learner,
                weights,
                q,
            }
        });
        Background {
            engine: self.clone(),
            stats,
            shared,
        }
    }
}

impl Background {
    /// Stops the background work in order, once requests have stopped:
    /// 1. following other processes and the published weights stops, and so does
    ///    training the Q-network on serve replicas' feedback (what it read and did not
    ///    acknowledge stays pending for the next learner);
    /// 2. what is queued for the bandit store, then for the shared state, is written
    ///    (for at most `grace` each; what is left then is logged and dropped);
    /// 3. a learner lease held is released (entries it read and did not acknowledge stay
    ///    pending for the next learner);
    /// 4. the Q-network learner and the online encoder stop, after their final
    ///    checkpoints.
    ///
    /// Both threads are stopped either way; each failure is logged, and the first is
    /// returned.
    pub async fn shutdown(self, grace: Duration) -> Result<(), onrec_learn::LearnError> {
        if let Some(tasks) = &self.shared {
            tasks.peers.abort();
            for task in [&tasks.weights, &tasks.q].into_iter().flatten() {
                task.abort();
            }
        }
        self.engine.close_stats();
        if tokio::time::timeout(grace, self.stats).await.is_err() {
            tracing::warn!(
                ?grace,
                "bandit statistics still queued; exiting without them"
            );
        }
        if let Some(tasks) = self.shared {
            tasks.shared.close_writer();
            if tokio::time::timeout(grace, tasks.writer).await.is_err() {
                tracing::warn!(
                    ?grace,
                    "responses still queued for the shared state; exiting without them"
                );
            }
            if let Some(learner) = tasks.learner {
                learner.abort();
                let _ = learner.await;
                if let Err(e) = tasks.shared.release_lease().await {
                    tracing::warn!(error = %e, "the learner lease is left to expire");
                }
            }
        }
        let engine = self.engine.clone();
        let learner = tokio::task::spawn_blocking(move || engine.shutdown_learner()).await;
        let engine = self.engine;
        let encoder = tokio::task::spawn_blocking(move || engine.shutdown_online_encoder()).await;
        let mut first = Ok(());
        for (result, what) in [
            (learner, "the Q-network learner did not stop cleanly"),
            (encoder, "the online encoder did not stop cleanly"),
        ] {
            let result =
                result.unwrap_or_else(|e| Err(onrec_learn::LearnError::Train(e.to_string())));
            if let Err(e) = &result {
                tracing::error!(error = %e, "{what}");
            }
            first = first.and(result);
        }
        first
    }
}
