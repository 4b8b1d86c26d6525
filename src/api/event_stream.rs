//! `GET /v3/events`: volume events streamed as Server-Sent Events (`text/event-stream`).
//!
//! Each event is one message of three lines and a blank line:
//!
//! ```text
//! id: 12
//! event: reimage.started
//! data: {"seq":12,"time":"...","type":"reimage.started","image_id":"...",...}
//! ```
//!
//! A comment (`: keep-alive`) goes out every [`KEEP_ALIVE`] so that clients and proxies see
//! a live connection. A follower sees the events of the volumes `volume:get` lets it see,
//! checked event by event (a policy reload applies at once). A follower that falls behind
//! the [`crate::events`] ring gets a `lagged` message saying how many events it missed. The
//! stream ends, as a complete HTTP response, when the daemon stops or the client leaves.
//!
//! The forwarding task holds no engine lock while it sends: the engine only ever pushes into
//! the broadcast ring, and a slow client slows nobody but itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Either;
use hyper::header::{self, HeaderValue};
use hyper::Response;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};

use super::http::{Body, StreamBody};
use super::{shutdown_requested, Context, MAX_FOLLOWERS};
use crate::engine::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::events::Event;
use crate::identity::Caller;

/// Media type of the stream.
pub const EVENT_STREAM: &str = "text/event-stream";

/// Time between keep-alive comments.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Messages queued for a client that does not read, before its forwarder waits (and its
/// events start to pile up in the ring instead).
const MESSAGES_AHEAD: usize = 16;

/// Starts following the events for the caller.
pub async fn follow(ctx: &Context) -> Result<Response<Body>> {
    let slot = Arc::clone(&ctx.followers)
        .try_acquire_owned()
        .map_err(|_| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{MAX_FOLLOWERS} event streams are open already, the most volumed serves at \
                 once; try again when one ends"
                ),
            )
        })?;

    // Subscribe before answering: a client that has the response head misses nothing after.
    let events = ctx.engine.events().subscribe();
    let (messages, body) = StreamBody::channel(MESSAGES_AHEAD);
    let (engine, caller) = (Arc::clone(&ctx.engine), Arc::clone(&ctx.caller));
    let shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        forward(events, messages, engine, caller, shutdown).await;
        drop(slot);
    });

    let mut response = Response::new(Either::Right(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(EVENT_STREAM));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// Sends the caller's events, keep-alives and lags until shutdown or the client leaves.
async fn forward(
    mut events: broadcast::Receiver<Arc<Event>>,
    messages: mpsc::Sender<Bytes>,
    engine: Arc<Engine>,
    caller: Arc<Caller>,
    mut shutdown: watch::Receiver<bool>,
) {
    let hello = Bytes::from_static(b": volumed events\n\n");
    if !send(&messages, hello, &mut shutdown).await {
        return;
    }

    let start = tokio::time::Instant::now() + KEEP_ALIVE;
    let mut keep_alive = tokio::time::interval_at(start, KEEP_ALIVE);
    loop {
        let message = tokio::select! {
            () = shutdown_requested(&mut shutdown) => return,
            () = messages.closed() => return,
            _ = keep_alive.tick() => Bytes::from_static(b": keep-alive\n\n"),
            received = events.recv() => match received {
                Ok(event) if engine.may_see(&caller, event.owner_uid) => event_message(&event),
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => lagged_message(missed),
                Err(RecvError::Closed) => return,
            },
        };
        if !send(&messages, message, &mut shutdown).await {
            return;
        }
    }
}

/// Hands `message` to the body; false once the client left or the daemon stops.
async fn send(
    messages: &mpsc::Sender<Bytes>,
    message: Bytes,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        () = shutdown_requested(shutdown) => false,
        sent = messages.send(message) => sent.is_ok(),
    }
}

/// One event as an SSE message.
pub fn event_message(event: &Event) -> Bytes {
    // An event always serializes: its fields are strings, numbers and uuids.
    let data = serde_json::to_string(event).unwrap_or_default();
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {data}\n\n",
        event.seq,
        event.kind.name()
    ))
}

/// The message telling a follower it missed `missed` events.
fn lagged_message(missed: u64) -> Bytes {
    let data = json!({"type": "lagged", "missed": missed});
    Bytes::from(format!("event: lagged\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;
    use uuid::Uuid;

    #[test]
    fn an_event_is_one_message_with_id_type_and_json_data() {
        let event = Event {
            seq: 7,
            time: "2024-01-01T00:00:00.000000".into(),
            kind: EventKind::ReimageFailed {
                image_id: Uuid::nil(),
                reason: "bad\nthing".into(),
                duration_seconds: 1.5,
            },
            volume_id: Uuid::nil(),
            volume_name: "v".into(),
            owner_uid: 0,
        };
        let text = String::from_utf8(event_message(&event).to_vec()).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "id: 7");
        assert_eq!(lines[1], "event: reimage.failed");
        let data: serde_json::Value =
            serde_json::from_str(lines[2].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(
            data["reason"], "bad\nthing",
            "a newline stays inside the JSON"
        );
        assert_eq!(lines[3..], ["", ""]);
    }

    #[test]
    fn a_lag_says_how_many_were_missed() {
        let text = String::from_utf8(lagged_message(3).to_vec()).unwrap();
        assert_eq!(
            text,
            "event: lagged\ndata: {\"missed\":3,\"type\":\"lagged\"}\n\n"
        );
    }
}
