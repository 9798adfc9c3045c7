//! The Q-network across processes, with a shared state: the process holding the learner
//! lease trains on the feedback serve replicas send (`P:feedback`) and publishes its
//! weights (`P:qnet`); serve replicas re-score with the latest publication.

use std::sync::Arc;
use std::time::{Duration, Instant};

use onrec_learn::QNet;

use crate::Engine;
use crate::learning::Followed;
use crate::shared::{LEASE_TTL, PublishedQ, RedisShared};

/// Least time between two publications of the Q-network: replicas need the latest
/// weights, not every publication's.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// How often a serve replica looks for a new publication.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

impl Engine {
    /// While this process holds the learner lease: trains its Q-network on the feedback
    /// serve replicas send, and publishes the weights at most every [`PUBLISH_EVERY`].
    /// Runs until the task is dropped; returns at once unless a Q-network trains here.
    pub(crate) async fn run_q_learner(&self, shared: Arc<RedisShared>) {
        let Some(link) = self.q_link() else {
            return;
        };
        let Some(learner) = link.learner().cloned() else {
            return;
        };
        // Whether to take pending entries (of a learner that died with them) first.
        let mut pending = true;
        let mut published: Option<(u64, Instant)> = None;
        loop {
            if !shared.is_learning() {
                pending = true;
                published = None;
                tokio::time::sleep(LEASE_TTL / 5).await;
                continue;
            }
            match shared.feedback_entries(pending).await {
                Ok(entries) => {
                    pending &= !entries.is_empty();
                    let mut taken = Vec::with_capacity(entries.len());
                    {
                        let ranking = self.inner.ranking.read();
                        for (id, feedback) in entries {
                            match feedback {
                                Some(f) if link.learn_shared(&f, &ranking.catalog) => {
                                    metrics::counter!("onrec_learner_feedback_total").increment(1);
                                }
                                Some(f) => {
                                    tracing::debug!(item = %f.item, "feedback on an item not in the catalog; skipped");
                                }
                                None => {
                                    metrics::counter!("onrec_learner_bad_entries_total")
                                        .increment(1);
                                    tracing::warn!(entry = %id, "a feedback entry cannot be read; skipped");
                                }
                            }
                            taken.push(id);
                        }
                    }
                    if let Err(e) = shared.ack_feedback(&taken).await {
                        tracing::warn!(error = %e, "acknowledging feedback failed; it is taken again");
                        pending = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the feedback stream failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            let current = learner.current();
            let due = published.is_none_or(|(version, at)| {
                version != current.version && at.elapsed() >= PUBLISH_EVERY
            });
            if !due {
                continue;
            }
            let items = learner.item_ids(current.net.num_items());
            let id = format!("{}-{}", shared.origin(), current.version);
            let exported = tokio::task::spawn_blocking(move || {
                current.net.to_bytes().map(|weights| PublishedQ {
                    id,
                    version: current.version,
                    updates: current.updates,
                    config: current.net.config().clone(),
                    items,
                    weights,
                })
            })
            .await;
            let q = match flatten(exported) {
                Ok(q) => q,
                Err(e) => {
                    tracing::error!(error = %e, "exporting the Q-network failed");
                    continue;
                }
            };
            match shared.publish_qnet(&q).await {
                Ok(()) => {
                    tracing::debug!(
                        version = q.version,
                        "Q-network published to the serve replicas"
                    );
                    published = Some((q.version, Instant::now()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "publishing the Q-network failed; retrying");
                }
            }
        }
    }

    /// On a serve replica: loads each Q-network the learner publishes and re-scores with
    /// it, matching its items to this process's catalog by id (again when the catalog
    /// grows). Runs until the task is dropped; returns at once unless this process
    /// follows the learner.
    pub(crate) async fn follow_published_q(&self, shared: Arc<RedisShared>) {
        let Some(link) = self.q_link() else {
            return;
        };
        if link.learner().is_some() {
            return;
        }
        let mut seen: Option<String> = None;
        let mut loaded: Option<(PublishedQ, Arc<QNet>)> = None;
        let mut tick = tokio::time::interval(FOLLOW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let latest = match shared.published_qnet_id().await {
                Ok(latest) => latest,
                Err(e) => {
                    tracing::debug!(error = %e, "the published Q-network's id is unavailable");
                    continue;
                }
            };
            if latest.is_some() && latest != seen {
                match self.load_published_q(&shared).await {
                    Ok(Some(q)) => {
                        seen = Some(q.0.id.clone());
                        loaded = Some(q);
                    }
                    Ok(None) => {}
                    Err(id) => seen = Some(id),
                }
            }
            let Some((q, net)) = &loaded else {
                continue;
            };
            let catalog_len = self.inner.ranking.read().catalog.len();
            let current = link.followed();
            let stale = current
                .as_ref()
                .is_none_or(|f| f.version != q.version || f.mapped() != catalog_len);
            if stale {
                let followed = {
                    let ranking = self.inner.ranking.read();
                    Followed::new(
                        q.version,
                        q.updates,
                        Arc::clone(net),
                        &q.items,
                        &ranking.catalog,
                    )
                };
                link.follow(followed);
                metrics::gauge!("onrec_learn_weights_version").set(q.version as f64);
            }
        }
    }

    /// Reads and loads the published Q-network (its weights left out of what is kept):
    /// `Err(id)` when that publication does not load, so it is not tried again.
    async fn load_published_q(
        &self,
        shared: &RedisShared,
    ) -> Result<Option<(PublishedQ, Arc<QNet>)>, String> {
        let mut q = match shared.published_qnet().await {
            Ok(Some(q)) => q,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "reading the published Q-network failed; retrying");
                return Ok(None);
            }
        };
        let weights = std::mem::take(&mut q.weights);
        let config = q.config.clone();
        let net = tokio::task::spawn_blocking(move || {
            QNet::from_bytes(&config, &weights, &candle_core::Device::Cpu)
        })
        .await;
        match flatten(net) {
            Ok(net) => {
                tracing::info!(
                    version = q.version,
                    updates = q.updates,
                    "published Q-network loaded"
                );
                Ok(Some((q, Arc::new(net))))
            }
            Err(e) => {
                tracing::error!(error = %e, version = q.version, "the published Q-network does not load");
                Err(q.id)
            }
        }
    }
}

/// The result of blocking work, its panic as an error.
fn flatten<T>(
    joined: Result<Result<T, onrec_learn::LearnError>, tokio::task::JoinError>,
) -> Result<T, String> {
    joined
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
}
