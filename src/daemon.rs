//! The daemon's life: start, serve, stop.
//!
//! Start, in this order so that a second daemon touches nothing:
//! 1. read what systemd handed over ([`service::Manager::from_env`]), while this is the only
//!    thread;
//! 2. take the state directory's lock (a second daemon exits here, whatever the first is
//!    doing, even stopped with SIGSTOP);
//! 3. load and repair the state ([`Engine::open`]);
//! 4. take the socket passed by socket activation, or replace a stale socket, refuse a live
//!    one, and bind;
//! 5. detach a stale mount left by a crashed daemon, refuse a live one, and mount; resume
//!    in the background the space reclaims a stop or crash cut short;
//! 6. probe the mount and the socket from outside, as a client would, and only then tell
//!    systemd `READY=1`.
//!
//! Stop (SIGTERM or SIGINT): `STOPPING=1`, refuse new requests, cancel running refills (each
//! ends `error` with its content discarded), sync every backing file, unmount, remove the
//! socket (unless systemd owns it).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::engine::Engine;
use crate::policy::Policy;
use crate::service;
use crate::store::Store;

/// Longest wait for the mount and the socket to answer their first probe at start.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), String> {
    let mut manager = service::Manager::from_env()?;
    set_io_flusher();
    warn_about_request_timeouts();
    service::status("starting: loading the state");

    let store = Store::open(&config.state_dir)
        .map_err(|e| format!("cannot use state_dir {}: {e}", config.state_dir.display()))?;
    let _lock = store.lock().map_err(|e| e.to_string())?;
    let engine = Engine::open(config.clone(), store)?;
    Engine::register(&engine);

    // The socket is bound before the mount, so a second daemon that only shares the socket
    // path is refused before it touches anything, and never removes a live socket. A socket
    // passed by systemd wins over the configured path; systemd owns it and removes it.
    let activated = manager.take_listener();
    let owns_socket = activated.is_none();
    let (listener, socket) = match activated {
        Some(passed) => {
            if passed.path != config.socket {
                tracing::warn!(socket = %passed.path.display(),
                    configured = %config.socket.display(),
                    "using the socket passed by systemd instead of the configured one");
            }
            (passed.listener, passed.path)
        }
        None => (bind_socket(&config)?, config.socket.clone()),
    };
    service::status("starting: mounting");
    let session = prepare_mountpoint(&config.mountpoint).and_then(|()| {
        crate::fuse::mount(engine.clone())
            .map_err(|e| format!("cannot mount {}: {e}", config.mountpoint.display()))
    });
    let session = match session {
        Ok(session) => session,
        Err(e) => {
            if owns_socket {
                let _ = std::fs::remove_file(&config.socket);
            }
            return Err(e);
        }
    };
    tracing::info!(mountpoint = %config.mountpoint.display(), "mounted");
    engine.resume_reclaims();

    let served = mount_device(&config.mountpoint)
        .ok_or_else(|| format!("{} is not in the mount table", config.mountpoint.display()))
        .and_then(|device| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            let serving = Serving {
                engine: engine.clone(),
                config: &config,
                config_path,
                socket,
                device,
                watchdog: manager.watchdog(),
            };
            runtime.block_on(serving.serve(listener))
        });

    shutdown(&engine, &config, session, owns_socket);
    served
}

/// What the serving loop needs besides the listener.
struct Serving<'a> {
    engine: Arc<Engine>,
    config: &'a Config,
    config_path: Option<PathBuf>,
    socket: PathBuf,
    device: (u32, u32),
    watchdog: Option<Duration>,
}

impl Serving<'_> {
    async fn serve(self, listener: std::os::unix::net::UnixListener) -> Result<(), String> {
        // Handlers first: a signal that comes once clients can connect must not find the
        // default action (SIGHUP's would end the daemon).
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;

        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| format!("cannot listen on {}: {e}", self.socket.display()))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let api = tokio::spawn(crate::api::serve(listener, self.engine.clone(), stop_rx));

        let supervisor = match self.ready().await {
            Ok(supervisor) => supervisor,
            Err(e) => {
                let _ = stop_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(10), api).await;
                return Err(e);
            }
        };

        let cause = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => {
                    service::reloading();
                    reload(&self.engine, self.config_path.as_deref());
                    service::notify(&[NotifyState::Ready]);
                }
            }
        };

        tracing::info!(signal = cause, "stopping");
        supervisor.stop();
        let status = format!("stopping ({cause}): refusing new requests");
        service::notify(&[NotifyState::Stopping, NotifyState::Status(&status)]);
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), api).await;
        Ok(())
    }

    /// Probes the mount and the socket as a client would, then sends `READY=1` and starts
    /// the supervisor (status lines, watchdog).
    async fn ready(&self) -> Result<service::Supervisor, String> {
        let mut probes = service::Probes::start(&self.config.mountpoint, self.device, &self.socket)
            .map_err(|e| format!("cannot start the liveness probes: {e}"))?;
        let probed = tokio::task::spawn_blocking(move || {
            let result = probes.check(READY_DEADLINE);
            (probes, result)
        })
        .await;
        let probes = match probed {
            Ok((probes, Ok(()))) => probes,
            Ok((_, Err(e))) => return Err(format!("not ready: {e}")),
            Err(e) => return Err(format!("not ready: the probe failed: {e}")),
        };

        let status = service::status_line(&self.engine);
        service::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        tracing::info!(socket = %self.socket.display(), volumes = self.engine.files().len(),
            "ready");
        service::Supervisor::start(self.engine.clone(), probes, self.watchdog, status)
            .map_err(|e| format!("cannot start the supervisor thread: {e}"))
    }
}

fn reload(engine: &Engine, config_path: Option<&Path>) {
    let reloaded = Config::load(config_path).and_then(|c| Policy::new(&c.admin_group, &c.policy));
    match reloaded {
        Ok(policy) => {
            let changes = engine.reload_policy(policy);
            tracing::info!(changes = changes.len(), "policies reloaded");
            for change in changes {
                tracing::info!("policy changed: {change}");
            }
        }
        Err(e) => tracing::error!("policies not reloaded, keeping the old ones: {e}"),
    }
}

fn shutdown(
    engine: &Engine,
    config: &Config,
    session: fuser::BackgroundSession,
    owns_socket: bool,
) {
    let files = engine.files();
    let refills = files.iter().filter(|f| f.refill_running()).count();
    if refills > 0 {
        service::status(&format!("stopping: cancelling {refills} re-image(s)"));
    }
    engine.stop_refills();
    service::status(&format!("stopping: syncing {} volume(s)", files.len()));
    engine.sync_all();
    service::status(&format!(
        "stopping: unmounting {}",
        config.mountpoint.display()
    ));
    unmount(&config.mountpoint);

    // With files still open the connection outlives a lazy unmount; do not wait for it.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = session.join();
        let _ = done_tx.send(());
    });
    let _ = done_rx.recv_timeout(Duration::from_secs(2));

    // A socket passed by systemd stays: volumed.socket listens on and starts us again.
    if owns_socket {
        let _ = std::fs::remove_file(&config.socket);
    }
    tracing::info!("stopped");
}

/// Detaches a dead mount at `mountpoint`, refuses a live one, and creates the directory.
fn prepare_mountpoint(mountpoint: &Path) -> Result<(), String> {
    for _ in 0..16 {
        if !is_mounted(mountpoint) {
            break;
        }
        match probe_mount(mountpoint) {
            Probe::Dead => {
                tracing::warn!(mountpoint = %mountpoint.display(),
                    "detaching the dead mount of a previous volumed");
                detach(mountpoint).map_err(|e| format!("cannot detach stale mount: {e}"))?;
            }
            Probe::Live => {
                return Err(format!(
                    "{} is already mounted by a running file system; stop it or choose \
                     another mountpoint",
                    mountpoint.display()
                ))
            }
        }
    }

    std::fs::create_dir_all(mountpoint)
        .map_err(|e| format!("cannot create mountpoint {}: {e}", mountpoint.display()))?;
    let _ = std::fs::set_permissions(mountpoint, std::fs::Permissions::from_mode(0o755));
    Ok(())
}

enum Probe {
    Dead,
    Live,
}

/// Asks the file system at `path` itself whether it is alive.
///
/// A plain `stat` may be answered from the kernel's attribute cache for a second after the
/// daemon died, so the probe forces a round trip (`AT_STATX_FORCE_SYNC`); a dead connection
/// answers `ENOTCONN`. A live server that does not answer (stopped, hung) must not hang the
/// start: the probe runs on its own thread and silence counts as alive.
fn probe_mount(path: &Path) -> Probe {
    let path = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let errno = service::statx_forced(&path)
            .err()
            .and_then(|e| e.raw_os_error());
        let _ = tx.send(errno);
    });
    match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(Some(libc::ENOTCONN)) | Ok(Some(libc::ECONNABORTED)) => Probe::Dead,
        _ => Probe::Live,
    }
}

/// Whether `/proc/self/mountinfo` lists a mount at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mount_device(path).is_some()
}

/// The device (major, minor) of the mount at `path`; the topmost one if mounts are stacked.
pub fn mount_device(path: &Path) -> Option<(u32, u32)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.to_string_lossy();
    info.lines()
        .rev()
        .find_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?;
            let mount = fields.nth(1)?;
            (unescape_mountinfo(mount) == wanted).then_some(device)
        })
        .and_then(|device| {
            let (major, minor) = device.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
}

fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest
            .get(pos + 1..pos + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn detach(path: &Path) -> io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: umount2 with a valid NUL-terminated path.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unmount(mountpoint: &Path) {
    let Ok(c_path) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a valid NUL-terminated path; a busy mount falls back to detach.
    let plain = unsafe { libc::umount2(c_path.as_ptr(), 0) };
    if plain != 0 {
        if let Err(e) = detach(mountpoint) {
            tracing::warn!(mountpoint = %mountpoint.display(), "cannot unmount: {e}");
        }
    }
}

/// Binds the control socket: a stale socket file is replaced, a live one refused.
fn bind_socket(config: &Config) -> Result<std::os::unix::net::UnixListener, String> {
    let path = &config.socket;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "socket {} is in use by a running server; stop it or choose another socket",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }

    // The socket is created without group or other access and opened up only as configured.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o077) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| format!("cannot bind {}: {e}", path.display()))?;

    let mode = config.socket_mode_bits()?;
    let group = config
        .socket_group
        .as_deref()
        .unwrap_or(&config.admin_group);
    if let Some(gid) = crate::identity::group_id(group) {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| format!("cannot chown {}: {e}", path.display()))?;
    } else if config.socket_group.is_some() {
        return Err(format!("socket_group: no group named {group:?}"));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;

    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    Ok(listener)
}

/// Marks the process as an I/O flusher: memory reclaim must not wait on our own writes, or
/// a loop device on a volume can deadlock under memory pressure. Threads inherit the flag.
fn set_io_flusher() {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } != 0 {
        tracing::warn!(
            "cannot set PR_SET_IO_FLUSHER: {}",
            io::Error::last_os_error()
        );
    }
}

/// A kernel FUSE request timeout aborts the whole connection during a long fence.
fn warn_about_request_timeouts() {
    for sysctl in ["default_request_timeout", "max_request_timeout"] {
        let path = format!("/proc/sys/fs/fuse/{sysctl}");
        if let Ok(value) = std::fs::read_to_string(&path) {
            if value.trim() != "0" {
                tracing::warn!(sysctl = %path, value = value.trim(),
                    "a FUSE request timeout can abort the mount during a long re-image");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/run/a\\040b"), "/run/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/odd\\"), "/odd\\");
    }
}
