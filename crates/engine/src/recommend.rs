//! The request path, stage by stage: the user's state (who they are, what to hide, their
//! segment, how to rank them) → retrieve (the encoder's top items) → re-score (popular
//! items fill the candidates, the Q-network re-orders them) → explore (the segment's
//! policy picks the slate) → log (statistics, decision log, attribution, the user's
//! shown items) → the response.

use std::collections::HashSet;
use std::sync::Arc;

use onrec_model::context::ContextIds;
use onrec_model::serve::ServeError;
use onrec_policy::{Candidate, Reranked, StatUpdate, UserFacts};
use rand::SeedableRng;

use crate::decisions::{DecisionRecord, LogRecord, LoggedCandidate, LoggedSlot};
use crate::learning::{LearnerLink, Situation};
use crate::ranking::{EncoderState, Plan};
use crate::shared::{Served, SharedImpression};
use crate::users::{Impression, MAX_RECENT_REQUESTS, UserState};
use crate::{
    Engine, EngineError, ImpressionSource, RANKER, RANKER_ENCODER, RecommendRequest,
    Recommendation, RecommendedItem,
};

/// What a request asks for.
struct Asked {
    /// Slots.
    n: usize,
    /// Candidates for the policy.
    m: usize,
    context: ContextIds,
}

/// The user's state for one request.
struct UserView {
    /// The response's id; its random bits also seed the request's tie-breaks and
    /// exploration.
    request_id: uuid::Uuid,
    /// Catalog indices not to show: excluded by the request, disliked, bought, resting.
    hidden: HashSet<u32>,
    segment: String,
    /// Catalog indices of the history the request ranks with.
    history: Vec<u32>,
    /// The version of what ranks the request, read with the plan.
    version: String,
}

/// What the encoder retrieved: its top items (encoder indices) and the user's vector, or
/// why there are none.
struct Retrieved {
    items: Vec<(u32, f32)>,
    user: Option<Arc<[f32]>>,
    fallback: Option<&'static str>,
}

/// The candidates the policy chooses from, best first.
struct Shortlist {
    candidates: Vec<Candidate>,
    /// Their catalog indices.
    indices: Vec<u32>,
    ranker: &'static str,
    fallback: Option<&'static str>,
    /// The version of what ranked them: the ranker's, and the Q-network's when it
    /// re-ordered them.
    model_version: String,
    learner: Option<Arc<LearnerLink>>,
    situation: Situation,
}

/// Mixed into the request id to seed the draw of which bought items are hidden.
const BOUGHT_STREAM: u64 = 0x6275_7921;

impl Engine {
    /// The top-n items for one user, best first.
    ///
    /// With an encoder, a user whose history it knows is ranked by it over the whole
    /// catalog; other users, and slots the encoder cannot fill, get popular items, and the
    /// response's `fallback` says why.
    pub async fn recommend(&self, req: &RecommendRequest) -> Result<Recommendation, EngineError> {
        let cfg = &self.inner.config;
        req.validate(cfg.max_n)?;
        let n = req.n as usize;
        let asked = Asked {
            n,
            m: n.max(cfg.candidates),
            context: req.context.as_ref().map_or_else(ContextIds::default, |c| {
                ContextIds::from_parts(c.hour.map(|h| h as u8), c.device.as_deref())
            }),
        };
        let (mut view, plan) = self.user_view(req, &asked).await;
        let retrieved = self.retrieve(plan).await?;
        let shortlist = self.rescore(retrieved, &mut view, &asked);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(view.request_id.as_u64_pair().0);
        let slate = self
            .inner
            .explorer
            .rerank(
                &view.segment,
                (&shortlist.candidates, shortlist.ranker == RANKER_ENCODER),
                n,
                &mut rng,
            )
            .await;
        let request_id = view.request_id.to_string();
        self.log_response(req, &asked, &view, &shortlist, &slate);
        let mut fallback = shortlist.fallback;
        if slate.fallback && fallback.is_none() {
            fallback = Some(
                "bandit statistics are unavailable; the ranking is served without exploration",
            );
        }
        Ok(Recommendation {
            items: self.describe(slate.slots),
            request_id,
            model_version: shortlist.model_version,
            ranker: shortlist.ranker.to_owned(),
            fallback: fallback.map(str::to_owned),
            segment: view.segment,
            policy: slate.policy.to_owned(),
        })
    }

    /// Stage 1: the user's state. With a shared state the user is read from it (another
    /// process may have served them or taken their feedback); without an answer, this
    /// process's copy serves.
    async fn user_view(&self, req: &RecommendRequest, asked: &Asked) -> (UserView, Plan) {
        let remote = match self.shared() {
            Some(shared) => match shared.user(&req.user_id).await {
                Ok(user) => Some(user),
                Err(e) => {
                    metrics::counter!("onrec_shared_read_errors_total").increment(1);
                    tracing::debug!(error = %e, "serving from this process's copy of the user");
                    None
                }
            },
            None => None,
        };
        let request_id = self.inner.pace.request_id();
        let ranking = self.inner.ranking.read();
        let catalog = &ranking.catalog;
        let mut hidden: HashSet<u32> = req
            .exclude
            .iter()
            .filter_map(|id| catalog.index_of(id))
            .collect();
        let history = {
            let mut users = self.inner.users.shard(&req.user_id);
            match remote {
                Some(Some(user)) => {
                    *users.get_or_insert_with(req.user_id.clone(), UserState::default) =
                        UserState::from_shared(user, catalog);
                }
                Some(None) => {
                    if let Some(user) = users.get_mut(&req.user_id) {
                        *user = UserState::default();
                    }
                }
                None => {}
            }
            let user = users.peek(&req.user_id);
            let history: Vec<u32> = if req.recent_items.is_empty() {
                user.iter()
                    .flat_map(|u| u.history.iter().copied())
                    .collect()
            } else {
                req.recent_items
                    .iter()
                    .filter_map(|id| catalog.index_of(id))
                    .collect()
            };
            if let Some(user) = user {
                // Drawn once per request, and only for a user who bought something.
                let groups = std::cell::OnceCell::new();
                let bought_hidden = |i: u32| {
                    let groups = groups.get_or_init(|| {
                        let mut rng = rand::rngs::SmallRng::seed_from_u64(
                            request_id.as_u64_pair().1 ^ BOUGHT_STREAM,
                        );
                        self.inner.category_rates.hidden_bought(catalog, &mut rng)
                    });
                    groups
                        .get(catalog.group(i) as usize)
                        .copied()
                        .unwrap_or(true)
                };
                user.hide(&self.inner.config, bought_hidden, &mut hidden);
            }
            // Only the encoder's ranking takes the user's category tastes.
            let encoder_ranks = matches!(ranking.encoder, EncoderState::Ready(_));
            let taste = user.filter(|_| encoder_ranks).and_then(|u| {
                self.inner
                    .category_rates
                    .taste(u, catalog, self.inner.config.category_taste)
            });
            (history, taste)
        };
        let (history, taste) = history;
        let ctx = req.context.as_ref();
        let facts = UserFacts {
            device: ctx.and_then(|c| c.device.as_deref()),
            country: ctx.and_then(|c| c.country.as_deref()),
            page: ctx.and_then(|c| c.page.as_deref()),
            hour: ctx.and_then(|c| c.hour),
            returning: !history.is_empty(),
        };
        let segment = self.inner.explorer.segment(req.segment.as_deref(), &facts);
        let plan = match &ranking.encoder {
            EncoderState::None => Plan::Popularity(None),
            EncoderState::Loading => Plan::Popularity(Some("the encoder is still loading")),
            EncoderState::Learning => {
                Plan::Popularity(Some("the encoder has not learned from any event yet"))
            }
            EncoderState::Ready(link) => {
                match link.query(&history, &hidden, asked.context, asked.m, taste) {
                    Some(q) => Plan::Encoder(link.encoder().clone(), q),
                    None => Plan::Popularity(Some("the user has no history the encoder knows")),
                }
            }
        };
        let view = UserView {
            request_id,
            hidden,
            segment,
            history,
            version: ranking.model_version(),
        };
        (view, plan)
    }

    /// Stage 2: the encoder's top items for the user, outside any lock. A full encoder
    /// queue is an overload; a failed encoder leaves popularity to rank.
    async fn retrieve(&self, plan: Plan) -> Result<Retrieved, EngineError> {
        Ok(match plan {
            Plan::Popularity(reason) => Retrieved {
                items: Vec::new(),
                user: None,
                fallback: reason,
            },
            Plan::Encoder(encoder, query) => match encoder.top_k(query).await {
                Ok(found) => Retrieved {
                    items: found.items,
                    user: Some(Arc::from(found.user)),
                    fallback: None,
                },
                Err(ServeError::Overloaded) => {
                    return Err(EngineError::Overloaded("the encoder queue is full".into()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "encoder failed; serving popularity");
                    Retrieved {
                        items: Vec::new(),
                        user: None,
                        fallback: Some("the encoder failed"),
                    }
                }
            },
        })
    }

    /// Stage 3: the `m` candidates: the encoder's items still in the catalog and not
    /// hidden, popular items (ties broken by the request id) for the rest, re-ordered by
    /// the Q-network when it is live (outside the ranking lock). The encoder's items join
    /// the user's hidden ones.
    fn rescore(&self, retrieved: Retrieved, view: &mut UserView, asked: &Asked) -> Shortlist {
        let (n, m) = (asked.n, asked.m);
        let hidden = &mut view.hidden;
        let learner = self.inner.learner.read().clone();
        let situation = Situation {
            history: view.history.clone(),
            context: asked.context,
            user: retrieved.user,
        };
        let mut fallback = retrieved.fallback;
        let now = self.now();
        let ranking = self.inner.ranking.read();
        let mut picked: Vec<(u32, f64)> = Vec::with_capacity(m);
        let mut ranker = RANKER;
        if let EncoderState::Ready(link) = &ranking.encoder {
            for (idx, score) in retrieved.items {
                if let Some(c) = link.to_catalog(idx).filter(|c| !hidden.contains(c)) {
                    picked.push((c, f64::from(score)));
                    hidden.insert(c);
                }
            }
            if !picked.is_empty() {
                ranker = RANKER_ENCODER;
            }
        }
        if picked.len() < n && ranker == RANKER_ENCODER {
            fallback =
                Some("the encoder found fewer items than asked; popular items fill the rest");
        }
        if picked.len() < m {
            let fill = ranking.popular(hidden, m - picked.len(), view.request_id.as_u64_pair().1);
            let popularity = ranking.popularity.lock();
            picked.extend(
                fill.into_iter()
                    .map(|idx| (idx, popularity.score_at(idx, now))),
            );
        }
        // The Q-network re-scores without the lock, so events are not held up by it;
        // catalog indices stay valid (items are only ever added).
        drop(ranking);
        let model_version = match learner
            .as_ref()
            .and_then(|link| link.rescore(&situation, &mut picked, n))
        {
            Some(v) => format!("{}+q{v}", view.version),
            None => view.version.clone(),
        };
        let ranking = self.inner.ranking.read();
        Shortlist {
            candidates: picked
                .iter()
                .map(|&(idx, score)| {
                    Candidate::new(ranking.catalog.get(idx).item_id.clone(), score)
                })
                .collect(),
            indices: picked.iter().map(|&(idx, _)| idx).collect(),
            ranker,
            fallback,
            model_version,
            learner,
            situation,
        }
    }

    /// Stage 5: what a served response leaves behind: its impressions for the bandit
    /// statistics, its decision log record, the response kept for attributing feedback
    /// (in the shared state too), and the user's shown items and latest responses.
    fn log_response(
        &self,
        req: &RecommendRequest,
        asked: &Asked,
        view: &UserView,
        shortlist: &Shortlist,
        slate: &Reranked,
    ) {
        let (segment, context) = (view.segment.as_str(), asked.context);
        let request_id = &view.request_id.to_string();
        let label = self.segment_label(segment);
        for slot in &slate.slots {
            let explored = if slot.explored { "true" } else { "false" };
            metrics::counter!("onrec_bandit_decisions_total", "segment" => label.clone(), "policy" => slate.policy, "explored" => explored)
                .increment(1);
        }
        let mut impressions: Vec<StatUpdate> = Vec::new();
        if self.inner.config.impressions_from == ImpressionSource::Served {
            impressions.extend(
                slate
                    .slots
                    .iter()
                    .map(|s| StatUpdate::impression(segment, s.item_id.clone())),
            );
        }
        // With a shared state they are written with the response (below).
        if self.shared().is_none() {
            self.queue_stats(std::mem::take(&mut impressions));
        }
        let now = self.now();
        if self.inner.decisions.enabled {
            self.log_decision(LogRecord::Decision(Box::new(DecisionRecord {
                request_id: request_id.to_owned(),
                timestamp: now,
                segment: segment.to_owned(),
                context: req.context.clone(),
                policy: slate.config.clone(),
                fallback: slate.fallback,
                ranker: shortlist.ranker.to_owned(),
                model_version: shortlist.model_version.clone(),
                candidates: shortlist
                    .candidates
                    .iter()
                    .map(|c| LoggedCandidate {
                        item_id: c.item_id.clone(),
                        score: c.score,
                    })
                    .collect(),
                slate: slate
                    .slots
                    .iter()
                    .map(|s| LoggedSlot {
                        item_id: s.item_id.clone(),
                        propensity: s.propensity,
                        explored: s.explored,
                    })
                    .collect(),
            })));
        }
        let items: Vec<String> = slate.slots.iter().map(|s| s.item_id.clone()).collect();
        // Catalog indices of the served slots.
        let slate_idx: Vec<u32> = slate
            .slots
            .iter()
            .filter_map(|s| {
                shortlist
                    .candidates
                    .iter()
                    .position(|c| c.item_id == s.item_id)
            })
            .map(|i| shortlist.indices[i])
            .collect();
        self.inner
            .impressions
            .shard(request_id)
            .get_or_insert_with(request_id.to_owned(), || Impression {
                segment: segment.to_owned(),
                items: items.clone(),
                at_ms: now,
                context,
                slate: slate_idx.clone(),
                decision: shortlist.learner.as_ref().map(|l| {
                    l.decision(
                        shortlist.situation.clone(),
                        shortlist.indices.clone(),
                        slate_idx.clone(),
                    )
                }),
            });
        if let Some(shared) = self.shared() {
            shared.served(Served {
                user_id: req.user_id.clone(),
                request_id: request_id.to_owned(),
                impression: SharedImpression {
                    segment: segment.to_owned(),
                    items,
                    at_ms: now,
                    context,
                },
                updates: impressions,
            });
        }
        self.inner
            .category_rates
            .count(&self.inner.ranking.read().catalog, &slate_idx, false);
        let mut users = self.inner.users.shard(&req.user_id);
        let user = users.get_or_insert_with(req.user_id.clone(), UserState::default);
        let bought: Vec<u32> = slate_idx
            .iter()
            .copied()
            .filter(|i| user.purchased.contains(i))
            .collect();
        if !bought.is_empty() {
            self.inner.category_rates.count_bought(
                &self.inner.ranking.read().catalog,
                &bought,
                false,
            );
        }
        user.last_segment = Some(segment.to_owned());
        user.saw(slate_idx);
        user.recent_requests.push_back(request_id.to_owned());
        while user.recent_requests.len() > MAX_RECENT_REQUESTS {
            user.recent_requests.pop_front();
        }
    }

    /// The response's items: the slate's slots with their catalog category and title.
    fn describe(&self, slots: Vec<onrec_policy::Slot>) -> Vec<RecommendedItem> {
        let ranking = self.inner.ranking.read();
        slots
            .into_iter()
            .map(|slot| {
                let (category, title) = ranking
                    .catalog
                    .index_of(&slot.item_id)
                    .map(|i| ranking.catalog.get(i))
                    .map_or_else(Default::default, |item| {
                        (item.category.clone(), item.title.clone())
                    });
                RecommendedItem {
                    item_id: slot.item_id,
                    score: slot.score,
                    propensity: slot.propensity,
                    explored: slot.explored,
                    category,
                    title,
                }
            })
            .collect()
    }
}
