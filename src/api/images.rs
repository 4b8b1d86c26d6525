//! `/v2/images` (Glance v2): create, list, show, delete, deactivate/reactivate and upload
//! the image data.
//!
//! An upload streams:
//!
//! 1. a blocking thread calls [`Engine::begin_upload`] and owns the [`ImageUpload`] until
//!    the end, so the upload never moves between threads;
//! 2. only once the engine accepted it does the connection read the body, handing frames to
//!    that thread through a short queue (which bounds the memory one upload holds);
//! 3. the end of the body makes the thread call [`ImageUpload::finish`]. If the client goes
//!    away, stalls, or a write fails, the upload is dropped unfinished, which aborts it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::http::{self, Body};
use super::input;
use super::{views, Context};
use crate::engine::{CreateImage, Engine, ImageUpload};
use crate::error::{Error, ErrorKind, Result};
use crate::identity::Caller;
use crate::model::ImageRecord;

/// Longest pause between two frames of an upload before it is abandoned.
const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Frames read ahead of the writer thread; bounds the memory one upload holds.
const UPLOAD_QUEUE_FRAMES: usize = 4;

/// Fields the server sets; Glance answers 403 when a client tries to.
const READ_ONLY: [&str; 12] = [
    "checksum",
    "created_at",
    "direct_url",
    "file",
    "os_hash_algo",
    "os_hash_value",
    "schema",
    "self",
    "size",
    "status",
    "updated_at",
    "virtual_size",
];

/// Fields Glance keeps for itself; also 403.
const RESERVED: [&str; 4] = ["deleted", "deleted_at", "location", "locations"];

/// Fields a client may set when creating an image.
const WRITABLE: [&str; 7] = [
    "id",
    "name",
    "disk_format",
    "container_format",
    "min_disk",
    "min_ram",
    "visibility",
];

/// `GET /v2/images`.
pub async fn list(ctx: &Context) -> Result<Response<Body>> {
    let images = ctx.run(|engine, who| Ok(engine.list_images(who))).await?;

    let views: Vec<Value> = images.iter().map(views::image).collect();
    let body = json!({
        "images": views,
        "first": "/v2/images",
        "schema": "/v2/schemas/images",
    });
    Ok(http::json(StatusCode::OK, &body))
}

/// `GET /v2/images/{id or name}`.
pub async fn show(ctx: &Context, key: String) -> Result<Response<Body>> {
    let image = ctx
        .run(move |engine, who| engine.get_image(who, &key))
        .await?;
    Ok(http::json(StatusCode::OK, &views::image(&image)))
}

/// `POST /v2/images`.
pub async fn create(ctx: &Context, body: Value) -> Result<Response<Body>> {
    let request = parse_create(&body)?;

    let image = ctx
        .run(move |engine, who| engine.create_image(who, request))
        .await?;

    let mut response = http::json(StatusCode::CREATED, &views::image(&image));
    if let Ok(location) = HeaderValue::from_str(&views::image_href(image.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `DELETE /v2/images/{id}`.
pub async fn delete(ctx: &Context, key: String) -> Result<Response<Body>> {
    let id = image_id(&key)?;
    ctx.run(move |engine, who| engine.delete_image(who, id))
        .await?;
    Ok(http::empty(StatusCode::NO_CONTENT))
}

/// `POST /v2/images/{id}/actions/deactivate` (`active` false) or `.../reactivate` (true).
pub async fn set_active(ctx: &Context, key: String, active: bool) -> Result<Response<Body>> {
    let id = image_id(&key)?;
    ctx.run(move |engine, who| match active {
        true => engine.reactivate_image(who, id),
        false => engine.deactivate_image(who, id),
    })
    .await?;
    Ok(http::empty(StatusCode::NO_CONTENT))
}

/// `PUT /v2/images/{id}/file`: streams the body into the image.
pub async fn upload(
    ctx: &Context,
    key: String,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Response<Body>> {
    http::check_media_type(headers, http::OCTET_STREAM, true)?;
    let id = image_id(&key)?;

    let (ready_tx, ready) = oneshot::channel();
    let (frames, queue) = mpsc::channel(UPLOAD_QUEUE_FRAMES);
    let writer = ctx.run(move |engine, who| write_upload(engine, who, id, ready_tx, queue));
    let (written, fed) = tokio::join!(writer, feed_upload(body, ready, frames));

    match (written?, fed) {
        (Some(_image), _) => Ok(http::empty(StatusCode::NO_CONTENT)),
        (None, Err(err)) => Err(err),
        (None, Ok(())) => Err(Error::internal("The upload ended without being finished.")),
    }
}

/// One step of an upload, from the connection to the writer thread.
enum UploadStep {
    Chunk(Bytes),
    /// The body ended cleanly: make the data the image's.
    End,
}

/// The writer side, on a blocking thread that owns the upload from start to end.
/// `Ok(None)` means the body broke off and the upload was aborted; the feeder knows why.
fn write_upload(
    engine: &Arc<Engine>,
    who: &Caller,
    id: Uuid,
    ready: oneshot::Sender<()>,
    mut queue: mpsc::Receiver<UploadStep>,
) -> Result<Option<ImageRecord>> {
    let mut upload: ImageUpload = engine.begin_upload(who, id)?;
    let _ = ready.send(());

    while let Some(step) = queue.blocking_recv() {
        match step {
            UploadStep::Chunk(data) => upload.write(&data)?,
            UploadStep::End => return upload.finish().map(Some),
        }
    }

    // The feeder went away without `End`: dropping `upload` aborts it.
    Ok(None)
}

/// The feeding side: once the engine accepted the upload, reads the body frame by frame
/// into the queue, then sends `End`. It stops quietly when the writer is gone, whose result
/// then says why.
async fn feed_upload(
    mut body: Incoming,
    ready: oneshot::Receiver<()>,
    frames: mpsc::Sender<UploadStep>,
) -> Result<()> {
    // Reading nothing before the engine agrees also keeps hyper from sending
    // `100 Continue` to a client whose upload is about to be refused.
    if ready.await.is_err() {
        return Ok(());
    }

    loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, body.frame()) => frame,
            () = frames.closed() => return Ok(()),
        };
        let frame = frame.map_err(|_| Error::invalid("The upload stalled and was abandoned."))?;

        let step = match frame {
            None => UploadStep::End,
            Some(Err(err)) => return Err(http::body_broken(&err)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => UploadStep::Chunk(data),
                Err(_trailers) => continue,
            },
        };
        let last = matches!(step, UploadStep::End);
        if frames.send(step).await.is_err() || last {
            return Ok(());
        }
    }
}

/// The id in the path; anything that is not a UUID names no image.
fn image_id(key: &str) -> Result<Uuid> {
    input::uuid_like(key).ok_or_else(|| Error::not_found(format!("No image found with ID {key}.")))
}

fn parse_create(body: &Value) -> Result<CreateImage> {
    let image = input::object(body, "image")?;

    // Glance refuses server-owned fields with 403 before it looks at anything else.
    for key in image.keys() {
        if READ_ONLY.contains(&key.as_str()) {
            let message = format!("Attribute '{key}' is read-only.");
            return Err(Error::new(ErrorKind::Forbidden, message));
        }
        if RESERVED.contains(&key.as_str()) {
            let message = format!("Attribute '{key}' is reserved.");
            return Err(Error::new(ErrorKind::Forbidden, message));
        }
    }
    input::only_fields(image, "image", &WRITABLE)?;

    let id = input::present(image, "id")
        .map(|value| {
            value
                .as_str()
                .and_then(input::canonical_uuid)
                .ok_or_else(|| input::invalid_field("id", value, "Expected a UUID."))
        })
        .transpose()?;
    let count = |key| {
        input::present(image, key)
            .map(|value| input::count(value, key))
            .transpose()
            .map(Option::unwrap_or_default)
    };

    Ok(CreateImage {
        id,
        name: input::optional_string(image, "name")?,
        disk_format: input::optional_string(image, "disk_format")?,
        container_format: input::optional_string(image, "container_format")?,
        min_disk: count("min_disk")?,
        min_ram: count("min_ram")?,
        visibility: input::optional_string(image, "visibility")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: &str = "99999999-8888-7777-6666-555555555555";

    #[test]
    fn create_reads_the_writable_fields() {
        let body = json!({
            "id": IMAGE,
            "name": "cirros",
            "disk_format": "qcow2",
            "container_format": "bare",
            "min_disk": 1,
            "min_ram": 512,
            "visibility": "private",
        });
        let request = parse_create(&body).unwrap();
        assert_eq!(request.id, Some(Uuid::parse_str(IMAGE).unwrap()));
        assert_eq!(request.name.as_deref(), Some("cirros"));
        assert_eq!(request.disk_format.as_deref(), Some("qcow2"));
        assert_eq!(request.container_format.as_deref(), Some("bare"));
        assert_eq!((request.min_disk, request.min_ram), (1, 512));
        assert_eq!(request.visibility.as_deref(), Some("private"));

        let request = parse_create(&json!({})).unwrap();
        assert_eq!(request.id, None);
        assert_eq!((request.min_disk, request.min_ram), (0, 0));
    }

    #[test]
    fn read_only_and_reserved_fields_are_forbidden() {
        for (field, word) in [
            ("status", "read-only"),
            ("size", "read-only"),
            ("locations", "reserved"),
        ] {
            let err = parse_create(&json!({ field: "x", "bogus": 1 })).unwrap_err();
            assert_eq!(err.status(), 403, "{field}");
            assert_eq!(err.message(), format!("Attribute '{field}' is {word}."));
        }
    }

    #[test]
    fn unknown_and_mistyped_fields_are_bad_requests() {
        for body in [
            json!({"bogus": 1}),
            json!({"name": 5}),
            json!({"min_disk": -1}),
            json!({"min_ram": "512"}),
            json!({"id": "6f9619ff8b86d011b42d00c04fc964ff"}),
            json!({"id": 7}),
            json!([]),
        ] {
            assert_eq!(parse_create(&body).unwrap_err().status(), 400, "{body}");
        }
    }

    #[test]
    fn path_ids_that_are_not_uuids_are_not_found() {
        assert_eq!(image_id("cirros").unwrap_err().status(), 404);
        assert!(image_id(IMAGE).is_ok());
    }
}
