//! Training with `onrec train`, evaluating with `onrec eval`, and serving the checkpoint.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Server, eventually};

fn onrec(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_onrec"))
        .args(args)
        .output()
        .expect("running onrec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `onrec train` on the CSV `data` into `out`, with `extra` settings.
fn train(data: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "train",
        "--interactions",
        data,
        "--format",
        "csv",
        "--out",
        out,
    ];
    onrec(&[&args[..], extra].concat())
}

/// `onrec eval` of `ckpt` on the CSV `data`, with `extra` settings.
fn eval(ckpt: &Path, data: &Path, extra: &[&str]) -> (bool, String) {
    let (ckpt, data) = (ckpt.to_str().unwrap(), data.to_str().unwrap());
    let args = [
        "eval",
        "--checkpoint",
        ckpt,
        "--interactions",
        data,
        "--format",
        "csv",
    ];
    onrec(&[&args[..], extra].concat())
}

/// Synthetic sessions over the first `items` demo-catalog items, as CSV.
fn write_sessions(path: &Path, items: usize) {
    let catalog = onrec_engine::catalog::demo_catalog(items);
    let pairs: Vec<(String, String)> = catalog
        .iter()
        .map(|i| (i.item_id.clone(), i.category.clone()))
        .collect();
    let mut csv = String::from("user,item,timestamp\n");
    for it in onrec_model::synth::sessions(&pairs, 400, 25, 3) {
        csv.push_str(&format!("{},{},{}\n", it.user, it.item, it.timestamp));
    }
    std::fs::write(path, csv).unwrap();
}

#[tokio::test]
async fn train_eval_and_serve_a_checkpoint() {
    let dir = std::env::temp_dir().join(format!("onrec-model-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("sessions.csv");
    write_sessions(&data, 120);
    let ckpt = dir.join("ckpt");
    let (ok, out) = train(
        &data,
        &ckpt,
        &[
            "--epochs",
            "8",
            "--patience",
            "3",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--max-len",
            "20",
            "--lr",
            "0.003",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("history excluded  encoder"), "{out}");
    for file in [
        "model.safetensors",
        "config.json",
        "items.json",
        "training.json",
    ] {
        assert!(ckpt.join(file).exists(), "{file} missing");
    }
    let (ok, out) = eval(&ckpt, &data, &[]);
    assert!(ok, "{out}");
    // The sessions follow category rings that popularity cannot see.
    let ndcg = |label: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("{label} missing in {out}"));
        line.split_whitespace()
            .rev()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        ndcg("history excluded  encoder") > 2.0 * ndcg("                  popularity"),
        "{out}"
    );
    // Each metric comes with a bootstrap interval over the users that holds its mean.
    let interval_row = out
        .lines()
        .filter(|l| l.starts_with("history excluded  encoder"))
        .nth(1)
        .unwrap_or_else(|| panic!("no interval row in {out}"));
    let bounds: Vec<f64> = interval_row
        .split(['[', ']', ','])
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    assert_eq!(bounds.len(), 10, "{interval_row}");
    let mean = ndcg("history excluded  encoder");
    assert!(bounds[4] < mean && mean < bounds[5], "{out}");
    // A checkpoint compared with itself, paired on the same users: no difference.
    let (ok, out) = eval(&ckpt, &data, &["--compare", ckpt.to_str().unwrap()]);
    assert!(ok, "{out}");
    let paired = out
        .split("compared − encoder, paired on the same")
        .nth(1)
        .unwrap_or_else(|| panic!("no paired comparison in {out}"));
    assert_eq!(paired.matches("[+0.0000, +0.0000]").count(), 10, "{out}");
    assert_eq!(paired.matches("+0.0000").count(), 30, "{out}");
    // Checkpoints of different catalogs cannot be paired.
    let other_data = dir.join("other.csv");
    write_sessions(&other_data, 60);
    let other = dir.join("other");
    let (ok, out) = train(
        &other_data,
        &other,
        &["--epochs", "1", "--hidden", "16", "--layers", "1"],
    );
    assert!(ok, "{out}");
    let (ok, out) = eval(&ckpt, &data, &["--compare", other.to_str().unwrap()]);
    assert!(!ok && out.contains("know different items"), "{out}");

    let s = Server::start(&[
        "--model",
        ckpt.to_str().unwrap(),
        "--demo-items",
        "150",
        "--encoder-online",
        "true",
    ]);
    let (status, body) = s
        .post("/v1/recommend", json!({"user_id": "new", "n": 5}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["ranker"], "popularity", "{body}");
    assert_eq!(
        body["fallback"],
        "the user has no history the encoder knows"
    );
    let (_, body) = s.post("/v1/recommend", json!({"user_id": "u", "n": 5, "recent_items": ["sku-00003", "sku-00007"], "context": {"hour": 9}})).await;
    assert_eq!(body["ranker"], "transformer", "{body}");
    assert!(body.get("fallback").is_none(), "{body}");
    assert!(
        body["model_version"]
            .as_str()
            .unwrap()
            .starts_with("sasrec-"),
        "{body}"
    );
    let ids: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    // The checkpoint is where the online encoder starts: it publishes it at once, with
    // the items the checkpoint never saw (120..150) placed by their category, so they
    // rank too.
    let version = |body: &Value| body["model_version"].as_str().unwrap_or("").to_owned();
    let mut online = String::new();
    eventually(
        "the online encoder serves the checkpoint, new items included",
        async || {
            let (_, body) = s
                .post(
                    "/v1/recommend",
                    json!({"user_id": "u", "n": 5, "recent_items": ["sku-00140"]}),
                )
                .await;
            online = version(&body);
            body["ranker"] == "transformer" && online.starts_with("sasrec-online-")
        },
    )
    .await;
    // History recorded from events feeds the encoder, and it goes on learning from them.
    let events: Vec<Value> = (0..40)
        .map(|i| json!({"event_id": format!("m{i}"), "user_id": format!("shopper-{}", i % 8), "item_id": format!("sku-{:05}", 3 * i + 1), "type": "click"}))
        .collect();
    let (_, summary) = s.post("/v1/events", json!(events)).await;
    assert_eq!(summary["accepted"], 40, "{summary}");
    let (_, body) = s
        .post("/v1/recommend", json!({"user_id": "shopper-1", "n": 3}))
        .await;
    assert_eq!(body["ranker"], "transformer", "{body}");
    eventually(
        "the encoder trains on the events and publishes",
        async || {
            let (_, body) = s
                .post("/v1/recommend", json!({"user_id": "shopper-1", "n": 3}))
                .await;
            body["ranker"] == "transformer" && version(&body) != online
        },
    )
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn bad_training_input_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("onrec-model-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("bad.csv");
    std::fs::write(&data, "u1,i1,1\nu1,i2\n").unwrap();
    let (ok, out) = train(&data, &dir.join("x"), &[]);
    assert!(!ok);
    assert!(
        out.contains("line 2") && out.contains("expected 3 comma-separated fields"),
        "{out}"
    );
    let err = Server::try_start(&["--model", dir.join("missing").to_str().unwrap()])
        .err()
        .expect("must not start");
    assert!(err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_demo_sessions_train_the_online_encoder_which_takes_over() {
    let s = Server::start(&["--demo-encoder", "true", "--demo-items", "300"]);
    let (_, body) = s
        .post(
            "/v1/events",
            json!([{"event_id": "d1", "user_id": "demo", "item_id": "sku-00001", "type": "click"}]),
        )
        .await;
    assert_eq!(body["accepted"], 1);
    // A guard against hanging, not a speed requirement.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let (_, body) = s
            .post("/v1/recommend", json!({"user_id": "demo", "n": 5}))
            .await;
        if body["ranker"] == "transformer" {
            let version = body["model_version"].as_str().unwrap();
            assert!(version.starts_with("sasrec-online-"), "{body}");
            return;
        }
        assert_eq!(
            body["fallback"], "the encoder has not learned from any event yet",
            "{body}"
        );
        last = body;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the online encoder never took over; last answer {last}");
}

/// Four kinds of goods, each told by its own words.
const KINDS: [(&str, [&str; 5]); 4] = [
    (
        "knife",
        [
            "chef knife",
            "paring knife",
            "bread knife",
            "santoku knife",
            "carving knife",
        ],
    ),
    (
        "novel",
        [
            "mystery novel",
            "romance novel",
            "fantasy novel",
            "crime novel",
            "historical novel",
        ],
    ),
    (
        "garden",
        [
            "garden hose",
            "pruning shears",
            "lawn rake",
            "flower pots",
            "garden trowel",
        ],
    ),
    (
        "running",
        [
            "running shoes",
            "trail running shoes",
            "running socks",
            "running jacket",
            "running shorts",
        ],
    ),
];
const FINISHES: [&str; 4] = ["classic", "premium", "compact", "deluxe"];

/// A catalog of the four kinds, all in one category so that only text tells them apart,
/// and sessions in which every user keeps to one kind, as CSV.
fn write_kinds(catalog: &Path, sessions: &Path) {
    let mut lines = String::new();
    let mut of_kind: Vec<Vec<String>> = vec![Vec::new(); KINDS.len()];
    for (k, (_, nouns)) in KINDS.iter().enumerate() {
        for (n, noun) in nouns.iter().enumerate() {
            for (f, finish) in FINISHES.iter().enumerate() {
                let id = format!("sku-{k}{n}{f}");
                lines.push_str(&format!(
                    "{}\n",
                    json!({"item_id": id, "title": format!("{finish} {noun}"), "category": "shop"})
                ));
                of_kind[k].push(id);
            }
        }
    }
    std::fs::write(catalog, lines).unwrap();
    let mut csv = String::from("user,item,timestamp\n");
    let mut rng = onrec_model::rng::SplitMix64::new(11);
    for u in 0..400 {
        let items = &of_kind[u % KINDS.len()];
        for t in 0..12 {
            let item = &items[rng.below(items.len() as u64) as usize];
            csv.push_str(&format!("u{u},{item},{}\n", 1_700_000_000 + u * 100 + t));
        }
    }
    std::fs::write(sessions, csv).unwrap();
}

/// Where `item` ranks for a user whose recent items are `history`: its position in a
/// slate of 60 (of 81 items), or 60 when it is not in it.
async fn position(s: &Server, item: &str, history: &[&str]) -> usize {
    let (status, body) = s
        .post(
            "/v1/recommend",
            json!({"user_id": "asker", "n": 60, "recent_items": history}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ranker"], "transformer", "{body}");
    crate::common::item_ids(&body)
        .iter()
        .position(|i| i == item)
        .unwrap_or(60)
}

/// Needs the sentence encoder `scripts/fetch-datasets.sh` extracts; `ONREC_TEST_TEXT_MODEL`
/// names its directory.
#[tokio::test]
async fn an_item_added_with_only_text_ranks_for_users_of_similar_items() {
    let Some(text_model) = std::env::var_os("ONREC_TEST_TEXT_MODEL") else {
        eprintln!("ONREC_TEST_TEXT_MODEL is unset; skipping the item text test");
        return;
    };
    let text_model = text_model.to_str().unwrap().to_owned();
    let dir = std::env::temp_dir().join(format!("onrec-text-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (catalog, sessions, ckpt) = (
        dir.join("catalog.jsonl"),
        dir.join("sessions.csv"),
        dir.join("ckpt"),
    );
    write_kinds(&catalog, &sessions);
    let (ok, out) = train(
        &sessions,
        &ckpt,
        &[
            "--text-model",
            &text_model,
            "--item-text",
            catalog.to_str().unwrap(),
            "--epochs",
            "10",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--max-len",
            "12",
            "--lr",
            "0.003",
        ],
    );
    assert!(ok, "{out}");
    let s = Server::start(&[
        "--model",
        ckpt.to_str().unwrap(),
        "--text-model",
        &text_model,
        "--catalog",
        catalog.to_str().unwrap(),
        "--encoder-online",
        "true",
    ]);
    let knives = ["sku-000", "sku-011", "sku-022", "sku-033"];
    let novels = ["sku-100", "sku-111", "sku-122", "sku-133"];
    eventually(
        "the online encoder takes over from the checkpoint",
        async || {
            let (_, body) = s
                .post(
                    "/v1/recommend",
                    json!({"user_id": "asker", "n": 5, "recent_items": knives}),
                )
                .await;
            body["model_version"]
                .as_str()
                .is_some_and(|v| v.starts_with("sasrec-online-"))
        },
    )
    .await;
    // A knife the encoder has never seen, in no category: only its text says what it is.
    let (status, body) = s
        .put(
            "/v1/items",
            json!([{
                "item_id": "new-knife",
                "title": "forged steel kitchen knife",
                "description": "A sharp blade for slicing and chopping.\nDishwasher safe."
            }]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(
        "the new knife ranks high for knife buyers only",
        async || {
            let (for_knives, for_novels) = (
                position(&s, "new-knife", &knives).await,
                position(&s, "new-knife", &novels).await,
            );
            eprintln!("new-knife: #{for_knives} for knife buyers, #{for_novels} for readers");
            // Among the first five for those who buy knives; behind most of the 20 novels for
            // those who read.
            for_knives < 5 && for_novels >= 15
        },
    )
    .await;
    let page = s.get_text("/metrics").await.1;
    assert_eq!(
        crate::common::metric(&page, "onrec_encoder_items_placed_by_text_total"),
        1.0,
        "{page}"
    );
    // Text that breaks the rules is refused, naming the field.
    let (status, body) = s
        .put(
            "/v1/items",
            json!([{"item_id": "bad", "description": "bell\u{7}"}]),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("[0].description"), "{body}");
    std::fs::remove_dir_all(&dir).unwrap();
}
