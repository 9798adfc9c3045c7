//! Connections to Redis: to one server (`redis://`, `rediss://`), to the master that a
//! set of Sentinels names (`redis+sentinel://`, `rediss+sentinel://`), followed across
//! failovers, or to a Redis Cluster (`redis+cluster://`, `rediss+cluster://`).
//!
//! A Cluster URL lists some of its nodes: `redis+cluster://[user:password@]host:port[,host:port…]`;
//! the others are learned from them, and commands go to the node that holds their keys'
//! slot (following `MOVED` and `ASK` as slots move). onrec's scripts and transactions
//! touch several keys, which a cluster runs only when they share a slot, so on a cluster
//! every key prefix is a hash tag ([`cluster_prefix`]): each store's keys live in one slot.
//!
//! A Sentinel URL lists the Sentinels and names the master:
//! `redis+sentinel://[user:password@]host:port[,host:port…]/master[/db]`. The credentials
//! and the database are the master's (the Sentinels are asked without them). The master's
//! address is asked of the Sentinels in turn when the first command runs, and again after a
//! command fails in a way a failover explains (the connection broke or timed out, or the
//! server now answers as a read-only replica); the failed command's error is returned, so
//! the caller's retry (every writer here retries) reaches the new master.

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};

/// How long asking a Sentinel may take.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often, while commands run, the Sentinels are asked again in the background whether
/// the master moved: a demoted master may still take writes for a moment before it
/// learns it is a replica, and those writes are lost when it resynchronises.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// A Redis client for `url`: `redis://` plain, `rediss://` over TLS, verifying the
/// server against the system's roots or, when given, against `ca_pem` (PEM certificates).
pub fn client(url: &str, ca_pem: Option<&[u8]>) -> Result<Client, RedisError> {
    // rustls needs a crypto provider; the first call installs ring (later ones find it).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match ca_pem {
        Some(ca) => Client::build_with_tls(
            url,
            ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            },
        ),
        None => Client::open(url),
    }
}

/// A cheap-to-clone connection to Redis, reconnecting by itself: see the module
/// documentation. Created lazily: nothing is dialled until the first command.
#[derive(Clone)]
pub enum RedisConn {
    /// One server.
    Direct(ConnectionManager),
    /// The master the Sentinels name.
    Sentinel(Arc<Followed>),
    /// A Redis Cluster.
    Cluster(Arc<Clustered>),
}

/// Whether `url` names a Redis Cluster (`redis+cluster://`, `rediss+cluster://`).
pub fn is_cluster_url(url: &str) -> bool {
    url.starts_with("redis+cluster://") || url.starts_with("rediss+cluster://")
}

/// The key prefix to use with `url`: on a Redis Cluster, `prefix` as a hash tag
/// (`onrec:state` becomes `{onrec:state}`) unless it holds one already, so that every
/// key under it lies in one slot and the scripts and transactions over them run;
/// elsewhere `prefix` as it is.
pub fn cluster_prefix(url: &str, prefix: &str) -> String {
    if is_cluster_url(url) && !(prefix.contains('{') && prefix.contains('}')) {
        format!("{{{prefix}}}")
    } else {
        prefix.to_owned()
    }
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct(_) => f.write_str("RedisConn::Direct"),
            Self::Sentinel(s) => f
                .debug_struct("RedisConn::Sentinel")
                .field("sentinels", &s.sentinels)
                .field("master", &s.master)
                .finish(),
            Self::Cluster(_) => f.write_str("RedisConn::Cluster"),
        }
    }
}

impl RedisConn {
    /// A connection for `url`, verifying TLS servers against `ca_pem` when given, that
    /// connects and reconnects (to whichever master the Sentinels name) as `config` says.
    pub fn open(
        url: &str,
        ca_pem: Option<&[u8]>,
        config: ConnectionManagerConfig,
    ) -> Result<Self, RedisError> {
        if is_cluster_url(url) {
            return Ok(Self::Cluster(Arc::new(Clustered::new(
                url, ca_pem, &config,
            )?)));
        }
        match SentinelUrl::parse(url)? {
            None => Ok(Self::Direct(ConnectionManager::new_lazy_with_config(
                client(url, ca_pem)?,
                config,
            )?)),
            Some(parsed) => Ok(Self::Sentinel(Arc::new(Followed {
                sentinels: parsed.sentinels,
                master: parsed.master,
                master_url: parsed.master_url,
                ca_pem: ca_pem.map(<[u8]>::to_vec),
                config,
                current: parking_lot::Mutex::new(None),
                resolving: tokio::sync::Mutex::new(()),
                checked: parking_lot::Mutex::new(None),
            }))),
        }
    }
}

/// A Sentinel URL taken apart.
struct SentinelUrl {
    /// `host:port` of each Sentinel.
    sentinels: Vec<String>,
    master: String,
    /// The master's URL with `{addr}` for its `host:port`.
    master_url: String,
}

impl SentinelUrl {
    /// `None` for a URL that is not a Sentinel URL.
    fn parse(url: &str) -> Result<Option<Self>, RedisError> {
        let invalid = |what: &str| {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "invalid Sentinel URL",
                format!(
                    "{what}; expected redis+sentinel://[user:password@]host:port[,host:port…]/master[/db]"
                ),
            ))
        };
        let (scheme, rest) = match url.split_once("://") {
            Some(("redis+sentinel", rest)) => ("redis", rest),
            Some(("rediss+sentinel", rest)) => ("rediss", rest),
            _ => return Ok(None),
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (format!("{auth}@"), rest),
            None => (String::new(), rest),
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("no master name"))?;
        let mut path = path.split('/');
        let master = path
            .next()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| invalid("no master name"))?
            .to_owned();
        let db = match path.next() {
            Some(db) if !db.is_empty() => {
                db.parse::<u32>()
                    .map_err(|_| invalid("the database is not a number"))?;
                format!("/{db}")
            }
            _ => String::new(),
        };
        let sentinels: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.contains(':') {
                    h.to_owned()
                } else {
                    format!("{h}:26379")
                }
            })
            .collect();
        if sentinels.is_empty() {
            return Err(invalid("no Sentinel address"));
        }
        Ok(Some(Self {
            sentinels,
            master,
            master_url: format!("{scheme}://{auth}{{addr}}{db}"),
        }))
    }
}

/// A Redis Cluster client and, once a command ran, its connection (which follows the
/// cluster's slots and reconnects to its nodes by itself).
pub struct Clustered {
    client: ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
}

impl Clustered {
    /// The client for a Cluster URL, with `config`'s timeouts and retries.
    fn new(
        url: &str,
        ca_pem: Option<&[u8]>,
        config: &ConnectionManagerConfig,
    ) -> Result<Self, RedisError> {
        let invalid = |what: &str| {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "invalid Cluster URL",
                format!("{what}; expected redis+cluster://[user:password@]host:port[,host:port…]"),
            ))
        };
        let (scheme, rest) = match url.split_once("://") {
            Some(("rediss+cluster", rest)) => ("rediss", rest),
            Some((_, rest)) => ("redis", rest),
            None => return Err(invalid("no scheme")),
        };
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), rest),
        };
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains('/') {
            return Err(invalid(
                "a cluster has no databases but 0, and the URL no path",
            ));
        }
        let nodes: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                let h = if h.contains(':') {
                    h.to_owned()
                } else {
                    format!("{h}:6379")
                };
                format!("{scheme}://{auth}{h}")
            })
            .collect();
        if nodes.is_empty() {
            return Err(invalid("no node address"));
        }
        // rustls needs a crypto provider; the first call installs ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = ClusterClientBuilder::new(nodes)
            .retries(u32::try_from(config.number_of_retries()).unwrap_or(u32::MAX));
        if let Some(t) = config.connection_timeout() {
            builder = builder.connection_timeout(t);
        }
        if let Some(t) = config.response_timeout() {
            builder = builder.response_timeout(t);
        }
        if let Some(ca) = ca_pem {
            builder = builder.certs(::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            });
        }
        Ok(Self {
            client: builder.build()?,
            connection: tokio::sync::OnceCell::new(),
        })
    }

    /// The connection, made on first use (a failed attempt is tried again next time).
    async fn connection(&self) -> Result<ClusterConnection, RedisError> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// The master the Sentinels name, and the connection to it.
pub struct Followed {
    sentinels: Vec<String>,
    master: String,
    master_url: String,
    ca_pem: Option<Vec<u8>>,
    config: ConnectionManagerConfig,
    /// The master's address and the connection to it, until a failure clears it.
    current: parking_lot::Mutex<Option<(String, ConnectionManager)>>,
    /// Held while asking the Sentinels, so that many failing commands ask once.
    resolving: tokio::sync::Mutex<()>,
    /// When the Sentinels were last asked in the background.
    checked: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl Followed {
    /// The connection to the master, asking the Sentinels for it when there is none (and
    /// in the background every [`RECHECK_EVERY`] whether it moved).
    async fn connection(self: &Arc<Self>) -> Result<ConnectionManager, RedisError> {
        self.recheck_if_due();
        if let Some((_, conn)) = self.current.lock().as_ref() {
            return Ok(conn.clone());
        }
        let _resolving = self.resolving.lock().await;
        if let Some((_, conn)) = self.current.lock().as_ref() {
            return Ok(conn.clone());
        }
        let addr = self.master_addr().await?;
        let url = self.master_url.replace("{addr}", &addr);
        let conn = ConnectionManager::new_lazy_with_config(
            client(&url, self.ca_pem.as_deref())?,
            self.config.clone(),
        )?;
        tracing::info!(master = %self.master, %addr, "Redis master found through Sentinel");
        *self.current.lock() = Some((addr, conn.clone()));
        Ok(conn)
    }

    /// Asks the Sentinels in the background, at most every [`RECHECK_EVERY`], and drops the
    /// connection when they name another master.
    fn recheck_if_due(self: &Arc<Self>) {
        {
            let mut checked = self.checked.lock();
            if checked.is_some_and(|at| at.elapsed() < RECHECK_EVERY) {
                return;
            }
            *checked = Some(std::time::Instant::now());
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = Arc::clone(self);
        runtime.spawn(async move {
            if let Ok(addr) = this.master_addr().await {
                let mut current = this.current.lock();
                if current.as_ref().is_some_and(|(known, _)| *known != addr) {
                    tracing::warn!(master = %this.master, %addr, "the Sentinels name a new Redis master");
                    *current = None;
                }
            }
        });
    }

    /// The master's `host:port`, from the first Sentinel that knows it.
    async fn master_addr(&self) -> Result<String, RedisError> {
        let mut last = None;
        for sentinel in &self.sentinels {
            let asked = async {
                let client = client(&format!("redis://{sentinel}"), None)?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                let reply: Option<(String, u16)> = ::redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, RedisError>(reply)
            };
            match tokio::time::timeout(SENTINEL_TIMEOUT, asked).await {
                Ok(Ok(Some((host, port)))) => return Ok(format!("{host}:{port}")),
                Ok(Ok(None)) => {
                    last = Some(format!("{sentinel} does not monitor {}", self.master));
                }
                Ok(Err(e)) => last = Some(format!("{sentinel}: {e}")),
                Err(_) => last = Some(format!("{sentinel}: no answer within {SENTINEL_TIMEOUT:?}")),
            }
        }
        Err(RedisError::from((
            ErrorKind::Io,
            "no Sentinel named the master",
            last.unwrap_or_default(),
        )))
    }

    /// After a failed command: when a failover may explain it, the next command asks the
    /// Sentinels again.
    fn failed(&self, error: &RedisError) {
        let failover = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly);
        if failover && let Some((addr, _)) = self.current.lock().take() {
            tracing::warn!(master = %self.master, %addr, error = %error, "Redis master failed; asking the Sentinels again");
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Direct(conn) => conn.req_packed_command(cmd),
            Self::Sentinel(followed) => Box::pin(async move {
                let mut conn = followed.connection().await?;
                let result = conn.req_packed_command(cmd).await;
                if let Err(e) = &result {
                    followed.failed(e);
                }
                result
            }),
            Self::Cluster(cluster) => {
                Box::pin(async move { cluster.connection().await?.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Direct(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(followed) => Box::pin(async move {
                let mut conn = followed.connection().await?;
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &result {
                    followed.failed(e);
                }
                result
            }),
            Self::Cluster(cluster) => Box::pin(async move {
                cluster
                    .connection()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Direct(conn) => conn.get_db(),
            Self::Sentinel(followed) => followed
                .current
                .lock()
                .as_ref()
                .map_or(0, |(_, conn)| conn.get_db()),
            Self::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_are_recognised_and_their_prefixes_become_hash_tags() {
        assert!(is_cluster_url("redis+cluster://a:7000,b:7001"));
        assert!(is_cluster_url("rediss+cluster://a"));
        assert!(!is_cluster_url("redis://a:6379"));
        assert!(!is_cluster_url("redis+sentinel://s/m"));
        assert_eq!(
            cluster_prefix("redis+cluster://a", "onrec:state"),
            "{onrec:state}"
        );
        assert_eq!(cluster_prefix("redis+cluster://a", "{shop}:x"), "{shop}:x");
        assert_eq!(cluster_prefix("redis://a", "onrec:state"), "onrec:state");
    }

    #[tokio::test]
    async fn bad_cluster_urls_are_errors_that_say_why() {
        let open = |url: &str| {
            RedisConn::open(url, None, ConnectionManagerConfig::new())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(open("redis+cluster://a:7000,b").is_ok());
        assert!(open("rediss+cluster://user:pw@a:7000").is_ok());
        let err = open("redis+cluster://").unwrap_err();
        assert!(err.contains("no node address"), "{err}");
        let err = open("redis+cluster://a:7000/2").unwrap_err();
        assert!(err.contains("no databases"), "{err}");
    }

    #[test]
    fn sentinel_urls_name_sentinels_master_credentials_and_database() {
        let u = SentinelUrl::parse("redis+sentinel://:pw@s1:26379,s2/shop/2")
            .unwrap()
            .unwrap();
        assert_eq!(u.sentinels, ["s1:26379", "s2:26379"]);
        assert_eq!(u.master, "shop");
        assert_eq!(u.master_url, "redis://:pw@{addr}/2");
        let u = SentinelUrl::parse("rediss+sentinel://s1:5000/shop")
            .unwrap()
            .unwrap();
        assert_eq!(u.master_url, "rediss://{addr}");
        assert!(
            SentinelUrl::parse("redis://127.0.0.1:6379")
                .unwrap()
                .is_none()
        );
        for bad in [
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1:26379/",
            "redis+sentinel:///shop",
            "redis+sentinel://s1/shop/x",
        ] {
            let err = SentinelUrl::parse(bad).err().unwrap().to_string();
            assert!(err.contains("invalid Sentinel URL"), "{bad}: {err}");
        }
    }
}
