//! The harness of the integration tests: a real daemon on a real mount and a real socket.
//!
//! Every test starts its own `volumed` with its own mountpoint, socket and state directory
//! under a temporary directory, and stops exactly that process (by pid) when it ends. A
//! test that needs a missing tool fails with a message that names the tool; none is skipped.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Fails the test unless `tool` is on PATH.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "this test needs `{tool}`; install it (see .ci/run) and run again"
    );
}

/// Fails the test unless it runs as root (mounts, loop devices, other users).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the integration tests must run as root");
    assert!(
        Path::new("/dev/fuse").exists(),
        "the integration tests need /dev/fuse"
    );
}

/// Runs a shell command under a timeout; a hang is a failure.
pub fn sh(script: &str) -> Output {
    Command::new("timeout")
        .args(["-k", "5", "300", "sh", "-c", script])
        .output()
        .expect("run sh")
}

/// Runs a shell command and asserts it succeeded; returns its stdout.
pub fn sh_ok(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "command failed ({}): {script}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (`Null` when empty).
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The message of an OpenStack fault body.
    pub fn fault_message(&self) -> String {
        let body = self.json();
        let fault = body.as_object().and_then(|o| o.values().next()).cloned();
        fault
            .and_then(|f| f.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| panic!("not a fault body: {}", self.text()))
    }
}

/// Sends one raw HTTP/1.1 request over the Unix socket at `socket`.
pub fn http(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();

    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: volumed\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    // The daemon may refuse a request before reading its body (an upload to a busy image);
    // a failed write then still leaves the answer to read.
    let _ = stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.write_all(body));

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();

    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

/// A running daemon with its own directories.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts a daemon with the default settings.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a daemon; `extra` is appended to its daemon.toml (top-level keys, then tables).
    pub fn start_with(extra: &str) -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("volumed-test.")
            .tempdir()
            .unwrap();
        let base = dir.path();
        let mnt = base.join("mnt");
        let socket = base.join("volumed.sock");
        let state = base.join("state");
        Self::start_in(dir, &mnt, &socket, &state, extra)
    }

    /// Starts a daemon whose state directory is `state` (for example on a small file system).
    pub fn start_with_state(state: &Path, extra: &str) -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("volumed-test.")
            .tempdir()
            .unwrap();
        let mnt = dir.path().join("mnt");
        let socket = dir.path().join("volumed.sock");
        Self::start_in(dir, &mnt, &socket, state, extra)
    }

    /// Sets up the directories and daemon.toml like [`Daemon::start_with`] without starting
    /// a process; start one with [`Daemon::spawn_and_wait`] or [`Daemon::adopt`].
    pub fn configure(extra: &str) -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("volumed-test.")
            .tempdir()
            .unwrap();
        let base = dir.path();
        let (mnt, socket, state) = (
            base.join("mnt"),
            base.join("volumed.sock"),
            base.join("state"),
        );
        Self::configure_in(dir, &mnt, &socket, &state, extra)
    }

    fn start_in(
        dir: tempfile::TempDir,
        mnt: &Path,
        socket: &Path,
        state: &Path,
        extra: &str,
    ) -> Self {
        let mut daemon = Self::configure_in(dir, mnt, socket, state, extra);
        daemon.spawn_and_wait();
        daemon
    }

    fn configure_in(
        dir: tempfile::TempDir,
        mnt: &Path,
        socket: &Path,
        state: &Path,
        extra: &str,
    ) -> Self {
        // Other users (tests run some steps as nobody) must reach the socket and the mount.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

        let config = dir.path().join("daemon.toml");
        let text = format!(
            "mountpoint = {:?}\nsocket = {:?}\nstate_dir = {:?}\nsocket_mode = \"0666\"\n\
             log_level = \"info\"\n{extra}\n",
            mnt, socket, state
        );
        std::fs::write(&config, text).unwrap();
        Self {
            log: dir.path().join("volumed.log"),
            dir,
            mnt: mnt.to_path_buf(),
            socket: socket.to_path_buf(),
            state: state.to_path_buf(),
            config,
            child: None,
        }
    }

    /// Starts the daemon process again on the same directories and waits until it serves.
    pub fn spawn_and_wait(&mut self) {
        let child = self.spawn();
        self.child = Some(child);
        self.wait_ready();
    }

    /// Takes `child` (a daemon started some other way, e.g. through a wrapper that execs
    /// volumed) as this daemon's process and waits until it serves.
    pub fn adopt(&mut self, child: Child) {
        self.child = Some(child);
        self.wait_ready();
    }

    /// The daemon's log file, opened for appending (for the stderr of a process).
    pub fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap()
    }

    /// Spawns another daemon process on this configuration without waiting.
    pub fn spawn(&self) -> Child {
        let log = self.log_file();
        Command::new(env!("CARGO_BIN_EXE_volumed"))
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn volumed")
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "volumed exited with {status} at start:\n{}",
                        self.log_text()
                    );
                }
            }
            if UnixStream::connect(&self.socket).is_ok() && self.mnt.join(".control").exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("volumed did not become ready:\n{}", self.log_text());
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sends `signal` to the daemon (by pid).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// SIGKILLs the daemon and reaps it; the mount is left dead, as after a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("volumed did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Path of a volume's file in the mount.
    pub fn vol(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// A request with a JSON body (or none) and the latest microversion.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        http(
            &self.socket,
            method,
            path,
            &[
                ("Content-Type", "application/json"),
                ("OpenStack-API-Version", "volume 3.71"),
            ],
            body.as_bytes(),
        )
    }

    /// Creates a volume and returns its detail view.
    pub fn create_volume(&self, name: &str, gib: u64) -> Value {
        let r = self.api(
            "POST",
            "/v3/volumes",
            Some(json!({"volume": {"name": name, "size": gib}})),
        );
        assert_eq!(r.status, 202, "create {name}: {}", r.text());
        r.json()["volume"].clone()
    }

    /// The detail view of a volume.
    pub fn volume(&self, key: &str) -> Value {
        let r = self.api("GET", &format!("/v3/volumes/{key}"), None);
        assert_eq!(r.status, 200, "get {key}: {}", r.text());
        r.json()["volume"].clone()
    }

    /// A volume's status.
    pub fn status(&self, key: &str) -> String {
        self.volume(key)["status"].as_str().unwrap().to_string()
    }

    /// Uploads `file` as a raw image named `name`; returns its id.
    pub fn import_image(&self, file: &Path, name: &str) -> String {
        let r = self.api(
            "POST",
            "/v2/images",
            Some(json!({"name": name, "disk_format": "raw", "container_format": "bare"})),
        );
        assert_eq!(r.status, 201, "create image: {}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        let data = std::fs::read(file).unwrap();
        let r = http(
            &self.socket,
            "PUT",
            &format!("/v2/images/{id}/file"),
            &[("Content-Type", "application/octet-stream")],
            &data,
        );
        assert_eq!(r.status, 204, "upload image: {}", r.text());
        id
    }

    /// Asks for a re-image; returns the response.
    pub fn reimage(&self, volume: &str, image_id: &str, reserved: bool) -> Response {
        self.api(
            "POST",
            &format!("/v3/volumes/{volume}/action"),
            Some(json!({"os-reimage": {"image_id": image_id, "reimage_reserved": reserved}})),
        )
    }

    /// Waits until the volume's re-image is no longer running; returns the volume view.
    pub fn wait_reimage(&self, volume: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.volume(volume);
            let running = view["reimage"]["state"] == "running";
            if !running && view["status"] != "downloading" {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "re-image of {volume} still running: {view}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the blocks of the content the last re-image destroyed are given back
    /// (`reimage.space_reclaimed_at` is set); returns the volume view.
    pub fn wait_space_reclaimed(&self, volume: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let view = self.volume(volume);
            if !view["reimage"]["space_reclaimed_at"].is_null() {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "the space of {volume} was not reclaimed: {view}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Re-images and waits for success.
    pub fn reimage_and_wait(&self, volume: &str, image_id: &str) -> Value {
        let r = self.reimage(volume, image_id, false);
        assert_eq!(r.status, 202, "reimage: {}", r.text());
        let view = self.wait_reimage(volume, Duration::from_secs(120));
        assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
        view
    }

    /// Runs `volumectl --socket <ours> args...`.
    pub fn volumectl(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args([
                "-k",
                "5",
                "300",
                env!("CARGO_BIN_EXE_volumectl"),
                "--socket",
            ])
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run volumectl")
    }

    /// Reserves a volume with an attachment without connector; returns the attachment's id.
    pub fn reserve(&self, volume_id: &Value, instance: Option<&str>) -> String {
        let mut attachment = json!({"volume_uuid": volume_id});
        if let Some(instance) = instance {
            attachment["instance_uuid"] = json!(instance);
        }
        let r = self.api(
            "POST",
            "/v3/attachments",
            Some(json!({"attachment": attachment})),
        );
        assert_eq!(r.status, 200, "reserve: {}", r.text());
        r.json()["attachment"]["id"].as_str().unwrap().to_string()
    }

    /// Lines of `/proc/self/mountinfo` for our mountpoint.
    pub fn mount_entries(&self) -> usize {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let wanted = self.mnt.to_string_lossy().replace(' ', "\\040");
        info.lines()
            .filter(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }

        // Loop devices on our volumes, then the mount itself (lazily as a last resort).
        let mnt = self.mnt.to_string_lossy().into_owned();
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "for d in $(losetup -n -O NAME,BACK-FILE \
                     | awk '$2 ~ \"^{mnt}/\" {{print $1}}'); do losetup -d $d; done; \
                     while grep -q \" {mnt} \" /proc/self/mountinfo; do umount {mnt} 2>/dev/null \
                     || umount -l {mnt} || break; done"
                ),
            ])
            .status();
    }
}

/// Writes `len` bytes of deterministic pseudo-random data seeded by `seed` to `path`.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}

/// Reads `len` bytes at `offset` with O_DIRECT.
pub fn read_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
    // SAFETY: a fresh aligned allocation of `len` bytes, freed below.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: `ptr` is valid for `len` bytes and exclusively ours.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    let n = file.read_at(buf, offset).unwrap();
    let out = buf[..n].to_vec();
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    out
}
