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
use xxhash_rust::xxh3::Xxh3;

use crate::qcow2::{Decompressor, Extent, Mapping, Qcow2Image};
use crate::sigbus;
use crate::volume::{zero_range, VolumeFile};

/// Granularity of hole detection: the block size of the file systems we back volumes on.
const BLOCK: usize = 4096;

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
    /// The xxh3-128 of the stored bytes taken at upload; the refill checks the bytes it reads
    /// against it. `None` for images uploaded before hashes were recorded.
    pub expected_hash: Option<u128>,
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

/// The xxh3-128 of a whole stream, as [`RefillParams::expected_hash`] expects it.
pub fn new_hasher() -> Xxh3 {
    Xxh3::new()
}

fn check_hash(hasher: &Xxh3, expected: Option<u128>) -> Result<(), String> {
    match expected {
        Some(expected) if hasher.digest128() != expected => Err(
            "the image's bytes differ from the bytes that were uploaded: the stored image is \
             corrupt"
                .to_string(),
        ),
        _ => Ok(()),
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

    // Holes of a sparse image cost nothing: SEEK_DATA skips them (the hash takes their zeros
    // from memory), so the time follows the image's data, not its size.
    let mut stats = RefillStats::default();
    let mut hasher = new_hasher();
    let mut offset = 0u64;
    let started = std::time::Instant::now();
    while offset < image_len {
        check_cancel(cancel)?;
        let data = seek(&source, offset, libc::SEEK_DATA)?.unwrap_or(image_len);
        let data = (data / PAGE * PAGE).clamp(offset, image_len);
        hash_zeros(&mut hasher, data - offset);
        target.zero(offset, data - offset)?;
        offset = data;
        if offset == image_len {
            break;
        }

        let hole = seek(&source, offset, libc::SEEK_HOLE)?.unwrap_or(image_len);
        let len = (hole.min(image_len) - offset).clamp(1, window as u64) as usize;
        prefetch(&source, offset + len as u64, window);
        stats.written += refill_window(&target, &source, offset, len, &mut hasher)?;
        check_image_len(&source, image_len)?;

        offset += len as u64;
        stats.scanned = offset;
        volume.refill_done.store(offset, Ordering::Release);
        pace(started, offset, rate_limit);
    }
    stats.scanned = image_len;
    volume.refill_done.store(image_len, Ordering::Release);
    check_hash(&hasher, params.expected_hash)?;

    target.zero(image_len, volume.size() - image_len)?;
    target.sync()?;
    stats.zeroed = target.zeroed.get();
    Ok(stats)
}

const PAGE: u64 = 4096;

fn seek(source: &File, offset: u64, whence: i32) -> Result<Option<u64>, String> {
    crate::volume::seek(source, offset, whence)
        .map_err(|e| format!("cannot find the image's data: {e}"))
}

/// Feeds `len` zero bytes to `hasher` without touching the image.
fn hash_zeros(hasher: &mut Xxh3, mut len: u64) {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
    }
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
    hasher: &mut Xxh3,
) -> Result<u64, String> {
    // SAFETY: the mapping is read-only and private to this function. The file may shrink
    // under it; the SIGBUS guard registered below absorbs faults on vanished pages.
    let map = unsafe { MmapOptions::new().offset(offset).len(len).map(source) }
        .map_err(|e| format!("cannot map the image at offset {offset}: {e}"))?;
    let _ = map.advise(Advice::Sequential);
    let _ = map.advise(Advice::WillNeed);
    let guard = sigbus::Guard::register(map.as_ptr(), map.len())
        .ok_or_else(|| "too many refills running at once".to_string())?;

    hasher.update(&map);
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
/// The whole file is mapped (address space only) under one SIGBUS guard. First the stored
/// bytes are hashed window by window and compared with the upload's hash; then the image's
/// mappings are walked in guest order: zero and unallocated runs stay holes, data runs are
/// written straight from the mapping (zero blocks skipped), and compressed clusters are
/// inflated on every core by an [`Inflater`] while earlier ones are written in guest order.
/// Pages of the mapping are released (`MADV_DONTNEED`) as soon as they are used, and all of
/// it every 16 MiB of guest disk, so memory stays bounded.
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
    let shrank = || "the image became unreadable: it shrank during the refill".to_string();

    let mut hasher = new_hasher();
    for start in (0..map.len()).step_by(params.window) {
        let end = (start + params.window).min(map.len());
        hasher.update(&map[start..end]);
        release(&map, start, end - start);
    }
    check_hash(&hasher, params.expected_hash)?;

    let qcow2 = Qcow2Image::parse_releasing(&map, &|| release(&map, 0, map.len()))
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
        let mut writer = Qcow2Writer::new(&target, &qcow2, &map, params, inflater);
        for mapping in qcow2.mappings() {
            let mapping = mapping.map_err(|e| format!("the qcow2 image is invalid: {e}"))?;
            writer.add(mapping)?;
            if guard.faulted() {
                return Err(shrank());
            }
        }
        writer.write_inflated(true)?;
        Ok(writer.stats)
        // Dropping the writer closes the job queue; the scope then joins the workers.
    })?;
    target.zero(qcow2.virtual_size(), volume.size() - qcow2.virtual_size())?;
    check_image_len(&source, params.image_len)?;
    if guard.faulted() {
        return Err(shrank());
    }

    target.sync()?;
    Ok(RefillStats {
        zeroed: target.zeroed.get(),
        ..stats
    })
}

/// Bytes of inflated clusters in flight: bounds memory whatever the cluster size.
const INFLATE_BYTES_IN_FLIGHT: u64 = 16 << 20;

/// A compressed cluster on its way through the inflater, and then its inflated bytes.
struct InflateJob {
    /// Position in guest order; results are written in this order.
    seq: u64,
    mapping: Mapping,
    buffer: Vec<u8>,
    result: Result<(), String>,
}

/// Worker threads that inflate compressed clusters, one per core, fed through bounded
/// crossbeam channels.
///
/// The walk hands clusters out in guest order and gets them back in any order; it writes
/// them in guest order while the workers inflate the next ones, so inflation on every core
/// overlaps the writes. A fixed set of cluster buffers circulates between the two sides,
/// which bounds memory to [`INFLATE_BYTES_IN_FLIGHT`] (or two buffers per worker for
/// the largest clusters).
struct Inflater {
    jobs: crossbeam_channel::Sender<InflateJob>,
    done: crossbeam_channel::Receiver<InflateJob>,
    /// Buffers not in flight.
    free: Vec<Vec<u8>>,
    /// Inflated clusters that arrived ahead of their turn.
    arrived: std::collections::BTreeMap<u64, InflateJob>,
    next_seq: u64,
    next_to_write: u64,
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
                            &mut job.buffer,
                        )
                    }));
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
            free: (0..slots).map(|_| vec![0; cluster as usize]).collect(),
            arrived: std::collections::BTreeMap::new(),
            next_seq: 0,
            next_to_write: 0,
        }
    }

    fn in_flight(&self) -> bool {
        self.next_to_write < self.next_seq
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
        };
        self.next_seq += 1;
        self.jobs
            .send(job)
            .map_err(|_| "the inflate workers stopped".to_string())
    }

    /// The next cluster in guest order, waiting for it; `None` when nothing is in flight.
    fn next_in_order(&mut self) -> Result<Option<InflateJob>, String> {
        if !self.in_flight() {
            return Ok(None);
        }
        while !self.arrived.contains_key(&self.next_to_write) {
            let job = self
                .done
                .recv()
                .map_err(|_| "the inflate workers stopped".to_string())?;
            self.arrived.insert(job.seq, job);
        }
        let job = self
            .arrived
            .remove(&self.next_to_write)
            .expect("just checked");
        self.next_to_write += 1;
        Ok(Some(job))
    }

    /// The next cluster in guest order if it has already arrived.
    fn try_next_in_order(&mut self) -> Option<InflateJob> {
        while let Ok(job) = self.done.try_recv() {
            self.arrived.insert(job.seq, job);
        }
        let job = self.arrived.remove(&self.next_to_write)?;
        self.next_to_write += 1;
        Some(job)
    }

    fn recycle(&mut self, buffer: Vec<u8>) {
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
}

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
        }
    }

    fn add(&mut self, mapping: Mapping) -> Result<(), String> {
        check_cancel(self.params.cancel)?;
        match mapping.extent {
            Extent::Zero => {
                self.write_inflated(true)?;
                self.target.zero(mapping.guest_offset, mapping.len)?;
                self.advance(mapping.guest_offset + mapping.len);
            }
            Extent::Data { host_offset } => {
                self.write_inflated(true)?;
                self.write_data(&mapping, host_offset)?;
            }
            Extent::Compressed { .. } => {
                // Write what is ready first; wait only when every buffer is in flight.
                self.write_inflated(false)?;
                while !self.inflater.has_room() {
                    let job = self
                        .inflater
                        .next_in_order()?
                        .expect("buffers are in flight");
                    self.write_cluster(job)?;
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

    /// Writes inflated clusters in guest order: those already inflated, or with `all`,
    /// every one in flight (before a run that is not compressed, and at the end).
    fn write_inflated(&mut self, all: bool) -> Result<(), String> {
        loop {
            let job = if all {
                self.inflater.next_in_order()?
            } else {
                self.inflater.try_next_in_order()
            };
            match job {
                Some(job) => self.write_cluster(job)?,
                None => return Ok(()),
            }
        }
    }

    fn write_cluster(&mut self, job: InflateJob) -> Result<(), String> {
        job.result?;
        let mapping = &job.mapping;
        let len = mapping.len as usize;
        self.stats.written +=
            write_nonzero_runs(self.target, &job.buffer[..len], mapping.guest_offset)?;
        if let Extent::Compressed {
            host_offset,
            compressed_len,
            ..
        } = mapping.extent
        {
            release(self.map, host_offset as usize, compressed_len as usize);
        }
        self.advance(mapping.guest_offset + mapping.len);
        self.inflater.recycle(job.buffer);
        Ok(())
    }

    fn advance(&mut self, guest_end: u64) {
        // The walk reads L2 tables spread over the file, and the kernel maps the pages
        // around each page read: drop everything mapped now and then, whatever it was.
        if guest_end >= self.next_release {
            release(self.map, 0, self.map.len());
            self.next_release = guest_end + crate::qcow2::RELEASE_EVERY;
        }
        self.stats.scanned = guest_end;
        self.target
            .volume
            .refill_done
            .store(guest_end, Ordering::Release);
        pace(self.started, guest_end, self.params.rate_limit);
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

    fn write(&self, run: &[u8], offset: u64) -> std::io::Result<()> {
        const ALIGN: usize = 4096;
        let aligned = run.as_ptr() as usize % ALIGN == 0
            && run.len() % ALIGN == 0
            && offset % ALIGN as u64 == 0;
        match &self.direct {
            Some(direct) if aligned => direct.write_all_at(run, offset),
            _ => self.volume.backing().write_all_at(run, offset),
        }
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
            expected_hash: None,
            window,
            rate_limit: 0,
            cancel,
        }
    }

    #[test]
    fn corrupt_image_is_refused() {
        let (_dir, vol, path) = setup(8192, &[3u8; 4096]);
        let mut p = params(4096, 4096, &NO_CANCEL);
        p.expected_hash = Some(12345);
        let err = refill_raw(&vol, &path, p).unwrap_err();
        assert!(err.contains("corrupt"), "{err}");

        let mut hasher = new_hasher();
        hasher.update(&[3u8; 4096]);
        p.expected_hash = Some(hasher.digest128());
        refill_raw(&vol, &path, p).unwrap();
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
