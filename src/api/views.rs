//! The JSON views of records, shaped like Cinder's and Glance's so their clients can read
//! them, plus our own `status_reason` and `reimage` fields on volumes.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::engine::VolumeInfo;
use crate::model::VolumeRecord;
use crate::model::{AttachStatus, AttachmentRecord, ImageRecord, ReimageRecord, ReimageState};

/// Where a volume lives in the API.
pub fn volume_href(id: Uuid) -> String {
    format!("/v3/volumes/{id}")
}

/// Where an image lives in the API.
pub fn image_href(id: Uuid) -> String {
    format!("/v2/images/{id}")
}

/// The short entry of `GET /v3/volumes`.
pub fn volume_summary(volume: &VolumeRecord) -> Value {
    json!({
        "id": volume.id,
        "name": volume.name,
        "links": volume_links(volume.id),
    })
}

/// The full volume view of `GET /v3/volumes/{id}` and `GET /v3/volumes/detail`.
pub fn volume_detail(info: &VolumeInfo) -> Value {
    let volume = &info.record;

    // Cinder lists only attachments that completed; reservations show in /v3/attachments.
    let attachments: Vec<Value> = info
        .attachments
        .iter()
        .filter(|a| a.attach_status == AttachStatus::Attached)
        .map(volume_attachment)
        .collect();

    let mut view = json!({
        "id": volume.id,
        "name": volume.name,
        "description": volume.description,
        "size": volume.size,
        "status": volume.status.as_str(),
        "status_reason": volume.status_reason,
        "bootable": if volume.bootable { "true" } else { "false" },
        "user_id": volume.owner_uid.to_string(),
        "owner_uid": volume.owner_uid,
        "attachments": attachments,
        "multiattach": false,
        "metadata": {},
        "reimage": volume.reimage.as_ref().map(reimage),
        "created_at": volume.created_at,
        "updated_at": volume.updated_at,
        "links": volume_links(volume.id),
    });
    if !volume.image_metadata.is_empty() {
        view["volume_image_metadata"] = json!(volume.image_metadata);
    }
    view
}

fn volume_links(id: Uuid) -> Value {
    json!([{ "rel": "self", "href": volume_href(id) }])
}

/// One entry of a volume's `attachments`; `id` is the volume's id, as Cinder has it.
fn volume_attachment(attachment: &AttachmentRecord) -> Value {
    json!({
        "id": attachment.volume_id,
        "attachment_id": attachment.id,
        "volume_id": attachment.volume_id,
        "server_id": attachment.instance_uuid,
        "attached_at": attachment.attached_at,
        "host_name": null,
        "device": null,
    })
}

fn reimage(job: &ReimageRecord) -> Value {
    let state = match job.state {
        ReimageState::Running => "running",
        ReimageState::Succeeded => "succeeded",
        ReimageState::Failed => "failed",
    };
    json!({
        "image_id": job.image_id,
        "state": state,
        "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total,
        "message": job.message,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "space_reclaimed_at": job.space_reclaimed_at,
    })
}

/// The attachment view of the `/v3/attachments` API.
pub fn attachment(attachment: &AttachmentRecord) -> Value {
    // The volume is a local file, so there is nothing to connect to but its path, which the
    // client finds under the mount point.
    let connection_info = match attachment.connector {
        Some(_) => json!({ "driver_volume_type": "local", "device_path": null }),
        None => json!({}),
    };
    json!({
        "id": attachment.id,
        "status": attachment.attach_status.as_str(),
        "instance": attachment.instance_uuid,
        "volume_id": attachment.volume_id,
        "attached_at": attachment.attached_at,
        "detached_at": null,
        "attach_mode": attachment.attach_mode,
        "connection_info": connection_info,
    })
}

/// The Glance v2 image view.
pub fn image(image: &ImageRecord) -> Value {
    let href = image_href(image.id);
    json!({
        "id": image.id,
        "name": image.name,
        "status": image.status.as_str(),
        "disk_format": image.disk_format,
        "container_format": image.container_format,
        "size": image.size,
        "virtual_size": image.virtual_size,
        "min_disk": image.min_disk,
        "min_ram": image.min_ram,
        "checksum": image.checksum,
        "os_hash_algo": image.os_hash_value.as_ref().map(|_| "sha512"),
        "os_hash_value": image.os_hash_value,
        "visibility": image.visibility,
        "protected": false,
        "owner": image.owner_uid.to_string(),
        "tags": [],
        "created_at": glance_time(&image.created_at),
        "updated_at": glance_time(&image.updated_at),
        "file": format!("{href}/file"),
        "self": href,
        "schema": "/v2/schemas/image",
    })
}

/// Glance shows times to the second with a `Z`; records keep Cinder's microseconds.
fn glance_time(stored: &str) -> String {
    let seconds = stored.split('.').next().unwrap_or(stored);
    match seconds.ends_with('Z') {
        true => seconds.to_string(),
        false => format!("{seconds}Z"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{ImageStatus, VolumeStatus};

    const VOLUME: &str = "11111111-2222-3333-4444-555555555555";
    const ATTACHMENT: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    const IMAGE: &str = "99999999-8888-7777-6666-555555555555";

    fn volume_record() -> VolumeRecord {
        VolumeRecord {
            id: Uuid::parse_str(VOLUME).unwrap(),
            name: "root-disk".to_string(),
            description: None,
            size: 2,
            status: VolumeStatus::Available,
            previous_status: Some(VolumeStatus::Available),
            status_reason: None,
            owner_uid: 1000,
            owner_gid: 1000,
            bootable: false,
            image_metadata: BTreeMap::new(),
            ino: 7,
            reimage: None,
            created_at: "2026-12-04T17:33:12.000000".to_string(),
            updated_at: "2026-12-04T17:33:13.000000".to_string(),
        }
    }

    fn attachment_record(status: AttachStatus) -> AttachmentRecord {
        AttachmentRecord {
            id: Uuid::parse_str(ATTACHMENT).unwrap(),
            volume_id: Uuid::parse_str(VOLUME).unwrap(),
            instance_uuid: None,
            attach_status: status,
            connector: None,
            attach_mode: "rw".to_string(),
            attached_at: None,
            created_at: "2026-12-04T17:33:12.000000".to_string(),
        }
    }

    #[test]
    fn volume_summary_has_id_name_and_self_link() {
        let view = volume_summary(&volume_record());
        assert_eq!(
            view,
            json!({
                "id": VOLUME,
                "name": "root-disk",
                "links": [{"rel": "self", "href": format!("/v3/volumes/{VOLUME}")}],
            })
        );
    }

    #[test]
    fn volume_detail_uses_cinder_spellings() {
        let info = VolumeInfo {
            record: volume_record(),
            attachments: vec![],
        };
        let view = volume_detail(&info);

        assert_eq!(view["bootable"], "false");
        assert_eq!(view["user_id"], "1000");
        assert_eq!(view["owner_uid"], 1000);
        assert_eq!(view["status"], "available");
        assert_eq!(view["size"], 2);
        assert_eq!(view["multiattach"], false);
        assert_eq!(view["metadata"], json!({}));
        assert_eq!(view["status_reason"], Value::Null);
        assert_eq!(view["reimage"], Value::Null);
        assert!(view.get("volume_image_metadata").is_none());
        assert!(view.get("previous_status").is_none());
    }

    #[test]
    fn volume_detail_shows_image_metadata_and_reimage_progress() {
        let mut record = volume_record();
        record.bootable = true;
        record.status = VolumeStatus::Downloading;
        record
            .image_metadata
            .insert("image_id".to_string(), IMAGE.to_string());
        record.reimage = Some(ReimageRecord {
            image_id: Uuid::parse_str(IMAGE).unwrap(),
            state: ReimageState::Running,
            bytes_done: 512,
            bytes_total: 1024,
            message: None,
            started_at: "2026-12-04T17:40:00.000000".to_string(),
            finished_at: None,
            space_reclaimed_at: None,
        });
        let view = volume_detail(&VolumeInfo {
            record,
            attachments: vec![],
        });

        assert_eq!(view["bootable"], "true");
        assert_eq!(view["volume_image_metadata"], json!({ "image_id": IMAGE }));
        assert_eq!(
            view["reimage"],
            json!({
                "image_id": IMAGE,
                "state": "running",
                "bytes_done": 512,
                "bytes_total": 1024,
                "message": null,
                "started_at": "2026-12-04T17:40:00.000000",
                "finished_at": null,
                "space_reclaimed_at": null,
            })
        );
    }

    #[test]
    fn volume_detail_lists_only_completed_attachments() {
        let mut attached = attachment_record(AttachStatus::Attached);
        attached.attached_at = Some("2026-12-04T17:35:00.000000".to_string());
        let info = VolumeInfo {
            record: volume_record(),
            attachments: vec![attachment_record(AttachStatus::Reserved), attached],
        };
        let view = volume_detail(&info);

        assert_eq!(
            view["attachments"],
            json!([{
                "id": VOLUME,
                "attachment_id": ATTACHMENT,
                "volume_id": VOLUME,
                "server_id": null,
                "attached_at": "2026-12-04T17:35:00.000000",
                "host_name": null,
                "device": null,
            }])
        );
    }

    #[test]
    fn attachment_connection_info_appears_with_a_connector() {
        let mut record = attachment_record(AttachStatus::Reserved);
        assert_eq!(attachment(&record)["connection_info"], json!({}));

        record.connector = Some(json!({"host": "node-1"}));
        record.attach_status = AttachStatus::Attaching;
        let view = attachment(&record);
        assert_eq!(
            view["connection_info"],
            json!({"driver_volume_type": "local", "device_path": null})
        );
        assert_eq!(view["status"], "attaching");
        assert_eq!(view["volume_id"], VOLUME);
        assert_eq!(view["detached_at"], Value::Null);
        assert_eq!(view["attach_mode"], "rw");
    }

    #[test]
    fn image_view_follows_glance() {
        let record = ImageRecord {
            id: Uuid::parse_str(IMAGE).unwrap(),
            name: Some("cirros".to_string()),
            disk_format: "raw".to_string(),
            container_format: "bare".to_string(),
            status: ImageStatus::Active,
            size: Some(1024),
            virtual_size: Some(1024),
            min_disk: 1,
            min_ram: 0,
            checksum: Some("abc".to_string()),
            os_hash_value: Some("def".to_string()),
            verify_hash: None,
            block_hash: None,
            visibility: "private".to_string(),
            owner_uid: 0,
            created_at: "2026-12-04T17:33:12.000000".to_string(),
            updated_at: "2026-12-04T17:33:12.000000".to_string(),
        };
        let view = image(&record);

        assert_eq!(view["os_hash_algo"], "sha512");
        assert_eq!(view["owner"], "0");
        assert_eq!(view["created_at"], "2026-12-04T17:33:12Z");
        assert_eq!(view["self"], format!("/v2/images/{IMAGE}"));
        assert_eq!(view["file"], format!("/v2/images/{IMAGE}/file"));
        assert_eq!(view["schema"], "/v2/schemas/image");
        assert_eq!(view["tags"], json!([]));
        assert_eq!(view["protected"], false);

        let queued = ImageRecord {
            status: ImageStatus::Queued,
            os_hash_value: None,
            ..record
        };
        assert_eq!(image(&queued)["os_hash_algo"], Value::Null);
        assert_eq!(image(&queued)["status"], "queued");
    }
}
