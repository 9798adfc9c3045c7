//! Several `onrec` processes on one Redis behave as one service behind a round-robin
//! balancer: feedback reaching any of them is credited to the response it follows, an
//! event id counts once whichever process gets it, and users and catalog changes are
//! the same everywhere.

use serde_json::{Value, json};

use crate::common::{
    RedisCluster, RedisServer, Server, click, eventually, item_ids, metric, segment,
};

/// The shared state's key prefix on one Redis server.
const STATE: &str = "onrec:state";

/// Whether the response `request_id` is in the shared state under `prefix` yet (it is
/// written just after the response goes out).
async fn response_shared(
    redis: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    request_id: &str,
) -> bool {
    redis::cmd("EXISTS")
        .arg(format!("{prefix}:imp:{request_id}"))
        .query_async::<bool>(redis)
        .await
        .unwrap()
}

/// The decision log's records in Redis, parsed.
async fn logged(redis: &mut redis::aio::MultiplexedConnection) -> Vec<Value> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("onrec:decisions")
        .arg("-")
        .arg("+")
        .query_async(redis)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .filter_map(|e| e.get::<String>("record"))
        .map(|r| serde_json::from_str(&r).unwrap())
        .collect()
}

async fn events(s: &Server, events: Value) -> Value {
    let (status, body) = s.post("/v1/events", events).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn three_processes_on_one_redis_share_attribution_dedupe_users_and_the_catalog() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--decision-log", "redis"];
    let (a, b, c) = (
        Server::start(&args),
        Server::start(&args),
        Server::start(&args),
    );
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // A serves; the click reaches B and is credited to A's segment and slot.
    let (status, served) = a
        .post(
            "/v1/recommend",
            json!({"user_id": "u1", "n": 5, "segment": "vip"}),
        )
        .await;
    assert_eq!(status, 200, "{served}");
    let request_id = served["request_id"].as_str().unwrap().to_owned();
    let shown = item_ids(&served);
    eventually("A's response is in the shared state", async || {
        response_shared(&mut conn, STATE, &request_id).await
    })
    .await;
    let mut ev = click("rep-click-1", "u1", &shown[2]);
    ev["request_id"] = json!(request_id);
    let summary = events(&b, json!([ev])).await;
    assert_eq!(summary["accepted"], 1, "{summary}");
    eventually(
        "the reward is in the vip segment's statistics",
        async || segment(&c, "vip").await["reward"] == 1.0,
    )
    .await;
    let vip = segment(&c, "vip").await;
    assert_eq!(vip["impressions"], 5.0, "{vip}");
    // Every process's online encoder learns the click in the context and slate A served.
    let accepted: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("onrec:state:events")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let learned: Vec<Value> = accepted
        .ids
        .iter()
        .filter(|e| e.get::<String>("u").as_deref() == Some("u1"))
        .filter_map(|e| e.get::<String>("x"))
        .map(|x| serde_json::from_str(&x).unwrap())
        .collect();
    assert_eq!(learned.len(), 1, "{learned:?}");
    assert_eq!(learned[0]["slate"], json!(shown), "{learned:?}");
    eventually("B logged the reward under A's response", async || {
        logged(&mut conn).await.iter().any(|r| {
            r["type"] == "reward" && r["request_id"] == request_id.as_str() && r["position"] == 2
        })
    })
    .await;

    // The same event id sent to A and to C counts once.
    let summary = events(&a, json!([ev])).await;
    assert_eq!(summary["duplicates"], 1, "{summary}");
    let summary = events(&c, json!([ev])).await;
    assert_eq!(summary["duplicates"], 1, "{summary}");
    let other = click("rep-click-2", "u1", &shown[0]);
    for s in [&a, &c] {
        let summary = events(s, json!([other])).await;
        assert_eq!(
            summary["accepted"].as_u64().unwrap() + summary["duplicates"].as_u64().unwrap(),
            1
        );
    }

    // A dislike taken by A hides the item on B and C at once; the click taken by B is in
    // the user's history everywhere.
    let top = b.recommend("u1", 10).await;
    let dislike =
        json!({"event_id": "rep-dislike", "user_id": "u1", "item_id": top[0], "type": "dislike"});
    events(&a, json!([dislike])).await;
    for s in [&b, &c] {
        assert!(!s.recommend("u1", 10).await.contains(&top[0]));
    }

    // An item hidden through A stops being served by B and C; one added through A is
    // served by them.
    let hidden = c.recommend("u2", 1).await[0].clone();
    let (status, body) = a
        .put(
            "/v1/items",
            json!([
                {"item_id": hidden, "available": false},
                {"item_id": "rep-new", "title": "New", "category": "new", "popularity": 1e9}
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for s in [&b, &c] {
        eventually("the catalog change reached every process", async || {
            let top = s.recommend("u2", 3).await;
            !top.contains(&hidden) && top.first().map(String::as_str) == Some("rep-new")
        })
        .await;
    }
}

#[tokio::test]
async fn events_that_redis_cannot_take_answer_503_and_count_once_when_re_sent() {
    let mut redis = RedisServer::start();
    let s = Server::start(&["--redis-url", &redis.url()]);
    let item = s.recommend("u", 1).await[0].clone();
    let batch = json!([click("away-1", "u", &item), click("away-2", "u", &item)]);
    redis.kill();
    let r = s
        .client
        .post(s.url("/v1/events"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("event [0]"),
        "{body}"
    );
    redis.restart();
    eventually("the batch is accepted once Redis is back", async || {
        s.post("/v1/events", batch.clone()).await.0 == 200
    })
    .await;
    let summary = events(&s, batch).await;
    assert_eq!(summary["duplicates"], 2, "{summary}");
    eventually("both clicks count, once", async || {
        // The first read after Redis came back may find the connection still broken.
        let r = s
            .client
            .get(s.url("/v1/segments/default"))
            .send()
            .await
            .unwrap();
        r.status() == 200 && r.json::<Value>().await.unwrap()["reward"] == 2.0
    })
    .await;
}

/// Entries of the statistics stream: (not yet applied, delivered to a learner and not
/// acknowledged).
async fn stats_backlog(redis: &mut redis::aio::MultiplexedConnection) -> (u64, u64) {
    let len: u64 = redis::cmd("XLEN")
        .arg(format!("{STATE}:stats"))
        .query_async(redis)
        .await
        .unwrap();
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(format!("{STATE}:stats"))
        .arg("learners")
        .query_async(redis)
        .await
        .unwrap();
    let pending = match pending {
        redis::Value::Array(v) => match v.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    };
    (len, pending)
}

/// One round of traffic through three replicas sharing the state under `prefix`: a
/// response from replica `i % 3`; every third one is clicked through the next replica
/// and the click re-sent through the one after (a duplicate). Returns whether it was
/// clicked.
async fn round(
    replicas: &[Server; 3],
    (redis, prefix): (&mut impl redis::aio::ConnectionLike, &str),
    i: usize,
) -> bool {
    let user = format!("rr-{}", i % 7);
    let (status, served) = replicas[i % 3]
        .post(
            "/v1/recommend",
            json!({"user_id": user, "n": 5, "segment": "rr"}),
        )
        .await;
    assert_eq!(status, 200, "{served}");
    if !i.is_multiple_of(3) {
        return false;
    }
    let request_id = served["request_id"].as_str().unwrap().to_owned();
    eventually("the response is in the shared state", async || {
        response_shared(redis, prefix, &request_id).await
    })
    .await;
    let mut ev = click(&format!("rr-click-{i}"), &user, &item_ids(&served)[1]);
    ev["request_id"] = json!(request_id);
    let summary = events(&replicas[(i + 1) % 3], json!([ev])).await;
    assert_eq!(summary["accepted"], 1, "{summary}");
    let summary = events(&replicas[(i + 2) % 3], json!([ev])).await;
    assert_eq!(summary["duplicates"], 1, "{summary}");
    true
}

#[tokio::test]
async fn serve_replicas_and_a_learner_killed_mid_stream_count_exactly() {
    let redis = RedisServer::start();
    let url = redis.url();
    let serve = ["--redis-url", url.as_str(), "--role", "serve"];
    let replicas = [
        Server::start(&serve),
        Server::start(&serve),
        Server::start(&serve),
    ];
    let first = Server::start_learner(&["--redis-url", &url]);
    first.logged("took the learner lease").await;
    let standby = Server::start_learner(&["--redis-url", &url]);
    standby.logged("standby").await;
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    let (mut rounds, mut clicks) = (0, 0);
    for _ in 0..20 {
        clicks += u32::from(round(&replicas, (&mut conn, STATE), rounds).await);
        rounds += 1;
    }
    // The active learner is stopped while its read is outstanding: Redis hands that read
    // the next entries, which it never acknowledges. (Stopped between two reads, it is
    // handed nothing; then it goes on and is stopped again.)
    loop {
        eventually("the learner has applied everything", async || {
            stats_backlog(&mut conn).await == (0, 0)
        })
        .await;
        first.signal("STOP");
        clicks += u32::from(round(&replicas, (&mut conn, STATE), rounds).await);
        rounds += 1;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        if stats_backlog(&mut conn).await.1 > 0 {
            break;
        }
        first.signal("CONT");
    }
    for _ in 0..20 {
        clicks += u32::from(round(&replicas, (&mut conn, STATE), rounds).await);
        rounds += 1;
    }
    // Killed holding entries it never acknowledged; the standby takes the lease over
    // and applies those too.
    first.sigkill();
    for _ in 0..20 {
        clicks += u32::from(round(&replicas, (&mut conn, STATE), rounds).await);
        rounds += 1;
    }
    standby.logged("took the learner lease").await;
    let impressions = 5.0 * rounds as f64;
    eventually("every impression and click is counted", async || {
        let seg = segment(&replicas[0], "rr").await;
        seg["impressions"] == impressions && seg["reward"] == f64::from(clicks)
    })
    .await;
    // Nothing more arrives later: the counts stay exact.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let seg = segment(&replicas[1], "rr").await;
    assert_eq!(
        (seg["impressions"].clone(), seg["reward"].clone()),
        (json!(impressions), json!(f64::from(clicks)))
    );
}

#[tokio::test]
async fn the_serve_and_learn_roles_need_redis() {
    for role in ["serve", "learn"] {
        let err = Server::try_start(&["--role", role]).err().unwrap();
        assert!(err.contains("needs redis_url"), "{err}");
    }
}

#[tokio::test]
async fn serve_replicas_rank_with_the_encoder_the_learner_publishes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let online = [
        "--redis-url",
        url.as_str(),
        "--encoder-online",
        "true",
        "--demo-encoder",
        "false",
    ];
    let serve: Vec<&str> = online.iter().copied().chain(["--role", "serve"]).collect();
    let replicas = [
        Server::start(&serve),
        Server::start(&serve),
        Server::start(&serve),
    ];
    let learner = Server::start_learner(&online);
    learner.logged("took the learner lease").await;
    let (_, before) = replicas[0]
        .post("/v1/recommend", json!({"user_id": "w0", "n": 5}))
        .await;
    assert_eq!(before["ranker"], "popularity", "{before}");

    // Users click through the replicas; only the learner trains on what they do.
    for u in 0..30 {
        let user = format!("w{u}");
        let (status, served) = replicas[u % 3]
            .post("/v1/recommend", json!({"user_id": user, "n": 5}))
            .await;
        assert_eq!(status, 200, "{served}");
        let items = item_ids(&served);
        let clicks: Vec<Value> = (0..4)
            .map(|k| {
                let mut ev = click(&format!("{user}-{k}"), &user, &items[k]);
                ev["request_id"] = served["request_id"].clone();
                ev
            })
            .collect();
        events(&replicas[(u + 1) % 3], Value::Array(clicks)).await;
    }

    // Every replica ranks with the learner's encoder, at the same version, within seconds.
    let version = |body: &Value| {
        body["model_version"]
            .as_str()
            .and_then(|v| v.split("-c").next())
            .unwrap_or_default()
            .to_owned()
    };
    eventually(
        "all replicas serve the learner's latest encoder",
        async || {
            let mut versions = Vec::new();
            for s in replicas.iter().chain([&learner]) {
                let (_, body) = s
                    .post("/v1/recommend", json!({"user_id": "w0", "n": 5}))
                    .await;
                if body["ranker"] != "transformer" {
                    return false;
                }
                versions.push(version(&body));
            }
            versions
                .iter()
                .all(|v| v.starts_with("sasrec-online-") && *v == versions[0])
        },
    )
    .await;
    for s in &replicas {
        s.logged("published encoder loaded").await;
    }
}

/// The Q-network version a response was re-scored with (`…+q{version}`), if any.
fn q_version(body: &Value) -> Option<u64> {
    body["model_version"]
        .as_str()?
        .rsplit_once("+q")?
        .1
        .parse()
        .ok()
}

#[tokio::test]
async fn serve_replicas_send_feedback_to_the_learners_q_network_and_serve_its_weights() {
    let redis = RedisServer::start();
    let url = redis.url();
    // Live from the first publication, so responses name the version they were
    // re-scored with.
    let common = [
        "--redis-url",
        url.as_str(),
        "--learner",
        "live",
        "--q-min-updates",
        "0",
    ];
    let serve: Vec<&str> = common.iter().copied().chain(["--role", "serve"]).collect();
    let replicas = [
        Server::start(&serve),
        Server::start(&serve),
        Server::start(&serve),
    ];
    let learner = Server::start_learner(&common);
    learner.logged("took the learner lease").await;
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // Each response gets a click through another replica and one through its own.
    let rounds = 30;
    for u in 0..rounds {
        let user = format!("q{u}");
        let (status, served) = replicas[u % 3]
            .post("/v1/recommend", json!({"user_id": user, "n": 5}))
            .await;
        assert_eq!(status, 200, "{served}");
        let request_id = served["request_id"].as_str().unwrap().to_owned();
        eventually("the response is in the shared state", async || {
            response_shared(&mut conn, STATE, &request_id).await
        })
        .await;
        let items = item_ids(&served);
        for (k, replica) in [(0, (u + 1) % 3), (1, u % 3)] {
            let mut ev = click(&format!("{user}-{k}"), &user, &items[k]);
            ev["request_id"] = json!(request_id);
            let summary = events(&replicas[replica], json!([ev])).await;
            assert_eq!(summary["accepted"], 1, "{summary}");
        }
    }

    // Every click reaches the learner once, whichever replica took it.
    eventually("the learner trained on every click", async || {
        let (_, page) = learner.get_text("/metrics").await;
        metric(&page, "onrec_learner_feedback_total") == 2.0 * rounds as f64
    })
    .await;
    let (_, page) = learner.get_text("/metrics").await;
    assert!(
        metric(&page, "onrec_learn_transitions_total") >= 2.0 * rounds as f64,
        "{page}"
    );
    for s in &replicas {
        let (_, page) = s.get_text("/metrics").await;
        assert_eq!(
            metric(&page, "onrec_learn_transitions_total"),
            0.0,
            "a serve replica trains nothing itself"
        );
    }

    // All replicas re-score with the learner's latest weights, a version it trained.
    eventually(
        "all replicas serve the learner's latest Q-network",
        async || {
            let published: Option<u64> = redis::cmd("HGET")
                .arg(format!("{STATE}:qnet"))
                .arg("version")
                .query_async(&mut conn)
                .await
                .unwrap();
            let Some(published) = published.filter(|&v| v > 0) else {
                return false;
            };
            let mut all = true;
            for s in &replicas {
                let (_, body) = s
                    .post("/v1/recommend", json!({"user_id": "q0", "n": 5}))
                    .await;
                all &= q_version(&body) == Some(published);
            }
            all
        },
    )
    .await;
    for s in &replicas {
        s.logged("published Q-network loaded").await;
    }
}

#[tokio::test]
async fn redis_over_tls_with_a_private_ca() {
    let redis = RedisServer::start_tls();
    let url = redis.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let s = Server::start(&["--redis-url", &url, "--redis-ca-file", &redis.ca_file()]);
    let (status, served) = s
        .post(
            "/v1/recommend",
            json!({"user_id": "t1", "n": 4, "segment": "tls"}),
        )
        .await;
    assert_eq!(status, 200, "{served}");
    let mut ev = click("tls-1", "t1", &item_ids(&served)[0]);
    ev["request_id"] = served["request_id"].clone();
    let summary = events(&s, json!([ev])).await;
    assert_eq!(summary["accepted"], 1, "{summary}");
    eventually("the statistics reach Redis over TLS", async || {
        let seg = segment(&s, "tls").await;
        seg["impressions"] == 4.0 && seg["reward"] == 1.0
    })
    .await;

    // Without the CA the server's certificate is not trusted: nothing reaches Redis.
    let untrusting = Server::start(&["--redis-url", &url]);
    let r = untrusting
        .client
        .post(untrusting.url("/v1/events"))
        .json(&json!([click("tls-2", "t1", &item_ids(&served)[1])]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let (status, _) = untrusting.get_text("/readyz").await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn through_sentinel_the_service_follows_a_failover_and_counts_once() {
    let master = RedisServer::start();
    let replica = RedisServer::start_replica_of(&master);
    let sentinel = RedisServer::start_sentinel(&master);
    let url = format!("redis+sentinel://127.0.0.1:{}/shop/0", sentinel.port);
    let s = Server::start(&["--redis-url", &url]);
    let (status, served) = s
        .post(
            "/v1/recommend",
            json!({"user_id": "f1", "n": 3, "segment": "ha"}),
        )
        .await;
    assert_eq!(status, 200, "{served}");
    let mut before = click("ha-1", "f1", &item_ids(&served)[0]);
    before["request_id"] = served["request_id"].clone();
    assert_eq!(events(&s, json!([before])).await["accepted"], 1);
    eventually("the statistics reach the master", async || {
        let seg = segment(&s, "ha").await;
        seg["impressions"] == 3.0 && seg["reward"] == 1.0
    })
    .await;

    // The replica has everything and the Sentinel knows it; then it is promoted, and the
    // old master becomes its replica.
    eventually("the Sentinel sees the synced replica", async || {
        let replicas: Vec<redis::Value> = sentinel.cmd(&["SENTINEL", "replicas", "shop"]);
        let synced: i64 = master.cmd(&["WAIT", "1", "100"]);
        !replicas.is_empty() && synced == 1
    })
    .await;
    let _: String = sentinel.cmd(&["SENTINEL", "FAILOVER", "shop"]);
    // The Sentinel kills the old master's clients as it reconfigures it, so a poll of
    // its role may fail.
    eventually("the old master is demoted", async || {
        let role = master.try_cmd::<Vec<redis::Value>>(&["ROLE"]);
        let named: Vec<String> = sentinel.cmd(&["SENTINEL", "get-master-addr-by-name", "shop"]);
        matches!(role.as_deref(), Ok([redis::Value::BulkString(r), ..]) if r == b"slave")
            && named[1] == replica.port.to_string()
    })
    .await;

    // Events may be refused (503) while the service finds the new master; re-sent, each
    // counts once, and the one from before the failover is still known.
    let after = click("ha-2", "f1", &item_ids(&served)[1]);
    eventually("an event reaches the new master", async || {
        s.post("/v1/events", json!([after.clone()])).await.0 == 200
    })
    .await;
    let (_, again) = s.post("/v1/events", json!([before, after])).await;
    assert_eq!(again["duplicates"], 2, "{again}");
    eventually(
        "both rewards are counted once, on the new master",
        async || {
            let seg = segment(&s, "ha").await;
            seg["reward"] == 2.0 && seg["impressions"] == 3.0
        },
    )
    .await;
    let (status, _) = s
        .post(
            "/v1/recommend",
            json!({"user_id": "f2", "n": 3, "segment": "ha"}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn on_a_redis_cluster_replicas_and_a_learner_count_exactly() {
    let cluster = RedisCluster::start();
    // Two of the three nodes: the third is learned from them.
    let url = cluster.url(2);
    let serve = [
        "--redis-url",
        url.as_str(),
        "--role",
        "serve",
        "--decision-log",
        "redis",
    ];
    let replicas = [
        Server::start(&serve),
        Server::start(&serve),
        Server::start(&serve),
    ];
    let learner = Server::start_learner(&["--redis-url", &url]);
    learner.logged("took the learner lease").await;
    let mut conn = cluster.connection().await;
    // On a cluster the shared state's prefix is a hash tag: all of its keys in one slot.
    let prefix = "{onrec:state}";
    let mut clicks = 0;
    let rounds = 30;
    for i in 0..rounds {
        clicks += u32::from(round(&replicas, (&mut conn, prefix), i).await);
    }
    let impressions = 5.0 * rounds as f64;
    eventually("every impression and click is counted once", async || {
        let seg = segment(&replicas[2], "rr").await;
        seg["impressions"] == impressions && seg["reward"] == f64::from(clicks)
    })
    .await;
    let total: bool = redis::cmd("EXISTS")
        .arg("{onrec:bandit}:rr:total")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(total, "the statistics live under the hash-tagged prefix");
    let logged: u64 = redis::cmd("XLEN")
        .arg("onrec:decisions")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(logged >= rounds as u64, "{logged} decision log records");
    // A catalog change made on one replica reaches the others.
    let (status, body) = replicas[0]
        .put(
            "/v1/items",
            json!([{"item_id": "cluster-new", "category": "c0"}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut attempt = 0;
    eventually("the new item is known on another replica", async || {
        attempt += 1;
        let event = json!([{"event_id": format!("cl-{attempt}"), "user_id": "cl", "item_id": "cluster-new", "type": "click"}]);
        events(&replicas[1], event).await["accepted"] == 1
    })
    .await;
}
