//! What the engine keeps per user (history, dislikes, purchases, resting items, recent
//! responses) and per served response, for attributing the feedback that follows.

use std::collections::{HashSet, VecDeque};

use onrec_model::context::ContextIds;

use crate::catalog::Catalog;
use crate::shared::SharedUser;
use crate::{EngineConfig, EventType, HidePurchased, learning};

/// Items a user disliked that are remembered and hidden from them.
pub(crate) const MAX_DISLIKED: usize = 100;
/// Purchases remembered per user.
pub const MAX_PURCHASED: usize = 100;
/// Shown slots remembered per user, for resting items they keep passing over.
pub const SHOWN_WINDOW: usize = 50;

/// What the engine keeps per user.
#[derive(Debug, Default, Clone)]
pub(crate) struct UserState {
    /// Items interacted with, oldest first, at most `history_len`.
    pub(crate) history: VecDeque<u32>,
    /// Items disliked, oldest first, at most [`MAX_DISLIKED`].
    pub(crate) disliked: VecDeque<u32>,
    /// Items bought, oldest first, at most [`MAX_PURCHASED`].
    pub(crate) purchased: VecDeque<u32>,
    /// Items of the user's last [`SHOWN_WINDOW`] shown slots, oldest first; an interaction
    /// with an item takes it out.
    pub(crate) shown: VecDeque<u32>,
    /// The segment the user was last served as, for feedback without a `request_id`.
    pub(crate) last_segment: Option<String>,
    /// The user's latest responses, oldest first, at most [`MAX_RECENT_REQUESTS`]: feedback
    /// without a `request_id` is matched to the newest one that showed the item.
    pub(crate) recent_requests: VecDeque<String>,
}

impl UserState {
    /// The state the shared store keeps, on this process's catalog (items it does not
    /// know yet are left out).
    pub(crate) fn from_shared(user: SharedUser, catalog: &Catalog) -> Self {
        let indices = |ids: &[String]| ids.iter().filter_map(|id| catalog.index_of(id)).collect();
        Self {
            history: indices(&user.history),
            disliked: indices(&user.disliked),
            purchased: indices(&user.purchased),
            shown: indices(&user.shown),
            last_segment: user.last_segment,
            recent_requests: user.recent_requests.into(),
        }
    }

    /// Adds what this user is not to be shown to `hidden`: what they disliked, what they
    /// bought (see `hide_purchased`; `bought_hidden` says which when it is learned), and
    /// what rests (see `rest_after`).
    pub(crate) fn hide(
        &self,
        cfg: &EngineConfig,
        bought_hidden: impl Fn(u32) -> bool,
        hidden: &mut HashSet<u32>,
    ) {
        hidden.extend(self.disliked.iter().copied());
        match cfg.hide_purchased {
            HidePurchased::Always => hidden.extend(self.purchased.iter().copied()),
            HidePurchased::Learned => {
                hidden.extend(self.purchased.iter().copied().filter(|&i| bought_hidden(i)));
            }
            HidePurchased::Never => {}
        }
        if cfg.rest_after > 0 {
            let mut counts: std::collections::HashMap<u32, u32> =
                std::collections::HashMap::with_capacity(self.shown.len());
            for &i in &self.shown {
                let c = counts.entry(i).or_insert(0);
                *c += 1;
                if *c == cfg.rest_after {
                    hidden.insert(i);
                }
            }
        }
    }

    /// Remembers the items of a served slate.
    pub(crate) fn saw(&mut self, items: impl IntoIterator<Item = u32>) {
        for i in items {
            push_bounded(&mut self.shown, i, SHOWN_WINDOW);
        }
    }

    /// Applies an event of `kind` on item `idx` to the user's history, dislikes,
    /// purchases and resting items.
    pub(crate) fn apply(&mut self, kind: EventType, idx: u32, history_len: usize) {
        match kind {
            EventType::Dislike => push_bounded(&mut self.disliked, idx, MAX_DISLIKED),
            EventType::Impression => {}
            EventType::Click | EventType::AddToCart | EventType::Purchase => {
                push_bounded(&mut self.history, idx, history_len);
                self.shown.retain(|&i| i != idx);
                if kind == EventType::Purchase && !self.purchased.contains(&idx) {
                    push_bounded(&mut self.purchased, idx, MAX_PURCHASED);
                }
            }
        }
    }
}

/// Responses remembered per user for matching feedback that names none.
pub(crate) const MAX_RECENT_REQUESTS: usize = 10;

/// A served response, remembered so that feedback can be attributed to it.
#[derive(Debug, Clone)]
pub(crate) struct Impression {
    pub(crate) segment: String,
    pub(crate) items: Vec<String>,
    pub(crate) at_ms: i64,
    /// The request's context, which the encoder learns interactions in.
    pub(crate) context: ContextIds,
    /// Catalog indices of the served slots: what a chosen item was chosen over.
    pub(crate) slate: Vec<u32>,
    /// What the learner needs to learn from the response's feedback.
    pub(crate) decision: Option<learning::Decision>,
}

/// The response an event is attributed to: its segment, context and slate.
pub(crate) struct Shown {
    pub(crate) segment: String,
    pub(crate) context: ContextIds,
    pub(crate) slate: Vec<u32>,
}

pub(crate) fn push_bounded(q: &mut VecDeque<u32>, idx: u32, cap: usize) {
    q.push_back(idx);
    while q.len() > cap {
        q.pop_front();
    }
}
