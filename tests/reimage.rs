//! Re-image correctness and robustness: what every reader sees after a re-image and from the
//! moment it is reported finished (C1), that no old byte survives (C2), that failures end in
//! `error` and never kill the daemon (C3), restart after a crash and single instance (C4), a
//! full backing store (C7), the fence that holds a volume's I/O during a refill, and SIGTERM
//! during a refill.

mod common;

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A hang check, not a benchmark: anything that should answer at once must within this.
const PROMPT: Duration = Duration::from_secs(2);

// ----- helpers ------------------------------------------------------------------------------

/// A path quoted for `sh`.
fn q(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// Runs `f` on its own thread and fails the test if it does not return within `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not finish within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// Polls `cond` every 20 ms until it holds; fails after `limit`.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a shell command and returns its output and how long it took.
fn timed_sh(script: &str) -> (Output, Duration) {
    let started = Instant::now();
    let out = sh(script);
    (out, started.elapsed())
}

/// Asserts a shell command succeeded promptly; returns its stdout.
fn sh_prompt(script: &str) -> String {
    let (out, took) = timed_sh(script);
    assert!(
        out.status.success(),
        "command failed ({}): {script}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < PROMPT, "`{script}` took {took:?} (hang check)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim().chars().next());
            state.is_some_and(|s| s != 'Z' && s != 'X')
        }
        Err(_) => false,
    }
}

/// The volume's backing file in the state directory.
fn backing_path(daemon: &Daemon, view: &Value) -> PathBuf {
    let id = view["id"].as_str().expect("volume id");
    daemon.state.join("volumes").join(format!("{id}.raw"))
}

/// Checks `total` bytes read through `read` against `image` followed by zeros.
fn expect_image_then_zeros(
    what: &str,
    total: u64,
    image: &[u8],
    mut read: impl FnMut(u64, &mut [u8]) -> io::Result<usize>,
) {
    let mut buf = vec![0u8; 4 * MIB as usize];
    let zeros = vec![0u8; buf.len()];
    let mut offset = 0u64;
    while offset < total {
        let len = (total - offset).min(buf.len() as u64) as usize;
        let n = read(offset, &mut buf[..len])
            .unwrap_or_else(|e| panic!("{what}: read at {offset} failed: {e}"));
        assert!(n > 0, "{what}: unexpected end at {offset} of {total}");

        // Slice comparisons (memcmp) first; the byte loop only runs to name a mismatch.
        let start = offset as usize;
        let image_start = start.min(image.len());
        let in_image = (image.len() - image_start).min(n);
        let matches = buf[..in_image] == image[image_start..image_start + in_image]
            && buf[in_image..n] == zeros[..n - in_image];
        if !matches {
            for (i, &byte) in buf[..n].iter().enumerate() {
                let want = image.get(start + i).copied().unwrap_or(0);
                assert_eq!(
                    byte,
                    want,
                    "{what}: byte at offset {} is {byte:#04x}, the new content has {want:#04x}",
                    start + i
                );
            }
        }
        offset += n as u64;
    }
}

/// Writes `chunk` over and over into the first `len` bytes of `file`, durably.
fn fill_with(chunk: &Path, file: &Path, len: u64) {
    let chunk_mib = std::fs::metadata(chunk).unwrap().len() / MIB;
    sh_ok(&format!(
        "for i in $(seq 0 {last}); do timeout 60 dd if={c} of={f} bs=1M seek=$((i * {chunk_mib})) \
         conv=notrunc status=none || exit 1; done; timeout 60 sync {f}",
        last = len / MIB / chunk_mib - 1,
        c = q(chunk),
        f = q(file),
    ));
}

/// Fills the first `len` bytes of `file` (a multiple of 1 MiB) with 0xAA, durably.
fn fill_aa(file: &Path, len: u64) {
    sh_ok(&format!(
        "tr '\\000' '\\252' < /dev/zero | timeout 120 dd of={} bs=1M count={} \
         iflag=fullblock conv=notrunc,fsync status=none",
        q(file),
        len / MIB
    ));
}

/// Shorthand for a volume's `reimage` sub-view field.
fn reimage_field<'a>(view: &'a Value, field: &str) -> &'a Value {
    &view["reimage"][field]
}

/// Starts a re-image and waits until its refill has visibly begun (the fence is up).
fn start_reimage(daemon: &Daemon, volume: &str, image_id: &str) {
    let r = daemon.reimage(volume, image_id, false);
    assert_eq!(r.status, 202, "reimage: {}", r.text());
    wait_until(Duration::from_secs(20), "the refill to start", || {
        let view = daemon.volume(volume);
        assert_eq!(
            view["status"], "downloading",
            "refill ended too early: {view}"
        );
        reimage_field(&view, "bytes_done").as_u64().unwrap_or(0) > 0
    });
}

/// A loop device attached by the test; detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Self {
        let dev = sh_ok(&format!("timeout 30 losetup -f --show {}", q(file)));
        Self(dev.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = sh(&format!("timeout 30 losetup -d {}", self.0));
    }
}

/// A file system mounted by the test; unmounted (lazily as a last resort) on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let dir = q(&self.0);
        let _ = sh(&format!(
            "timeout 30 umount {dir} 2>/dev/null || timeout 30 umount -l {dir}"
        ));
    }
}

/// A helper process started by the test; killed by pid and reaped on drop.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGCONT on drop, so a failing test never leaves a daemon stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill on the pid of a daemon this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// A read-only mapping of a file; unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain read-only memory owned by this value alone.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` with `flags` (MAP_PRIVATE or MAP_SHARED).
    fn new(file: &File, len: usize, prot: i32, flags: i32) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh mapping chosen by the kernel; the result is checked below.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mapped in `new`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A page-aligned buffer for O_DIRECT reads.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: a non-zero size with a valid alignment; the result is checked.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, layout }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for `layout.size()` bytes and borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Touches every page of a mapping so the kernel caches it.
fn touch_pages(bytes: &[u8]) -> u64 {
    bytes.iter().step_by(4096).map(|&b| u64::from(b)).sum()
}

// ----- C1 -----------------------------------------------------------------------------------

/// How much of the volume the mappings cover: the image and the old data well past its end.
const MAPPED: usize = 128 << 20;

/// C1: after a re-image every reader, cached or not, sees the image then zeros; MAP_SHARED
/// fails at once.
#[test]
fn every_reader_sees_only_the_new_image_without_dropping_caches() {
    require("losetup");
    require("cmp");
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let v = daemon.vol("vol1");

    // Old content A over the whole volume, durable: a 64 MiB random block, repeated.
    let chunk = daemon.dir.path().join("a64m");
    random_file(&chunk, 64 * MIB as usize, 10);
    fill_with(&chunk, &v, GIB);

    // Caches full of A: an open buffered descriptor, a private mapping, a loop device.
    let mut old_fd = File::open(&v).unwrap();
    let mut head_a = vec![0u8; MIB as usize];
    old_fd.read_exact(&mut head_a).unwrap();
    let mut sink = vec![0u8; 4 * MIB as usize];
    while old_fd.read(&mut sink).unwrap() > 0 {}
    let old_map = Mapping::new(&old_fd, MAPPED, libc::PROT_READ, libc::MAP_PRIVATE)
        .expect("a private mapping of a volume works");
    touch_pages(old_map.bytes());
    assert_eq!(
        &old_map.bytes()[..MIB as usize],
        &head_a[..],
        "mapping shows A"
    );
    let looped = Loop::attach(&v);
    sh_ok(&format!(
        "timeout 120 dd if={} of=/dev/null bs=1M count={} status=none",
        looped.0,
        MAPPED as u64 / MIB
    ));
    let mut loop_head = vec![0u8; MIB as usize];
    File::open(&looped.0)
        .unwrap()
        .read_exact(&mut loop_head)
        .unwrap();
    assert_eq!(loop_head, head_a, "the loop device shows A");
    let direct_fd = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&v)
        .unwrap();
    let mut aligned = Aligned::new(MIB as usize);
    let n = direct_fd.read_at(aligned.bytes_mut(), 0).unwrap();
    assert_eq!(&aligned.bytes_mut()[..n], &head_a[..], "O_DIRECT shows A");

    // Image B, smaller than the volume; a reference of the whole volume: B then zeros.
    let b_path = daemon.dir.path().join("b.img");
    random_file(&b_path, 8 * MIB as usize, 11);
    let b = std::fs::read(&b_path).unwrap();
    let reference = daemon.dir.path().join("expected.raw");
    sh_ok(&format!(
        "cp {} {r} && truncate -s 1G {r}",
        q(&b_path),
        r = q(&reference)
    ));
    let image = daemon.import_image(&b_path, "b");
    daemon.reimage_and_wait("vol1", &image);

    // The descriptor opened before the re-image.
    let b_for_fd = b.clone();
    within(
        Duration::from_secs(60),
        "reading the old descriptor",
        move || {
            expect_image_then_zeros("old descriptor", GIB, &b_for_fd, |off, buf| {
                old_fd.read_at(buf, off)
            });
        },
    );

    // The private mapping made before the re-image: its clean pages were invalidated.
    let b_for_map = b.clone();
    within(
        Duration::from_secs(60),
        "reading the old mapping",
        move || {
            let bytes = old_map.bytes();
            expect_image_then_zeros(
                "old private mapping",
                MAPPED as u64,
                &b_for_map,
                |off, buf| {
                    let start = off as usize;
                    buf.copy_from_slice(&bytes[start..start + buf.len()]);
                    Ok(buf.len())
                },
            );
        },
    );

    // The O_DIRECT descriptor opened before the re-image.
    let b_for_direct = b.clone();
    within(
        Duration::from_secs(60),
        "reading the old O_DIRECT descriptor",
        move || {
            let mut aligned = Aligned::new(4 * MIB as usize);
            expect_image_then_zeros("old O_DIRECT descriptor", GIB, &b_for_direct, |off, buf| {
                let n = direct_fd.read_at(&mut aligned.bytes_mut()[..buf.len()], off)?;
                buf[..n].copy_from_slice(&aligned.bytes_mut()[..n]);
                Ok(n)
            });
        },
    );

    // New buffered and O_DIRECT reads, and the loop device attached before.
    let r = q(&reference);
    sh_ok(&format!("timeout 120 cmp {} {r}", q(&v)));
    sh_ok(&format!(
        "timeout 120 dd if={} iflag=direct bs=4M status=none | timeout 120 cmp - {r}",
        q(&v)
    ));
    sh_ok(&format!(
        "timeout 120 dd if={} bs=1M status=none | timeout 120 cmp - {r}",
        looped.0
    ));

    // A new private mapping.
    let b_for_new = b.clone();
    let path = v.clone();
    within(
        Duration::from_secs(60),
        "reading a new mapping",
        move || {
            let file = File::open(&path).unwrap();
            let map = Mapping::new(&file, MAPPED, libc::PROT_READ, libc::MAP_PRIVATE)
                .expect("a new private mapping");
            let bytes = map.bytes();
            expect_image_then_zeros(
                "new private mapping",
                MAPPED as u64,
                &b_for_new,
                |off, buf| {
                    let start = off as usize;
                    buf.copy_from_slice(&bytes[start..start + buf.len()]);
                    Ok(buf.len())
                },
            );
        },
    );

    // A shared mapping fails at once with ENODEV (direct I/O files keep no shared cache).
    let path = v.clone();
    let errors = within(PROMPT, "a shared mmap", move || {
        let ro = File::open(&path).unwrap();
        let rw = File::options().read(true).write(true).open(&path).unwrap();
        let shared_ro = Mapping::new(&ro, MIB as usize, libc::PROT_READ, libc::MAP_SHARED);
        let shared_rw = Mapping::new(
            &rw,
            MIB as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        );
        [shared_ro.err(), shared_rw.err()].map(|e| e.and_then(|e| e.raw_os_error()))
    });
    assert_eq!(
        errors,
        [Some(libc::ENODEV), Some(libc::ENODEV)],
        "MAP_SHARED (read-only, read-write) must fail with ENODEV"
    );
    drop(looped);
}

/// C1: the moment the API reports a re-image finished, cached readers (a loop device, a
/// private mapping) already see the new image, in every one of many rounds.
#[test]
fn reimage_is_reported_finished_only_after_caches_are_invalidated() {
    require("losetup");
    const ROUNDS: usize = 20;
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let v = daemon.vol("vol1");
    let looped = Loop::attach(&v);

    // Two 1 MiB images, re-imaged in turn so each round changes the first page.
    let images: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| {
            let path = daemon.dir.path().join(format!("img{i}"));
            random_file(&path, MIB as usize, 200 + i);
            let id = daemon.import_image(&path, &format!("img{i}"));
            (id, std::fs::read(&path).unwrap())
        })
        .collect();

    let loop_fd = File::open(&looped.0).unwrap();
    let vol_fd = File::open(&v).unwrap();
    let map = Mapping::new(&vol_fd, MIB as usize, libc::PROT_READ, libc::MAP_PRIVATE).unwrap();
    let socket = daemon.socket.clone();
    let stale = within(Duration::from_secs(120), "the re-image rounds", move || {
        let headers = [
            ("Content-Type", "application/json"),
            ("OpenStack-API-Version", "volume 3.71"),
        ];
        let mut stale = Vec::new();
        let mut page = vec![0u8; 4096];
        for round in 0..ROUNDS {
            let (id, data) = &images[round % 2];

            // Both caches hold the current content.
            loop_fd.read_at(&mut page, 0).unwrap();
            touch_pages(map.bytes());

            let body = format!(r#"{{"os-reimage": {{"image_id": "{id}"}}}}"#);
            let r = http(
                &socket,
                "POST",
                "/v3/volumes/vol1/action",
                &headers,
                body.as_bytes(),
            );
            assert_eq!(r.status, 202, "reimage: {}", r.text());
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let view = http(&socket, "GET", "/v3/volumes/vol1", &headers, b"").json();
                if view["volume"]["status"] != "downloading" {
                    assert_eq!(view["volume"]["reimage"]["state"], "succeeded", "{view}");
                    break;
                }
                assert!(Instant::now() < deadline, "re-image still running: {view}");
            }

            // At once: what a client that waited for completion reads.
            loop_fd.read_at(&mut page, 0).unwrap();
            if page[..] != data[..4096] {
                stale.push((round, "loop device"));
            }
            if map.bytes()[..4096] != data[..4096] {
                stale.push((round, "private mapping"));
            }
        }
        stale
    });
    assert!(
        stale.is_empty(),
        "stale reads right after the API reported the re-image finished \
         (round, reader): {stale:?}"
    );
    drop(looped);
}

// ----- C2 -----------------------------------------------------------------------------------

/// C2: a sparse 100 MiB image is stored sparse; on a 1 GiB volume full of 0xAA it leaves the
/// image then zeros, and the backing file keeps the image's holes.
#[test]
fn smaller_sparse_image_leaves_no_old_byte_and_keeps_holes() {
    require("cmp");
    let daemon = Daemon::start();
    let view = daemon.create_volume("vol1", 1);
    let v = daemon.vol("vol1");
    let backing = backing_path(&daemon, &view);

    // Fill the whole volume with 0xAA.
    fill_aa(&v, 1024 * MIB);
    for offset in [0, 512 * MIB, GIB - 4096] {
        assert!(read_direct(&v, offset, 4096).iter().all(|&b| b == 0xaa));
    }
    let dense = std::fs::metadata(&backing).unwrap().blocks() * 512;
    assert!(
        dense >= GIB - 16 * MIB,
        "the fill reached the backing file: {dense} bytes"
    );

    // The image: 100 MiB of holes with 4 MiB of random data at 48 MiB; a twin as reference.
    let dir = daemon.dir.path();
    let data = dir.join("data4m");
    random_file(&data, 4 * MIB as usize, 22);
    for name in ["sparse.img", "reference.img"] {
        sh_ok(&format!(
            "truncate -s 100M {f} && dd if={} of={f} bs=1M seek=48 conv=notrunc status=none",
            q(&data),
            f = q(&dir.join(name))
        ));
    }
    let image = daemon.import_image(&dir.join("sparse.img"), "sparse");

    // The upload streamed 100 MiB, zeros included; the stored copy keeps only the data.
    let stored = daemon.state.join("images").join(format!("{image}.img"));
    let stored_meta = std::fs::metadata(&stored).unwrap();
    assert_eq!(stored_meta.len(), 100 * MIB);
    assert!(
        stored_meta.blocks() * 512 <= 8 * MIB,
        "the stored image has {} bytes allocated for 4 MiB of data",
        stored_meta.blocks() * 512
    );
    daemon.reimage_and_wait("vol1", &image);

    // The image byte for byte, then zeros to the end: no 0xAA anywhere.
    let image_len = 100 * MIB;
    sh_ok(&format!(
        "timeout 120 cmp -n {image_len} {} {}",
        q(&v),
        q(&dir.join("reference.img"))
    ));
    sh_ok(&format!(
        "timeout 120 cmp -i {image_len}:0 -n {} {} /dev/zero",
        GIB - image_len,
        q(&v)
    ));
    sh_ok(&format!(
        "timeout 120 dd if={} iflag=direct bs=4M status=none | timeout 120 cmp -n {image_len} - {}",
        q(&v),
        q(&dir.join("reference.img"))
    ));

    // The holes are holes in the backing file too, once the blocks of the destroyed content
    // are given back behind the re-image.
    daemon.wait_space_reclaimed("vol1");
    let allocated = std::fs::metadata(&backing).unwrap().blocks() * 512;
    assert!(
        allocated <= 16 * MIB,
        "backing file {} has {allocated} bytes allocated for 4 MiB of data",
        backing.display()
    );
}

/// The old content reads as zeros as soon as a re-image succeeds; its blocks are given back
/// behind it while I/O goes on, and a re-image accepted during that reclaim ends exact.
#[test]
fn destroyed_content_reads_as_zeros_at_once_and_its_blocks_are_given_back_after() {
    require("cmp");
    let daemon = Daemon::start();
    let view = daemon.create_volume("vol1", 1);
    let v = daemon.vol("vol1");
    let backing = backing_path(&daemon, &view);
    fill_aa(&v, 1024 * MIB);

    let dir = daemon.dir.path();
    let (first, second) = (dir.join("first.img"), dir.join("second.img"));
    random_file(&first, 8 * MIB as usize, 31);
    random_file(&second, 8 * MIB as usize, 32);
    let first_id = daemon.import_image(&first, "first");
    let second_id = daemon.import_image(&second, "second");

    // The second re-image is asked for right after the first succeeds, while the first's
    // reclaim is punching the 0xAA blocks.
    daemon.reimage_and_wait("vol1", &first_id);
    daemon.reimage_and_wait("vol1", &second_id);

    // Read at once, during the second reclaim: the image, then zeros; no 0xAA anywhere.
    sh_ok(&format!(
        "timeout 120 dd if={} iflag=direct bs=4M status=none | timeout 120 cmp -n {} - {}",
        q(&v),
        8 * MIB,
        q(&second)
    ));
    sh_ok(&format!(
        "timeout 120 cmp -i {}:0 -n {} {} /dev/zero",
        8 * MIB,
        GIB - 8 * MIB,
        q(&v)
    ));

    let view = daemon.wait_space_reclaimed("vol1");
    assert_eq!(view["reimage"]["image_id"], second_id.as_str(), "{view}");
    let allocated = std::fs::metadata(&backing).unwrap().blocks() * 512;
    assert!(
        allocated <= 16 * MIB,
        "backing file has {allocated} bytes allocated for 8 MiB of data"
    );
    sh_ok(&format!(
        "timeout 120 cmp -n {} {} {}",
        8 * MIB,
        q(&v),
        q(&second)
    ));
}

/// A reclaim that a stop cut short resumes at the next start: blocks that read as zeros are
/// given back, the image's data stays, and `space_reclaimed_at` is set.
#[test]
fn space_reclaim_cut_short_by_a_stop_resumes_at_the_next_start() {
    require("cmp");
    require("fallocate");
    let mut daemon = Daemon::start();
    let view = daemon.create_volume("vol1", 1);
    let backing = backing_path(&daemon, &view);
    let image = daemon.dir.path().join("image");
    random_file(&image, 4 * MIB as usize, 41);
    let image_id = daemon.import_image(&image, "image");
    daemon.reimage_and_wait("vol1", &image_id);
    daemon.wait_space_reclaimed("vol1");
    assert!(daemon.stop().success());

    // What a cut-short reclaim leaves: zeroed but allocated blocks (unwritten extents), and
    // a succeeded re-image without `space_reclaimed_at`.
    sh_ok(&format!(
        "fallocate -z -o {} -l {} {}",
        8 * MIB,
        512 * MIB,
        q(&backing)
    ));
    let allocated = std::fs::metadata(&backing).unwrap().blocks() * 512;
    assert!(allocated >= 512 * MIB, "{allocated}");
    let state_file = daemon.state.join("state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let id = view["id"].as_str().unwrap();
    state["volumes"][id]["reimage"]["space_reclaimed_at"] = Value::Null;
    std::fs::write(&state_file, serde_json::to_vec(&state).unwrap()).unwrap();

    daemon.spawn_and_wait();
    let view = daemon.wait_space_reclaimed("vol1");
    assert_eq!(view["status"], "available", "{view}");
    let allocated = std::fs::metadata(&backing).unwrap().blocks() * 512;
    assert!(allocated <= 16 * MIB, "{allocated} bytes still allocated");
    let v = daemon.vol("vol1");
    sh_ok(&format!(
        "timeout 60 cmp -n {} {} {}",
        4 * MIB,
        q(&v),
        q(&image)
    ));
    sh_ok(&format!(
        "timeout 60 cmp -i {}:0 -n {} {} /dev/zero",
        4 * MIB,
        GIB - 4 * MIB,
        q(&v)
    ));
}

// ----- C3 -----------------------------------------------------------------------------------

/// C3a: an image that shrinks during the refill ends the volume in `error` with a reason; the
/// daemon lives on and serves every other volume, and the failed volume answers at once.
#[test]
fn shrinking_image_ends_error_and_daemon_keeps_serving() {
    let daemon = Daemon::start_with("refill_rate_limit = 4\nrefill_window_mib = 1");
    daemon.create_volume("vol1", 1);
    daemon.create_volume("vol2", 1);
    let dir = daemon.dir.path();
    let other = dir.join("other");
    random_file(&other, 4 * MIB as usize, 31);
    sh_ok(&format!(
        "timeout 30 dd if={} of={} bs=1M conv=notrunc,fsync status=none",
        q(&other),
        q(&daemon.vol("vol2"))
    ));

    let img = dir.join("shrinks.img");
    random_file(&img, 16 * MIB as usize, 32);
    let image = daemon.import_image(&img, "shrinks");
    let stored = daemon.state.join("images").join(format!("{image}.img"));
    assert!(stored.exists(), "stored image at {}", stored.display());

    // Truncate the stored image about a second into the refill.
    start_reimage(&daemon, "vol1", &image);
    std::thread::sleep(Duration::from_millis(800));
    let view = daemon.volume("vol1");
    assert_eq!(view["status"], "downloading", "still refilling: {view}");
    sh_ok(&format!("truncate -s 2M {}", q(&stored)));

    // Meanwhile the other volumes and the API work.
    daemon.create_volume("during", 1);
    sh_prompt(&format!(
        "timeout 10 dd if={} bs=1M count=4 iflag=direct status=none | cmp - {}",
        q(&daemon.vol("vol2")),
        q(&other)
    ));

    let view = daemon.wait_reimage("vol1", Duration::from_secs(60));
    assert_eq!(view["status"], "error", "{view}");
    assert_eq!(reimage_field(&view, "state"), "failed", "{view}");
    let message = reimage_field(&view, "message").as_str().unwrap_or("");
    assert!(
        message.contains("image"),
        "a failed re-image says why: {view}"
    );
    let reason = view["status_reason"].as_str().unwrap_or("");
    assert!(!reason.is_empty(), "an error volume says why: {view}");

    // No crash (a SIGBUS would have killed it): the same process answers, the mount lives.
    assert!(
        pid_alive(daemon.pid()),
        "volumed died:\n{}",
        daemon.log_text()
    );
    assert_eq!(daemon.mount_entries(), 1);

    // vol1 answers at once, with its content discarded rather than half an image.
    sh_prompt(&format!(
        "timeout 10 dd if={} bs=1M count=16 iflag=direct status=none | cmp -n {} - /dev/zero",
        q(&daemon.vol("vol1")),
        16 * MIB
    ));
    sh_prompt(&format!(
        "timeout 10 dd if={} bs=1M count=1 status=none | wc -c | grep -qx 1048576",
        q(&daemon.vol("vol1"))
    ));

    // Every other volume and the API keep working afterwards.
    daemon.create_volume("after", 1);
    sh_prompt(&format!(
        "timeout 10 dd if={} of={} bs=1M seek=100 conv=notrunc,fsync status=none",
        q(&other),
        q(&daemon.vol("after"))
    ));
    sh_prompt(&format!(
        "timeout 10 dd if={} bs=1M skip=100 count=4 status=none | cmp - {}",
        q(&daemon.vol("after")),
        q(&other)
    ));
    sh_prompt(&format!(
        "timeout 10 cmp -n {} {} {}",
        4 * MIB,
        q(&daemon.vol("vol2")),
        q(&other)
    ));
    assert!(
        pid_alive(daemon.pid()),
        "volumed died:\n{}",
        daemon.log_text()
    );
}

/// C3b: SIGKILL during a refill comes back `error` with the content discarded, and a new
/// re-image from `error` succeeds (the status stays `error`, as in Cinder).
#[test]
fn sigkill_during_refill_restarts_in_error_and_reimage_from_error_succeeds() {
    let mut daemon = Daemon::start_with("refill_rate_limit = 2\nrefill_window_mib = 1");
    daemon.create_volume("vol1", 1);
    let v = daemon.vol("vol1");
    fill_aa(&v, 128 * MIB);

    let dir = daemon.dir.path().to_path_buf();
    let big = dir.join("big.img");
    random_file(&big, 8 * MIB as usize, 41);
    let big_id = daemon.import_image(&big, "big");
    let small = dir.join("small.img");
    random_file(&small, 4 * MIB as usize, 42);
    let small_id = daemon.import_image(&small, "small");

    start_reimage(&daemon, "vol1", &big_id);
    daemon.kill9();
    daemon.spawn_and_wait();

    // Never `downloading` again: `error` with a reason, content discarded.
    let view = daemon.volume("vol1");
    assert_eq!(view["status"], "error", "{view}");
    let reason = view["status_reason"].as_str().unwrap_or("");
    assert!(!reason.is_empty(), "the error says why: {view}");
    assert_eq!(reimage_field(&view, "state"), "failed", "{view}");
    assert!(
        reimage_field(&view, "message")
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{view}"
    );
    sh_ok(&format!("timeout 120 cmp -n {GIB} {} /dev/zero", q(&v)));

    // A re-image from `error` succeeds; Cinder keeps the previous status.
    let view = daemon.reimage_and_wait("vol1", &small_id);
    assert_eq!(view["status"], "error", "{view}");
    sh_ok(&format!(
        "timeout 60 cmp -n {} {} {}",
        4 * MIB,
        q(&v),
        q(&small)
    ));
    sh_ok(&format!(
        "timeout 120 cmp -i {}:0 -n {} {} /dev/zero",
        4 * MIB,
        GIB - 4 * MIB,
        q(&v)
    ));
}

// ----- C4 -----------------------------------------------------------------------------------

/// C4: a daemon killed while its files are held open restarts: the dead mount is detached,
/// mounted once, the stale socket replaced, fsync'd data intact.
#[test]
fn restart_after_sigkill_with_open_files_detaches_dead_mount_and_keeps_data() {
    require("losetup");
    let mut daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    daemon.create_volume("vol2", 1);
    let (v1, v2) = (daemon.vol("vol1"), daemon.vol("vol2"));
    let dir = daemon.dir.path().to_path_buf();
    let (d1, d2) = (dir.join("d1"), dir.join("d2"));
    random_file(&d1, 4 * MIB as usize, 51);
    random_file(&d2, 4 * MIB as usize, 52);
    sh_ok(&format!(
        "timeout 30 dd if={} of={} bs=1M conv=notrunc,fsync status=none && \
         timeout 30 dd if={} of={} bs=1M seek=300 conv=notrunc,fsync status=none",
        q(&d1),
        q(&v1),
        q(&d2),
        q(&v2)
    ));

    // A process holding vol1 open, and a loop device on vol2.
    let holder = Helper(
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3<{}; exec sleep 120", q(&v1)))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let fd3 = format!("/proc/{}/fd/3", holder.0.id());
    wait_until(Duration::from_secs(10), "the holder to open vol1", || {
        std::fs::read_link(&fd3).is_ok_and(|p| p == v1)
    });
    let looped = Loop::attach(&v2);
    let held = File::open(&v1).unwrap();

    // A `stat` of the mount just before the crash, as any monitoring does: the kernel may
    // answer the next ones from its attribute cache, so "dead" must not be decided by stat.
    std::fs::metadata(&daemon.mnt).unwrap();
    std::fs::metadata(&daemon.mnt).unwrap();
    daemon.kill9();

    // The dead mount: every request that reaches it gives ENOTCONN; the socket is stale.
    let mut buf = [0u8; 4096];
    let errors = [
        held.read_at(&mut buf, 0).map(drop),
        File::open(&v2).map(drop),
        std::fs::read_dir(&daemon.mnt).map(drop),
    ];
    for err in errors {
        let err = err.expect_err("the mount is dead");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    }
    assert_eq!(daemon.mount_entries(), 1, "the dead mount is still listed");
    assert!(daemon.socket.exists(), "the stale socket file is left");
    assert!(std::os::unix::net::UnixStream::connect(&daemon.socket).is_err());

    // Restart at once, as systemd's Restart= does.
    daemon.spawn_and_wait();

    assert_eq!(daemon.mount_entries(), 1, "mounted exactly once");
    let r = daemon.api("GET", "/v3/volumes", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let names: Vec<String> = r.json()["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"vol1".into()) && names.contains(&"vol2".into()),
        "{names:?}"
    );
    assert_eq!(daemon.status("vol1"), "available");
    sh_ok(&format!(
        "timeout 30 cmp -n {} {} {}",
        4 * MIB,
        q(&v1),
        q(&d1)
    ));
    sh_ok(&format!(
        "timeout 30 dd if={} bs=1M skip=300 count=4 status=none | timeout 30 cmp - {}",
        q(&v2),
        q(&d2)
    ));
    drop(held);
    drop(looped);
    drop(holder);
}

/// Names, sizes and modification times of every file under `dir`.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, i64, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            }
            out.push((entry.path(), meta.len(), meta.mtime(), meta.mtime_nsec()));
        }
    }
    out.sort();
    out
}

/// Waits for a second daemon to exit; returns its status and what it logged.
fn second_daemon_exit(daemon: &Daemon) -> (std::process::ExitStatus, String) {
    let logged = daemon.log_text().len();
    let mut second = Helper(daemon.spawn());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "a second daemon did not exit within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = daemon.log_text();
    (status, log.get(logged..).unwrap_or("").to_string())
}

/// C4: a second daemon on the same configuration exits non-zero with a clear message, whether
/// the first runs or is stopped, and touches neither its socket, its mount nor its state.
#[test]
fn second_daemon_refuses_to_start_and_touches_nothing() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let socket_ino = std::fs::metadata(&daemon.socket).unwrap().ino();
    let state = snapshot(&daemon.state);
    let lock_text = std::fs::read_to_string(daemon.state.join("volumed.lock")).unwrap();

    let check_untouched = |when: &str| {
        assert_eq!(
            std::fs::metadata(&daemon.socket).unwrap().ino(),
            socket_ino,
            "{when}: socket replaced"
        );
        let r = daemon.api("GET", "/v3/volumes", None);
        assert_eq!(
            r.status,
            200,
            "{when}: the first daemon answers: {}",
            r.text()
        );
        assert_eq!(daemon.mount_entries(), 1, "{when}: one mount");
        assert_eq!(
            snapshot(&daemon.state),
            state,
            "{when}: state directory changed"
        );
        assert_eq!(
            std::fs::read_to_string(daemon.state.join("volumed.lock")).unwrap(),
            lock_text,
            "{when}: lock file rewritten"
        );
        sh_prompt(&format!(
            "timeout 10 dd if={} bs=1M count=1 iflag=direct status=none | wc -c | grep -qx 1048576",
            q(&daemon.vol("vol1"))
        ));
    };

    // While the first one runs.
    let (status, log) = second_daemon_exit(&daemon);
    assert!(!status.success(), "second daemon exited with {status}");
    assert!(
        log.contains("another volumed") || log.contains("already"),
        "a clear message: {log}"
    );
    check_untouched("first running");

    // While the first one is stopped with SIGSTOP.
    daemon.signal(libc::SIGSTOP);
    let resume = Resume(daemon.pid());
    let (status, log) = second_daemon_exit(&daemon);
    drop(resume);
    assert!(!status.success(), "second daemon exited with {status}");
    assert!(
        log.contains("another volumed") || log.contains("already"),
        "a clear message: {log}"
    );
    check_untouched("first stopped then continued");
}

// ----- C7 -----------------------------------------------------------------------------------

/// Free bytes of the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    sh_ok(&format!("df -B1 --output=avail {} | tail -1", q(path)))
        .trim()
        .parse()
        .unwrap()
}

/// Bytes `dd` reports as copied in its final statistics.
fn dd_copied(stderr: &str) -> u64 {
    stderr
        .lines()
        .rev()
        .find(|l| l.contains("copied"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in dd's output: {stderr}"))
}

/// C7: on a full backing store writes fail with ENOSPC or EIO and never lie, a re-image that
/// runs out of space ends `error`, and the volume works again once space is freed.
#[test]
fn full_backing_store_fails_writes_and_reimage_then_recovers() {
    require("mkfs.ext4");
    require("losetup");
    require_root();

    // A 96 MiB ext4 for the state directory.
    let fsdir = tempfile::Builder::new()
        .prefix("volumed-c7.")
        .tempdir()
        .unwrap();
    let fs_img = fsdir.path().join("fs.img");
    let top = fsdir.path().join("fs");
    std::fs::create_dir(&top).unwrap();
    sh_ok(&format!(
        "truncate -s 96M {f} && timeout 60 mkfs.ext4 -q -F -m 0 -b 4096 {f}",
        f = q(&fs_img)
    ));
    let dev = Loop::attach(&fs_img);
    sh_ok(&format!("timeout 30 mount {} {}", dev.0, q(&top)));
    let mounted = Mounted(top.clone());
    let daemon = Daemon::start_with_state(&top.join("state"), "");
    let dir = daemon.dir.path();

    // Sizes relative to the free space F: image 0.3 F, a filler volume 0.6 F; vol1 then
    // takes the last 0.1 F, so the re-image cannot fit until the filler is deleted.
    let free = free_bytes(&top);
    let image_len = (free * 3 / 10) / MIB * MIB;
    let fill_len = (free * 6 / 10) / MIB * MIB;
    let img = dir.join("image.img");
    random_file(&img, image_len as usize, 71);
    let image = daemon.import_image(&img, "image");
    daemon.create_volume("filler", 1);
    let fill = dir.join("fill");
    random_file(&fill, fill_len as usize, 72);
    sh_ok(&format!(
        "timeout 60 dd if={} of={} bs=1M conv=notrunc,fsync status=none",
        q(&fill),
        q(&daemon.vol("filler"))
    ));

    // 256 MiB into a sparse 1 GiB volume: must fail, and what dd wrote must be intact.
    daemon.create_volume("vol1", 1);
    let v = daemon.vol("vol1");
    let src = dir.join("src256");
    sh_ok(&format!("head -c 256M /dev/urandom > {}", q(&src)));
    let out = sh(&format!(
        "timeout 120 dd if={} of={} bs=1M conv=notrunc,fsync",
        q(&src),
        q(&v)
    ));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "dd must not report success on a full store: {stderr}"
    );
    assert!(
        stderr.contains("No space left on device") || stderr.contains("Input/output error"),
        "ENOSPC or EIO: {stderr}"
    );
    let copied = dd_copied(&stderr);
    assert!(
        copied > 0 && copied < 256 * MIB,
        "dd copied {copied} bytes: {stderr}"
    );
    sh_ok(&format!("timeout 60 cmp -n {copied} {} {}", q(&v), q(&src)));

    // Room for the daemon's records (not for the image): punch what vol1 holds at its start.
    sh_ok(&format!("timeout 30 fallocate -p -o 0 -l 4M {}", q(&v)));

    // The re-image runs out of space: `error` with a reason that says so.
    let r = daemon.reimage("vol1", &image, false);
    assert_eq!(r.status, 202, "reimage: {}", r.text());
    let view = daemon.wait_reimage("vol1", Duration::from_secs(120));
    assert_eq!(view["status"], "error", "{view}");
    assert_eq!(reimage_field(&view, "state"), "failed", "{view}");
    let message = reimage_field(&view, "message").as_str().unwrap_or("");
    assert!(
        message.contains("No space left"),
        "the reason names the cause: {view}"
    );
    assert!(
        view["status_reason"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{view}"
    );

    // Free space, then the volume works again.
    let r = daemon.api("DELETE", "/v3/volumes/filler", None);
    assert_eq!(r.status, 202, "delete: {}", r.text());
    wait_until(Duration::from_secs(20), "space to be freed", || {
        free_bytes(&top) >= image_len + 8 * MIB
    });
    daemon.reimage_and_wait("vol1", &image);
    sh_ok(&format!(
        "timeout 60 cmp -n {image_len} {} {}",
        q(&v),
        q(&img)
    ));
    let marker = dir.join("marker");
    random_file(&marker, MIB as usize, 73);
    sh_ok(&format!(
        "timeout 30 dd if={} of={} bs=1M seek=512 conv=notrunc,fsync status=none && \
         timeout 30 dd if={} bs=1M skip=512 count=1 iflag=direct status=none | cmp - {}",
        q(&marker),
        q(&v),
        q(&v),
        q(&marker)
    ));

    drop(daemon);
    drop(mounted);
    drop(dev);
}

// ----- the fence ----------------------------------------------------------------------------

/// I/O during a refill waits and completes after it on the new content, while everything
/// else stays responsive and the progress grows.
#[test]
fn io_during_refill_waits_for_new_content_while_everything_else_answers() {
    const IMAGE: u64 = 8 * MIB;
    let daemon = Daemon::start_with("refill_rate_limit = 2\nrefill_window_mib = 1");
    daemon.create_volume("vol1", 1);
    daemon.create_volume("vol2", 1);
    let (v1, v2) = (daemon.vol("vol1"), daemon.vol("vol2"));
    let dir = daemon.dir.path().to_path_buf();

    // Old content everywhere the test looks; vol2 has data of its own.
    fill_aa(&v1, 128 * MIB);
    let other = dir.join("other");
    random_file(&other, MIB as usize, 81);
    sh_ok(&format!(
        "timeout 30 dd if={} of={} bs=1M conv=notrunc,fsync status=none",
        q(&other),
        q(&v2)
    ));

    let img = dir.join("new.img");
    random_file(&img, IMAGE as usize, 82);
    let mut expected = std::fs::read(&img).unwrap();
    let image = daemon.import_image(&img, "new");
    let marker_at = 5 * MIB as usize + 123;
    let marker = dir.join("marker");
    random_file(&marker, 4096, 83);
    expected[marker_at..marker_at + 4096].copy_from_slice(&std::fs::read(&marker).unwrap());

    start_reimage(&daemon, "vol1", &image);

    // A reader and a writer on the fenced volume.
    let out = dir.join("read");
    let read_script = format!(
        "timeout 60 dd if={} of={} iflag=direct bs=1M count=1 status=none",
        q(&v1),
        q(&out)
    );
    let write_script = format!(
        "timeout 60 dd if={} of={} bs=4096 count=1 seek={marker_at} oflag=seek_bytes \
         conv=notrunc,fsync status=none",
        q(&marker),
        q(&v1)
    );
    let reader = std::thread::spawn(move || (sh(&read_script), Instant::now()));
    let writer = std::thread::spawn(move || (sh(&write_script), Instant::now()));

    // While downloading: probe everything else and watch the progress.
    let mut progress = Vec::new();
    let mut last_downloading = None;
    // The last poll that saw the refill still short of the image's end. Parked I/O resumes
    // when the fence lifts, which is before the outcome is published (the caches are
    // invalidated and the state saved in between), so the status may still say
    // `downloading` for a moment after the parked requests completed.
    let mut last_refilling = None;
    let mut total = None;
    loop {
        let polled = Instant::now();
        let started = Instant::now();
        let view = daemon.volume("vol1");
        assert!(
            started.elapsed() < PROMPT,
            "GET volume took {:?}",
            started.elapsed()
        );
        if view["status"] != "downloading" {
            break;
        }
        last_downloading = Some(polled);
        let done = reimage_field(&view, "bytes_done").as_u64().unwrap();
        if done < IMAGE {
            last_refilling = Some(polled);
        }
        progress.push(done);
        total = reimage_field(&view, "bytes_total").as_u64();

        let started = Instant::now();
        let r = daemon.api("GET", "/v3/volumes", None);
        assert_eq!(r.status, 200);
        assert!(
            started.elapsed() < PROMPT,
            "GET volumes took {:?}",
            started.elapsed()
        );
        sh_prompt(&format!(
            "timeout 10 dd if={} bs=1M count=1 iflag=direct status=none | cmp - {}",
            q(&v2),
            q(&other)
        ));
        sh_prompt(&format!(
            "timeout 10 dd if={} of={} bs=4096 count=1 seek=1000 conv=notrunc status=none",
            q(&other),
            q(&v2)
        ));
        sh_prompt(&format!("timeout 10 ls -la {}", q(&daemon.mnt)));
        sh_prompt(&format!("timeout 10 stat {} {}", q(&daemon.mnt), q(&v1)));
        sh_prompt(&format!(
            "timeout 10 cat {}",
            q(&daemon.mnt.join(".control"))
        ));
        sh_prompt(&format!("timeout 10 df {}", q(&daemon.mnt)));
        if progress.len() == 1 {
            assert!(
                !reader.is_finished(),
                "the reader was not held by the fence"
            );
            assert!(
                !writer.is_finished(),
                "the writer was not held by the fence"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last_downloading.expect("the volume was seen downloading");
    let last_refilling = last_refilling.expect("the refill was seen running");

    // Progress: visible, bounded by the image's size, and growing.
    assert_eq!(total, Some(IMAGE), "bytes_total while downloading");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    let mut distinct = progress.clone();
    distinct.dedup();
    assert!(distinct.len() >= 3, "progress grew visibly: {progress:?}");
    assert!(progress.iter().all(|&p| p <= IMAGE), "{progress:?}");

    // The reader and writer completed after the refill, on the new content.
    let view = daemon.wait_reimage("vol1", Duration::from_secs(60));
    assert_eq!(reimage_field(&view, "state"), "succeeded", "{view}");
    let (read_out, read_done) = within(Duration::from_secs(30), "the fenced reader", move || {
        reader.join().unwrap()
    });
    let (write_out, write_done) = within(Duration::from_secs(30), "the fenced writer", move || {
        writer.join().unwrap()
    });
    assert!(read_out.status.success(), "reader: {read_out:?}");
    assert!(write_out.status.success(), "writer: {write_out:?}");
    assert!(
        read_done > last_refilling,
        "the reader completed during the refill"
    );
    assert!(
        write_done > last_refilling,
        "the writer completed during the refill"
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        expected[..MIB as usize],
        "the fenced reader got the new image"
    );

    // The volume: the image with the marker written after the refill, then zeros.
    let path = v1.clone();
    within(Duration::from_secs(60), "reading vol1", move || {
        let file = File::open(&path).unwrap();
        expect_image_then_zeros("vol1", 128 * MIB, &expected, |off, buf| {
            file.read_at(buf, off)
        });
    });
    sh_ok(&format!(
        "timeout 120 cmp -i {}:0 -n {} {} /dev/zero",
        IMAGE,
        GIB - IMAGE,
        q(&v1)
    ));
}

// ----- SIGTERM ------------------------------------------------------------------------------

/// SIGTERM during a refill: exit 0 in bounded time, mount and socket removed, and after a
/// restart the volume is `error` with a reason and its content discarded.
#[test]
fn sigterm_during_refill_exits_cleanly_and_leaves_error() {
    let mut daemon = Daemon::start_with("refill_rate_limit = 1\nrefill_window_mib = 1");
    daemon.create_volume("vol1", 1);
    let v = daemon.vol("vol1");
    fill_aa(&v, 128 * MIB);
    let img = daemon.dir.path().join("slow.img");
    random_file(&img, 8 * MIB as usize, 91);
    let image = daemon.import_image(&img, "slow");

    start_reimage(&daemon, "vol1", &image);
    let reader_script = format!(
        "timeout 60 dd if={} of=/dev/null iflag=direct bs=1M count=1 status=none",
        q(&v)
    );
    let reader = std::thread::spawn(move || sh(&reader_script));
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let status = daemon.stop();
    let took = started.elapsed();
    assert!(
        status.success(),
        "volumed exited with {status}:\n{}",
        daemon.log_text()
    );
    assert!(took < Duration::from_secs(15), "stopping took {took:?}");
    assert_eq!(daemon.mount_entries(), 0, "mount removed");
    assert!(!daemon.socket.exists(), "socket removed");

    // The parked reader was answered (data or an errno), not left hanging.
    let out = within(Duration::from_secs(30), "the parked reader", move || {
        reader.join().unwrap()
    });
    assert_ne!(out.status.code(), Some(124), "the parked reader hung");

    daemon.spawn_and_wait();
    let view = daemon.volume("vol1");
    assert_eq!(view["status"], "error", "{view}");
    assert!(
        view["status_reason"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{view}"
    );
    assert_eq!(reimage_field(&view, "state"), "failed", "{view}");
    sh_ok(&format!("timeout 120 cmp -n {GIB} {} /dev/zero", q(&v)));
}
