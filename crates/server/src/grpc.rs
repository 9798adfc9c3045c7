//! The gRPC API (tonic): `onrec.v1.Recommender`, `grpc.health.v1` and server reflection.
//!
//! Messages are mapped onto the engine's types here and validated by the engine, so both
//! transports accept and reject exactly the same requests.

use std::pin::Pin;
use std::time::Instant;

use futures_util::Stream;
use onrec_engine as engine;
use onrec_engine::{EventOutcome, FieldError};
use onrec_proto::v1 as pb;
use onrec_proto::v1::recommender_server::{Recommender, RecommenderServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic::{Request, Response, Status, Streaming};

/// The layers around the gRPC routes.
pub type Layers = tower::layer::util::Stack<DecodeFailuresLayer, tower::layer::util::Identity>;

use crate::auth::Access;
use crate::client::{Caller, Client, FORWARDED_FOR};
use crate::error::ApiError;
use crate::events::EventSink;
use crate::grpc_status::DecodeFailuresLayer;
use crate::metrics::{self, Transport};
use crate::{App, Budget};

/// The `Recommender` service over the app.
#[derive(Clone)]
pub struct GrpcApi {
    app: App,
}

/// The gRPC server with every service, and the reporter that switches
/// `grpc.health.v1` between serving and not.
pub fn server(app: App) -> anyhow::Result<(tonic_health::server::HealthReporter, Router<Layers>)> {
    let limit = app.config().max_body_bytes;
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let recommender = RecommenderServer::new(GrpcApi { app })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(crate::MAX_STREAMS_PER_CONNECTION)
        .layer(DecodeFailuresLayer)
        .add_service(health)
        .add_service(reflection)
        .add_service(recommender);
    Ok((reporter, router))
}

/// Serves until `token` is cancelled, then lets in-flight calls and streams finish.
pub async fn serve(
    router: Router<Layers>,
    listener: TcpListener,
    token: CancellationToken,
) -> anyhow::Result<()> {
    router
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), token.cancelled_owned())
        .await?;
    Ok(())
}

fn authorization<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn context_from(c: pb::Context) -> engine::Context {
    engine::Context {
        device: non_empty(c.device),
        country: non_empty(c.country),
        hour: c.hour,
        page: non_empty(c.page),
        attributes: c.attributes.into_iter().collect(),
    }
}

pub(crate) fn recommend_request_from(r: pb::RecommendRequest) -> engine::RecommendRequest {
    engine::RecommendRequest {
        user_id: r.user_id,
        n: r.n,
        context: r.context.map(context_from),
        recent_items: r.recent_items,
        exclude: r.exclude,
        segment: non_empty(r.segment),
    }
}

fn recommendation_to(r: engine::Recommendation) -> pb::RecommendResponse {
    pb::RecommendResponse {
        request_id: r.request_id,
        model_version: r.model_version,
        ranker: r.ranker,
        fallback: r.fallback.unwrap_or_default(),
        policy: r.policy,
        segment: r.segment,
        items: r
            .items
            .into_iter()
            .map(|i| pb::RecommendedItem {
                item_id: i.item_id,
                score: i.score,
                propensity: i.propensity,
                explored: i.explored,
                category: i.category,
                title: i.title,
            })
            .collect(),
    }
}

fn event_type_from(value: i32) -> Result<engine::EventType, FieldError> {
    match pb::EventType::try_from(value) {
        Ok(pb::EventType::Impression) => Ok(engine::EventType::Impression),
        Ok(pb::EventType::Click) => Ok(engine::EventType::Click),
        Ok(pb::EventType::AddToCart) => Ok(engine::EventType::AddToCart),
        Ok(pb::EventType::Purchase) => Ok(engine::EventType::Purchase),
        Ok(pb::EventType::Dislike) => Ok(engine::EventType::Dislike),
        Ok(pb::EventType::Unspecified) => Err(FieldError::new("type", "must be set")),
        Err(_) => Err(FieldError::new(
            "type",
            format!("unknown event type {value}"),
        )),
    }
}

pub(crate) fn event_from(e: pb::Event) -> Result<engine::Event, FieldError> {
    Ok(engine::Event {
        kind: event_type_from(e.r#type)?,
        event_id: e.event_id,
        user_id: e.user_id,
        item_id: e.item_id,
        request_id: non_empty(e.request_id),
        value: e.value,
        timestamp: (e.timestamp != 0).then_some(e.timestamp),
    })
}

fn status_to(outcome: &EventOutcome) -> pb::EventStatus {
    match outcome {
        EventOutcome::Accepted => pb::EventStatus::Accepted,
        EventOutcome::Duplicate => pb::EventStatus::Duplicate,
        EventOutcome::Invalid(_) => pb::EventStatus::Invalid,
        EventOutcome::UnknownItem => pb::EventStatus::UnknownItem,
    }
}

fn status_name_to(status: &str) -> pb::EventStatus {
    match status {
        "invalid" => pb::EventStatus::Invalid,
        "unknown_item" => pb::EventStatus::UnknownItem,
        "duplicate" => pb::EventStatus::Duplicate,
        "accepted" => pb::EventStatus::Accepted,
        _ => pb::EventStatus::Unspecified,
    }
}

fn summary_to(s: engine::EventsSummary) -> pb::RecordEventsSummary {
    pb::RecordEventsSummary {
        received: s.received,
        accepted: s.accepted,
        duplicates: s.duplicates,
        invalid: s.invalid,
        unknown_items: s.unknown_items,
        errors: s
            .errors
            .into_iter()
            .map(|e| pb::EventError {
                index: e.index,
                status: status_name_to(&e.status).into(),
                event_id: e.event_id,
                error: e.error,
            })
            .collect(),
    }
}

fn segment_to(r: engine::SegmentReport) -> pb::Segment {
    pb::Segment {
        segment: r.segment,
        policy: r.policy,
        impressions: r.impressions,
        reward: r.reward,
        reward_per_impression: r.reward_per_impression,
        items: r.items,
        top: r
            .top
            .into_iter()
            .map(|a| pb::SegmentArm {
                item_id: a.item_id,
                impressions: a.impressions,
                reward: a.reward,
                reward_per_impression: a.reward_per_impression,
            })
            .collect(),
    }
}

/// A policy from its message, with the JSON API's defaults for unset parameters; the
/// error names `field` when no kind is set.
pub(crate) fn policy_from(
    field: &str,
    policy: Option<pb::PolicyConfig>,
) -> Result<onrec_policy::PolicyConfig, FieldError> {
    use pb::policy_config::Kind;
    let kind = policy.and_then(|p| p.kind).ok_or_else(|| {
        FieldError::new(
            field,
            "must set one kind: greedy, epsilon_greedy, ucb1 or thompson",
        )
    })?;
    let (name, params): (&str, Vec<(&str, Option<serde_json::Value>)>) = match kind {
        Kind::Greedy(_) => ("greedy", vec![]),
        Kind::EpsilonGreedy(p) => (
            "epsilon_greedy",
            vec![
                ("epsilon", Some(p.epsilon.into())),
                ("epsilon_min", Some(p.epsilon_min.into())),
                ("decay_impressions", p.decay_impressions.map(Into::into)),
            ],
        ),
        Kind::Ucb1(p) => (
            "ucb1",
            vec![
                ("c", p.c.map(Into::into)),
                ("personal", p.personal.map(Into::into)),
            ],
        ),
        Kind::Thompson(p) => (
            "thompson",
            vec![
                ("alpha", p.alpha.map(Into::into)),
                ("beta", p.beta.map(Into::into)),
                ("draws", p.draws.map(Into::into)),
                ("personal", p.personal.map(Into::into)),
            ],
        ),
    };
    let mut json = serde_json::Map::new();
    json.insert("kind".into(), name.into());
    json.extend(
        params
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v))),
    );
    serde_json::from_value(json.into()).map_err(|e| FieldError::new(field, e.to_string()))
}

fn estimate_to(e: onrec_eval::Estimate) -> pb::Estimate {
    pb::Estimate {
        value: e.value,
        low: e.low,
        high: e.high,
    }
}

fn estimates_to(e: onrec_eval::Estimates) -> pb::Estimates {
    pb::Estimates {
        logged: Some(estimate_to(e.logged)),
        ips: Some(estimate_to(e.ips)),
        snips: Some(estimate_to(e.snips)),
        dr: Some(estimate_to(e.dr)),
    }
}

fn report_to(r: onrec_eval::OpeReport) -> pb::EvaluatePolicyResponse {
    pb::EvaluatePolicyResponse {
        per_decision: Some(estimates_to(r.per_decision)),
        per_slot: Some(estimates_to(r.per_slot)),
        positions: r
            .positions
            .into_iter()
            .map(|p| pb::PositionEstimate {
                position: p.position as u32,
                decisions: p.decisions as u64,
                logged: p.logged,
                ips: p.ips,
                snips: p.snips,
                dr: p.dr,
                ess: p.ess,
                max_weight: p.max_weight,
            })
            .collect(),
        ess: r.ess,
        max_weight: r.max_weight,
        decisions: r.counts.decisions as u64,
        slots: r.counts.slots as u64,
        rewards: r.counts.rewards as u64,
        orphan_rewards: r.counts.orphan_rewards as u64,
        fallbacks: r.counts.fallbacks as u64,
        bootstrap: r.bootstrap as u32,
        confidence: r.confidence,
        seed: r.seed,
    }
}

/// Items listed per segment when a request does not say.
const DEFAULT_TOP: u32 = 10;

fn top_or_default(top: u32) -> usize {
    (if top == 0 { DEFAULT_TOP } else { top.min(1000) }) as usize
}

pub(crate) fn item_from(i: pb::Item) -> engine::Item {
    engine::Item {
        item_id: i.item_id,
        title: i.title,
        category: i.category,
        price: i.price,
        tags: i.tags,
        description: i.description,
        available: i.available.unwrap_or(true),
        popularity: i.popularity,
    }
}

impl GrpcApi {
    /// Who made `req`: its key, and its client (the peer, or behind trusted proxies the
    /// address they forwarded in `x-forwarded-for`).
    fn caller<T>(&self, req: &Request<T>) -> Caller {
        let forwarded: Vec<&str> = req
            .metadata()
            .get_all(FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        Caller {
            authorization: authorization(req).map(str::to_owned),
            client: Client::resolve(
                req.remote_addr().map(|a| a.ip()),
                forwarded.into_iter(),
                &self.app.config().trusted_proxies,
            ),
        }
    }

    /// Runs a unary call: key check, admission, time limit, metrics, status mapping.
    async fn unary<T>(
        &self,
        endpoint: &'static str,
        access: Access,
        caller: &Caller,
        work: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<Response<T>, Status> {
        self.app
            .serve(
                (Transport::Grpc, endpoint),
                (access, Budget::Requests),
                caller,
                self.app.timed(work),
            )
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    /// After a stream was answered early (on shutdown), keeps its request half open and
    /// reads what the client still sends, unapplied and unacknowledged, until the client
    /// closes it or the grace period ends. Dropping it at once would reset the stream and
    /// could cost the client the answer it has not read yet.
    fn discard_rest(app: &App, mut stream: Streaming<pb::Event>) {
        let grace = app.config().shutdown_grace;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(grace, async {
                while let Ok(Some(_)) = stream.message().await {}
            })
            .await;
        });
    }

    /// The next message of an event stream, `None` at its end or on shutdown.
    async fn next_event(
        app: &App,
        stream: &mut Streaming<pb::Event>,
    ) -> Result<Option<pb::Event>, ApiError> {
        let idle = app.config().stream_idle_timeout;
        tokio::select! {
            biased;
            () = app.shutdown_token().cancelled() => Ok(None),
            next = tokio::time::timeout(idle, stream.message()) => match next {
                Err(_) => Err(ApiError::Timeout(format!("no event for {idle:?} (stream_idle_timeout)"))),
                Ok(Err(status)) => Err(ApiError::BadRequest(status.message().to_owned())),
                Ok(Ok(message)) => Ok(message),
            },
        }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::EventAck, Status>> + Send>>;

#[tonic::async_trait]
impl Recommender for GrpcApi {
    async fn recommend(
        &self,
        request: Request<pb::RecommendRequest>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        let caller = self.caller(&request);
        let req = recommend_request_from(request.into_inner());
        self.unary("recommend", Access::Read, &caller, async {
            Ok(recommendation_to(self.app.engine().recommend(&req).await?))
        })
        .await
    }

    async fn record_events(
        &self,
        request: Request<Streaming<pb::Event>>,
    ) -> Result<Response<pb::RecordEventsSummary>, Status> {
        let caller = self.caller(&request);
        let work = async {
            let mut stream = request.into_inner();
            let mut sink = EventSink::new(&self.app);
            // A stream that fails says how far it got: the events before the failure were
            // applied.
            let so_far = |sink: &EventSink<'_>| {
                let s = sink.summary();
                format!(
                    "{} events were read and {} accepted before that",
                    s.received, s.accepted
                )
            };
            loop {
                match Self::next_event(&self.app, &mut stream).await {
                    Ok(Some(event)) => {
                        let id = event.event_id.clone();
                        if let Err(e) = sink.push_parsed(&id, event_from(event)).await {
                            break Err(e.noting(&so_far(&sink)));
                        }
                    }
                    Ok(None) => {
                        if self.app.shutdown_token().is_cancelled() {
                            Self::discard_rest(&self.app, stream);
                        }
                        break Ok(summary_to(sink.finish()));
                    }
                    Err(e) => break Err(e.noting(&so_far(&sink))),
                }
            }
        };
        self.app
            .serve(
                (Transport::Grpc, "record_events"),
                (Access::Write, Budget::Streams),
                &caller,
                work,
            )
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    type StreamEventsStream = AckStream;

    async fn stream_events(
        &self,
        request: Request<Streaming<pb::Event>>,
    ) -> Result<Response<AckStream>, Status> {
        let started = Instant::now();
        let caller = self.caller(&request);
        let admitted = match self
            .app
            .enter(Transport::Grpc, (Access::Write, Budget::Streams), &caller)
            .await
        {
            Ok(admitted) => admitted,
            Err(e) => {
                metrics::request(
                    Transport::Grpc,
                    "stream_events",
                    e.code(),
                    started.elapsed(),
                );
                return Err(e.into());
            }
        };
        let app = self.app.clone();
        let mut stream = request.into_inner();
        // A small buffer: a client that stops reading acks stops the reading of events.
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let _admitted = admitted;
            let mut sink = EventSink::new(&app);
            let outcome = loop {
                match Self::next_event(&app, &mut stream).await {
                    Ok(Some(event)) => {
                        let index = sink.next_index();
                        let (event_id, item_id) = (event.event_id.clone(), event.item_id.clone());
                        let outcome = match sink.push_parsed(&event_id, event_from(event)).await {
                            Ok(outcome) => outcome,
                            Err(e) => {
                                let code = e.code();
                                // The client may be gone already; then there is no one to tell.
                                let _ = tx.send(Err(e.into())).await;
                                break code;
                            }
                        };
                        let ack = pb::EventAck {
                            index,
                            status: status_to(&outcome).into(),
                            error: outcome.error(&item_id).unwrap_or_default(),
                            event_id,
                        };
                        if tx.send(Ok(ack)).await.is_err() {
                            break "ok";
                        }
                    }
                    Ok(None) => {
                        if app.shutdown_token().is_cancelled() {
                            drop(tx);
                            Self::discard_rest(&app, stream);
                        }
                        break "ok";
                    }
                    Err(e) => {
                        let code = e.code();
                        // The client may be gone already; then there is no one to tell.
                        let _ = tx.send(Err(e.into())).await;
                        break code;
                    }
                }
            };
            metrics::request(Transport::Grpc, "stream_events", outcome, started.elapsed());
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let caller = self.caller(&request);
        let top = top_or_default(request.into_inner().top);
        self.unary("list_segments", Access::Read, &caller, async {
            let segments = self.app.engine().segments(top).await?;
            Ok(pb::ListSegmentsResponse {
                segments: segments.into_iter().map(segment_to).collect(),
            })
        })
        .await
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::Segment>, Status> {
        let caller = self.caller(&request);
        let req = request.into_inner();
        self.unary("get_segment", Access::Read, &caller, async {
            engine::check_id("segment", &req.segment)?;
            let report = self
                .app
                .engine()
                .segment(&req.segment, top_or_default(req.top))
                .await?;
            Ok(segment_to(report))
        })
        .await
    }

    async fn evaluate_policy(
        &self,
        request: Request<pb::EvaluatePolicyRequest>,
    ) -> Result<Response<pb::EvaluatePolicyResponse>, Status> {
        let caller = self.caller(&request);
        let req = request.into_inner();
        self.unary("ope", Access::Read, &caller, async {
            let policy = policy_from("policy", req.policy)?;
            let segments = req
                .segments
                .into_iter()
                .map(|(name, p)| {
                    let field = format!("segments.{name}");
                    Ok((name, policy_from(&field, Some(p))?))
                })
                .collect::<Result<_, FieldError>>()?;
            let defaults = onrec_eval::OpeOptions::default();
            let options = onrec_eval::OpeOptions {
                bootstrap: req.bootstrap.map_or(defaults.bootstrap, |b| b as usize),
                confidence: req.confidence.unwrap_or(defaults.confidence),
                seed: req.seed.unwrap_or(defaults.seed),
            };
            let target = onrec_eval::TargetPolicy { policy, segments };
            Ok(report_to(self.app.evaluate(target, options).await?))
        })
        .await
    }

    async fn upsert_items(
        &self,
        request: Request<pb::UpsertItemsRequest>,
    ) -> Result<Response<pb::UpsertItemsResponse>, Status> {
        let caller = self.caller(&request);
        let items = request
            .into_inner()
            .items
            .into_iter()
            .map(item_from)
            .collect();
        self.unary("upsert_items", Access::Write, &caller, async {
            let s = self.app.engine().upsert_items(items).await?;
            self.app.refresh_gauges();
            Ok(pb::UpsertItemsResponse {
                created: s.created,
                updated: s.updated,
                catalog_size: s.catalog_size,
            })
        })
        .await
    }
}
