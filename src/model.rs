//! The persisted records: volumes, attachments and images, with Cinder's and Glance's names.
//!
//! These are plain data. The rules that move them between statuses live in [`crate::engine`];
//! the JSON views the API shows are built from them in [`crate::api`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One GiB, the unit of volume sizes, `min_disk` and the size checks.
pub const GIB: u64 = 1 << 30;

/// A volume's status, spelled as Cinder spells it.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash, Serialize, Deserialize)]
pub enum VolumeStatus {
    #[serde(rename = "creating")]
    Creating,
    #[serde(rename = "available")]
    Available,
    #[serde(rename = "deleting")]
    Deleting,
    #[serde(rename = "error")]
    Error,
    #[serde(rename = "error_deleting")]
    ErrorDeleting,
    #[serde(rename = "error_managing")]
    ErrorManaging,
    #[serde(rename = "managing")]
    Managing,
    #[serde(rename = "attaching")]
    Attaching,
    #[serde(rename = "in-use")]
    InUse,
    #[serde(rename = "detaching")]
    Detaching,
    #[serde(rename = "maintenance")]
    Maintenance,
    #[serde(rename = "restoring-backup")]
    RestoringBackup,
    #[serde(rename = "error_restoring")]
    ErrorRestoring,
    #[serde(rename = "reserved")]
    Reserved,
    #[serde(rename = "awaiting-transfer")]
    AwaitingTransfer,
    #[serde(rename = "backing-up")]
    BackingUp,
    #[serde(rename = "error_backing-up")]
    ErrorBackingUp,
    #[serde(rename = "error_extending")]
    ErrorExtending,
    #[serde(rename = "downloading")]
    Downloading,
    #[serde(rename = "uploading")]
    Uploading,
    #[serde(rename = "retyping")]
    Retyping,
    #[serde(rename = "extending")]
    Extending,
}

impl VolumeStatus {
    /// Every status, in Cinder's order.
    pub const ALL: [VolumeStatus; 22] = [
        Self::Creating,
        Self::Available,
        Self::Deleting,
        Self::Error,
        Self::ErrorDeleting,
        Self::ErrorManaging,
        Self::Managing,
        Self::Attaching,
        Self::InUse,
        Self::Detaching,
        Self::Maintenance,
        Self::RestoringBackup,
        Self::ErrorRestoring,
        Self::Reserved,
        Self::AwaitingTransfer,
        Self::BackingUp,
        Self::ErrorBackingUp,
        Self::ErrorExtending,
        Self::Downloading,
        Self::Uploading,
        Self::Retyping,
        Self::Extending,
    ];

    /// The status as Cinder writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Available => "available",
            Self::Deleting => "deleting",
            Self::Error => "error",
            Self::ErrorDeleting => "error_deleting",
            Self::ErrorManaging => "error_managing",
            Self::Managing => "managing",
            Self::Attaching => "attaching",
            Self::InUse => "in-use",
            Self::Detaching => "detaching",
            Self::Maintenance => "maintenance",
            Self::RestoringBackup => "restoring-backup",
            Self::ErrorRestoring => "error_restoring",
            Self::Reserved => "reserved",
            Self::AwaitingTransfer => "awaiting-transfer",
            Self::BackingUp => "backing-up",
            Self::ErrorBackingUp => "error_backing-up",
            Self::ErrorExtending => "error_extending",
            Self::Downloading => "downloading",
            Self::Uploading => "uploading",
            Self::Retyping => "retyping",
            Self::Extending => "extending",
        }
    }

    /// Parses a status case-insensitively, as `os-reset_status` does.
    pub fn parse(text: &str) -> Option<Self> {
        let lower = text.to_ascii_lowercase();
        Self::ALL.into_iter().find(|s| s.as_str() == lower)
    }

    /// Whether the status is one of the `error*` family, which refuses new attachments.
    pub fn is_error_like(self) -> bool {
        self.as_str().contains("error")
    }
}

impl fmt::Display for VolumeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attachment's status (Cinder's `attach_status`).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachStatus {
    Reserved,
    Attaching,
    Attached,
    Detaching,
    ErrorAttaching,
    ErrorDetaching,
}

impl AttachStatus {
    /// The status as Cinder writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Attaching => "attaching",
            Self::Attached => "attached",
            Self::Detaching => "detaching",
            Self::ErrorAttaching => "error_attaching",
            Self::ErrorDetaching => "error_detaching",
        }
    }
}

/// A volume as it is stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: Uuid,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Size in GiB.
    pub size: u64,
    pub status: VolumeStatus,
    /// The status a running re-image restores on success; not shown in views.
    #[serde(default)]
    pub previous_status: Option<VolumeStatus>,
    /// Why the volume is `error`, or what the last re-image did; shown in views.
    #[serde(default)]
    pub status_reason: Option<String>,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub bootable: bool,
    /// Glance metadata of the image the volume was last re-imaged from (all strings).
    #[serde(default)]
    pub image_metadata: BTreeMap<String, String>,
    /// Inode number of the volume's file in the mount; stable for the volume's life.
    pub ino: u64,
    /// The running or last re-image, shown in views.
    #[serde(default)]
    pub reimage: Option<ReimageRecord>,
    pub created_at: String,
    pub updated_at: String,
}

/// Where a re-image stands.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReimageState {
    /// The refill is running; the volume is `downloading`.
    Running,
    /// The refill finished and the volume holds the image.
    Succeeded,
    /// The refill failed; the volume is `error` and its content was discarded.
    Failed,
}

/// The running or last re-image of a volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReimageRecord {
    pub image_id: Uuid,
    pub state: ReimageState,
    /// Bytes of the image processed so far.
    pub bytes_done: u64,
    /// Bytes of the image in total (its virtual size).
    pub bytes_total: u64,
    /// Why it failed, in words.
    #[serde(default)]
    pub message: Option<String>,
    pub started_at: String,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// When the blocks of the destroyed content were given back to the file system, after a
    /// successful re-image (see [`crate::volume::VolumeFile::reclaim`]).
    #[serde(default)]
    pub space_reclaimed_at: Option<String>,
}

/// An attachment as it is stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub id: Uuid,
    pub volume_id: Uuid,
    #[serde(default)]
    pub instance_uuid: Option<Uuid>,
    pub attach_status: AttachStatus,
    #[serde(default)]
    pub connector: Option<serde_json::Value>,
    pub attach_mode: String,
    #[serde(default)]
    pub attached_at: Option<String>,
    pub created_at: String,
}

/// An image's status, spelled as Glance spells it.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    Queued,
    Saving,
    Active,
    Killed,
    Deactivated,
}

impl ImageStatus {
    /// The status as Glance writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Saving => "saving",
            Self::Active => "active",
            Self::Killed => "killed",
            Self::Deactivated => "deactivated",
        }
    }
}

/// An image as it is stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: Uuid,
    #[serde(default)]
    pub name: Option<String>,
    pub disk_format: String,
    pub container_format: String,
    pub status: ImageStatus,
    /// Stored size in bytes, once uploaded.
    #[serde(default)]
    pub size: Option<u64>,
    /// Size of the disk the image describes, once uploaded.
    #[serde(default)]
    pub virtual_size: Option<u64>,
    /// Minimum volume size in GiB.
    pub min_disk: u64,
    /// Minimum memory in MiB (recorded for Glance compatibility only).
    pub min_ram: u64,
    /// Hex md5 of the stored bytes.
    #[serde(default)]
    pub checksum: Option<String>,
    /// Hex sha512 of the stored bytes.
    #[serde(default)]
    pub os_hash_value: Option<String>,
    /// Hex xxh3-128 of the stored bytes, which a re-image checks what it reads against (a
    /// hash fast enough not to slow the refill; sha512 stays the published one). Recorded
    /// by uploads of older versions only; newer ones record [`Self::block_hash`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_hash: Option<String>,
    /// Hex block hash of the stored image (see [`crate::verify`]): what a re-image checks
    /// what it reads against, without reading the image's holes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_hash: Option<String>,
    pub visibility: String,
    pub owner_uid: u32,
    pub created_at: String,
    pub updated_at: String,
}

impl ImageRecord {
    /// The hash a re-image checks this image's bytes against.
    pub fn expected_hash(&self) -> crate::verify::Expected {
        use crate::verify::Expected;

        let parse = |hex: &Option<String>| {
            hex.as_deref()
                .and_then(|hex| u128::from_str_radix(hex, 16).ok())
        };
        if let Some(hash) = parse(&self.block_hash) {
            Expected::Blocks(hash)
        } else if let Some(hash) = parse(&self.verify_hash) {
            Expected::Stream(hash)
        } else {
            Expected::None
        }
    }
}

/// Current time in the format Cinder shows (`2026-12-04T17:33:12.000000`).
pub fn timestamp() -> String {
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    now.trim_end_matches('Z').to_string()
}
