//! The Q-network's keys of the shared state: the feedback serve replicas send the
//! learner (`P:feedback`, read by the learners' group) and the weights the learner
//! publishes (`P:qnet`).

use onrec_learn::QConfig;

use super::{FEEDBACK_STREAM_CAP, RedisShared, encode, unavailable};
use crate::error::EngineError;
use crate::learning::SharedFeedback;

/// Q-network weights as the learner publishes them.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedQ {
    /// Names this publication among all (the publishing process and its version), so a
    /// follower loads each publication once, also after another learner took over.
    pub id: String,
    /// The learner's publication number.
    pub version: u64,
    /// Training steps the weights include.
    pub updates: u64,
    /// The network's shape.
    pub config: QConfig,
    /// Item ids by index: index i + 1 is `items[i]`.
    pub items: Vec<String>,
    /// The weights, as [`onrec_learn::QNet::to_bytes`] writes them.
    pub weights: Vec<u8>,
}

/// A published Q-network's fields (id, version, updates, config, items, weights), as one
/// read returns them.
type QReply = (
    Option<String>,
    Option<u64>,
    Option<u64>,
    Option<String>,
    Option<String>,
    Option<Vec<u8>>,
);

impl RedisShared {
    /// Appends feedback to the stream the learner trains its Q-network on.
    pub(super) async fn write_feedback(
        &self,
        feedback: &SharedFeedback,
    ) -> Result<(), EngineError> {
        let mut conn = self.conn.clone();
        self.within(
            "writing feedback",
            self.config.write_timeout,
            ::redis::cmd("XADD")
                .arg(self.feedback_stream())
                .arg("MAXLEN")
                .arg("~")
                .arg(FEEDBACK_STREAM_CAP)
                .arg("*")
                .arg("f")
                .arg(encode(feedback)?)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// Feedback entries for the learner: with `pending`, those delivered to any learner
    /// and never acknowledged; else new ones, waiting up to a second. An entry that
    /// cannot be read comes with `None`.
    pub async fn feedback_entries(
        &self,
        pending: bool,
    ) -> Result<Vec<(String, Option<SharedFeedback>)>, EngineError> {
        let entries = self
            .group_entries(&self.feedback_conn, &self.feedback_stream(), pending)
            .await?;
        Ok(entries
            .into_iter()
            .map(|e| {
                let feedback = e
                    .get::<String>("f")
                    .and_then(|f| serde_json::from_str(&f).ok());
                (e.id, feedback)
            })
            .collect())
    }

    /// Acknowledges feedback entries the learner took and deletes them.
    pub async fn ack_feedback(&self, ids: &[String]) -> Result<(), EngineError> {
        self.ack(&self.feedback_stream(), ids).await
    }

    /// Publishes Q-network weights for the serve replicas, replacing the last ones.
    pub async fn publish_qnet(&self, q: &PublishedQ) -> Result<(), EngineError> {
        let mut conn = self.conn.clone();
        self.within(
            "publishing the Q-network",
            self.config.write_timeout,
            ::redis::cmd("HSET")
                .arg(self.qnet_key())
                .arg("id")
                .arg(&q.id)
                .arg("version")
                .arg(q.version)
                .arg("updates")
                .arg(q.updates)
                .arg("config")
                .arg(encode(&q.config)?)
                .arg("items")
                .arg(encode(&q.items)?)
                .arg("weights")
                .arg(&q.weights)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// The id of the last published Q-network, if any.
    pub async fn published_qnet_id(&self) -> Result<Option<String>, EngineError> {
        let mut conn = self.conn.clone();
        self.within(
            "reading the Q-network's id",
            self.config.write_timeout,
            ::redis::cmd("HGET")
                .arg(self.qnet_key())
                .arg("id")
                .query_async(&mut conn),
        )
        .await
    }

    /// The last published Q-network, if any.
    pub async fn published_qnet(&self) -> Result<Option<PublishedQ>, EngineError> {
        let mut conn = self.conn.clone();
        let (id, version, updates, config, items, weights): QReply = self
            .within(
                "reading the Q-network",
                self.config.write_timeout,
                ::redis::cmd("HMGET")
                    .arg(self.qnet_key())
                    .arg("id")
                    .arg("version")
                    .arg("updates")
                    .arg("config")
                    .arg("items")
                    .arg("weights")
                    .query_async(&mut conn),
            )
            .await?;
        let (Some(id), Some(version), Some(updates), Some(config), Some(items), Some(weights)) =
            (id, version, updates, config, items, weights)
        else {
            return Ok(None);
        };
        let bad = |e: serde_json::Error| unavailable("reading the Q-network", e);
        Ok(Some(PublishedQ {
            id,
            version,
            updates,
            config: serde_json::from_str(&config).map_err(bad)?,
            items: serde_json::from_str(&items).map_err(bad)?,
            weights,
        }))
    }
}
