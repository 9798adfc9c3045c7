//! Prometheus metrics through the `metrics` facade: names, descriptions, and the helpers
//! both transports use so that their series agree.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use onrec_engine::{EventOutcome, EventType, Stats};

use crate::error::ApiError;

/// Requests served, by `transport`, `endpoint` and `outcome`.
pub const REQUESTS: &str = "onrec_requests_total";
/// Request latency, by `transport`, `endpoint` and `outcome`.
pub const REQUEST_DURATION: &str = "onrec_request_duration_seconds";
/// Events received, by `type` and `outcome`.
pub const EVENTS: &str = "onrec_events_total";
/// Items in the catalog.
pub const CATALOG_ITEMS: &str = "onrec_catalog_items";
/// Users whose state is kept.
pub const USERS_TRACKED: &str = "onrec_users_tracked";
/// Requests and streams refused because their client held its share of the budget, by
/// `transport` and `budget`.
pub const CLIENT_LIMITED: &str = "onrec_client_limited_total";
/// Requests in flight, by `transport`.
pub const INFLIGHT: &str = "onrec_inflight_requests";
/// Always 1, labelled with the `ranker` and model `version` serving now.
pub const MODEL_INFO: &str = "onrec_model_info";
/// Always 1, labelled with the onrec `version`.
pub const BUILD_INFO: &str = "onrec_build_info";

/// Latency buckets, in seconds: 100 µs to 10 s.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The process's Prometheus recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; then ours stays unused
        // and /metrics renders an empty page rather than the process failing.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle
    })
}

fn describe() {
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "Requests served, by transport, endpoint and outcome."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Request latency, by transport, endpoint and outcome."
    );
    describe_counter!(EVENTS, Unit::Count, "Events received, by type and outcome.");
    describe_gauge!(CATALOG_ITEMS, Unit::Count, "Items in the catalog.");
    describe_gauge!(
        USERS_TRACKED,
        Unit::Count,
        "Users whose state is kept in memory."
    );
    describe_gauge!(INFLIGHT, Unit::Count, "Requests in flight, by transport.");
    describe_counter!(
        CLIENT_LIMITED,
        Unit::Count,
        "Requests and streams refused because their client held its share of the budget (max_client_share), by transport and budget."
    );
    describe_gauge!(
        MODEL_INFO,
        "Always 1, labelled with the ranker and model version serving now."
    );
    describe_gauge!(BUILD_INFO, "Always 1, labelled with the onrec version.");
}

/// Which API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// axum, JSON.
    Http,
    /// tonic, protobuf.
    Grpc,
}

impl Transport {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
        }
    }
}

/// Records one finished request.
pub fn request(
    transport: Transport,
    endpoint: &'static str,
    outcome: &'static str,
    took: Duration,
) {
    let labels = [
        ("transport", transport.as_str()),
        ("endpoint", endpoint),
        ("outcome", outcome),
    ];
    counter!(REQUESTS, &labels).increment(1);
    histogram!(REQUEST_DURATION, &labels).record(took.as_secs_f64());
}

/// Records a request's result, measured from `started`.
pub fn finish<T>(
    transport: Transport,
    endpoint: &'static str,
    started: Instant,
    result: &Result<T, ApiError>,
) {
    let outcome = result.as_ref().map_or_else(ApiError::code, |_| "ok");
    request(transport, endpoint, outcome, started.elapsed());
}

/// Counts a request or stream refused for its client's share of `budget`.
pub fn client_limited(transport: Transport, budget: &'static str) {
    counter!(CLIENT_LIMITED, "transport" => transport.as_str(), "budget" => budget).increment(1);
}

/// Records one event's outcome.
pub fn event(kind: Option<EventType>, outcome: &EventOutcome) {
    let kind = kind.map_or("unknown", EventType::as_str);
    counter!(EVENTS, "type" => kind, "outcome" => outcome.as_str()).increment(1);
}

/// Counts a request in flight until dropped.
#[derive(Debug)]
pub struct Inflight(Transport);

impl Inflight {
    /// Starts counting.
    pub fn start(transport: Transport) -> Self {
        gauge!(INFLIGHT, "transport" => transport.as_str()).increment(1.0);
        Self(transport)
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        gauge!(INFLIGHT, "transport" => self.0.as_str()).decrement(1.0);
    }
}

/// Updates the gauges that mirror the engine's state.
pub fn engine_state(stats: &Stats, previous_version: Option<&str>) {
    gauge!(CATALOG_ITEMS).set(stats.catalog_items as f64);
    gauge!(USERS_TRACKED).set(stats.users_tracked as f64);
    if let Some(old) = previous_version.filter(|old| *old != stats.model_version) {
        gauge!(MODEL_INFO, "ranker" => stats.ranker, "version" => old.to_owned()).set(0.0);
    }
    gauge!(MODEL_INFO, "ranker" => stats.ranker, "version" => stats.model_version.clone()).set(1.0);
}

/// The Prometheus text page, after refreshing the engine gauges.
pub fn render() -> String {
    handle().render()
}
