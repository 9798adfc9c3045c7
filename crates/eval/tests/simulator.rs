//! The estimators against the truth: a policy's value estimated from another policy's
//! decision log in the simulator, compared with its value when it serves on-policy.
#![allow(clippy::unwrap_used)]

use onrec_eval::{OpeOptions, TargetPolicy, evaluate};
use onrec_policy::PolicyConfig;
use onrec_sim::{LogRecord, SimConfig, Simulation, World, WorldConfig, spec};

/// A stationary shop with one-item slates: every request chooses from the same ranked
/// candidates, so the per-slot estimators are unbiased and the on-policy value is the truth.
fn simulation(epsilon: f64) -> Simulation {
    let world = World::new(WorldConfig {
        seed: 11,
        users: 300,
        items: 200,
        categories: 8,
        ..WorldConfig::default()
    })
    .unwrap();
    let mut config = SimConfig {
        rounds: 6000,
        n: 1,
        ..SimConfig::default()
    }
    .stationary();
    config.engine.candidates = 20;
    config.params.epsilon = epsilon;
    Simulation::new(world, config).unwrap()
}

/// The mean expected reward per request of ε-greedy with `epsilon`, served on-policy.
fn truth(epsilon: f64) -> f64 {
    let spec = spec::parse_list("epsilon_greedy").unwrap().remove(0);
    simulation(epsilon)
        .run(&spec, None)
        .unwrap()
        .summary
        .expected_reward_per_round
}

#[test]
fn estimates_from_an_exploring_log_agree_with_targets_served_on_policy() {
    // The logging policy explores half of the time.
    let spec = spec::parse_list("epsilon_greedy").unwrap().remove(0);
    let mut records: Vec<LogRecord> = Vec::new();
    let mut sink = |r: LogRecord| {
        records.push(r);
        Ok(())
    };
    simulation(0.5).run(&spec, Some(&mut sink)).unwrap();

    // Wide intervals: the engine's exploration draws are not seeded, so the check must
    // hold for every run, not for one lucky seed.
    let options = OpeOptions {
        confidence: 0.999,
        ..OpeOptions::default()
    };
    // A target that exploits far more than the log did, and one that never exploits.
    for epsilon in [0.05, 1.0] {
        let truth = truth(epsilon);
        let report = evaluate(
            &records,
            &TargetPolicy::new(PolicyConfig::epsilon_greedy(epsilon)),
            &options,
        )
        .unwrap();
        assert_eq!(report.counts.decisions, 6000);
        let v = report.per_decision;
        eprintln!(
            "ε = {epsilon}: truth {truth:.4}; IPS {:?}; SNIPS {:?}; DR {:?}",
            v.ips, v.snips, v.dr
        );
        for (name, e) in [("IPS", v.ips), ("SNIPS", v.snips), ("DR", v.dr)] {
            assert!(
                e.low <= truth && truth <= e.high,
                "ε = {epsilon}: {name} {e:?} misses the truth {truth}"
            );
        }
    }
}
