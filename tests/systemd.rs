//! volumed under systemd, without systemd as PID 1: the tests check the unit files with
//! systemd's own tools (`systemd-analyze verify` and `security`, `systemd-tmpfiles`,
//! `systemd-sysusers`, `systemd-socket-activate`), and drive the real daemon exactly the way
//! systemd does: a `NOTIFY_SOCKET` datagram listener, `WATCHDOG_USEC`/`WATCHDOG_PID`,
//! `LISTEN_FDS` from the real socket activator, signals, the unit's capability bounding set
//! (with `setpriv`), and a restart of a crashed process as `Restart=on-failure` would. The
//! install path is checked with `make install-files` into a DESTDIR and with a Debian package
//! built by cargo-deb from the binaries these tests already built.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http, random_file, require, sh, sh_ok, Daemon};
use serde_json::json;

const VOLUMED: &str = env!("CARGO_BIN_EXE_volumed");
const MIB: u64 = 1 << 20;

fn q(path: &Path) -> String {
    format!("'{}'", path.display())
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ----- a NOTIFY_SOCKET listener --------------------------------------------------------------

/// Check run by the listener the moment `READY=1` arrives, before it reads anything else.
type ReadyCheck = Box<dyn FnMut() -> Result<(), String> + Send>;

/// A datagram socket in the role of systemd's notify socket: records every message with its
/// arrival time.
struct Notifications {
    path: PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    ready_checks: Arc<Mutex<Vec<Result<(), String>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notifications {
    fn listen(dir: &Path) -> Self {
        Self::listen_with(dir, None)
    }

    fn listen_with(dir: &Path, mut on_ready: Option<ReadyCheck>) -> Self {
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let ready_checks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));

        let (got, checks, stopped) = (messages.clone(), ready_checks.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !stopped.load(Ordering::Acquire) {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                let at = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let ready = text.lines().any(|l| l == "READY=1");
                if ready {
                    if let Some(check) = on_ready.as_mut() {
                        checks.lock().unwrap().push(check());
                    }
                }
                got.lock().unwrap().push((at, text));
            }
        });
        Self {
            path,
            messages,
            ready_checks,
            stop,
            thread: Some(thread),
        }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.messages.lock().unwrap().clone()
    }

    /// Every message as one string, for failure output.
    fn dump(&self) -> String {
        self.all()
            .iter()
            .map(|(_, m)| m.replace('\n', " | "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Arrival times of the messages that hold `line` (exactly, or as a prefix with `*`).
    fn times_of(&self, line: &str) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| matches_line(l, line)))
            .map(|(at, _)| at)
            .collect()
    }

    /// Waits for a message holding `line` after `since`; returns the message.
    fn wait_for(&self, line: &str, since: Instant, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let found = self
                .all()
                .into_iter()
                .find(|(at, m)| *at >= since && m.lines().any(|l| matches_line(l, line)));
            if let Some((_, message)) = found {
                return message;
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} within {limit:?}; got:\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `STATUS=` lines received so far, in order.
    fn statuses(&self) -> Vec<String> {
        self.all()
            .iter()
            .flat_map(|(_, m)| m.lines().map(str::to_string).collect::<Vec<_>>())
            .filter_map(|l| l.strip_prefix("STATUS=").map(str::to_string))
            .collect()
    }

    fn ready_checks(&self) -> Vec<Result<(), String>> {
        self.ready_checks.lock().unwrap().clone()
    }
}

fn matches_line(line: &str, pattern: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => line.starts_with(prefix),
        None => line == pattern,
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ----- starting the daemon as systemd does ---------------------------------------------------

/// How systemd would start the daemon.
#[derive(Default)]
struct Launch<'a> {
    notify: Option<&'a Path>,
    watchdog: Option<Duration>,
    /// `WATCHDOG_PID`: `Some(None)` names the daemon itself, `Some(Some(pid))` another one.
    watchdog_pid: Option<Option<u32>>,
    /// `setpriv` arguments that narrow the process as the unit does.
    setpriv: Vec<String>,
}

/// Starts volumed through `sh -c 'exec ...'`: the shell's pid becomes the daemon's, so
/// `WATCHDOG_PID=$$` names the daemon the way systemd's fork-then-exec does.
fn spawn_like_systemd(daemon: &Daemon, launch: &Launch) -> Child {
    let mut script = String::from("ulimit -c 0; ");
    match launch.watchdog_pid {
        Some(None) => script.push_str("export WATCHDOG_PID=$$; "),
        Some(Some(pid)) => script.push_str(&format!("export WATCHDOG_PID={pid}; ")),
        None => {}
    }
    script.push_str("exec \"$@\"");

    let mut command = Command::new("sh");
    command.args(["-c", &script, "sh"]);
    if !launch.setpriv.is_empty() {
        command.arg("setpriv").args(&launch.setpriv);
    }
    command.arg(VOLUMED).arg("--config").arg(&daemon.config);
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        command.env_remove(var);
    }
    if let Some(notify) = launch.notify {
        command.env("NOTIFY_SOCKET", notify);
    }
    if let Some(interval) = launch.watchdog {
        command.env("WATCHDOG_USEC", interval.as_micros().to_string());
    }
    command
        .stdout(Stdio::null())
        .stderr(daemon.log_file())
        .spawn()
        .expect("spawn volumed")
}

/// The same, and waits until it serves.
fn start_like_systemd(daemon: &mut Daemon, launch: &Launch) {
    let child = spawn_like_systemd(daemon, launch);
    daemon.adopt(child);
}

fn pid_alive(pid: u32) -> bool {
    // The state follows the command name in parentheses; a zombie has ended.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

// ----- unit files ----------------------------------------------------------------------------

/// `Key=value` lines of a unit file (repeated keys keep every value).
fn unit_keys(path: &Path) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            keys.entry(key.trim().to_string())
                .or_default()
                .push(value.trim().to_string());
        }
    }
    keys
}

fn unit_value(keys: &BTreeMap<String, Vec<String>>, key: &str) -> String {
    keys.get(key)
        .and_then(|v| v.last())
        .unwrap_or_else(|| panic!("the unit sets no {key}="))
        .clone()
}

/// Copies the units `service` and `socket` to `dir` with ExecStart= pointing at `volumed`.
fn units_for(dir: &Path, service: &Path, socket: &Path, volumed: &Path) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(service).unwrap();
    let rewritten: Vec<String> = text
        .lines()
        .map(|line| match line.strip_prefix("ExecStart=") {
            Some(command) => {
                let args = command.split_once(' ').map_or("", |(_, args)| args);
                format!("ExecStart={} {args}", volumed.display())
            }
            None => line.to_string(),
        })
        .collect();
    let (service_path, socket_path) = (dir.join("volumed.service"), dir.join("volumed.socket"));
    std::fs::write(&service_path, rewritten.join("\n") + "\n").unwrap();
    std::fs::copy(socket, &socket_path).unwrap();
    (service_path, socket_path)
}

fn repo_units_for(dir: &Path, volumed: &Path) -> (PathBuf, PathBuf) {
    units_for(
        dir,
        &repo("systemd/volumed.service"),
        &repo("systemd/volumed.socket"),
        volumed,
    )
}

/// Runs `systemd-analyze verify` on units; any warning fails, not only errors.
fn verify_units(units: &[&Path]) {
    let args: Vec<String> = units.iter().map(|p| q(p)).collect();
    let out = sh(&format!("systemd-analyze verify {}", args.join(" ")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `systemd-analyze verify` passes on both units, warnings included, and the service's
/// exposure (`systemd-analyze security`) stays below 5.0 ("OK").
#[test]
fn units_pass_systemd_analyze_verify_and_security() {
    require("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let (service, socket) = repo_units_for(dir.path(), Path::new(VOLUMED));
    verify_units(&[&service, &socket]);

    // The check is not a formality: a misspelt key is reported, and only as a warning.
    let bad = dir.path().join("bad").join("volumed.service");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    let text = std::fs::read_to_string(&service).unwrap();
    std::fs::write(&bad, text.replace("Type=notify", "Tpye=notify")).unwrap();
    let out = sh(&format!("systemd-analyze verify {}", q(&bad)));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Tpye"),
        "verify must report an unknown key: {out:?}"
    );

    let out = sh(&format!(
        "systemd-analyze security --offline=yes --threshold=49 {}",
        q(&service)
    ));
    let report = String::from_utf8_lossy(&out.stdout);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default();
    assert!(
        out.status.success(),
        "exposure above 4.9: {overall}\n{report}"
    );
}

/// The unit gives the daemon no mount namespace of its own: a FUSE mount made inside one
/// would not be visible to the host.
#[test]
fn unit_sets_nothing_that_would_hide_the_mount_from_the_host() {
    let keys = unit_keys(&repo("systemd/volumed.service"));
    let namespacing = [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "PrivateNetwork",
        "PrivateIPC",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProcSubset",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "BindPaths",
        "BindReadOnlyPaths",
        "TemporaryFileSystem",
        "RootDirectory",
        "RootImage",
        "MountFlags",
        "DynamicUser",
    ];
    let set: Vec<_> = namespacing
        .iter()
        .filter(|key| keys.contains_key(**key))
        .collect();
    assert!(
        set.is_empty(),
        "these give the service its own mount namespace: {set:?}"
    );
    assert_eq!(unit_value(&keys, "RuntimeDirectoryPreserve"), "yes");
}

/// The unit's file layout matches daemon.toml's defaults: directories, socket path, mode and
/// group, the admin group that sysusers creates, and the mountpoint ExecStopPost= detaches.
#[test]
fn units_tmpfiles_and_sysusers_agree_with_the_default_configuration() {
    let config = volumed::config::Config::load(Some(&repo("daemon.toml"))).unwrap();
    let defaults = volumed::config::Config::load(None).unwrap();
    assert_eq!(
        config.socket, defaults.socket,
        "daemon.toml shows the defaults"
    );
    let service = unit_keys(&repo("systemd/volumed.service"));
    let socket = unit_keys(&repo("systemd/volumed.socket"));

    let runtime = Path::new("/run").join(unit_value(&service, "RuntimeDirectory"));
    let state = Path::new("/var/lib").join(unit_value(&service, "StateDirectory"));
    assert!(config.mountpoint.starts_with(&runtime), "{config:?}");
    assert!(config.socket.starts_with(&runtime), "{config:?}");
    assert_eq!(config.state_dir, state);
    assert_eq!(
        unit_value(&service, "ExecStopPost"),
        format!("-/bin/umount -l {}", config.mountpoint.display())
    );
    assert!(unit_value(&service, "ExecStart").ends_with("--config /etc/volumed/daemon.toml"));

    assert_eq!(
        PathBuf::from(unit_value(&socket, "ListenStream")),
        config.socket
    );
    assert_eq!(unit_value(&socket, "SocketMode"), config.socket_mode);
    assert_eq!(unit_value(&socket, "SocketGroup"), config.admin_group);

    let sysusers = std::fs::read_to_string(repo("systemd/volumed.sysusers")).unwrap();
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["g", &config.admin_group])),
        "{sysusers}"
    );
}

/// `systemd-tmpfiles` and `systemd-sysusers` apply our files to a scratch root: the runtime
/// and state directories with their modes, and the admin group.
#[test]
fn tmpfiles_and_sysusers_create_the_directories_and_the_admin_group() {
    require("systemd-tmpfiles");
    require("systemd-sysusers");
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path();
    std::fs::create_dir_all(root_path.join("etc")).unwrap();
    std::fs::copy("/etc/passwd", root_path.join("etc/passwd")).unwrap();
    std::fs::copy("/etc/group", root_path.join("etc/group")).unwrap();

    sh_ok(&format!(
        "systemd-sysusers --root={} {}",
        q(root_path),
        q(&repo("systemd/volumed.sysusers"))
    ));
    let groups = std::fs::read_to_string(root_path.join("etc/group")).unwrap();
    assert!(
        groups.lines().any(|l| l.starts_with("volumed-admin:")),
        "{groups}"
    );

    sh_ok(&format!(
        "systemd-tmpfiles --root={} --create {}",
        q(root_path),
        q(&repo("systemd/volumed.tmpfile"))
    ));
    for (dir, mode) in [("run/volumed", 0o755), ("var/lib/volumed", 0o700)] {
        let meta = std::fs::metadata(root_path.join(dir)).unwrap();
        assert!(meta.is_dir(), "{dir}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{dir}");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{dir}");
    }
}

/// Under the unit's CapabilityBoundingSet= and NoNewPrivileges= (applied with setpriv), the
/// daemon mounts, chowns its socket, re-images a volume that a loop device holds (and flushes
/// that device), stops, and after a crash detaches the dead mount.
#[test]
fn daemon_works_within_the_units_capability_bounding_set() {
    require("setpriv");
    require("losetup");
    let keys = unit_keys(&repo("systemd/volumed.service"));
    assert_eq!(unit_value(&keys, "NoNewPrivileges"), "yes");
    let caps: Vec<String> = unit_value(&keys, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    let setpriv = vec![
        format!("--bounding-set=-all,{}", caps.join(",")),
        "--inh-caps=-all".to_string(),
        "--no-new-privs".to_string(),
    ];

    // `daemon` is a group root is not in: giving the socket to it needs CAP_CHOWN.
    let gid = volumed::identity::group_id("daemon").expect("a group named daemon");
    let mut daemon = Daemon::configure("socket_group = \"daemon\"");
    let launch = Launch {
        setpriv: setpriv.clone(),
        ..Launch::default()
    };
    start_like_systemd(&mut daemon, &launch);
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let bounding = status.lines().find(|l| l.starts_with("CapBnd:")).unwrap();
    assert!(
        !bounding.ends_with("000001fffeffffff"),
        "setpriv narrowed nothing: {bounding}"
    );
    assert_eq!(std::fs::metadata(&daemon.socket).unwrap().gid(), gid);

    daemon.create_volume("vol1", 1);
    let v = daemon.vol("vol1");
    sh_ok(&format!(
        "tr '\\000' '\\252' < /dev/zero | head -c {} | dd of={} bs=1M conv=notrunc,fsync \
         status=none",
        4 * MIB,
        q(&v)
    ));
    let loopdev = sh_ok(&format!("losetup --find --show {}", q(&v)))
        .trim()
        .to_string();
    let detach = LoopGuard(loopdev.clone());
    sh_ok(&format!(
        "dd if={loopdev} of=/dev/null bs=1M count=4 status=none"
    ));

    let image = daemon.dir.path().join("image.raw");
    random_file(&image, 4 * MIB as usize, 7);
    let image_id = daemon.import_image(&image, "img");
    daemon.reimage_and_wait("vol1", &image_id);
    sh_ok(&format!("cmp -n {} {loopdev} {}", 4 * MIB, q(&image)));
    drop(detach);

    let log = daemon.log_text();
    let lacking_sys_resource = !own_capability(24);
    let denied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not permitted") || l.contains("ERROR"))
        .filter(|l| !(lacking_sys_resource && l.contains("PR_SET_IO_FLUSHER")))
        .collect();
    assert!(denied.is_empty(), "{}", denied.join("\n"));

    // A crash leaves a dead mount; the narrowed daemon detaches it at the next start.
    daemon.kill9();
    start_like_systemd(&mut daemon, &launch);
    assert_eq!(daemon.mount_entries(), 1);
    assert!(daemon.log_text().contains("detaching the dead mount"));
    let status = daemon.stop();
    assert!(status.success(), "{status}:\n{}", daemon.log_text());
    assert_eq!(daemon.mount_entries(), 0);
}

/// Whether this test process has capability number `cap` in its bounding set.
fn own_capability(cap: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << cap) != 0
}

/// Detaches a loop device when dropped.
struct LoopGuard(String);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = sh(&format!("losetup -d {}", self.0));
    }
}

// ----- the notify protocol -------------------------------------------------------------------

/// `READY=1` comes only once the mount, the socket and every volume answer: at the moment
/// the listener receives it, the API lists the volumes and each volume file opens and reads
/// back what was written before the restart.
#[test]
fn ready_is_sent_only_once_the_socket_the_mount_and_every_volume_answer() {
    let mut daemon = Daemon::start();
    let names = ["vol1", "vol2", "vol3"];
    for (i, name) in names.iter().enumerate() {
        daemon.create_volume(name, 1);
        std::fs::write(daemon.vol(name), vec![b'a' + i as u8; 4096]).unwrap();
    }
    assert!(daemon.stop().success());

    let (socket, mnt) = (daemon.socket.clone(), daemon.mnt.clone());
    let check: ReadyCheck = Box::new(move || {
        // One attempt each, no retry: usable means usable now.
        let mut stream = UnixStream::connect(&socket).map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(b"GET /v3/volumes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| format!("read: {e}"))?;
        if !answer.starts_with("HTTP/1.1 200") || !names.iter().all(|n| answer.contains(n)) {
            return Err(format!("the API answered {answer:?}"));
        }
        for (i, name) in names.iter().enumerate() {
            let mut data = vec![0u8; 4096];
            std::fs::File::open(mnt.join(name))
                .and_then(|mut f| f.read_exact(&mut data))
                .map_err(|e| format!("{name}: {e}"))?;
            if data.iter().any(|&b| b != b'a' + i as u8) {
                return Err(format!("{name} reads other bytes"));
            }
        }
        Ok(())
    });
    let notes = Notifications::listen_with(daemon.dir.path(), Some(check));
    let launch = Launch {
        notify: Some(&notes.path),
        ..Launch::default()
    };
    let started = Instant::now();
    start_like_systemd(&mut daemon, &launch);
    let ready = notes.wait_for("READY=1", started, secs(10));

    assert_eq!(notes.ready_checks(), vec![Ok(())], "{}", notes.dump());
    assert!(ready.contains("STATUS=serving 3 volumes"), "{ready}");
    let statuses = notes.statuses();
    assert_eq!(
        &statuses[..2],
        ["starting: loading the state", "starting: mounting"],
        "{statuses:?}"
    );
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Waits until the latest STATUS= line is `status`.
fn wait_for_last_status(notes: &Notifications, status: &str) {
    let deadline = Instant::now() + secs(5);
    while notes.statuses().last().map(String::as_str) != Some(status) {
        assert!(
            Instant::now() < deadline,
            "the status did not become {status:?}:\n{}",
            notes.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Slow refill shared by several tests: vol1 with old content, a 8 MiB image at 1-2 MiB/s.
fn slow_reimage_setup(daemon: &Daemon) -> String {
    daemon.create_volume("vol1", 1);
    sh_ok(&format!(
        "tr '\\000' '\\252' < /dev/zero | head -c {} | dd of={} bs=1M conv=notrunc,fsync \
         status=none",
        16 * MIB,
        q(&daemon.vol("vol1"))
    ));
    let image = daemon.dir.path().join("slow.img");
    random_file(&image, 8 * MIB as usize, 5);
    daemon.import_image(&image, "slow")
}

/// STATUS= follows a re-image (started, progress, ended) and the stop; SIGTERM sends
/// STOPPING=1 first, then the daemon exits 0 with the mount and the socket gone.
#[test]
fn status_lines_follow_a_reimage_and_sigterm_stops_with_stopping_then_exit_0() {
    let mut daemon = Daemon::configure("refill_rate_limit = 2\nrefill_window_mib = 1");
    let notes = Notifications::listen(daemon.dir.path());
    let launch = Launch {
        notify: Some(&notes.path),
        ..Launch::default()
    };
    start_like_systemd(&mut daemon, &launch);
    let image = slow_reimage_setup(&daemon);
    wait_for_last_status(&notes, "serving 1 volume");

    let r = daemon.reimage("vol1", &image, false);
    assert_eq!(r.status, 202, "{}", r.text());
    let accepted = Instant::now();
    let running = notes.wait_for(
        "STATUS=serving 1 volume; re-imaging 1: vol1 *",
        accepted,
        secs(5),
    );
    assert!(running.contains('%'), "progress in percent: {running}");
    let view = daemon.wait_reimage("vol1", secs(60));
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
    wait_for_last_status(&notes, "serving 1 volume");

    let stop_sent = Instant::now();
    let status = daemon.stop();
    assert!(status.success(), "{status}:\n{}", daemon.log_text());
    assert_eq!(daemon.mount_entries(), 0, "mount removed");
    assert!(!daemon.socket.exists(), "socket removed");

    let stopping = notes.wait_for("STOPPING=1", stop_sent, secs(1));
    assert!(stopping.contains("STATUS=stopping (SIGTERM)"), "{stopping}");
    let after: Vec<String> = notes
        .all()
        .into_iter()
        .filter(|(at, _)| *at >= stop_sent)
        .map(|(_, m)| m)
        .collect();
    assert!(
        after[0].contains("STOPPING=1"),
        "STOPPING=1 comes first: {after:?}"
    );
    assert!(
        after
            .iter()
            .any(|m| m.contains("STATUS=stopping: unmounting")),
        "{after:?}"
    );
    assert!(
        !after
            .iter()
            .any(|m| m.contains("WATCHDOG=1") || m.contains("READY=1")),
        "{after:?}"
    );
}

/// SIGHUP: RELOADING=1 with the monotonic time, READY=1 once done, and the log names each
/// changed policy.
#[test]
fn sighup_reports_reloading_then_ready_and_logs_each_changed_policy() {
    let mut daemon = Daemon::configure("");
    let notes = Notifications::listen(daemon.dir.path());
    let launch = Launch {
        notify: Some(&notes.path),
        ..Launch::default()
    };
    let started = Instant::now();
    start_like_systemd(&mut daemon, &launch);
    // systemd reloads a unit only once it is running, i.e. after READY=1.
    notes.wait_for("READY=1", started, secs(10));

    let mut config = std::fs::read_to_string(&daemon.config).unwrap();
    config.push_str("[policy]\n\"volume:reimage\" = \"rule:admin_api\"\n");
    std::fs::write(&daemon.config, config).unwrap();
    let sent = Instant::now();
    daemon.signal(libc::SIGHUP);

    let reloading = notes.wait_for("RELOADING=1", sent, secs(5));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    notes.wait_for("READY=1", sent, secs(5));
    let reloading_at = notes.times_of("RELOADING=1")[0];
    assert!(notes.times_of("READY=1").iter().any(|t| *t > reloading_at));
    assert!(pid_alive(daemon.pid()), "the daemon survives SIGHUP");
    wait_until(secs(5), "the reload in the log", || {
        daemon.log_text().contains("policy changed")
    });
    let log = daemon.log_text();
    let changed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("policy changed"))
        .collect();
    assert!(
        changed.iter().any(|l| l.contains("volume:reimage")),
        "{changed:?}"
    );
}

// ----- the watchdog --------------------------------------------------------------------------

/// Gaps between consecutive arrival times.
fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// WATCHDOG=1 comes at half the interval on a healthy daemon, and keeps coming while a
/// rate-limited refill fences a volume and a reader's O_DIRECT I/O is parked.
#[test]
fn watchdog_pings_at_half_the_interval_and_during_a_refill_with_parked_io() {
    let interval = secs(2);
    let mut daemon = Daemon::configure("refill_rate_limit = 1\nrefill_window_mib = 1");
    let notes = Notifications::listen(daemon.dir.path());
    let launch = Launch {
        notify: Some(&notes.path),
        watchdog: Some(interval),
        watchdog_pid: Some(None),
        ..Launch::default()
    };
    start_like_systemd(&mut daemon, &launch);
    let image = slow_reimage_setup(&daemon);

    std::thread::sleep(secs(5));
    let healthy = notes.times_of("WATCHDOG=1");
    let healthy_gaps = gaps(&healthy);
    assert!(healthy.len() >= 5, "{}", notes.dump());
    let mean = healthy_gaps.iter().sum::<Duration>() / healthy_gaps.len() as u32;
    assert!(
        mean > Duration::from_millis(900) && mean < Duration::from_millis(1150),
        "pings every {mean:?} on average, expected 1 s: {healthy_gaps:?}"
    );

    let r = daemon.reimage("vol1", &image, false);
    assert_eq!(r.status, 202, "{}", r.text());
    let refill_started = Instant::now();
    let v = daemon.vol("vol1");
    let reader = std::thread::spawn(move || {
        sh(&format!(
            "dd if={} of=/dev/null iflag=direct bs=1M count=1 status=none",
            q(&v)
        ))
    });
    std::thread::sleep(secs(1));
    assert!(
        !reader.is_finished(),
        "the reader's I/O is parked by the fence"
    );
    let view = daemon.wait_reimage("vol1", secs(60));
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
    let refill_took = refill_started.elapsed();
    assert!(
        refill_took > secs(4),
        "the refill was slow: {refill_took:?}"
    );
    assert!(reader.join().unwrap().status.success());

    let during: Vec<Instant> = notes
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t >= refill_started - secs(1))
        .collect();
    let expected = refill_took.as_secs() as usize;
    assert!(
        during.len() >= expected,
        "{} pings during a {refill_took:?} refill:\n{}",
        during.len(),
        notes.dump()
    );
    let all = notes.times_of("WATCHDOG=1");
    let worst = gaps(&all).into_iter().max().unwrap();
    assert!(
        worst < interval,
        "a gap of {worst:?} would trip systemd's watchdog"
    );
    assert!(
        !daemon.log_text().contains("stopped pinging"),
        "{}",
        daemon.log_text()
    );
}

/// WATCHDOG_PID naming another process leaves the watchdog off, as sd_watchdog_enabled(3)
/// says.
#[test]
fn watchdog_is_off_when_watchdog_pid_names_another_process() {
    let mut daemon = Daemon::configure("");
    let notes = Notifications::listen(daemon.dir.path());
    let launch = Launch {
        notify: Some(&notes.path),
        watchdog: Some(Duration::from_millis(500)),
        watchdog_pid: Some(Some(1)),
        ..Launch::default()
    };
    let started = Instant::now();
    start_like_systemd(&mut daemon, &launch);
    notes.wait_for("READY=1", started, secs(10));
    std::thread::sleep(secs(2));
    assert!(notes.times_of("WATCHDOG=1").is_empty(), "{}", notes.dump());
}

/// Starts a daemon with a 1 s watchdog (WATCHDOG_PID unset) and waits for pings.
fn start_watched(daemon: &mut Daemon, notes: &Notifications) {
    let launch = Launch {
        notify: Some(&notes.path),
        watchdog: Some(secs(1)),
        ..Launch::default()
    };
    start_like_systemd(daemon, &launch);
    wait_until(secs(10), "three pings", || {
        notes.times_of("WATCHDOG=1").len() >= 3
    });
}

/// Acts as systemd after a missed ping: WatchdogSignal= (SIGABRT), SIGKILL if needed, and a
/// restart as Restart=on-failure does; returns when the new daemon is READY.
fn abort_and_restart(daemon: &mut Daemon, notes: &Notifications) {
    let pid = daemon.pid();
    daemon.signal(libc::SIGABRT);
    wait_until(secs(10), "the aborted daemon to end", || !pid_alive(pid));
    daemon.kill9();
    let restarted = Instant::now();
    start_watched(daemon, notes);
    notes.wait_for("READY=1", restarted, secs(10));
    notes.wait_for("WATCHDOG=1", restarted, secs(5));
}

/// Pings stop once the mount is detached behind the daemon's back (the FUSE probe finds
/// another file system there), the reason is logged once, and a restart as systemd would do
/// serves again.
#[test]
fn watchdog_stops_when_the_mount_is_detached_and_a_restart_recovers() {
    let mut daemon = Daemon::configure("");
    let notes = Notifications::listen(daemon.dir.path());
    start_watched(&mut daemon, &notes);
    daemon.create_volume("vol1", 1);
    std::fs::write(daemon.vol("vol1"), b"kept").unwrap();

    sh_ok(&format!("umount -l {}", q(&daemon.mnt)));
    let detached = Instant::now();
    std::thread::sleep(secs(3));
    let late: Vec<_> = notes
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t > detached + Duration::from_millis(600))
        .collect();
    assert!(late.is_empty(), "pings after the detach:\n{}", notes.dump());
    let log = daemon.log_text();
    let reasons: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stopped pinging"))
        .collect();
    assert_eq!(reasons.len(), 1, "logged once: {reasons:?}");
    assert!(
        reasons[0].contains("no longer volumed's mount"),
        "{}",
        reasons[0]
    );
    assert!(
        notes.statuses().iter().any(|s| s.contains("unhealthy")),
        "{:?}",
        notes.statuses()
    );

    abort_and_restart(&mut daemon, &notes);
    let mut data = vec![0u8; 4];
    std::fs::File::open(daemon.vol("vol1"))
        .and_then(|mut f| f.read_exact(&mut data))
        .unwrap();
    assert_eq!(&data, b"kept");
}

/// Pings stop once the control socket no longer answers (its file removed behind the
/// daemon's back), and a restart binds it again.
#[test]
fn watchdog_stops_when_the_control_socket_is_gone_and_a_restart_recovers() {
    let mut daemon = Daemon::configure("");
    let notes = Notifications::listen(daemon.dir.path());
    start_watched(&mut daemon, &notes);

    std::fs::remove_file(&daemon.socket).unwrap();
    let removed = Instant::now();
    std::thread::sleep(secs(3));
    let late = notes
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t > removed + Duration::from_millis(600))
        .count();
    assert_eq!(late, 0, "pings after the socket went:\n{}", notes.dump());
    let log = daemon.log_text();
    let reasons: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stopped pinging"))
        .collect();
    assert_eq!(reasons.len(), 1, "logged once: {reasons:?}");
    assert!(reasons[0].contains("control API"), "{}", reasons[0]);

    abort_and_restart(&mut daemon, &notes);
    let r = daemon.api("GET", "/v3/volumes", None);
    assert_eq!(r.status, 200);
}

/// Sends SIGCONT to a stopped daemon when dropped, so a failing test never leaves it stopped.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        // SAFETY: kill on the pid of a daemon this test started and has not reaped.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// Unmounts a file system when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "umount {} || umount -l {}",
            q(&self.0),
            q(&self.0)
        ));
    }
}

/// Arrival times of pings after `since`.
fn pings_after(notes: &Notifications, since: Instant) -> usize {
    notes
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t > since)
        .count()
}

/// Waits while a hang lasts, then checks that no ping came during it and that the daemon
/// logged why, once: the `count`th "stopped pinging" line names `probe`.
fn assert_pings_stop(notes: &Notifications, daemon: &Daemon, count: usize, probe: &str) {
    std::thread::sleep(Duration::from_millis(500));
    let hung = Instant::now();
    std::thread::sleep(secs(3));
    assert_eq!(pings_after(notes, hung), 0, "{}", notes.dump());
    let log = daemon.log_text();
    let reasons: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stopped pinging"))
        .collect();
    assert_eq!(reasons.len(), count, "logged once each: {reasons:?}");
    assert!(reasons[count - 1].contains(probe), "{}", reasons[count - 1]);
}

/// Real hangs, not simulated ones: a daemon whose state directory sits on ext4 on a loop
/// device over a volume of a second daemon, which the test stops with SIGSTOP. Then an fsync
/// holds the only FUSE thread (the mount probe hangs), and later a state save holds the
/// engine's lock (the API probe hangs): each time the pings stop with the reason logged once,
/// and come back when the disk answers again.
#[test]
fn watchdog_stops_while_the_fuse_loop_or_the_api_hangs_and_resumes_after() {
    require("losetup");
    require("mkfs.ext4");
    let disk_daemon = Daemon::start();
    disk_daemon.create_volume("disk", 1);
    let loopdev = sh_ok(&format!(
        "losetup --find --show {}",
        q(&disk_daemon.vol("disk"))
    ))
    .trim()
    .to_string();
    let _detach = LoopGuard(loopdev.clone());
    sh_ok(&format!("mkfs.ext4 -q {loopdev}"));
    let disk = disk_daemon.dir.path().join("ext4");
    std::fs::create_dir(&disk).unwrap();
    sh_ok(&format!("mount {loopdev} {}", q(&disk)));
    let _unmount = Unmount(disk.clone());

    // The daemon under test keeps its state on that ext4, with a single FUSE thread.
    let mut daemon = Daemon::configure("fuse_threads = 1");
    let state = disk.join("state");
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    let config = config.replace(
        &format!("state_dir = {:?}", daemon.state),
        &format!("state_dir = {state:?}"),
    );
    std::fs::write(&daemon.config, config).unwrap();
    daemon.state = state;
    let notes = Notifications::listen(daemon.dir.path());
    start_watched(&mut daemon, &notes);
    daemon.create_volume("vol1", 1);
    let v = daemon.vol("vol1");

    // 1. The disk stops answering while an fsync holds the only FUSE thread.
    let stopped = Continue(disk_daemon.pid());
    disk_daemon.signal(libc::SIGSTOP);
    let script = format!(
        "dd if=/dev/zero of={} bs=1M count=1 conv=notrunc,fsync status=none",
        q(&v)
    );
    let writer = std::thread::spawn(move || sh(&script));
    assert_pings_stop(&notes, &daemon, 1, "mount probe");
    assert!(
        !writer.is_finished(),
        "the fsync waits for the stopped disk"
    );

    drop(stopped);
    assert!(writer.join().unwrap().status.success());
    let resumed = Instant::now();
    notes.wait_for("WATCHDOG=1", resumed, secs(5));
    wait_until(secs(5), "the recovery in the log", || {
        daemon.log_text().contains("the probes pass again")
    });

    // 2. The disk stops answering while a state save holds the engine's lock.
    let stopped = Continue(disk_daemon.pid());
    disk_daemon.signal(libc::SIGSTOP);
    let socket = daemon.socket.clone();
    let reset = std::thread::spawn(move || {
        http(
            &socket,
            "POST",
            "/v3/volumes/vol1/action",
            &[("Content-Type", "application/json")],
            br#"{"os-reset_status": {"status": "error"}}"#,
        )
        .status
    });
    assert_pings_stop(&notes, &daemon, 2, "control API probe");
    assert!(
        !reset.is_finished(),
        "the state save waits for the stopped disk"
    );

    drop(stopped);
    assert_eq!(reset.join().unwrap(), 202);
    notes.wait_for("WATCHDOG=1", Instant::now(), secs(5));
    assert_eq!(daemon.status("vol1"), "error");
    assert!(daemon.stop().success());
}

// ----- crash and restart ---------------------------------------------------------------------

/// SIGKILL in the middle of a refill, then a restart as Restart=on-failure does: READY=1
/// again after the dead mount is detached and the stale socket replaced, and the volume is
/// `error` and usable.
#[test]
fn sigkill_mid_refill_then_restart_is_ready_with_the_volume_error_and_usable() {
    let mut daemon = Daemon::configure("refill_rate_limit = 1\nrefill_window_mib = 1");
    let notes = Notifications::listen(daemon.dir.path());
    let launch = Launch {
        notify: Some(&notes.path),
        ..Launch::default()
    };
    start_like_systemd(&mut daemon, &launch);
    let image = slow_reimage_setup(&daemon);
    let r = daemon.reimage("vol1", &image, false);
    assert_eq!(r.status, 202, "{}", r.text());
    wait_until(secs(5), "a status naming the re-image", || {
        notes.statuses().iter().any(|s| s.contains("re-imaging 1"))
    });

    daemon.kill9();
    assert_eq!(daemon.mount_entries(), 1, "the dead mount stays");
    assert!(daemon.socket.exists(), "the stale socket stays");
    std::thread::sleep(secs(2)); // RestartSec=2
    let restarted = Instant::now();
    start_like_systemd(&mut daemon, &launch);
    notes.wait_for("READY=1", restarted, secs(10));

    assert!(daemon.log_text().contains("detaching the dead mount"));
    assert_eq!(daemon.mount_entries(), 1, "mounted once");
    let view = daemon.volume("vol1");
    assert_eq!(view["status"], "error", "{view}");
    let v = daemon.vol("vol1");
    sh_ok(&format!(
        "printf usable | dd of={} conv=notrunc,fsync status=none",
        q(&v)
    ));
    assert_eq!(&std::fs::read(&v).unwrap()[..6], b"usable");
    let r = daemon.api(
        "POST",
        "/v3/volumes/vol1/action",
        Some(json!({"os-reset_status": {"status": "available"}})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
}

// ----- socket activation ---------------------------------------------------------------------

/// Socket activation with the real `systemd-socket-activate`: the daemon starts at the first
/// connection, answers it, uses the passed socket instead of the configured one, and leaves
/// the socket file to its owner at stop.
#[test]
fn socket_activation_starts_at_the_first_connection_and_answers_it() {
    require("systemd-socket-activate");
    let mut daemon = Daemon::configure("");
    let notes = Notifications::listen(daemon.dir.path());
    let activated = daemon.dir.path().join("activated.sock");
    let configured = daemon.socket.clone();

    let activator_started = Instant::now();
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&activated)
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notes.path.display()))
        .arg(VOLUMED)
        .arg("--config")
        .arg(&daemon.config)
        .stdout(Stdio::null())
        .stderr(daemon.log_file())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let pid = child.id();
    wait_until(secs(10), "the activator to listen", || activated.exists());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        daemon.mount_entries(),
        0,
        "nothing starts before a connection"
    );
    assert!(notes.all().is_empty(), "{}", notes.dump());

    let r = http(&activated, "GET", "/v3/volumes", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"volumes": []}));
    notes.wait_for("READY=1", activator_started, secs(10));
    daemon.socket = activated.clone();
    daemon.adopt(child);
    assert_eq!(daemon.pid(), pid, "the activator became volumed");
    assert!(!configured.exists(), "the configured socket is not bound");
    assert!(daemon
        .log_text()
        .contains("using the socket passed by systemd instead of the configured one"));

    daemon.create_volume("vol1", 1);
    assert!(daemon.vol("vol1").exists());
    let status = daemon.stop();
    assert!(status.success(), "{status}:\n{}", daemon.log_text());
    assert_eq!(daemon.mount_entries(), 0);
    assert!(activated.exists(), "the passed socket belongs to systemd");
}

/// A passed socket that is not one Unix stream listener is refused with a message that says
/// what to fix, before anything is mounted.
#[test]
fn socket_activation_refuses_datagram_sockets_non_sockets_and_several_sockets() {
    require("systemd-socket-activate");
    let daemon = Daemon::configure("");
    let dir = daemon.dir.path();
    let config = daemon.config.display().to_string();

    // A datagram socket: the activator starts us at the first datagram.
    let datagram = dir.join("dgram.sock");
    let mut child = Command::new("systemd-socket-activate")
        .args(["--datagram", "-l"])
        .arg(&datagram)
        .args([VOLUMED, "--config", &config])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(secs(10), "the activator to listen", || datagram.exists());
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"x", &datagram)
        .unwrap();
    let out = wait_output(&mut child);
    assert!(!out.0.success(), "{}", out.1);
    assert!(out.1.contains("is not a Unix stream socket"), "{}", out.1);

    // A regular file as fd 3.
    let out = sh(&format!(
        "LISTEN_FDS=1 sh -c 'export LISTEN_PID=$$; exec {VOLUMED} --config {config} \
         3<{config}'"
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a Unix stream socket"), "{stderr}");

    // Two sockets.
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&a)
        .arg("-l")
        .arg(&b)
        .args([VOLUMED, "--config", &config])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(secs(10), "the activator to listen", || b.exists());
    let _connection = UnixStream::connect(&a).unwrap();
    let out = wait_output(&mut child);
    assert!(!out.0.success(), "{}", out.1);
    assert!(out.1.contains("passed 2 sockets"), "{}", out.1);

    assert_eq!(daemon.mount_entries(), 0);
    assert!(!daemon.state.exists(), "nothing touched");
}

/// Waits (bounded) for `child` to exit; returns its status and stderr.
fn wait_output(child: &mut Child) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status, stderr)
}

// ----- install paths -------------------------------------------------------------------------

fn built_dir() -> PathBuf {
    Path::new(VOLUMED).parent().unwrap().to_path_buf()
}

/// `make install-files` into a DESTDIR: binaries, units pointing at PREFIX, tmpfiles.d,
/// sysusers.d, docs, manual pages, shell completions, and daemon.toml, which a second
/// install keeps as the operator left it.
#[test]
fn make_install_fills_destdir_and_keeps_an_existing_configuration() {
    require("make");
    let dest = tempfile::tempdir().unwrap();
    let install = |prefix: &str| {
        sh_ok(&format!(
            "make -s -C {} install-files DESTDIR={} PREFIX={prefix} BUILD_DIR={}",
            q(&repo("")),
            q(dest.path()),
            q(&built_dir())
        ))
    };
    install("/usr/local");
    let root = dest.path();
    for (file, mode) in [
        ("usr/local/bin/volumed", 0o755),
        ("usr/local/bin/volumectl", 0o755),
        ("usr/local/lib/systemd/system/volumed.service", 0o644),
        ("usr/local/lib/systemd/system/volumed.socket", 0o644),
        ("usr/local/lib/tmpfiles.d/volumed.conf", 0o644),
        ("usr/local/lib/sysusers.d/volumed.conf", 0o644),
        ("usr/local/share/doc/volumed/README.md", 0o644),
        ("usr/local/share/doc/volumed/operations.md", 0o644),
        ("usr/local/share/man/man1/volumectl.1", 0o644),
        ("usr/local/share/man/man1/volumectl-image-import.1", 0o644),
        ("usr/local/share/man/man8/volumed.8", 0o644),
        (
            "usr/local/share/bash-completion/completions/volumectl",
            0o644,
        ),
        ("usr/local/share/bash-completion/completions/volumed", 0o644),
        ("usr/local/share/zsh/vendor-completions/_volumectl", 0o644),
        (
            "usr/local/share/fish/vendor_completions.d/volumectl.fish",
            0o644,
        ),
        ("etc/volumed/daemon.toml", 0o644),
    ] {
        let meta = std::fs::metadata(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let unit = root.join("usr/local/lib/systemd/system/volumed.service");
    let keys = unit_keys(&unit);
    assert_eq!(
        unit_value(&keys, "ExecStart"),
        "/usr/local/bin/volumed --config /etc/volumed/daemon.toml"
    );
    assert!(unit_value(&keys, "Documentation").contains("/usr/local/share/doc/volumed/"));
    let version = sh_ok(&format!(
        "{} --version",
        q(&root.join("usr/local/bin/volumed"))
    ));
    assert!(version.starts_with("volumed "), "{version}");

    // The installed units verify, with ExecStart= at the installed binary.
    let verify_dir = tempfile::tempdir().unwrap();
    let units = root.join("usr/local/lib/systemd/system");
    let (service, socket) = units_for(
        verify_dir.path(),
        &units.join("volumed.service"),
        &units.join("volumed.socket"),
        &root.join("usr/local/bin/volumed"),
    );
    verify_units(&[&service, &socket]);

    let config = root.join("etc/volumed/daemon.toml");
    std::fs::write(&config, "log_level = \"debug\"\n").unwrap();
    let said = install("/usr");
    assert!(said.contains("keeping"), "{said}");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "log_level = \"debug\"\n"
    );
    let keys = unit_keys(&root.join("usr/lib/systemd/system/volumed.service"));
    assert!(unit_value(&keys, "ExecStart").starts_with("/usr/bin/volumed "));
}

/// The Debian package (cargo-deb, from the binaries already built): binaries, both units,
/// tmpfiles.d and sysusers.d files, daemon.toml as a conffile, maintainer scripts that create
/// the group and enable the units without restarting on upgrade, and a volumed that runs.
#[test]
fn debian_package_holds_units_and_conffile_and_its_volumed_runs() {
    require("cargo-deb");
    require("dpkg-deb");
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    for bin in ["volumed", "volumectl"] {
        std::fs::copy(built_dir().join(bin), target.join("release").join(bin)).unwrap();
    }
    // The manual pages and completions the package carries, as `make deb` generates them.
    sh_ok(&format!(
        "make -s -C {} gen VOLUMECTL={} GEN_DIR=target/gen",
        q(&repo("")),
        q(&built_dir().join("volumectl"))
    ));
    let out = sh_ok(&format!(
        "cd {} && CARGO_TARGET_DIR={} cargo deb --no-build --locked --strip --fast --output {}",
        q(&repo("")),
        q(&target),
        q(work.path())
    ));
    let deb = PathBuf::from(out.lines().last().unwrap().trim());
    assert!(deb.exists(), "{out}");

    let info = sh_ok(&format!("dpkg-deb --info {}", q(&deb)));
    assert!(info.contains("Package: volumed"), "{info}");
    assert!(
        info.contains("Depends: ") && info.contains("mount"),
        "{info}"
    );
    let contents = sh_ok(&format!("dpkg-deb --contents {}", q(&deb)));
    for file in [
        "./usr/bin/volumed",
        "./usr/bin/volumectl",
        "./usr/lib/systemd/system/volumed.service",
        "./usr/lib/systemd/system/volumed.socket",
        "./usr/lib/tmpfiles.d/volumed.conf",
        "./usr/lib/sysusers.d/volumed.conf",
        "./etc/volumed/daemon.toml",
        "./usr/share/doc/volumed/operations.md",
        // Compressed, as Debian's policy wants manual pages.
        "./usr/share/man/man1/volumectl.1.gz",
        "./usr/share/man/man1/volumectl-reimage.1.gz",
        "./usr/share/man/man8/volumed.8.gz",
        "./usr/share/bash-completion/completions/volumectl",
        "./usr/share/zsh/vendor-completions/_volumectl",
        "./usr/share/fish/vendor_completions.d/volumectl.fish",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(file)),
            "{file} missing:\n{contents}"
        );
    }

    let control = work.path().join("control");
    sh_ok(&format!("dpkg-deb -e {} {}", q(&deb), q(&control)));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/volumed/daemon.toml");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers"), "{postinst}");
    assert!(postinst.contains("enable volumed.service"), "{postinst}");
    assert!(postinst.contains("enable volumed.socket"), "{postinst}");
    assert!(
        !postinst.contains("restart"),
        "no restart on upgrade:\n{postinst}"
    );

    let root = work.path().join("root");
    sh_ok(&format!("dpkg-deb -x {} {}", q(&deb), q(&root)));
    let version = sh_ok(&format!("{} --version", q(&root.join("usr/bin/volumed"))));
    assert_eq!(
        version.trim(),
        format!("volumed {}", env!("CARGO_PKG_VERSION"))
    );
    let check = sh_ok(&format!(
        "{} --config {} --check-config",
        q(&root.join("usr/bin/volumed")),
        q(&root.join("etc/volumed/daemon.toml"))
    ));
    assert!(check.contains("valid"), "{check}");
    let verify_dir = work.path().join("verify");
    std::fs::create_dir_all(&verify_dir).unwrap();
    let units = root.join("usr/lib/systemd/system");
    let (service, socket) = units_for(
        &verify_dir,
        &units.join("volumed.service"),
        &units.join("volumed.socket"),
        &root.join("usr/bin/volumed"),
    );
    verify_units(&[&service, &socket]);
}
