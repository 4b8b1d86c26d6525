//! The mount: one regular file per volume plus the control file, served through fuser.
//!
//! ```text
//! MOUNTPOINT/            inode 1, mode 0755
//! MOUNTPOINT/.control    inode 2, mode 0666: write "reimage <volume> <image> [reimage_reserved]"
//! MOUNTPOINT/<volume>    inode >= 16, mode 0660, owned by the volume's owner
//! ```
//!
//! Every file is opened with `FOPEN_DIRECT_IO`: the kernel keeps no page cache for it and no
//! dirty data can exist above the daemon, so a fence is complete and invalidation can never
//! block on writeback. The price: shared writable `mmap` fails with `ENODEV`, and buffered
//! readers get no read-ahead (use large reads or `O_DIRECT`). Private mappings still use the
//! page cache; the engine invalidates it around every re-image.
//!
//! Data requests (read, write, fallocate, lseek, fsync) pass the volume's [`Gate`]; metadata
//! requests (lookup, getattr, open, release, statfs, readdir, flush) never wait for a fence.
//!
//! Read, write, fallocate and fsync are counted in the volume's [`VolumeMetrics`] (atomics
//! only, no lock) just before they are answered, so a client that saw its request complete
//! finds it counted; every error reply counts its errno.
//!
//! [`Gate`]: crate::gate::Gate
//! [`VolumeMetrics`]: crate::metrics::VolumeMetrics

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::engine::Engine;
use crate::identity::Caller;
use crate::metrics::{IoOp, Metrics};
use crate::volume::VolumeFile;

const ROOT: u64 = 1;
const CONTROL: u64 = 2;
const CONTROL_NAME: &str = ".control";

/// How long the kernel may cache names and attributes; changes are also invalidated.
const TTL: Duration = Duration::from_secs(1);

/// Largest request the kernel sends (its `max_pages` limit is 256 pages here).
const MAX_IO: usize = 1 << 20;

const CONTROL_HELP: &str = "\
Write one line to this file to act on a volume:
  reimage <volume> <image id or name> [reimage_reserved]
The write succeeds once the volume is downloading; otherwise it fails with
EACCES (denied by policy), ENOENT (no such volume or image), EBUSY (wrong
status or conflict), EFBIG (image larger than the volume) or EINVAL (malformed).
";

/// The FUSE file system of the daemon.
pub struct VolumeFs {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    state_dir: std::path::PathBuf,
    mounted_at: SystemTime,
}

impl VolumeFs {
    /// A file system serving `engine`'s volumes.
    pub fn new(engine: Arc<Engine>) -> Self {
        let state_dir = engine.config().state_dir.clone();
        Self {
            metrics: engine.metrics(),
            engine,
            state_dir,
            mounted_at: SystemTime::now(),
        }
    }

    fn root_attr(&self) -> FileAttr {
        self.synthetic_attr(ROOT, FileType::Directory, 0o755, 2)
    }

    fn control_attr(&self) -> FileAttr {
        self.synthetic_attr(CONTROL, FileType::RegularFile, 0o666, 1)
    }

    fn synthetic_attr(&self, ino: u64, kind: FileType, perm: u16, nlink: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        match ino {
            ROOT => Ok(self.root_attr()),
            CONTROL => Ok(self.control_attr()),
            _ => {
                let file = self.engine.file_by_ino(ino).ok_or(Errno::ENOENT)?;
                volume_attr(&file).map_err(Errno::from)
            }
        }
    }

    fn volume(&self, ino: u64) -> Result<Arc<VolumeFile>, Errno> {
        self.engine.file_by_ino(ino).ok_or(Errno::ENXIO)
    }

    /// Counts an error reply; returns its errno for the reply.
    fn failed(&self, errno: Errno) -> Errno {
        counted(&self.metrics, errno)
    }
}

/// Counts an error reply in `metrics`; returns its errno for the reply.
fn counted(metrics: &Metrics, errno: Errno) -> Errno {
    metrics.count_fuse_error(errno.code());
    errno
}

fn volume_attr(file: &VolumeFile) -> io::Result<FileAttr> {
    let meta = file.backing().metadata()?;
    let time = |secs: i64, nanos: i64| {
        UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
    };
    Ok(FileAttr {
        ino: INodeNo(file.ino),
        size: file.size(),
        blocks: meta.blocks(),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: time(meta.ctime(), meta.ctime_nsec()),
        kind: FileType::RegularFile,
        perm: 0o660,
        nlink: 1,
        uid: file.uid,
        gid: file.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

/// Runs `op` through the volume's gate: now if open, after the refill if fenced.
fn gated(file: Arc<VolumeFile>, op: Box<dyn FnOnce(&VolumeFile) + Send>) {
    if let Some(_in_flight) = file.gate.try_enter() {
        op(&file);
        return;
    }
    let parked = file.clone();
    file.gate.park(Box::new(move || gated(parked, op)));
}

fn errno(err: &io::Error) -> Errno {
    Errno::from_i32(err.raw_os_error().unwrap_or(libc::EIO))
}

thread_local! {
    /// Per-thread read buffer, so the fast path allocates nothing.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Where and when a read or write arrived, for its answer and its counters.
#[derive(Clone, Copy)]
struct DataRequest {
    offset: u64,
    started: Instant,
}

fn read_into_reply(
    file: &VolumeFile,
    metrics: &Metrics,
    request: DataRequest,
    size: usize,
    reply: ReplyData,
) {
    READ_BUF.with_borrow_mut(|buf| {
        if buf.len() < size {
            buf.resize(size.max(MAX_IO), 0);
        }
        answer_read(file, metrics, request, &mut buf[..size], reply);
    });
}

/// Serves a read into `buf`, counts it, and answers it.
fn answer_read(
    file: &VolumeFile,
    metrics: &Metrics,
    request: DataRequest,
    buf: &mut [u8],
    reply: ReplyData,
) {
    let read = file.read_at(buf, request.offset);
    let moved = read.as_ref().map_or(0, |&n| n as u64);
    file.metrics
        .record_io(IoOp::Read, moved, request.started.elapsed());
    match read {
        Ok(n) => reply.data(&buf[..n]),
        Err(e) => reply.error(counted(metrics, errno(&e))),
    }
}

/// Serves a write of `data`, counts it, and answers it.
fn answer_write(
    file: &VolumeFile,
    metrics: &Metrics,
    request: DataRequest,
    data: &[u8],
    reply: ReplyWrite,
) {
    let written = file.write_at(data, request.offset);
    let moved = written.as_ref().map_or(0, |&n| n as u64);
    file.metrics
        .record_io(IoOp::Write, moved, request.started.elapsed());
    match written {
        Ok(n) => reply.written(n as u32),
        Err(e) => reply.error(counted(metrics, errno(&e))),
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Queue-depth > 1 O_DIRECT I/O is serialized without ASYNC_DIO; the default of 16
        // background requests would throttle it again.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_write(MAX_IO as u32);
        let _ = config.set_max_background(256);
        let _ = config.set_congestion_threshold(192);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(self.failed(Errno::ENOENT));
        }
        let Some(name) = name.to_str() else {
            return reply.error(self.failed(Errno::ENOENT));
        };
        if name == CONTROL_NAME {
            return reply.entry(&TTL, &self.control_attr(), Generation(0));
        }
        match self.engine.file_by_name(name).map(|f| volume_attr(&f)) {
            Some(Ok(attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Some(Err(e)) => reply.error(self.failed(errno(&e))),
            None => reply.error(self.failed(Errno::ENOENT)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(self.failed(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let attr = match self.attr(ino.0) {
            Ok(attr) => attr,
            Err(e) => return reply.error(self.failed(e)),
        };

        // Ownership and mode belong to the daemon; time updates (touch) are accepted and
        // ignored because the backing file keeps the real times.
        let changes_owner =
            uid.is_some_and(|u| u != attr.uid) || gid.is_some_and(|g| g != attr.gid);
        let changes_mode = mode.is_some_and(|m| (m & 0o7777) as u16 != attr.perm);
        if changes_owner || changes_mode {
            return reply.error(self.failed(Errno::EPERM));
        }

        // A volume's size is fixed. `open(O_TRUNC)` arrives as a size-0 setattr without a
        // file handle: it succeeds and changes nothing, so `dd`/`cp` onto a volume work and
        // keep the data past what they write. Any other size change is refused.
        if let Some(size) = size {
            let is_open_truncate = size == 0 && fh.is_none();
            if ino.0 != CONTROL && size != attr.size && !is_open_truncate {
                return reply.error(self.failed(Errno::EPERM));
            }
        }
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let flags = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        match ino.0 {
            ROOT => reply.error(self.failed(Errno::EISDIR)),
            CONTROL => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            _ => match self.engine.file_by_ino(ino.0) {
                Some(file) => {
                    file.opened();
                    reply.opened(FileHandle(ino.0), flags);
                }
                None => reply.error(self.failed(Errno::ENOENT)),
            },
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(file) = self.engine.file_by_ino(ino.0) {
            file.released();
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 == CONTROL {
            let text = CONTROL_HELP.as_bytes();
            let start = (offset as usize).min(text.len());
            let end = (start + size as usize).min(text.len());
            return reply.data(&text[start..end]);
        }
        let file = match self.volume(ino.0) {
            Ok(file) => file,
            Err(e) => return reply.error(self.failed(e)),
        };
        let size = (size as usize).min(MAX_IO);
        let request = DataRequest {
            offset,
            started: Instant::now(),
        };

        if let Some(_in_flight) = file.gate.try_enter() {
            return read_into_reply(&file, &self.metrics, request, size, reply);
        }
        let metrics = self.metrics.clone();
        gated(
            file,
            Box::new(move |f| {
                let mut buf = vec![0u8; size];
                answer_read(f, &metrics, request, &mut buf, reply);
            }),
        );
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 == CONTROL {
            return self.control_write(req, data, reply);
        }
        let file = match self.volume(ino.0) {
            Ok(file) => file,
            Err(e) => return reply.error(self.failed(e)),
        };

        let request = DataRequest {
            offset,
            started: Instant::now(),
        };

        if let Some(_in_flight) = file.gate.try_enter() {
            return answer_write(&file, &self.metrics, request, data, reply);
        }
        // The request buffer is reused once we return: a parked write owns a copy.
        let data = data.to_vec();
        let metrics = self.metrics.clone();
        gated(
            file,
            Box::new(move |f| answer_write(f, &metrics, request, &data, reply)),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes reach the backing file before they are acknowledged; nothing is buffered.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 == CONTROL {
            return reply.ok();
        }
        self.gated_empty(ino, (IoOp::Flush, 0), reply, move |f| f.sync(datasync));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.gated_empty(ino, (IoOp::Fallocate, length), reply, move |f| {
            f.fallocate(offset, length, mode)
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return reply.error(self.failed(Errno::EINVAL));
        }
        let metrics = self.metrics.clone();
        match self.volume(ino.0) {
            Ok(file) => gated(
                file,
                Box::new(move |f| match f.seek_data_or_hole(offset, whence) {
                    Ok(found) => reply.offset(found),
                    Err(e) => reply.error(counted(&metrics, errno(&e))),
                }),
            ),
            Err(e) => reply.error(self.failed(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(self.failed(Errno::ENOTDIR));
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
            (CONTROL, FileType::RegularFile, CONTROL_NAME.to_string()),
        ];
        for file in self.engine.files() {
            entries.push((file.ino, FileType::RegularFile, file.name.clone()));
        }
        for (index, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Tools probe file-system ioctls (e2fsck, mount); a regular file has none of them.
        reply.error(self.failed(Errno::ENOTTY));
    }

    // The mount's names are the daemon's: volumes come and go through the API only. Every
    // attempt to change the namespace gets EPERM, not fuser's logged ENOSYS.

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.failed(Errno::EPERM));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.failed(Errno::EPERM));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.failed(Errno::EPERM));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.failed(Errno::EPERM));
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.failed(Errno::EPERM));
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(self.failed(Errno::EPERM));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.failed(Errno::EPERM));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.failed(Errno::EPERM));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Volumes are sparse: the free space that matters is the state directory's.
        match statvfs(&self.state_dir) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(self.failed(errno(&e))),
        }
    }
}

impl VolumeFs {
    /// Runs `op` on volume `ino` through its gate, counts it as `kind` covering `bytes`, and
    /// answers `reply` with the outcome.
    fn gated_empty(
        &self,
        ino: INodeNo,
        (kind, bytes): (IoOp, u64),
        reply: ReplyEmpty,
        op: impl FnOnce(&VolumeFile) -> io::Result<()> + Send + 'static,
    ) {
        let started = Instant::now();
        let metrics = self.metrics.clone();
        match self.volume(ino.0) {
            Ok(file) => gated(
                file,
                Box::new(move |f| {
                    let outcome = op(f);
                    let moved = if outcome.is_ok() { bytes } else { 0 };
                    f.metrics.record_io(kind, moved, started.elapsed());
                    match outcome {
                        Ok(()) => reply.ok(),
                        Err(e) => reply.error(counted(&metrics, errno(&e))),
                    }
                }),
            ),
            Err(e) => reply.error(self.failed(e)),
        }
    }

    fn control_write(&self, req: &Request, data: &[u8], reply: ReplyWrite) {
        let caller = Caller::from_process(req.uid(), req.gid(), req.pid());
        let Ok(text) = std::str::from_utf8(data) else {
            return reply.error(self.failed(Errno::EINVAL));
        };
        let line = text.strip_suffix('\n').unwrap_or(text);
        if line.contains('\n') {
            return reply.error(self.failed(Errno::EINVAL));
        }

        match self.engine.control(&caller, line) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::info!(uid = caller.uid, line = ?line, error = ?e.message(),
                    "control file request refused");
                reply.error(self.failed(Errno::from_i32(e.errno())));
            }
        }
    }
}

fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `statvfs` is plain data that the call fills in completely on success.
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a live output struct.
    if unsafe { libc::statvfs(path.as_ptr(), &mut out) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(out)
}

/// Mounts `engine`'s file system at its configured mountpoint.
pub fn mount(engine: Arc<Engine>) -> io::Result<fuser::BackgroundSession> {
    let mountpoint = engine.config().mountpoint.clone();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("volumed".to_string()),
        fuser::MountOption::Subtype("volumed".to_string()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
    ];
    // Consumers run as other users (a qemu user, an unprivileged owner); the kernel checks
    // the modes we report because of DefaultPermissions.
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(engine.config().fuse_threads);
    config.clone_fd = true;

    let session = fuser::Session::new(VolumeFs::new(engine.clone()), &mountpoint, &config)?;
    engine.set_notifier(session.notifier());
    session.spawn()
}
