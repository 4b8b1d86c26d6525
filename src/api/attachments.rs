//! `/v3/attachments` (microversion 3.27 and later): reserve a volume for an instance, give
//! it a connector, complete it and delete it.

use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use super::http::{self, Body};
use super::input;
use super::version::{self, ApiVersion};
use super::{views, Context};
use crate::error::{Error, Result};

/// `GET /v3/attachments` and `GET /v3/attachments/detail`; both show the full view.
pub async fn list(ctx: &Context) -> Result<Response<Body>> {
    let attachments = ctx
        .run(|engine, who| Ok(engine.list_attachments(who)))
        .await?;

    let views: Vec<Value> = attachments.iter().map(views::attachment).collect();
    Ok(http::json(StatusCode::OK, &json!({ "attachments": views })))
}

/// `GET /v3/attachments/{id}`.
pub async fn show(ctx: &Context, key: String) -> Result<Response<Body>> {
    let id = attachment_id(&key)?;
    let attachment = ctx
        .run(move |engine, who| engine.get_attachment(who, id))
        .await?;
    Ok(attachment_response(&attachment))
}

/// `POST /v3/attachments`.
pub async fn create(ctx: &Context, body: Value) -> Result<Response<Body>> {
    let request = parse_create(&body)?;

    let attachment = ctx
        .run(move |engine, who| {
            engine.create_attachment(who, request.volume, request.instance, request.connector)
        })
        .await?;

    Ok(attachment_response(&attachment))
}

/// `PUT /v3/attachments/{id}`.
pub async fn update(ctx: &Context, key: String, body: Value) -> Result<Response<Body>> {
    let id = attachment_id(&key)?;
    let connector = parse_update(&body)?;

    let attachment = ctx
        .run(move |engine, who| engine.update_attachment(who, id, connector))
        .await?;

    Ok(attachment_response(&attachment))
}

/// `POST /v3/attachments/{id}/action`; the only action is `os-complete`.
pub async fn act(
    ctx: &Context,
    version: ApiVersion,
    key: String,
    body: Value,
) -> Result<Response<Body>> {
    let (action, _arguments) = input::single_action(&body)?;
    match action {
        "os-complete" if !version.has(ApiVersion::ATTACHMENT_COMPLETE) => {
            return Err(version::not_found())
        }
        "os-complete" => {}
        other => return Err(input::no_such_action(other)),
    }
    let id = attachment_id(&key)?;

    ctx.run(move |engine, who| engine.complete_attachment(who, id))
        .await?;
    Ok(http::empty(StatusCode::NO_CONTENT))
}

/// `DELETE /v3/attachments/{id}`.
pub async fn delete(ctx: &Context, key: String) -> Result<Response<Body>> {
    let id = attachment_id(&key)?;
    ctx.run(move |engine, who| engine.delete_attachment(who, id))
        .await?;
    Ok(http::json(StatusCode::OK, &json!({ "attachments": [] })))
}

fn attachment_response(attachment: &crate::model::AttachmentRecord) -> Response<Body> {
    http::json(
        StatusCode::OK,
        &json!({ "attachment": views::attachment(attachment) }),
    )
}

/// The id in the path; anything that is not a UUID names no attachment.
fn attachment_id(key: &str) -> Result<Uuid> {
    input::uuid_like(key)
        .ok_or_else(|| Error::not_found(format!("Attachment {key} could not be found.")))
}

/// The `POST /v3/attachments` body once its types are checked.
#[derive(Debug, PartialEq)]
struct NewAttachment {
    volume: Uuid,
    instance: Option<Uuid>,
    connector: Option<Value>,
}

fn parse_create(body: &Value) -> Result<NewAttachment> {
    let attachment = attachment_object(body)?;
    input::only_fields(
        attachment,
        "attachment",
        &["volume_uuid", "instance_uuid", "connector", "mode"],
    )?;

    let volume = attachment
        .get("volume_uuid")
        .ok_or_else(|| input::missing_field("attachment", "volume_uuid"))?;
    let connector = input::present(attachment, "connector")
        .map(|value| input::object(value, "connector").map(|_| value.clone()))
        .transpose()?;

    // The engine makes read-write attachments only; a read-only request must not be
    // silently granted write access.
    match input::optional_string(attachment, "mode")?.as_deref() {
        None | Some("rw") => {}
        Some("ro") => {
            return Err(Error::invalid(
                "Read-only attachments (mode \"ro\") are not supported.",
            ))
        }
        Some(_) => {
            let value = &attachment["mode"];
            return Err(input::invalid_field(
                "mode",
                value,
                "Expected \"rw\" or \"ro\".",
            ));
        }
    }

    Ok(NewAttachment {
        volume: input::uuid(volume, "volume_uuid")?,
        instance: input::optional_uuid(attachment, "instance_uuid")?,
        connector,
    })
}

fn parse_update(body: &Value) -> Result<Value> {
    let attachment = attachment_object(body)?;
    input::only_fields(attachment, "attachment", &["connector"])?;

    let connector = input::present(attachment, "connector")
        .ok_or_else(|| input::missing_field("attachment", "connector"))?;
    input::object(connector, "connector")?;
    Ok(connector.clone())
}

/// The `attachment` object that wraps both request bodies.
fn attachment_object(body: &Value) -> Result<&input::Object> {
    let body = input::object(body, "body")?;
    input::only_fields(body, "body", &["attachment"])?;
    let attachment = body
        .get("attachment")
        .ok_or_else(|| input::missing_field("body", "attachment"))?;
    input::object(attachment, "attachment")
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOLUME: &str = "11111111-2222-3333-4444-555555555555";
    const INSTANCE: &str = "99999999-8888-7777-6666-555555555555";

    #[test]
    fn create_reads_volume_instance_and_connector() {
        let body = json!({"attachment": {
            "volume_uuid": VOLUME,
            "instance_uuid": INSTANCE,
            "connector": {"host": "node-1"},
            "mode": "rw",
        }});
        assert_eq!(
            parse_create(&body).unwrap(),
            NewAttachment {
                volume: Uuid::parse_str(VOLUME).unwrap(),
                instance: Some(Uuid::parse_str(INSTANCE).unwrap()),
                connector: Some(json!({"host": "node-1"})),
            }
        );

        let body = json!({"attachment": {"volume_uuid": VOLUME, "connector": null}});
        let request = parse_create(&body).unwrap();
        assert_eq!((request.instance, request.connector), (None, None));
    }

    #[test]
    fn create_refuses_bad_bodies() {
        for body in [
            json!({}),
            json!({"attachment": {}}),
            json!({"attachment": {"volume_uuid": "x"}}),
            json!({"attachment": {"volume_uuid": VOLUME, "instance_uuid": "x"}}),
            json!({"attachment": {"volume_uuid": VOLUME, "connector": "host"}}),
            json!({"attachment": {"volume_uuid": VOLUME, "mode": "rx"}}),
            json!({"attachment": {"volume_uuid": VOLUME, "mode": "ro"}}),
            json!({"attachment": {"volume_uuid": VOLUME, "device": "/dev/vdb"}}),
            json!({"attachment": {"volume_uuid": VOLUME}, "extra": 1}),
        ] {
            assert_eq!(parse_create(&body).unwrap_err().status(), 400, "{body}");
        }
    }

    #[test]
    fn update_needs_a_connector_object() {
        let body = json!({"attachment": {"connector": {"host": "node-1"}}});
        assert_eq!(parse_update(&body).unwrap(), json!({"host": "node-1"}));

        for body in [
            json!({"attachment": {}}),
            json!({"attachment": {"connector": null}}),
            json!({"attachment": {"connector": []}}),
            json!({"attachment": {"connector": {}, "mode": "rw"}}),
        ] {
            assert_eq!(parse_update(&body).unwrap_err().status(), 400, "{body}");
        }
    }

    #[test]
    fn path_ids_that_are_not_uuids_are_not_found() {
        assert_eq!(attachment_id("detail-ish").unwrap_err().status(), 404);
        assert!(attachment_id(VOLUME).is_ok());
    }
}
