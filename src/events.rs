//! Volume events: what `GET /v3/events` streams to its followers.
//!
//! The engine emits an event at the moment it publishes the change the event describes, under
//! the same lock (progress comes from the refill's own reporter thread, between its `started`
//! and its outcome). The sequence number is taken and the event sent under one small mutex, so
//! numbers rise in the order events are delivered, and that order is the order of the changes.
//!
//! Delivery goes through a [`tokio::sync::broadcast`] ring of [`CAPACITY`] events: sending
//! never waits, whoever follows. A follower that falls more than that far behind loses the
//! oldest events and is told how many (`lagged`); nothing is replayed, and an event emitted
//! while nobody follows is gone.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::model::{timestamp, VolumeRecord, VolumeStatus};

/// Events kept for followers that are behind.
pub const CAPACITY: usize = 1024;

/// One volume event, as a follower receives it (`data:` of the stream, in JSON).
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Rises by one with every event the daemon emits, from 1 at start.
    pub seq: u64,
    /// When the event was emitted (UTC, the API's format).
    pub time: String,
    /// What happened, with its details.
    #[serde(flatten)]
    pub kind: EventKind,
    /// The volume's id.
    pub volume_id: Uuid,
    /// The volume's name.
    pub volume_name: String,
    /// The volume's owner, for the visibility check; not sent.
    #[serde(skip)]
    pub owner_uid: u32,
}

/// What happened to a volume.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum EventKind {
    /// The volume was created.
    #[serde(rename = "volume.created")]
    Created {
        /// Size in GiB.
        size_gib: u64,
    },
    /// The volume was deleted.
    #[serde(rename = "volume.deleted")]
    Deleted,
    /// The volume's status changed.
    #[serde(rename = "volume.status")]
    Status {
        /// The status before.
        from: VolumeStatus,
        /// The status now.
        to: VolumeStatus,
    },
    /// A re-image was accepted; the volume is fenced and about to be refilled.
    #[serde(rename = "reimage.started")]
    ReimageStarted {
        /// The image being written.
        image_id: Uuid,
        /// Bytes of image data to refill.
        bytes_total: u64,
    },
    /// A running refill moved on (at most one a second per volume).
    #[serde(rename = "reimage.progress")]
    ReimageProgress {
        /// The image being written.
        image_id: Uuid,
        /// Bytes of the image refilled so far.
        bytes_done: u64,
        /// Bytes of image data to refill.
        bytes_total: u64,
    },
    /// The re-image ended with the image in place.
    #[serde(rename = "reimage.succeeded")]
    ReimageSucceeded {
        /// The image written.
        image_id: Uuid,
        /// Bytes of the image refilled.
        bytes_done: u64,
        /// Seconds from acceptance to outcome.
        duration_seconds: f64,
    },
    /// The re-image failed; the volume's content was discarded and it is `error`.
    #[serde(rename = "reimage.failed")]
    ReimageFailed {
        /// The image that was being written.
        image_id: Uuid,
        /// Why it failed.
        reason: String,
        /// Seconds from acceptance to outcome.
        duration_seconds: f64,
    },
}

impl EventKind {
    /// The event's type, as in its `type` field.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Created { .. } => "volume.created",
            EventKind::Deleted => "volume.deleted",
            EventKind::Status { .. } => "volume.status",
            EventKind::ReimageStarted { .. } => "reimage.started",
            EventKind::ReimageProgress { .. } => "reimage.progress",
            EventKind::ReimageSucceeded { .. } => "reimage.succeeded",
            EventKind::ReimageFailed { .. } => "reimage.failed",
        }
    }
}

/// The sending side: the engine emits, each follower subscribes.
pub struct EventBus {
    sender: broadcast::Sender<Arc<Event>>,
    last_seq: Mutex<u64>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
            last_seq: Mutex::new(0),
        }
    }
}

impl EventBus {
    /// Emits `kind` about `volume` to every follower; never waits.
    pub fn emit(&self, volume: &VolumeRecord, kind: EventKind) {
        let mut last_seq = self.last_seq.lock().unwrap_or_else(|p| p.into_inner());
        *last_seq += 1;
        let event = Event {
            seq: *last_seq,
            time: timestamp(),
            kind,
            volume_id: volume.id,
            volume_name: volume.name.clone(),
            owner_uid: volume.owner_uid,
        };
        // No follower is not an error: the event is simply not kept.
        let _ = self.sender.send(Arc::new(event));
    }

    /// A new follower; it receives the events emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.sender.subscribe()
    }

    /// How many followers there are.
    pub fn followers(&self) -> usize {
        self.sender.receiver_count()
    }
}

/// The events that publishing `after` in place of `before` amounts to for one volume:
/// created, deleted or a status change (re-image events are emitted by the re-image itself).
pub fn changes(before: Option<&VolumeRecord>, after: Option<&VolumeRecord>) -> Option<EventKind> {
    match (before, after) {
        (None, Some(created)) => Some(EventKind::Created {
            size_gib: created.size,
        }),
        (Some(_), None) => Some(EventKind::Deleted),
        (Some(before), Some(after)) if before.status != after.status => Some(EventKind::Status {
            from: before.status,
            to: after.status,
        }),
        _ => None,
    }
}

/// One line for people about an event as a follower received it (its JSON), e.g.
/// `2024-05-01T10:00:00.123456  vol1  status available -> downloading`. Text the event
/// carries is escaped, so a line is always one line.
pub fn describe(event: &Value) -> String {
    let text = |key: &str| {
        let value = event.get(key).and_then(Value::as_str).unwrap_or("-");
        value.escape_debug().to_string()
    };
    let number = |key: &str| event.get(key).and_then(Value::as_u64).unwrap_or(0);
    let seconds = |key: &str| event.get(key).and_then(Value::as_f64).unwrap_or(0.0);

    let what = match event.get("type").and_then(Value::as_str).unwrap_or("") {
        "lagged" => {
            return format!(
                "missed {} events: volumectl did not read them in time",
                number("missed")
            )
        }
        "volume.created" => format!("created, {} GiB", number("size_gib")),
        "volume.deleted" => "deleted".to_string(),
        "volume.status" => format!("status {} -> {}", text("from"), text("to")),
        "reimage.started" => format!("re-image started from image {}", text("image_id")),
        "reimage.progress" => {
            let (done, total) = (number("bytes_done"), number("bytes_total"));
            let percent = (done.min(total) as u128 * 100)
                .checked_div(total as u128)
                .unwrap_or(0);
            format!("re-image {} of {} ({percent}%)", mib(done), mib(total))
        }
        "reimage.succeeded" => format!(
            "re-image succeeded in {:.1} s ({})",
            seconds("duration_seconds"),
            mib(number("bytes_done"))
        ),
        "reimage.failed" => format!(
            "re-image failed after {:.1} s: {}",
            seconds("duration_seconds"),
            text("reason")
        ),
        other => format!("{} {}", other.escape_debug(), event),
    };
    format!("{}  {}  {what}", text("time"), text("volume_name"))
}

/// Whether an event (its JSON) concerns the volume named or numbered `volume`; stream
/// messages about no volume (`lagged`) concern every follower.
pub fn concerns(event: &Value, volume: &str) -> bool {
    let field = |key: &str| event.get(key).and_then(Value::as_str);
    match (field("volume_id"), field("volume_name")) {
        (None, None) => true,
        (id, name) => id == Some(volume) || name == Some(volume),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(status: VolumeStatus) -> VolumeRecord {
        VolumeRecord {
            id: Uuid::nil(),
            name: "v".into(),
            description: None,
            size: 2,
            status,
            previous_status: None,
            status_reason: None,
            owner_uid: 7,
            owner_gid: 7,
            bootable: false,
            image_metadata: Default::default(),
            ino: 16,
            reimage: None,
            created_at: timestamp(),
            updated_at: timestamp(),
        }
    }

    #[test]
    fn sequence_numbers_rise_in_delivery_order() {
        let bus = EventBus::default();
        let mut follower = bus.subscribe();
        let v = volume(VolumeStatus::Available);
        bus.emit(&v, EventKind::Deleted);
        bus.emit(&v, EventKind::Deleted);
        let first = follower.try_recv().unwrap();
        let second = follower.try_recv().unwrap();
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(bus.followers(), 1);
    }

    #[test]
    fn a_slow_follower_is_told_how_many_it_missed() {
        let bus = EventBus::default();
        let mut follower = bus.subscribe();
        let v = volume(VolumeStatus::Available);
        for _ in 0..CAPACITY + 5 {
            bus.emit(&v, EventKind::Deleted);
        }
        match follower.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(missed)) => assert_eq!(missed, 5),
            other => panic!("expected a lag, got {other:?}"),
        }
        assert_eq!(follower.try_recv().unwrap().seq, 6);
    }

    #[test]
    fn events_serialize_flat_with_their_type() {
        let bus = EventBus::default();
        let mut follower = bus.subscribe();
        let v = volume(VolumeStatus::Available);
        let kind = EventKind::Status {
            from: VolumeStatus::Available,
            to: VolumeStatus::Downloading,
        };
        bus.emit(&v, kind);
        let event = follower.try_recv().unwrap();
        let json = serde_json::to_value(&*event).unwrap();
        assert_eq!(json["type"], "volume.status");
        assert_eq!(event.kind.name(), "volume.status");
        assert_eq!(json["from"], "available");
        assert_eq!(json["to"], "downloading");
        assert_eq!(json["volume_name"], "v");
        assert_eq!(json["seq"], 1);
        assert!(json.get("owner_uid").is_none(), "{json}");
    }

    #[test]
    fn descriptions_are_one_line_each() {
        let failed = serde_json::json!({
            "seq": 3, "time": "T", "type": "reimage.failed", "volume_name": "v",
            "volume_id": "i", "reason": "bad\nforged line", "duration_seconds": 1.25,
        });
        assert_eq!(
            describe(&failed),
            "T  v  re-image failed after 1.2 s: bad\\nforged line"
        );
        let progress = serde_json::json!({
            "time": "T", "type": "reimage.progress", "volume_name": "v",
            "bytes_done": 1u64 << 20, "bytes_total": 4u64 << 20,
        });
        assert_eq!(
            describe(&progress),
            "T  v  re-image 1.0 MiB of 4.0 MiB (25%)"
        );
        let status = serde_json::json!({
            "time": "T", "type": "volume.status", "volume_name": "v",
            "from": "available", "to": "downloading",
        });
        assert_eq!(describe(&status), "T  v  status available -> downloading");
        let lagged = serde_json::json!({"type": "lagged", "missed": 4});
        assert_eq!(
            describe(&lagged),
            "missed 4 events: volumectl did not read them in time"
        );
    }

    #[test]
    fn a_volume_filter_matches_name_or_id_and_keeps_lags() {
        let event = serde_json::json!({"volume_id": "abc", "volume_name": "v"});
        assert!(concerns(&event, "v"));
        assert!(concerns(&event, "abc"));
        assert!(!concerns(&event, "w"));
        assert!(concerns(&serde_json::json!({"type": "lagged"}), "w"));
    }

    #[test]
    fn changes_name_creation_deletion_and_status_only() {
        let available = volume(VolumeStatus::Available);
        let error = volume(VolumeStatus::Error);
        assert_eq!(
            changes(None, Some(&available)),
            Some(EventKind::Created { size_gib: 2 })
        );
        assert_eq!(changes(Some(&available), None), Some(EventKind::Deleted));
        assert_eq!(changes(Some(&available), Some(&available)), None);
        assert_eq!(
            changes(Some(&available), Some(&error)),
            Some(EventKind::Status {
                from: VolumeStatus::Available,
                to: VolumeStatus::Error
            })
        );
    }
}
