//! The control API: HTTP/1.1 over a Unix socket, speaking Cinder's block storage API v3 for
//! volumes and attachments and Glance's image API v2 for images.
//!
//! How a request is served:
//!
//! 1. [`serve`] waits for a free connection slot (at most [`MAX_CONNECTIONS`]), then accepts;
//!    a flood of clients waits in the kernel's backlog, not in the daemon.
//! 2. The caller's identity comes from the kernel (`SO_PEERCRED`), once per connection; the
//!    request never says who it is.
//! 3. hyper reads the request head, giving up on a client that takes longer than
//!    [`HEADER_READ_TIMEOUT`] (an idle keep-alive connection counts as such a client).
//! 4. `router` checks the microversion (volume API only), finds the route, reads and checks
//!    the body (`http`, `input`), and calls the resource's handler (`volumes`,
//!    `attachments`, `images`).
//! 5. The handler calls the engine on the blocking thread pool, since the engine may fsync,
//!    and renders the result with `views`; errors become OpenStack fault bodies.
//!
//! Two routes are not Cinder's or Glance's: `GET /metrics` (`metrics`) and the event stream
//! `GET /v3/events` (`event_stream`), a response that lasts until the daemon stops.
//!
//! On shutdown the listener stops accepting, open connections finish the request in flight
//! and close (event streams end at once), and whatever is still running after
//! [`SHUTDOWN_GRACE`] is dropped.

mod attachments;
mod event_stream;
mod http;
mod images;
mod input;
mod metrics;
mod router;
#[cfg(test)]
mod tests;
mod version;
mod views;
mod volumes;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

pub use router::Route;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::identity::Caller;

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

/// Event streams open at once. Each holds its connection for as long as it lasts, so they
/// get a share of [`MAX_CONNECTIONS`] of their own: the rest always serves requests (the
/// watchdog's probe among them).
pub const MAX_FOLLOWERS: usize = 64;

/// Time a client has to send a request head, and longest idle time between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Time open connections get to finish their requests once shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Shortest and longest pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Serves the control API on `listener` until `shutdown` turns true (or its sender is
/// dropped), then lets requests in flight finish for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: UnixListener,
    engine: Arc<Engine>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let followers = Arc::new(Semaphore::new(MAX_FOLLOWERS));
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF.0;

    loop {
        // Take a slot first, reaping finished connections while waiting for one.
        let permit = tokio::select! {
            () = shutdown_requested(&mut shutdown) => break,
            Some(done) = connections.join_next() => {
                report_panic(done);
                continue;
            }
            permit = Arc::clone(&slots).acquire_owned() => permit,
        };
        let Ok(permit) = permit else {
            break; // the semaphore is never closed; stop rather than spin if it were
        };

        let accepted = tokio::select! {
            () = shutdown_requested(&mut shutdown) => break,
            Some(done) = connections.join_next() => {
                report_panic(done);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _address)) => {
                backoff = ACCEPT_BACKOFF.0;
                stream
            }
            Err(err) => {
                // Running out of descriptors is temporary; pausing lets connections close.
                tracing::warn!(error = %err, "accepting a control connection failed");
                tokio::select! {
                    () = shutdown_requested(&mut shutdown) => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };

        let connection = serve_connection(
            stream,
            Arc::clone(&engine),
            Arc::clone(&followers),
            shutdown.clone(),
            permit,
        );
        connections.spawn(connection);
    }

    // Stop accepting, then give connections their grace period.
    drop(listener);
    tracing::info!(open = connections.len(), "control API stopping");
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(done) = connections.join_next().await {
            report_panic(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "control connections still busy after the grace period; closing them"
        );
        connections.shutdown().await;
    }
}

/// What every request of one connection shares: the engine, who is calling, and the
/// daemon's stop signal (which long-lived responses watch).
struct Context {
    engine: Arc<Engine>,
    caller: Arc<Caller>,
    /// Slots of event streams ([`MAX_FOLLOWERS`]).
    followers: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
}

impl Context {
    /// Runs an engine call on the blocking pool: engine calls may block on disk I/O.
    async fn run<T, F>(&self, call: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<Engine>, &Caller) -> Result<T> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        let caller = Arc::clone(&self.caller);
        match tokio::task::spawn_blocking(move || call(&engine, &caller)).await {
            Ok(result) => result,
            Err(err) => {
                // A panicking engine call must not take the connection, let alone the daemon.
                tracing::error!(error = %err, "engine call failed without an answer");
                Err(Error::internal(
                    "The daemon failed while handling the request.",
                ))
            }
        }
    }
}

/// Serves one connection until the client closes it, it times out, or shutdown finishes
/// its current request. The slot (`_permit`) frees when this returns.
async fn serve_connection(
    stream: UnixStream,
    engine: Arc<Engine>,
    followers: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let credentials = match stream.peer_cred() {
        Ok(credentials) => credentials,
        Err(err) => {
            tracing::warn!(error = %err, "control connection without peer credentials");
            return;
        }
    };
    let (uid, gid) = (credentials.uid(), credentials.gid());
    let pid = credentials
        .pid()
        .and_then(|pid| u32::try_from(pid).ok())
        .unwrap_or(0);

    // Reading the caller's groups touches /proc; keep it off the event loop.
    let caller = tokio::task::spawn_blocking(move || Caller::from_process(uid, gid, pid)).await;
    let Ok(caller) = caller else {
        return;
    };
    tracing::debug!(uid, gid, pid, "control connection");

    let context = Arc::new(Context {
        engine,
        caller: Arc::new(caller),
        followers,
        shutdown: shutdown.clone(),
    });
    let service = service_fn(move |request| {
        let context = Arc::clone(&context);
        async move { Ok::<_, Infallible>(router::handle(&context, request).await) }
    });

    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);

    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown_requested(&mut shutdown) => {
            // Finish the request in flight, if any, then close.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, uid, pid, "control connection ended with an error");
    }
}

/// Resolves once shutdown is asked for; a dropped sender counts as asking.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn report_panic(done: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(err) = done {
        if err.is_panic() {
            tracing::error!(error = %err, "a control connection task panicked");
        }
    }
}
