//! Driving running onrec servers over HTTP instead of an engine in process: the same
//! rounds, posted to `/v1/recommend` and `/v1/events` of each server in turn, so the
//! simulated shop can test a deployment (several replicas behind no balancer but this
//! one's round-robin).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use onrec_engine::{Event, RecommendRequest, Recommendation};
use serde_json::Value;

use crate::SimError;

/// Time limit of one HTTP call.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Running servers, called in turn.
#[derive(Debug)]
pub struct HttpShop {
    client: reqwest::Client,
    urls: Vec<String>,
    next: AtomicUsize,
}

impl HttpShop {
    /// The servers at `urls` (`http://host:port`, no trailing path); at least one.
    pub fn new(urls: Vec<String>) -> Result<Self, SimError> {
        if urls.is_empty() {
            return Err(SimError::config("url", "needs at least one URL"));
        }
        if let Some(bad) = urls.iter().find(|u| !u.starts_with("http://")) {
            return Err(SimError::config(
                "url",
                format!("'{bad}' is not an http:// URL"),
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| SimError::config("url", e.to_string()))?;
        Ok(Self {
            client,
            urls: urls
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// The servers' URLs.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// POSTs `body` to `path` of the next server and reads its JSON answer; anything but
    /// 200 is an error naming the server and what it said.
    async fn post(&self, path: &str, body: &impl serde::Serialize) -> Result<Value, SimError> {
        let k = self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len();
        let url = format!("{}{path}", self.urls[k]);
        let failed = |message: String| SimError::Http {
            url: url.clone(),
            message,
        };
        let response = self
            .client
            .post(&url)
            .json(body)
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| failed(e.to_string()))?;
        if !status.is_success() {
            return Err(failed(format!("{status}: {text}")));
        }
        serde_json::from_str(&text).map_err(|e| failed(format!("{e}: {text}")))
    }

    /// Recommendations from the next server.
    pub async fn recommend(&self, request: &RecommendRequest) -> Result<Recommendation, SimError> {
        let body = self.post("/v1/recommend", request).await?;
        serde_json::from_value(body).map_err(|e| SimError::Http {
            url: "/v1/recommend".into(),
            message: e.to_string(),
        })
    }

    /// Posts a round's events to the next server; all must be accepted.
    pub async fn record(&self, events: &[Event]) -> Result<(), SimError> {
        if events.is_empty() {
            return Ok(());
        }
        let summary = self.post("/v1/events", &events).await?;
        if summary["accepted"].as_u64() != Some(events.len() as u64) {
            return Err(SimError::EventRejected {
                event_id: events[0].event_id.clone(),
                outcome: summary.to_string(),
            });
        }
        Ok(())
    }
}
