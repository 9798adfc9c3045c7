//! Policy specs: which ranker proposes the candidates, which bandit policy fills the
//! slots, and whether the Q-network re-ranks, named `[encoder_]<exploration>[+q]`.
//!
//! | name | ranker | slots |
//! | --- | --- | --- |
//! | `popularity` | popularity | the ranking (greedy) |
//! | `random` | popularity | uniformly from the candidates (ε-greedy with ε = 1) |
//! | `epsilon_greedy`, `ucb1`, `thompson` | popularity | that policy over the candidates |
//! | `encoder` | SASRec encoder | the ranking (greedy) |
//! | `encoder_random`, `encoder_epsilon_greedy`, `encoder_ucb1`, `encoder_thompson` | SASRec encoder | that policy |
//! | `onrec` | the service as shipped: its default configuration, only the catalog | its default policy |
//! | `oracle` | the world's truth | the best slate |
//! | `oracle_average` | the world's truth, except who the user is | the best slate for the average user in the moment: the most any policy gets without personalising |
//! | `oracle_learning` | the world's truth, except who the user is, which it learns from their responses | the best slate under its posterior of the user's tastes (see [`crate::bayes`]) |
//! | `uniform` | none | a uniformly random slate from the whole catalog |
//!
//! A `+q` suffix attaches the online Q-network learner in live mode, which re-ranks the
//! candidates once it has trained enough.

use std::fmt;
use std::str::FromStr;

use onrec_policy::PolicyConfig;
use serde::Serialize;

use crate::SimError;

/// The name of the service as shipped.
pub const SERVICE: &str = "onrec";
/// The name of the oracle.
pub const ORACLE: &str = "oracle";
/// The name of the oracle that does not know the user.
pub const ORACLE_AVERAGE: &str = "oracle_average";
/// The name of the oracle that learns each user's tastes from their responses.
pub const ORACLE_LEARNING: &str = "oracle_learning";
/// The name of the uniformly random slate.
pub const UNIFORM: &str = "uniform";

/// The policies `onrec simulate` compares when not told otherwise.
pub const DEFAULT_POLICIES: &str =
    "random,popularity,epsilon_greedy,ucb1,thompson,encoder,encoder_ucb1,encoder+q,ucb1+q";

/// Which ranker proposes the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ranker {
    /// The engine's decayed popularity.
    Popularity,
    /// A SASRec encoder trained on the world's organic sessions before the run.
    Encoder,
    /// The service exactly as shipped, started with only the world's catalog (see
    /// [`crate::Simulation::with_service`]).
    Service,
    /// The world's oracle: the best slate for every request, through no engine.
    Oracle,
    /// The oracle without the user: the best slate for the average user in the
    /// request's moment, through no engine.
    OracleAverage,
    /// The oracle that learns who the user is from their responses
    /// ([`crate::bayes::LearningOracle`]), through no engine.
    OracleLearning,
    /// A uniformly random slate from the whole catalog, through no engine.
    Uniform,
}

/// Which bandit policy fills the slots from the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exploration {
    /// The ranking as it is.
    Greedy,
    /// Uniformly at random (ε-greedy with ε = 1).
    Random,
    /// ε-greedy around the ranking.
    EpsilonGreedy,
    /// UCB1 on the segment's statistics.
    Ucb1,
    /// Thompson sampling on the segment's statistics.
    Thompson,
}

impl Exploration {
    const ALL: [(Exploration, &'static str); 5] = [
        (Self::Greedy, "greedy"),
        (Self::Random, "random"),
        (Self::EpsilonGreedy, "epsilon_greedy"),
        (Self::Ucb1, "ucb1"),
        (Self::Thompson, "thompson"),
    ];
}

/// The parameters the bandit policies run with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PolicyParams {
    /// ε of `epsilon_greedy` (fixed, no decay).
    pub epsilon: f64,
    /// Weight c of UCB1's confidence bonus, on the scale of the reward per impression.
    pub ucb_c: f64,
    /// Monte Carlo draws of Thompson sampling's propensity estimate.
    pub thompson_draws: u32,
    /// Weight of the personal ranking in UCB1 and Thompson: 0 here, so that the
    /// policies compared are the segment's bandits themselves (the service's default
    /// mixes them with the personal ranking; `onrec` runs it).
    pub personal: f64,
    /// Pseudo-impressions per item UCB1 and Thompson take from the other segments'
    /// statistics (the service's `segment_prior`; 0: none).
    pub segment_prior: f64,
}

impl Default for PolicyParams {
    /// ε = 0.1; c = 0.3, about the spread (sd) of the reward of one impression when CTRs
    /// are a few per cent: UCB1's textbook c = √2 assumes rewards spread over [0, 1] and
    /// would explore nearly uniformly for a very long time; 50 Thompson draws.
    fn default() -> Self {
        Self {
            epsilon: 0.1,
            ucb_c: 0.3,
            thompson_draws: 50,
            personal: 0.0,
            segment_prior: onrec_policy::explorer::DEFAULT_PRIOR_IMPRESSIONS,
        }
    }
}

/// One policy to simulate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySpec {
    /// Its name, as given and as results show it.
    pub name: String,
    /// The ranker.
    pub ranker: Ranker,
    /// The bandit policy.
    pub exploration: Exploration,
    /// Whether the Q-network re-ranks the candidates.
    pub q_network: bool,
}

impl PolicySpec {
    /// The engine's policy configuration for this spec.
    pub fn policy_config(&self, params: &PolicyParams) -> PolicyConfig {
        match self.exploration {
            Exploration::Greedy => PolicyConfig::Greedy {},
            Exploration::Random => PolicyConfig::epsilon_greedy(1.0),
            Exploration::EpsilonGreedy => PolicyConfig::epsilon_greedy(params.epsilon),
            Exploration::Ucb1 => PolicyConfig::Ucb1 {
                c: params.ucb_c,
                personal: params.personal,
            },
            Exploration::Thompson => PolicyConfig::Thompson {
                alpha: 1.0,
                beta: 1.0,
                draws: params.thompson_draws,
                personal: params.personal,
            },
        }
    }

    /// Every name the parser accepts, without `+q`.
    pub fn known_names() -> Vec<String> {
        let mut names = vec![
            SERVICE.to_owned(),
            ORACLE.to_owned(),
            ORACLE_AVERAGE.to_owned(),
            ORACLE_LEARNING.to_owned(),
            UNIFORM.to_owned(),
        ];
        for prefix in ["", "encoder_"] {
            for (e, name) in Exploration::ALL {
                names.push(match (prefix, e) {
                    ("", Exploration::Greedy) => "popularity".to_owned(),
                    (_, Exploration::Greedy) => "encoder".to_owned(),
                    _ => format!("{prefix}{name}"),
                });
            }
        }
        names
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl FromStr for PolicySpec {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, SimError> {
        let name = s.trim();
        let unknown = || SimError::UnknownPolicy {
            name: name.to_owned(),
            known: format!(
                "{}, each optionally with +q",
                Self::known_names().join(", ")
            ),
        };
        let (base, q_network) = match name.strip_suffix("+q") {
            Some(base) => (base, true),
            None => (name, false),
        };
        let outside = match base {
            SERVICE => Some(Ranker::Service),
            ORACLE => Some(Ranker::Oracle),
            ORACLE_AVERAGE => Some(Ranker::OracleAverage),
            ORACLE_LEARNING => Some(Ranker::OracleLearning),
            UNIFORM => Some(Ranker::Uniform),
            _ => None,
        };
        if let Some(ranker) = outside.filter(|_| !q_network) {
            return Ok(Self {
                name: name.to_owned(),
                ranker,
                exploration: Exploration::Greedy,
                q_network: false,
            });
        }
        let (ranker, exploration) = match base {
            "popularity" => (Ranker::Popularity, Exploration::Greedy),
            "encoder" => (Ranker::Encoder, Exploration::Greedy),
            other => {
                let (ranker, rest) = match other.strip_prefix("encoder_") {
                    Some(rest) => (Ranker::Encoder, rest),
                    None => (Ranker::Popularity, other),
                };
                let exploration = Exploration::ALL
                    .iter()
                    .find(|(e, n)| *n == rest && *e != Exploration::Greedy)
                    .map(|(e, _)| *e)
                    .ok_or_else(unknown)?;
                (ranker, exploration)
            }
        };
        Ok(Self {
            name: name.to_owned(),
            ranker,
            exploration,
            q_network,
        })
    }
}

/// Parses a comma-separated list of policy names; empty entries, unknown and repeated
/// names are errors.
pub fn parse_list(list: &str) -> Result<Vec<PolicySpec>, SimError> {
    let mut specs: Vec<PolicySpec> = Vec::new();
    for part in list.split(',') {
        if part.trim().is_empty() {
            return Err(SimError::config(
                "policies",
                format!("'{list}' has an empty entry"),
            ));
        }
        let spec: PolicySpec = part.parse()?;
        if specs.iter().any(|s| s.name == spec.name) {
            return Err(SimError::config(
                "policies",
                format!("'{}' is listed twice", spec.name),
            ));
        }
        specs.push(spec);
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_into_ranker_exploration_and_q() {
        let specs = parse_list(DEFAULT_POLICIES).unwrap();
        assert_eq!(specs.len(), 9);
        let spec = |name: &str| name.parse::<PolicySpec>().unwrap();
        assert_eq!(
            (spec("random").ranker, spec("random").exploration),
            (Ranker::Popularity, Exploration::Random)
        );
        assert_eq!(spec("encoder").exploration, Exploration::Greedy);
        let eq = spec("encoder_thompson+q");
        assert_eq!(
            (eq.ranker, eq.exploration, eq.q_network),
            (Ranker::Encoder, Exploration::Thompson, true)
        );
        assert_eq!(
            spec("random").policy_config(&PolicyParams::default()),
            PolicyConfig::epsilon_greedy(1.0)
        );
        for name in PolicySpec::known_names() {
            assert_eq!(spec(&name).name, name);
        }
    }

    #[test]
    fn unknown_empty_and_repeated_names_are_errors() {
        let err = parse_list("ucb1,softmax").unwrap_err().to_string();
        assert!(
            err.starts_with(
                "unknown policy 'softmax' (known: onrec, oracle, oracle_average, oracle_learning, uniform, popularity, random"
            ),
            "{err}"
        );
        assert!("greedy".parse::<PolicySpec>().is_err());
        assert!("encoder_greedy".parse::<PolicySpec>().is_err());
        assert!("+q".parse::<PolicySpec>().is_err());
        assert_eq!(
            parse_list("ucb1,,thompson").unwrap_err().to_string(),
            "policies: 'ucb1,,thompson' has an empty entry"
        );
        assert_eq!(
            parse_list("ucb1,ucb1").unwrap_err().to_string(),
            "policies: 'ucb1' is listed twice"
        );
    }
}
