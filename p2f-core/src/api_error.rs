//! The error answer every control route shares: a status and a one-line JSON body
//! ([`ErrorBody`]), for rejections of malformed input, refusals, and errors from a node a
//! request was forwarded to.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use p2f_model::ProcessId;

use crate::wire::{ErrorBody, MAX_BODY_BYTES};

/// An error answer: a status and a one-line JSON body.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: ErrorBody,
}

impl ApiError {
    /// An answer with `status` and the one-line `error`.
    pub fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: error.into(),
                findings: Vec::new(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let status = rejection.status();
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => {
                format!("request body is larger than {} MiB", MAX_BODY_BYTES >> 20)
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                "expected a JSON body (Content-Type: application/json)".to_owned()
            }
            _ => rejection.body_text(),
        };
        ApiError::new(status, message)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text())
    }
}

/// An error from the node a request was forwarded to, answered as that node answered it.
pub fn forwarded(error: crate::ClientError) -> ApiError {
    match error {
        crate::ClientError::Api {
            status,
            message,
            findings,
        } => ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            body: ErrorBody {
                error: message,
                findings,
            },
        },
        other => ApiError::new(StatusCode::BAD_GATEWAY, other.to_string()),
    }
}

/// A process id from a path segment, or a 400.
pub fn parse_id(text: &str) -> Result<ProcessId, ApiError> {
    ProcessId::new(text).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

impl From<p2f_model::Invalid> for ApiError {
    /// `422 Unprocessable Entity` with every finding.
    fn from(invalid: p2f_model::Invalid) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: ErrorBody {
                error: format!(
                    "invalid spec: {} finding{}",
                    invalid.findings.len(),
                    if invalid.findings.len() == 1 { "" } else { "s" }
                ),
                findings: invalid.findings,
            },
        }
    }
}
