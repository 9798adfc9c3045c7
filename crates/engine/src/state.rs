//! The engine's own state in a file, so that a single process resumes after a graceful
//! restart: users' histories, dislikes, purchases and resting items, item popularity, the
//! ids of the events already applied (a re-sent event still counts once), and, when the
//! bandit statistics live in this process, those too.
//!
//! Items are named by id, so a snapshot loads into a changed catalog (items no longer in
//! it are skipped). The file is written whole to a temporary name and renamed, so a crash
//! while saving leaves the previous snapshot. Responses served before the restart are not
//! kept: feedback on them still counts for popularity, history and statistics, but is no
//! longer joined to its response's segment and slate.

use std::collections::VecDeque;
use std::path::Path;

use onrec_policy::{BatchId, StatUpdate};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::{Engine, UserState, now_ms};

/// The snapshot format's version; a file of another version is refused.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    saved_at_ms: i64,
    users: Vec<UserSnapshot>,
    /// (item id, decayed popularity when saved).
    popularity: Vec<(String, f64)>,
    /// Digests of applied event ids, in hex.
    seen_events: Vec<String>,
    /// Bandit statistics per segment, when they live in this process.
    bandit: Option<Vec<SegmentSnapshot>>,
}

#[derive(Serialize, Deserialize)]
struct UserSnapshot {
    user_id: String,
    history: Vec<String>,
    disliked: Vec<String>,
    purchased: Vec<String>,
    shown: Vec<String>,
    last_segment: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct SegmentSnapshot {
    segment: String,
    /// (item id, decayed impressions, decayed reward).
    arms: Vec<(String, f64, f64)>,
}

/// What a snapshot held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Users with state.
    pub users: usize,
    /// Items with popularity.
    pub items: usize,
    /// Event ids remembered for dedupe.
    pub events: usize,
    /// (segment, item) statistics.
    pub arms: usize,
}

fn state_error(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::State(format!("{}: {e}", path.display()))
}

impl Engine {
    /// Writes the engine's state to `path`; with `bandit`, the bandit statistics too
    /// (when they live in this process: a shared store keeps its own).
    pub async fn save_state(&self, path: &Path, bandit: bool) -> Result<StateCounts, EngineError> {
        let now = now_ms();
        // The catalog's ids and popularity are copied under a short read lock; users are
        // then read one shard at a time, so saving never holds up events for long.
        // Catalog indices are stable (items are only added), so the copied ids name them.
        let (item_ids, popularity) = {
            let ranking = self.inner.ranking.read();
            let catalog = &ranking.catalog;
            let popularity = ranking.popularity.lock();
            let item_ids: Vec<String> = catalog.items().iter().map(|i| i.item_id.clone()).collect();
            let popularity: Vec<(String, f64)> = (0..catalog.len() as u32)
                .map(|i| (i, popularity.score_at(i, now)))
                .filter(|&(_, score)| score != 0.0)
                .map(|(i, score)| (catalog.get(i).item_id.clone(), score))
                .collect();
            (item_ids, popularity)
        };
        let ids = |q: &VecDeque<u32>| -> Vec<String> {
            q.iter()
                .filter_map(|&i| item_ids.get(i as usize).cloned())
                .collect()
        };
        let mut users = Vec::new();
        self.inner.users.for_each(|id, u: &UserState| {
            users.push(UserSnapshot {
                user_id: id.clone(),
                history: ids(&u.history),
                disliked: ids(&u.disliked),
                purchased: ids(&u.purchased),
                shown: ids(&u.shown),
                last_segment: u.last_segment.clone(),
            });
        });
        let mut seen_events = Vec::new();
        self.inner
            .seen_events
            .for_each(|digest, ()| seen_events.push(format!("{digest:032x}")));
        let bandit = if bandit {
            let store = self.inner.explorer.store();
            let unavailable = |e: onrec_policy::StoreError| EngineError::Unavailable(e.to_string());
            let mut segments = Vec::new();
            for segment in store.segments().await.map_err(unavailable)? {
                let arms = store.arms(&segment).await.map_err(unavailable)?;
                segments.push(SegmentSnapshot {
                    segment,
                    arms: arms
                        .into_iter()
                        .map(|(id, a)| (id, a.impressions, a.reward))
                        .collect(),
                });
            }
            Some(segments)
        } else {
            None
        };
        let snapshot = Snapshot {
            version: VERSION,
            saved_at_ms: now,
            users,
            popularity,
            seen_events,
            bandit,
        };
        let counts = StateCounts {
            users: snapshot.users.len(),
            items: snapshot.popularity.len(),
            events: snapshot.seen_events.len(),
            arms: snapshot.bandit.iter().flatten().map(|s| s.arms.len()).sum(),
        };
        let target = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let path = target;
            let tmp = path.with_extension("tmp");
            let file = std::fs::File::create(&tmp).map_err(|e| state_error(&tmp, e))?;
            let mut out = std::io::BufWriter::new(file);
            serde_json::to_writer(&mut out, &snapshot).map_err(|e| state_error(&tmp, e))?;
            let file = out.into_inner().map_err(|e| state_error(&tmp, e))?;
            file.sync_all().map_err(|e| state_error(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| state_error(&path, e))
        })
        .await
        .map_err(|e| state_error(path, e))??;
        Ok(counts)
    }

    /// Loads a snapshot [`Engine::save_state`] wrote, if `path` exists: before any traffic,
    /// into an engine built from the catalog.
    pub async fn load_state(&self, path: &Path) -> Result<Option<StateCounts>, EngineError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(state_error(path, e)),
        };
        let snapshot: Snapshot = serde_json::from_slice(&text).map_err(|e| state_error(path, e))?;
        if snapshot.version != VERSION {
            return Err(state_error(
                path,
                format!(
                    "snapshot version {} (this build reads {VERSION})",
                    snapshot.version
                ),
            ));
        }
        let mut counts = StateCounts::default();
        let history_len = self.inner.config.history_len;
        {
            let mut ranking = self.inner.ranking.write();
            let now = now_ms();
            for (id, score) in &snapshot.popularity {
                if let Some(i) = ranking.catalog.index_of(id) {
                    // On top of what the catalog gave the item at start.
                    let popularity = ranking.popularity.get_mut();
                    let delta = score - popularity.score_at(i, now);
                    popularity.add(i, delta, now);
                    counts.items += 1;
                }
            }
            let catalog = &ranking.catalog;
            let idx = |ids: &[String], cap: usize| -> VecDeque<u32> {
                let known: Vec<u32> = ids.iter().filter_map(|id| catalog.index_of(id)).collect();
                known[known.len().saturating_sub(cap)..]
                    .iter()
                    .copied()
                    .collect()
            };
            for u in snapshot.users {
                let state = UserState {
                    history: idx(&u.history, history_len),
                    disliked: idx(&u.disliked, crate::users::MAX_DISLIKED),
                    purchased: idx(&u.purchased, crate::MAX_PURCHASED),
                    shown: idx(&u.shown, crate::SHOWN_WINDOW),
                    last_segment: u.last_segment,
                    recent_requests: VecDeque::new(),
                };
                let mut users = self.inner.users.shard(&u.user_id);
                *users.get_or_insert_with(u.user_id, UserState::default) = state;
                counts.users += 1;
            }
        }
        for hex in &snapshot.seen_events {
            let digest = u128::from_str_radix(hex, 16)
                .map_err(|e| state_error(path, format!("event digest {hex}: {e}")))?;
            self.inner
                .seen_events
                .shard(&digest)
                .get_or_insert_with(digest, || ());
            counts.events += 1;
        }
        if let Some(segments) = snapshot.bandit {
            let updates: Vec<StatUpdate> = segments
                .into_iter()
                .flat_map(|s| {
                    let segment = s.segment;
                    s.arms
                        .into_iter()
                        .map(move |(item_id, impressions, reward)| StatUpdate {
                            segment: segment.clone(),
                            item_id,
                            impressions,
                            reward,
                            at_ms: Some(snapshot.saved_at_ms),
                        })
                })
                .collect();
            counts.arms = updates.len();
            self.inner
                .explorer
                .store()
                .record_batch(BatchId::new(), &updates)
                .await
                .map_err(|e| state_error(path, e))?;
        }
        Ok(Some(counts))
    }
}
