//! The one place where a refusal becomes an HTTP response (SPEC §3).
//!
//! Every stage of the pipeline returns `Result<_, Reject>`; nothing else writes error responses.
//! The body is always `{"error": "<generic reason>", "request_id": "<id>"}`: no addresses, error
//! chains or key ids. The detail goes to the log, at the place the refusal was decided.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Missing, malformed, unknown, wrong, disabled or expired credential: all look the same.
    Unauthorized,
    /// IP not allowed, or outside the key's scope.
    Forbidden,
    /// A key's rate limit; `Retry-After` in whole seconds.
    RateLimited {
        retry_after: u64,
    },
    /// Too many failed authentications from this client IP.
    Throttled {
        retry_after: u64,
    },
    /// The request costs more than the key's quota has left in this window; `Retry-After`
    /// until it resets, or none when the request costs more than the whole quota (it can
    /// never pass, so no time would make it: fresh user T5-18).
    QuotaExceeded {
        retry_after: Option<u64>,
    },
    /// A path keygate answers itself (introspection) asked with another method.
    MethodNotAllowed {
        allow: &'static str,
    },
    /// Under a path keygate answers itself, but not one it serves.
    NotFound,
    PayloadTooLarge,
    HeadersTooLarge,
    /// The client stopped sending its request body (`body_read_timeout`).
    RequestTimeout,
    /// A webhook delivery whose id is being forwarded right now by another request.
    Conflict,
    BadRequest,
    BadGateway,
    GatewayTimeout,
    /// keygate is too busy to take this request now (e.g. the argon2 verification queue);
    /// `Retry-After` in whole seconds.
    Unavailable {
        retry_after: u64,
    },
    Internal,
    /// A method keygate does not forward (`CONNECT`, `TRACE`).
    NotImplemented,
}

pub static X_CONTENT_TYPE_OPTIONS: http::HeaderName =
    http::HeaderName::from_static("x-content-type-options");

impl Reject {
    pub fn status(self) -> StatusCode {
        match self {
            Reject::Unauthorized => StatusCode::UNAUTHORIZED,
            Reject::Forbidden => StatusCode::FORBIDDEN,
            Reject::RateLimited { .. }
            | Reject::Throttled { .. }
            | Reject::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Reject::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Reject::NotFound => StatusCode::NOT_FOUND,
            Reject::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reject::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Reject::Conflict => StatusCode::CONFLICT,
            Reject::BadRequest => StatusCode::BAD_REQUEST,
            Reject::BadGateway => StatusCode::BAD_GATEWAY,
            Reject::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Reject::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Reject::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// Short and generic on purpose.
    pub fn reason(self) -> &'static str {
        match self {
            Reject::Unauthorized => "unauthorized",
            Reject::Forbidden => "forbidden",
            Reject::RateLimited { .. } | Reject::Throttled { .. } => "too many requests",
            Reject::QuotaExceeded { .. } => "quota exceeded",
            Reject::MethodNotAllowed { .. } => "method not allowed",
            Reject::NotFound => "not found",
            Reject::PayloadTooLarge => "request body too large",
            Reject::HeadersTooLarge => "request headers too large",
            Reject::RequestTimeout => "request timeout",
            Reject::Conflict => "delivery in progress",
            Reject::BadRequest => "bad request",
            Reject::BadGateway => "bad gateway",
            Reject::GatewayTimeout => "gateway timeout",
            Reject::Unavailable { .. } => "service unavailable",
            Reject::Internal => "internal error",
            Reject::NotImplemented => "not implemented",
        }
    }

    pub fn into_response(self, request_id: &HeaderValue) -> Response<ResponseBody> {
        // Request ids are [A-Za-z0-9._-] (validated or generated): no JSON escaping needed.
        let id = crate::log::request_id_str(request_id);
        let body = format!(
            "{{\"error\":\"{}\",\"request_id\":\"{id}\"}}",
            self.reason()
        );
        let mut resp = Response::new(ResponseBody::full(Bytes::from(body)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            X_CONTENT_TYPE_OPTIONS.clone(),
            HeaderValue::from_static("nosniff"),
        );
        match self {
            Reject::Unauthorized => {
                h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Reject::RateLimited { retry_after }
            | Reject::Throttled { retry_after }
            | Reject::QuotaExceeded {
                retry_after: Some(retry_after),
            }
            | Reject::Unavailable { retry_after } => {
                h.insert(RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
            }
            Reject::MethodNotAllowed { allow } => {
                h.insert(http::header::ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        resp
    }
}
