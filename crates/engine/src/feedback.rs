//! The feedback path: an event is validated; claimed once (in process, or in the shared
//! state when there is one); applied to popularity, the event log, the online encoder and
//! its user; attributed to the response that showed its item (which may have been served
//! by another process); and turned into bandit statistics, decision log rewards and
//! Q-network transitions.

use onrec_model::context::ContextIds;
use onrec_policy::StatUpdate;

use crate::decisions::{LogRecord, RewardRecord};
use crate::shared::{RedisShared, SharedEvent};
use crate::{
    Engine, EngineError, Event, EventOutcome, EventType, Impression, ImpressionSource, Shown,
    UserState, duration_ms, event_digest, now_ms,
};

impl Engine {
    /// Validates and applies one event. Safe to call again with the same event: the
    /// second time it is a [`EventOutcome::Duplicate`]. Fails only when the shared state
    /// cannot take the event; then nothing was applied and retrying is safe.
    pub async fn record(&self, event: &Event) -> Result<EventOutcome, EngineError> {
        let cfg = &self.inner.config;
        let now = now_ms();
        if let Err(e) = event.validate(now, duration_ms(cfg.max_future_skew)) {
            return Ok(EventOutcome::Invalid(e));
        }
        let at = event.timestamp.unwrap_or(now);
        let Some(shared) = self.inner.shared.get() else {
            return Ok(self.record_here(event, at));
        };
        let Some(idx) = self.inner.ranking.read().catalog.index_of(&event.item_id) else {
            return Ok(EventOutcome::UnknownItem);
        };
        let weight = cfg.weights.of(event.kind);
        let claimed = shared
            .apply(&SharedEvent {
                digest: event_digest(&event.event_id),
                user_id: &event.user_id,
                kind: event.kind,
                item_id: &event.item_id,
                weight,
                at_ms: at,
            })
            .await?;
        let Some(user) = claimed else {
            return Ok(EventOutcome::Duplicate);
        };
        self.inner.ranking.write().popularity.add(idx, weight, at);
        let candidates = match &event.request_id {
            Some(id) => vec![id.clone()],
            None => user.recent_requests.into_iter().rev().collect(),
        };
        let mut attributed = self.attribute(event, idx, at, &candidates);
        if attributed.is_none() {
            attributed = self
                .attribute_shared(shared, event, idx, at, &candidates)
                .await;
        }
        self.apply(event, idx, at, attributed, user.last_segment);
        Ok(EventOutcome::Accepted)
    }

    /// Claims and applies an event in this process alone.
    fn record_here(&self, event: &Event, at: i64) -> EventOutcome {
        let cfg = &self.inner.config;
        // The write lock is taken before the dedupe check so that an event is marked seen
        // only together with its effect: a concurrent duplicate waits and then sees it.
        let mut ranking = self.inner.ranking.write();
        let Some(idx) = ranking.catalog.index_of(&event.item_id) else {
            return EventOutcome::UnknownItem;
        };
        let digest = event_digest(&event.event_id);
        {
            let mut seen = self.inner.seen_events.shard(&digest);
            if seen.contains(&digest) {
                return EventOutcome::Duplicate;
            }
            seen.get_or_insert_with(digest, || ());
        }
        ranking.popularity.add(idx, cfg.weights.of(event.kind), at);
        drop(ranking);
        let candidates: Vec<String> = match &event.request_id {
            Some(id) => vec![id.clone()],
            None => {
                let users = self.inner.users.shard(&event.user_id);
                users.peek(&event.user_id).map_or_else(Vec::new, |user| {
                    user.recent_requests.iter().rev().cloned().collect()
                })
            }
        };
        let attributed = self.attribute(event, idx, at, &candidates);
        self.apply(event, idx, at, attributed, None);
        EventOutcome::Accepted
    }

    /// What follows the claim: the event log, the online encoder, the user's state and
    /// the bandit statistics. Unattributed feedback goes to the user's last segment
    /// (`last_segment` when the shared state knows it, else this process's).
    fn apply(
        &self,
        event: &Event,
        idx: u32,
        at: i64,
        attributed: Option<Shown>,
        last_segment: Option<String>,
    ) {
        let cfg = &self.inner.config;
        if let Some(log) = self.inner.events.read().as_ref()
            && let Err(e) = log.append(event, at)
        {
            metrics::counter!("onrec_event_log_write_errors_total").increment(1);
            tracing::error!(error = %e, path = %log.path().display(), "an accepted event is not in the event log");
        }
        if event.kind.is_interaction()
            && let Some(online) = self.inner.online.read().as_ref()
        {
            match &attributed {
                Some(shown) => online.observe(&event.user_id, idx, shown.context, &shown.slate),
                None => {
                    let hour = onrec_model::data::hour_of(at as f64 / 1000.0);
                    online.observe(
                        &event.user_id,
                        idx,
                        ContextIds::from_parts(Some(hour), None),
                        &[],
                    );
                }
            }
        }
        let segment = attributed.map(|a| a.segment).or(last_segment);
        let mut users = self.inner.users.shard(&event.user_id);
        let user = users.get_or_insert_with(event.user_id.clone(), UserState::default);
        let segment = segment
            .or_else(|| user.last_segment.clone())
            .unwrap_or_else(|| onrec_policy::DEFAULT_SEGMENT.to_owned());
        user.apply(event.kind, idx, cfg.history_len);
        drop(users);

        let mut updates = Vec::with_capacity(2);
        if event.kind == EventType::Impression && cfg.impressions_from == ImpressionSource::Events {
            updates.push(StatUpdate::impression(segment.clone(), event.item_id.clone()).at(at));
        }
        let reward = self.reward(event.kind);
        if reward > 0.0 {
            let label = self.segment_label(&segment);
            metrics::counter!("onrec_bandit_reward_total", "segment" => label.clone()).increment(1);
            metrics::histogram!("onrec_bandit_reward", "segment" => label).record(reward);
            updates.push(StatUpdate::reward(segment, event.item_id.clone(), reward).at(at));
        }
        self.queue_stats(updates);
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

    /// The segment, context and slate of the first of `candidates` (response ids, newest
    /// first) this process served that showed the event's item within the attribution
    /// window (`item` is its catalog index).
    fn attribute(&self, event: &Event, item: u32, at: i64, candidates: &[String]) -> Option<Shown> {
        candidates.iter().find_map(|request_id| {
            let mut log = self.inner.impressions.shard(request_id);
            let shown = log.get_mut(request_id)?;
            self.credit(request_id, shown, event, item, at)
        })
    }

    /// [`Engine::attribute`] over the responses other processes served, from the shared
    /// state. Without an answer the event still counts, unattributed.
    async fn attribute_shared(
        &self,
        shared: &RedisShared,
        event: &Event,
        item: u32,
        at: i64,
        candidates: &[String],
    ) -> Option<Shown> {
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
                let mut shown = {
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
                self.credit(request_id, &mut shown, event, item, at)
            })
    }

    /// Credits the response `request_id` with the event if it showed the item within the
    /// attribution window: a rewarded event enters the decision log and hands the learner
    /// its transitions (when this process made the decision).
    fn credit(
        &self,
        request_id: &str,
        shown: &mut Impression,
        event: &Event,
        item: u32,
        at: i64,
    ) -> Option<Shown> {
        let window = duration_ms(self.inner.config.attribution_window);
        if at.saturating_sub(shown.at_ms) > window || !shown.items.contains(&event.item_id) {
            return None;
        }
        let reward = self.reward(event.kind);
        if reward > 0.0
            && self.inner.decisions.enabled
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
        if reward > 0.0
            && let (Some(decision), Some(link)) =
                (shown.decision.as_mut(), self.inner.learner.read().as_ref())
        {
            link.feedback(decision, item, reward);
        }
        Some(Shown {
            segment: shown.segment.clone(),
            context: shown.context,
            slate: shown.slate.clone(),
        })
    }

    /// Checks a batch before any of it is applied: the error names the first malformed
    /// event (`[3].type`), so a batch is applied whole or not at all as far as validity goes.
    pub fn validate_batch(&self, events: &[Event]) -> Result<(), EngineError> {
        let now = now_ms();
        let skew = duration_ms(self.inner.config.max_future_skew);
        for (i, e) in events.iter().enumerate() {
            e.validate(now, skew)
                .map_err(|err| err.under(&format!("[{i}]")))?;
        }
        Ok(())
    }
}
