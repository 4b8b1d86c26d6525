//! A volume's data path: its backing file, its fence and the rules of a fixed-size device.
//!
//! The FUSE handlers call into [`VolumeFile`] for every read and write. Offsets past the end
//! behave like a block device: reads are short, writes that cross the end are short, writes
//! at or past the end fail with `ENOSPC`. The size changes only through `os-extend`.
//!
//! A re-image destroys old content with `FALLOC_FL_ZERO_RANGE`, which turns the data into
//! unwritten extents at once, and gives the blocks back afterwards with
//! [`VolumeFile::reclaim`]: punching holes costs about a second per GiB where the file system
//! discards freed blocks synchronously (ext4 mounted with `discard`), and that cost is kept
//! out of the re-image. The reclaim punches under short fences of [`RECLAIM_CHUNK`] bytes,
//! so I/O waits for one chunk at most, and it never runs beside a refill
//! ([`VolumeFile::maintenance`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use uuid::Uuid;

use crate::gate::Gate;
use crate::metrics::VolumeMetrics;

/// The data path of one volume.
pub struct VolumeFile {
    /// The volume's id.
    pub id: Uuid,
    /// The volume's name, which is its file name in the mount.
    pub name: String,
    /// Inode number in the mount.
    pub ino: u64,
    /// Owner and group of the file in the mount.
    pub uid: u32,
    /// Group of the file in the mount.
    pub gid: u32,
    path: PathBuf,
    file: File,
    size: AtomicU64,
    /// The fence that a re-image closes.
    pub gate: Gate,
    open_handles: AtomicUsize,
    deleted: AtomicBool,
    refill_running: AtomicBool,
    /// Bytes of the image the running refill has processed.
    pub refill_done: AtomicU64,
    /// Held by a refill for its whole run and by the reclaim for each chunk, so the reclaim
    /// never punches a range that a refill is writing.
    maintenance: Mutex<()>,
    /// Counters of the data path and of re-images, for `GET /metrics`.
    pub metrics: VolumeMetrics,
}

/// Bytes the reclaim punches under one fence.
pub const RECLAIM_CHUNK: u64 = 32 << 20;

impl VolumeFile {
    /// Opens the backing file at `path`, which must already have the volume's size.
    pub fn open(
        id: Uuid,
        name: &str,
        ino: u64,
        owner: (u32, u32),
        path: &Path,
    ) -> io::Result<Self> {
        let file = File::options().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            id,
            name: name.to_string(),
            ino,
            uid: owner.0,
            gid: owner.1,
            path: path.to_path_buf(),
            file,
            size: AtomicU64::new(size),
            gate: Gate::default(),
            open_handles: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
            refill_running: AtomicBool::new(false),
            refill_done: AtomicU64::new(0),
            maintenance: Mutex::new(()),
            metrics: VolumeMetrics::default(),
        })
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The backing file.
    pub fn backing(&self) -> &File {
        &self.file
    }

    /// Path of the backing file.
    pub fn backing_path(&self) -> &Path {
        &self.path
    }

    /// Reads at `offset` into `buf`; returns fewer bytes at the end of the volume.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.check_live()?;
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let len = buf.len().min((size - offset) as usize);

        let mut done = 0;
        while done < len {
            match self.file.read_at(&mut buf[done..len], offset + done as u64) {
                Ok(0) => {
                    // The backing file is sparse and exactly the volume's size, so a short
                    // read here means it shrank behind our back: report zeros, not garbage.
                    buf[done..len].fill(0);
                    done = len;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(len)
    }

    /// Writes `data` at `offset`; a write crossing the end is short, one at the end fails.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        self.check_live()?;
        let size = self.size();
        if offset >= size {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let len = data.len().min((size - offset) as usize);
        self.file.write_all_at(&data[..len], offset)?;
        Ok(len)
    }

    /// Makes written data durable.
    pub fn sync(&self, data_only: bool) -> io::Result<()> {
        self.check_live()?;
        if data_only {
            self.file.sync_data()
        } else {
            self.file.sync_all()
        }
    }

    /// Applies a `fallocate` request within the volume.
    pub fn fallocate(&self, offset: u64, length: u64, mode: i32) -> io::Result<()> {
        self.check_live()?;
        let size = self.size();
        let end = offset
            .checked_add(length)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let action = mode & !libc::FALLOC_FL_KEEP_SIZE;

        // The size is fixed: anything that would grow the file past the end is refused,
        // ranges that merely extend past it with KEEP_SIZE are clamped.
        if end > size && !keep_size {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let end = end.min(size);
        if offset >= end {
            return Ok(());
        }

        match action {
            0 | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE => fallocate(
                &self.file,
                mode | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                end - offset,
            ),
            _ => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    /// Finds the next data or hole at or after `offset` (`SEEK_DATA`/`SEEK_HOLE`).
    pub fn seek_data_or_hole(&self, offset: i64, whence: i32) -> io::Result<i64> {
        self.check_live()?;
        if offset < 0 || offset as u64 >= self.size() {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        // SAFETY: lseek on a descriptor we own; it only moves that descriptor's offset, which
        // no other path uses (all I/O is positional).
        let found = unsafe { libc::lseek(self.file.as_raw_fd(), offset, whence) };
        if found < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(found.min(self.size() as i64))
    }

    /// Grows the volume to `new_size` bytes.
    pub fn grow(&self, new_size: u64) -> io::Result<()> {
        self.file.set_len(new_size)?;
        self.file.sync_all()?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Counts an open file handle.
    pub fn opened(&self) {
        self.open_handles.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a released file handle.
    pub fn released(&self) {
        self.open_handles.fetch_sub(1, Ordering::AcqRel);
    }

    /// Open handles through the mount.
    pub fn open_handles(&self) -> usize {
        self.open_handles.load(Ordering::Acquire)
    }

    /// Marks the volume deleted: later I/O on handles still open fails with `ENXIO`.
    pub fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
    }

    /// Claims the right to run a refill; false if one is already running.
    pub fn start_refill(&self) -> bool {
        let claimed = self
            .refill_running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if claimed {
            self.refill_done.store(0, Ordering::Release);
        }
        claimed
    }

    /// Releases the right taken by [`VolumeFile::start_refill`].
    pub fn end_refill(&self) {
        self.refill_running.store(false, Ordering::Release);
    }

    /// Whether a refill is running.
    pub fn refill_running(&self) -> bool {
        self.refill_running.load(Ordering::Acquire)
    }

    /// Excludes the reclaim while held; a refill holds it for its whole run.
    pub fn maintenance(&self) -> MutexGuard<'_, ()> {
        self.maintenance
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Gives back the blocks of `[start, end)` that read as zeros: every range there that
    /// `SEEK_HOLE` reports (true holes, and unwritten extents left by [`zero_range`]) is
    /// punched, one fenced chunk at a time. Data is never touched: the ranges are found under
    /// the fence, where no write can land. Stops early, with `Ok(false)`, once `stop` says
    /// so (a new re-image, shutdown) or the volume is deleted.
    pub fn reclaim(&self, start: u64, end: u64, stop: &dyn Fn() -> bool) -> io::Result<bool> {
        let mut offset = start;
        while offset < end.min(self.size()) {
            let _maintenance = self.maintenance();
            if stop() || self.deleted.load(Ordering::Acquire) {
                return Ok(false);
            }
            let chunk_end = (offset + RECLAIM_CHUNK).min(end).min(self.size());

            self.gate.fence();
            let punched = punch_holes(&self.file, offset, chunk_end);
            self.gate.unfence();

            if !punched? {
                // The file system cannot punch: nothing to give back anywhere.
                return Ok(true);
            }
            offset = chunk_end;
        }
        Ok(true)
    }

    fn check_live(&self) -> io::Result<()> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        Ok(())
    }
}

/// `fallocate(2)` on `file`.
pub fn fallocate(file: &File, mode: i32, offset: u64, length: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor we own with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            length as libc::off_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `lseek` with `SEEK_DATA` or `SEEK_HOLE`; `None` past the last data (`ENXIO`). A file
/// system without them reports everything as data.
pub fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own; it only moves that descriptor's offset.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if found >= 0 {
        return Ok(Some(found as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if whence == libc::SEEK_DATA => {
            Ok(Some(offset))
        }
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
        _ => Err(err),
    }
}

/// Destroys every byte of `[offset, offset + len)` in `file` at once, leaving the blocks
/// allocated: data ranges become unwritten extents (`FALLOC_FL_ZERO_RANGE`), holes stay
/// holes. Where the file system cannot zero a range that way, it is discarded instead.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let data = match seek(file, at, libc::SEEK_DATA)? {
            Some(data) if data < end => data,
            _ => return Ok(()),
        };
        let hole = seek(file, data, libc::SEEK_HOLE)?.map_or(end, |h| h.min(end));
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match fallocate(file, zero, data, hole - data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                discard_range(file, data, hole - data)?
            }
            Err(e) => return Err(e),
        }
        at = hole;
    }
    Ok(())
}

/// Punches every range of `[start, end)` that `SEEK_HOLE` reports; false if the file system
/// cannot punch.
fn punch_holes(file: &File, start: u64, end: u64) -> io::Result<bool> {
    let mut at = start;
    while at < end {
        let hole = seek(file, at, libc::SEEK_HOLE)?.map_or(end, |h| h.min(end));
        if hole >= end {
            break;
        }
        let data = seek(file, hole, libc::SEEK_DATA)?.map_or(end, |d| d.min(end));
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match fallocate(file, punch, hole, data - hole) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(false),
            Err(e) => return Err(e),
        }
        at = data;
    }
    Ok(true)
}

/// Destroys every byte of `[0, len)` in `file`: punches holes, or zeroes where the file
/// system cannot punch.
pub fn discard(file: &File, len: u64) -> io::Result<()> {
    discard_range(file, 0, len)
}

/// Destroys every byte of `[offset, offset + len)` in `file`, as [`discard`] does.
pub fn discard_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, punch, offset, len) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => return Err(e),
        Err(_) => {}
    }
    let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, zero, offset, len) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => return Err(e),
        Err(_) => {}
    }

    // Last resort: write zeros from one static buffer (no copy of any image data).
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let n = (end - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(size: u64) -> (tempfile::TempDir, VolumeFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.raw");
        File::create(&path).unwrap().set_len(size).unwrap();
        let vol = VolumeFile::open(Uuid::new_v4(), "v", 16, (0, 0), &path).unwrap();
        (dir, vol)
    }

    #[test]
    fn writes_are_clamped_at_the_end() {
        let (_dir, vol) = volume(8192);
        assert_eq!(vol.write_at(&[1; 4096], 6144).unwrap(), 2048);
        let err = vol.write_at(&[1; 10], 8192).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(vol.size(), 8192);
    }

    #[test]
    fn reads_are_short_at_the_end() {
        let (_dir, vol) = volume(8192);
        let mut buf = [9u8; 4096];
        assert_eq!(vol.read_at(&mut buf, 6144).unwrap(), 2048);
        assert_eq!(&buf[..2048], &[0; 2048][..]);
        assert_eq!(vol.read_at(&mut buf, 8192).unwrap(), 0);
    }

    #[test]
    fn discard_destroys_data() {
        let (_dir, vol) = volume(1 << 20);
        vol.write_at(&[0xaa; 65536], 4096).unwrap();
        discard(vol.backing(), vol.size()).unwrap();
        let mut buf = vec![1u8; 1 << 20];
        vol.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn deleted_volume_refuses_io() {
        let (_dir, vol) = volume(4096);
        vol.mark_deleted();
        let err = vol.read_at(&mut [0; 16], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO));
    }

    #[test]
    fn fallocate_cannot_grow() {
        let (_dir, vol) = volume(4096);
        let err = vol.fallocate(0, 8192, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        vol.fallocate(0, 8192, libc::FALLOC_FL_KEEP_SIZE).unwrap();
        assert_eq!(vol.backing().metadata().unwrap().len(), 4096);
    }
}
