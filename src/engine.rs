//! The engine: every rule of volumes, attachments, images and re-image, behind one lock.
//! (INTERFACE DRAFT: bodies are being written; signatures are stable.)

use std::sync::Arc;

use serde_json::Value;
use uuid::Uuid;

use crate::error::Result;
use crate::identity::Caller;
use crate::model::{AttachmentRecord, ImageRecord, VolumeRecord};

/// A volume with its attachments; `record.reimage.bytes_done` is live while running.
#[derive(Clone, Debug)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    /// Attachments of the volume.
    pub attachments: Vec<AttachmentRecord>,
}

/// `POST /v3/volumes` body, validated by the API layer for types only.
#[derive(Clone, Debug, Default)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
    pub description: Option<String>,
    /// Owner uid named by an administrator; `None` means the caller.
    pub owner_uid: Option<u32>,
}

/// `os-reset_status` body.
#[derive(Clone, Debug, Default)]
pub struct ResetStatus {
    pub status: Option<String>,
    pub attach_status: Option<String>,
    pub migration_status: Option<String>,
}

/// `POST /v2/images` body.
#[derive(Clone, Debug, Default)]
pub struct CreateImage {
    pub id: Option<Uuid>,
    pub name: Option<String>,
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    pub min_disk: u64,
    pub min_ram: u64,
    pub visibility: Option<String>,
}

/// The daemon's state and rules.
pub struct Engine {}

/// A running upload of image data; dropping it without [`ImageUpload::finish`] aborts it.
pub struct ImageUpload {}

impl ImageUpload {
    /// Appends a chunk of the body.
    pub fn write(&mut self, _chunk: &[u8]) -> Result<()> {
        unimplemented!()
    }

    /// Makes the data durable, checks it and marks the image active.
    pub fn finish(self) -> Result<ImageRecord> {
        unimplemented!()
    }
}

impl Engine {
    pub fn list_volumes(&self, _who: &Caller) -> Vec<VolumeInfo> {
        unimplemented!()
    }
    /// `key` is a volume id or name.
    pub fn get_volume(&self, _who: &Caller, _key: &str) -> Result<VolumeInfo> {
        unimplemented!()
    }
    pub fn create_volume(&self, _who: &Caller, _req: CreateVolume) -> Result<VolumeInfo> {
        unimplemented!()
    }
    pub fn delete_volume(&self, _who: &Caller, _key: &str) -> Result<()> {
        unimplemented!()
    }
    /// `image` is an image id (or, from the control file, a name).
    pub fn reimage(&self, _who: &Caller, _key: &str, _image: &str, _reserved: bool) -> Result<()> {
        unimplemented!()
    }
    pub fn reset_status(&self, _who: &Caller, _key: &str, _req: ResetStatus) -> Result<()> {
        unimplemented!()
    }
    pub fn extend(&self, _who: &Caller, _key: &str, _new_size: u64) -> Result<()> {
        unimplemented!()
    }
    pub fn list_attachments(&self, _who: &Caller) -> Vec<AttachmentRecord> {
        unimplemented!()
    }
    pub fn get_attachment(&self, _who: &Caller, _id: Uuid) -> Result<AttachmentRecord> {
        unimplemented!()
    }
    pub fn create_attachment(
        &self,
        _who: &Caller,
        _volume: Uuid,
        _instance: Option<Uuid>,
        _connector: Option<Value>,
    ) -> Result<AttachmentRecord> {
        unimplemented!()
    }
    pub fn update_attachment(
        &self,
        _who: &Caller,
        _id: Uuid,
        _connector: Value,
    ) -> Result<AttachmentRecord> {
        unimplemented!()
    }
    pub fn complete_attachment(&self, _who: &Caller, _id: Uuid) -> Result<()> {
        unimplemented!()
    }
    pub fn delete_attachment(&self, _who: &Caller, _id: Uuid) -> Result<()> {
        unimplemented!()
    }
    pub fn list_images(&self, _who: &Caller) -> Vec<ImageRecord> {
        unimplemented!()
    }
    /// `key` is an image id or name.
    pub fn get_image(&self, _who: &Caller, _key: &str) -> Result<ImageRecord> {
        unimplemented!()
    }
    pub fn create_image(&self, _who: &Caller, _req: CreateImage) -> Result<ImageRecord> {
        unimplemented!()
    }
    pub fn begin_upload(self: &Arc<Self>, _who: &Caller, _id: Uuid) -> Result<ImageUpload> {
        unimplemented!()
    }
    pub fn delete_image(&self, _who: &Caller, _id: Uuid) -> Result<()> {
        unimplemented!()
    }
    pub fn deactivate_image(&self, _who: &Caller, _id: Uuid) -> Result<()> {
        unimplemented!()
    }
    pub fn reactivate_image(&self, _who: &Caller, _id: Uuid) -> Result<()> {
        unimplemented!()
    }
}
