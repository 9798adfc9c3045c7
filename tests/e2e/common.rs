//! Starts the real `onrec` binary on free ports and talks to it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use onrec_proto::v1::recommender_client::RecommenderClient;
use serde_json::Value;
use tonic::transport::Channel;

/// A running server process; killed when dropped.
pub struct Server {
    child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub client: reqwest::Client,
    log: mpsc::Receiver<String>,
    startup_log: std::sync::Mutex<Vec<String>>,
}

fn field(line: &Value, name: &str) -> Option<SocketAddr> {
    line.get(name)?.as_str()?.parse().ok()
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `onrec serve` with `args` on 127.0.0.1:0 and waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        Self::try_start(args).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    /// Starts `onrec learn` with `args` on 127.0.0.1:0 and waits until it listens.
    pub fn start_learner(args: &[&str]) -> Server {
        Self::launch("learn", args).unwrap_or_else(|e| panic!("learner did not start: {e}"))
    }

    /// Starts the server, or returns what it logged before it exited.
    pub fn try_start(args: &[&str]) -> Result<Server, String> {
        Self::launch("serve", args)
    }

    fn launch(command: &str, args: &[&str]) -> Result<Server, String> {
        // Popularity without exploration or learning unless a test asks otherwise, so
        // rankings stay fixed.
        let mut defaults: Vec<&str> = Vec::new();
        if !args.contains(&"--demo-encoder") {
            defaults.extend(["--demo-encoder", "false"]);
        }
        // The demo sessions train the online encoder: asking for them asks for it.
        if !args.contains(&"--encoder-online") && !args.contains(&"--demo-encoder") {
            defaults.extend(["--encoder-online", "false"]);
        }
        if !args.contains(&"--policy") {
            defaults.extend(["--policy", "greedy"]);
        }
        if !args.contains(&"--learner") {
            defaults.extend(["--learner", "off"]);
        }
        // Training competes for the CPU as an equal, so that a test waiting on it does not
        // wait on whatever else the machine runs. The shipped default (idle) has its own
        // test.
        for flag in ["--encoder-priority", "--q-priority"] {
            if !args.contains(&flag) {
                defaults.extend([flag, "normal"]);
            }
        }
        // ONREC_BIN runs another build (the load bench on a GPU machine, say).
        let binary =
            std::env::var("ONREC_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_onrec").to_owned());
        let mut child = Command::new(binary)
            .args([
                command,
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
            ])
            .args(["--log-format", "json", "--log-level", "info"])
            .args(&defaults)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning onrec");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Ok(json) = serde_json::from_str::<Value>(&line)
                        && json["message"] == "listening"
                        && let (Some(http), Some(grpc)) =
                            (field(&json, "http_addr"), field(&json, "grpc_addr"))
                    {
                        return Ok(Server {
                            child,
                            http,
                            grpc,
                            client: reqwest::Client::new(),
                            log: rx,
                            startup_log: std::sync::Mutex::new(seen),
                        });
                    }
                    seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        Err(format!("{status}; it logged:\n{}", seen.join("\n")))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub async fn grpc(&self) -> RecommenderClient<Channel> {
        RecommenderClient::new(self.channel().await)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .expect("valid uri")
            .connect()
            .await
            .expect("connecting over gRPC")
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, body).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, body).await
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .request(method.clone(), self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Stops the server with SIGTERM, checks that it exits 0, and starts it again with
    /// `args`.
    pub async fn restart(mut self, args: &[&str]) -> Server {
        self.terminate();
        let status = tokio::task::spawn_blocking(move || self.wait(Duration::from_secs(30)))
            .await
            .unwrap();
        assert!(status.is_some_and(|st| st.success()), "{status:?}");
        Server::start(args)
    }

    pub async fn recommend(&self, user: &str, n: u32) -> Vec<String> {
        let (status, body) = self
            .post(
                "/v1/recommend",
                serde_json::json!({"user_id": user, "n": n}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        item_ids(&body)
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.url(path)).send().await.expect("GET");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// Kills it (SIGKILL): no shutdown work at all.
    pub fn sigkill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (`STOP`, `CONT`, …).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("running kill")
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits until the process logs a line containing `text` (lines read while waiting
    /// are consumed).
    pub async fn logged(&self, text: &str) {
        let mut seen = Vec::new();
        eventually(&format!("the log says '{text}'"), async || {
            seen.extend(self.drain_log());
            seen.iter().any(|l| l.contains(text))
        })
        .await;
    }

    /// Log lines written so far that have not been read yet.
    pub fn drain_log(&self) -> Vec<String> {
        let mut lines = std::mem::take(&mut *self.startup_log.lock().expect("log lock"));
        lines.extend(self.log.try_iter());
        lines
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn item_ids(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["item_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The sum of a metric's samples over all its label sets in a Prometheus text page (0
/// when absent).
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn click(event_id: &str, user: &str, item: &str) -> Value {
    serde_json::json!({"event_id": event_id, "user_id": user, "item_id": item, "type": "click"})
}

/// A `redis-server` of the test's own on a free port; killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// Whether it logs every write to an append-only file (fsync every second).
    appendonly: bool,
    /// Where the append-only file goes; removed on drop.
    dir: Option<std::path::PathBuf>,
    /// With TLS only: the directory of its certificates (`ca.pem`, `server.pem`,
    /// `server.key`); removed on drop.
    tls: Option<std::path::PathBuf>,
    /// Arguments before the port (a Sentinel's config file and `--sentinel`).
    leading: Vec<String>,
    /// Arguments after the others (`--replicaof`).
    extra: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> RedisServer {
        Self::start_with(Vec::new(), Vec::new())
    }

    /// Starts one on a free port with `leading` arguments before the port and `extra`
    /// ones after the others, in a directory of its own (a replica's full sync writes an
    /// RDB file there).
    fn start_with(leading: Vec<String>, extra: Vec<String>) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("onrec-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for redis-server");
        let mut r = RedisServer {
            child: None,
            port,
            appendonly: false,
            dir: Some(dir),
            tls: None,
            leading,
            extra,
        };
        r.restart();
        r
    }

    /// Starts a replica of `master`.
    pub fn start_replica_of(master: &RedisServer) -> RedisServer {
        Self::start_with(
            Vec::new(),
            vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port.to_string(),
            ],
        )
    }

    /// Starts a Sentinel that monitors `master` as `shop` (quorum 1, short timers).
    pub fn start_sentinel(master: &RedisServer) -> RedisServer {
        let conf = std::env::temp_dir().join(format!(
            "onrec-sentinel-{}-{}.conf",
            std::process::id(),
            free_port()
        ));
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor shop 127.0.0.1 {} 1\nsentinel down-after-milliseconds shop 1000\nsentinel failover-timeout shop 5000\n",
                master.port
            ),
        )
        .expect("writing the Sentinel's config");
        Self::start_with(
            vec![conf.display().to_string(), "--sentinel".into()],
            Vec::new(),
        )
    }

    /// Starts one that speaks TLS only, with a certificate for 127.0.0.1 from a
    /// certificate authority of its own (`ca_file`), made with the `openssl` command.
    pub fn start_tls() -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("onrec-redis-tls-{port}"));
        std::fs::create_dir_all(&dir).expect("a directory for the certificates");
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl must be installed (.ci/run installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=onrec test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        let mut r = RedisServer {
            child: None,
            port,
            appendonly: false,
            dir: None,
            tls: Some(dir),
            leading: Vec::new(),
            extra: Vec::new(),
        };
        r.restart();
        r
    }

    /// The certificate authority a TLS server's certificate comes from.
    pub fn ca_file(&self) -> String {
        let dir = self.tls.as_ref().expect("a TLS server");
        dir.join("ca.pem").display().to_string()
    }

    /// A raw command's answer.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args).expect("a redis command")
    }

    /// A raw command that may meet a closed connection: a Sentinel reconfiguring a
    /// server kills its normal clients.
    pub fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        let mut conn = client.get_connection()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn)
    }

    /// Starts one on a free port that logs every write to an append-only file.
    pub fn start_appendonly() -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("onrec-redis-aof-{port}"));
        std::fs::create_dir_all(&dir).expect("a directory for the append-only file");
        let mut r = RedisServer {
            child: None,
            port,
            appendonly: true,
            dir: Some(dir),
            tls: None,
            leading: Vec::new(),
            extra: Vec::new(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Starts it again on the same port (empty: it keeps nothing on disk).
    pub fn restart(&mut self) {
        let port = self.port.to_string();
        let tls: Vec<String> = match &self.tls {
            Some(dir) => {
                let file = |name: &str| dir.join(name).display().to_string();
                vec![
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port.clone(),
                    "--tls-cert-file".into(),
                    file("server.pem"),
                    "--tls-key-file".into(),
                    file("server.key"),
                    "--tls-ca-cert-file".into(),
                    file("ca.pem"),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]
            }
            None => vec!["--port".into(), port],
        };
        let child = Command::new("redis-server")
            .args(&self.leading)
            .args(&tls)
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                if self.appendonly { "yes" } else { "no" },
            ])
            .args(
                self.dir
                    .iter()
                    .flat_map(|d| ["--dir".into(), d.display().to_string()]),
            )
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let listening = |port: u16| match self.tls {
            // A TLS server answers no plain PING: that it listens is enough.
            Some(_) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            None => redis_answers(port),
        };
        while !listening(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Redis Cluster of three masters without replicas, on free ports.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, joins them with `redis-cli --cluster create` and waits until
    /// every node says the cluster is ok.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(
                    Vec::new(),
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                    ]
                    .map(String::from)
                    .to_vec(),
                )
            })
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            while !node
                .cmd::<String>(&["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
            {
                assert!(Instant::now() < deadline, "the cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    /// A `redis+cluster://` URL naming the first `n` nodes.
    pub fn url(&self, n: usize) -> String {
        let nodes: Vec<String> = self.nodes[..n]
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// A connection that follows the cluster's slots.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(
            self.nodes
                .iter()
                .map(|n| format!("redis://127.0.0.1:{}", n.port))
                .collect::<Vec<_>>(),
        )
        .unwrap()
        .get_async_connection()
        .await
        .expect("connecting to the cluster")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        for dir in self.dir.iter().chain(&self.tls) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A segment's report (`GET /v1/segments/{name}`). A 503 (Redis slower than the read
/// budget on a busy machine) is retried, as a client told `Retry-After` would.
pub async fn segment(s: &Server, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = s
            .client
            .get(s.url(&format!("/v1/segments/{name}")))
            .send()
            .await
            .unwrap();
        if r.status() == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(r.status(), 200);
        return r.json().await.unwrap();
    }
}

/// Polls `check` until it holds; a guard against hanging, not a timing requirement.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never happened: {what}");
}
