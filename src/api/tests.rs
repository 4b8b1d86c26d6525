//! Round trips through a real socket: [`super::serve`], the router and a real engine on a
//! temporary state directory. Nothing is mounted and no re-image is run; these tests are
//! about what the HTTP layer answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{serve, SHUTDOWN_GRACE};
use crate::config::Config;
use crate::engine::Engine;
use crate::store::Store;

const MISSING_IMAGE: &str = "6f9619ff-8b86-d011-b42d-00c04fc964ff";

/// One answer, read off the socket as bytes.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!("not JSON ({err}): {}", String::from_utf8_lossy(&self.body))
        })
    }

    /// The fault name and message of an error body.
    fn fault(&self) -> (String, String) {
        let body = self.json();
        let (name, inner) = body.as_object().unwrap().iter().next().unwrap();
        assert_eq!(inner["code"], self.status, "{body}");
        (name.clone(), inner["message"].as_str().unwrap().to_owned())
    }
}

/// A server on a socket in its own temporary directory.
struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    engine: Arc<Engine>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start() -> Self {
        Self::start_with_policy(&[]).await
    }

    /// A server whose `[policy]` table holds `rules`.
    async fn start_with_policy(rules: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().join("state"),
            mountpoint: dir.path().join("mnt"),
            policy: rules
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Config::default()
        };
        let store = Store::open(&config.state_dir).unwrap();
        let engine: Arc<Engine> = Engine::open(config, store).unwrap();

        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::clone(&engine), stopped));
        Self {
            _dir: dir,
            socket,
            engine,
            stop,
            task,
        }
    }

    /// Asks for shutdown and checks the server returns within its grace period.
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(2), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }

    /// Sends raw bytes and reads the answer until the server closes the connection.
    async fn send(&self, raw: &[u8]) -> Reply {
        let mut stream = UnixStream::connect(&self.socket).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("answer in time")
            .unwrap();
        parse_reply(&answer)
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: volumed\r\nConnection: close\r\n");
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut raw = raw.into_bytes();
        raw.extend_from_slice(body);
        self.send(&raw).await
    }

    /// A JSON request at microversion `version` (`None`: no version header).
    async fn json(
        &self,
        method: &str,
        path: &str,
        version: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let header = version.map(|v| format!("volume {v}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(header) = &header {
            headers.push(("OpenStack-API-Version", header));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.request(method, path, &headers, body.as_bytes()).await
    }

    async fn create_volume(&self, name: &str) -> Value {
        let body = json!({"volume": {"name": name, "size": 1}});
        let reply = self.json("POST", "/v3/volumes", None, Some(body)).await;
        assert_eq!(
            reply.status,
            202,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()["volume"].clone()
    }
}

fn parse_reply(raw: &[u8]) -> Reply {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_document_is_served_at_the_root() {
    let server = Server::start().await;

    let reply = server.request("GET", "/", &[], b"").await;
    assert_eq!(reply.status, 200);
    let version = &reply.json()["versions"][0];
    assert_eq!(version["version"], "3.71");
    assert_eq!(version["min_version"], "3.0");
    assert!(reply.header("OpenStack-API-Version").is_none());

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_api_echoes_the_microversion() {
    let server = Server::start().await;

    let reply = server.json("GET", "/v3/volumes", None, None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("OpenStack-API-Version"), Some("volume 3.0"));
    assert_eq!(reply.header("Vary"), Some("OpenStack-API-Version"));

    let reply = server
        .json("GET", "/v3/volumes", Some("latest"), None)
        .await;
    assert_eq!(reply.header("OpenStack-API-Version"), Some("volume 3.71"));

    // Faults echo it too.
    let reply = server
        .json("GET", "/v3/volumes/nope", Some("3.50"), None)
        .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("OpenStack-API-Version"), Some("volume 3.50"));

    // The image API has no microversions.
    let reply = server.json("GET", "/v2/images", Some("3.50"), None).await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("OpenStack-API-Version").is_none());

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_microversions_are_refused() {
    let server = Server::start().await;

    let reply = server.json("GET", "/v3/volumes", Some("3.72"), None).await;
    assert_eq!(reply.status, 406);
    assert_eq!(reply.fault().0, "notAcceptable");

    let reply = server.json("GET", "/v3/volumes", Some("three"), None).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.fault().0, "badRequest");
    assert_eq!(reply.header("Vary"), Some("OpenStack-API-Version"));

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_are_created_listed_and_shown() {
    let server = Server::start().await;

    let volume = server.create_volume("data").await;
    assert_eq!(volume["name"], "data");
    assert_eq!(volume["status"], "available");
    assert_eq!(volume["bootable"], "false");
    let id = volume["id"].as_str().unwrap().to_owned();

    let reply = server.json("GET", "/v3/volumes", None, None).await;
    let summary = &reply.json()["volumes"][0];
    assert_eq!(summary["id"], id.as_str());
    assert_eq!(summary["links"][0]["href"], format!("/v3/volumes/{id}"));

    let reply = server.json("GET", "/v3/volumes/detail", None, None).await;
    assert_eq!(reply.json()["volumes"][0]["size"], 1);

    for key in ["data", id.as_str()] {
        let reply = server
            .json("GET", &format!("/v3/volumes/{key}"), None, None)
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["volume"]["id"], id.as_str());
    }

    let reply = server.json("DELETE", "/v3/volumes/data", None, None).await;
    assert_eq!(reply.status, 202);
    assert!(reply.body.is_empty());

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn create_volume_refuses_bad_bodies() {
    let server = Server::start().await;

    let body = json!({"volume": {"name": "x", "size": 1, "volume_type": "fast"}});
    let reply = server.json("POST", "/v3/volumes", None, Some(body)).await;
    assert_eq!(reply.status, 400);
    assert!(reply.fault().1.contains("volume_type"));

    let body = json!({"volume": {"name": "x", "size": "big"}});
    let reply = server.json("POST", "/v3/volumes", None, Some(body)).await;
    assert_eq!(reply.status, 400);
    assert!(reply.fault().1.contains("size"));

    let body = json!({"volume": {"name": "x", "size": 1, "owner": "no-such-user-volumed"}});
    let reply = server.json("POST", "/v3/volumes", None, Some(body)).await;
    assert_eq!(reply.status, 400);
    assert!(reply.fault().1.contains("no-such-user-volumed"));

    let reply = server
        .request(
            "POST",
            "/v3/volumes",
            &[("Content-Type", "application/json")],
            b"{\"volume\": ",
        )
        .await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.fault().1.contains("invalid JSON"),
        "{:?}",
        reply.fault()
    );

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reimage_is_hidden_below_3_68_and_validated_from_it() {
    let server = Server::start().await;
    server.create_volume("root").await;
    let path = "/v3/volumes/root/action";

    // Below 3.68: a bare 404 whatever the arguments.
    let body = json!({"os-reimage": {"image_id": "bad", "force": true}});
    let reply = server.json("POST", path, Some("3.67"), Some(body)).await;
    assert_eq!(reply.status, 404);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("OpenStack-API-Version"), Some("volume 3.67"));

    let body = json!({"os-reimage": {"image_id": MISSING_IMAGE, "reimage_reserved": "TrUe"}});
    let reply = server.json("POST", path, Some("3.68"), Some(body)).await;
    assert_eq!(reply.status, 400);
    let message = reply.fault().1;
    assert!(
        message.starts_with("Invalid input for field/attribute reimage_reserved. Value: TrUe"),
        "{message}"
    );

    // A valid request reaches the engine, which does not know the image.
    let body = json!({"os-reimage": {"image_id": MISSING_IMAGE, "reimage_reserved": "no"}});
    let reply = server.json("POST", path, Some("latest"), Some(body)).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.fault().0, "itemNotFound");

    let body = json!({"os-frobnicate": {}});
    let reply = server.json("POST", path, Some("latest"), Some(body)).await;
    assert_eq!(reply.fault().1, "There is no such action: os-frobnicate");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn attachments_need_3_27_and_complete_needs_3_44() {
    let server = Server::start().await;
    let volume = server.create_volume("disk").await;

    let reply = server
        .json("GET", "/v3/attachments", Some("3.26"), None)
        .await;
    assert_eq!((reply.status, reply.body.len()), (404, 0));

    let body = json!({"attachment": {"volume_uuid": volume["id"]}});
    let reply = server
        .json("POST", "/v3/attachments", Some("3.27"), Some(body))
        .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let attachment = reply.json()["attachment"].clone();
    assert_eq!(attachment["volume_id"], volume["id"]);
    assert_eq!(attachment["connection_info"], json!({}));
    let id = attachment["id"].as_str().unwrap().to_owned();

    let action = format!("/v3/attachments/{id}/action");
    let reply = server
        .json(
            "POST",
            &action,
            Some("3.43"),
            Some(json!({"os-complete": null})),
        )
        .await;
    assert_eq!((reply.status, reply.body.len()), (404, 0));

    let reply = server
        .json("GET", "/v3/attachments", Some("3.27"), None)
        .await;
    assert_eq!(reply.json()["attachments"][0]["id"], id.as_str());

    let reply = server
        .json(
            "DELETE",
            &format!("/v3/attachments/{id}"),
            Some("3.27"),
            None,
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"attachments": []}));

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_methods_and_paths_are_refused() {
    let server = Server::start().await;

    let reply = server.json("GET", "/v3/snapshots", None, None).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.fault().0, "itemNotFound");

    let reply = server.json("PATCH", "/v3/volumes", None, None).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("Allow"), Some("GET, POST"));

    let reply = server.json("GET", "/v3/volumes/%zz", None, None).await;
    assert_eq!(reply.status, 400);

    let reply = server.send(b"GARBAGE\r\n\r\n").await;
    assert_eq!(reply.status, 400);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_routes_check_media_type_and_size() {
    let server = Server::start().await;
    let body = json!({"volume": {"name": "x", "size": 1}}).to_string();

    let headers = [("Content-Type", "text/plain")];
    let reply = server
        .request("POST", "/v3/volumes", &headers, body.as_bytes())
        .await;
    assert_eq!(reply.status, 415);
    assert_eq!(reply.fault().0, "badMediaType");

    let reply = server
        .request("POST", "/v3/volumes", &[], body.as_bytes())
        .await;
    assert_eq!(reply.status, 202, "a missing Content-Type is accepted");

    // Declared too large.
    let big = vec![b' '; 70 * 1024];
    let headers = [("Content-Type", "application/json; charset=utf-8")];
    let reply = server.request("POST", "/v3/volumes", &headers, &big).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.fault().0, "overLimit");

    // Chunked, so only counting while reading finds it.
    let mut raw = b"POST /v3/volumes HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\
        Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..5 {
        raw.extend_from_slice(format!("{:x}\r\n", 16 * 1024).as_bytes());
        raw.extend_from_slice(&[b' '; 16 * 1024]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let reply = server.send(&raw).await;
    assert_eq!(reply.status, 413);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn images_are_created_uploaded_and_shown() {
    let server = Server::start().await;

    let body = json!({"name": "tiny", "disk_format": "raw", "container_format": "bare"});
    let reply = server.json("POST", "/v2/images", None, Some(body)).await;
    assert_eq!(
        reply.status,
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let image = reply.json();
    let id = image["id"].as_str().unwrap().to_owned();
    assert_eq!(image["status"], "queued");
    assert_eq!(
        reply.header("Location"),
        Some(format!("/v2/images/{id}").as_str())
    );

    let file = format!("/v2/images/{id}/file");
    let data = vec![7u8; 3 * 1024 * 1024 + 17];
    // Refused unread; a small body, so this client is not cut off while still writing.
    let reply = server
        .request("PUT", &file, &[("Content-Type", "text/plain")], b"x")
        .await;
    assert_eq!(reply.status, 415);

    let octets = [("Content-Type", "application/octet-stream")];
    let reply = server.request("PUT", &file, &octets, &data).await;
    assert_eq!(
        reply.status,
        204,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );

    let reply = server.json("GET", "/v2/images/tiny", None, None).await;
    let image = reply.json();
    assert_eq!(image["status"], "active");
    assert_eq!(image["size"], data.len());
    assert_eq!(image["os_hash_algo"], "sha512");

    // A second upload is refused by the engine before the body is read.
    let reply = server.request("PUT", &file, &octets, b"more").await;
    assert_eq!(reply.status, 409);

    let reply = server.json("GET", "/v2/images", None, None).await;
    assert_eq!(reply.json()["images"][0]["id"], id.as_str());
    assert_eq!(reply.json()["schema"], "/v2/schemas/images");

    let reply = server
        .json(
            "POST",
            "/v2/images",
            None,
            Some(json!({"status": "active"})),
        )
        .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.fault().1, "Attribute 'status' is read-only.");

    let reply = server
        .json("DELETE", &format!("/v2/images/{id}"), None, None)
        .await;
    assert_eq!(reply.status, 204);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_upload_leaves_the_image_queued() {
    let server = Server::start().await;
    let body = json!({"name": "cut", "disk_format": "raw", "container_format": "bare"});
    let id = server
        .json("POST", "/v2/images", None, Some(body))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Announce more than is sent, then hang up.
    let mut stream = UnixStream::connect(&server.socket).await.unwrap();
    let head = format!(
        "PUT /v2/images/{id}/file HTTP/1.1\r\nHost: v\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[1u8; 1000]).await.unwrap();
    drop(stream);

    // The upload is aborted: the image can be uploaded again.
    let mut status = String::new();
    for _ in 0..100 {
        let reply = server
            .json("GET", &format!("/v2/images/{id}"), None, None)
            .await;
        status = reply.json()["status"].as_str().unwrap().to_owned();
        if status == "queued" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, "queued");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_closes_idle_keep_alive_connections() {
    let server = Server::start().await;

    // An idle client that never sends a request must not hold the server open.
    let idle = UnixStream::connect(&server.socket).await.unwrap();
    let started = tokio::time::Instant::now();
    server.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(idle);
}

/// Opens `GET /v3/events` and reads its head; the caller is then subscribed.
async fn follow_events(server: &Server) -> UnixStream {
    let mut stream = UnixStream::connect(&server.socket).await.unwrap();
    stream
        .write_all(b"GET /v3/events HTTP/1.1\r\nHost: volumed\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    stream
}

/// A record to emit events about, owned by whoever runs the test (so visible to them).
fn some_volume() -> crate::model::VolumeRecord {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    crate::model::VolumeRecord {
        id: uuid::Uuid::new_v4(),
        name: "v".into(),
        description: None,
        size: 1,
        status: crate::model::VolumeStatus::Available,
        previous_status: None,
        status_reason: None,
        owner_uid: uid,
        owner_gid: uid,
        bootable: false,
        image_metadata: Default::default(),
        ino: 16,
        reimage: None,
        created_at: crate::model::timestamp(),
        updated_at: crate::model::timestamp(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_that_does_not_read_is_told_how_many_events_it_missed() {
    let server = Server::start().await;
    let mut stream = follow_events(&server).await;

    // Far more than the ring, the queue and the socket buffers hold, while nobody reads.
    let volume = some_volume();
    for _ in 0..20_000 {
        server
            .engine
            .events()
            .emit(&volume, crate::events::EventKind::Deleted);
    }

    let mut seen = Vec::new();
    let lagged = loop {
        let mut buf = [0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the stream goes on")
            .unwrap();
        assert!(n > 0, "the stream ended");
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some(at) = text.find("event: lagged\ndata: ") {
            let line = text[at..].lines().nth(1).map(str::to_owned);
            if let Some(line) = line.filter(|l| l.ends_with('}')) {
                break line;
            }
        }
    };
    let data: Value = serde_json::from_str(lagged.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(data["type"], "lagged");
    assert!(data["missed"].as_u64().unwrap() > 0, "{data}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn event_streams_end_cleanly_and_at_once_when_the_server_stops() {
    let server = Server::start().await;
    let mut stream = follow_events(&server).await;

    let started = tokio::time::Instant::now();
    server.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a stream does not hold the shutdown: {:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest))
        .await
        .expect("the stream ends")
        .unwrap();
    assert!(
        rest.ends_with(b"0\r\n\r\n"),
        "a complete chunked response: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_answer_in_the_text_format_and_count_faults() {
    // Whoever runs the test may read them, administrator or not.
    let server = Server::start_with_policy(&[("volumed:metrics", "@")]).await;
    let missing = server
        .json("GET", "/v3/volumes/missing", Some("3.0"), None)
        .await;
    assert_eq!(missing.status, 404);

    let reply = server.request("GET", "/metrics", &[], b"").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(reply.body).unwrap();
    assert!(
        text.contains("volumed_api_faults_total{status=\"404\",fault=\"itemNotFound\"} 1\n"),
        "{text}"
    );
    let reply = server.request("POST", "/metrics", &[], b"").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET"));
    server.stop().await;
}
