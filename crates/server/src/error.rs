//! The API's one error type, mapped once to HTTP and once to gRPC.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use onrec_engine::{EngineError, FieldError};
use onrec_eval::EvalError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input; names the field.
    #[error("{0}")]
    InvalidArgument(FieldError),
    /// A body that is not JSON at all, or not the expected shape at a known place.
    #[error("{0}")]
    BadRequest(String),
    /// No or a wrong API key.
    #[error("missing or invalid API key (send `Authorization: Bearer <key>`)")]
    Unauthenticated,
    /// The server is at a concurrency limit: its size, and what it counts.
    #[error("the server is at capacity ({0} {1} in flight); retry later")]
    Overloaded(u32, &'static str),
    /// The client holds the most places of a budget one client may: that number, and
    /// what the budget counts.
    #[error(
        "this client has {0} {1} in flight, the most one client may (max_client_share); retry later"
    )]
    ClientLimit(u32, &'static str),
    /// A stage of the pipeline is saturated (e.g. the encoder queue).
    #[error("{0}; retry later")]
    Busy(String),
    /// The request took longer than its limit.
    #[error("{0}")]
    Timeout(String),
    /// A body or stream over its size limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A backing store did not answer.
    #[error("a backing store did not answer: {0}")]
    Unavailable(String),
    /// The request cannot be answered in the service's present state (e.g. nothing
    /// logged yet to evaluate a policy on).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A failure that is not the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The same error with `note` after its message (errors without a message of their
    /// own are returned as they are).
    pub fn noting(self, note: &str) -> Self {
        let add = |m: String| format!("{m}; {note}");
        match self {
            Self::InvalidArgument(mut f) => {
                f.message = add(f.message);
                Self::InvalidArgument(f)
            }
            Self::BadRequest(m) => Self::BadRequest(add(m)),
            Self::Busy(m) => Self::Busy(add(m)),
            Self::Timeout(m) => Self::Timeout(add(m)),
            Self::PayloadTooLarge(m) => Self::PayloadTooLarge(add(m)),
            Self::Unavailable(m) => Self::Unavailable(add(m)),
            Self::FailedPrecondition(m) => Self::FailedPrecondition(add(m)),
            Self::Internal(m) => Self::Internal(add(m)),
            other @ (Self::Unauthenticated
            | Self::Overloaded(..)
            | Self::ClientLimit(..)
            | Self::ShuttingDown) => other,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidArgument(f) => Self::InvalidArgument(f),
            EngineError::Overloaded(m) => Self::Busy(m),
            EngineError::Unavailable(m) => Self::Unavailable(m),
            EngineError::Catalog { .. } | EngineError::EventLog(_) | EngineError::State(_) => {
                Self::Internal(e.to_string())
            }
        }
    }
}

impl From<EvalError> for ApiError {
    fn from(e: EvalError) -> Self {
        match e {
            EvalError::Options { field, message } => {
                Self::InvalidArgument(FieldError::new(field, message))
            }
            EvalError::Target { field, message } => {
                Self::InvalidArgument(FieldError::new(field, message))
            }
            EvalError::EmptyLog => Self::FailedPrecondition(
                "no decisions are logged yet to evaluate the policy on".into(),
            ),
            EvalError::Record { .. }
            | EvalError::Line { .. }
            | EvalError::Log(_)
            | EvalError::Io { .. } => Self::Internal(e.to_string()),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self::InvalidArgument(e)
    }
}

impl ApiError {
    /// The outcome label of metrics and the `code` of HTTP error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) | Self::BadRequest(_) => "invalid_argument",
            Self::Unauthenticated => "unauthenticated",
            Self::Overloaded(..) | Self::ClientLimit(..) | Self::Busy(_) => "overloaded",
            Self::Timeout(_) => "timeout",
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::ShuttingDown | Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            Self::InvalidArgument(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Overloaded(..) | Self::ClientLimit(..) | Self::Busy(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::FailedPrecondition(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ShuttingDown | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::InvalidArgument(_) | Self::BadRequest(_) => tonic::Code::InvalidArgument,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::Overloaded(..) | Self::ClientLimit(..) | Self::Busy(_) => {
                tonic::Code::ResourceExhausted
            }
            Self::Timeout(_) => tonic::Code::DeadlineExceeded,
            Self::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Self::PayloadTooLarge(_) => tonic::Code::ResourceExhausted,
            Self::ShuttingDown | Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Internal(_) => tonic::Code::Internal,
        }
    }
}

/// The JSON body of every HTTP error.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Human-readable; for bad input it starts with the field's path.
    pub error: String,
    /// `invalid_argument`, `unauthenticated`, `overloaded`, `timeout`,
    /// `failed_precondition`, `payload_too_large`, `unavailable` or `internal`.
    pub code: &'static str,
    /// The offending field's path, for `invalid_argument` errors that have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let mut response = (
            status,
            axum::Json(ErrorBody {
                error: self.to_string(),
                code: self.code(),
                field: match &self {
                    Self::InvalidArgument(f) => Some(f.field.clone()),
                    _ => None,
                },
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            // Capacity frees within the second (in-flight requests take milliseconds), and
            // a store that did not answer is retried as soon.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_and_unavailable_answers_say_when_to_retry_and_auth_failures_name_the_scheme() {
        let busy = ApiError::Overloaded(8, "requests").into_response();
        assert_eq!(busy.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(busy.headers()[axum::http::header::RETRY_AFTER], "1");
        let away = ApiError::Unavailable("redis".into()).into_response();
        assert_eq!(away.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(away.headers()[axum::http::header::RETRY_AFTER], "1");
        let denied = ApiError::Unauthenticated.into_response();
        assert_eq!(
            denied.headers()[axum::http::header::WWW_AUTHENTICATE],
            "Bearer"
        );
        assert!(
            !denied
                .headers()
                .contains_key(axum::http::header::RETRY_AFTER)
        );
    }
}
