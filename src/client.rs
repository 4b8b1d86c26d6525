//! A small client for volumed's HTTP API on its Unix socket.
//!
//! Used by `volumectl` and by integration tests. Each request opens its own connection: the
//! CLI sends a handful of requests per run, and a fresh connection keeps a failed or
//! cancelled request from poisoning the next one.
//!
//! Two entry points:
//! 1. [`Client::request`] sends an optional JSON body and returns every HTTP answer as a
//!    [`Reply`], so tests can look at refusals too; [`Reply::success`] turns a refusal into
//!    [`ClientError::Api`] with the daemon's fault message.
//! 2. [`Client::upload`] streams a reader as the request body in 1 MiB frames, counting the
//!    bytes handed to the connection so a caller can draw progress while it runs.
//! 3. [`Client::follow`] reads a Server-Sent Events stream (`GET /v3/events`) message by
//!    message until the daemon ends it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The microversion sent on every `/v3` request: 3.71 covers the attachment API and
/// `os-reimage` (3.68) alike.
pub const VOLUME_API_VERSION: &str = "volume 3.71";

/// The header that carries the Cinder microversion.
pub const API_VERSION_HEADER: &str = "OpenStack-API-Version";

/// Size of one frame of an upload body.
pub const UPLOAD_CHUNK: usize = 1 << 20;

/// Frames read ahead of the connection; bounds an upload's memory to a few MiB.
const UPLOAD_FRAMES_AHEAD: usize = 4;

/// How long a failed upload waits for its reader to say whether reading was the cause.
const READER_GRACE: Duration = Duration::from_secs(1);

/// Why a request did not produce the answer the caller wanted.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to: the daemon is not running, or not for us.
    #[error("cannot connect to volumed: {}", describe_connect_error(socket, error))]
    Unreachable {
        /// The socket that was tried.
        socket: PathBuf,
        /// What `connect` said.
        error: io::Error,
    },
    /// The daemon accepted the connection but did not answer in time.
    #[error("volumed did not answer within {} s", .0.as_secs())]
    TimedOut(Duration),
    /// The HTTP exchange broke off (connection closed, malformed reply).
    #[error("the connection to volumed failed: {0}")]
    Transport(hyper::Error),
    /// The daemon answered with a refusal or a failure.
    #[error("{0}")]
    Api(ApiFault),
    /// The daemon answered 2xx with a body that is not the JSON we expected.
    #[error("volumed sent an unexpected reply: {0}")]
    InvalidReply(String),
    /// The request could not be built, e.g. a header value with a newline in it.
    #[error("cannot build the request: {0}")]
    InvalidRequest(String),
    /// Reading the data of an upload failed.
    #[error("{0}")]
    Upload(io::Error),
}

impl ClientError {
    /// The daemon's fault, when the failure is a refusal the daemon sent.
    pub fn fault(&self) -> Option<&ApiFault> {
        match self {
            Self::Api(fault) => Some(fault),
            _ => None,
        }
    }

    /// True when the daemon could not be reached or did not answer at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::TimedOut(_))
    }
}

fn describe_connect_error(socket: &Path, error: &io::Error) -> String {
    let socket = socket.display();
    match error.kind() {
        io::ErrorKind::NotFound => format!("no socket at {socket}"),
        io::ErrorKind::ConnectionRefused => format!("nothing is listening on {socket}"),
        io::ErrorKind::PermissionDenied => format!("permission denied on {socket}"),
        _ => format!("{socket}: {error}"),
    }
}

/// A refusal or failure answered by the daemon, with the message of its OpenStack fault body
/// (`{"badRequest": {"code": 400, "message": "..."}}`) when it sent one.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ApiFault {
    /// The HTTP status code.
    pub status: u16,
    /// The fault name, e.g. `badRequest` or `itemNotFound`.
    pub name: Option<String>,
    /// The daemon's message for people.
    pub message: Option<String>,
}

impl ApiFault {
    /// Reads a fault out of an error reply. Any body shape is accepted: a fault object under
    /// any name, a bare `{"message": ...}`, a short line of text, or nothing at all.
    pub fn parse(status: u16, body: &[u8]) -> Self {
        let mut fault = Self {
            status,
            name: None,
            message: None,
        };

        if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) {
            if let Some(Value::String(message)) = fields.get("message") {
                fault.message = Some(message.clone());
                return fault;
            }
            for (name, inner) in &fields {
                if let Some(message) = inner.get("message").and_then(Value::as_str) {
                    fault.name = Some(name.clone());
                    fault.message = Some(message.to_owned());
                    return fault;
                }
            }
            return fault;
        }

        // A plain-text reply: keep its first line if it reads like a sentence, not markup.
        let text = String::from_utf8_lossy(body);
        let first_line = text.lines().map(str::trim).find(|line| !line.is_empty());
        if let Some(line) = first_line.filter(|line| !line.starts_with('<')) {
            fault.message = Some(line.chars().take(200).collect());
        }
        fault
    }

    /// Case-insensitive search of the message, for hints keyed on what the daemon said.
    pub fn mentions(&self, word: &str) -> bool {
        let word = word.to_lowercase();
        self.message
            .as_deref()
            .is_some_and(|message| message.to_lowercase().contains(&word))
    }

    /// What the status means when the daemon sent no message with it.
    fn status_meaning(&self) -> String {
        match self.status {
            400 => "the request was refused as invalid".to_owned(),
            401 => "the request was not authenticated".to_owned(),
            403 => "permission denied".to_owned(),
            404 => "not found".to_owned(),
            405 => "volumed does not accept this method here".to_owned(),
            406 => "volumed does not support the requested API version".to_owned(),
            409 => "the request conflicts with the current state".to_owned(),
            413 => "the request is too large".to_owned(),
            415 => "volumed does not accept this content type".to_owned(),
            500..=599 => "volumed failed while handling the request".to_owned(),
            status => {
                let reason = StatusCode::from_u16(status)
                    .ok()
                    .and_then(|code| code.canonical_reason())
                    .unwrap_or("unknown status");
                format!("unexpected answer from volumed (HTTP {status} {reason})")
            }
        }
    }
}

impl fmt::Display for ApiFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Some(message) => f.write_str(message),
            None => f.write_str(&self.status_meaning()),
        }
    }
}

impl std::error::Error for ApiFault {}

/// One HTTP answer: its status and the whole body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body, possibly empty.
    pub body: Bytes,
}

impl Reply {
    /// Keeps a 2xx reply; turns anything else into [`ClientError::Api`].
    pub fn success(self) -> Result<Self, ClientError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(ClientError::Api(ApiFault::parse(
                self.status.as_u16(),
                &self.body,
            )))
        }
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value, ClientError> {
        if self.body.is_empty() {
            return Err(ClientError::InvalidReply("the body is empty".to_owned()));
        }
        serde_json::from_slice(&self.body).map_err(|err| ClientError::InvalidReply(err.to_string()))
    }

    /// The object under `key` of a JSON body, e.g. `volume` of `{"volume": {...}}`.
    pub fn member(&self, key: &str) -> Result<Value, ClientError> {
        match self.json()? {
            Value::Object(mut fields) => fields
                .remove(key)
                .ok_or_else(|| ClientError::InvalidReply(format!("no \"{key}\" in the body"))),
            _ => Err(ClientError::InvalidReply(
                "the body is not an object".to_owned(),
            )),
        }
    }
}

/// Counts the bytes of an upload handed to the connection so far.
#[derive(Clone, Debug, Default)]
pub struct UploadProgress(Arc<AtomicU64>);

impl UploadProgress {
    /// Bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A connection to volumed's socket, opened afresh for each request.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client for the daemon listening on `socket`. Requests wait for as long as it takes.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: None,
        }
    }

    /// Gives up on JSON requests not answered within `timeout` (uploads are not limited).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `method path` with an optional JSON body and returns the answer, whatever its
    /// status. `headers` are added after the defaults and replace any of the same name.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        let mut builder = self.builder(method, path);
        let payload = match body {
            Some(value) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                let text = serde_json::to_vec(value)
                    .map_err(|err| ClientError::InvalidRequest(err.to_string()))?;
                Bytes::from(text)
            }
            None => Bytes::new(),
        };
        let request = finish_request(builder, headers, Full::new(payload))?;

        match self.timeout {
            Some(limit) => tokio::time::timeout(limit, self.exchange(request))
                .await
                .map_err(|_| ClientError::TimedOut(limit))?,
            None => self.exchange(request).await,
        }
    }

    /// `GET path`, refusals turned into errors, the body parsed as JSON.
    pub async fn get_json(&self, path: &str) -> Result<Reply, ClientError> {
        let reply = self.request(Method::GET, path, None, &[]).await?;
        reply.success()
    }

    /// Streams `source` as the body of `PUT path` with Content-Type
    /// `application/octet-stream`. With `length` the body is sent with a Content-Length and
    /// must be exactly that long; without, it is sent chunked until `source` ends.
    pub async fn upload<R>(
        &self,
        path: &str,
        source: R,
        length: Option<u64>,
        progress: &UploadProgress,
    ) -> Result<Reply, ClientError>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let (frames, receiver) = mpsc::channel(UPLOAD_FRAMES_AHEAD);
        let reader = tokio::spawn(read_frames(source, length, frames));
        let body = UploadBody {
            frames: receiver,
            remaining: length,
            progress: progress.clone(),
        };
        let builder = self
            .builder(Method::PUT, path)
            .header(CONTENT_TYPE, "application/octet-stream");
        let request = finish_request(builder, &[], body)?;

        let outcome = self.exchange(request).await;

        // A failed read shows up as a broken exchange; report the read error instead. The
        // reader ends soon after the body is gone, unless it is stuck on a slow source.
        if outcome.is_err() {
            let reader = AbortOnDrop(reader);
            if let Ok(Ok(Err(read_error))) = tokio::time::timeout(READER_GRACE, reader).await {
                return Err(ClientError::Upload(read_error));
            }
        }
        outcome
    }

    fn builder(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost")
            .header("Accept", "application/json")
            .header(
                "User-Agent",
                concat!("volumectl/", env!("CARGO_PKG_VERSION")),
            );
        if path.starts_with("/v3/") || path == "/v3" {
            builder = builder.header(API_VERSION_HEADER, VOLUME_API_VERSION);
        }
        builder
    }

    /// Follows the Server-Sent Events stream at `path`, handing each message to `on_event`
    /// until it returns false (`Ok`) or the daemon ends the stream (`Ok`, a complete
    /// response). A refusal is [`ClientError::Api`]; a stream that breaks off is
    /// [`ClientError::Transport`]. Only the response head is subject to the timeout.
    pub async fn follow(
        &self,
        path: &str,
        mut on_event: impl FnMut(ServerEvent) -> bool,
    ) -> Result<(), ClientError> {
        let builder = self.builder(Method::GET, path);
        let accept = [("Accept", "text/event-stream")];
        let request = finish_request(builder, &accept, Full::new(Bytes::new()))?;
        let (response, _connection) = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, self.send(request))
                .await
                .map_err(|_| ClientError::TimedOut(limit))??,
            None => self.send(request).await?,
        };

        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(ClientError::Transport)?
                .to_bytes();
            return Reply {
                status,
                body: bytes,
            }
            .success()
            .map(|_| ());
        }

        let mut parser = EventParser::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(ClientError::Transport)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for event in parser.push(&data) {
                if !on_event(event) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn exchange<B>(&self, request: Request<B>) -> Result<Reply, ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (response, _connection) = self.send(request).await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(ClientError::Transport)?
            .to_bytes();
        Ok(Reply { status, body })
    }

    /// Connects, sends `request` and returns the response head with the task that drives
    /// the connection; the body can be read while that task lives.
    async fn send<B>(
        &self,
        request: Request<B>,
    ) -> Result<(Response<Incoming>, AbortOnDrop<()>), ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|error| ClientError::Unreachable {
                    socket: self.socket.clone(),
                    error,
                })?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Transport)?;

        // The connection's errors also fail the request, so the task may drop them.
        let connection = AbortOnDrop(tokio::spawn(async move {
            let _ = connection.await;
        }));

        let response = sender
            .send_request(request)
            .await
            .map_err(ClientError::Transport)?;
        Ok((response, connection))
    }
}

/// One message of a Server-Sent Events stream.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct ServerEvent {
    /// The `event:` field (the event's type), if any.
    pub event: Option<String>,
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `data:` lines, joined by line feeds.
    pub data: String,
}

/// Splits a Server-Sent Events stream into messages, fed with bytes as they arrive.
/// Comments are dropped; a message ends at an empty line.
#[derive(Debug, Default)]
pub struct EventParser {
    line: Vec<u8>,
    message: ServerEvent,
    has_data: bool,
}

impl EventParser {
    /// Takes the next bytes; returns the messages they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<ServerEvent> {
        let mut complete = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if let Some(message) = self.take_line(&String::from_utf8_lossy(&line)) {
                complete.push(message);
            }
        }
        complete
    }

    fn take_line(&mut self, line: &str) -> Option<ServerEvent> {
        if line.is_empty() {
            let message = std::mem::take(&mut self.message);
            let has_data = std::mem::take(&mut self.has_data);
            return (has_data || message.event.is_some()).then_some(message);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.message.event = Some(value.to_owned()),
            "id" => self.message.id = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.message.data.push('\n');
                }
                self.message.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

fn finish_request<B>(
    mut builder: hyper::http::request::Builder,
    headers: &[(&str, &str)],
    body: B,
) -> Result<Request<B>, ClientError> {
    let invalid = |err: &dyn fmt::Display| ClientError::InvalidRequest(err.to_string());
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|err| invalid(&err))?;
        let value = HeaderValue::from_str(value).map_err(|err| invalid(&err))?;
        if let Some(defaults) = builder.headers_mut() {
            defaults.insert(name, value);
        }
    }
    builder.body(body).map_err(|err| invalid(&err))
}

/// Percent-encodes one path segment, so a volume or image name cannot change the route.
pub fn path_segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Aborts a spawned task when dropped, so a cancelled request closes its connection.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Reads `source` in frames of [`UPLOAD_CHUNK`] bytes into `frames` until it ends, or until
/// `length` bytes when a length was announced.
async fn read_frames<R>(
    source: R,
    length: Option<u64>,
    frames: mpsc::Sender<io::Result<Bytes>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
{
    // Never read past the announced length: a file that grows is cut, not overrun.
    let mut source = source.take(length.unwrap_or(u64::MAX));
    let mut total = 0u64;

    loop {
        let mut frame = BytesMut::with_capacity(UPLOAD_CHUNK);
        let mut ended = false;
        while frame.len() < UPLOAD_CHUNK {
            match source.read_buf(&mut frame).await {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(_) => {}
                Err(error) => return forward_error(&frames, error).await,
            }
        }

        total += frame.len() as u64;
        if !frame.is_empty() && frames.send(Ok(frame.freeze())).await.is_err() {
            // The body was dropped: the request is over, nobody wants the rest.
            return Ok(());
        }
        if ended {
            break;
        }
    }

    match length {
        Some(expected) if total < expected => {
            let error = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the data ended after {total} of {expected} bytes"),
            );
            forward_error(&frames, error).await
        }
        _ => Ok(()),
    }
}

/// Fails the body with a copy of `error` and returns the error itself to the reader's owner.
async fn forward_error(
    frames: &mpsc::Sender<io::Result<Bytes>>,
    error: io::Error,
) -> io::Result<()> {
    let copy = io::Error::new(error.kind(), error.to_string());
    let _ = frames.send(Err(copy)).await;
    Err(error)
}

/// The body of an upload: frames from the reader task, counted as hyper takes them.
struct UploadBody {
    frames: mpsc::Receiver<io::Result<Bytes>>,
    remaining: Option<u64>,
    progress: UploadProgress,
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.frames.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let sent = data.len() as u64;
                if let Some(remaining) = self.remaining.as_mut() {
                    *remaining = remaining.saturating_sub(sent);
                }
                self.progress.add(sent);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use hyper::body::Incoming;
    use hyper::server::conn::http1 as server_http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use serde_json::json;
    use tokio::net::UnixListener;

    use super::*;

    /// What the fake daemon saw of one request.
    #[derive(Clone, Debug, Default)]
    struct Seen {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
        body_len: usize,
        body: Vec<u8>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    /// Starts a fake daemon on a socket in a fresh temp dir; `answer` maps each request to a
    /// status and body. Returns the dir (keep it alive) and the requests seen so far.
    fn fake_daemon<F>(answer: F) -> (tempfile::TempDir, PathBuf, Arc<Mutex<Vec<Seen>>>)
    where
        F: Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("volumed.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake daemon");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);

        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                let answer = answer.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    respond(request, log.clone(), answer.clone())
                });
                tokio::spawn(
                    server_http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (dir, socket, seen)
    }

    async fn respond<F>(
        request: Request<Incoming>,
        log: Arc<Mutex<Vec<Seen>>>,
        answer: Arc<F>,
    ) -> Result<Response<Full<Bytes>>, Infallible>
    where
        F: Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
    {
        let mut seen = Seen {
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            ..Seen::default()
        };
        for (name, value) in request.headers() {
            let value = value.to_str().unwrap_or_default().to_owned();
            seen.headers.push((name.to_string(), value));
        }
        let mut body = request.into_body();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen.body_len += data.len();
                if seen.body.len() < 4096 {
                    seen.body.extend_from_slice(&data);
                }
            }
        }

        let (status, text) = answer(&seen);
        log.lock().expect("log lock").push(seen);
        let response = Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(text)))
            .expect("canned response");
        Ok(response)
    }

    #[test]
    fn fault_parse_reads_any_fault_name() {
        let body = br#"{"badRequest": {"code": 400, "message": "Invalid volume: in-use"}}"#;

        let fault = ApiFault::parse(400, body);

        assert_eq!(fault.name.as_deref(), Some("badRequest"));
        assert_eq!(fault.message.as_deref(), Some("Invalid volume: in-use"));
        assert!(fault.mentions("IN-USE"));
        assert_eq!(fault.to_string(), "Invalid volume: in-use");
    }

    #[test]
    fn fault_parse_of_empty_404_says_not_found() {
        let fault = ApiFault::parse(404, b"");

        assert_eq!(fault.message, None);
        assert_eq!(fault.to_string(), "not found");
    }

    #[test]
    fn fault_parse_keeps_plain_text_but_not_markup() {
        let text = ApiFault::parse(500, b"\n  disk exploded\nmore\n");
        let html = ApiFault::parse(502, b"<html><body>Bad Gateway</body></html>");

        assert_eq!(text.message.as_deref(), Some("disk exploded"));
        assert_eq!(html.message, None);
        assert_eq!(
            html.to_string(),
            "volumed failed while handling the request"
        );
    }

    #[test]
    fn fault_parse_of_unknown_status_names_it() {
        let fault = ApiFault::parse(418, b"{}");

        assert_eq!(
            fault.to_string(),
            "unexpected answer from volumed (HTTP 418 I'm a teapot)"
        );
    }

    #[test]
    fn path_segment_escapes_everything_but_unreserved() {
        assert_eq!(path_segment("vol-1_a.b~c"), "vol-1_a.b~c");
        assert_eq!(path_segment("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(path_segment("é"), "%C3%A9");
    }

    #[tokio::test]
    async fn request_sends_json_with_microversion_on_v3_only() {
        let (_dir, socket, seen) = fake_daemon(|_| (202, String::new()));
        let client = Client::new(&socket);

        let body = json!({"volume": {"name": "vol1", "size": 1}});
        let reply = client
            .request(Method::POST, "/v3/volumes", Some(&body), &[])
            .await
            .expect("request");
        client.get_json("/v2/images").await.expect("image list");

        assert_eq!(reply.status, StatusCode::ACCEPTED);
        let seen = seen.lock().expect("log lock").clone();
        assert_eq!(seen[0].method, "POST");
        assert_eq!(seen[0].path, "/v3/volumes");
        assert_eq!(seen[0].header(API_VERSION_HEADER), Some(VOLUME_API_VERSION));
        assert_eq!(seen[0].header("content-type"), Some("application/json"));
        assert_eq!(seen[0].header("host"), Some("localhost"));
        let sent: Value = serde_json::from_slice(&seen[0].body).expect("json body");
        assert_eq!(sent, body);
        assert_eq!(seen[1].header(API_VERSION_HEADER), None);
    }

    #[tokio::test]
    async fn request_headers_replace_defaults() {
        let (_dir, socket, seen) = fake_daemon(|_| (202, String::new()));
        let client = Client::new(&socket);

        let headers = [(API_VERSION_HEADER, "volume 3.68")];
        client
            .request(Method::POST, "/v3/volumes/v/action", None, &headers)
            .await
            .expect("request");

        let seen = seen.lock().expect("log lock").clone();
        assert_eq!(seen[0].header(API_VERSION_HEADER), Some("volume 3.68"));
    }

    #[tokio::test]
    async fn refusal_becomes_api_error_with_message() {
        let fault = r#"{"itemNotFound": {"code": 404, "message": "Volume nope not found"}}"#;
        let (_dir, socket, _seen) = fake_daemon(move |_| (404, fault.to_owned()));
        let client = Client::new(&socket);

        let error = client
            .get_json("/v3/volumes/nope")
            .await
            .expect_err("a 404 must fail");

        let fault = error.fault().expect("an API fault");
        assert_eq!(fault.status, 404);
        assert_eq!(error.to_string(), "Volume nope not found");
    }

    #[tokio::test]
    async fn missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let client = Client::new(dir.path().join("absent.sock"));

        let error = client
            .get_json("/v3/volumes/detail")
            .await
            .expect_err("nothing listens");

        assert!(error.is_unreachable());
        assert!(error.to_string().contains("no socket at"), "{error}");
    }

    #[tokio::test]
    async fn silent_daemon_times_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("mute.sock");
        let _listener = UnixListener::bind(&socket).expect("bind");
        let client = Client::new(&socket).with_timeout(Duration::from_millis(100));

        let error = client
            .get_json("/v3/volumes/detail")
            .await
            .expect_err("no answer");

        assert!(matches!(error, ClientError::TimedOut(_)), "{error:?}");
    }

    #[tokio::test]
    async fn upload_streams_whole_source_with_content_length() {
        let (_dir, socket, seen) = fake_daemon(|_| (204, String::new()));
        let client = Client::new(&socket);
        let data: Vec<u8> = (0..(UPLOAD_CHUNK * 2 + 12_345)).map(|i| i as u8).collect();
        let length = data.len() as u64;
        let progress = UploadProgress::default();

        let reply = client
            .upload(
                "/v2/images/x/file",
                io::Cursor::new(data),
                Some(length),
                &progress,
            )
            .await
            .expect("upload");

        assert_eq!(reply.status, StatusCode::NO_CONTENT);
        assert_eq!(progress.bytes_sent(), length);
        let seen = seen.lock().expect("log lock").clone();
        assert_eq!(seen[0].method, "PUT");
        assert_eq!(seen[0].body_len as u64, length);
        assert_eq!(seen[0].header("content-length"), Some(&*length.to_string()));
        assert_eq!(
            seen[0].header("content-type"),
            Some("application/octet-stream")
        );
    }

    #[tokio::test]
    async fn upload_of_unknown_length_is_chunked() {
        let (_dir, socket, seen) = fake_daemon(|_| (204, String::new()));
        let client = Client::new(&socket);
        let progress = UploadProgress::default();

        client
            .upload(
                "/v2/images/x/file",
                io::Cursor::new(vec![7u8; 3000]),
                None,
                &progress,
            )
            .await
            .expect("upload");

        let seen = seen.lock().expect("log lock").clone();
        assert_eq!(seen[0].body_len, 3000);
        assert_eq!(seen[0].header("transfer-encoding"), Some("chunked"));
    }

    #[tokio::test]
    async fn upload_shorter_than_announced_reports_the_read() {
        let (_dir, socket, _seen) = fake_daemon(|_| (204, String::new()));
        let client = Client::new(&socket);
        let progress = UploadProgress::default();

        let error = client
            .upload(
                "/v2/images/x/file",
                io::Cursor::new(vec![0u8; 10]),
                Some(20),
                &progress,
            )
            .await
            .expect_err("short source");

        assert!(matches!(error, ClientError::Upload(_)), "{error:?}");
        assert!(error.to_string().contains("10 of 20 bytes"), "{error}");
    }

    #[test]
    fn event_parser_splits_messages_across_pieces() {
        let mut parser = EventParser::default();
        assert!(parser
            .push(b": hello\n\nid: 1\nevent: volume.cre")
            .is_empty());
        let events = parser.push(b"ated\ndata: {\"a\":1}\r\n\r\n: keep-alive\n\nda");
        assert_eq!(
            events,
            [ServerEvent {
                event: Some("volume.created".into()),
                id: Some("1".into()),
                data: "{\"a\":1}".into(),
            }]
        );
        let events = parser.push(b"ta: x\ndata:y\n\n");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "x\ny");
        assert_eq!(events[0].event, None);
    }
}
