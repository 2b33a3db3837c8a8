//! The one error type of the HTTP API and its JSON form
//! `{"error": {"code": "...", "message": "..."}}`.
//!
//! Every handler returns `ApiError`; store and data errors are mapped to it
//! here and nowhere else, and the extractor error handlers installed by
//! `startup` route actix's own rejections (bad JSON, bad query strings, bodies
//! over the limit) through it too, so every error a client sees has the same
//! shape.

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

use crate::data::DataError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is malformed: JSON syntax, a missing field, a bad
    /// query parameter.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0} not found")]
    NotFound(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    Conflict(String),
    #[error("request body exceeds the limit of {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed but unusable data; `field` names the request field, CSV
    /// column or channel concerned when there is one.
    #[error("{}", match field { Some(field) => format!("{field}: {message}"), None => message.clone() })]
    Unprocessable {
        field: Option<String>,
        message: String,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A failure on our side; the message is logged, the client gets a generic one.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn unprocessable(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unprocessable {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// The stable machine-readable code clients can match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Unprocessable { .. } => "unprocessable",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

/// The body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// Stable and machine-readable: bad_request, unauthorized, not_found,
    /// method_not_allowed, conflict, payload_too_large, unsupported_media_type,
    /// unprocessable, unavailable, internal.
    #[schema(example = "not_found")]
    code: &'a str,
    /// For people; names the field and the problem.
    message: String,
    /// The request field, query parameter, CSV column or channel concerned,
    /// when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let message = match self {
            Self::Internal(detail) => {
                tracing::error!(error = %detail, "request failed");
                "internal server error".to_string()
            }
            other => other.to_string(),
        };
        let field = match self {
            Self::Unprocessable { field, .. } => field.as_deref(),
            _ => None,
        };
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, Self::Unauthorized(_)) {
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        response.json(ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
                field,
            },
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { what } => Self::NotFound(what),
            StoreError::Conflict(message) => Self::Conflict(message),
            StoreError::Invalid { field, message } => Self::unprocessable(field, message),
            StoreError::Unavailable(message) => Self::Unavailable(message),
            StoreError::Database(_) | StoreError::Migrate(_) => Self::Internal(err.to_string()),
        }
    }
}

impl From<DataError> for ApiError {
    fn from(err: DataError) -> Self {
        match err {
            // The data error already names line and column in its text; the
            // column (or channel) also goes into `field` for clients.
            DataError::Invalid { ref column, .. } => Self::Unprocessable {
                field: column.clone(),
                message: err.to_string(),
            },
            DataError::UnknownSeries { name } => Self::NotFound(format!("series '{name}'")),
            DataError::Store(store) => store.into(),
            DataError::Polars(_) | DataError::Io(_) => Self::Internal(err.to_string()),
        }
    }
}

/// `JsonConfig` error handler: syntax and shape errors are 400, an oversized
/// body 413, a wrong content type 415.
pub fn json_error(err: JsonPayloadError, _request: &HttpRequest) -> actix_web::Error {
    let api_error = match &err {
        JsonPayloadError::OverflowKnownLength { limit, .. }
        | JsonPayloadError::Overflow { limit } => ApiError::PayloadTooLarge {
            limit_bytes: *limit,
        },
        JsonPayloadError::ContentType => ApiError::UnsupportedMediaType(
            "expected a JSON body with Content-Type: application/json".to_string(),
        ),
        JsonPayloadError::Deserialize(json) => {
            ApiError::BadRequest(format!("malformed JSON body: {json}"))
        }
        other => ApiError::BadRequest(format!("cannot read the JSON body: {other}")),
    };
    api_error.into()
}

/// `QueryConfig` error handler.
pub fn query_error(err: QueryPayloadError, _request: &HttpRequest) -> actix_web::Error {
    ApiError::BadRequest(format!("bad query string: {err}")).into()
}

/// `PathConfig` error handler.
pub fn path_error(err: PathError, _request: &HttpRequest) -> actix_web::Error {
    ApiError::BadRequest(format!("bad path parameter: {err}")).into()
}

/// The answer for paths no route matches.
pub async fn no_route(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("route {}", request.path())))
}

/// The answer for a known path asked with a method it does not serve.
pub async fn method_not_allowed(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.path().to_string(),
    })
}
