//! `/v3/volumes`: list, show, create, delete and the volume actions (`os-reimage`,
//! `os-reset_status`, `os-extend`).

use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use super::http::{self, Body};
use super::input::{self, Object};
use super::version::{self, ApiVersion};
use super::{views, Context};
use crate::engine::{CreateVolume, ResetStatus};
use crate::error::{Error, Result};
use crate::identity;

/// `GET /v3/volumes` (`detail` false) and `GET /v3/volumes/detail` (`detail` true).
pub async fn list(ctx: &Context, detail: bool) -> Result<Response<Body>> {
    let volumes = ctx.run(|engine, who| Ok(engine.list_volumes(who))).await?;

    let views: Vec<Value> = match detail {
        true => volumes.iter().map(views::volume_detail).collect(),
        false => volumes
            .iter()
            .map(|v| views::volume_summary(&v.record))
            .collect(),
    };
    Ok(http::json(StatusCode::OK, &json!({ "volumes": views })))
}

/// `GET /v3/volumes/{id or name}`.
pub async fn show(ctx: &Context, key: String) -> Result<Response<Body>> {
    let volume = ctx
        .run(move |engine, who| engine.get_volume(who, &key))
        .await?;
    Ok(http::json(
        StatusCode::OK,
        &json!({ "volume": views::volume_detail(&volume) }),
    ))
}

/// `POST /v3/volumes`.
pub async fn create(ctx: &Context, body: Value) -> Result<Response<Body>> {
    let request = parse_create(&body)?;

    let volume = ctx
        .run(move |engine, who| {
            // A user name is looked up here: NSS may reach a directory server and block.
            let owner_uid = request.owner.map(Owner::resolve).transpose()?;
            let create = CreateVolume {
                name: request.name,
                size: request.size,
                description: request.description,
                owner_uid,
            };
            engine.create_volume(who, create)
        })
        .await?;

    let body = json!({ "volume": views::volume_detail(&volume) });
    Ok(http::json(StatusCode::ACCEPTED, &body))
}

/// `DELETE /v3/volumes/{id or name}`.
pub async fn delete(ctx: &Context, key: String) -> Result<Response<Body>> {
    ctx.run(move |engine, who| engine.delete_volume(who, &key))
        .await?;
    Ok(http::empty(StatusCode::ACCEPTED))
}

/// `POST /v3/volumes/{id or name}/action`.
pub async fn act(
    ctx: &Context,
    version: ApiVersion,
    key: String,
    body: Value,
) -> Result<Response<Body>> {
    let action = parse_action(version, &body)?;

    ctx.run(move |engine, who| match action {
        VolumeAction::Reimage { image, reserved } => {
            engine.reimage(who, &key, &image.to_string(), reserved)
        }
        VolumeAction::ResetStatus(request) => engine.reset_status(who, &key, request),
        VolumeAction::Extend { new_size } => engine.extend(who, &key, new_size),
    })
    .await?;

    Ok(http::empty(StatusCode::ACCEPTED))
}

/// Who is to own a new volume, as the request names them.
#[derive(Debug, PartialEq)]
enum Owner {
    Uid(u32),
    UserName(String),
}

impl Owner {
    /// The uid, looking a user name up in the password database.
    fn resolve(self) -> Result<u32> {
        match self {
            Owner::Uid(uid) => Ok(uid),
            Owner::UserName(name) => identity::user_id(&name)
                .ok_or_else(|| Error::invalid(format!("Owner {name:?} is not a known user."))),
        }
    }
}

/// The `POST /v3/volumes` body once its types are checked.
#[derive(Debug, PartialEq)]
struct NewVolume {
    name: String,
    size: u64,
    description: Option<String>,
    owner: Option<Owner>,
}

fn parse_create(body: &Value) -> Result<NewVolume> {
    let body = input::object(body, "body")?;
    input::only_fields(body, "body", &["volume"])?;
    let volume = body
        .get("volume")
        .ok_or_else(|| input::missing_field("body", "volume"))?;
    let volume = input::object(volume, "volume")?;
    input::only_fields(volume, "volume", &["name", "size", "description", "owner"])?;

    let name =
        input::present(volume, "name").ok_or_else(|| input::missing_field("volume", "name"))?;
    let size =
        input::present(volume, "size").ok_or_else(|| input::missing_field("volume", "size"))?;
    let owner = match input::present(volume, "owner") {
        None => None,
        Some(Value::String(name)) => Some(Owner::UserName(name.clone())),
        Some(value) => value
            .as_u64()
            .and_then(|uid| u32::try_from(uid).ok())
            .map(Owner::Uid)
            .map(Some)
            .ok_or_else(|| input::invalid_field("owner", value, "Expected a uid or user name."))?,
    };

    Ok(NewVolume {
        name: input::string(name, "name")?.to_owned(),
        size: input::count(size, "size")?,
        description: input::optional_string(volume, "description")?,
        owner,
    })
}

/// A volume action once its arguments are checked.
#[derive(Debug)]
enum VolumeAction {
    Reimage { image: Uuid, reserved: bool },
    ResetStatus(ResetStatus),
    Extend { new_size: u64 },
}

/// Reads an action body in Cinder's order: one key, a known action, the microversion gate,
/// then the arguments. A too-old microversion is answered before the arguments are read.
fn parse_action(version: ApiVersion, body: &Value) -> Result<VolumeAction> {
    let (action, arguments) = input::single_action(body)?;
    match action {
        "os-reimage" if !version.has(ApiVersion::REIMAGE) => Err(version::not_found()),
        "os-reimage" => parse_reimage(arguments),
        "os-reset_status" => parse_reset_status(arguments),
        "os-extend" => parse_extend(arguments),
        other => Err(input::no_such_action(other)),
    }
}

fn parse_reimage(arguments: &Value) -> Result<VolumeAction> {
    let arguments = input::object(arguments, "os-reimage")?;
    input::only_fields(arguments, "os-reimage", &["image_id", "reimage_reserved"])?;

    let image = arguments
        .get("image_id")
        .ok_or_else(|| input::missing_field("os-reimage", "image_id"))?;
    let image = input::uuid(image, "image_id")?;

    // Absent means false; `null` is present and not a boolean, so it is refused.
    let reserved = match arguments.get("reimage_reserved") {
        None => false,
        Some(value) => input::bool_like(value).ok_or_else(|| {
            input::invalid_field("reimage_reserved", value, "Expected a boolean.")
        })?,
    };

    Ok(VolumeAction::Reimage { image, reserved })
}

fn parse_reset_status(arguments: &Value) -> Result<VolumeAction> {
    const FIELDS: [&str; 3] = ["status", "attach_status", "migration_status"];
    let arguments = input::object(arguments, "os-reset_status")?;
    input::only_fields(arguments, "os-reset_status", &FIELDS)?;

    let field = |key| non_empty_string(arguments, key);
    let request = ResetStatus {
        status: field("status")?,
        attach_status: field("attach_status")?,
        migration_status: field("migration_status")?,
    };
    if request.status.is_none()
        && request.attach_status.is_none()
        && request.migration_status.is_none()
    {
        return Err(Error::invalid(format!(
            "Invalid input for field/attribute os-reset_status. Give at least one non-empty \
             field of {}.",
            FIELDS.join(", ")
        )));
    }

    Ok(VolumeAction::ResetStatus(request))
}

fn parse_extend(arguments: &Value) -> Result<VolumeAction> {
    let arguments = input::object(arguments, "os-extend")?;
    input::only_fields(arguments, "os-extend", &["new_size"])?;

    let new_size = input::present(arguments, "new_size")
        .ok_or_else(|| input::missing_field("os-extend", "new_size"))?;
    let new_size = input::count(new_size, "new_size")?;

    Ok(VolumeAction::Extend { new_size })
}

/// A string field where `null` and `""` both mean "leave unchanged".
fn non_empty_string(object: &Object, key: &str) -> Result<Option<String>> {
    Ok(input::optional_string(object, key)?.filter(|text| !text.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const IMAGE: &str = "6f9619ff-8b86-d011-b42d-00c04fc964ff";

    fn latest() -> ApiVersion {
        ApiVersion::MAX
    }

    #[test]
    fn create_reads_name_size_description_and_owner() {
        let body = json!({"volume": {"name": "db", "size": 10, "description": "x", "owner": 7}});
        assert_eq!(
            parse_create(&body).unwrap(),
            NewVolume {
                name: "db".to_string(),
                size: 10,
                description: Some("x".to_string()),
                owner: Some(Owner::Uid(7)),
            }
        );

        let body = json!({"volume": {"name": "db", "size": 1, "owner": "alice"}});
        let request = parse_create(&body).unwrap();
        assert_eq!(request.owner, Some(Owner::UserName("alice".to_string())));
        assert_eq!(request.description, None);
    }

    #[test]
    fn create_refuses_missing_unknown_and_mistyped_fields() {
        let cases = [
            (json!({}), "volume"),
            (json!({"volume": {"size": 1}}), "name"),
            (json!({"volume": {"name": "db"}}), "size"),
            (json!({"volume": {"name": null, "size": 1}}), "name"),
            (
                json!({"volume": {"name": "db", "size": 1, "volume_type": "x"}}),
                "volume_type",
            ),
            (
                json!({"volume": {"name": "db", "size": 1}, "extra": 1}),
                "extra",
            ),
            (json!({"volume": {"name": 5, "size": 1}}), "name"),
            (json!({"volume": {"name": "db", "size": "1"}}), "size"),
            (json!({"volume": {"name": "db", "size": -1}}), "size"),
            (json!({"volume": {"name": "db", "size": 1.5}}), "size"),
            (
                json!({"volume": {"name": "db", "size": 1, "description": 3}}),
                "description",
            ),
            (
                json!({"volume": {"name": "db", "size": 1, "owner": -1}}),
                "owner",
            ),
            (
                json!({"volume": {"name": "db", "size": 1, "owner": 4294967296u64}}),
                "owner",
            ),
            (
                json!({"volume": {"name": "db", "size": 1, "owner": true}}),
                "owner",
            ),
            (json!({"volume": []}), "volume"),
            (json!([]), "body"),
        ];
        for (body, field) in cases {
            let err = parse_create(&body).unwrap_err();
            assert_eq!(err.status(), 400, "{body}");
            assert!(err.message().contains(field), "{body}: {}", err.message());
        }
    }

    #[test]
    fn reimage_normalizes_the_image_id() {
        let body = json!({"os-reimage": {"image_id": "{6F9619FF8B86D011B42D00C04FC964FF}"}});
        match parse_action(latest(), &body).unwrap() {
            VolumeAction::Reimage { image, reserved } => {
                assert_eq!(image.to_string(), IMAGE);
                assert!(!reserved);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reimage_reads_string_and_json_booleans() {
        for (value, expected) in [
            (json!(true), true),
            (json!("yes"), true),
            (json!("0"), false),
        ] {
            let body = json!({"os-reimage": {"image_id": IMAGE, "reimage_reserved": value}});
            match parse_action(latest(), &body).unwrap() {
                VolumeAction::Reimage { reserved, .. } => assert_eq!(reserved, expected),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn reimage_refuses_bad_reserved_flags() {
        for value in [json!(null), json!(1), json!("TrUe"), json!("Y")] {
            let body = json!({"os-reimage": {"image_id": IMAGE, "reimage_reserved": value}});
            let err = parse_action(latest(), &body).unwrap_err();
            assert_eq!(err.status(), 400);
            assert!(
                err.message()
                    .starts_with("Invalid input for field/attribute reimage_reserved. Value: "),
                "{}",
                err.message()
            );
        }
    }

    #[test]
    fn reimage_refuses_bad_bodies() {
        for body in [
            json!({"os-reimage": {}}),
            json!({"os-reimage": null}),
            json!({"os-reimage": {"image_id": "nope"}}),
            json!({"os-reimage": {"image_id": 5}}),
            json!({"os-reimage": {"image_id": null}}),
            json!({"os-reimage": {"image_id": IMAGE, "force": true}}),
        ] {
            assert_eq!(
                parse_action(latest(), &body).unwrap_err().status(),
                400,
                "{body}"
            );
        }
    }

    #[test]
    fn reimage_before_3_68_is_a_bare_404_before_validation() {
        let body = json!({"os-reimage": {"image_id": "nope", "force": 1}});
        let err = parse_action(ApiVersion::new(3, 67), &body).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::VersionNotFound);

        let body = json!({"os-reimage": {"image_id": IMAGE}});
        assert!(parse_action(ApiVersion::REIMAGE, &body).is_ok());
    }

    #[test]
    fn unknown_actions_and_extra_keys_are_refused() {
        let err = parse_action(latest(), &json!({"os-attach": {}})).unwrap_err();
        assert_eq!(err.message(), "There is no such action: os-attach");

        let body = json!({"os-extend": {"new_size": 2}, "os-reimage": {"image_id": IMAGE}});
        let err = parse_action(latest(), &body).unwrap_err();
        assert!(err.message().contains("too many body keys"));

        // Too many keys is found before the version gate hides the action.
        let err = parse_action(ApiVersion::MIN, &body).unwrap_err();
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn reset_status_needs_one_non_empty_field() {
        let body = json!({"os-reset_status": {"status": "available", "attach_status": ""}});
        match parse_action(ApiVersion::MIN, &body).unwrap() {
            VolumeAction::ResetStatus(request) => {
                assert_eq!(request.status.as_deref(), Some("available"));
                assert_eq!(request.attach_status, None);
                assert_eq!(request.migration_status, None);
            }
            other => panic!("unexpected {other:?}"),
        }

        for body in [
            json!({"os-reset_status": {}}),
            json!({"os-reset_status": {"status": ""}}),
            json!({"os-reset_status": {"status": null, "migration_status": ""}}),
            json!({"os-reset_status": {"status": 1}}),
            json!({"os-reset_status": {"state": "available"}}),
        ] {
            assert_eq!(
                parse_action(ApiVersion::MIN, &body).unwrap_err().status(),
                400,
                "{body}"
            );
        }
    }

    #[test]
    fn extend_needs_an_integer_size() {
        let body = json!({"os-extend": {"new_size": 4}});
        assert!(matches!(
            parse_action(ApiVersion::MIN, &body),
            Ok(VolumeAction::Extend { new_size: 4 })
        ));
        for body in [
            json!({"os-extend": {}}),
            json!({"os-extend": {"new_size": "4"}}),
            json!({"os-extend": {"new_size": 4, "force": true}}),
        ] {
            let err = parse_action(ApiVersion::MIN, &body).unwrap_err();
            assert_eq!(err.status(), 400, "{body}");
        }
    }
}
