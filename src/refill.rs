//! The refill: destroys a volume's content and writes an image into it.
//!
//! 1. The image is mapped read-only in fixed windows. Each window is scanned in blocks; runs
//!    of non-zero blocks overwrite the backing file in place, straight from the mapping (no
//!    intermediate buffer); runs of zero blocks, the image's holes (skipped with
//!    `SEEK_DATA`, so a sparse image costs time in proportion to its data) and everything past
//!    its end are zeroed with `FALLOC_FL_ZERO_RANGE` (instant; the blocks are given back
//!    after the re-image, see [`crate::volume`]). Every byte of the
//!    volume is thus written or destroyed: nothing of the old content survives. Overwriting
//!    in place, rather than punching the whole volume first, spares the file system from
//!    allocating every block again, which costs as much as the writes themselves.
//! 2. Only one window is mapped at a time, so memory stays bounded whatever the image size.
//! 3. The backing file is made durable before the caller changes the volume's status.
//!
//! A shrinking or unreadable image fails the refill, never the daemon: scans run under a
//! [`crate::sigbus::Guard`], the kernel's copies out of the mapping fail with `EFAULT`, and
//! the image's size is checked before and after every window.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{Advice, Mmap, MmapOptions};

use crate::qcow2::{Decompressor, Extent, Mapping, Qcow2Image};
use crate::sigbus;
use crate::verify::{is_zero, Expected, Verifier, BLOCK};
use crate::volume::{zero_range, VolumeFile};

/// What a finished refill did.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct RefillStats {
    /// Bytes of the image scanned.
    pub scanned: u64,
    /// Bytes written to the volume (the rest were zeros left as holes).
    pub written: u64,
    /// The span `[start, end)` of the volume where old content was destroyed by zeroing: its
    /// blocks are still allocated until [`crate::volume::VolumeFile::reclaim`] gives them back.
    pub zeroed: Option<(u64, u64)>,
}

/// How a refill reads its image and checks it.
#[derive(Clone, Copy, Debug)]
pub struct RefillParams<'a> {
    /// Size in bytes of the stored image file, as uploaded.
    pub image_len: u64,
    /// The hash of the stored bytes taken at upload, which the refill checks the bytes it
    /// reads against.
    pub expected_hash: Expected,
    /// Mapping size in bytes (a multiple of the page size).
    pub window: usize,
    /// Cap of the rate in bytes per second (0: none).
    pub rate_limit: u64,
    /// Ends the refill early with an error.
    pub cancel: &'a AtomicBool,
}

/// The kind of a refill's failure reason, one of a small fixed set for the metrics:
/// `cancelled`, `image_changed`, `image_corrupt`, `image_invalid`, `image_unreadable`,
/// `volume_io` or `other`. It reads the messages this module writes, so the two stay side
/// by side here.
pub fn failure_kind(reason: &str) -> &'static str {
    if reason.contains("cancelled") {
        "cancelled"
    } else if reason.contains("shrank") || reason.contains("changed on disk") {
        "image_changed"
    } else if reason.contains("corrupt") {
        "image_corrupt"
    } else if reason.contains("qcow2 image") || reason.contains("does not fit") {
        "image_invalid"
    } else if reason.contains("the volume") {
        "volume_io"
    } else if reason.contains("image") {
        "image_unreadable"
    } else {
        "other"
    }
}

/// Discards `volume` and fills it with the raw image at `image`.
///
/// Progress is published in `volume.refill_done`.
pub fn refill_raw(
    volume: &VolumeFile,
    image: &Path,
    params: RefillParams<'_>,
) -> Result<RefillStats, String> {
    let RefillParams {
        image_len,
        window,
        rate_limit,
        cancel,
        ..
    } = params;
    let source = File::open(image).map_err(|e| format!("cannot open image: {e}"))?;
    check_image_len(&source, image_len)?;
    if image_len > volume.size() {
        return Err(format!(
            "image of {image_len} bytes does not fit the volume of {} bytes",
            volume.size()
        ));
    }

    let target = Target::new(volume);

    // Holes of a sparse image cost nothing: SEEK_DATA skips them, and the block hash has
    // nothing to add for them, so the time follows the image's data, not its size.
    let mut stats = RefillStats::default();
    let mut verifier = Verifier::new(params.expected_hash);
    let mut offset = 0u64;
    let started = std::time::Instant::now();
    let mut windows = DataWindows::new(&source, image_len, window).peekable();
    while let Some(next) = windows.next() {
        check_cancel(cancel)?;
        let (data, len) = next?;
        verifier.hole(data - offset);
        target.zero(offset, data - offset)?;

        // The disk reads the next window while this one is written.
        if let Some(Ok((ahead, ahead_len))) = windows.peek() {
            prefetch(&source, *ahead, *ahead_len);
        }
        stats.written += refill_window(&target, &source, data, len, &mut verifier)?;
        check_image_len(&source, image_len)?;

        offset = data + len as u64;
        stats.scanned = offset;
        volume.refill_done.store(offset, Ordering::Release);
        pace(started, offset, rate_limit);
    }
    verifier.hole(image_len - offset);
    target.zero(offset, image_len - offset)?;
    stats.scanned = image_len;
    volume.refill_done.store(image_len, Ordering::Release);
    verifier.check(image_len)?;

    target.zero(image_len, volume.size() - image_len)?;
    target.sync()?;
    stats.zeroed = target.zeroed.get();
    Ok(stats)
}

const PAGE: u64 = 4096;

/// The data of an image file in windows `(offset, len)` of at most `window` bytes (a multiple
/// of the page size), in file order, skipping its holes.
struct DataWindows<'f> {
    source: &'f File,
    offset: u64,
    len: u64,
    window: u64,
}

impl<'f> DataWindows<'f> {
    fn new(source: &'f File, len: u64, window: usize) -> Self {
        Self {
            source,
            offset: 0,
            len,
            window: window as u64,
        }
    }

    /// Windows start and end on page boundaries (but for the file's end) whatever the file
    /// system's block size, since the block hash cuts blocks from each window's start.
    fn find_next(&mut self) -> Result<Option<(u64, usize)>, String> {
        let found = seek(self.source, self.offset, libc::SEEK_DATA)?.unwrap_or(self.len);
        if found >= self.len {
            self.offset = self.len;
            return Ok(None);
        }
        // `self.offset` is page-aligned, so `data` is too.
        let data = (found / PAGE * PAGE).max(self.offset);
        let hole = seek(self.source, found, libc::SEEK_HOLE)?.unwrap_or(self.len);
        let end = hole
            .div_ceil(PAGE)
            .saturating_mul(PAGE)
            .clamp(data + PAGE, data + self.window)
            .min(self.len);
        self.offset = end;
        Ok(Some((data, (end - data) as usize)))
    }
}

impl Iterator for DataWindows<'_> {
    type Item = Result<(u64, usize), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.offset >= self.len {
            return None;
        }
        let found = self.find_next();
        if found.is_err() {
            self.offset = self.len;
        }
        found.transpose()
    }
}

fn seek(source: &File, offset: u64, whence: i32) -> Result<Option<u64>, String> {
    crate::volume::seek(source, offset, whence)
        .map_err(|e| format!("cannot find the image's data: {e}"))
}

/// Starts reading the next window from disk while the current one is written.
fn prefetch(source: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only hints the kernel about a descriptor we own.
    unsafe {
        libc::posix_fadvise(
            source.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        );
    }
}

fn check_cancel(cancel: &AtomicBool) -> Result<(), String> {
    if cancel.load(Ordering::Acquire) {
        return Err("the refill was cancelled because volumed is stopping".to_string());
    }
    Ok(())
}

/// Maps `[offset, offset + len)` of `source` and writes its non-zero blocks to the volume.
fn refill_window(
    target: &Target<'_>,
    source: &File,
    offset: u64,
    len: usize,
    verifier: &mut Verifier,
) -> Result<u64, String> {
    // SAFETY: the mapping is read-only and private to this function. The file may shrink
    // under it; the SIGBUS guard registered below absorbs faults on vanished pages.
    let map = unsafe { MmapOptions::new().offset(offset).len(len).map(source) }
        .map_err(|e| format!("cannot map the image at offset {offset}: {e}"))?;
    let _ = map.advise(Advice::Sequential);
    let _ = map.advise(Advice::WillNeed);
    let guard = sigbus::Guard::register(map.as_ptr(), map.len())
        .ok_or_else(|| "too many refills running at once".to_string())?;

    verifier.data(offset, &map);
    let written = write_nonzero_runs(target, &map, offset)?;

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

/// Writes the runs of non-zero blocks of `data` at `offset`; destroys the zero runs.
fn write_nonzero_runs(target: &Target<'_>, data: &[u8], offset: u64) -> Result<u64, String> {
    let mut written = 0u64;
    let mut run_start = 0usize;
    let mut run_is_zero: Option<bool> = None;
    for block_start in (0..data.len()).step_by(BLOCK) {
        let block = &data[block_start..(block_start + BLOCK).min(data.len())];
        let zero = is_zero(block);
        if run_is_zero.is_some_and(|z| z != zero) {
            written += finish_run(
                target,
                &data[run_start..block_start],
                offset,
                run_start,
                !zero,
            )?;
            run_start = block_start;
        }
        run_is_zero = Some(zero);
    }
    if let Some(zero) = run_is_zero {
        written += finish_run(target, &data[run_start..], offset, run_start, zero)?;
    }
    Ok(written)
}

/// Writes `run` at `offset + start`, or destroys that range when the run is zeros.
fn finish_run(
    target: &Target<'_>,
    run: &[u8],
    offset: u64,
    start: usize,
    zero: bool,
) -> Result<u64, String> {
    let at = offset + start as u64;
    if zero {
        target.zero(at, run.len() as u64)?;
        return Ok(0);
    }
    target.flush_zero()?;
    write_run(target, run, at)
}

fn write_run(target: &Target<'_>, run: &[u8], offset: u64) -> Result<u64, String> {
    target.write(run, offset).map_err(|e| {
        if e.raw_os_error() == Some(libc::EFAULT) {
            format!("the image became unreadable near offset {offset}: it shrank during the refill")
        } else {
            format!("cannot write the volume at offset {offset}: {e}")
        }
    })?;
    Ok(run.len() as u64)
}

/// Discards `volume` and fills it with the guest disk of the qcow2 image at `image`.
///
/// The whole file is mapped (address space only) under one SIGBUS guard. One thread hashes
/// the stored bytes in file order (see [`verify_mapped`]) while this one walks the image's
/// mappings in guest order: zero and unallocated runs stay holes, data runs are written
/// straight from the mapping (zero blocks skipped), and compressed clusters are inflated on
/// every core by an [`Inflater`] while earlier ones are written. The hash
/// decides before the volume is made durable; its reading ahead also brings the image into
/// the page cache for the walk. Pages of the mapping are released (`MADV_DONTNEED`) as soon
/// as they are used, and all of it every 16 MiB of guest disk, so memory stays bounded.
pub fn refill_qcow2(
    volume: &VolumeFile,
    image: &Path,
    params: RefillParams<'_>,
) -> Result<RefillStats, String> {
    let source = File::open(image).map_err(|e| format!("cannot open image: {e}"))?;
    check_image_len(&source, params.image_len)?;
    if params.image_len == 0 {
        return Err("the qcow2 image is empty".to_string());
    }

    // SAFETY: read-only mapping private to this function; the SIGBUS guard below absorbs
    // faults if the file shrinks, and the faulted flag fails the refill.
    let map = unsafe { Mmap::map(&source) }.map_err(|e| format!("cannot map the image: {e}"))?;
    let guard = sigbus::Guard::register(map.as_ptr(), map.len())
        .ok_or_else(|| "too many refills running at once".to_string())?;

    // A walk that fails stops the hash too: its reason stands, and a large image is not read
    // to its end for nothing.
    let walk_failed = AtomicBool::new(false);
    let (verified, written) = std::thread::scope(|scope| {
        let verifying = scope.spawn(|| verify_mapped(&source, &map, &params, &walk_failed));
        let written = write_qcow2(volume, &map, &guard, &params);
        walk_failed.store(written.is_err(), Ordering::Release);
        let verified = verifying
            .join()
            .unwrap_or_else(|_| Err("checking the image's hash panicked".to_string()));
        (verified, written)
    });

    // The most telling reason first: a changed file explains a wrong hash, and a wrong hash
    // found before the walk failed explains the failure.
    check_image_len(&source, params.image_len)?;
    if guard.faulted() {
        return Err(shrank());
    }
    let (target, stats) = match (verified, written) {
        (Err(mismatch), _) if mismatch != HASH_ABANDONED => return Err(mismatch),
        (_, written) => written?,
    };
    target.sync()?;
    Ok(RefillStats {
        zeroed: target.zeroed.get(),
        ..stats
    })
}

/// What [`verify_mapped`] answers when the walk failed first.
const HASH_ABANDONED: &str = "the hash was abandoned";

fn shrank() -> String {
    "the image became unreadable: it shrank during the refill".to_string()
}

/// Hashes the mapped image `map` of `source` in file order, skipping its holes. Gives up
/// early when `abandon` is set.
fn verify_mapped(
    source: &File,
    map: &Mmap,
    params: &RefillParams<'_>,
    abandon: &AtomicBool,
) -> Result<(), String> {
    if params.expected_hash == Expected::None {
        return Ok(());
    }
    let mut verifier = Verifier::new(params.expected_hash);

    let len = map.len() as u64;
    let mut offset = 0u64;
    let mut windows = DataWindows::new(source, len, params.window).peekable();
    while let Some(next) = windows.next() {
        check_cancel(params.cancel)?;
        if abandon.load(Ordering::Acquire) {
            return Err(HASH_ABANDONED.to_string());
        }
        let (data, window_len) = next?;
        verifier.hole(data - offset);

        if let Some(Ok((ahead, ahead_len))) = windows.peek() {
            prefetch(source, *ahead, *ahead_len);
        }
        let start = data as usize;
        verifier.data(data, &map[start..start + window_len]);
        release(map, start, window_len);
        offset = data + window_len as u64;
    }
    verifier.hole(len - offset);
    verifier.check(len)
}

/// The walk of [`refill_qcow2`]: parses the image and writes its guest disk to the volume,
/// short of making it durable.
fn write_qcow2<'v>(
    volume: &'v VolumeFile,
    map: &Mmap,
    guard: &sigbus::Guard,
    params: &RefillParams<'_>,
) -> Result<(Target<'v>, RefillStats), String> {
    let params = *params;
    let qcow2 = Qcow2Image::parse_releasing(map, &|| release(map, 0, map.len()))
        .map_err(|e| format!("the qcow2 image is invalid: {e}"))?;
    if guard.faulted() {
        return Err(shrank());
    }
    if qcow2.virtual_size() > volume.size() {
        return Err(format!(
            "the image's virtual size of {} bytes does not fit the volume of {} bytes",
            qcow2.virtual_size(),
            volume.size()
        ));
    }
    let target = Target::new(volume);
    let stats = std::thread::scope(|scope| {
        let inflater = Inflater::start(scope, &qcow2);
        let mut writer = Qcow2Writer::new(&target, &qcow2, map, params, inflater);
        for mapping in qcow2.mappings() {
            let mapping = mapping.map_err(|e| format!("the qcow2 image is invalid: {e}"))?;
            writer.add(mapping)?;
            if guard.faulted() {
                return Err(shrank());
            }
        }
        writer.write_inflated()?;
        Ok(writer.stats)
        // Dropping the writer closes the job queue; the scope then joins the workers.
    })?;
    target.zero(qcow2.virtual_size(), volume.size() - qcow2.virtual_size())?;
    Ok((target, stats))
}

/// Bytes of inflated clusters in flight: bounds memory whatever the cluster size.
const INFLATE_BYTES_IN_FLIGHT: u64 = 16 << 20;

/// A compressed cluster on its way through the inflater, and then its inflated bytes.
struct InflateJob {
    /// Position in guest order.
    seq: u64,
    mapping: Mapping,
    buffer: ClusterBuffer,
    result: Result<(), String>,
    /// Whether the inflated cluster has an all-zero block, found by the worker while the
    /// bytes are still in its cache.
    has_zero_block: bool,
}

/// A buffer of one cluster. Clusters of a page or more start on a page boundary, so runs of
/// them can go to the volume in one direct write.
struct ClusterBuffer {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl ClusterBuffer {
    fn new(len: usize) -> Self {
        let page = PAGE as usize;
        let pad = if len >= page { page } else { 0 };
        let bytes = vec![0; len + pad];
        let start = bytes.as_ptr().align_offset(page).min(pad);
        Self { bytes, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// Worker threads that inflate compressed clusters, one per core, fed through bounded
/// crossbeam channels.
///
/// The walk hands clusters out in guest order and gets them back in any order. It writes
/// them as they come back, the first in guest order first, while the workers inflate the
/// next ones, so inflation on every core overlaps the writes. Nothing waits for one late
/// cluster (a worker descheduled in the middle of it, say): the others are written and
/// their buffers go back to work. A fixed set of cluster buffers circulates between the two
/// sides, which bounds memory to [`INFLATE_BYTES_IN_FLIGHT`] (or two buffers per worker for
/// the largest clusters).
struct Inflater {
    jobs: crossbeam_channel::Sender<InflateJob>,
    done: crossbeam_channel::Receiver<InflateJob>,
    /// Buffers not in flight.
    free: Vec<ClusterBuffer>,
    /// Inflated clusters that came back and are not written yet, by position in guest order.
    arrived: std::collections::BTreeMap<u64, InflateJob>,
    next_seq: u64,
    /// Clusters submitted and not yet handed back by [`Self::next_inflated`].
    outstanding: usize,
}

impl Inflater {
    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        image: &'scope Qcow2Image<'scope>,
    ) -> Self {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let cluster = image.cluster_size();
        let slots = (INFLATE_BYTES_IN_FLIGHT / cluster).max(2 * workers as u64) as usize;
        let (jobs, queue) = crossbeam_channel::bounded::<InflateJob>(slots);
        let (finished, done) = crossbeam_channel::bounded::<InflateJob>(slots);

        for _ in 0..workers {
            let queue = queue.clone();
            let finished = finished.clone();
            scope.spawn(move || {
                let mut decompressor = Decompressor::new();
                for mut job in queue {
                    // A panic would lose the job and leave the walk waiting for it forever;
                    // it becomes the job's error instead.
                    let inflated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        image.decompress_cluster_with(
                            &mut decompressor,
                            &job.mapping,
                            job.buffer.as_mut_slice(),
                        )
                    }));
                    let len = job.mapping.len as usize;
                    job.has_zero_block = job.buffer.as_slice()[..len].chunks(BLOCK).any(is_zero);
                    job.result = match inflated {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(format!("the qcow2 image is invalid: {e}")),
                        Err(_) => Err("inflating a compressed cluster panicked".to_string()),
                    };
                    if finished.send(job).is_err() {
                        return;
                    }
                }
            });
        }

        Self {
            jobs,
            done,
            free: (0..slots)
                .map(|_| ClusterBuffer::new(cluster as usize))
                .collect(),
            arrived: std::collections::BTreeMap::new(),
            next_seq: 0,
            outstanding: 0,
        }
    }

    fn in_flight(&self) -> bool {
        self.outstanding > 0
    }

    /// Whether a buffer is free for another cluster.
    fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Queues `mapping` for inflation; needs [`Self::has_room`].
    fn submit(&mut self, mapping: Mapping) -> Result<(), String> {
        let buffer = self.free.pop().expect("submit needs a free buffer");
        let job = InflateJob {
            seq: self.next_seq,
            mapping,
            buffer,
            result: Ok(()),
            has_zero_block: false,
        };
        self.next_seq += 1;
        self.outstanding += 1;
        self.jobs
            .send(job)
            .map_err(|_| "the inflate workers stopped".to_string())
    }

    /// The first in guest order of the inflated clusters that came back, waiting for one if
    /// none did; `None` when nothing is in flight.
    fn next_inflated(&mut self) -> Result<Option<InflateJob>, String> {
        while let Ok(job) = self.done.try_recv() {
            self.arrived.insert(job.seq, job);
        }
        if self.arrived.is_empty() && self.in_flight() {
            let job = self
                .done
                .recv()
                .map_err(|_| "the inflate workers stopped".to_string())?;
            self.arrived.insert(job.seq, job);
        }
        let job = self.arrived.pop_first().map(|(_, job)| job);
        if job.is_some() {
            self.outstanding -= 1;
        }
        Ok(job)
    }

    fn recycle(&mut self, buffer: ClusterBuffer) {
        self.free.push(buffer);
    }
}

/// Walks a qcow2 image's mappings and writes them to the volume.
struct Qcow2Writer<'a, 'i> {
    target: &'a Target<'a>,
    image: &'a Qcow2Image<'i>,
    map: &'a Mmap,
    params: RefillParams<'a>,
    started: std::time::Instant,
    inflater: Inflater,
    stats: RefillStats,
    /// Guest offset past which [`Self::advance`] drops the whole mapping.
    next_release: u64,
    /// Inflated clusters without zero blocks, following each other in the guest, that wait
    /// to be written in one direct write.
    batch: Vec<InflateJob>,
    batch_bytes: usize,
}

/// Bytes of inflated clusters gathered into one write.
const BATCH_BYTES: usize = 4 << 20;

impl<'a, 'i> Qcow2Writer<'a, 'i> {
    fn new(
        target: &'a Target<'a>,
        image: &'a Qcow2Image<'i>,
        map: &'a Mmap,
        params: RefillParams<'a>,
        inflater: Inflater,
    ) -> Self {
        Self {
            target,
            image,
            map,
            params,
            started: std::time::Instant::now(),
            inflater,
            stats: RefillStats::default(),
            next_release: crate::qcow2::RELEASE_EVERY,
            batch: Vec::new(),
            batch_bytes: 0,
        }
    }

    fn add(&mut self, mapping: Mapping) -> Result<(), String> {
        check_cancel(self.params.cancel)?;
        match mapping.extent {
            Extent::Zero => {
                self.write_inflated()?;
                self.target.zero(mapping.guest_offset, mapping.len)?;
                self.advance(mapping.guest_offset + mapping.len);
            }
            Extent::Data { host_offset } => {
                self.write_inflated()?;
                self.write_data(&mapping, host_offset)?;
            }
            Extent::Compressed { .. } => {
                // Keep the workers' queue full: write only when every buffer is taken, so
                // they inflate while this thread waits on the disk.
                while !self.inflater.has_room() {
                    match self.inflater.next_inflated()? {
                        Some(job) => self.write_cluster(job)?,
                        // Every free buffer waits in the batch.
                        None => self.write_batch()?,
                    }
                }
                self.inflater.submit(mapping)?;
            }
        }
        Ok(())
    }

    /// Writes a data run window by window, releasing the mapping's pages behind it.
    fn write_data(&mut self, mapping: &Mapping, host_offset: u64) -> Result<(), String> {
        let bytes = self
            .image
            .host_bytes(mapping)
            .ok_or_else(|| "the qcow2 image maps data outside the file".to_string())?;
        let window = self.params.window;
        for start in (0..bytes.len()).step_by(window) {
            check_cancel(self.params.cancel)?;
            let end = (start + window).min(bytes.len());
            let guest = mapping.guest_offset + start as u64;
            self.stats.written += write_nonzero_runs(self.target, &bytes[start..end], guest)?;
            release(self.map, (host_offset as usize) + start, end - start);
            self.advance(guest + (end - start) as u64);
        }
        Ok(())
    }

    /// Writes every inflated cluster in flight and the batch: before a run that is not
    /// compressed, and at the end.
    fn write_inflated(&mut self) -> Result<(), String> {
        while let Some(job) = self.inflater.next_inflated()? {
            self.write_cluster(job)?;
        }
        self.write_batch()
    }

    /// Adds an inflated cluster to the batch, or writes it alone if it has zero blocks
    /// (those are destroyed rather than written) or cannot be written directly.
    fn write_cluster(&mut self, job: InflateJob) -> Result<(), String> {
        job.result.as_ref().map_err(Clone::clone)?;
        let mapping = &job.mapping;
        let bytes = &job.buffer.as_slice()[..mapping.len as usize];
        if let Extent::Compressed {
            host_offset,
            compressed_len,
            ..
        } = mapping.extent
        {
            release(self.map, host_offset as usize, compressed_len as usize);
        }

        let follows = match self.batch.last() {
            Some(last) => last.mapping.guest_offset + last.mapping.len == mapping.guest_offset,
            None => true,
        };
        let whole = !job.has_zero_block && Target::is_direct(bytes, mapping.guest_offset);
        if !follows || !whole {
            self.write_batch()?;
        }
        if !whole {
            self.stats.written += write_nonzero_runs(self.target, bytes, mapping.guest_offset)?;
            self.advance(mapping.guest_offset + mapping.len);
            self.inflater.recycle(job.buffer);
            return Ok(());
        }

        self.batch_bytes += bytes.len();
        self.batch.push(job);
        if self.batch_bytes >= BATCH_BYTES {
            self.write_batch()?;
        }
        Ok(())
    }

    /// Writes the batch of inflated clusters with one vectored write.
    fn write_batch(&mut self) -> Result<(), String> {
        let Some(first) = self.batch.first() else {
            return Ok(());
        };
        let offset = first.mapping.guest_offset;
        let runs: Vec<&[u8]> = self
            .batch
            .iter()
            .map(|job| &job.buffer.as_slice()[..job.mapping.len as usize])
            .collect();
        self.target.flush_zero()?;
        self.target
            .write_vectored(&runs, offset)
            .map_err(|e| format!("cannot write the volume at offset {offset}: {e}"))?;

        self.stats.written += self.batch_bytes as u64;
        let end = offset + self.batch_bytes as u64;
        self.batch_bytes = 0;
        for job in std::mem::take(&mut self.batch) {
            self.inflater.recycle(job.buffer);
        }
        self.advance(end);
        Ok(())
    }

    fn advance(&mut self, guest_end: u64) {
        // The walk reads L2 tables spread over the file, and the kernel maps the pages
        // around each page read: drop everything mapped now and then, whatever it was.
        if guest_end >= self.next_release {
            release(self.map, 0, self.map.len());
            self.next_release = guest_end + crate::qcow2::RELEASE_EVERY;
        }
        // Inflated clusters may be written a little out of order: progress never goes back.
        let done = self.stats.scanned.max(guest_end);
        self.stats.scanned = done;
        self.target
            .volume
            .refill_done
            .store(done, Ordering::Release);
        pace(self.started, done, self.params.rate_limit);
    }
}

/// Drops the mapping's pages of `[start, start + len)` from this process (page-aligned
/// inside), so a long refill does not accumulate the whole image in its resident set. Pages
/// still needed fault in again from the page cache.
pub fn release(map: &Mmap, start: usize, len: usize) {
    let page = 4096;
    let first = start.div_ceil(page) * page;
    let end = (start + len).min(map.len()) / page * page;
    if end > first {
        // SAFETY: the range lies inside our read-only file mapping; dropping its pages only
        // makes later accesses fault them in again from the file.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first)
        };
    }
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

/// Where a refill writes: the volume's backing file, through a second descriptor opened
/// with `O_DIRECT` where the file system allows it. Direct writes skip the page cache, so a
/// refill neither evicts the host's cache nor leaves gigabytes of dirty pages to flush at the
/// end; writes that are not page-aligned (an image's last partial block, small clusters) go
/// through the ordinary descriptor. Ranges to destroy are gathered and zeroed in one call
/// while they follow each other.
pub struct Target<'a> {
    volume: &'a VolumeFile,
    direct: Option<File>,
    pending_zero: std::cell::Cell<Option<(u64, u64)>>,
    /// The span of everything zeroed so far.
    zeroed: std::cell::Cell<Option<(u64, u64)>>,
}

impl<'a> Target<'a> {
    /// Opens the direct descriptor of `volume`'s backing file, if possible.
    pub fn new(volume: &'a VolumeFile) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = File::options()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(volume.backing_path())
            .ok();
        Self {
            volume,
            direct,
            pending_zero: std::cell::Cell::new(None),
            zeroed: std::cell::Cell::new(None),
        }
    }

    /// Whether `run` can be written at `offset` through an `O_DIRECT` descriptor.
    fn is_direct(run: &[u8], offset: u64) -> bool {
        const ALIGN: usize = PAGE as usize;
        run.as_ptr() as usize % ALIGN == 0 && run.len() % ALIGN == 0 && offset % PAGE == 0
    }

    fn write(&self, run: &[u8], offset: u64) -> std::io::Result<()> {
        match &self.direct {
            Some(direct) if Self::is_direct(run, offset) => direct.write_all_at(run, offset),
            _ => self.volume.backing().write_all_at(run, offset),
        }
    }

    /// Writes `runs` one after the other from `offset`, in one call when it can; every run
    /// must pass [`Self::is_direct`].
    fn write_vectored(&self, runs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;

        let file = self.direct.as_ref().unwrap_or(self.volume.backing());
        let iovecs: Vec<libc::iovec> = runs
            .iter()
            .map(|run| libc::iovec {
                iov_base: run.as_ptr() as *mut libc::c_void,
                iov_len: run.len(),
            })
            .collect();
        let count = iovecs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the iovecs describe live slices borrowed for the length of the call, and
        // pwritev only reads from them.
        let written =
            unsafe { libc::pwritev(file.as_raw_fd(), iovecs.as_ptr(), count, offset as i64) };
        let mut written = match usize::try_from(written) {
            Ok(written) => written,
            // Interrupted before anything was written: the runs go one by one below.
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
                0
            }
            Err(_) => return Err(std::io::Error::last_os_error()),
        };

        // What a short write (or the iovec limit) left over goes run by run.
        let mut at = offset;
        for run in runs {
            let done = written.min(run.len());
            written -= done;
            if done < run.len() {
                self.write(&run[done..], at + done as u64)?;
            }
            at += run.len() as u64;
        }
        Ok(())
    }

    /// Destroys `[offset, offset + len)`; adjacent ranges are zeroed in one call.
    fn zero(&self, offset: u64, len: u64) -> Result<(), String> {
        if len == 0 {
            return Ok(());
        }
        if let Some((start, end)) = self.pending_zero.get() {
            if end == offset {
                self.pending_zero.set(Some((start, offset + len)));
                return Ok(());
            }
        }
        self.flush_zero()?;
        self.pending_zero.set(Some((offset, offset + len)));
        Ok(())
    }

    fn flush_zero(&self) -> Result<(), String> {
        if let Some((start, end)) = self.pending_zero.take() {
            zero_range(self.volume.backing(), start, end - start)
                .map_err(|e| format!("cannot zero the volume at offset {start}: {e}"))?;
            let span = match self.zeroed.get() {
                Some((first, last)) => (first.min(start), last.max(end)),
                None => (start, end),
            };
            self.zeroed.set(Some(span));
        }
        Ok(())
    }

    /// Makes everything written durable.
    fn sync(&self) -> Result<(), String> {
        self.flush_zero()?;
        self.volume
            .backing()
            .sync_data()
            .map_err(|e| format!("cannot make the volume durable: {e}"))
    }
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

        let stats = refill_raw(&vol, &path, params(image.len() as u64, 8192, &NO_CANCEL)).unwrap();

        let mut content = vec![0u8; 64 * 1024];
        vol.read_at(&mut content, 0).unwrap();
        assert_eq!(&content[..image.len()], &image[..]);
        assert!(content[image.len()..].iter().all(|&b| b == 0));
        assert_eq!(stats.written, (BLOCK + 100) as u64);
    }

    #[test]
    fn changed_image_length_fails() {
        let (_dir, vol, path) = setup(8192, &[1u8; 4096]);
        let err = refill_raw(&vol, &path, params(5000, 4096, &NO_CANCEL)).unwrap_err();
        assert!(err.contains("changed on disk"), "{err}");
    }

    #[test]
    fn cancel_stops_the_refill() {
        let (_dir, vol, path) = setup(1 << 20, &[1u8; 1 << 20]);
        let cancel = AtomicBool::new(true);
        let err = refill_raw(&vol, &path, params(1 << 20, 4096, &cancel)).unwrap_err();
        assert!(err.contains("cancelled"), "{err}");
    }

    static NO_CANCEL: AtomicBool = AtomicBool::new(false);

    #[test]
    fn failure_reasons_fall_into_their_kinds() {
        let cases = [
            (
                "the refill was cancelled because volumed is stopping",
                "cancelled",
            ),
            (
                "the image became unreadable: it shrank during the refill",
                "image_changed",
            ),
            (
                "the image file is 1 bytes but 2 were uploaded: it changed on disk",
                "image_changed",
            ),
            (
                "the image's bytes differ from the bytes that were uploaded: the stored image \
                 is corrupt",
                "image_corrupt",
            ),
            ("the qcow2 image is invalid: bad magic", "image_invalid"),
            ("the qcow2 image is empty", "image_invalid"),
            (
                "image of 5 bytes does not fit the volume of 4 bytes",
                "image_invalid",
            ),
            (
                "cannot write the volume at offset 0: No space left",
                "volume_io",
            ),
            ("cannot make the volume durable: EIO", "volume_io"),
            ("cannot discard the volume at offset 4096: EIO", "volume_io"),
            ("cannot open image: No such file", "image_unreadable"),
            (
                "cannot map the image at offset 0: ENOMEM",
                "image_unreadable",
            ),
            ("cannot stat the image: EIO", "image_unreadable"),
            ("too many refills running at once", "other"),
            ("cannot start the refill: EAGAIN", "other"),
        ];
        for (reason, kind) in cases {
            assert_eq!(failure_kind(reason), kind, "{reason}");
        }
    }

    fn params(image_len: u64, window: usize, cancel: &AtomicBool) -> RefillParams<'_> {
        RefillParams {
            image_len,
            expected_hash: Expected::None,
            window,
            rate_limit: 0,
            cancel,
        }
    }

    #[test]
    fn corrupt_image_is_refused() {
        let (_dir, vol, path) = setup(8192, &[3u8; 4096]);
        let mut p = params(4096, 4096, &NO_CANCEL);
        p.expected_hash = Expected::Blocks(12345);
        let err = refill_raw(&vol, &path, p).unwrap_err();
        assert!(err.contains("corrupt"), "{err}");

        let mut xxh3 = xxhash_rust::xxh3::Xxh3::new();
        crate::verify::block_hash_update(&mut xxh3, 0, &[3u8; 4096]);
        p.expected_hash = Expected::Blocks(crate::verify::block_hash_digest(&xxh3, 4096));
        refill_raw(&vol, &path, p).unwrap();
    }

    /// Windows cover every byte of data, start on page boundaries, stay within the window
    /// size, and skip the holes, also with a partial last block and with no data at all.
    #[test]
    fn data_windows_cover_the_data_page_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = File::create(&path).unwrap();
        let len = (40 << 20) + 100;
        file.set_len(len).unwrap();
        let data = [(0u64, 4096usize), (3 << 20, 5 << 20), (len - 10, 10)];
        for &(at, size) in &data {
            file.write_all_at(&vec![7u8; size], at).unwrap();
        }
        let source = File::open(&path).unwrap();

        let windows: Vec<(u64, usize)> = DataWindows::new(&source, len, 1 << 20)
            .collect::<Result<_, _>>()
            .unwrap();
        for &(at, size) in &windows {
            assert_eq!(at % PAGE, 0, "{windows:?}");
            assert!(size <= 1 << 20, "{windows:?}");
            assert!(
                at + size as u64 == len || size as u64 % PAGE == 0,
                "{windows:?}"
            );
        }
        for &(at, size) in &data {
            let covered = (at..at + size as u64).step_by(512).all(|byte| {
                windows
                    .iter()
                    .any(|&(start, n)| (start..start + n as u64).contains(&byte))
            });
            assert!(covered, "data at {at} not covered: {windows:?}");
        }
        let read: u64 = windows.iter().map(|&(_, n)| n as u64).sum();
        assert!(read < 8 << 20, "holes were read: {windows:?}");

        let empty = dir.path().join("empty");
        File::create(&empty).unwrap().set_len(1 << 20).unwrap();
        let source = File::open(&empty).unwrap();
        assert_eq!(DataWindows::new(&source, 1 << 20, 1 << 20).count(), 0);
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
