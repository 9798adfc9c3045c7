//! Mutation fuzzing of every parser a client reaches, on stable Rust: JSON bodies (and so
//! NDJSON lines, which go through the same parser), protobuf messages, config files and
//! catalog lines. Each target starts from valid inputs and mutates them (bit flips,
//! byte insertions and deletions, bytes that matter to the format, splices of two inputs,
//! truncations), and runs the same parsing and validation the server runs. It passes when
//! no input panics and none hangs (no progress for a minute).
//!
//! `cargo test -p onrec-server --release fuzz -- --nocapture` with `ONREC_FUZZ_INPUTS`
//! set (e.g. `1000000`) runs that many inputs per target; the test suite runs a few
//! thousand.

use std::sync::mpsc;
use std::time::Duration;

use onrec_engine::{Event, Item, RecommendRequest};
use onrec_model::rng::SplitMix64;
use onrec_proto::v1 as pb;
use prost::Message;

use crate::http::{OpeRequest, parse_json};
use crate::{Config, grpc};

/// Inputs per target unless `ONREC_FUZZ_INPUTS` says otherwise.
const DEFAULT_INPUTS: u64 = 3_000;
/// Longest a single input may go without the target returning: a hang.
const HANG: Duration = Duration::from_secs(60);

/// Bytes that mean something to JSON, TOML or protobuf.
const INTERESTING: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"=",
    b"\n",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"0",
    b"-1",
    b"1e308",
    b"-1e308",
    b"NaN",
    b"18446744073709551616",
    b"null",
    b"true",
    b"\xff",
    b"\x00",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"[[[[[[[[[[",
    b"'''",
    b"\xe2\x80\xae",
];

fn inputs() -> u64 {
    std::env::var("ONREC_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_INPUTS)
}

/// One mutation of a seed: from 1 to 4 edits.
fn mutate(seeds: &[Vec<u8>], rng: &mut SplitMix64) -> Vec<u8> {
    let mut input = seeds[rng.below(seeds.len() as u64) as usize].clone();
    for _ in 0..=rng.below(4) {
        let at = |rng: &mut SplitMix64, len: usize| rng.below(len as u64 + 1) as usize;
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = at(rng, input.len() - 1);
                input[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = at(rng, input.len());
                input.insert(i, rng.below(256) as u8);
            }
            2 if !input.is_empty() => {
                let i = at(rng, input.len() - 1);
                let n = (rng.below(8) as usize + 1).min(input.len() - i);
                input.drain(i..i + n);
            }
            3 => {
                let i = at(rng, input.len());
                let bytes = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                input.splice(i..i, bytes.iter().copied());
            }
            4 => {
                let other = &seeds[rng.below(seeds.len() as u64) as usize];
                let (i, j) = (at(rng, input.len()), at(rng, other.len()));
                input.truncate(i);
                input.extend_from_slice(&other[j..]);
            }
            _ => {
                let i = at(rng, input.len());
                input.truncate(i);
            }
        }
    }
    input
}

/// Runs `target` on `inputs()` mutations of `seeds` (and the seeds themselves) on a
/// thread of its own; fails on a panic or a hang, naming the input.
fn fuzz(name: &'static str, seeds: Vec<Vec<u8>>, target: fn(&[u8])) {
    let total = inputs();
    let (progress, watch) = mpsc::channel::<Vec<u8>>();
    let worker = std::thread::spawn(move || {
        let mut rng = SplitMix64::new(0x00f0_2250 ^ name.len() as u64);
        for seed in &seeds {
            let _ = progress.send(seed.clone());
            target(seed);
        }
        for _ in 0..total {
            let input = mutate(&seeds, &mut rng);
            let _ = progress.send(input.clone());
            target(&input);
        }
    });
    let mut last = Vec::new();
    let mut ran = 0u64;
    loop {
        match watch.recv_timeout(HANG) {
            Ok(input) => {
                last = input;
                ran += 1;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "{name}: no progress for {HANG:?} on input {:?}",
                    String::from_utf8_lossy(&last)
                )
            }
        }
    }
    if worker.join().is_err() {
        panic!(
            "{name}: panicked on input {:?} ({last:?})",
            String::from_utf8_lossy(&last)
        );
    }
    println!("{name}: {ran} inputs, no panic, no hang");
}

fn json_seeds(values: &[serde_json::Value]) -> Vec<Vec<u8>> {
    values.iter().map(|v| v.to_string().into_bytes()).collect()
}

#[test]
fn json_bodies() {
    use serde_json::json;
    let seeds = json_seeds(&[
        json!({"user_id": "u1", "n": 5, "context": {"device": "mobile", "hour": 9, "country": "DE", "page": "home", "attributes": {"ab": "b"}}, "recent_items": ["sku-1"], "exclude": ["sku-2"], "segment": "vip"}),
        json!([{"event_id": "e1", "user_id": "u1", "item_id": "sku-1", "type": "purchase", "request_id": "r1", "value": 12.5, "timestamp": 1_700_000_000_000_i64}]),
        json!([{"item_id": "sku-9", "title": "Lamp", "category": "home", "price": 10.0, "tags": ["a"], "available": false, "popularity": 3.0}]),
        json!({"policy": {"kind": "thompson", "alpha": 1.0, "beta": 2.0, "draws": 10, "personal": 0.5}, "segments": {"vip": {"kind": "epsilon_greedy", "epsilon": 0.1, "epsilon_min": 0.01, "decay_impressions": 100.0}}, "bootstrap": 10, "confidence": 0.9, "seed": 1}),
    ]);
    fuzz("json bodies", seeds, |bytes| {
        if let Ok(r) = parse_json::<RecommendRequest>(bytes) {
            let _ = r.validate(100);
        }
        if let Ok(events) = parse_json::<Vec<Event>>(bytes) {
            for e in &events {
                let _ = e.validate();
            }
        }
        if let Ok(items) = parse_json::<Vec<Item>>(bytes) {
            for i in &items {
                let _ = i.validate();
            }
        }
        if let Ok(ope) = parse_json::<OpeRequest>(bytes) {
            let target = onrec_eval::TargetPolicy {
                policy: ope.policy,
                segments: ope.segments,
            };
            let _ = target.validate();
        }
    });
}

#[test]
fn protobuf_messages() {
    let seeds: Vec<Vec<u8>> = vec![
        pb::RecommendRequest {
            user_id: "u1".into(),
            n: 5,
            context: Some(pb::Context {
                device: "mobile".into(),
                hour: Some(9),
                ..Default::default()
            }),
            recent_items: vec!["sku-1".into()],
            ..Default::default()
        }
        .encode_to_vec(),
        pb::Event {
            event_id: "e1".into(),
            user_id: "u1".into(),
            item_id: "sku-1".into(),
            r#type: pb::EventType::Purchase.into(),
            value: Some(3.5),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::Item {
            item_id: "sku-9".into(),
            title: "Lamp".into(),
            tags: vec!["a".into()],
            ..Default::default()
        }
        .encode_to_vec(),
        pb::EvaluatePolicyRequest {
            policy: Some(pb::PolicyConfig {
                kind: Some(pb::policy_config::Kind::Thompson(pb::ThompsonPolicy {
                    alpha: Some(1.0),
                    draws: Some(10),
                    ..Default::default()
                })),
            }),
            bootstrap: Some(10),
            ..Default::default()
        }
        .encode_to_vec(),
    ];
    fuzz("protobuf messages", seeds, |bytes| {
        if let Ok(r) = pb::RecommendRequest::decode(bytes) {
            let _ = grpc::recommend_request_from(r).validate(100);
        }
        if let Ok(e) = pb::Event::decode(bytes)
            && let Ok(e) = grpc::event_from(e)
        {
            let _ = e.validate();
        }
        if let Ok(i) = pb::Item::decode(bytes) {
            let _ = grpc::item_from(i).validate();
        }
        if let Ok(r) = pb::EvaluatePolicyRequest::decode(bytes) {
            let _ = grpc::policy_from("policy", r.policy);
        }
    });
}

/// A directory of this process's own for files the targets read.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("onrec-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn config_files() {
    let seeds = vec![
        b"policy = \"ucb1\"\nucb_c = 0.5\nmax_n = 50\nhalf_life = \"1h\"\nredis_timeout = \"20ms\"\nwrite_api_keys = [\"k\"]\n\n[segments]\n[[segments.rules]]\nname = \"night\"\nhours = [22, 5]\ndevice = [\"mobile\", \"tablet\"]\n\n[segments.policies.night]\nkind = \"epsilon_greedy\"\nepsilon = 0.2\n".to_vec(),
        b"http_addr = \"127.0.0.1:8080\"\nrole = \"serve\"\ncandidates = 100\nencoder_online = false\n".to_vec(),
    ];
    fuzz("config files", seeds, |bytes| {
        let path = scratch("config").join("onrec.toml");
        std::fs::write(&path, bytes).unwrap();
        let command = <Config as clap::Args>::augment_args(clap::Command::new("onrec"));
        if let Ok(matches) =
            command.try_get_matches_from(["onrec", "--config", &path.display().to_string()])
        {
            let _ = Config::from_matches(&matches);
        }
    });
}

#[test]
fn catalog_lines() {
    let seeds = vec![
        b"{\"item_id\": \"sku-1\", \"title\": \"Runner\", \"category\": \"shoes\", \"price\": 59.0, \"tags\": [\"sale\"]}\n{\"item_id\": \"sku-2\", \"category\": \"home\", \"available\": false, \"popularity\": 4}\n\n".to_vec(),
    ];
    fuzz("catalog lines", seeds, |bytes| {
        let path = scratch("catalog").join("catalog.jsonl");
        std::fs::write(&path, bytes).unwrap();
        let _ = onrec_engine::catalog::Catalog::read_jsonl(&path);
    });
}
