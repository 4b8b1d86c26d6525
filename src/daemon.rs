//! The daemon's life: start, serve, stop.
//!
//! Start, in this order so that a second daemon touches nothing:
//! 1. take the state directory's lock (a second daemon exits here, whatever the first is
//!    doing, even stopped with SIGSTOP);
//! 2. load and repair the state ([`Engine::open`]);
//! 3. detach a stale mount left by a crashed daemon, refuse a live one, and mount;
//! 4. replace a stale socket, refuse a live one, and bind;
//! 5. tell systemd `READY=1`.
//!
//! Stop (SIGTERM or SIGINT): refuse new requests, cancel running refills (each ends `error`
//! with its content discarded), sync every backing file, unmount, remove the socket.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::engine::Engine;
use crate::policy::Policy;
use crate::store::Store;

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), String> {
    set_io_flusher();
    warn_about_request_timeouts();

    let store = Store::open(&config.state_dir)
        .map_err(|e| format!("cannot use state_dir {}: {e}", config.state_dir.display()))?;
    let _lock = store.lock().map_err(|e| e.to_string())?;
    let engine = Engine::open(config.clone(), store)?;
    Engine::register(&engine);

    // The socket is bound before the mount, so a second daemon that only shares the socket
    // path is refused before it touches anything, and never removes a live socket.
    let listener = bind_socket(&config)?;
    let session = prepare_mountpoint(&config.mountpoint).and_then(|()| {
        crate::fuse::mount(engine.clone())
            .map_err(|e| format!("cannot mount {}: {e}", config.mountpoint.display()))
    });
    let session = match session {
        Ok(session) => session,
        Err(e) => {
            let _ = std::fs::remove_file(&config.socket);
            return Err(e);
        }
    };
    tracing::info!(mountpoint = %config.mountpoint.display(), "mounted");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let served = runtime.block_on(serve(engine.clone(), listener, &config, config_path));

    shutdown(&engine, &config, session);
    served
}

async fn serve(
    engine: Arc<Engine>,
    listener: std::os::unix::net::UnixListener,
    config: &Config,
    config_path: Option<PathBuf>,
) -> Result<(), String> {
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| format!("cannot listen on {}: {e}", config.socket.display()))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api = tokio::spawn(crate::api::serve(listener, engine.clone(), stop_rx));

    let volumes = engine.files().len();
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving {volumes} volumes")),
    ]);
    tracing::info!(socket = %config.socket.display(), volumes, "ready");

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&engine, config_path.as_deref()),
        }
    }

    tracing::info!("stopping");
    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), api).await;
    Ok(())
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

fn shutdown(engine: &Engine, config: &Config, session: fuser::BackgroundSession) {
    engine.stop_refills();
    engine.sync_all();
    unmount(&config.mountpoint);

    // With files still open the connection outlives a lazy unmount; do not wait for it.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = session.join();
        let _ = done_tx.send(());
    });
    let _ = done_rx.recv_timeout(Duration::from_secs(2));

    let _ = std::fs::remove_file(&config.socket);
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
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return Probe::Live;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: `statx` is plain data that the call fills in.
        let mut out: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: a valid NUL-terminated path and a live output struct.
        let rc = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c_path.as_ptr(),
                libc::AT_STATX_FORCE_SYNC,
                libc::STATX_BASIC_STATS,
                &mut out,
            )
        };
        let errno = (rc != 0).then(|| io::Error::last_os_error().raw_os_error());
        let _ = tx.send(errno.flatten());
    });
    match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(Some(libc::ENOTCONN)) | Ok(Some(libc::ECONNABORTED)) => Probe::Dead,
        _ => Probe::Live,
    }
}

/// Whether `/proc/self/mountinfo` lists a mount at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount| unescape_mountinfo(mount) == wanted)
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

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
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
