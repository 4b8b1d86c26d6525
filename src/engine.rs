//! The engine: every rule of volumes, attachments, images and re-image, behind one lock.
//!
//! All records live in one [`State`] guarded by one mutex. A change is made on a copy, saved
//! durably, and only then published, so a failed save changes nothing and a crash leaves the
//! last published state. Checks and the change they guard happen under the same lock: the
//! policy chosen from a volume's status, the attachment count and the compare-and-swap into
//! `downloading` see one consistent volume (Cinder reads these at different moments).
//!
//! A re-image then runs on its own thread (`Engine::run_refill`): fence the volume's I/O,
//! refill the backing file, make it durable, lift the fence, invalidate every kernel cache
//! the daemon can reach, and only then compare-and-swap out of `downloading`.
//!
//! Every publication of a new state goes through `Engine::publish`, which emits the volume
//! events (created, deleted, status) the change amounts to, under the state lock; re-image
//! events are emitted next to the publication they describe. See [`crate::events`].

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use serde_json::Value;
use sha2::Sha512;
use uuid::Uuid;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::events::{self, EventBus, EventKind};
use crate::identity::{self, Caller};
use crate::metrics::{self, Metrics, Outcome, VolumeSample};
use crate::model::{
    timestamp, AttachStatus, AttachmentRecord, ImageRecord, ImageStatus, ReimageRecord,
    ReimageState, VolumeRecord, VolumeStatus, GIB,
};
use crate::policy::{Policy, Target};
use crate::store::{SparseWriter, State, Store};
use crate::volume::{discard, VolumeFile};
use crate::{loopdev, refill};

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

/// Disk formats Glance knows; only those in [`SUPPORTED_DISK_FORMATS`] can be stored now.
const KNOWN_DISK_FORMATS: &[&str] = &[
    "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop",
];
const SUPPORTED_DISK_FORMATS: &[&str] = &["raw", "qcow2"];
const KNOWN_CONTAINER_FORMATS: &[&str] = &[
    "ami",
    "ari",
    "aki",
    "bare",
    "ovf",
    "ova",
    "docker",
    "compressed",
];
const VISIBILITIES: &[&str] = &["public", "private", "shared", "community"];
const MIGRATION_STATUSES: &[&str] = &[
    "migrating",
    "error",
    "success",
    "completing",
    "none",
    "starting",
];

/// The daemon's state and rules.
pub struct Engine {
    config: Config,
    store: Store,
    policy: RwLock<Policy>,
    state: Mutex<State>,
    files: RwLock<HashMap<u64, Arc<VolumeFile>>>,
    notifier: Mutex<Option<fuser::Notifier>>,
    stopping: AtomicBool,
    refills: Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    events: EventBus,
}

/// How often a running refill reports its progress as an event.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl Engine {
    /// Loads the state, repairs what a crash left behind, and opens every volume.
    ///
    /// The caller must hold the state directory's lock.
    pub fn open(config: Config, store: Store) -> std::result::Result<Arc<Self>, String> {
        let policy = Policy::new(&config.admin_group, &config.policy)?;
        let mut state = store
            .load()
            .map_err(|e| format!("cannot load state: {e}"))?;
        recover(&store, &mut state)?;
        store
            .save(&state)
            .map_err(|e| format!("cannot save the recovered state: {e}"))?;

        let mut files = HashMap::new();
        for volume in state.volumes.values() {
            let file = open_volume_file(&store, volume)
                .map_err(|e| format!("cannot open volume {}: {e}", volume.name))?;
            files.insert(volume.ino, Arc::new(file));
        }

        Ok(Arc::new(Self {
            config,
            store,
            policy: RwLock::new(policy),
            state: Mutex::new(state),
            files: RwLock::new(files),
            notifier: Mutex::new(None),
            stopping: AtomicBool::new(false),
            refills: Mutex::new(Vec::new()),
            metrics: Arc::new(Metrics::default()),
            events: EventBus::default(),
        }))
    }

    /// The configuration the daemon runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters shared with the data path.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// The volume events, for followers of `GET /v3/events`.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Whether `who` may see the volume of `owner_uid`, and so its events (`volume:get`).
    pub fn may_see(&self, who: &Caller, owner_uid: u32) -> bool {
        self.policy()
            .allows("volume:get", who, &Target::owned_by(owner_uid))
    }

    /// Every metric in Prometheus' text format, for callers `volumed:metrics` allows.
    pub fn metrics_text(&self, who: &Caller) -> Result<String> {
        self.policy()
            .enforce("volumed:metrics", who, &Target::default())?;

        // A snapshot under the lock; the rendering runs without it.
        let samples: Vec<VolumeSample> = {
            let state = lock(&self.state);
            state
                .volumes
                .values()
                .map(|v| VolumeSample {
                    id: v.id,
                    name: v.name.clone(),
                    status: v.status,
                    file: None,
                })
                .collect()
        };
        let mut files: HashMap<Uuid, Arc<VolumeFile>> =
            self.files().into_iter().map(|f| (f.id, f)).collect();
        let samples: Vec<VolumeSample> = samples
            .into_iter()
            .map(|mut sample| {
                sample.file = files.remove(&sample.id);
                sample
            })
            .collect();
        Ok(metrics::render(
            &samples,
            &self.metrics,
            self.events.followers(),
        ))
    }

    /// Gives the engine the means to invalidate kernel caches of the mount.
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        *lock(&self.notifier) = Some(notifier);
    }

    /// Replaces the policy (SIGHUP); returns the lines that changed.
    pub fn reload_policy(&self, policy: Policy) -> Vec<String> {
        let mut current = self.policy.write().unwrap_or_else(|p| p.into_inner());
        let changes = policy.changes_from(&current);
        *current = policy;
        changes
    }

    /// The data path of the volume with inode `ino`.
    pub fn file_by_ino(&self, ino: u64) -> Option<Arc<VolumeFile>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ino)
            .cloned()
    }

    /// The data path of the volume named `name`.
    pub fn file_by_name(&self, name: &str) -> Option<Arc<VolumeFile>> {
        let files = self.files.read().unwrap_or_else(|p| p.into_inner());
        files.values().find(|f| f.name == name).cloned()
    }

    /// Every volume file, for directory listings.
    pub fn files(&self) -> Vec<Arc<VolumeFile>> {
        let files = self.files.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = files.values().cloned().collect();
        all.sort_by_key(|f| f.ino);
        all
    }

    // ----- volumes -------------------------------------------------------------------------

    /// Volumes the caller may see.
    pub fn list_volumes(&self, who: &Caller) -> Vec<VolumeInfo> {
        let state = lock(&self.state);
        let policy = self.policy();
        state
            .volumes
            .values()
            .filter(|v| policy.allows("volume:get", who, &owner(v)))
            .map(|v| self.volume_info(&state, v))
            .collect()
    }

    /// One volume by id or name.
    pub fn get_volume(&self, who: &Caller, key: &str) -> Result<VolumeInfo> {
        let state = lock(&self.state);
        let volume = self.visible_volume(&state, who, key)?;
        Ok(self.volume_info(&state, volume))
    }

    /// Creates a volume with a sparse backing file; it is `available` at once.
    pub fn create_volume(&self, who: &Caller, req: CreateVolume) -> Result<VolumeInfo> {
        self.policy()
            .enforce("volume:create", who, &Target { owner_uid: None })?;
        validate_volume_name(&req.name)?;
        self.validate_size(req.size)?;
        if let Some(description) = &req.description {
            if description.len() > 255 {
                return Err(Error::invalid("description: at most 255 characters"));
            }
        }
        let (owner_uid, owner_gid) = match req.owner_uid {
            Some(uid) if uid != who.uid => {
                if !self.policy().is_admin(who) {
                    return Err(Error::new(
                        ErrorKind::Forbidden,
                        "only an administrator may create a volume for another owner",
                    ));
                }
                (uid, identity::primary_group(uid).unwrap_or(uid))
            }
            _ => (who.uid, who.gid),
        };

        // The file exists durably before the record that names it.
        let id = Uuid::new_v4();
        self.store
            .create_volume_file(id, req.size.saturating_mul(GIB))
            .map_err(|e| Error::io("cannot create the backing file", &e))?;

        let now = timestamp();
        let created = self.update(|state| {
            if state.volumes.values().any(|v| v.name == req.name) {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("a volume named {} already exists", req.name),
                ));
            }
            let record = VolumeRecord {
                id,
                name: req.name.clone(),
                description: req.description.clone(),
                size: req.size,
                status: VolumeStatus::Available,
                previous_status: None,
                status_reason: None,
                owner_uid,
                owner_gid,
                bootable: false,
                image_metadata: Default::default(),
                ino: state.next_ino,
                reimage: None,
                created_at: now.clone(),
                updated_at: now.clone(),
            };
            state.next_ino += 1;
            state.volumes.insert(id, record.clone());
            Ok(record)
        });
        let record = match created {
            Ok(record) => record,
            Err(e) => {
                let _ = self.store.remove_volume_file(id);
                return Err(e);
            }
        };

        let file = open_volume_file(&self.store, &record)
            .map_err(|e| Error::io("cannot open the backing file", &e))?;
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.ino, Arc::new(file));
        tracing::info!(volume = ?record.name, id = %id, size_gib = record.size, owner = owner_uid,
            "volume created");
        Ok(VolumeInfo {
            record,
            attachments: Vec::new(),
        })
    }

    /// Deletes a volume that is not attached, busy or open.
    pub fn delete_volume(&self, who: &Caller, key: &str) -> Result<()> {
        // The kernel sends RELEASE after close(2) returns; give a file closed just before the
        // request (`losetup -d; volumectl delete`) a moment to be released.
        let by_key = self
            .files()
            .into_iter()
            .find(|f| f.name == key || f.id.to_string() == key);
        if let Some(file) = by_key {
            let deadline = Instant::now() + std::time::Duration::from_secs(1);
            while file.open_handles() > 0 && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }

        let removed = self.update(|state| {
            let volume = self.visible_volume(state, who, key)?.clone();
            self.policy()
                .enforce("volume:delete", who, &owner(&volume))?;

            let deletable = [
                VolumeStatus::Available,
                VolumeStatus::Error,
                VolumeStatus::ErrorRestoring,
                VolumeStatus::ErrorExtending,
                VolumeStatus::ErrorManaging,
            ];
            if !deletable.contains(&volume.status) {
                return Err(Error::new(
                    ErrorKind::InvalidStatus,
                    format!(
                        "Invalid volume: Volume status must be available or error or \
                         error_restoring or error_extending or error_managing and must not \
                         be attached, but current status is {}.",
                        volume.status
                    ),
                ));
            }
            if state.attachments.values().any(|a| a.volume_id == volume.id) {
                return Err(Error::new(
                    ErrorKind::InvalidStatus,
                    format!("Invalid volume: volume {} has attachments.", volume.name),
                ));
            }
            if let Some(file) = self.file_by_ino(volume.ino) {
                if file.refill_running() {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!("volume {} is still being re-imaged", volume.name),
                    ));
                }
                if file.open_handles() > 0 {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "volume {} is open ({} handles, e.g. a loop device or a VM): close \
                             it first",
                            volume.name,
                            file.open_handles()
                        ),
                    ));
                }
            }
            state.volumes.remove(&volume.id);
            Ok(volume)
        })?;

        if let Some(file) = self
            .files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&removed.ino)
        {
            file.mark_deleted();
        }
        if let Err(e) = self.store.remove_volume_file(removed.id) {
            tracing::warn!(volume = ?removed.name, "cannot remove the backing file: {e}");
        }
        self.forget_entry(&removed.name);
        tracing::info!(volume = ?removed.name, id = %removed.id, "volume deleted");
        Ok(())
    }

    /// Grows an `available` volume to `new_size` GiB.
    pub fn extend(&self, who: &Caller, key: &str, new_size: u64) -> Result<()> {
        let mut state = lock(&self.state);
        let volume = self.visible_volume(&state, who, key)?.clone();
        self.policy()
            .enforce("volume:extend", who, &owner(&volume))?;
        if volume.status != VolumeStatus::Available {
            return Err(Error::new(
                ErrorKind::InvalidStatus,
                format!(
                    "Invalid volume: Volume status must be available to extend, but current \
                     status is {}.",
                    volume.status
                ),
            ));
        }
        if new_size <= volume.size {
            return Err(Error::invalid(format!(
                "Invalid input received: New size for extend must be greater than current \
                 size. (current: {}, extended: {new_size}).",
                volume.size
            )));
        }
        self.validate_size(new_size)?;

        let file = self
            .file_by_ino(volume.ino)
            .ok_or_else(|| Error::internal("volume has no backing file"))?;
        file.grow(new_size * GIB)
            .map_err(|e| Error::io("cannot grow the backing file", &e))?;
        let mut next = state.clone();
        if let Some(v) = next.volumes.get_mut(&volume.id) {
            v.size = new_size;
            v.updated_at = timestamp();
        }
        self.store
            .save(&next)
            .map_err(|e| Error::io("cannot save state", &e))?;
        self.publish(&mut state, next);
        drop(state);

        self.invalidate(volume.ino, false);
        tracing::info!(volume = ?volume.name, from_gib = volume.size, to_gib = new_size,
            "volume extended");
        Ok(())
    }

    /// Administrator override of a volume's status (`os-reset_status`).
    pub fn reset_status(&self, who: &Caller, key: &str, req: ResetStatus) -> Result<()> {
        let status = non_empty(&req.status);
        let attach_status = non_empty(&req.attach_status);
        let migration_status = non_empty(&req.migration_status);
        if status.is_none() && attach_status.is_none() && migration_status.is_none() {
            return Err(Error::invalid(
                "Must specify 'status', 'attach_status' or 'migration_status' for update.",
            ));
        }
        let status = status
            .map(|s| {
                VolumeStatus::parse(s).ok_or_else(|| {
                    Error::invalid(format!(
                        "Invalid input for field/attribute status. Value: {s}."
                    ))
                })
            })
            .transpose()?;
        let detach = match attach_status.map(str::to_ascii_lowercase).as_deref() {
            None | Some("attached") => false,
            Some("detached") => true,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "Invalid input for field/attribute attach_status. Value: {other}."
                )))
            }
        };
        if let Some(m) = migration_status {
            if !MIGRATION_STATUSES.contains(&m.to_ascii_lowercase().as_str()) {
                return Err(Error::invalid(format!(
                    "Invalid input for field/attribute migration_status. Value: {m}."
                )));
            }
        }

        self.update(|state| {
            let volume = self.visible_volume(state, who, key)?.clone();
            self.policy().enforce(
                "volume_extension:volume_admin_actions:reset_status",
                who,
                &owner(&volume),
            )?;
            let attached = state.attachments.values().any(|a| a.volume_id == volume.id);
            let refilling = self
                .file_by_ino(volume.ino)
                .is_some_and(|f| f.refill_running());
            if refilling {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "volume {} is being re-imaged; its status is decided when the refill \
                         ends",
                        volume.name
                    ),
                ));
            }
            match status {
                Some(VolumeStatus::Deleting) => {
                    return Err(Error::invalid("Cannot reset-state to deleting"));
                }
                Some(VolumeStatus::Downloading) => {
                    return Err(Error::invalid(
                        "Cannot reset-state to downloading: only a re-image sets it",
                    ));
                }
                Some(VolumeStatus::InUse) if !attached => {
                    return Err(Error::invalid(
                        "Cannot reset-state to in-use because volume does not have any \
                         attachments.",
                    ));
                }
                _ => {}
            }

            let record = state.volumes.get_mut(&volume.id).expect("checked above");
            if let Some(status) = status {
                record.status = status;
                record.status_reason = Some(format!("status reset to {status} by uid {}", who.uid));
            }
            record.updated_at = timestamp();
            if detach {
                state.attachments.retain(|_, a| a.volume_id != volume.id);
                recompute_status(state, volume.id);
            }
            tracing::info!(volume = ?volume.name, status = ?status.map(|s| s.as_str()),
                detach, "status reset by administrator");
            Ok(())
        })
    }

    // ----- re-image ------------------------------------------------------------------------

    /// Accepts a re-image (Cinder's `os-reimage`); returns once the volume is `downloading`.
    ///
    /// `image` is an image id, or a name when it is unambiguous. Checks in Cinder's order:
    /// volume lookup (404), image lookup (404), policy by the volume's status (403), more
    /// than one attachment (409), compare-and-swap into `downloading` (400), image checks
    /// (400, nothing changed). All of them under one lock, then one durable write.
    pub fn reimage(&self, who: &Caller, key: &str, image: &str, reserved: bool) -> Result<()> {
        let (volume, image) = {
            let mut state = lock(&self.state);
            let volume = self.visible_volume(&state, who, key)?.clone();
            let image = self.visible_image(&state, who, image)?.clone();

            let action = if volume.status == VolumeStatus::Reserved {
                "volume:reimage_reserved"
            } else {
                "volume:reimage"
            };
            self.policy().enforce(action, who, &owner(&volume))?;

            let attachments = state
                .attachments
                .values()
                .filter(|a| a.volume_id == volume.id)
                .count();
            if attachments > 1 {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    "Cannot re-image a volume which is attached to more than one server.",
                ));
            }

            let mut allowed = vec![VolumeStatus::Available, VolumeStatus::Error];
            if reserved {
                allowed.push(VolumeStatus::Reserved);
            }
            if !allowed.contains(&volume.status) {
                let names: Vec<_> = allowed.iter().map(|s| s.as_str()).collect();
                return Err(Error::new(
                    ErrorKind::InvalidStatus,
                    format!(
                        "Invalid volume: Volume {} status must be {}, but current status is {}.",
                        volume.id,
                        names.join(" or "),
                        volume.status
                    ),
                ));
            }
            check_image_fits(&image, &volume)?;

            let file = self
                .file_by_ino(volume.ino)
                .ok_or_else(|| Error::internal("volume has no backing file"))?;
            if !file.start_refill() {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("volume {} is still being re-imaged", volume.name),
                ));
            }

            let mut next = state.clone();
            let record = next.volumes.get_mut(&volume.id).expect("looked up above");
            record.previous_status = Some(record.status);
            record.status = VolumeStatus::Downloading;
            record.status_reason = None;
            record.updated_at = timestamp();
            record.reimage = Some(ReimageRecord {
                image_id: image.id,
                state: ReimageState::Running,
                bytes_done: 0,
                bytes_total: image.virtual_size.unwrap_or(0),
                message: None,
                started_at: timestamp(),
                finished_at: None,
                space_reclaimed_at: None,
            });
            if let Err(e) = self.store.save(&next) {
                file.end_refill();
                return Err(Error::io("cannot save state", &e));
            }
            self.events.emit(
                &volume,
                EventKind::ReimageStarted {
                    image_id: image.id,
                    bytes_total: image.virtual_size.unwrap_or(0),
                },
            );
            self.publish(&mut state, next);
            file.metrics
                .reimages_started
                .fetch_add(1, Ordering::Relaxed);

            // The fence closes before the request is answered: I/O issued after a client
            // saw it accepted must wait for the new content, never reach the old one.
            file.gate.close();
            (volume, image)
        };

        tracing::info!(volume = ?volume.name, image = %image.id, from = %volume.status,
            "re-image accepted");
        self.spawn_refill(volume, image)
    }

    fn spawn_refill(&self, volume: VolumeRecord, image: ImageRecord) -> Result<()> {
        let accepted = Instant::now();
        let (volume_copy, image_copy) = (volume.clone(), image.clone());
        let engine = self.self_arc()?;
        let name = format!("refill-{}", volume.ino);
        let spawned = std::thread::Builder::new()
            .name(name)
            .spawn(move || engine.run_refill(volume, image, accepted));
        match spawned {
            Ok(handle) => {
                let mut refills = lock(&self.refills);
                refills.retain(|h| !h.is_finished());
                refills.push(handle);
                Ok(())
            }
            Err(e) => {
                let reason = format!("cannot start the refill: {e}");
                let elapsed = accepted.elapsed();
                self.finish_reimage(&volume_copy, &image_copy, &Err(reason.clone()), elapsed);
                if let Some(file) = self.file_by_ino(volume_copy.ino) {
                    file.gate.unfence();
                }
                Err(Error::internal(reason))
            }
        }
    }

    /// Runs one refill to its end; see the module documentation for the order of steps.
    fn run_refill(&self, volume: VolumeRecord, image: ImageRecord, accepted: Instant) {
        let Some(file) = self.file_by_ino(volume.ino) else {
            return;
        };

        // The gate was closed when the request was accepted; wait for I/O already in flight,
        // and for the reclaim after an earlier re-image to finish its chunk.
        let maintenance = file.maintenance();
        file.gate.drain();
        let started_at = lock(&self.state)
            .volumes
            .get(&volume.id)
            .and_then(|v| v.reimage.as_ref())
            .map(|r| r.started_at.clone())
            .unwrap_or_default();

        let params = refill::RefillParams {
            image_len: image.size.unwrap_or(0),
            expected_hash: image.expected_hash(),
            window: (self.config.refill_window_mib << 20) as usize,
            rate_limit: self.config.refill_rate_limit << 20,
            cancel: &self.stopping,
        };
        let path = self.store.image_path(image.id);

        // The progress reporter ends when its channel's sender, held by this scope, drops:
        // it has reported its last event before the outcome is published.
        let result = std::thread::scope(|scope| {
            let (refill_over, over_rx) = std::sync::mpsc::channel::<()>();
            scope.spawn(|| self.report_progress(&file, &volume, &image, over_rx));
            let result = match image.disk_format.as_str() {
                "qcow2" => refill::refill_qcow2(&file, &path, params),
                _ => refill::refill_raw(&file, &path, params),
            };
            drop(refill_over);
            result
        });
        if result.is_err() {
            // A failed re-image leaves nothing of the old content and nothing half-written.
            if let Err(e) =
                discard(file.backing(), file.size()).and_then(|()| file.backing().sync_data())
            {
                tracing::error!(volume = ?volume.name, "cannot discard after failed refill: {e}");
            }
        }

        // Every cache the daemon can reach is clean before the outcome is published, so a
        // client that sees the re-image finished never reads old content. Loop devices are
        // flushed only after the fence lifts: their dirty buffers are written back through
        // the volume itself.
        file.gate.unfence();
        self.invalidate(volume.ino, true);
        loopdev::flush_loop_devices(&self.config.mountpoint.join(&volume.name));
        self.finish_reimage(&volume, &image, &result, accepted.elapsed());
        drop(maintenance);

        if let Ok(stats) = result {
            self.reclaim_space(&file, &volume, &started_at, stats.zeroed);
        }
    }

    /// Gives back the blocks of the content a re-image destroyed, behind the re-image: the
    /// volume is already usable, and I/O waits for one chunk's punch at most. A new re-image,
    /// a delete or shutdown stops it; the next re-image's reclaim picks up what is left.
    fn reclaim_space(
        &self,
        file: &VolumeFile,
        volume: &VolumeRecord,
        started_at: &str,
        span: Option<(u64, u64)>,
    ) {
        let started = Instant::now();
        let stop = || self.stopping.load(Ordering::Acquire) || file.refill_running();
        let done = match span {
            Some((start, end)) => match file.reclaim(start, end, &stop) {
                Ok(done) => done,
                Err(e) => {
                    tracing::warn!(volume = ?volume.name, "cannot give back freed blocks: {e}");
                    return;
                }
            },
            None => true,
        };
        if !done {
            return;
        }

        let published = self.update(|state| {
            let reimage = state
                .volumes
                .get_mut(&volume.id)
                .and_then(|v| v.reimage.as_mut())
                .filter(|r| r.started_at == started_at);
            if let Some(reimage) = reimage {
                reimage.space_reclaimed_at = Some(timestamp());
            }
            Ok(())
        });
        if let Err(e) = published {
            tracing::warn!(volume = ?volume.name, "cannot record the reclaim: {}", e.message());
        }
        tracing::debug!(volume = ?volume.name, seconds = started.elapsed().as_secs_f64(),
            "freed blocks given back");
    }

    /// Emits a progress event every [`PROGRESS_EVERY`] while the refill moves, until
    /// `refill_over` disconnects.
    fn report_progress(
        &self,
        file: &VolumeFile,
        volume: &VolumeRecord,
        image: &ImageRecord,
        refill_over: std::sync::mpsc::Receiver<()>,
    ) {
        let mut reported = 0;
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            refill_over.recv_timeout(PROGRESS_EVERY)
        {
            let bytes_done = file.refill_done.load(Ordering::Acquire);
            if bytes_done == reported {
                continue;
            }
            reported = bytes_done;
            let progress = EventKind::ReimageProgress {
                image_id: image.id,
                bytes_done,
                bytes_total: image.virtual_size.unwrap_or(0),
            };
            self.events.emit(volume, progress);
        }
    }

    /// The completion write: a compare-and-swap out of `downloading`. Emits the outcome and
    /// counts it under the lock (so whoever sees the outcome finds it counted), then logs it.
    fn finish_reimage(
        &self,
        volume: &VolumeRecord,
        image: &ImageRecord,
        result: &std::result::Result<refill::RefillStats, String>,
        elapsed: Duration,
    ) {
        let mut state = lock(&self.state);
        let mut next = state.clone();
        let Some(record) = next.volumes.get_mut(&volume.id) else {
            return;
        };
        let now = timestamp();
        let still_downloading = record.status == VolumeStatus::Downloading;

        if let Some(reimage) = record.reimage.as_mut() {
            reimage.finished_at = Some(now.clone());
            match result {
                Ok(stats) => {
                    reimage.state = ReimageState::Succeeded;
                    reimage.bytes_done = stats.scanned;
                }
                Err(reason) => {
                    reimage.state = ReimageState::Failed;
                    reimage.message = Some(reason.clone());
                    if let Some(file) = self.file_by_ino(volume.ino) {
                        reimage.bytes_done = file.refill_done.load(Ordering::Acquire);
                    }
                }
            }
        }

        // Someone (an administrator) moved the volume on meanwhile: record the outcome only.
        if still_downloading {
            match result {
                Ok(_) => {
                    let restored = record.previous_status.unwrap_or(VolumeStatus::Available);
                    record.status = restored;
                    record.bootable = true;
                    record.image_metadata = image_metadata(image);
                    record.status_reason = (restored == VolumeStatus::Error).then(|| {
                        format!(
                            "re-imaged from image {}; the volume keeps its previous status \
                             error, reset it with os-reset_status",
                            image.id
                        )
                    });
                }
                Err(reason) => {
                    // The content was discarded: no image describes it any more.
                    record.image_metadata.clear();
                    record.bootable = false;
                    record.previous_status = Some(VolumeStatus::Downloading);
                    record.status = VolumeStatus::Error;
                    record.status_reason = Some(format!(
                        "re-image from image {} failed and the volume's content was \
                         discarded: {reason}",
                        image.id
                    ));
                }
            }
        }
        record.updated_at = now;

        let bytes_done = record.reimage.as_ref().map_or(0, |r| r.bytes_done);
        let outcome = match result {
            Ok(_) => EventKind::ReimageSucceeded {
                image_id: image.id,
                bytes_done,
                duration_seconds: elapsed.as_secs_f64(),
            },
            Err(reason) => EventKind::ReimageFailed {
                image_id: image.id,
                reason: reason.clone(),
                duration_seconds: elapsed.as_secs_f64(),
            },
        };

        // Publishing is not optional: the refill is over whatever the disk says. If the save
        // fails, the next successful save carries it, and a restart turns `downloading` into
        // `error` anyway.
        if let Err(e) = self.store.save(&next) {
            tracing::error!(volume = ?volume.name, "cannot save the re-image outcome: {e}");
        }
        self.events.emit(volume, outcome);
        self.publish(&mut state, next);
        self.count_reimage_outcome(volume, result, bytes_done, elapsed);

        // Under the same lock that `reimage` claims it with: once the outcome is visible, a
        // new re-image or a delete is accepted.
        if let Some(file) = self.file_by_ino(volume.ino) {
            file.end_refill();
        }
        drop(state);

        let seconds = elapsed.as_secs_f64();
        match result {
            Ok(stats) => tracing::info!(volume = ?volume.name, image = %image.id, seconds,
                bytes = stats.scanned, written = stats.written, "re-image finished"),
            Err(reason) => tracing::error!(volume = ?volume.name, image = %image.id, seconds,
                kind = refill::failure_kind(reason), reason = ?reason, "re-image failed"),
        }
    }

    // ----- attachments ---------------------------------------------------------------------

    /// Attachments of volumes the caller may see.
    pub fn list_attachments(&self, who: &Caller) -> Vec<AttachmentRecord> {
        let state = lock(&self.state);
        let policy = self.policy();
        state
            .attachments
            .values()
            .filter(|a| {
                state
                    .volumes
                    .get(&a.volume_id)
                    .is_some_and(|v| policy.allows("volume:get", who, &owner(v)))
            })
            .cloned()
            .collect()
    }

    /// One attachment.
    pub fn get_attachment(&self, who: &Caller, id: Uuid) -> Result<AttachmentRecord> {
        let state = lock(&self.state);
        self.visible_attachment(&state, who, id).cloned()
    }

    /// Reserves a volume for an instance (`POST /v3/attachments`).
    pub fn create_attachment(
        &self,
        who: &Caller,
        volume: Uuid,
        instance: Option<Uuid>,
        connector: Option<Value>,
    ) -> Result<AttachmentRecord> {
        let created = self.update(|state| {
            let record = self
                .visible_volume(state, who, &volume.to_string())?
                .clone();
            self.policy()
                .enforce("volume:attachment_create", who, &owner(&record))?;

            if record.status.is_error_like() {
                return Err(Error::new(
                    ErrorKind::InvalidStatus,
                    format!(
                        "Invalid volume: Volume {} status must be available or downloading \
                         to reserve, but the current status is {}.",
                        record.id, record.status
                    ),
                ));
            }
            // Cinder lets a `downloading` volume be reserved and then overwrites the
            // reservation when the re-image ends; we refuse instead.
            let same_instance = instance.is_some()
                && state
                    .attachments
                    .values()
                    .any(|a| a.volume_id == record.id && a.instance_uuid == instance);
            let reusable = matches!(record.status, VolumeStatus::InUse | VolumeStatus::Reserved)
                && same_instance;
            if record.status == VolumeStatus::Available {
                let v = state.volumes.get_mut(&record.id).expect("looked up");
                v.status = VolumeStatus::Reserved;
                v.updated_at = timestamp();
            } else if !reusable {
                return Err(Error::new(
                    ErrorKind::InvalidStatus,
                    format!(
                        "Invalid volume: Volume {} status must be available to reserve, but \
                         the current status is {}.",
                        record.id, record.status
                    ),
                ));
            }

            let attachment = AttachmentRecord {
                id: Uuid::new_v4(),
                volume_id: record.id,
                instance_uuid: instance,
                attach_status: AttachStatus::Reserved,
                connector: None,
                attach_mode: "rw".to_string(),
                attached_at: None,
                created_at: timestamp(),
            };
            state.attachments.insert(attachment.id, attachment.clone());
            Ok(attachment)
        })?;

        match connector {
            Some(connector) => self.update_attachment(who, created.id, connector),
            None => Ok(created),
        }
    }

    /// Gives an attachment its connector; volume and attachment become `attaching`.
    pub fn update_attachment(
        &self,
        who: &Caller,
        id: Uuid,
        connector: Value,
    ) -> Result<AttachmentRecord> {
        if !connector.is_object() {
            return Err(Error::invalid("connector must be an object"));
        }
        self.update(|state| {
            let attachment = self.visible_attachment(state, who, id)?.clone();
            let volume = state.volumes[&attachment.volume_id].clone();
            self.policy()
                .enforce("volume:attachment_update", who, &owner(&volume))?;
            if volume.status.is_error_like() || volume.status == VolumeStatus::Downloading {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "Volume {} is {}; it cannot be attached now.",
                        volume.id, volume.status
                    ),
                ));
            }

            let a = state.attachments.get_mut(&id).expect("looked up");
            a.connector = Some(connector.clone());
            a.attach_status = AttachStatus::Attaching;
            let updated = a.clone();
            let v = state.volumes.get_mut(&volume.id).expect("looked up");
            v.status = VolumeStatus::Attaching;
            v.updated_at = timestamp();
            Ok(updated)
        })
    }

    /// Marks an attachment attached; the volume becomes `in-use`.
    pub fn complete_attachment(&self, who: &Caller, id: Uuid) -> Result<()> {
        self.update(|state| {
            let attachment = self.visible_attachment(state, who, id)?.clone();
            let volume = state.volumes[&attachment.volume_id].clone();
            self.policy()
                .enforce("volume:attachment_complete", who, &owner(&volume))?;
            if volume.status == VolumeStatus::Downloading {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("Volume {} is being re-imaged.", volume.id),
                ));
            }

            let a = state.attachments.get_mut(&id).expect("looked up");
            a.attach_status = AttachStatus::Attached;
            a.attached_at = Some(timestamp());
            let v = state.volumes.get_mut(&volume.id).expect("looked up");
            v.status = VolumeStatus::InUse;
            v.updated_at = timestamp();
            Ok(())
        })
    }

    /// Removes an attachment; the volume's status follows its remaining attachments.
    pub fn delete_attachment(&self, who: &Caller, id: Uuid) -> Result<()> {
        self.update(|state| {
            let attachment = self.visible_attachment(state, who, id)?.clone();
            let volume = state.volumes[&attachment.volume_id].clone();
            self.policy()
                .enforce("volume:attachment_delete", who, &owner(&volume))?;
            state.attachments.remove(&id);
            recompute_status(state, volume.id);
            Ok(())
        })
    }

    // ----- images --------------------------------------------------------------------------

    /// Images the caller may see.
    pub fn list_images(&self, who: &Caller) -> Vec<ImageRecord> {
        let state = lock(&self.state);
        let admin = self.policy().is_admin(who);
        state
            .images
            .values()
            .filter(|i| image_visible(i, who, admin))
            .cloned()
            .collect()
    }

    /// One image by id or unambiguous name.
    pub fn get_image(&self, who: &Caller, key: &str) -> Result<ImageRecord> {
        let state = lock(&self.state);
        self.visible_image(&state, who, key).cloned()
    }

    /// Registers an image record (`queued`); its data comes with an upload.
    pub fn create_image(&self, who: &Caller, req: CreateImage) -> Result<ImageRecord> {
        self.policy().enforce(
            "image:add_image",
            who,
            &Target {
                owner_uid: Some(who.uid),
            },
        )?;
        let disk_format = req.disk_format.clone().unwrap_or_else(|| "raw".to_string());
        if !KNOWN_DISK_FORMATS.contains(&disk_format.as_str()) {
            return Err(Error::invalid(format!(
                "Invalid disk format '{disk_format}'; known formats: {}",
                KNOWN_DISK_FORMATS.join(", ")
            )));
        }
        if !SUPPORTED_DISK_FORMATS.contains(&disk_format.as_str()) {
            return Err(Error::invalid(format!(
                "disk_format '{disk_format}' is not supported yet; supported: {}",
                SUPPORTED_DISK_FORMATS.join(", ")
            )));
        }
        let container_format = req
            .container_format
            .clone()
            .unwrap_or_else(|| "bare".to_string());
        if !KNOWN_CONTAINER_FORMATS.contains(&container_format.as_str()) {
            return Err(Error::invalid(format!(
                "Invalid container format '{container_format}'"
            )));
        }
        if container_format != "bare" {
            return Err(Error::invalid(format!(
                "container_format '{container_format}' is not supported; supported: bare"
            )));
        }
        let visibility = req
            .visibility
            .clone()
            .unwrap_or_else(|| "shared".to_string());
        if !VISIBILITIES.contains(&visibility.as_str()) {
            return Err(Error::invalid(format!(
                "Invalid visibility value: {visibility}"
            )));
        }
        if visibility != "private" && visibility != "shared" && !self.policy().is_admin(who) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                format!("only an administrator may create {visibility} images"),
            ));
        }
        if let Some(name) = &req.name {
            if name.len() > 255 || name.chars().any(char::is_control) {
                return Err(Error::invalid(
                    "name: at most 255 characters, no control characters",
                ));
            }
        }

        let now = timestamp();
        let record = ImageRecord {
            id: req.id.unwrap_or_else(Uuid::new_v4),
            name: req.name.clone(),
            disk_format,
            container_format,
            status: ImageStatus::Queued,
            size: None,
            virtual_size: None,
            min_disk: req.min_disk,
            min_ram: req.min_ram,
            checksum: None,
            os_hash_value: None,
            verify_hash: None,
            block_hash: None,
            visibility,
            owner_uid: who.uid,
            created_at: now.clone(),
            updated_at: now,
        };
        self.update(|state| {
            if state.images.contains_key(&record.id) {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("An image with identifier {} already exists", record.id),
                ));
            }
            state.images.insert(record.id, record.clone());
            Ok(())
        })?;
        tracing::info!(image = %record.id, name = ?record.name, "image registered");
        Ok(record)
    }

    /// Starts receiving the data of a `queued` image; it is `saving` until finished.
    pub fn begin_upload(self: &Arc<Self>, who: &Caller, id: Uuid) -> Result<ImageUpload> {
        self.update(|state| {
            let image = self.visible_image(state, who, &id.to_string())?.clone();
            self.policy().enforce(
                "image:upload_image",
                who,
                &Target {
                    owner_uid: Some(image.owner_uid),
                },
            )?;
            if image.status != ImageStatus::Queued {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "Image status transition from {} to saving is not allowed",
                        image.status.as_str()
                    ),
                ));
            }
            let record = state.images.get_mut(&id).expect("looked up");
            record.status = ImageStatus::Saving;
            record.updated_at = timestamp();
            Ok(())
        })?;

        let file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.store.upload_path(id));
        match file {
            Ok(file) => Ok(ImageUpload {
                engine: self.clone(),
                id,
                file: Some(SparseWriter::new(file)),
                md5: Md5::new(),
                sha512: Sha512::new(),
                disk_format: self.get_image(who, &id.to_string())?.disk_format,
                len: 0,
                head: Vec::new(),
                finished: false,
            }),
            Err(e) => {
                self.abort_upload(id);
                Err(Error::io("cannot create the upload file", &e))
            }
        }
    }

    fn abort_upload(&self, id: Uuid) {
        let _ = self.store.remove_image_files(id);
        let _ = self.update(|state| {
            if let Some(image) = state.images.get_mut(&id) {
                if image.status == ImageStatus::Saving {
                    image.status = ImageStatus::Queued;
                    image.updated_at = timestamp();
                }
            }
            Ok(())
        });
    }

    /// Deletes an image record and its data.
    pub fn delete_image(&self, who: &Caller, id: Uuid) -> Result<()> {
        self.update(|state| {
            let image = self.visible_image(state, who, &id.to_string())?.clone();
            self.policy().enforce(
                "image:delete_image",
                who,
                &Target {
                    owner_uid: Some(image.owner_uid),
                },
            )?;
            if image.status == ImageStatus::Saving {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    "the image is being uploaded; delete it once the upload ends",
                ));
            }
            state.images.remove(&id);
            Ok(())
        })?;

        // A running refill keeps its own descriptor of the data; unlinking cannot hurt it.
        if let Err(e) = self.store.remove_image_files(id) {
            tracing::warn!(image = %id, "cannot remove image data: {e}");
        }
        tracing::info!(image = %id, "image deleted");
        Ok(())
    }

    /// `active` → `deactivated` (administrators).
    pub fn deactivate_image(&self, who: &Caller, id: Uuid) -> Result<()> {
        self.move_image(
            who,
            id,
            "image:deactivate",
            ImageStatus::Active,
            ImageStatus::Deactivated,
        )
    }

    /// `deactivated` → `active` (administrators).
    pub fn reactivate_image(&self, who: &Caller, id: Uuid) -> Result<()> {
        self.move_image(
            who,
            id,
            "image:reactivate",
            ImageStatus::Deactivated,
            ImageStatus::Active,
        )
    }

    fn move_image(
        &self,
        who: &Caller,
        id: Uuid,
        action: &str,
        from: ImageStatus,
        to: ImageStatus,
    ) -> Result<()> {
        self.update(|state| {
            let image = self.visible_image(state, who, &id.to_string())?.clone();
            self.policy().enforce(
                action,
                who,
                &Target {
                    owner_uid: Some(image.owner_uid),
                },
            )?;
            if image.status == to {
                return Ok(());
            }
            if image.status != from {
                return Err(Error::new(
                    ErrorKind::Forbidden,
                    format!(
                        "Not allowed to change image in status '{}'",
                        image.status.as_str()
                    ),
                ));
            }
            let record = state.images.get_mut(&id).expect("looked up");
            record.status = to;
            record.updated_at = timestamp();
            Ok(())
        })
    }

    // ----- the control file ----------------------------------------------------------------

    /// Runs one line written to `MOUNTPOINT/.control`.
    ///
    /// `reimage <volume> <image id or name> [reimage_reserved]`
    pub fn control(&self, who: &Caller, line: &str) -> Result<()> {
        if line.len() > 1024 || line.chars().any(|c| c.is_control() && c != '\t') {
            return Err(Error::invalid(
                "a control line is at most 1024 characters without control characters",
            ));
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["reimage", volume, image] => self.reimage(who, volume, image, false),
            ["reimage", volume, image, "reimage_reserved"] => {
                self.reimage(who, volume, image, true)
            }
            _ => Err(Error::invalid(
                "expected one line: reimage <volume> <image id or name> [reimage_reserved]",
            )),
        }
    }

    // ----- shutdown ------------------------------------------------------------------------

    /// Cancels running refills (each ends `error`) and waits for them.
    pub fn stop_refills(&self) {
        self.stopping.store(true, Ordering::Release);
        let refills = std::mem::take(&mut *lock(&self.refills));
        for handle in refills {
            let _ = handle.join();
        }
    }

    /// Makes every volume's data durable.
    pub fn sync_all(&self) {
        for file in self.files() {
            if let Err(e) = file.sync(false) {
                tracing::error!(volume = ?file.name, "cannot sync the backing file: {e}");
            }
        }
    }

    // ----- helpers -------------------------------------------------------------------------

    fn policy(&self) -> std::sync::RwLockReadGuard<'_, Policy> {
        self.policy.read().unwrap_or_else(|p| p.into_inner())
    }

    fn self_arc(&self) -> Result<Arc<Self>> {
        ENGINE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|weak| weak.upgrade())
            .ok_or_else(|| Error::internal("engine is shutting down"))
    }

    /// Registers `engine` so that refill threads can hold it.
    /// Resumes, in the background, the space reclaims that a stop or a crash cut short: every
    /// volume whose last re-image succeeded without `space_reclaimed_at` is walked whole
    /// (punching only what reads as a hole, so data is never touched).
    pub fn resume_reclaims(self: &Arc<Self>) {
        let pending: Vec<VolumeRecord> = lock(&self.state)
            .volumes
            .values()
            .filter(|v| {
                v.reimage.as_ref().is_some_and(|r| {
                    r.state == ReimageState::Succeeded && r.space_reclaimed_at.is_none()
                })
            })
            .cloned()
            .collect();
        for volume in pending {
            let Some(file) = self.file_by_ino(volume.ino) else {
                continue;
            };
            let started_at = volume
                .reimage
                .as_ref()
                .map(|r| r.started_at.clone())
                .unwrap_or_default();
            let engine = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("reclaim-{}", volume.ino))
                .spawn(move || {
                    let span = Some((0, file.size()));
                    engine.reclaim_space(&file, &volume, &started_at, span);
                });
            match spawned {
                Ok(handle) => lock(&self.refills).push(handle),
                Err(e) => tracing::warn!("cannot resume a space reclaim: {e}"),
            }
        }
    }

    pub fn register(engine: &Arc<Self>) {
        *ENGINE.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(engine));
    }

    fn update<T>(&self, change: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut state = lock(&self.state);
        let mut next = state.clone();
        let out = change(&mut next)?;
        self.store
            .save(&next)
            .map_err(|e| Error::io("cannot save state", &e))?;
        self.publish(&mut state, next);
        Ok(out)
    }

    /// Makes `next` the state, emitting the volume events the change amounts to.
    fn publish(&self, state: &mut State, next: State) {
        for (id, before) in &state.volumes {
            let after = next.volumes.get(id);
            if let Some(kind) = events::changes(Some(before), after) {
                self.events.emit(after.unwrap_or(before), kind);
            }
        }
        for (id, created) in &next.volumes {
            if !state.volumes.contains_key(id) {
                if let Some(kind) = events::changes(None, Some(created)) {
                    self.events.emit(created, kind);
                }
            }
        }
        *state = next;
    }

    /// Counts a finished re-image in the metrics.
    fn count_reimage_outcome(
        &self,
        volume: &VolumeRecord,
        result: &std::result::Result<refill::RefillStats, String>,
        bytes_done: u64,
        elapsed: Duration,
    ) {
        if let Some(file) = self.file_by_ino(volume.ino) {
            let counter = match result {
                Ok(_) => &file.metrics.reimages_succeeded,
                Err(_) => &file.metrics.reimages_failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            file.metrics
                .refill_bytes
                .fetch_add(bytes_done, Ordering::Relaxed);
        }
        match result {
            Ok(_) => self.metrics.count_refill(Outcome::Succeeded, elapsed),
            Err(reason) => {
                self.metrics.count_refill(Outcome::Failed, elapsed);
                self.metrics.count_failure(refill::failure_kind(reason));
            }
        }
    }

    fn visible_volume<'s>(
        &self,
        state: &'s State,
        who: &Caller,
        key: &str,
    ) -> Result<&'s VolumeRecord> {
        let found = match key.parse::<Uuid>() {
            Ok(id) => state.volumes.get(&id),
            Err(_) => state.volumes.values().find(|v| v.name == key),
        };
        match found {
            Some(v) if self.policy().allows("volume:get", who, &owner(v)) => Ok(v),
            _ => Err(Error::not_found(format!(
                "Volume {} could not be found.",
                shown(key)
            ))),
        }
    }

    fn visible_image<'s>(
        &self,
        state: &'s State,
        who: &Caller,
        key: &str,
    ) -> Result<&'s ImageRecord> {
        let admin = self.policy().is_admin(who);
        let not_found = || Error::not_found(format!("Image {} could not be found.", shown(key)));
        if let Ok(id) = key.parse::<Uuid>() {
            return state
                .images
                .get(&id)
                .filter(|i| image_visible(i, who, admin))
                .ok_or_else(not_found);
        }
        let mut named = state
            .images
            .values()
            .filter(|i| i.name.as_deref() == Some(key) && image_visible(i, who, admin));
        match (named.next(), named.next()) {
            (Some(image), None) => Ok(image),
            (None, _) => Err(not_found()),
            (Some(_), Some(_)) => Err(Error::invalid(format!(
                "more than one image is named {key}; use the image's id"
            ))),
        }
    }

    fn visible_attachment<'s>(
        &self,
        state: &'s State,
        who: &Caller,
        id: Uuid,
    ) -> Result<&'s AttachmentRecord> {
        let not_found = || Error::not_found(format!("Attachment {id} could not be found."));
        let attachment = state.attachments.get(&id).ok_or_else(not_found)?;
        let volume = state
            .volumes
            .get(&attachment.volume_id)
            .ok_or_else(not_found)?;
        if !self.policy().allows("volume:get", who, &owner(volume)) {
            return Err(not_found());
        }
        Ok(attachment)
    }

    fn volume_info(&self, state: &State, volume: &VolumeRecord) -> VolumeInfo {
        let mut record = volume.clone();
        if let Some(reimage) = record.reimage.as_mut() {
            if reimage.state == ReimageState::Running {
                if let Some(file) = self.file_by_ino(volume.ino) {
                    reimage.bytes_done = file.refill_done.load(Ordering::Acquire);
                }
            }
        }
        let attachments = state
            .attachments
            .values()
            .filter(|a| a.volume_id == volume.id)
            .cloned()
            .collect();
        VolumeInfo {
            record,
            attachments,
        }
    }

    fn validate_size(&self, size: u64) -> Result<()> {
        if size == 0 || size > self.config.max_volume_size {
            return Err(Error::invalid(format!(
                "Invalid input received: size must be an integer from 1 to {} (GiB), got {size}",
                self.config.max_volume_size
            )));
        }
        Ok(())
    }

    /// Drops the kernel's cached pages (`data`) or only attributes of inode `ino`.
    fn invalidate(&self, ino: u64, data: bool) {
        let notifier = lock(&self.notifier).clone();
        if let Some(notifier) = notifier {
            let offset = if data { 0 } else { -1 };
            if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), offset, 0) {
                tracing::debug!(ino, "inval_inode: {e}");
            }
        }
    }

    fn forget_entry(&self, name: &str) {
        let notifier = lock(&self.notifier).clone();
        if let Some(notifier) = notifier {
            let _ = notifier.inval_entry(fuser::INodeNo(1), std::ffi::OsStr::new(name));
        }
    }
}

static ENGINE: Mutex<Option<std::sync::Weak<Engine>>> = Mutex::new(None);

/// An upload of image data; dropping it without [`ImageUpload::finish`] aborts it.
pub struct ImageUpload {
    engine: Arc<Engine>,
    id: Uuid,
    file: Option<SparseWriter>,
    md5: Md5,
    sha512: Sha512,
    disk_format: String,
    len: u64,
    head: Vec<u8>,
    finished: bool,
}

/// How many leading bytes format detection looks at.
const HEAD_LEN: usize = 4096;

impl ImageUpload {
    /// Appends a chunk of the body, hashing it in the same pass.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let limit = self.engine.config.max_image_size;
        if self.len + chunk.len() as u64 > limit {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!("Image exceeds the storage limit of {limit} bytes"),
            ));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| Error::internal("upload already finished"))?;
        file.write(chunk)
            .map_err(|e| Error::io("cannot store image data", &e))?;

        self.md5.update(chunk);
        self.sha512.update(chunk);
        if self.head.len() < HEAD_LEN {
            let take = (HEAD_LEN - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.len += chunk.len() as u64;
        Ok(())
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the data durable, checks it is what it claims to be, and activates the image.
    pub fn finish(mut self) -> Result<ImageRecord> {
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::internal("upload already finished"))?;
        let block_hash = file
            .finish()
            .map_err(|e| Error::io("cannot make the image durable", &e))?;

        let virtual_size = self.check_format()?;

        let engine = self.engine.clone();
        engine
            .store
            .commit_upload(self.id)
            .map_err(|e| Error::io("cannot store the image", &e))?;
        let checksum = hex(&std::mem::take(&mut self.md5).finalize());
        let os_hash = hex(&std::mem::take(&mut self.sha512).finalize());
        let block_hash = format!("{block_hash:032x}");
        let len = self.len;
        let record = engine.update(|state| {
            let image = state
                .images
                .get_mut(&self.id)
                .ok_or_else(|| Error::not_found("the image was deleted during the upload"))?;
            image.status = ImageStatus::Active;
            image.size = Some(len);
            image.virtual_size = Some(virtual_size);
            image.checksum = Some(checksum.clone());
            image.os_hash_value = Some(os_hash.clone());
            image.block_hash = Some(block_hash.clone());
            image.verify_hash = None;
            image.updated_at = timestamp();
            Ok(image.clone())
        })?;
        self.finished = true;
        tracing::info!(image = %record.id, bytes = len, "image uploaded");
        Ok(record)
    }
}

impl ImageUpload {
    /// Checks that the data is what `disk_format` claims, and returns its virtual size.
    ///
    /// A raw upload whose bytes carry another format's signature is refused: treating a
    /// qcow2 file as raw would hand a guest the host-side structure of the file (and a
    /// backing-file name), a known format-confusion attack.
    fn check_format(&self) -> Result<u64> {
        let found = detect_format(&self.head);
        match (self.disk_format.as_str(), found) {
            ("raw", None) => Ok(self.len),
            ("qcow2", Some("qcow2")) => self.inspect_qcow2(),
            (declared, Some(found)) => Err(Error::invalid(format!(
                "the image data is in {found} format but disk_format is {declared}; refusing \
                 a format mismatch"
            ))),
            (declared, None) => Err(Error::invalid(format!(
                "the image data is not in {declared} format; refusing a format mismatch"
            ))),
        }
    }

    fn inspect_qcow2(&self) -> Result<u64> {
        let path = self.engine.store.upload_path(self.id);
        let file = File::open(&path).map_err(|e| Error::io("cannot open the upload", &e))?;
        // SAFETY: a read-only mapping of our own upload file, which nothing else writes.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io("cannot map the upload", &e))?;
        let image = crate::qcow2::Qcow2Image::parse_releasing(&map, &|| {
            refill::release(&map, 0, map.len())
        })
        .map_err(|e| Error::invalid(format!("qcow2 image refused: {e}")))?;
        Ok(image.info().virtual_size)
    }
}

impl Drop for ImageUpload {
    fn drop(&mut self) {
        if !self.finished {
            self.file.take();
            self.engine.abort_upload(self.id);
        }
    }
}

/// Names the format whose signature `head` starts with, for formats that are not raw.
fn detect_format(head: &[u8]) -> Option<&'static str> {
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(b"QFI\xfb") {
        Some("qcow2")
    } else if starts(b"KDMV") || starts(b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if starts(b"vhdxfile") {
        Some("vhdx")
    } else if starts(b"conectix") {
        Some("vpc")
    } else if starts(b"LUKS\xba\xbe") {
        Some("luks")
    } else if starts(b"QED\0") {
        Some("qed")
    } else if head.len() >= 68 && head[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        Some("vdi")
    } else if starts(b"WithoutFreeSpace") || starts(b"WithouFreSpacExt") {
        Some("parallels")
    } else {
        None
    }
}

/// A caller-supplied key as it may appear in a message: bounded and without control
/// characters.
fn shown(key: &str) -> String {
    let mut text: String = key
        .chars()
        .take(80)
        .flat_map(char::escape_default)
        .collect();
    if key.chars().count() > 80 {
        text.push_str("...");
    }
    text
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn owner(volume: &VolumeRecord) -> Target {
    Target {
        owner_uid: Some(volume.owner_uid),
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|s| !s.is_empty())
}

fn image_visible(image: &ImageRecord, who: &Caller, admin: bool) -> bool {
    admin || image.visibility != "private" || image.owner_uid == who.uid
}

/// Cinder's `check_image_metadata`, then the virtual size: first failure wins.
fn check_image_fits(image: &ImageRecord, volume: &VolumeRecord) -> Result<()> {
    if image.status != ImageStatus::Active {
        return Err(Error::new(
            ErrorKind::InvalidStatus,
            format!("Invalid input received: Image {} is not active.", image.id),
        ));
    }
    let size = image.size.unwrap_or(0);
    let size_gib = size.div_ceil(GIB);
    if size_gib > volume.size {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "Invalid input received: Size of specified image {size_gib}GB is larger than \
                 volume size {}GB.",
                volume.size
            ),
        ));
    }
    if volume.size < image.min_disk {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "Invalid input received: Volume size {}GB cannot be smaller than the image \
                 minDisk size {}GB.",
                volume.size, image.min_disk
            ),
        ));
    }
    let virtual_gib = image.virtual_size.unwrap_or(0).div_ceil(GIB);
    if virtual_gib > volume.size {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "Image {} is unacceptable: Image virtual size is {virtual_gib}GB and doesn't \
                 fit in a volume of size {}GB.",
                image.id, volume.size
            ),
        ));
    }
    Ok(())
}

/// The Glance metadata a successful re-image gives a volume (every value a string).
fn image_metadata(image: &ImageRecord) -> std::collections::BTreeMap<String, String> {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("image_id".to_string(), image.id.to_string());
    if let Some(name) = image.name.as_ref().filter(|n| !n.is_empty()) {
        meta.insert("image_name".to_string(), name.clone());
    }
    if let Some(checksum) = &image.checksum {
        meta.insert("checksum".to_string(), checksum.clone());
    }
    meta.insert(
        "container_format".to_string(),
        image.container_format.clone(),
    );
    meta.insert("disk_format".to_string(), image.disk_format.clone());
    meta.insert("min_disk".to_string(), image.min_disk.to_string());
    meta.insert("min_ram".to_string(), image.min_ram.to_string());
    if let Some(size) = image.size {
        meta.insert("size".to_string(), size.to_string());
    }
    meta
}

/// Cinder's `volume_detached`: the status follows the remaining attachments.
fn recompute_status(state: &mut State, volume_id: Uuid) {
    let mut remaining: Vec<&str> = state
        .attachments
        .values()
        .filter(|a| a.volume_id == volume_id)
        .filter(|a| {
            !matches!(
                a.attach_status,
                AttachStatus::ErrorAttaching | AttachStatus::ErrorDetaching
            )
        })
        .map(|a| a.attach_status.as_str())
        .collect();
    remaining.sort_unstable();
    let status = match remaining.first().copied() {
        Some("attached") => VolumeStatus::InUse,
        Some("attaching") => VolumeStatus::Attaching,
        Some("detaching") => VolumeStatus::Detaching,
        Some(_) => VolumeStatus::Reserved,
        None => VolumeStatus::Available,
    };
    let Some(volume) = state.volumes.get_mut(&volume_id) else {
        return;
    };
    match volume.status {
        // A running re-image restores `previous_status`; make that the truth of now.
        VolumeStatus::Downloading => volume.previous_status = Some(status),
        VolumeStatus::Uploading => {}
        _ => volume.status = status,
    }
    volume.updated_at = timestamp();
}

/// Volume names are file names in the mount: 1-64 of `[A-Za-z0-9._-]`, no leading dot.
pub fn validate_volume_name(name: &str) -> Result<()> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > 64 || !valid_chars || name.starts_with('.') {
        return Err(Error::invalid(format!(
            "Invalid volume name \"{}\": use 1 to 64 characters of A-Z a-z 0-9 . _ - and \
             do not start with a dot",
            shown(name)
        )));
    }
    if name.parse::<Uuid>().is_ok() {
        return Err(Error::invalid(
            "a volume name must not look like a UUID: volumes are addressed by id or name",
        ));
    }
    Ok(())
}

fn open_volume_file(store: &Store, volume: &VolumeRecord) -> std::io::Result<VolumeFile> {
    VolumeFile::open(
        volume.id,
        &volume.name,
        volume.ino,
        (volume.owner_uid, volume.owner_gid),
        &store.volume_path(volume.id),
    )
}

/// Repairs what a crash left behind; see [`crate::store`] for the invariants relied on.
fn recover(store: &Store, state: &mut State) -> std::result::Result<(), String> {
    let now = timestamp();

    for volume in state.volumes.values_mut() {
        let path = store.volume_path(volume.id);
        if !path.exists() {
            store
                .create_volume_file(volume.id, volume.size * GIB)
                .map_err(|e| format!("cannot recreate {}: {e}", path.display()))?;
            volume.status = VolumeStatus::Error;
            volume.status_reason =
                Some("the backing file was missing at start; it was recreated empty".to_string());
            tracing::error!(volume = ?volume.name, "backing file missing; recreated empty");
        }
        if volume.status != VolumeStatus::Downloading {
            continue;
        }

        // A refill nobody works on any more: the content is partial, so destroy it.
        let reason = "volumed stopped during the re-image; the volume's content was discarded";
        let file = File::options()
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        discard(&file, volume.size * GIB)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("cannot discard {}: {e}", path.display()))?;
        volume.previous_status = Some(VolumeStatus::Downloading);
        volume.status = VolumeStatus::Error;
        volume.status_reason = Some(reason.to_string());
        volume.image_metadata.clear();
        volume.bootable = false;
        volume.updated_at = now.clone();
        if let Some(reimage) = volume.reimage.as_mut() {
            reimage.state = ReimageState::Failed;
            reimage.message = Some(reason.to_string());
            reimage.finished_at = Some(now.clone());
        }
        tracing::warn!(volume = ?volume.name, "interrupted re-image: volume set to error");
    }

    for image in state.images.values_mut() {
        if image.status == ImageStatus::Saving {
            image.status = ImageStatus::Queued;
            image.updated_at = now.clone();
            tracing::warn!(image = %image.id, "interrupted upload: image back to queued");
        }
    }

    let volume_ids: std::collections::HashSet<Uuid> = state.volumes.keys().copied().collect();
    state
        .attachments
        .retain(|_, a| volume_ids.contains(&a.volume_id));

    for orphan in store
        .orphans(state)
        .map_err(|e| format!("cannot scan state: {e}"))?
    {
        tracing::info!(path = %orphan.display(), "removing a leftover file");
        let _ = std::fs::remove_file(&orphan);
    }
    Ok(())
}

/// Where the engine keeps a volume's backing file (for tests and tools).
pub fn backing_path(state_dir: &std::path::Path, id: Uuid) -> PathBuf {
    state_dir.join("volumes").join(format!("{id}.raw"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        for good in ["vol1", "a", "A.b_c-d", &"x".repeat(64)] {
            validate_volume_name(good).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "a b",
            &"x".repeat(65),
            "vol\n",
            "0f9c2d8e-1b7a-4c1e-9a57-3f6f7f5b2c11",
        ] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn format_confusion_is_detected() {
        assert_eq!(detect_format(b"QFI\xfb\0\0\0\x03"), Some("qcow2"));
        let mut vdi = vec![0u8; 128];
        vdi[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(detect_format(&vdi), Some("vdi"));
        assert_eq!(detect_format(&[0u8; 512]), None);
        assert_eq!(detect_format(b""), None);
    }

    #[test]
    fn status_follows_remaining_attachments() {
        let mut state = State::default();
        let volume_id = Uuid::new_v4();
        state.volumes.insert(
            volume_id,
            VolumeRecord {
                id: volume_id,
                name: "v".into(),
                description: None,
                size: 1,
                status: VolumeStatus::InUse,
                previous_status: None,
                status_reason: None,
                owner_uid: 0,
                owner_gid: 0,
                bootable: false,
                image_metadata: Default::default(),
                ino: 16,
                reimage: None,
                created_at: timestamp(),
                updated_at: timestamp(),
            },
        );
        recompute_status(&mut state, volume_id);
        assert_eq!(state.volumes[&volume_id].status, VolumeStatus::Available);
    }
}
