//! The refill: destroys a volume's content and writes an image into it.
//!
//! 1. The backing file is discarded whole (holes punched, or zeroed where the file system
//!    cannot punch), so no byte of the old content survives, past the image's end included.
//! 2. The image is mapped read-only in fixed windows. Each window is scanned in blocks; runs
//!    of non-zero blocks are written to the backing file straight from the mapping (no
//!    intermediate buffer) and all-zero blocks stay holes. Only one window is mapped at a
//!    time, so memory stays bounded whatever the image size.
//! 3. The backing file is made durable before the caller changes the volume's status.
//!
//! A shrinking or unreadable image fails the refill, never the daemon: scans run under a
//! [`crate::sigbus::Guard`], the kernel's copies out of the mapping fail with `EFAULT`, and
//! the image's size is checked before and after every window.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{Advice, MmapOptions};

use crate::sigbus;
use crate::volume::{discard, VolumeFile};

/// Granularity of hole detection: the block size of the file systems we back volumes on.
const BLOCK: usize = 4096;

/// What a finished refill did.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct RefillStats {
    /// Bytes of the image scanned.
    pub scanned: u64,
    /// Bytes written to the volume (the rest were zeros left as holes).
    pub written: u64,
}

/// Discards `volume` and fills it with the `image_len` bytes of the raw image at `image`.
///
/// `window` is the mapping size in bytes (a multiple of the page size); `rate_limit` caps the
/// rate in bytes per second (0: none). `cancel` ends the refill early with an error.
/// Progress is published in `volume.refill_done`.
pub fn refill_raw(
    volume: &VolumeFile,
    image: &Path,
    image_len: u64,
    window: usize,
    rate_limit: u64,
    cancel: &AtomicBool,
) -> Result<RefillStats, String> {
    let source = File::open(image).map_err(|e| format!("cannot open image: {e}"))?;
    check_image_len(&source, image_len)?;
    if image_len > volume.size() {
        return Err(format!(
            "image of {image_len} bytes does not fit the volume of {} bytes",
            volume.size()
        ));
    }

    discard(volume.backing(), volume.size())
        .map_err(|e| format!("cannot discard the volume's old content: {e}"))?;

    let mut stats = RefillStats::default();
    let mut offset = 0u64;
    let started = std::time::Instant::now();
    while offset < image_len {
        if cancel.load(Ordering::Acquire) {
            return Err("the refill was cancelled because volumed is stopping".to_string());
        }
        let len = (image_len - offset).min(window as u64) as usize;
        stats.written += refill_window(volume, &source, offset, len)?;
        check_image_len(&source, image_len)?;

        offset += len as u64;
        stats.scanned = offset;
        volume.refill_done.store(offset, Ordering::Release);
        pace(started, offset, rate_limit);
    }

    volume
        .backing()
        .sync_data()
        .map_err(|e| format!("cannot make the volume durable: {e}"))?;
    Ok(stats)
}

/// Maps `[offset, offset + len)` of `source` and writes its non-zero blocks to the volume.
fn refill_window(
    volume: &VolumeFile,
    source: &File,
    offset: u64,
    len: usize,
) -> Result<u64, String> {
    // SAFETY: the mapping is read-only and private to this function. The file may shrink
    // under it; the SIGBUS guard registered below absorbs faults on vanished pages.
    let map = unsafe { MmapOptions::new().offset(offset).len(len).map(source) }
        .map_err(|e| format!("cannot map the image at offset {offset}: {e}"))?;
    let _ = map.advise(Advice::Sequential);
    let _ = map.advise(Advice::WillNeed);
    let guard = sigbus::Guard::register(map.as_ptr(), map.len())
        .ok_or_else(|| "too many refills running at once".to_string())?;

    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    for block_start in (0..len).step_by(BLOCK) {
        let block = &map[block_start..(block_start + BLOCK).min(len)];
        match (is_zero(block), run_start) {
            (false, None) => run_start = Some(block_start),
            (true, Some(start)) => {
                written += write_run(volume, &map[start..block_start], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        written += write_run(volume, &map[start..len], offset + start as u64)?;
    }

    if guard.faulted() {
        return Err(format!(
            "the image became unreadable near offset {offset}: it shrank during the refill"
        ));
    }
    Ok(written)
}

/// Sleeps until `done` bytes are no faster than `rate_limit` bytes per second since `started`.
fn pace(started: std::time::Instant, done: u64, rate_limit: u64) {
    if rate_limit == 0 {
        return;
    }
    let due = std::time::Duration::from_secs_f64(done as f64 / rate_limit as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
}

fn write_run(volume: &VolumeFile, run: &[u8], offset: u64) -> Result<u64, String> {
    volume.backing().write_all_at(run, offset).map_err(|e| {
        if e.raw_os_error() == Some(libc::EFAULT) {
            format!("the image became unreadable near offset {offset}: it shrank during the refill")
        } else {
            format!("cannot write the volume at offset {offset}: {e}")
        }
    })?;
    Ok(run.len() as u64)
}

fn check_image_len(source: &File, expected: u64) -> Result<(), String> {
    let actual = source
        .metadata()
        .map_err(|e| format!("cannot stat the image: {e}"))?
        .len();
    if actual != expected {
        return Err(format!(
            "the image file is {actual} bytes but {expected} were uploaded: it changed on disk"
        ));
    }
    Ok(())
}

/// Whether every byte of `block` is zero.
pub fn is_zero(block: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128, and align_to only reinterprets the aligned
    // middle of the slice.
    let (head, middle, tail) = unsafe { block.align_to::<u128>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && middle.iter().fold(0u128, |acc, &word| acc | word) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use uuid::Uuid;

    fn setup(volume_len: u64, image: &[u8]) -> (tempfile::TempDir, VolumeFile, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("v.raw");
        let mut file = File::create(&backing).unwrap();
        file.write_all(&vec![0xaa; volume_len as usize]).unwrap();
        let vol = VolumeFile::open(Uuid::new_v4(), "v", 16, (0, 0), &backing).unwrap();
        let image_path = dir.path().join("image");
        std::fs::write(&image_path, image).unwrap();
        (dir, vol, image_path)
    }

    #[test]
    fn old_content_is_gone_everywhere() {
        let mut image = vec![0u8; 3 * BLOCK + 100];
        image[BLOCK..2 * BLOCK].fill(0x55);
        image[3 * BLOCK + 99] = 1;
        let (_dir, vol, path) = setup(64 * 1024, &image);

        let stats = refill_raw(
            &vol,
            &path,
            image.len() as u64,
            8192,
            0,
            &AtomicBool::new(false),
        )
        .unwrap();

        let mut content = vec![0u8; 64 * 1024];
        vol.read_at(&mut content, 0).unwrap();
        assert_eq!(&content[..image.len()], &image[..]);
        assert!(content[image.len()..].iter().all(|&b| b == 0));
        assert_eq!(stats.written, (BLOCK + 100) as u64);
    }

    #[test]
    fn changed_image_length_fails() {
        let (_dir, vol, path) = setup(8192, &[1u8; 4096]);
        let err = refill_raw(&vol, &path, 5000, 4096, 0, &AtomicBool::new(false)).unwrap_err();
        assert!(err.contains("changed on disk"), "{err}");
    }

    #[test]
    fn cancel_stops_the_refill() {
        let (_dir, vol, path) = setup(1 << 20, &[1u8; 1 << 20]);
        let err = refill_raw(&vol, &path, 1 << 20, 4096, 0, &AtomicBool::new(true)).unwrap_err();
        assert!(err.contains("cancelled"), "{err}");
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut block = [0u8; 4096];
        block[4095] = 1;
        assert!(!is_zero(&block));
        block[4095] = 0;
        block[0] = 1;
        assert!(!is_zero(&block));
        assert!(is_zero(&[]));
    }
}
