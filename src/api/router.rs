//! From a request to a handler: path decoding, the route table, microversion checks and the
//! finishing touches every response gets.

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::http::{self, Body};
use super::version::{self, ApiVersion};
use super::{attachments, event_stream, images, metrics, volumes, Context};
use crate::error::{Error, ErrorKind, Result};

/// Every resource the API serves; path parameters are percent-decoded.
#[derive(Clone, Debug, Eq, PartialEq, strum::EnumIter)]
pub enum Route {
    /// `/`
    Versions,
    /// `/v3/volumes`
    Volumes,
    /// `/v3/volumes/detail`
    VolumesDetail,
    /// `/v3/volumes/{id or name}`
    Volume(String),
    /// `/v3/volumes/{id or name}/action`
    VolumeAction(String),
    /// `/v3/attachments`
    Attachments,
    /// `/v3/attachments/detail`
    AttachmentsDetail,
    /// `/v3/attachments/{id}`
    Attachment(String),
    /// `/v3/attachments/{id}/action`
    AttachmentAction(String),
    /// `/v2/images`
    Images,
    /// `/v2/images/{id or name}`
    Image(String),
    /// `/v2/images/{id}/file`
    ImageFile(String),
    /// `/v2/images/{id}/actions/deactivate`
    ImageDeactivate(String),
    /// `/v2/images/{id}/actions/reactivate`
    ImageReactivate(String),
    /// `/v3/events`
    Events,
    /// `/metrics`
    Metrics,
}

impl Route {
    /// The route of `path` (without its query), `None` if there is none.
    pub fn parse(path: &str) -> Result<Option<Route>> {
        let Some(path) = path.strip_prefix('/') else {
            return Ok(None);
        };
        if path.is_empty() {
            return Ok(Some(Route::Versions));
        }
        let path = path.strip_suffix('/').unwrap_or(path);

        let segments = path
            .split('/')
            .map(decode_segment)
            .collect::<Result<Vec<_>>>()?;
        if segments.iter().any(String::is_empty) {
            return Ok(None);
        }
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();

        let key = |text: &str| text.to_owned();
        let route = match segments.as_slice() {
            ["v3", "volumes"] => Route::Volumes,
            ["v3", "volumes", "detail"] => Route::VolumesDetail,
            ["v3", "volumes", volume] => Route::Volume(key(volume)),
            ["v3", "volumes", volume, "action"] => Route::VolumeAction(key(volume)),
            ["v3", "attachments"] => Route::Attachments,
            ["v3", "attachments", "detail"] => Route::AttachmentsDetail,
            ["v3", "attachments", id] => Route::Attachment(key(id)),
            ["v3", "attachments", id, "action"] => Route::AttachmentAction(key(id)),
            ["v3", "events"] => Route::Events,
            ["metrics"] => Route::Metrics,
            ["v2", "images"] => Route::Images,
            ["v2", "images", image] => Route::Image(key(image)),
            ["v2", "images", id, "file"] => Route::ImageFile(key(id)),
            ["v2", "images", id, "actions", "deactivate"] => Route::ImageDeactivate(key(id)),
            ["v2", "images", id, "actions", "reactivate"] => Route::ImageReactivate(key(id)),
            _ => return Ok(None),
        };
        Ok(Some(route))
    }

    /// The route's path with its parameters named, as docs/api.md writes it.
    pub fn template(&self) -> &'static str {
        match self {
            Route::Versions => "/",
            Route::Volumes => "/v3/volumes",
            Route::VolumesDetail => "/v3/volumes/detail",
            Route::Volume(_) => "/v3/volumes/<volume>",
            Route::VolumeAction(_) => "/v3/volumes/<volume>/action",
            Route::Attachments => "/v3/attachments",
            Route::AttachmentsDetail => "/v3/attachments/detail",
            Route::Attachment(_) => "/v3/attachments/<attachment>",
            Route::AttachmentAction(_) => "/v3/attachments/<attachment>/action",
            Route::Images => "/v2/images",
            Route::Image(_) => "/v2/images/<image>",
            Route::ImageFile(_) => "/v2/images/<id>/file",
            Route::ImageDeactivate(_) => "/v2/images/<id>/actions/deactivate",
            Route::ImageReactivate(_) => "/v2/images/<id>/actions/reactivate",
            Route::Events => "/v3/events",
            Route::Metrics => "/metrics",
        }
    }

    /// Every route and method the API answers, as `(method, template)` pairs: the table of
    /// contents that docs/api.md must cover (tests/api_docs.rs checks it does).
    pub fn table() -> Vec<(&'static str, &'static str)> {
        let mut table = Vec::new();
        for route in <Route as strum::IntoEnumIterator>::iter() {
            for method in route.allow().split(", ") {
                table.push((method, route.template()));
            }
        }
        table
    }

    /// The methods the route answers, for the `Allow` header of a 405.
    pub fn allow(&self) -> &'static str {
        match self {
            Route::Versions
            | Route::VolumesDetail
            | Route::AttachmentsDetail
            | Route::Events
            | Route::Metrics => "GET",
            Route::Volumes | Route::Attachments | Route::Images => "GET, POST",
            Route::Volume(_) | Route::Image(_) => "GET, DELETE",
            Route::Attachment(_) => "GET, PUT, DELETE",
            Route::VolumeAction(_)
            | Route::AttachmentAction(_)
            | Route::ImageDeactivate(_)
            | Route::ImageReactivate(_) => "POST",
            Route::ImageFile(_) => "PUT",
        }
    }

    /// The microversion that introduced the route, below which it does not exist.
    fn since(&self) -> Option<ApiVersion> {
        match self {
            Route::Attachments
            | Route::AttachmentsDetail
            | Route::Attachment(_)
            | Route::AttachmentAction(_) => Some(ApiVersion::ATTACHMENTS),
            _ => None,
        }
    }
}

/// Whether `path` belongs to the volume API, which has microversions.
fn is_volume_api(path: &str) -> bool {
    path == "/v3" || path.starts_with("/v3/")
}

/// Answers one request; never fails, errors become fault responses.
pub async fn handle(ctx: &Context, request: Request<Incoming>) -> Response<Body> {
    let (head, body) = request.into_parts();
    let path = head.uri.path().to_owned();

    let version = match is_volume_api(&path) {
        true => Some(ApiVersion::from_headers(&head.headers)),
        false => None,
    };
    let mut response = match version {
        Some(Err(ref err)) => http::fault(err),
        Some(Ok(version)) => respond(ctx, &head, body, &path, Some(version)).await,
        None => respond(ctx, &head, body, &path, None).await,
    };

    // Cinder echoes the version on every volume API response, faults included.
    if let Some(version) = version {
        let headers = response.headers_mut();
        headers.insert(
            header::VARY,
            HeaderValue::from_static("OpenStack-API-Version"),
        );
        if let Ok(version) = version {
            if let Ok(value) = HeaderValue::from_str(&version.header_value()) {
                headers.insert(version::HEADER, value);
            }
        }
    }

    let status = response.status().as_u16();
    if status >= 400 {
        ctx.engine.metrics().count_api_fault(status);
    }
    tracing::debug!(method = %head.method, path = ?path, status, "request");
    response
}

/// Routes the request and turns an error into its fault response.
async fn respond(
    ctx: &Context,
    head: &Parts,
    body: Incoming,
    path: &str,
    version: Option<ApiVersion>,
) -> Response<Body> {
    let route = match Route::parse(path) {
        Ok(Some(route)) => route,
        Ok(None) => return http::fault(&Error::not_found("The resource could not be found.")),
        Err(err) => return http::fault(&err),
    };
    let allow = route.allow();

    let mut response = match dispatch(ctx, head, body, route, version).await {
        Ok(response) => response,
        Err(err) => http::fault(&err),
    };
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    response
}

/// The route table: one arm per method and route.
async fn dispatch(
    ctx: &Context,
    head: &Parts,
    body: Incoming,
    route: Route,
    version: Option<ApiVersion>,
) -> Result<Response<Body>> {
    // The volume API's version is always known; the image API has none.
    let version = version.unwrap_or(ApiVersion::MIN);
    if route.since().is_some_and(|since| !version.has(since)) {
        return Err(version::not_found());
    }

    let headers = &head.headers;
    match (&head.method, route) {
        (&Method::GET, Route::Versions) => Ok(versions()),

        (&Method::GET, Route::Volumes) => volumes::list(ctx, false).await,
        (&Method::POST, Route::Volumes) => {
            volumes::create(ctx, http::read_json(headers, body).await?).await
        }
        (&Method::GET, Route::VolumesDetail) => volumes::list(ctx, true).await,
        (&Method::GET, Route::Volume(key)) => volumes::show(ctx, key).await,
        (&Method::DELETE, Route::Volume(key)) => volumes::delete(ctx, key).await,
        (&Method::POST, Route::VolumeAction(key)) => {
            let body = http::read_json(headers, body).await?;
            volumes::act(ctx, version, key, body).await
        }

        (&Method::GET, Route::Attachments | Route::AttachmentsDetail) => {
            attachments::list(ctx).await
        }
        (&Method::POST, Route::Attachments) => {
            attachments::create(ctx, http::read_json(headers, body).await?).await
        }
        (&Method::GET, Route::Attachment(id)) => attachments::show(ctx, id).await,
        (&Method::PUT, Route::Attachment(id)) => {
            attachments::update(ctx, id, http::read_json(headers, body).await?).await
        }
        (&Method::DELETE, Route::Attachment(id)) => attachments::delete(ctx, id).await,
        (&Method::POST, Route::AttachmentAction(id)) => {
            let body = http::read_json(headers, body).await?;
            attachments::act(ctx, version, id, body).await
        }

        (&Method::GET, Route::Images) => images::list(ctx).await,
        (&Method::POST, Route::Images) => {
            images::create(ctx, http::read_json(headers, body).await?).await
        }
        (&Method::GET, Route::Image(key)) => images::show(ctx, key).await,
        (&Method::DELETE, Route::Image(id)) => images::delete(ctx, id).await,
        (&Method::PUT, Route::ImageFile(id)) => images::upload(ctx, id, headers, body).await,
        (&Method::POST, Route::ImageDeactivate(id)) => images::set_active(ctx, id, false).await,
        (&Method::POST, Route::ImageReactivate(id)) => images::set_active(ctx, id, true).await,

        (&Method::GET, Route::Events) => event_stream::follow(ctx).await,
        (&Method::GET, Route::Metrics) => metrics::show(ctx).await,

        (method, route) => Err(Error::new(
            ErrorKind::MethodNotAllowed,
            format!(
                "Method {method} is not allowed on this resource; use {}.",
                route.allow()
            ),
        )),
    }
}

/// `GET /`: the versions document, shaped like Cinder's.
fn versions() -> Response<Body> {
    let body = json!({
        "versions": [{
            "id": "v3.0",
            "status": "CURRENT",
            "version": ApiVersion::MAX.to_string(),
            "min_version": ApiVersion::MIN.to_string(),
            "links": [{ "rel": "self", "href": "/v3/" }],
        }]
    });
    http::json(StatusCode::OK, &body)
}

/// Percent-decodes one path segment. Broken escapes, bytes that are not UTF-8 and control
/// characters (NUL, newlines) are refused: no volume or image name contains them.
fn decode_segment(raw: &str) -> Result<String> {
    let bad_path = || Error::invalid("The request path is not validly percent-encoded.");

    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte != b'%' {
            bytes.push(byte);
            rest = tail;
            continue;
        }
        let (high, low) = match tail {
            [high, low, ..] => (hex_digit(*high), hex_digit(*low)),
            _ => return Err(bad_path()),
        };
        let (Some(high), Some(low)) = (high, low) else {
            return Err(bad_path());
        };
        bytes.push(high << 4 | low);
        rest = &tail[2..];
    }

    let text = String::from_utf8(bytes).map_err(|_| bad_path())?;
    if text.chars().any(char::is_control) {
        return Err(Error::invalid(
            "The request path contains control characters.",
        ));
    }
    Ok(text)
}

fn hex_digit(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> Option<Route> {
        Route::parse(path).unwrap()
    }

    #[test]
    fn every_template_parses_back_to_its_route() {
        for route in <Route as strum::IntoEnumIterator>::iter() {
            let path = route
                .template()
                .replace("<volume>", "vol1")
                .replace("<attachment>", "a1")
                .replace("<image>", "cirros")
                .replace("<id>", "i1");

            let parsed = Route::parse(&path).unwrap().expect("a route");

            assert_eq!(parsed.template(), route.template(), "{path}");
        }
    }

    #[test]
    fn table_lists_each_method_of_each_route() {
        let table = Route::table();

        assert!(table.contains(&("GET", "/")));
        assert!(table.contains(&("DELETE", "/v3/attachments/<attachment>")));
        assert!(table.contains(&("PUT", "/v2/images/<id>/file")));
    }

    #[test]
    fn routes_of_the_volume_api() {
        assert_eq!(route("/"), Some(Route::Versions));
        assert_eq!(route("/v3/volumes"), Some(Route::Volumes));
        assert_eq!(route("/v3/volumes/"), Some(Route::Volumes));
        assert_eq!(route("/v3/volumes/detail"), Some(Route::VolumesDetail));
        assert_eq!(route("/v3/volumes/db"), Some(Route::Volume("db".into())));
        assert_eq!(
            route("/v3/volumes/db/action"),
            Some(Route::VolumeAction("db".into()))
        );
        assert_eq!(route("/v3/attachments"), Some(Route::Attachments));
        assert_eq!(
            route("/v3/attachments/a"),
            Some(Route::Attachment("a".into()))
        );
        assert_eq!(
            route("/v3/attachments/a/action"),
            Some(Route::AttachmentAction("a".into()))
        );
    }

    #[test]
    fn routes_of_the_image_api() {
        assert_eq!(route("/v2/images"), Some(Route::Images));
        assert_eq!(route("/v2/images/i"), Some(Route::Image("i".into())));
        assert_eq!(
            route("/v2/images/i/file"),
            Some(Route::ImageFile("i".into()))
        );
        assert_eq!(
            route("/v2/images/i/actions/deactivate"),
            Some(Route::ImageDeactivate("i".into()))
        );
        assert_eq!(
            route("/v2/images/i/actions/reactivate"),
            Some(Route::ImageReactivate("i".into()))
        );
    }

    #[test]
    fn routes_of_metrics_and_events() {
        assert_eq!(route("/metrics"), Some(Route::Metrics));
        assert_eq!(route("/v3/events"), Some(Route::Events));
        assert_eq!(route("/v3/events/x"), None);
        assert_eq!(route("/v2/metrics"), None);
        assert_eq!(Route::Events.allow(), "GET");
    }

    #[test]
    fn unknown_paths_have_no_route() {
        for path in [
            "*",
            "/v3",
            "/v3//volumes",
            "/v3/volumes//action",
            "/v3/volumes/a/b",
            "/v1/volumes",
            "/v2/images/i/actions/delete",
            "/v3/snapshots",
            "//",
        ] {
            assert_eq!(route(path), None, "{path}");
        }
    }

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(
            route("/v3/volumes/my%20disk"),
            Some(Route::Volume("my disk".into()))
        );
        assert_eq!(
            route("/v3/volumes/a%2Fb"),
            Some(Route::Volume("a/b".into()))
        );
        assert_eq!(
            route("/v3/volumes/%2e%2e"),
            Some(Route::Volume("..".into()))
        );
        assert_eq!(
            route("/v3/volumes/caf%C3%A9"),
            Some(Route::Volume("café".into()))
        );
        assert_eq!(route("/v3/%76olumes"), Some(Route::Volumes));
    }

    #[test]
    fn broken_percent_encoding_is_a_bad_request() {
        for path in [
            "/v3/volumes/%",
            "/v3/volumes/%4",
            "/v3/volumes/%zz",
            "/v3/volumes/%C3",
            "/v3/volumes/%FF",
            "/v3/volumes/a%00b",
            "/v3/volumes/a%0Ab",
        ] {
            let err = Route::parse(path).unwrap_err();
            assert_eq!(err.status(), 400, "{path}");
        }
    }

    #[test]
    fn attachments_need_microversion_3_27() {
        assert_eq!(Route::Attachments.since(), Some(ApiVersion::ATTACHMENTS));
        assert_eq!(Route::Volumes.since(), None);
        assert_eq!(Route::Images.since(), None);
    }

    #[test]
    fn allow_lists_the_routes_methods() {
        assert_eq!(Route::Volumes.allow(), "GET, POST");
        assert_eq!(Route::ImageFile("i".into()).allow(), "PUT");
        assert_eq!(Route::Attachment("a".into()).allow(), "GET, PUT, DELETE");
    }
}
