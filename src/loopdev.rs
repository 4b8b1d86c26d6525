//! Loop devices stacked on a volume's file keep a page cache of their own, which FUSE
//! invalidation cannot reach. After a re-image the daemon flushes those caches so a loop
//! device attached before the re-image reads the new content. Caches above the loop device
//! (a mounted file system, a VM's guest cache) are out of reach: such users must detach.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `BLKFLSBUF`: write back and drop a block device's buffer cache.
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// Flushes the buffer cache of every loop device whose backing file is `file`.
pub fn flush_loop_devices(file: &Path) {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        let backing = fs::read_to_string(entry.path().join("loop/backing_file"));
        if backing.is_ok_and(|b| Path::new(b.trim_end()) == file) {
            flush(&format!("/dev/{name}"));
        }
    }
}

fn flush(device: &str) {
    let Ok(dev) = fs::File::open(device) else {
        return;
    };
    // SAFETY: BLKFLSBUF takes no argument and acts on the block device we opened.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), BLKFLSBUF as _, 0) };
    if rc != 0 {
        tracing::warn!(
            device,
            "cannot flush the loop device's cache: {}",
            std::io::Error::last_os_error()
        );
    }
}
