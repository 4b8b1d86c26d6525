//! `GET /metrics`: the daemon's counters in Prometheus' text exposition format, for callers
//! the `volumed:metrics` policy allows (administrators by default: the counters name every
//! volume).

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::http::{self, Body};
use super::Context;
use crate::error::Result;
use crate::metrics::CONTENT_TYPE;

/// `GET /metrics`.
pub async fn show(ctx: &Context) -> Result<Response<Body>> {
    let text = ctx.run(|engine, who| engine.metrics_text(who)).await?;

    let mut response = Response::new(http::full(text));
    *response.status_mut() = StatusCode::OK;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    Ok(response)
}
