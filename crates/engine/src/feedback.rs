//! The feedback path: an event is validated; attributed to the response that showed its
//! item (which may have been served by another process); claimed once, with its bandit
//! statistics updates (in process, or in the shared state when there is one); and applied
//! to popularity, the event log, the online encoder and its user, the decision log and the
//! Q-network's transitions.

use onrec_model::context::ContextIds;
use onrec_policy::StatUpdate;

use crate::decisions::{LogRecord, RewardRecord};
use crate::shared::{Credit, Interaction, RedisShared, SharedEvent};
use crate::{
    Engine, EngineError, Event, EventOutcome, EventType, Impression, ImpressionSource, Shown,
    UserState, duration_ms, event_digest,
};

/// The response an event is attributed to.
struct Found {
    request_id: String,
    shown: Shown,
    /// The response as read from the shared state; `None` when this process served it.
    remote: Option<Impression>,
}

impl Engine {
    /// Validates and applies one event. Safe to call again with the same event: the
    /// second time it is a [`EventOutcome::Duplicate`]. Fails only when the shared state
    /// cannot take the event; then nothing was applied and retrying is safe.
    pub async fn record(&self, event: &Event) -> Result<EventOutcome, EngineError> {
        let cfg = &self.inner.config;
        let now = self.now();
        if let Err(e) = event.validate() {
            return Ok(EventOutcome::Invalid(e));
        }
        let at = event.at(now, duration_ms(cfg.max_future_skew));
        let Some(shared) = self.inner.shared.get() else {
            return Ok(self.record_here(event, at));
        };
        let Some(idx) = self.inner.ranking.read().catalog.index_of(&event.item_id) else {
            return Ok(EventOutcome::UnknownItem);
        };
        let (candidates, last_segment) = match &event.request_id {
            Some(id) => (vec![id.clone()], None),
            None => {
                let (recent, segment) = shared.recent(&event.user_id).await?;
                (recent.into_iter().rev().collect(), segment)
            }
        };
        // Nothing is credited before the claim: the event may be a duplicate.
        let found = match self.find_here(idx, at, &candidates) {
            Some(found) => Some(found),
            None => self.find_shared(shared, event, idx, at, &candidates).await,
        };
        let segment = self.segment_of(event, found.as_ref(), last_segment);
        let updates = self.updates(event, at, &segment);
        let weight = cfg.weights.of(event.kind);
        let interaction = event.kind.is_interaction().then(|| {
            let ranking = self.inner.ranking.read();
            let (context, slate) = Self::observed(found.as_ref().map(|f| &f.shown), at);
            let reward = self.reward(event.kind);
            Interaction {
                context,
                slate: slate
                    .iter()
                    .map(|&i| ranking.catalog.get(i).item_id.clone())
                    .collect(),
                // Another process served it: that process credits its Q-network decision.
                credit: found
                    .as_ref()
                    .filter(|f| f.remote.is_some() && reward > 0.0)
                    .map(|f| Credit {
                        request_id: f.request_id.clone(),
                        reward,
                    }),
            }
        });
        let applied = shared
            .apply(&SharedEvent {
                digest: event_digest(&event.event_id),
                user_id: &event.user_id,
                kind: event.kind,
                item_id: &event.item_id,
                weight,
                at_ms: at,
                updates: &updates,
                interaction: interaction.as_ref(),
            })
            .await?;
        if !applied {
            return Ok(EventOutcome::Duplicate);
        }
        self.inner
            .ranking
            .read()
            .popularity
            .lock()
            .add(idx, weight, at);
        self.accepted(event, idx, at, found, &segment);
        Ok(EventOutcome::Accepted)
    }

    /// Claims and applies an event in this process alone.
    fn record_here(&self, event: &Event, at: i64) -> EventOutcome {
        let cfg = &self.inner.config;
        let digest = event_digest(&event.event_id);
        // Under the shared lock of the ranking: requests go on meanwhile. The event's
        // shard of seen ids stays locked until its popularity is added, so that an event
        // is marked seen only together with its effect: a concurrent duplicate waits and
        // then sees it.
        let idx = {
            let ranking = self.inner.ranking.read();
            let Some(idx) = ranking.catalog.index_of(&event.item_id) else {
                return EventOutcome::UnknownItem;
            };
            let mut seen = self.inner.seen_events.shard(&digest);
            if seen.contains(&digest) {
                return EventOutcome::Duplicate;
            }
            seen.get_or_insert_with(digest, || ());
            ranking
                .popularity
                .lock()
                .add(idx, cfg.weights.of(event.kind), at);
            idx
        };
        let candidates: Vec<String> = match &event.request_id {
            Some(id) => vec![id.clone()],
            None => {
                let users = self.inner.users.shard(&event.user_id);
                users.peek(&event.user_id).map_or_else(Vec::new, |user| {
                    user.recent_requests.iter().rev().cloned().collect()
                })
            }
        };
        let found = self.find_here(idx, at, &candidates);
        let segment = self.segment_of(event, found.as_ref(), None);
        self.queue_stats(self.updates(event, at, &segment));
        self.accepted(event, idx, at, found, &segment);
        EventOutcome::Accepted
    }

    /// The segment an event counts for: its response's, else the user's last one
    /// (`last_segment` when the shared state knows it, else this process's), else the
    /// default segment.
    fn segment_of(
        &self,
        event: &Event,
        found: Option<&Found>,
        last_segment: Option<String>,
    ) -> String {
        found
            .map(|f| f.shown.segment.clone())
            .or(last_segment)
            .or_else(|| {
                let users = self.inner.users.shard(&event.user_id);
                users
                    .peek(&event.user_id)
                    .and_then(|u| u.last_segment.clone())
            })
            .unwrap_or_else(|| onrec_policy::DEFAULT_SEGMENT.to_owned())
    }

    /// The bandit statistics updates of an event counted for `segment`.
    fn updates(&self, event: &Event, at: i64, segment: &str) -> Vec<StatUpdate> {
        let mut updates = Vec::with_capacity(2);
        if event.kind == EventType::Impression
            && self.inner.config.impressions_from == ImpressionSource::Events
        {
            updates.push(StatUpdate::impression(segment, event.item_id.clone()).at(at));
        }
        let reward = self.reward(event.kind);
        if reward > 0.0 {
            updates.push(StatUpdate::reward(segment, event.item_id.clone(), reward).at(at));
        }
        updates
    }

    /// What follows the claim: the reward's metrics, the response's credit (decision log,
    /// Q-network), the event log, the online encoder and the user's state.
    fn accepted(&self, event: &Event, idx: u32, at: i64, found: Option<Found>, segment: &str) {
        let cfg = &self.inner.config;
        let reward = self.reward(event.kind);
        if reward > 0.0 {
            let label = self.segment_label(segment);
            metrics::counter!("onrec_bandit_reward_total", "segment" => label.clone()).increment(1);
            metrics::histogram!("onrec_bandit_reward", "segment" => label).record(reward);
        }
        let shown = found.map(|found| self.credit(found, event, idx, at));
        if let Some(log) = self.inner.events.read().as_ref()
            && let Err(e) = log.append(event, at)
        {
            metrics::counter!("onrec_event_log_write_errors_total").increment(1);
            tracing::error!(error = %e, path = %log.path().display(), "an accepted event is not in the event log");
        }
        if event.kind.is_interaction()
            && let Some(online) = self.inner.online.read().as_ref()
        {
            let (context, slate) = Self::observed(shown.as_ref(), at);
            online.observe(&event.user_id, idx, context, slate);
        }
        if event.kind == EventType::Click {
            self.inner
                .category_rates
                .count(&self.inner.ranking.read().catalog, &[idx], true);
        }
        let mut users = self.inner.users.shard(&event.user_id);
        let user = users.get_or_insert_with(event.user_id.clone(), UserState::default);
        if event.kind == EventType::Click && user.purchased.contains(&idx) {
            self.inner.category_rates.count_bought(
                &self.inner.ranking.read().catalog,
                &[idx],
                true,
            );
        }
        user.apply(event.kind, idx, cfg.history_len);
    }

    /// The bandit reward of an event type: the click is the immediate reward r_i; later
    /// steps of the funnel (add-to-cart, purchase) are r_l, discounted by γ. Impressions
    /// and dislikes carry none (rewards are non-negative).
    pub(crate) fn reward(&self, kind: EventType) -> f64 {
        let cfg = &self.inner.config;
        let weight = cfg.rewards.of(kind).max(0.0);
        match kind {
            EventType::Click => weight,
            EventType::AddToCart | EventType::Purchase => cfg.reward_gamma * weight,
            EventType::Impression | EventType::Dislike => 0.0,
        }
    }

    /// The context and slate the online encoder learns an interaction in: its response's,
    /// or without one the hour it happened at and no slate.
    fn observed(shown: Option<&Shown>, at: i64) -> (ContextIds, &[u32]) {
        match shown {
            Some(shown) => (shown.context, &shown.slate),
            None => {
                let hour = onrec_model::data::hour_of(at as f64 / 1000.0);
                (ContextIds::from_parts(Some(hour), None), &[])
            }
        }
    }

    /// Whether `shown` showed the item at catalog index `item` within the attribution
    /// window. Its slate holds the catalog index of every served item this catalog knows,
    /// so the indices answer as the item ids would, without comparing strings.
    fn shows(&self, shown: &Impression, item: u32, at: i64) -> bool {
        let window = duration_ms(self.inner.config.attribution_window);
        at.saturating_sub(shown.at_ms) <= window && shown.slate.contains(&item)
    }

    /// The first of `candidates` (response ids, newest first) that this process served and
    /// that showed the item at catalog index `item` within the attribution window.
    fn find_here(&self, item: u32, at: i64, candidates: &[String]) -> Option<Found> {
        candidates.iter().find_map(|request_id| {
            let log = self.inner.impressions.shard(request_id);
            let shown = log.peek(request_id).filter(|s| self.shows(s, item, at))?;
            Some(Found {
                request_id: request_id.clone(),
                shown: Shown {
                    segment: shown.segment.clone(),
                    context: shown.context,
                    slate: shown.slate.clone(),
                },
                remote: None,
            })
        })
    }

    /// [`Engine::find_here`] over the responses any process served, from the shared
    /// state. Without an answer the event still counts, unattributed.
    async fn find_shared(
        &self,
        shared: &RedisShared,
        event: &Event,
        item: u32,
        at: i64,
        candidates: &[String],
    ) -> Option<Found> {
        let found = match shared.impressions(candidates).await {
            Ok(found) => found,
            Err(e) => {
                metrics::counter!("onrec_shared_read_errors_total").increment(1);
                tracing::warn!(error = %e, event_id = %event.event_id, "feedback not attributed");
                return None;
            }
        };
        candidates
            .iter()
            .zip(found)
            .find_map(|(request_id, remote)| {
                let remote = remote?;
                let shown = {
                    let ranking = self.inner.ranking.read();
                    Impression {
                        slate: remote
                            .items
                            .iter()
                            .filter_map(|id| ranking.catalog.index_of(id))
                            .collect(),
                        segment: remote.segment,
                        items: remote.items,
                        at_ms: remote.at_ms,
                        context: remote.context,
                        decision: None,
                    }
                };
                self.shows(&shown, item, at).then(|| Found {
                    request_id: request_id.clone(),
                    shown: Shown {
                        segment: shown.segment.clone(),
                        context: shown.context,
                        slate: shown.slate.clone(),
                    },
                    remote: Some(shown),
                })
            })
    }

    /// Credits the response an accepted event is attributed to: a rewarded event enters
    /// the decision log and hands the learner its transitions (when this process made the
    /// decision). `item` is the event's catalog index.
    fn credit(&self, found: Found, event: &Event, item: u32, at: i64) -> Shown {
        let reward = self.reward(event.kind);
        if reward > 0.0 {
            match found.remote {
                Some(mut remote) => {
                    self.credit_to(&found.request_id, &mut remote, event, item, at, reward)
                }
                None => {
                    let mut log = self.inner.impressions.shard(&found.request_id);
                    if let Some(shown) = log.get_mut(&found.request_id) {
                        self.credit_to(&found.request_id, shown, event, item, at, reward);
                    }
                }
            }
        }
        found.shown
    }

    fn credit_to(
        &self,
        request_id: &str,
        shown: &mut Impression,
        event: &Event,
        item: u32,
        at: i64,
        reward: f64,
    ) {
        if self.inner.decisions.enabled
            && let Some(position) = shown.items.iter().position(|i| *i == event.item_id)
        {
            self.log_decision(LogRecord::Reward(RewardRecord {
                request_id: request_id.to_owned(),
                timestamp: at,
                item_id: event.item_id.clone(),
                position,
                event: event.kind,
                reward,
            }));
        }
        if let (Some(decision), Some(link)) =
            (shown.decision.as_mut(), self.inner.learner.read().as_ref())
        {
            link.feedback(decision, item, reward, &self.inner.ranking.read().catalog);
        }
    }

    /// Credits a response this process served with feedback another process accepted:
    /// the Q-network learns from it as from feedback taken here.
    pub(crate) fn credit_peer(&self, credit: &Credit, item: u32) {
        let Some(link) = self.inner.learner.read().clone() else {
            return;
        };
        let mut log = self.inner.impressions.shard(&credit.request_id);
        if let Some(decision) = log
            .get_mut(&credit.request_id)
            .and_then(|shown| shown.decision.as_mut())
        {
            link.feedback(
                decision,
                item,
                credit.reward,
                &self.inner.ranking.read().catalog,
            );
        }
    }

    /// Checks a batch before any of it is applied: the error names the first malformed
    /// event (`[3].type`), so a batch is applied whole or not at all as far as validity goes.
    pub fn validate_batch(&self, events: &[Event]) -> Result<(), EngineError> {
        for (i, e) in events.iter().enumerate() {
            e.validate().map_err(|err| err.under(&format!("[{i}]")))?;
        }
        Ok(())
    }
}
