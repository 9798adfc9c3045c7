//! The requests, events, items and answers the engine deals in, with their validation.
//!
//! These are the JSON shapes of the HTTP API and of catalog files; the gRPC adapter maps
//! its messages onto them, so both transports validate through the same code.

use std::collections::BTreeMap;

use serde::de::{MapAccess, Visitor, value::MapAccessDeserializer};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::FieldError;

/// Longest accepted id (user, item, event, request), in characters.
pub const MAX_ID_CHARS: usize = 256;
/// Most `recent_items` or `exclude` entries one request may carry.
pub const MAX_LIST_LEN: usize = 1000;
/// Most free-form context attributes one request may carry.
pub const MAX_CONTEXT_ATTRIBUTES: usize = 32;
/// Longest accepted short text (segment, device, country, page, category, tag), in
/// characters.
pub const MAX_LABEL_CHARS: usize = 128;
/// Longest accepted item title, in characters.
pub const MAX_TITLE_CHARS: usize = 1024;
/// Longest accepted item description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 8192;
/// Number of items returned when a request does not say.
pub const DEFAULT_N: u32 = 10;

fn default_n() -> u32 {
    DEFAULT_N
}

fn default_true() -> bool {
    true
}

/// Checks an identifier: non-empty, not only whitespace, at most [`MAX_ID_CHARS`], no
/// control characters.
pub fn check_id(field: &str, id: &str) -> Result<(), FieldError> {
    if id.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    check_text(field, id, MAX_ID_CHARS)
}

/// Checks a segment name: an identifier of at most
/// [`onrec_policy::segment::MAX_SEGMENT_CHARS`], as segment rules and policies take them.
pub fn check_segment(field: &str, name: &str) -> Result<(), FieldError> {
    check_id(field, name)?;
    check_text(field, name, onrec_policy::segment::MAX_SEGMENT_CHARS)
}

/// Checks a text: at most `max` characters (as JSON Schema's `maxLength` counts them), no
/// control characters.
fn check_text(field: &str, text: &str, max: usize) -> Result<(), FieldError> {
    // More bytes than `max` characters can take is the cheap test; counting only then.
    if text.len() > max && text.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!(
                "is {} characters long; at most {max} are allowed",
                text.chars().count()
            ),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks prose: as [`check_text`], but line breaks and tabs are allowed.
fn check_prose(field: &str, text: &str, max: usize) -> Result<(), FieldError> {
    let flat: String = text
        .chars()
        .map(|c| {
            if matches!(c, '\n' | '\r' | '\t') {
                ' '
            } else {
                c
            }
        })
        .collect();
    check_text(field, &flat, max)
}

fn check_ids(field: &str, ids: &[String]) -> Result<(), FieldError> {
    if ids.len() > MAX_LIST_LEN {
        return Err(FieldError::new(
            field,
            format!(
                "has {} entries; at most {MAX_LIST_LEN} are allowed",
                ids.len()
            ),
        ));
    }
    ids.iter()
        .enumerate()
        .try_for_each(|(i, id)| check_id(&format!("{field}[{i}]"), id))
}

/// A `T` that must come as a JSON object. Serde also builds a struct from an array of
/// its fields in order, and an internally tagged enum from an array led by its tag; the
/// API documents objects, and takes nothing else.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
            .map(Object)
    }
}

/// Reads a field that must be an object (see [`Object`]).
pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Object::<T>::deserialize(d)?.0)
}

/// Reads a map whose values must be objects (see [`Object`]).
pub fn objects_by_name<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<BTreeMap<String, T>, D::Error> {
    Ok(BTreeMap::<String, Object<T>>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect())
}

/// Reads an optional field that must be an object when present (see [`Object`]).
pub fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(Option::<Object<T>>::deserialize(d)?.map(|o| o.0))
}

/// What the caller knows about the moment of the request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Device class, e.g. `mobile`, `desktop`, `app`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// ISO 3166-1 alpha-2 country code, e.g. `DE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Local hour of day, 0..=23.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hour: Option<u32>,
    /// Page or placement, e.g. `home`, `product`, `cart`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    /// Further free-form attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl Context {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (name, value) in [
            ("device", &self.device),
            ("country", &self.country),
            ("page", &self.page),
        ] {
            if let Some(v) = value {
                check_text(name, v, MAX_LABEL_CHARS)?;
            }
        }
        if let Some(hour) = self.hour
            && hour > 23
        {
            return Err(FieldError::new(
                "hour",
                format!("is {hour}; must be 0..=23"),
            ));
        }
        if self.attributes.len() > MAX_CONTEXT_ATTRIBUTES {
            return Err(FieldError::new(
                "attributes",
                format!(
                    "has {} entries; at most {MAX_CONTEXT_ATTRIBUTES} are allowed",
                    self.attributes.len()
                ),
            ));
        }
        for (k, v) in &self.attributes {
            check_id("attributes", k)?;
            check_text(&format!("attributes.{k}"), v, MAX_LABEL_CHARS)?;
        }
        Ok(())
    }
}

/// A request for the top-N items for one user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    /// The user asking; any non-empty string (anonymous session ids work too).
    pub user_id: String,
    /// How many items to return: 1..=max_n (a server setting, 100 by default).
    #[serde(default = "default_n")]
    #[cfg_attr(feature = "openapi", schema(default = 10, minimum = 1))]
    pub n: u32,
    /// The moment of the request.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_object"
    )]
    pub context: Option<Context>,
    /// The user's most recent items, newest last; replaces the recorded history when given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_items: Vec<String>,
    /// Items that must not be returned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Explicit user segment; absent means "derive it".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
}

impl RecommendRequest {
    /// A request for `n` items for `user_id` with nothing else set.
    pub fn new(user_id: impl Into<String>, n: u32) -> Self {
        Self {
            user_id: user_id.into(),
            n,
            context: None,
            recent_items: Vec::new(),
            exclude: Vec::new(),
            segment: None,
        }
    }

    /// Checks every field against `max_n`; the error names the first bad one.
    pub fn validate(&self, max_n: u32) -> Result<(), FieldError> {
        check_id("user_id", &self.user_id)?;
        if self.n == 0 || self.n > max_n {
            return Err(FieldError::new(
                "n",
                format!("is {}; must be 1..={max_n}", self.n),
            ));
        }
        if let Some(ctx) = &self.context {
            ctx.validate().map_err(|e| e.under("context"))?;
        }
        check_ids("recent_items", &self.recent_items)?;
        check_ids("exclude", &self.exclude)?;
        if let Some(segment) = &self.segment {
            check_segment("segment", segment)?;
        }
        Ok(())
    }
}

/// One slot of a recommendation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecommendedItem {
    /// The item.
    pub item_id: String,
    /// Ranking score, higher is better; comparable within one response only.
    pub score: f64,
    /// Probability the policy had of placing this item in this slot.
    pub propensity: f64,
    /// Whether exploration rather than the ranking filled this slot.
    pub explored: bool,
    /// The item's category.
    pub category: String,
    /// The item's title.
    pub title: String,
}

/// The answer to a [`RecommendRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Recommendation {
    /// Send it back in `Event.request_id` to attribute feedback to this answer.
    pub request_id: String,
    /// Version of the model that ranked.
    pub model_version: String,
    /// The ranker that produced the ranking: `transformer` or `popularity`.
    pub ranker: String,
    /// Why popularity ranked instead of the encoder, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// The segment the user was served as.
    pub segment: String,
    /// The exploration policy that filled the slots (`greedy` when statistics were
    /// unavailable).
    pub policy: String,
    /// At most `n` items, best first; fewer when the catalog has fewer eligible items.
    pub items: Vec<RecommendedItem>,
}

/// What a user did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// The item was shown.
    Impression,
    /// The item was clicked.
    Click,
    /// The item was put in the cart.
    AddToCart,
    /// The item was bought.
    Purchase,
    /// The user asked not to see the item again.
    Dislike,
}

impl EventType {
    /// Every type, in the order of the protobuf enum.
    pub const ALL: [EventType; 5] = [
        Self::Impression,
        Self::Click,
        Self::AddToCart,
        Self::Purchase,
        Self::Dislike,
    ];

    /// The name used in JSON and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Impression => "impression",
            Self::Click => "click",
            Self::AddToCart => "add_to_cart",
            Self::Purchase => "purchase",
            Self::Dislike => "dislike",
        }
    }

    /// Whether the event shows interest, and so enters the user's history.
    pub fn is_interaction(self) -> bool {
        matches!(self, Self::Click | Self::AddToCart | Self::Purchase)
    }
}

/// Feedback about one item from one user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Unique per event; an `event_id` seen before is counted once.
    pub event_id: String,
    /// Who acted.
    pub user_id: String,
    /// On what.
    pub item_id: String,
    /// What they did.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The `request_id` of the recommendation that showed the item, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Optional monetary or rating value (e.g. the purchase amount); must be finite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// When it happened, in milliseconds since the Unix epoch; absent means "now".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
}

/// Largest magnitude of an event's `value` and an item's `price` and `popularity`: far
/// beyond any real amount, and small enough that sums and scores stay finite.
pub const MAX_AMOUNT: f64 = 1e12;

/// Earliest event timestamp accepted: 2000-01-01T00:00:00Z in milliseconds. Anything
/// earlier is a unit mistake (seconds for milliseconds) or a placeholder such as 0.
pub const MIN_TIMESTAMP_MS: i64 = 946_684_800_000;

impl Event {
    /// Checks every field; the error names the first bad one. (A timestamp ahead of the
    /// server's clock is not an error: see [`Event::at`].)
    pub fn validate(&self) -> Result<(), FieldError> {
        check_id("event_id", &self.event_id)?;
        check_id("user_id", &self.user_id)?;
        check_id("item_id", &self.item_id)?;
        if let Some(request_id) = &self.request_id {
            check_id("request_id", request_id)?;
        }
        if let Some(value) = self.value
            && !(value.is_finite() && value.abs() <= MAX_AMOUNT)
        {
            return Err(FieldError::new(
                "value",
                format!("is {value}; must be a finite number within ±{MAX_AMOUNT:e}"),
            ));
        }
        if let Some(ts) = self.timestamp
            && ts < MIN_TIMESTAMP_MS
        {
            return Err(FieldError::new(
                "timestamp",
                format!(
                    "is {ts}; must be milliseconds since the Unix epoch, from 2000-01-01 ({MIN_TIMESTAMP_MS})"
                ),
            ));
        }
        Ok(())
    }

    /// When the event counts as having happened: its timestamp, or `now_ms` when it has
    /// none or one more than `max_future_skew_ms` ahead of the server's clock (a client
    /// clock far ahead, or a timestamp in micro- or nanoseconds, would otherwise put the
    /// event in the future, where its weight in decayed scores would outgrow every other).
    pub fn at(&self, now_ms: i64, max_future_skew_ms: i64) -> i64 {
        match self.timestamp {
            Some(ts) if ts <= now_ms.saturating_add(max_future_skew_ms) => ts,
            _ => now_ms,
        }
    }
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// Counted.
    Accepted,
    /// Counted before under the same `event_id`; ignored.
    Duplicate,
    /// Malformed; nothing changed.
    Invalid(FieldError),
    /// Well formed, but the catalog has no such item; nothing changed.
    UnknownItem,
}

impl EventOutcome {
    /// The name used in API answers and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::Invalid(_) => "invalid",
            Self::UnknownItem => "unknown_item",
        }
    }

    /// Why the event was not accepted, or `None` for accepted and duplicate events.
    pub fn error(&self, item_id: &str) -> Option<String> {
        match self {
            Self::Accepted | Self::Duplicate => None,
            Self::Invalid(e) => Some(e.to_string()),
            Self::UnknownItem => Some(format!("item_id: '{item_id}' is not in the catalog")),
        }
    }
}

/// One event that was not accepted, in a summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventError {
    /// Position in the batch or stream, from 0 (for NDJSON: the line number minus one).
    pub index: u64,
    /// The event's id, when it could be read.
    pub event_id: String,
    /// `invalid` or `unknown_item`.
    pub status: String,
    /// What was wrong.
    pub error: String,
}

/// Most errors a summary lists; the counters still count every event.
pub const MAX_SUMMARY_ERRORS: usize = 100;

/// Counts of what became of a batch or stream of events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventsSummary {
    /// Events read.
    pub received: u64,
    /// Events counted.
    pub accepted: u64,
    /// Events ignored as already counted.
    pub duplicates: u64,
    /// Malformed events.
    pub invalid: u64,
    /// Events naming an item the catalog does not have.
    pub unknown_items: u64,
    /// The first errors (at most 100), in order.
    pub errors: Vec<EventError>,
}

impl EventsSummary {
    /// Adds the outcome of the event at `index`.
    pub fn add(&mut self, index: u64, event_id: &str, item_id: &str, outcome: &EventOutcome) {
        self.received += 1;
        match outcome {
            EventOutcome::Accepted => self.accepted += 1,
            EventOutcome::Duplicate => self.duplicates += 1,
            EventOutcome::Invalid(_) => self.invalid += 1,
            EventOutcome::UnknownItem => self.unknown_items += 1,
        }
        if let Some(error) = outcome.error(item_id)
            && self.errors.len() < MAX_SUMMARY_ERRORS
        {
            self.errors.push(EventError {
                index,
                event_id: event_id.to_owned(),
                status: outcome.as_str().to_owned(),
                error,
            });
        }
    }
}

/// A catalog item: the JSON shape of `PUT /v1/items` and of each catalog file line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The item's id (a SKU).
    pub item_id: String,
    /// Display title.
    #[serde(default)]
    pub title: String,
    /// Category.
    #[serde(default)]
    pub category: String,
    /// Price, non-negative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// What the item is, in prose (line breaks and tabs allowed). With a text model, an
    /// item new to the encoder is placed by its text: title, category, tags and this.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Unavailable items are kept but never recommended.
    #[serde(default = "default_true")]
    pub available: bool,
    /// Prior popularity for a new item (non-negative); ignored for items already known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub popularity: Option<f64>,
}

impl Item {
    /// An available item with only an id and a category.
    pub fn new(item_id: impl Into<String>, category: impl Into<String>) -> Self {
        Self {
            item_id: item_id.into(),
            title: String::new(),
            category: category.into(),
            price: None,
            tags: Vec::new(),
            description: String::new(),
            available: true,
            popularity: None,
        }
    }

    /// The item's text, as a text model reads it: title, category, tags and description.
    pub fn text(&self) -> String {
        onrec_model::text::describe(&self.title, &self.category, &self.tags, &self.description)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_id("item_id", &self.item_id)?;
        check_text("title", &self.title, MAX_TITLE_CHARS)?;
        check_text("category", &self.category, MAX_LABEL_CHARS)?;
        check_prose("description", &self.description, MAX_DESCRIPTION_CHARS)?;
        for (name, value) in [("price", self.price), ("popularity", self.popularity)] {
            if let Some(v) = value
                && !(v.is_finite() && (0.0..=MAX_AMOUNT).contains(&v))
            {
                return Err(FieldError::new(
                    name,
                    format!("is {v}; must be a finite number from 0 to {MAX_AMOUNT:e}"),
                ));
            }
        }
        if self.tags.len() > MAX_CONTEXT_ATTRIBUTES {
            return Err(FieldError::new(
                "tags",
                format!(
                    "has {} entries; at most {MAX_CONTEXT_ATTRIBUTES} are allowed",
                    self.tags.len()
                ),
            ));
        }
        self.tags
            .iter()
            .enumerate()
            .try_for_each(|(i, t)| check_text(&format!("tags[{i}]"), t, MAX_LABEL_CHARS))
    }
}

/// One item's bandit statistics in a segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArmReport {
    /// The item.
    pub item_id: String,
    /// Impressions counted (decayed when a half-life is set).
    pub impressions: f64,
    /// Reward collected (decayed likewise).
    pub reward: f64,
    /// Reward per impression.
    pub reward_per_impression: f64,
}

/// A segment's policy, traffic and reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SegmentReport {
    /// The segment.
    pub segment: String,
    /// Its exploration policy (`greedy`, `epsilon_greedy`, `ucb1`, `thompson`).
    pub policy: String,
    /// Impressions counted.
    pub impressions: f64,
    /// Reward collected.
    pub reward: f64,
    /// Reward per impression; with the default weights, clicks per impression plus the
    /// discounted value of later steps.
    pub reward_per_impression: f64,
    /// Items with statistics.
    pub items: u64,
    /// The best items by reward per impression.
    pub top: Vec<ArmReport>,
}

impl SegmentReport {
    /// The report of a store's summary under `policy`.
    pub fn new(s: onrec_policy::SegmentSummary, policy: &str) -> Self {
        let per = |reward: f64, impressions: f64| {
            if impressions > 0.0 {
                reward / impressions
            } else {
                0.0
            }
        };
        Self {
            reward_per_impression: per(s.reward, s.impressions),
            segment: s.segment,
            policy: policy.to_owned(),
            impressions: s.impressions,
            reward: s.reward,
            items: s.arms as u64,
            top: s
                .top
                .into_iter()
                .map(|a| ArmReport {
                    reward_per_impression: per(a.reward, a.impressions),
                    item_id: a.item_id,
                    impressions: a.impressions,
                    reward: a.reward,
                })
                .collect(),
        }
    }
}

/// What an upsert changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpsertSummary {
    /// Items that were new.
    pub created: u64,
    /// Items that replaced one with the same id.
    pub updated: u64,
    /// Items in the catalog afterwards.
    pub catalog_size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_validation_names_the_field() {
        let mut r = RecommendRequest::new("u1", 0);
        assert_eq!(r.validate(100).unwrap_err().field, "n");
        r.n = 101;
        assert_eq!(r.validate(100).unwrap_err().field, "n");
        r.n = 100;
        assert!(r.validate(100).is_ok());
        r.user_id = "  ".into();
        assert_eq!(r.validate(100).unwrap_err().field, "user_id");
        r.user_id = "u1".into();
        r.exclude = vec!["a".into(), String::new()];
        assert_eq!(r.validate(100).unwrap_err().field, "exclude[1]");
        r.exclude.clear();
        r.context = Some(Context {
            hour: Some(24),
            ..Context::default()
        });
        assert_eq!(r.validate(100).unwrap_err().field, "context.hour");
    }

    #[test]
    fn a_description_is_prose_and_joins_the_item_text() {
        let mut item = Item {
            title: "Trail shoe".into(),
            tags: vec!["running".into(), "waterproof".into()],
            description: "Grips wet rock.\r\n\tLight.".into(),
            ..Item::new("sku-1", "shoes")
        };
        assert!(item.validate().is_ok(), "line breaks and tabs are prose");
        assert_eq!(
            item.text(),
            "Trail shoe. shoes. running, waterproof. Grips wet rock.\r\n\tLight."
        );
        item.description = "bell\u{7}".into();
        let err = item.validate().unwrap_err();
        assert_eq!(err.field, "description");
        assert!(err.to_string().contains("control characters"), "{err}");
        item.description = "é".repeat(MAX_DESCRIPTION_CHARS);
        assert!(item.validate().is_ok(), "characters are counted, not bytes");
        item.description.push('x');
        assert!(item.validate().unwrap_err().to_string().contains("8193"));
    }

    #[test]
    fn event_validation_bounds_values_and_time() {
        let e = Event {
            event_id: "e1".into(),
            user_id: "u1".into(),
            item_id: "i1".into(),
            kind: EventType::Click,
            request_id: None,
            value: Some(f64::NAN),
            timestamp: None,
        };
        let now = 1_800_000_000_000;
        assert_eq!(e.validate().unwrap_err().field, "value");
        let e = Event {
            value: Some(-1e308),
            ..e
        };
        assert_eq!(e.validate().unwrap_err().field, "value");
        let e = Event {
            value: Some(-25.5),
            timestamp: Some(now + 11),
            ..e
        };
        assert!(e.validate().is_ok());
        assert_eq!(e.at(now, 10), now, "too far ahead: counted as received");
        assert_eq!(e.at(now + 1, 10), now + 11, "within the skew: as given");
        assert_eq!(
            Event {
                timestamp: None,
                ..e.clone()
            }
            .at(now, 10),
            now
        );
        for early in [0, 1_700_000_000, MIN_TIMESTAMP_MS - 1] {
            let e = Event {
                timestamp: Some(early),
                ..e.clone()
            };
            assert_eq!(e.validate().unwrap_err().field, "timestamp");
        }
    }

    #[test]
    fn unknown_event_type_is_a_serde_error_naming_the_variants() {
        let err = serde_json::from_str::<Event>(
            r#"{"event_id":"e","user_id":"u","item_id":"i","type":"like"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown variant `like`"), "{err}");
        assert!(err.contains("add_to_cart"), "{err}");
    }

    #[test]
    fn field_paths_nest() {
        let e = FieldError::new("type", "bad").under("[3]");
        assert_eq!(e.field, "[3].type");
        assert_eq!(
            FieldError::new("[1]", "x").under("exclude").field,
            "exclude[1]"
        );
    }

    #[test]
    fn summary_counts_every_event_but_lists_a_bounded_number_of_errors() {
        let mut s = EventsSummary::default();
        for i in 0..(MAX_SUMMARY_ERRORS as u64 + 5) {
            s.add(i, "e", "i", &EventOutcome::UnknownItem);
        }
        s.add(999, "e", "i", &EventOutcome::Accepted);
        assert_eq!(s.received, MAX_SUMMARY_ERRORS as u64 + 6);
        assert_eq!(s.unknown_items, MAX_SUMMARY_ERRORS as u64 + 5);
        assert_eq!(s.accepted, 1);
        assert_eq!(s.errors.len(), MAX_SUMMARY_ERRORS);
    }
}
