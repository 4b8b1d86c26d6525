//! The daemon's side of the service manager protocol (systemd): readiness, status lines, the
//! watchdog and socket activation.
//!
//! What systemd hands over arrives in the environment and is read once, at the very start of
//! [`crate::daemon::run`] before any thread exists ([`Manager::from_env`]): `LISTEN_FDS`,
//! `LISTEN_PID` and `LISTEN_FDNAMES` (socket activation), `WATCHDOG_USEC` and `WATCHDOG_PID`
//! (the watchdog). They are removed from the environment once read, as libsystemd does.
//! `NOTIFY_SOCKET` stays: every notification is one datagram to it, and without it
//! notifications do nothing, so the daemon runs the same by hand.
//!
//! The watchdog pings (`WATCHDOG=1`) at half the interval systemd asked for, and only while
//! two liveness probes pass. Each probe runs on a thread of its own and must answer within a
//! quarter of the interval:
//! - the mount: a `statx` of the mountpoint, forced past the kernel's attribute cache, must be
//!   answered by our own FUSE connection (the device the mount had at start). A fenced volume
//!   parks its requests without holding a FUSE thread, so a long re-image does not stop the
//!   pings; a request loop whose threads are all stuck, a dead connection, or a mount detached
//!   or covered behind the daemon's back does.
//! - the control API: `GET /v3/volumes` on our own socket must answer 200, which passes
//!   through the accept loop, the HTTP stack, the blocking pool and the engine's lock.
//!
//! A failing probe stops the pings and is logged once, with its reason, until it passes
//! again; systemd then kills the daemon (`WatchdogSignal=`, SIGABRT by default) once the
//! interval has passed without a ping, and `Restart=on-failure` starts it again.
//!
//! The same probes gate `READY=1`: it is sent only after both have passed once, so a unit
//! ordered after volumed finds the socket answering and every volume file reachable.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::engine::Engine;
use crate::identity::Caller;

/// How often the status line is recomputed (it is sent only when it changed).
const STATUS_PERIOD: Duration = Duration::from_secs(1);

/// Longest wait for the status line.
const STATUS_DEADLINE: Duration = Duration::from_millis(200);

/// At most this many re-imaging volumes are named in the status line.
const STATUS_NAMES: usize = 3;

/// What the service manager handed over at start.
#[derive(Debug, Default)]
pub struct Manager {
    watchdog: Option<Duration>,
    listener: Option<ActivatedSocket>,
}

/// A listening socket passed by the service manager (`volumed.socket`).
#[derive(Debug)]
pub struct ActivatedSocket {
    /// The listener, non-blocking and close-on-exec.
    pub listener: UnixListener,
    /// The path the socket is bound to.
    pub path: PathBuf,
}

impl Manager {
    /// Reads and removes the service manager's variables; call before any thread exists.
    pub fn from_env() -> Result<Self, String> {
        let watchdog = watchdog_from_env();
        let listener = activated_socket()?;
        Ok(Self { watchdog, listener })
    }

    /// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// The socket passed by socket activation, if any (once).
    pub fn take_listener(&mut self) -> Option<ActivatedSocket> {
        self.listener.take()
    }
}

/// `WATCHDOG_USEC`, for this process: `WATCHDOG_PID` names it or is absent, as in
/// `sd_watchdog_enabled(3)`.
fn watchdog_from_env() -> Option<Duration> {
    let pid_given = std::env::var_os("WATCHDOG_PID").is_some();
    let usec_text = std::env::var("WATCHDOG_USEC").ok();
    let mut usec = 0;
    let ours = sd_notify::watchdog_enabled(true, &mut usec);
    if !ours && !pid_given {
        usec = match usec_text.as_deref().map(str::parse::<u64>) {
            Some(Ok(usec)) => usec,
            Some(Err(_)) => {
                tracing::warn!(value = ?usec_text, "ignoring an invalid WATCHDOG_USEC");
                0
            }
            None => 0,
        };
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The listening socket from `LISTEN_FDS`, checked to be one Unix stream listener on a path.
fn activated_socket() -> Result<Option<ActivatedSocket>, String> {
    let fds: Vec<_> = sd_notify::listen_fds_with_names(true)
        .map_err(|e| format!("cannot use the sockets passed in LISTEN_FDS: {e}"))?
        .collect();
    let (fd, name) = match fds.as_slice() {
        [] => return Ok(None),
        [one] => one.clone(),
        more => {
            return Err(format!(
                "the service manager passed {} sockets; volumed listens on exactly one \
                 (one ListenStream= in volumed.socket)",
                more.len()
            ))
        }
    };

    // SAFETY: LISTEN_FDS hands fd over to this process; nothing else in it uses or closes it,
    // and it is taken once (the variables are gone from the environment now).
    let socket = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let what = format!("the socket passed by the service manager (fd {fd}, name {name:?})");
    let is_unix = socket.domain().is_ok_and(|d| d == socket2::Domain::UNIX);
    let is_stream = socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM);
    if !is_unix || !is_stream {
        return Err(format!(
            "{what} is not a Unix stream socket; use ListenStream=/path in volumed.socket"
        ));
    }
    if !socket.is_listener().unwrap_or(false) {
        return Err(format!("{what} is not listening"));
    }

    let listener = UnixListener::from(socket);
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .ok_or_else(|| format!("{what} has no path; use ListenStream=/path"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot use {what}: {e}"))?;
    Ok(Some(ActivatedSocket { listener, path }))
}

/// Sends `states` to the service manager; does nothing without `NOTIFY_SOCKET`.
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Sends a `STATUS=` line.
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// Says that a reload starts (`RELOADING=1` with the time, as systemd 253 and later ask).
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
}

/// `statx` of `path` that the file system itself must answer (`AT_STATX_FORCE_SYNC`), not
/// the kernel's attribute cache.
pub fn statx_forced(path: &Path) -> io::Result<libc::statx> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
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
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(out)
}

// ----- probes --------------------------------------------------------------------------------

/// The mount and the control API, each probed on a thread of its own.
pub struct Probes {
    mount: Probe<()>,
    api: Probe<()>,
}

impl Probes {
    /// Starts the probe threads for the mount at `mountpoint` (whose FUSE connection has
    /// `device`) and the API on `socket`.
    pub fn start(mountpoint: &Path, device: (u32, u32), socket: &Path) -> io::Result<Self> {
        let mountpoint = mountpoint.to_path_buf();
        let socket = socket.to_path_buf();
        Ok(Self {
            mount: Probe::spawn("mount", move || probe_mount(&mountpoint, device))?,
            api: Probe::spawn("control API", move || probe_api(&socket))?,
        })
    }

    /// Runs both probes; each must answer within `deadline`.
    pub fn check(&mut self, deadline: Duration) -> Result<(), String> {
        self.mount.check(deadline)?;
        self.api.check(deadline)
    }
}

/// One probe: a thread that runs the check on request, so a hung check cannot hang the
/// caller, and a check still hanging from last time is not started twice.
struct Probe<T> {
    name: &'static str,
    request: Sender<()>,
    answer: Receiver<Result<T, String>>,
    hung_since: Option<Instant>,
}

impl<T: Send + 'static> Probe<T> {
    fn spawn(
        name: &'static str,
        check: impl Fn() -> Result<T, String> + Send + 'static,
    ) -> io::Result<Self> {
        let (request, requests) = mpsc::channel::<()>();
        let (answers, answer) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("probe-{}", name.replace(' ', "-")))
            .spawn(move || {
                for () in requests {
                    if answers.send(check()).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            name,
            request,
            answer,
            hung_since: None,
        })
    }

    fn check(&mut self, deadline: Duration) -> Result<T, String> {
        if let Some(since) = self.hung_since {
            match self.answer.try_recv() {
                // A late answer to an earlier probe says nothing about now: probe again.
                Ok(_) => self.hung_since = None,
                Err(TryRecvError::Empty) => {
                    return Err(format!(
                        "the {} probe has not answered for {:.1} s",
                        self.name,
                        since.elapsed().as_secs_f64()
                    ))
                }
                Err(TryRecvError::Disconnected) => {
                    return Err(format!("the {} probe thread ended", self.name))
                }
            }
        }

        let sent = Instant::now();
        if self.request.send(()).is_err() {
            return Err(format!("the {} probe thread ended", self.name));
        }
        match self.answer.recv_timeout(deadline) {
            Ok(result) => result.map_err(|e| format!("the {} probe failed: {e}", self.name)),
            Err(RecvTimeoutError::Timeout) => {
                self.hung_since = Some(sent);
                Err(format!(
                    "the {} probe did not answer within {:.1} s",
                    self.name,
                    deadline.as_secs_f64()
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(format!("the {} probe thread ended", self.name))
            }
        }
    }
}

/// The mount answers a forced `statx` of its root, from our own FUSE connection.
fn probe_mount(mountpoint: &Path, device: (u32, u32)) -> Result<(), String> {
    let stat = statx_forced(mountpoint).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED) => {
            format!("{} is a dead FUSE mount ({e})", mountpoint.display())
        }
        _ => format!("statx {}: {e}", mountpoint.display()),
    })?;
    if (stat.stx_dev_major, stat.stx_dev_minor) != device {
        return Err(format!(
            "{} is no longer volumed's mount (device {}:{} instead of {}:{}): it was \
             unmounted or covered behind the daemon's back",
            mountpoint.display(),
            stat.stx_dev_major,
            stat.stx_dev_minor,
            device.0,
            device.1
        ));
    }
    Ok(())
}

/// The control API answers `GET /v3/volumes` with 200 on `socket`.
fn probe_api(socket: &Path) -> Result<(), String> {
    // Bounds a probe thread stuck on a silent daemon; the caller's deadline is shorter.
    const IO_TIMEOUT: Duration = Duration::from_secs(60);

    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /v3/volumes HTTP/1.1\r\nHost: volumed\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("cannot send the request: {e}"))?;

    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .map_err(|e| format!("no answer: {e}"))?;
    if &head != b"HTTP/1.1 200" {
        return Err(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&head)
        ));
    }
    Ok(())
}

// ----- the supervisor ------------------------------------------------------------------------

/// The thread that keeps `STATUS=` current and pings the watchdog while the probes pass.
pub struct Supervisor {
    wake: Sender<()>,
    silenced: Arc<Mutex<bool>>,
}

impl Supervisor {
    /// Starts supervising; `watchdog` is the interval systemd asked for, if any, and
    /// `sent_status` the status line sent last.
    pub fn start(
        engine: Arc<Engine>,
        probes: Probes,
        watchdog: Option<Duration>,
        sent_status: String,
    ) -> io::Result<Self> {
        let (wake, woken) = mpsc::channel();
        let silenced = Arc::new(Mutex::new(false));
        let shared = Arc::clone(&silenced);
        // The status line reads the engine's state; a stuck engine must not stop the pings'
        // bookkeeping, so it is computed on a probe thread too.
        let status = Probe::spawn("status", move || Ok(status_line(&engine)))?;
        std::thread::Builder::new()
            .name("supervisor".to_string())
            .spawn(move || {
                supervise(status, probes, watchdog, sent_status, &woken, &shared);
            })?;
        Ok(Self { wake, silenced })
    }

    /// Stops the status updates and the pings, before `STOPPING=1`: nothing the supervisor
    /// sends can follow it. Does not wait for a probe in progress.
    pub fn stop(self) {
        *self.silenced.lock().unwrap_or_else(|p| p.into_inner()) = true;
        let _ = self.wake.send(());
    }
}

/// Sends `states` unless the supervisor was stopped; the lock orders it before the stop.
fn notify_unless_silenced(silenced: &Mutex<bool>, states: &[NotifyState]) -> bool {
    let silenced = silenced.lock().unwrap_or_else(|p| p.into_inner());
    if *silenced {
        return false;
    }
    notify(states);
    true
}

fn supervise(
    mut status: Probe<String>,
    mut probes: Probes,
    watchdog: Option<Duration>,
    mut sent_status: String,
    woken: &Receiver<()>,
    silenced: &Mutex<bool>,
) {
    let start = Instant::now();
    let mut next_status = start;
    let mut next_ping = start;
    let mut failing: Option<String> = None;
    if let Some(interval) = watchdog {
        tracing::info!(
            interval_seconds = interval.as_secs_f64(),
            "watchdog on: pinging while the mount and the control API answer"
        );
    }

    loop {
        if let Some(interval) = watchdog {
            if Instant::now() >= next_ping {
                match probes.check(interval / 4) {
                    Ok(()) => {
                        if !notify_unless_silenced(silenced, &[NotifyState::Watchdog]) {
                            return;
                        }
                        if failing.take().is_some() {
                            tracing::info!("watchdog: the probes pass again; pinging");
                        }
                    }
                    Err(why) => {
                        if failing.is_none() {
                            tracing::error!(reason = %why,
                                "watchdog: stopped pinging; systemd will restart volumed");
                        }
                        failing = Some(why);
                    }
                }
                next_ping = next_tick(next_ping, interval / 2);
            }
        }

        if Instant::now() >= next_status {
            // Without an answer in time, the last line stays.
            let mut line = status.check(STATUS_DEADLINE).unwrap_or_else(|_| {
                let base = sent_status.split("; unhealthy").next().unwrap_or_default();
                base.to_string()
            });
            if let Some(why) = &failing {
                line.push_str(&format!("; unhealthy, watchdog pings stopped: {why}"));
            }
            if line != sent_status {
                if !notify_unless_silenced(silenced, &[NotifyState::Status(&line)]) {
                    return;
                }
                sent_status = line;
            }
            next_status = next_tick(next_status, STATUS_PERIOD);
        }

        let wake = if watchdog.is_some() {
            next_status.min(next_ping)
        } else {
            next_status
        };
        match woken.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// The next time on the grid `previous + k * period` that is still ahead, so a slow probe
/// delays one ping and does not shift the later ones.
fn next_tick(previous: Instant, period: Duration) -> Instant {
    let now = Instant::now();
    let mut next = previous + period;
    while next <= now {
        next += period;
    }
    next
}

/// What the daemon is doing, for `systemctl status`: the volumes, and the re-images running
/// with their progress.
pub fn status_line(engine: &Engine) -> String {
    let files = engine.files();
    let plural = if files.len() == 1 { "" } else { "s" };
    let mut line = format!("serving {} volume{plural}", files.len());

    let running: Vec<_> = files.iter().filter(|f| f.refill_running()).collect();
    if running.is_empty() {
        return line;
    }
    let shown: Vec<String> = running
        .iter()
        .take(STATUS_NAMES)
        .map(|file| {
            let view = engine.get_volume(&Caller::daemon(), &file.id.to_string());
            let percent = view.ok().and_then(|v| v.record.reimage).and_then(|r| {
                (r.bytes_total > 0).then(|| r.bytes_done.min(r.bytes_total) * 100 / r.bytes_total)
            });
            match percent {
                Some(percent) => format!("{} {percent}%", file.name),
                None => file.name.clone(),
            }
        })
        .collect();
    let more = running.len().saturating_sub(STATUS_NAMES);
    line.push_str(&format!(
        "; re-imaging {}: {}",
        running.len(),
        shown.join(", ")
    ));
    if more > 0 {
        line.push_str(&format!(" and {more} more"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_tick_stays_on_the_grid_after_a_late_tick() {
        let start = Instant::now() - Duration::from_millis(2500);
        let next = next_tick(start, Duration::from_secs(1));
        assert_eq!(next, start + Duration::from_secs(3));
    }

    #[test]
    fn a_hung_probe_fails_at_its_deadline_and_is_not_started_twice() {
        let (release, released) = mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let mut probe = Probe::spawn("test", move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = released.lock().unwrap().recv();
            Ok(())
        })
        .unwrap();

        let err = probe.check(Duration::from_millis(50)).unwrap_err();
        assert!(err.contains("did not answer"), "{err}");
        let err = probe.check(Duration::from_millis(50)).unwrap_err();
        assert!(err.contains("has not answered"), "{err}");
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);

        // Once the stuck check returns, the next check runs afresh and passes.
        release.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        release.send(()).unwrap();
        probe.check(Duration::from_secs(5)).unwrap();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
