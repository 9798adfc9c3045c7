//! What tonic answers for a unary call whose message it could not decode, mapped onto the
//! API's codes and counted.
//!
//! tonic decodes a unary call's message before any handler runs, and answers a malformed
//! one (a truncated frame, a compressed flag without an encoding, bytes that are no
//! protobuf message) `INTERNAL` and an oversized one `OUT_OF_RANGE`. Neither is the
//! caller's contract: bad input is `INVALID_ARGUMENT`, and a message over `max_body_bytes`
//! is `RESOURCE_EXHAUSTED`, as a body too large is over HTTP (413). The handlers' own
//! internal errors, which start with "internal error", keep their code. Bytes that are no
//! protobuf message are `INVALID_ARGUMENT` already ("malformed …", from
//! `onrec_proto::codec`); they are counted here too, since no handler sees them. Streams
//! decode their messages in the handlers, which answer and count them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::{HeaderValue, Request, Response};

use crate::metrics::{self, Transport};

/// The layer that maps decode failures (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeFailuresLayer;

impl<S> tower::Layer<S> for DecodeFailuresLayer {
    type Service = DecodeFailures<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeFailures { inner }
    }
}

/// The service [`DecodeFailuresLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct DecodeFailures<S> {
    inner: S,
}

impl<S, Req, Res> tower::Service<Request<Req>> for DecodeFailures<S>
where
    S: tower::Service<Request<Req>, Response = Response<Res>>,
    S::Future: Send + 'static,
{
    type Response = Response<Res>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Res>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let endpoint = endpoint(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if let Some(outcome) = remap(response.headers_mut()) {
                metrics::request(Transport::Grpc, endpoint, outcome, started.elapsed());
            }
            Ok(response)
        })
    }
}

/// The metrics label of a gRPC method's path; `other` for paths of no API method.
fn endpoint(path: &str) -> &'static str {
    match path.rsplit('/').next().unwrap_or_default() {
        "Recommend" => "recommend",
        "RecordEvents" => "record_events",
        "StreamEvents" => "stream_events",
        "UpsertItems" => "upsert_items",
        "ListSegments" => "list_segments",
        "GetSegment" => "get_segment",
        "EvaluatePolicy" => "ope",
        _ => "other",
    }
}

/// Rewrites a decode failure's `grpc-status` in a trailers-only answer; returns the
/// outcome to count, or `None` when the answer is no decode failure.
fn remap(headers: &mut axum::http::HeaderMap) -> Option<&'static str> {
    let status = headers.get("grpc-status")?.to_str().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(|m| m.replace("%20", " "))
        .unwrap_or_default();
    let (code, outcome) = match status {
        // tonic::Code::Internal from the framing → InvalidArgument.
        "13" if !message.starts_with("internal error") => ("3", "invalid_argument"),
        // tonic::Code::OutOfRange → ResourceExhausted.
        "11" => ("8", "payload_too_large"),
        // Bytes the protobuf codec could not decode.
        "3" if message.starts_with("malformed ") => ("3", "invalid_argument"),
        _ => return None,
    };
    headers.insert("grpc-status", HeaderValue::from_static(code));
    Some(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(status: &str, message: &str) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_str(status).unwrap());
        h.insert("grpc-message", HeaderValue::from_str(message).unwrap());
        h
    }

    #[test]
    fn decode_failures_take_the_api_codes_and_other_answers_stay() {
        let mut h = headers("13", "Unexpected%20EOF%20decoding%20stream.");
        assert_eq!(remap(&mut h), Some("invalid_argument"));
        assert_eq!(h["grpc-status"], "3");
        let mut h = headers("11", "Error,%20decoded%20message%20length%20too%20large");
        assert_eq!(remap(&mut h), Some("payload_too_large"));
        assert_eq!(h["grpc-status"], "8");
        let mut h = headers("3", "malformed%20RecommendRequest:%20invalid%20varint");
        assert_eq!(remap(&mut h), Some("invalid_argument"));
        assert_eq!(h["grpc-status"], "3");
        for (status, message) in [
            ("13", "internal%20error:%20the%20event%20log"),
            ("3", "user_id:%20must%20not%20be%20empty"),
            ("0", ""),
        ] {
            let mut h = headers(status, message);
            assert_eq!(remap(&mut h), None);
            assert_eq!(h["grpc-status"], status);
        }
        assert_eq!(endpoint("/onrec.v1.Recommender/EvaluatePolicy"), "ope");
        assert_eq!(endpoint("/grpc.health.v1.Health/Check"), "other");
    }
}
