//! HTTP plumbing shared by every route: response builders, the fault body, bounded reading
//! of JSON bodies and media-type checks.

use std::time::Duration;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};

/// The body type of every response: small and fully built before it is sent, or a stream
/// (`GET /v3/events`).
pub type Body = Either<Full<Bytes>, StreamBody>;

/// A response body sent as its producer hands over the pieces; it ends when the producer
/// drops its sender, and the producer learns that the client left when sending fails.
pub struct StreamBody {
    pieces: mpsc::Receiver<Bytes>,
}

impl StreamBody {
    /// A body and the sender that feeds it, holding at most `ahead` unsent pieces.
    pub fn channel(ahead: usize) -> (mpsc::Sender<Bytes>, Self) {
        let (sender, pieces) = mpsc::channel(ahead);
        (sender, Self { pieces })
    }
}

impl hyper::body::Body for StreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.pieces
            .poll_recv(cx)
            .map(|piece| piece.map(|bytes| Ok(Frame::data(bytes))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A response with a complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// Largest JSON request body; the reading stops as soon as a body grows past it.
pub const MAX_JSON_BODY: usize = 64 * 1024;

/// Time a client has to send a whole JSON body once its headers arrived.
pub const JSON_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of a refused body is read and thrown away, at most, before answering.
const DISCARD_BYTES: usize = 1024 * 1024;

/// How long that may take.
const DISCARD_TIME: Duration = Duration::from_secs(1);

/// Media type of JSON request and response bodies.
pub const JSON: &str = "application/json";

/// Media type of image data uploads.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// A response with a JSON body.
pub fn json(status: StatusCode, body: &Value) -> Response<Body> {
    // A `Value` always serializes: its keys are strings and its numbers finite.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
}

/// A response without a body (202 and 204 answers).
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// The response for a refused or failed request: `{"<fault>": {"code": N, "message": ...}}`,
/// except for an action the requested microversion lacks, which is a bare 404 as in Cinder.
pub fn fault(err: &Error) -> Response<Body> {
    let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if err.kind() == ErrorKind::VersionNotFound {
        return empty(status);
    }

    let body = json!({
        err.fault_name(): {
            "code": status.as_u16(),
            "message": err.message(),
        }
    });
    json(status, &body)
}

/// Refuses a body whose `Content-Type` is not `expected`; parameters such as `charset` are
/// ignored. A missing header is accepted only when `required` is false.
pub fn check_media_type(headers: &HeaderMap, expected: &str, required: bool) -> Result<()> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return match required {
            false => Ok(()),
            true => Err(unsupported_media_type(None, expected)),
        };
    };

    let essence = value
        .to_str()
        .ok()
        .and_then(|text| text.split(';').next())
        .map(str::trim);
    match essence {
        Some(essence) if essence.eq_ignore_ascii_case(expected) => Ok(()),
        _ => Err(unsupported_media_type(Some(value), expected)),
    }
}

fn unsupported_media_type(given: Option<&HeaderValue>, expected: &str) -> Error {
    let given = match given {
        Some(value) => format!("{:?}", String::from_utf8_lossy(value.as_bytes())),
        None => "none".to_string(),
    };
    Error::new(
        ErrorKind::UnsupportedMediaType,
        format!("Unsupported Content-Type {given}; this request takes {expected}."),
    )
}

/// Reads a JSON request body of at most [`MAX_JSON_BODY`] bytes and parses it.
pub async fn read_json(headers: &HeaderMap, mut body: Incoming) -> Result<Value> {
    check_media_type(headers, JSON, false)?;

    // A declared length past the cap is refused before a byte of the body is kept.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_JSON_BODY as u64) {
        discard(&mut body).await;
        return Err(body_too_large());
    }

    let collected = tokio::time::timeout(JSON_BODY_TIMEOUT, collect_capped(&mut body)).await;
    let bytes = match collected {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(err)) if err.kind() == ErrorKind::PayloadTooLarge => {
            discard(&mut body).await;
            return Err(err);
        }
        Ok(Err(err)) => return Err(err),
        Err(_elapsed) => return Err(Error::invalid("The request body did not arrive in time.")),
    };

    serde_json::from_slice(&bytes)
        .map_err(|err| Error::invalid(format!("Malformed request body: invalid JSON: {err}")))
}

/// Gathers the body frame by frame, stopping at the first byte past the cap, so a client
/// that lies about (or omits) its length cannot make the daemon buffer more.
async fn collect_capped(body: &mut Incoming) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| body_broken(&err))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing we use
        };
        if bytes.len() + data.len() > MAX_JSON_BODY {
            return Err(body_too_large());
        }
        bytes.extend_from_slice(&data);
    }
    Ok(bytes)
}

/// Reads and throws away a little more of a refused body. A client that writes its whole
/// body before reading would otherwise meet a closed socket instead of the refusal.
async fn discard(body: &mut Incoming) {
    let mut budget = DISCARD_BYTES;
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            let length = frame.data_ref().map_or(0, Bytes::len);
            match budget.checked_sub(length) {
                Some(left) => budget = left,
                None => break,
            }
        }
    })
    .await;
}

/// The refusal of a body that ended early or could not be read.
pub fn body_broken(err: &hyper::Error) -> Error {
    Error::invalid(format!("The request body could not be read: {err}"))
}

fn body_too_large() -> Error {
    Error::new(
        ErrorKind::PayloadTooLarge,
        format!("The request body is larger than {MAX_JSON_BODY} bytes."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_with_type(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn body_json(response: Response<Body>) -> Value {
        let bytes = futures_body_bytes(response);
        serde_json::from_slice(&bytes).unwrap()
    }

    /// The bytes of a `Full` body, which are ready without polling any I/O.
    fn futures_body_bytes(response: Response<Body>) -> Bytes {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime
            .block_on(response.into_body().collect())
            .unwrap()
            .to_bytes()
    }

    #[test]
    fn fault_body_names_the_fault_and_code() {
        let response = fault(&Error::invalid("Bad size."));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[header::CONTENT_TYPE], JSON);
        assert_eq!(
            body_json(response),
            json!({"badRequest": {"code": 400, "message": "Bad size."}})
        );

        let response = fault(&Error::new(ErrorKind::Conflict, "Busy."));
        assert_eq!(
            body_json(response),
            json!({"conflictingRequest": {"code": 409, "message": "Busy."}})
        );

        let response = fault(&Error::new(ErrorKind::PayloadTooLarge, "Big."));
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(body_json(response).get("overLimit").is_some());
    }

    #[test]
    fn version_not_found_is_a_bare_404() {
        let response = fault(&Error::new(ErrorKind::VersionNotFound, "hidden"));
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(response.headers().get(header::CONTENT_TYPE).is_none());
        assert!(futures_body_bytes(response).is_empty());
    }

    #[test]
    fn json_media_type_allows_parameters_and_absence() {
        assert!(check_media_type(&HeaderMap::new(), JSON, false).is_ok());
        for value in [
            "application/json",
            "Application/JSON",
            "application/json; charset=UTF-8",
        ] {
            assert!(
                check_media_type(&headers_with_type(value), JSON, false).is_ok(),
                "{value}"
            );
        }
        for value in [
            "text/plain",
            "application/jsonp",
            "",
            "application/x-www-form-urlencoded",
        ] {
            let err = check_media_type(&headers_with_type(value), JSON, false).unwrap_err();
            assert_eq!(err.status(), 415, "{value}");
            assert_eq!(err.fault_name(), "badMediaType");
        }
    }

    #[test]
    fn required_media_type_refuses_absence() {
        let err = check_media_type(&HeaderMap::new(), OCTET_STREAM, true).unwrap_err();
        assert_eq!(err.status(), 415);
        assert!(check_media_type(&headers_with_type(OCTET_STREAM), OCTET_STREAM, true).is_ok());
    }
}
