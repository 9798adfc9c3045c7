//! The HTTP API (axum): JSON in and out, NDJSON event streams, health, metrics, OpenAPI.

use std::future::Future;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use onrec_engine::{
    Event, EventsSummary, FieldError, Item, Object, RecommendRequest, Recommendation,
    SegmentReport, UpsertSummary,
};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use utoipa::OpenApi;

use crate::auth::Access;
use crate::client::{Caller, Client, FORWARDED_FOR};
use crate::error::{ApiError, ErrorBody};
use crate::events::EventSink;
use crate::metrics::{self, Transport};
use crate::{App, Budget};

/// Content type of a streamed event body: one JSON event per line.
pub const NDJSON: &str = "application/x-ndjson";

/// The router with every route, over `app`.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/recommend", post(recommend))
        .route("/v1/events", post(record_events))
        .route("/v1/items", put(upsert_items))
        .route("/v1/segments", get(list_segments))
        .route("/v1/segments/{segment}", get(get_segment))
        .route("/v1/ope", post(evaluate_policy))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// Serves the router on `listener` until the app's shutdown token is cancelled, then
/// lets in-flight requests finish. A client has `header_timeout` to send a request's
/// headers (HTTP/1), after which its connection is closed, and one HTTP/2 connection
/// may open at most [`crate::MAX_STREAMS_PER_CONNECTION`] streams at once.
pub async fn serve(app: App, listener: TcpListener) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt as _;

    let token = app.shutdown_token().clone();
    let header_timeout = app.config().header_timeout;
    let service = router(app)
        .map_request(|req: axum::http::Request<hyper::body::Incoming>| req.map(Body::new));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(crate::MAX_STREAMS_PER_CONNECTION);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = token.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, Peer(peer.ip())),
                Err(e) => {
                    // Out of file descriptors, or a connection reset while queued: wait
                    // a little rather than spin.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone().map_request(
                    move |mut req: axum::http::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(peer);
                        req
                    },
                )),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The address an HTTP connection comes from, put on each of its requests.
#[derive(Debug, Clone, Copy)]
struct Peer(std::net::IpAddr);

impl axum::extract::FromRequestParts<App> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &App,
    ) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        let forwarded = headers
            .get_all(FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok());
        Ok(Caller {
            authorization: headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            client: Client::resolve(
                parts.extensions.get::<Peer>().map(|p| p.0),
                forwarded,
                &app.config().trusted_proxies,
            ),
        })
    }
}

/// Runs one API request without a body to read first (or an event stream, which reads
/// its body as it goes): key check, admission to `budget`, metrics, error mapping.
async fn handle<T, F>(
    app: &App,
    endpoint: &'static str,
    (access, budget): (Access, Budget),
    caller: &Caller,
    work: F,
) -> Response
where
    T: IntoResponse,
    F: Future<Output = Result<T, ApiError>>,
{
    app.serve((Transport::Http, endpoint), (access, budget), caller, work)
        .await
        .into_response()
}

/// Runs one API request with a JSON body: the key is checked, then the whole body is read
/// (within `body_timeout` and `max_body_bytes`) while the request holds no admission
/// place, so slow or stalled uploads cannot crowd out other clients; then it is admitted
/// and `work` runs on the body within the request timeout.
async fn handle_body<T, F, Fut>(
    app: &App,
    endpoint: &'static str,
    access: Access,
    caller: &Caller,
    body: Body,
    work: F,
) -> Response
where
    T: IntoResponse,
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let started = Instant::now();
    let result = async {
        app.authorize(access, caller.authorization.as_deref())?;
        let limit = app.config().body_timeout;
        let bytes = tokio::time::timeout(limit, read_body(body, app.config().max_body_bytes))
            .await
            .map_err(|_| {
                ApiError::Timeout(format!(
                    "the request body did not arrive within {limit:?} (body_timeout)"
                ))
            })??;
        let _admitted = app
            .admit(Transport::Http, Budget::Requests, caller.client)
            .await?;
        app.timed(work(bytes)).await
    }
    .await;
    metrics::finish(Transport::Http, endpoint, started, &result);
    result.into_response()
}

/// Reads a whole body of at most `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(format!(
                "request body exceeds {limit} bytes (max_body_bytes)"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Parses JSON; the error names the field where parsing failed (`[3].type`, `n`).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(FieldError::new("body", "is empty; expected JSON"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(&mut de).map_err(field_error) {
        Ok(value) => {
            de.end().map_err(|e| {
                FieldError::new("body", format!("unexpected data after the JSON value: {e}"))
            })?;
            Ok(value)
        }
        // JSON has one kind of number: `3.0` is the integer 3 wherever one is expected.
        Err(e) if e.message.starts_with("invalid type: floating point") => {
            let mut json: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| FieldError::new("body", e.to_string()))?;
            integral_floats_as_integers(&mut json);
            serde_path_to_error::deserialize(json).map_err(field_error)
        }
        Err(e) => Err(e),
    }
}

/// A JSON array of objects (see [`Object`]), parsed as [`parse_json`] parses.
fn parse_objects<T: DeserializeOwned>(bytes: &[u8]) -> Result<Vec<T>, FieldError> {
    Ok(parse_json::<Vec<Object<T>>>(bytes)?
        .into_iter()
        .map(|o| o.0)
        .collect())
}

/// The error of a failed deserialisation, naming where it failed.
fn field_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> FieldError {
    let path = e.path().to_string();
    let field = if path == "." || path == "?" {
        "body".to_owned()
    } else {
        path
    };
    FieldError::new(field, e.into_inner().to_string())
}

/// Turns every number written with a fraction of zero (`3.0`, `1e3`) into the integer it
/// is, where an integer type can hold it.
fn integral_floats_as_integers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0) {
                // -2^63 and 2^64, exactly.
                if (-(2f64.powi(63))..0.0).contains(&f) {
                    *n = serde_json::Number::from(f as i64);
                } else if (0.0..2f64.powi(64)).contains(&f) {
                    *n = serde_json::Number::from(f as u64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        serde_json::Value::Object(fields) => {
            fields.values_mut().for_each(integral_floats_as_integers);
        }
        _ => {}
    }
}

/// Top-N items for one user.
#[utoipa::path(post, path = "/v1/recommend", tag = "recommend",
    request_body = RecommendRequest,
    responses(
        (status = 200, description = "At most n items, best first", body = Recommendation),
        (status = 400, description = "Malformed request; `field` names the culprit", body = ErrorBody),
        (status = 401, description = "Missing or wrong read API key", body = ErrorBody),
        (status = 408, description = "The body did not arrive within body_timeout, or the request took longer than request_timeout", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "At capacity; retry later", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
async fn recommend(State(app): State<App>, caller: Caller, body: Body) -> Response {
    handle_body(&app, "recommend", Access::Read, &caller, body, async |bytes| {
        let Object(req) = parse_json::<Object<RecommendRequest>>(&bytes)?;
        let recommendation = app.engine().recommend(&req).await?;
        tracing::debug!(user_id = %req.user_id, request_id = %recommendation.request_id, n = recommendation.items.len(), "recommended");
        Ok(Json(recommendation))
    })
    .await
}

/// Feedback events: a JSON array (validated whole, then applied) or an NDJSON stream
/// (applied line by line as it arrives).
#[utoipa::path(post, path = "/v1/events", tag = "events",
    request_body(description = "A JSON array of events, or NDJSON (one event per line) with `Content-Type: application/x-ndjson`",
        content((Vec<Event> = "application/json"), (Event = "application/x-ndjson"))),
    responses(
        (status = 200, description = "What became of each event", body = EventsSummary),
        (status = 400, description = "A malformed JSON array (nothing applied); `field` names the culprit", body = ErrorBody),
        (status = 401, description = "Missing or wrong write API key", body = ErrorBody),
        (status = 408, description = "The body did not arrive within body_timeout (nothing applied), or the stream stalled (the events before the stall were applied)", body = ErrorBody),
        (status = 413, description = "Body or stream too large", body = ErrorBody),
        (status = 429, description = "At capacity (requests, or event streams); retry later", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
async fn record_events(
    State(app): State<App>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let is_ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(NDJSON));
    if is_ndjson {
        return handle(
            &app,
            "record_events",
            (Access::Write, Budget::Streams),
            &caller,
            async { ndjson_events(&app, body).await.map(Json) },
        )
        .await;
    }
    handle_body(
        &app,
        "record_events",
        Access::Write,
        &caller,
        body,
        async |bytes| {
            let events: Vec<Event> = parse_objects(&bytes)?;
            app.engine().validate_batch(&events)?;
            let mut sink = EventSink::new(&app);
            for e in &events {
                sink.push(e).await?;
            }
            Ok(Json(sink.finish()))
        },
    )
    .await
}

/// Applies NDJSON events as lines arrive. A malformed line is counted and reported in the
/// summary and the stream goes on; on shutdown the stream stops at a line boundary and
/// the summary covers what was read.
async fn ndjson_events(app: &App, body: Body) -> Result<EventsSummary, ApiError> {
    let cfg = app.config();
    let mut stream = body.into_data_stream();
    let mut sink = EventSink::new(app);
    let mut line = Vec::new();
    let mut overlong = false;
    let mut total = 0usize;
    let shutdown = app.shutdown_token();
    let so_far = |s: &EventSink<'_>| {
        let s = s.summary();
        format!(
            "{} events were read and {} accepted before that",
            s.received, s.accepted
        )
    };
    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            next = tokio::time::timeout(cfg.stream_idle_timeout, stream.next()) => next,
        };
        let chunk = match next {
            Err(_) => {
                return Err(ApiError::Timeout(format!(
                    "no data for {:?} (stream_idle_timeout); {}",
                    cfg.stream_idle_timeout,
                    so_far(&sink)
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::BadRequest(format!(
                    "reading the event stream: {e}; {}",
                    so_far(&sink)
                )));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        total += chunk.len();
        if total > cfg.max_stream_bytes {
            return Err(ApiError::PayloadTooLarge(format!(
                "event stream exceeds {} bytes (max_stream_bytes); {}",
                cfg.max_stream_bytes,
                so_far(&sink)
            )));
        }
        let mut rest = &chunk[..];
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            if !overlong {
                line.extend_from_slice(&rest[..pos]);
            }
            ndjson_line(&mut sink, &line, overlong, cfg.max_event_bytes).await?;
            line.clear();
            overlong = false;
            rest = &rest[pos + 1..];
        }
        if !overlong {
            line.extend_from_slice(rest);
            if line.len() > cfg.max_event_bytes {
                overlong = true;
                line.clear();
            }
        }
    }
    if overlong || !line.iter().all(u8::is_ascii_whitespace) {
        ndjson_line(&mut sink, &line, overlong, cfg.max_event_bytes).await?;
    }
    Ok(sink.finish())
}

async fn ndjson_line(
    sink: &mut EventSink<'_>,
    line: &[u8],
    overlong: bool,
    max: usize,
) -> Result<(), ApiError> {
    if overlong || line.len() > max {
        sink.push_invalid(
            "",
            FieldError::new(
                "line",
                format!("is longer than {max} bytes (max_event_bytes)"),
            ),
        );
        return Ok(());
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let parsed = parse_json::<Object<Event>>(line).map(|o| o.0);
    let event_id = match &parsed {
        Ok(e) => e.event_id.clone(),
        Err(_) => String::new(),
    };
    sink.push_parsed(&event_id, parsed).await?;
    Ok(())
}

/// Inserts or replaces catalog items, all or nothing.
#[utoipa::path(put, path = "/v1/items", tag = "catalog",
    request_body(content = Vec<Item>, description = "Items to insert or replace; the same shape as a catalog file line"),
    responses(
        (status = 200, description = "What changed", body = UpsertSummary),
        (status = 400, description = "A malformed item (nothing changed); `field` names the culprit", body = ErrorBody),
        (status = 401, description = "Missing or wrong write API key", body = ErrorBody),
        (status = 408, description = "The body did not arrive within body_timeout (nothing changed)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "At capacity; retry later", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
async fn upsert_items(State(app): State<App>, caller: Caller, body: Body) -> Response {
    handle_body(
        &app,
        "upsert_items",
        Access::Write,
        &caller,
        body,
        async |bytes| {
            let items: Vec<Item> = parse_objects(&bytes)?;
            let summary = app.engine().upsert_items(items).await?;
            app.refresh_gauges();
            tracing::info!(
                created = summary.created,
                updated = summary.updated,
                catalog_size = summary.catalog_size,
                "catalog updated"
            );
            Ok(Json(summary))
        },
    )
    .await
}

/// Query of the segment endpoints.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TopQuery {
    /// Best items listed per segment (1..=1000, default 10).
    #[param(minimum = 1, maximum = 1000)]
    top: Option<usize>,
}

/// The `top` query parameter (1..=1000, default 10); errors name it.
fn top_of(uri: &axum::http::Uri) -> Result<usize, ApiError> {
    let q = axum::extract::Query::<TopQuery>::try_from_uri(uri)
        .map_err(|e| FieldError::new("query", e.body_text()))?;
    match q.top {
        None => Ok(10),
        Some(t @ 1..=1000) => Ok(t),
        Some(t) => Err(FieldError::new("top", format!("is {t}; must be 1..=1000")).into()),
    }
}

/// Every segment's exploration policy, traffic and reward.
#[utoipa::path(get, path = "/v1/segments", tag = "exploration", params(TopQuery),
    responses(
        (status = 200, description = "Every segment with statistics", body = Vec<SegmentReport>),
        (status = 400, description = "A bad query (`top` out of 1..=1000, or an unknown parameter)", body = ErrorBody),
        (status = 401, description = "Missing or wrong read API key", body = ErrorBody),
        (status = 429, description = "At capacity; retry later", body = ErrorBody),
        (status = 503, description = "The bandit store did not answer", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
async fn list_segments(State(app): State<App>, caller: Caller, uri: axum::http::Uri) -> Response {
    handle(
        &app,
        "list_segments",
        (Access::Read, Budget::Requests),
        &caller,
        app.timed(async {
            let top = top_of(&uri)?;
            Ok(Json(app.engine().segments(top).await?))
        }),
    )
    .await
}

/// One segment's exploration policy, traffic, reward and best items.
#[utoipa::path(get, path = "/v1/segments/{segment}", tag = "exploration",
    params(("segment" = String, Path, description = "The segment"), TopQuery),
    responses(
        (status = 200, description = "The segment (zero counts when it has no statistics yet)", body = SegmentReport),
        (status = 400, description = "A bad segment name (empty, longer than 128 characters, or with control characters) or query", body = ErrorBody),
        (status = 401, description = "Missing or wrong read API key", body = ErrorBody),
        (status = 429, description = "At capacity; retry later", body = ErrorBody),
        (status = 503, description = "The bandit store did not answer", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
async fn get_segment(
    State(app): State<App>,
    caller: Caller,
    axum::extract::Path(segment): axum::extract::Path<String>,
    uri: axum::http::Uri,
) -> Response {
    handle(
        &app,
        "get_segment",
        (Access::Read, Budget::Requests),
        &caller,
        app.timed(async {
            onrec_engine::check_segment("segment", &segment)?;
            let top = top_of(&uri)?;
            Ok(Json(app.engine().segment(&segment, top).await?))
        }),
    )
    .await
}

/// A candidate policy to evaluate on the recent decision log, and how.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpeRequest {
    /// The candidate policy of every segment without an override, e.g.
    /// `{"kind": "epsilon_greedy", "epsilon": 0.05}`.
    #[serde(deserialize_with = "onrec_engine::object")]
    #[schema(value_type = Object)]
    pub policy: onrec_policy::PolicyConfig,
    /// Overrides by segment name.
    #[serde(default, deserialize_with = "onrec_engine::objects_by_name")]
    #[schema(value_type = Object)]
    pub segments: std::collections::BTreeMap<String, onrec_policy::PolicyConfig>,
    /// Bootstrap resamples for the intervals, 0..=10000 (default 1000).
    #[serde(default)]
    pub bootstrap: Option<usize>,
    /// Confidence of the intervals, in (0, 1) (default 0.95).
    #[serde(default)]
    pub confidence: Option<f64>,
    /// Seed of the bootstrap.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// Off-policy evaluation: a candidate policy's estimated value (IPS, SNIPS, doubly
/// robust, with bootstrap intervals) on the service's recent decision log.
#[utoipa::path(post, path = "/v1/ope", tag = "exploration",
    request_body = OpeRequest,
    responses(
        (status = 200, description = "Estimates per decision, per slot and per position", body = onrec_eval::OpeReport),
        (status = 400, description = "Malformed policy or options; `field` names the culprit", body = ErrorBody),
        (status = 408, description = "The body did not arrive within body_timeout", body = ErrorBody),
        (status = 409, description = "No decisions logged yet", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "At capacity; retry later", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
async fn evaluate_policy(State(app): State<App>, caller: Caller, body: Body) -> Response {
    handle_body(&app, "ope", Access::Read, &caller, body, async |bytes| {
        let Object(req) = parse_json::<Object<OpeRequest>>(&bytes)?;
        let defaults = onrec_eval::OpeOptions::default();
        let options = onrec_eval::OpeOptions {
            bootstrap: req.bootstrap.unwrap_or(defaults.bootstrap),
            confidence: req.confidence.unwrap_or(defaults.confidence),
            seed: req.seed.unwrap_or(defaults.seed),
        };
        let target = onrec_eval::TargetPolicy {
            policy: req.policy,
            segments: req.segments,
        };
        Ok(Json(app.evaluate(target, options).await?))
    })
    .await
}

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", content_type = "application/json")))]
async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

/// Readiness: 200 when serving, 503 while starting or draining.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Takes traffic"), (status = 503, description = "Starting or draining")))]
async fn readyz(State(app): State<App>) -> Response {
    if app.is_ready().await {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        let status = if app.is_draining() {
            "draining"
        } else {
            "starting or waiting for the bandit store"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": status})),
        )
            .into_response()
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn prometheus(State(app): State<App>) -> Response {
    app.refresh_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi(State(app): State<App>) -> Response {
    Json(crate::contract::document(app.config.max_n)).into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: "no such route; see /openapi.json".to_owned(),
            code: "not_found",
            field: None,
        }),
    )
        .into_response()
}

/// A known route asked with a method it does not serve: 405 with the error body (axum
/// adds the `Allow` header).
async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody {
            error: "this route does not serve this method; see the Allow header and /openapi.json"
                .to_owned(),
            code: "method_not_allowed",
            field: None,
        }),
    )
        .into_response()
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// The OpenAPI document of the HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "onrec", description = "Online recommendations: top-N items, feedback events, catalog updates."),
    paths(recommend, record_events, upsert_items, list_segments, get_segment, evaluate_policy, healthz, readyz, prometheus, openapi),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<RecommendRequest>(br#"{"user_id":"u","n":-1}"#).unwrap_err();
        assert_eq!(e.field, "n");
        let e = parse_json::<Vec<Event>>(br#"[{"event_id":"e","user_id":"u","item_id":"i","type":"click"},{"event_id":"e","user_id":"u","item_id":"i","type":"like"}]"#).unwrap_err();
        assert_eq!(e.field, "[1].type");
        assert!(
            e.message.contains("unknown variant `like`"),
            "{}",
            e.message
        );
        assert_eq!(
            parse_json::<RecommendRequest>(b"{").unwrap_err().field,
            "body"
        );
        assert_eq!(
            parse_json::<RecommendRequest>(b"  ").unwrap_err().field,
            "body"
        );
        assert_eq!(
            parse_json::<RecommendRequest>(br#"{"user_id":"u"} x"#)
                .unwrap_err()
                .field,
            "body"
        );
        assert_eq!(
            parse_json::<RecommendRequest>(br#"{"user_id":"u","nn":1}"#)
                .unwrap_err()
                .field,
            "nn"
        );
    }

    #[test]
    fn bodies_are_objects_and_integral_numbers_are_integers() {
        for body in [
            &br#"["alice", 3]"#[..],
            br#"{"user_id": "u", "context": ["mobile", "DE", 20]}"#,
        ] {
            let e = parse_json::<Object<RecommendRequest>>(body).unwrap_err();
            assert!(e.message.contains("expected an object"), "{e}");
        }
        let e = parse_json::<Object<OpeRequest>>(br#"{"policy": ["greedy"]}"#).unwrap_err();
        assert_eq!(e.field, "policy");
        let Object(r) =
            parse_json::<Object<RecommendRequest>>(br#"{"user_id": "u", "n": 3.0}"#).unwrap();
        assert_eq!(r.n, 3);
        let events: Vec<Object<Event>> = parse_json(
            br#"[{"event_id":"e","user_id":"u","item_id":"i","type":"click","timestamp":1.7e12}]"#,
        )
        .unwrap();
        assert_eq!(events[0].0.timestamp, Some(1_700_000_000_000));
        let e =
            parse_json::<Object<RecommendRequest>>(br#"{"user_id": "u", "n": 3.5}"#).unwrap_err();
        assert_eq!(e.field, "n");
    }

    #[test]
    fn openapi_lists_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in [
            "/v1/recommend",
            "/v1/events",
            "/v1/items",
            "/v1/segments",
            "/v1/segments/{segment}",
            "/v1/ope",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
        let events = &doc["paths"]["/v1/events"]["post"]["requestBody"]["content"];
        assert!(events.get("application/json").is_some() && events.get(NDJSON).is_some());
        let required = &doc["components"]["schemas"]["RecommendRequest"]["required"];
        assert_eq!(required, &serde_json::json!(["user_id"]));
    }
}
