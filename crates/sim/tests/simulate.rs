//! End-to-end simulations through the real engine: regret against the oracle, the order
//! of policies on a stationary world, decision logs and configuration errors.
// Helpers outside #[test] functions build fixtures; a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use onrec_engine::decisions::{self, LogRecord};
use onrec_sim::{
    EncoderSettings, PolicyRun, SimConfig, SimError, Simulation, World, WorldConfig, spec,
};

fn world(seed: u64) -> World {
    World::new(WorldConfig {
        seed,
        users: 500,
        items: 300,
        categories: 10,
        ..WorldConfig::default()
    })
    .unwrap()
}

/// Small enough for a debug build: short slates, few candidates, a tiny encoder and few
/// Thompson draws (they only refine propensities, not choices).
fn config(rounds: usize) -> SimConfig {
    let mut config = SimConfig {
        rounds,
        n: 5,
        encoder: EncoderSettings {
            sessions: 300,
            steps: 10,
            epochs: 2,
            hidden: 16,
            max_len: 10,
            seed: 3,
        },
        ..SimConfig::default()
    };
    config.engine.candidates = 20;
    config.params.thompson_draws = 10;
    config
}

fn assert_regret_never_negative(run: &PolicyRun) {
    for (round, r) in run.regret().iter().enumerate() {
        assert!(
            *r >= -1e-9,
            "{}: round {round} beat the oracle by {}",
            run.summary.policy,
            -r
        );
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

#[test]
fn the_oracle_is_never_beaten_in_expectation() {
    // Seen items excluded and popularity learning: the oracle must follow the engine's
    // view of what each user may still be shown.
    let mut sim = Simulation::new(world(5), config(400)).unwrap();
    let specs = spec::parse_list("random,popularity,ucb1,thompson,encoder_ucb1+q").unwrap();
    let runs = sim.run_all(&specs).unwrap();
    for run in &runs {
        assert_regret_never_negative(run);
        let s = &run.summary;
        assert_eq!(run.expected.len(), 400);
        assert_eq!(s.impressions, 400 * 5);
        assert!(s.clicks > 0 && s.ctr > 0.005 && s.ctr < 0.3, "{s:?}");
        assert!(s.cumulative_regret > 0.0, "{s:?}");
        // Every impression is in one visit bucket, and the buckets' clicks add up.
        assert_eq!(s.impressions_by_visit.len(), onrec_sim::VISIT_BUCKETS.len());
        assert_eq!(s.impressions_by_visit.iter().sum::<u64>(), s.impressions);
        // A per-bucket share, weighted back into a count by the buckets' impressions.
        let count = |shares: &[f64]| -> f64 {
            shares
                .iter()
                .zip(&s.impressions_by_visit)
                .map(|(share, &imp)| share * imp as f64)
                .sum()
        };
        let clicks = count(&s.ctr_by_visit);
        assert!((clicks - s.clicks as f64).abs() < 1e-6, "{s:?}");
        // So do the buckets' slots in the users' preferred categories.
        let liked = count(&s.preferred_by_visit);
        assert!(
            (liked - s.preferred_share * s.impressions as f64).abs() < 1e-6,
            "{s:?}"
        );
        // 400 rounds over 500 users: most are first visits, some users came back.
        assert!(s.impressions_by_visit[0] > s.impressions / 2, "{s:?}");
        assert!(s.impressions_by_visit[1] > 0, "{s:?}");
    }
    assert_eq!(runs[0].summary.encoder_rounds, 0);
    let encoder_q = &runs[4].summary;
    assert!(encoder_q.encoder_rounds > 0, "{encoder_q:?}");
    assert!(
        encoder_q.learner.is_some_and(|l| l.accepted > 0),
        "{encoder_q:?}"
    );
    let trained = sim.encoder().unwrap().report();
    assert_eq!(trained.interactions, 300 * 10);
}

/// A stationary world whose items differ more than its users' tastes do, so that what a
/// bandit can learn per segment (item appeal, device effects) is a large share of the
/// regret (the rest is personal taste, which only a personalised ranker could catch); its
/// prior popularity is informative but noisy.
fn stationary_world(seed: u64) -> World {
    World::new(WorldConfig {
        seed,
        users: 500,
        items: 300,
        categories: 10,
        appeal_sd: 1.0,
        taste_sd: 0.5,
        latent_weight: 0.3,
        prior_noise_sd: 0.8,
        ..WorldConfig::default()
    })
    .unwrap()
}

#[test]
fn ucb_and_thompson_beat_epsilon_greedy_which_beats_random_on_a_stationary_world() {
    let specs = spec::parse_list("random,epsilon_greedy,ucb1,thompson").unwrap();
    for seed in [11, 12, 13] {
        let mut sim = Simulation::new(stationary_world(seed), config(3000).stationary()).unwrap();
        let runs = sim.run_all(&specs).unwrap();
        let regret: Vec<f64> = runs.iter().map(|r| r.summary.cumulative_regret).collect();
        let [random, eps, ucb, thompson] = regret[..] else {
            panic!("four runs expected: {regret:?}");
        };
        assert!(eps < 0.95 * random, "seed {seed}: {regret:?}");
        assert!(ucb < 0.95 * eps, "seed {seed}: {regret:?}");
        assert!(thompson < 0.95 * eps, "seed {seed}: {regret:?}");
        for run in &runs {
            assert_regret_never_negative(run);
        }
        // The bandits learn: their regret per round falls from the first tenth to the last.
        for run in &runs[2..] {
            let regret = run.regret();
            let tenth = regret.len() / 10;
            let (first, last) = (
                mean(&regret[..tenth]),
                mean(&regret[regret.len() - tenth..]),
            );
            assert!(
                last < 0.9 * first,
                "seed {seed} {}: {first} then {last}",
                run.summary.policy
            );
        }
    }
}

#[test]
fn a_deterministic_policy_replays_exactly() {
    // UCB1 has no randomness of its own and every run meets the same users and outcome
    // draws, so two runs agree round by round.
    let mut sim = Simulation::new(world(8), config(300)).unwrap();
    let ucb = spec::parse_list("ucb1").unwrap();
    let a = sim.run(&ucb[0], None).unwrap();
    let b = sim.run(&ucb[0], None).unwrap();
    assert_eq!(a.expected, b.expected);
    assert_eq!(a.realised, b.realised);
    assert_eq!(a.oracle, b.oracle);
}

#[test]
fn the_decision_log_holds_every_slate_and_reward() {
    let mut sim = Simulation::new(world(6), config(300)).unwrap();
    let thompson = spec::parse_list("thompson").unwrap();
    let mut records = Vec::new();
    let mut sink = |record: LogRecord| {
        records.push(record);
        Ok::<(), SimError>(())
    };
    let run = sim.run(&thompson[0], Some(&mut sink)).unwrap();
    let (logged, orphans) = decisions::join(records);
    assert_eq!(orphans, 0);
    assert_eq!(logged.len(), 300);
    assert!(logged.iter().all(|l| l.decision.slate.len() == 5
        && l.decision.candidates.len() == 20
        && l.decision.policy.kind() == "thompson"
        && l.decision.slate.iter().all(|s| s.propensity > 0.0)));
    let logged_reward: f64 = logged.iter().flat_map(|l| &l.rewards).sum();
    assert!(
        (logged_reward - run.summary.reward).abs() < 1e-6,
        "{logged_reward} vs {}",
        run.summary.reward
    );
    let realised: f64 = run.realised.iter().sum();
    assert!((realised - run.summary.reward).abs() < 1e-6);
}

#[test]
fn bad_configuration_is_an_error_that_names_the_setting() {
    let refused = |change: fn(&mut SimConfig)| {
        let mut c = config(10);
        change(&mut c);
        Simulation::new(world(1), c).unwrap_err().to_string()
    };
    assert_eq!(refused(|c| c.rounds = 0), "rounds: must be at least 1");
    assert_eq!(refused(|c| c.n = 0), "n: is 0; must be 1..=100");
    assert_eq!(refused(|c| c.n = 101), "n: is 101; must be 1..=100");
    assert_eq!(
        refused(|c| {
            c.engine.max_n = 1000;
            c.n = 301;
        }),
        "n: is 301; the world has only 300 items"
    );
    assert_eq!(
        refused(|c| c.engine.candidates = 0),
        "candidates: must be at least 1"
    );
    assert_eq!(
        refused(|c| c.params.epsilon = 1.5),
        "epsilon: is 1.5; must be 0..=1"
    );
    assert_eq!(
        refused(|c| c.params.ucb_c = -1.0),
        "ucb_c: is -1; must be a finite number >= 0"
    );
    assert_eq!(
        refused(|c| c.params.thompson_draws = 0),
        "thompson_draws: is 0; must be 1..=100000"
    );
    assert_eq!(
        refused(|c| c.q.weight = 2.0),
        "q_weight: is 2; must be 0..=1"
    );
    assert!(refused(|c| c.encoder.steps = 2).starts_with("encoder.steps: is 2"));
    assert!(
        refused(|c| c.segment_rules[0].name = " ".into())
            .starts_with("policy configuration: rules[0].name")
    );
    let err = spec::parse_list("random,bogus").unwrap_err().to_string();
    assert!(err.starts_with("unknown policy 'bogus'"), "{err}");
}
