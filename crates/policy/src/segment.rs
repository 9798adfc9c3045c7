//! User segments: which segment a request falls in, and which policy serves it.
//!
//! The configuration is serde (TOML in the server's file, under `[segments]`):
//!
//! ```toml
//! [[segments.rules]]
//! name = "mobile-de"
//! device = "mobile"
//! country = ["DE", "AT"]
//!
//! [[segments.rules]]
//! name = "night"
//! hours = [22, 5]          # 22:00 to 05:59, wrapping past midnight
//!
//! [[segments.rules]]
//! name = "new"
//! returning = false
//!
//! [segments.policies.default]
//! kind = "ucb1"
//! c = 1.0
//!
//! [segments.policies.new]
//! kind = "epsilon_greedy"
//! epsilon = 0.2
//! epsilon_min = 0.02
//! decay_impressions = 10000
//! ```
//!
//! A request's explicit segment wins; otherwise the first rule whose conditions all hold
//! names it; otherwise it is `default`. A segment without its own policy entry uses the
//! `default` entry, and without that, [`PolicyConfig::Greedy`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::policy::PolicyConfig;

/// The segment of requests that neither name one nor match a rule.
pub const DEFAULT_SEGMENT: &str = "default";
/// Longest segment name a rule or policy entry may use, in characters.
pub const MAX_SEGMENT_CHARS: usize = 128;

/// The policy of segments without an entry, when there is no `default` entry either.
static GREEDY: PolicyConfig = PolicyConfig::Greedy {};

/// What a rule can look at: the request's context and what is known of the user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserFacts<'a> {
    /// Device class, e.g. `mobile`.
    pub device: Option<&'a str>,
    /// Country code, e.g. `DE`.
    pub country: Option<&'a str>,
    /// Page or placement, e.g. `home`.
    pub page: Option<&'a str>,
    /// Local hour of day, 0..=23.
    pub hour: Option<u32>,
    /// Whether the user has been seen before (has history).
    pub returning: bool,
}

/// One accepted value or a list of them; matched ASCII case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Any of these values.
    Many(Vec<String>),
}

impl OneOrMany {
    fn matches(&self, value: Option<&str>) -> bool {
        let Some(value) = value else {
            return false;
        };
        match self {
            Self::One(v) => v.eq_ignore_ascii_case(value),
            Self::Many(vs) => vs.iter().any(|v| v.eq_ignore_ascii_case(value)),
        }
    }
}

/// A rule: its segment name and conditions that must all hold (absent ones always do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentRule {
    /// The segment it assigns.
    pub name: String,
    /// Device class (one or a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<OneOrMany>,
    /// Country code (one or a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<OneOrMany>,
    /// Page (one or a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<OneOrMany>,
    /// Inclusive hour range `[from, to]`; `from > to` wraps past midnight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<[u32; 2]>,
    /// Returning users (`true`) or new ones (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returning: Option<bool>,
}

impl SegmentRule {
    /// Whether every condition of the rule holds for `facts`.
    pub fn matches(&self, facts: &UserFacts<'_>) -> bool {
        let text = |cond: &Option<OneOrMany>, value| cond.as_ref().is_none_or(|c| c.matches(value));
        text(&self.device, facts.device)
            && text(&self.country, facts.country)
            && text(&self.page, facts.page)
            && self.hours.is_none_or(|[from, to]| {
                facts.hour.is_some_and(|h| {
                    if from <= to {
                        (from..=to).contains(&h)
                    } else {
                        h >= from || h <= to
                    }
                })
            })
            && self.returning.is_none_or(|r| r == facts.returning)
    }
}

/// Segment rules and per-segment policies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Rules in order; the first that matches names the segment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<SegmentRule>,
    /// Policy per segment name; `default` serves every segment without its own entry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, PolicyConfig>,
}

fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    if name.len() > MAX_SEGMENT_CHARS && name.chars().count() > MAX_SEGMENT_CHARS {
        return Err(ConfigError::new(
            field,
            format!(
                "is {} characters long; at most {MAX_SEGMENT_CHARS} are allowed",
                name.chars().count()
            ),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ConfigError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

impl SegmentConfig {
    /// Checks every rule and policy; the error names the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, rule) in self.rules.iter().enumerate() {
            check_name(&format!("rules[{i}].name"), &rule.name)?;
            if let Some(hours) = rule.hours
                && hours.iter().any(|&h| h > 23)
            {
                return Err(ConfigError::new(
                    format!("rules[{i}].hours"),
                    format!("is {hours:?}; hours must be 0..=23"),
                ));
            }
        }
        for (name, policy) in &self.policies {
            check_name(&format!("policies.{name}"), name)?;
            policy.validate().map_err(|e| ConfigError {
                field: format!("policies.{name}.{}", e.field),
                message: e.message,
            })?;
        }
        Ok(())
    }

    /// The segment of a request: `explicit` when given and non-empty, else the first
    /// matching rule's name, else [`DEFAULT_SEGMENT`].
    pub fn resolve(&self, explicit: Option<&str>, facts: &UserFacts<'_>) -> String {
        if let Some(segment) = explicit.filter(|s| !s.is_empty()) {
            return segment.to_owned();
        }
        self.rules
            .iter()
            .find(|r| r.matches(facts))
            .map_or(DEFAULT_SEGMENT, |r| r.name.as_str())
            .to_owned()
    }

    /// The policy of `segment`: its own entry, else `default`'s, else greedy.
    pub fn policy_for(&self, segment: &str) -> &PolicyConfig {
        self.policies
            .get(segment)
            .or_else(|| self.policies.get(DEFAULT_SEGMENT))
            .unwrap_or(&GREEDY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        segments: SegmentConfig,
    }

    fn parse(text: &str) -> Result<SegmentConfig, String> {
        toml::from_str::<File>(text)
            .map(|f| f.segments)
            .map_err(|e| e.to_string())
    }

    const EXAMPLE: &str = r#"
        [[segments.rules]]
        name = "mobile-de"
        device = "mobile"
        country = ["DE", "AT"]

        [[segments.rules]]
        name = "night"
        hours = [22, 5]

        [[segments.rules]]
        name = "new"
        returning = false

        [[segments.rules]]
        name = "checkout"
        page = "cart"
        hours = [9, 17]

        [segments.policies.default]
        kind = "ucb1"
        c = 1

        [segments.policies.new]
        kind = "epsilon_greedy"
        epsilon = 0.2
        epsilon_min = 0.02
        decay_impressions = 10000

        [segments.policies.night]
        kind = "thompson"
        draws = 100

        [segments.policies.checkout]
        kind = "greedy"
    "#;

    fn facts() -> UserFacts<'static> {
        UserFacts {
            returning: true,
            ..UserFacts::default()
        }
    }

    #[test]
    fn parses_and_validates_the_documented_example() {
        let cfg = parse(EXAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.rules.len(), 4);
        assert_eq!(cfg.policy_for("default"), &PolicyConfig::ucb1(1.0));
        assert_eq!(
            cfg.policy_for("night"),
            &PolicyConfig::thompson(1.0, 1.0, 100)
        );
        assert_eq!(cfg.policy_for("checkout"), &PolicyConfig::Greedy {});
        // A segment without an entry (here one that only a request names) gets `default`'s.
        assert_eq!(cfg.policy_for("vip"), &PolicyConfig::ucb1(1.0));
    }

    #[test]
    fn explicit_segment_wins_then_first_matching_rule_then_default() {
        let cfg = parse(EXAMPLE).unwrap();
        let mobile_de = UserFacts {
            device: Some("Mobile"),
            country: Some("de"),
            hour: Some(23),
            returning: false,
            ..facts()
        };
        assert_eq!(cfg.resolve(Some("vip"), &mobile_de), "vip");
        // An empty explicit segment counts as none (gRPC's "not given").
        assert_eq!(cfg.resolve(Some(""), &mobile_de), "mobile-de");
        // Also night and new, but mobile-de comes first.
        assert_eq!(cfg.resolve(None, &mobile_de), "mobile-de");
        let fr_night = UserFacts {
            country: Some("FR"),
            device: Some("mobile"),
            hour: Some(3),
            ..facts()
        };
        assert_eq!(cfg.resolve(None, &fr_night), "night");
        let new_user = UserFacts {
            hour: Some(12),
            returning: false,
            ..facts()
        };
        assert_eq!(cfg.resolve(None, &new_user), "new");
        let cart = UserFacts {
            page: Some("cart"),
            hour: Some(17),
            ..facts()
        };
        assert_eq!(cfg.resolve(None, &cart), "checkout");
        let cart_evening = UserFacts {
            hour: Some(18),
            ..cart
        };
        assert_eq!(cfg.resolve(None, &cart_evening), DEFAULT_SEGMENT);
        // A rule with an hour range never matches a request without an hour.
        let cart_no_hour = UserFacts { hour: None, ..cart };
        assert_eq!(cfg.resolve(None, &cart_no_hour), DEFAULT_SEGMENT);
    }

    #[test]
    fn no_default_entry_means_greedy() {
        let cfg = SegmentConfig::default();
        assert_eq!(cfg.policy_for("anything"), &PolicyConfig::Greedy {});
        assert_eq!(cfg.resolve(None, &facts()), DEFAULT_SEGMENT);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        let typo = "[[segments.rules]]\nname = \"x\"\ndevise = \"mobile\"\n";
        assert!(parse(typo).unwrap_err().contains("devise"));
        let bad_kind = "[segments.policies.default]\nkind = \"softmax\"\n";
        assert!(parse(bad_kind).is_err());
        let stray = "[segments.policies.default]\nkind = \"ucb1\"\nepsilon = 0.1\n";
        assert!(parse(stray).unwrap_err().contains("epsilon"));
        let stray_greedy = "[segments.policies.default]\nkind = \"greedy\"\nc = 1\n";
        assert!(parse(stray_greedy).is_err());

        let hours = parse("[[segments.rules]]\nname = \"x\"\nhours = [20, 24]\n").unwrap();
        assert_eq!(hours.validate().unwrap_err().field, "rules[0].hours");
        let unnamed = parse("[[segments.rules]]\nname = \" \"\n").unwrap();
        assert_eq!(unnamed.validate().unwrap_err().field, "rules[0].name");
        let eps =
            parse("[segments.policies.vip]\nkind = \"epsilon_greedy\"\nepsilon = 1.5\n").unwrap();
        assert_eq!(eps.validate().unwrap_err().field, "policies.vip.epsilon");
    }

    #[test]
    fn round_trips_through_toml() {
        #[derive(Serialize)]
        struct Out<'a> {
            segments: &'a SegmentConfig,
        }
        let cfg = parse(EXAMPLE).unwrap();
        let text = toml::to_string(&Out { segments: &cfg }).unwrap();
        assert_eq!(parse(&text).unwrap(), cfg);
    }
}
