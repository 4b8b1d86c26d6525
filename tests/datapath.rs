//! The volume file as a block device: the data path seen by the tools that use it.
//!
//! Loop devices (buffered and `--direct-io=on`), `mkfs.ext4`/`mkfs.xfs` on a loop device and on
//! the file itself, fio with crc32c verification, qemu-io with the `threads` and `io_uring`
//! engines, unaligned `O_DIRECT`, concurrent writers sharing blocks at range boundaries (cases
//! C5 and C8), a size that nothing but `os-extend` changes (C6), and the file-level basics:
//! odd offsets, fsync, punch-hole and zero-range, `SEEK_DATA`/`SEEK_HOLE`, statfs, mmap,
//! mode and ownership. Every external command runs under `timeout`; a hang is a failure.

mod common;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// Helpers local to this file.

/// A loop device attached by a test; detached when dropped, whatever the test's outcome.
struct Loop(String);

impl Loop {
    /// Attaches a loop device to `file`, with the loop driver's direct I/O on or off.
    fn attach(file: &Path, direct_io: bool) -> Self {
        let dio = if direct_io { "--direct-io=on" } else { "" };
        let out = sh_ok(&format!("losetup -f --show {dio} {}", file.display()));
        let loop_dev = Loop(out.trim().to_string());
        assert!(
            loop_dev.0.starts_with("/dev/loop"),
            "losetup printed {out:?}"
        );

        // The loop driver silently falls back to buffered I/O when the file refuses O_DIRECT.
        let dio_state = sh_ok(&format!("losetup -n -O DIO {}", loop_dev.0));
        let wanted = if direct_io { "1" } else { "0" };
        assert_eq!(
            dio_state.trim(),
            wanted,
            "direct I/O state of {} on {}",
            loop_dev.0,
            file.display()
        );
        loop_dev
    }

    fn dev(&self) -> &str {
        &self.0
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = sh(&format!("losetup -d {}", self.0));
    }
}

/// A file system mounted by a test; unmounted when dropped (lazily as a last resort).
struct Mounted(Option<PathBuf>);

impl Mounted {
    /// Mounts `source` (a block device, or a file with `-o loop`) on a new directory `at`.
    fn mount(source: &str, options: &str, at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        sh_ok(&format!("mount {options} {source} {}", at.display()));
        Mounted(Some(at.to_path_buf()))
    }

    fn path(&self) -> &Path {
        self.0.as_deref().expect("mounted")
    }

    /// Unmounts now and asserts it worked (a busy or hung file system is a failure).
    fn unmount(mut self) {
        // On failure the guard still holds the path, so its Drop unmounts lazily.
        sh_ok(&format!("umount {}", self.path().display()));
        self.0 = None;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(at) = self.0.take() {
            let at = at.display();
            let _ = sh(&format!("umount {at} 2>/dev/null || umount -l {at}"));
        }
    }
}

/// Runs `f` on its own thread and fails the test if it does not return within `secs`.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no return within {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: failed (see panic above)"),
    }
}

/// Asserts that no thread of process `pid` stays in D state (uninterruptible sleep).
fn assert_no_d_state(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stuck = d_state_tasks(pid);
        if stuck.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "threads of pid {pid} in D state for 10 s: {stuck:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn d_state_tasks(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut stuck = Vec::new();
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The state follows the parenthesised command name, which may contain spaces.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if state == Some("D") {
            stuck.push(stat);
        }
    }
    stuck
}

/// The backing file of volume `name`: `<state_dir>/volumes/<id>.raw`.
fn backing_path(daemon: &Daemon, name: &str) -> PathBuf {
    let id = daemon.volume(name)["id"].as_str().unwrap().to_string();
    let path = daemon.state.join("volumes").join(format!("{id}.raw"));
    assert!(path.exists(), "no backing file at {}", path.display());
    path
}

/// Deterministic pseudo-random bytes.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// A zeroed buffer of `len` bytes whose start is 4 KiB aligned, for `O_DIRECT`.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + 4096];
        let start = storage.as_ptr().align_offset(4096);
        Self {
            storage,
            start,
            len,
        }
    }

    fn with_data(data: &[u8]) -> Self {
        let mut buf = Self::new(data.len());
        buf.bytes_mut().copy_from_slice(data);
        buf
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open O_DIRECT {}: {e}", path.display()))
}

fn read_exact_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {len} at {offset} of {}: {e}", path.display()));
    buf
}

/// Reads `[offset, offset + len)` with `O_DIRECT`, through aligned requests covering it.
fn read_direct_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let start = offset / 4096 * 4096;
    let end = (offset + len as u64).div_ceil(4096) * 4096;
    let data = read_direct(path, start, (end - start) as usize);
    assert_eq!(data.len() as u64, end - start, "short O_DIRECT read");
    let skip = (offset - start) as usize;
    data[skip..skip + len].to_vec()
}

/// Fills `[0, len)` of `path` with `byte`, in 1 MiB writes.
fn fill(path: &Path, byte: u8, len: u64) {
    let file = open_rw(path);
    let chunk = vec![byte; MIB as usize];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(MIB) as usize;
        file.write_all_at(&chunk[..n], offset).unwrap();
        offset += n as u64;
    }
}

/// Asserts that `path` holds `head` at offset 0 and `byte` everywhere after it up to `len`.
fn assert_head_then_pattern(path: &Path, head: &[u8], byte: u8, len: u64) {
    let file = File::open(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut wanted = vec![byte; MIB as usize];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(MIB) as usize;
        file.read_exact_at(&mut buf[..n], offset).unwrap();

        // Whole-slice comparisons (memcmp); the byte-wise search only runs on a mismatch.
        wanted.fill(byte);
        if (offset as usize) < head.len() {
            let end = head.len().min(offset as usize + n);
            wanted[..end - offset as usize].copy_from_slice(&head[offset as usize..end]);
        }
        if buf[..n] != wanted[..n] {
            let i = (0..n).find(|&i| buf[i] != wanted[i]).unwrap();
            panic!(
                "byte at {} of {}: {:#04x}, wanted {:#04x}",
                offset + i as u64,
                path.display(),
                buf[i],
                wanted[i]
            );
        }
        offset += n as u64;
    }
}

/// Runs fio with JSON output; asserts every job wrote, verified (read) and had no error.
fn fio(args: &str) -> Value {
    let out = sh_ok(&format!("fio --output-format=json {args}"));
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio: {out}"));
    let report: Value =
        serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("fio JSON ({e}): {out}"));
    let jobs = report["jobs"].as_array().expect("fio jobs");
    assert!(!jobs.is_empty(), "fio ran no job: {out}");
    for job in jobs {
        let name = &job["jobname"];
        assert_eq!(job["error"], 0, "fio job {name} failed: {job}");
        let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
        let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(written > 0, "fio job {name} wrote nothing: {job}");
        assert!(verified > 0, "fio job {name} verified nothing: {job}");
    }
    report
}

/// The file systems of C5.
#[derive(Clone, Copy)]
enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    fn mkfs(self, target: &str) {
        match self {
            Fs::Ext4 => sh_ok(&format!("mkfs.ext4 -q -F {target}")),
            Fs::Xfs => sh_ok(&format!("mkfs.xfs -q -f {target}")),
        };
    }

    /// Checks the file system read-only; any problem found is a failure.
    fn check(self, target: &str) {
        match self {
            Fs::Ext4 => sh_ok(&format!("e2fsck -fn {target}")),
            Fs::Xfs => sh_ok(&format!("xfs_repair -n {target} 2>&1")),
        };
    }

    fn tools(self) -> [&'static str; 2] {
        match self {
            Fs::Ext4 => ["mkfs.ext4", "e2fsck"],
            Fs::Xfs => ["mkfs.xfs", "xfs_repair"],
        }
    }
}

/// Where C5 makes the file system.
enum Target {
    Loop { direct_io: bool },
    VolumeFile,
}

/// C5 on a 2 GiB volume: mkfs, check, mount, fio verify inside, unmount, check again.
fn filesystem_round_trip(fs: Fs, target: Target) {
    for tool in fs.tools().into_iter().chain(["losetup", "fio", "mount"]) {
        require(tool);
    }
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 2);
    let vol = daemon.vol("vol1");

    // Make the file system on a loop device or on the volume file itself.
    let loop_dev = match target {
        Target::Loop { direct_io } => Some(Loop::attach(&vol, direct_io)),
        Target::VolumeFile => None,
    };
    let device = match &loop_dev {
        Some(l) => l.dev().to_string(),
        None => vol.display().to_string(),
    };
    fs.mkfs(&device);
    fs.check(&device);

    // Mount it (a file needs `-o loop`) and write at random in a 128 MiB file with
    // verification. The amount, not a runtime, bounds the run: fio skips the verification
    // when a runtime ends the write phase, which a loaded machine can make happen.
    let options = if loop_dev.is_some() { "" } else { "-o loop" };
    let mounted = Mounted::mount(&device, options, &daemon.dir.path().join("fs"));
    fio(&format!(
        "--name=c5 --filename={}/fio.dat --size=128M --io_size=48M --rw=randwrite --bs=4k \
         --direct=1 --ioengine=libaio --iodepth=16 --verify=crc32c --verify_fatal=1",
        mounted.path().display()
    ));
    mounted.unmount();

    // Clean after unmount, and no daemon thread left in D state.
    fs.check(&device);
    drop(loop_dev);
    assert_no_d_state(daemon.pid());
}

/// qemu-io with `-t none` and AIO engine `aio` writes a pattern and reads it back.
fn qemu_io_pattern_round_trip(aio: &str) {
    require("qemu-io");
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 2);
    let vol = daemon.vol("vol1");

    // qemu-io exits 1 when a command fails or a pattern does not match.
    let out = sh(&format!(
        "qemu-io -f raw -t none -i {aio} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' \
         -c 'write -P 0xcd 1025M 64k' -c 'read -P 0xcd 1025M 64k' {} 2>&1",
        vol.display()
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-io -i {aio} failed ({}): {text}",
        out.status
    );
    // Without io_uring, qemu 10 warns and falls back to the thread pool with exit status 0:
    // that must not pass as an io_uring run.
    assert!(
        !text.contains("falling back"),
        "`-i {aio}` is not available on this kernel, qemu-io fell back to another engine: {text}"
    );
    assert!(!text.contains("failed"), "qemu-io -i {aio}: {text}");

    // The pattern is really in the volume, seen by another reader.
    let low = read_exact_at(&vol, 0, MIB as usize);
    assert!(low.iter().all(|&b| b == 0xab), "buffered read of 0xab");
    let high = read_direct(&vol, 1025 * MIB, 64 * KIB as usize);
    assert!(high.iter().all(|&b| b == 0xcd), "O_DIRECT read of 0xcd");
    assert_no_d_state(daemon.pid());
}

/// `lseek(fd, offset, whence)`, as an `io::Result`.
fn lseek(file: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: lseek on a descriptor that `file` owns, with integer arguments only.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(found)
}

/// Job options of C8: eight jobs, each on its own 8 MiB range, the first starting at `first`
/// and each next one `gap` after the end of the previous one.
///
/// The case's geometry (`first` 1 KiB, `gap` 2 KiB: ranges 8 MiB + 2 KiB apart) puts every
/// boundary inside one 16 KiB block and four of the seven inside one 4 KiB page; a 512 B gap
/// from 256 B puts all seven inside one 4 KiB page, the backing file's block.
fn eight_neighbouring_jobs(first: u64, gap: u64) -> String {
    (0..8u64)
        .map(|k| {
            let offset = first + k * (8 * MIB + gap);
            format!(" --name=w{k} --offset={offset} --size=8M")
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// C5: direct I/O, loop devices, mkfs and qemu.

/// ext4 on a buffered loop device: mkfs, mount, fio verify and e2fsck all clean.
#[test]
fn ext4_on_a_buffered_loop_device_passes_fio_verify_and_fsck() {
    filesystem_round_trip(Fs::Ext4, Target::Loop { direct_io: false });
}

/// ext4 on a `--direct-io=on` loop device: mkfs, mount, fio verify and e2fsck all clean.
#[test]
fn ext4_on_a_direct_io_loop_device_passes_fio_verify_and_fsck() {
    filesystem_round_trip(Fs::Ext4, Target::Loop { direct_io: true });
}

/// xfs on a buffered loop device: mkfs, mount, fio verify and xfs_repair -n all clean.
#[test]
fn xfs_on_a_buffered_loop_device_passes_fio_verify_and_repair_check() {
    filesystem_round_trip(Fs::Xfs, Target::Loop { direct_io: false });
}

/// xfs on a `--direct-io=on` loop device: mkfs, mount, fio verify and xfs_repair -n clean.
#[test]
fn xfs_on_a_direct_io_loop_device_passes_fio_verify_and_repair_check() {
    filesystem_round_trip(Fs::Xfs, Target::Loop { direct_io: true });
}

/// ext4 made on the volume file itself mounts with `-o loop`, verifies and checks clean.
#[test]
fn ext4_made_on_the_volume_file_passes_fio_verify_and_fsck() {
    filesystem_round_trip(Fs::Ext4, Target::VolumeFile);
}

/// xfs made on the volume file itself mounts with `-o loop`, verifies and checks clean.
#[test]
fn xfs_made_on_the_volume_file_passes_fio_verify_and_repair_check() {
    filesystem_round_trip(Fs::Xfs, Target::VolumeFile);
}

/// `qemu-io -t none -i threads` writes a pattern and reads it back identical.
#[test]
fn qemu_io_with_threads_reads_back_the_pattern_it_wrote() {
    qemu_io_pattern_round_trip("threads");
}

/// `qemu-io -t none -i io_uring` writes a pattern and reads it back identical.
#[test]
fn qemu_io_with_io_uring_reads_back_the_pattern_it_wrote() {
    qemu_io_pattern_round_trip("io_uring");
}

/// Unaligned `O_DIRECT` writes either complete correctly or fail at once with `EINVAL`.
#[test]
fn unaligned_direct_writes_work_or_fail_at_once_with_einval() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    fill(&vol, 0x5a, 4 * MIB);

    // Misaligned offset, length and buffer address, alone and together.
    let shapes: [(u64, usize, usize); 5] = [
        (4097, 4096, 0),
        (64 * KIB, 1000, 0),
        (128 * KIB, 4096, 1),
        (MIB + 1, 131_071, 3),
        (2 * MIB - 7, 70_000, 5),
    ];
    for (i, (offset, len, misalign)) in shapes.into_iter().enumerate() {
        let data = random_bytes(len, 100 + i as u64);
        let path = vol.clone();
        let written = data.clone();
        let result = within(
            20,
            &format!("O_DIRECT write of {len} at {offset}"),
            move || {
                let file = open_direct(&path);
                let mut buf = AlignedBuf::new(len + misalign);
                buf.bytes_mut()[misalign..].copy_from_slice(&written);
                file.write_at(&buf.bytes()[misalign..], offset)
            },
        );

        match result {
            Ok(n) => {
                assert_eq!(n, len, "short O_DIRECT write of {len} at {offset}");
                assert_eq!(read_exact_at(&vol, offset, len), data, "data at {offset}");
            }
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EINVAL),
                    "O_DIRECT write of {len} at {offset}: {e}"
                );
                assert!(
                    read_exact_at(&vol, offset, len).iter().all(|&b| b == 0x5a),
                    "a refused write changed data at {offset}"
                );
            }
        }

        // The bytes just around the write are untouched either way.
        assert_eq!(
            read_exact_at(&vol, offset - 1, 1),
            [0x5a],
            "byte before {offset}"
        );
        assert_eq!(
            read_exact_at(&vol, offset + len as u64, 1),
            [0x5a],
            "byte after write"
        );
    }
    assert_no_d_state(daemon.pid());
}

// ---------------------------------------------------------------------------------------------
// C6: a volume's size does not change by accident.

/// `dd` without `conv=notrunc` succeeds, keeps the size and leaves data past the copy intact.
#[test]
fn dd_without_notrunc_keeps_the_size_and_the_data_past_the_copy() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    fill(&vol, 0xaa, GIB);
    let small = daemon.dir.path().join("small.raw");
    random_file(&small, 100_000, 6);

    sh_ok(&format!(
        "dd if={} of={} bs=64k status=none",
        small.display(),
        vol.display()
    ));

    assert_eq!(std::fs::metadata(&vol).unwrap().len(), GIB);
    assert_head_then_pattern(&vol, &std::fs::read(&small).unwrap(), 0xaa, GIB);
}

/// `cp small.raw V` succeeds, keeps the size and leaves data past the copy intact.
#[test]
fn cp_onto_a_volume_keeps_the_size_and_the_data_past_the_copy() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    fill(&vol, 0xaa, GIB);
    let small = daemon.dir.path().join("small.raw");
    random_file(&small, 300_001, 7);

    sh_ok(&format!("cp {} {}", small.display(), vol.display()));

    assert_eq!(std::fs::metadata(&vol).unwrap().len(), GIB);
    assert_head_then_pattern(&vol, &std::fs::read(&small).unwrap(), 0xaa, GIB);
}

/// An `O_TRUNC` open (Rust and shell `>`) succeeds and changes neither size nor data.
#[test]
fn o_trunc_open_succeeds_and_changes_nothing() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    fill(&vol, 0xaa, GIB);

    let file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&vol)
        .expect("O_TRUNC open of a volume");
    drop(file);
    sh_ok(&format!(": > {}", vol.display()));

    assert_eq!(std::fs::metadata(&vol).unwrap().len(), GIB);
    assert_head_then_pattern(&vol, &[], 0xaa, GIB);
}

/// `truncate -s` to a larger, smaller or zero size fails with EPERM; the equal size succeeds.
#[test]
fn truncate_to_another_size_fails_with_eperm_and_to_the_same_size_succeeds() {
    require("truncate");
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    fill(&vol, 0xaa, GIB);

    // coreutils truncate: open + ftruncate.
    for size in ["2G", "1073741825", "1073741823", "100", "0"] {
        let out = sh(&format!("truncate -s {size} {}", vol.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "truncate -s {size} succeeded");
        assert!(
            stderr.contains("Operation not permitted"),
            "truncate -s {size}: wanted EPERM, got {stderr}"
        );
    }
    sh_ok(&format!("truncate -s 1G {}", vol.display()));
    sh_ok(&format!("truncate -s {GIB} {}", vol.display()));

    // ftruncate from Rust, to see the errno itself.
    let file = open_rw(&vol);
    for size in [2 * GIB, GIB + 1, GIB - 1, 4096, 0] {
        let err = file.set_len(size).expect_err("ftruncate to another size");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EPERM),
            "ftruncate to {size}: {err}"
        );
    }
    file.set_len(GIB)
        .expect("ftruncate to the volume's own size");

    assert_eq!(std::fs::metadata(&vol).unwrap().len(), GIB);
    assert_head_then_pattern(&vol, &[], 0xaa, GIB);
}

/// `truncate(2)` by path fails with EPERM, or (size 0 only) succeeds and changes nothing.
#[test]
fn truncate_by_path_never_changes_the_size_or_the_data() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    fill(&vol, 0xaa, GIB);
    let c_path = std::ffi::CString::new(vol.as_os_str().as_encoded_bytes()).unwrap();

    for size in [2 * GIB, GIB - 1, 4096, 0] {
        // SAFETY: a valid NUL-terminated path and an integer size.
        let rc = unsafe { libc::truncate(c_path.as_ptr(), size as libc::off_t) };
        let err = io::Error::last_os_error();

        // FUSE cannot tell truncate(path, 0) from an O_TRUNC open, which must succeed.
        if rc == 0 {
            assert_eq!(size, 0, "truncate({}, {size}) succeeded", vol.display());
        } else {
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EPERM),
                "truncate to {size}: {err}"
            );
        }
        assert_eq!(
            std::fs::metadata(&vol).unwrap().len(),
            GIB,
            "after truncate to {size}"
        );
    }
    assert_head_then_pattern(&vol, &[], 0xaa, GIB);
}

/// A write crossing the end is short; a write at or past the end fails with ENOSPC.
#[test]
fn write_crossing_the_end_is_short_and_write_at_the_end_fails_with_enospc() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");

    let path = vol.clone();
    within(30, "writes at the end of the volume", move || {
        // Buffered pwrite.
        let file = open_rw(&path);
        let data = random_bytes(4096, 61);
        assert_eq!(
            file.write_at(&data, GIB - 1000).unwrap(),
            1000,
            "crossing write"
        );
        assert_eq!(read_exact_at(&path, GIB - 1000, 1000), data[..1000]);
        for offset in [GIB, GIB + 1, GIB + 4096, 4 * GIB] {
            let err = file
                .write_at(&data, offset)
                .expect_err("write at or past the end");
            assert_eq!(
                err.raw_os_error(),
                Some(libc::ENOSPC),
                "write at {offset}: {err}"
            );
        }
        let mut buf = [0u8; 16];
        assert_eq!(file.read_at(&mut buf, GIB).unwrap(), 0, "read at the end");

        // O_DIRECT pwrite with aligned buffers.
        let direct = open_direct(&path);
        let data = AlignedBuf::with_data(&random_bytes(8192, 62));
        assert_eq!(direct.write_at(data.bytes(), GIB - 4096).unwrap(), 4096);
        assert_eq!(read_exact_at(&path, GIB - 4096, 4096), data.bytes()[..4096]);
        let err = direct
            .write_at(data.bytes(), GIB)
            .expect_err("O_DIRECT write at the end");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENOSPC),
            "O_DIRECT write at the end: {err}"
        );
    });

    assert_eq!(std::fs::metadata(&vol).unwrap().len(), GIB);
}

/// `stat`, `blockdev --getsize64` of a loop device, `qemu-img info` and the API agree.
#[test]
fn stat_blockdev_qemu_img_and_the_api_agree_on_the_size() {
    for tool in ["losetup", "blockdev", "qemu-img"] {
        require(tool);
    }
    let daemon = Daemon::start();
    let view = daemon.create_volume("vol1", 2);
    let vol = daemon.vol("vol1");
    let size = 2 * GIB;
    assert_eq!(view["size"], 2);

    let stat_size: u64 = sh_ok(&format!("stat -c %s {}", vol.display()))
        .trim()
        .parse()
        .unwrap();
    let loop_dev = Loop::attach(&vol, false);
    let blockdev: u64 = sh_ok(&format!("blockdev --getsize64 {}", loop_dev.dev()))
        .trim()
        .parse()
        .unwrap();
    drop(loop_dev);
    let info: Value = serde_json::from_str(&sh_ok(&format!(
        "qemu-img info -f raw --output=json {}",
        vol.display()
    )))
    .unwrap();

    assert_eq!(stat_size, size, "stat");
    assert_eq!(blockdev, size, "blockdev --getsize64");
    assert_eq!(info["virtual-size"], size, "qemu-img info: {info}");
}

// ---------------------------------------------------------------------------------------------
// C8: concurrent writers in one region.

/// Eight buffered writers, 512 B to 12 KiB at any byte offset, on neighbouring ranges: no
/// lost update.
#[test]
fn eight_buffered_unaligned_writers_on_neighbouring_ranges_lose_no_update() {
    require("fio");
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");

    // io_uring makes buffered writes really concurrent (libaio would submit them in turn).
    let options = format!(
        "--filename={} --rw=randwrite --ioengine=io_uring --iodepth=8 --verify=crc32c \
         --verify_fatal=1 --serialize_overlap=1",
        vol.display()
    );

    // Any byte offset and size, in the case's geometry and with every boundary in one page.
    // With byte offsets fio verifies only the latest of overlapping writes; the last run, at
    // 512 B granularity, verifies every block written.
    let unaligned = "--bsrange=512-12k --bs_unaligned --blockalign=1";
    let case_jobs = eight_neighbouring_jobs(KIB, 2 * KIB);
    fio(&format!("{options} {unaligned}{case_jobs}"));
    fio(&format!(
        "{options} {unaligned}{}",
        eight_neighbouring_jobs(256, 512)
    ));
    fio(&format!("{options} --bsrange=512-12k{case_jobs}"));
    assert_no_d_state(daemon.pid());
}

/// Eight `O_DIRECT` writers with 4 KiB-multiple sizes on neighbouring ranges: no lost update.
#[test]
fn eight_direct_aligned_writers_on_neighbouring_ranges_lose_no_update() {
    require("fio");
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");

    fio(&format!(
        "--filename={} --rw=randwrite --bsrange=4k-12k --direct=1 --ioengine=libaio \
         --iodepth=8 --verify=crc32c --verify_fatal=1 --serialize_overlap=1{}",
        vol.display(),
        eight_neighbouring_jobs(KIB, 2 * KIB)
    ));
    assert_no_d_state(daemon.pid());
}

/// ext4 on a loop device with eight concurrent writers: verify, then after a remount
/// (data read back through the volume) verify again; e2fsck clean throughout.
#[test]
fn eight_writers_in_ext4_on_a_loop_device_verify_and_fsck_clean() {
    for tool in ["losetup", "mkfs.ext4", "e2fsck", "fio"] {
        require(tool);
    }
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let loop_dev = Loop::attach(&daemon.vol("vol1"), false);
    sh_ok(&format!("mkfs.ext4 -q -F {}", loop_dev.dev()));
    let at = daemon.dir.path().join("fs");

    let mounted = Mounted::mount(loop_dev.dev(), "", &at);
    let jobs = format!(
        "--directory={} --name=w --numjobs=8 --size=16M --rw=randwrite --bsrange=512-12k \
         --ioengine=io_uring --iodepth=8 --verify=crc32c --verify_fatal=1 \
         --serialize_overlap=1",
        at.display()
    );
    fio(&format!("{jobs} --end_fsync=1"));
    mounted.unmount();
    sh_ok(&format!("e2fsck -fn {}", loop_dev.dev()));

    // The unmount dropped ext4's cache: this verification reads through the volume.
    let mounted = Mounted::mount(loop_dev.dev(), "", &at);
    fio(&format!("{jobs} --verify_only"));
    mounted.unmount();
    sh_ok(&format!("e2fsck -fn {}", loop_dev.dev()));
    drop(loop_dev);
    assert_no_d_state(daemon.pid());
}

// ---------------------------------------------------------------------------------------------
// Data path basics.

/// Random data at odd offsets and sizes reads back identical, buffered and with `O_DIRECT`.
#[test]
fn random_data_at_odd_offsets_reads_back_identical_buffered_and_direct() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    let pieces: [(u64, usize); 7] = [
        (1, 1),
        (4095, 2),
        (10_000, 511),
        (65_537, 4097),
        (MIB - 3, 131_071),
        (3 * MIB + 5, (MIB + 1) as usize),
        (GIB - 3 * MIB - 1, (3 * MIB) as usize),
    ];

    // Buffered writes at odd places.
    let file = open_rw(&vol);
    for (i, &(offset, len)) in pieces.iter().enumerate() {
        file.write_all_at(&random_bytes(len, i as u64), offset)
            .unwrap();
    }
    drop(file);

    for (i, &(offset, len)) in pieces.iter().enumerate() {
        let wanted = random_bytes(len, i as u64);
        assert!(
            read_exact_at(&vol, offset, len) == wanted,
            "buffered read at {offset}"
        );
        assert!(
            read_direct_range(&vol, offset, len) == wanted,
            "O_DIRECT read at {offset}"
        );
    }

    // O_DIRECT writes of aligned buffers, read back buffered.
    let direct = open_direct(&vol);
    let data = AlignedBuf::with_data(&random_bytes(3 * 4096, 99));
    direct.write_all_at(data.bytes(), 512 * MIB).unwrap();
    drop(direct);
    assert!(
        read_exact_at(&vol, 512 * MIB, 3 * 4096) == data.bytes(),
        "after O_DIRECT write"
    );
}

/// `fsync` and `fdatasync` succeed, and the written data is in the backing file.
#[test]
fn fsync_and_fdatasync_succeed_and_the_data_is_in_the_backing_file() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    let backing = backing_path(&daemon, "vol1");

    let file = open_rw(&vol);
    let first = random_bytes(70_001, 31);
    file.write_all_at(&first, 12_345).unwrap();
    file.sync_all().expect("fsync");
    let second = random_bytes(4096, 32);
    file.write_all_at(&second, 700 * MIB).unwrap();
    file.sync_data().expect("fdatasync");
    drop(file);

    assert!(
        read_exact_at(&backing, 12_345, first.len()) == first,
        "fsync'd data in backing"
    );
    assert!(
        read_exact_at(&backing, 700 * MIB, 4096) == second,
        "fdatasync'd data in backing"
    );
    assert_eq!(
        std::fs::metadata(&backing).unwrap().len(),
        GIB,
        "backing file size"
    );
}

/// `fallocate --punch-hole` zeroes the range and makes the backing file sparse there.
#[test]
fn punch_hole_zeroes_the_range_and_frees_backing_blocks() {
    require("fallocate");
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    let backing = backing_path(&daemon, "vol1");
    let data = random_bytes(8 * MIB as usize, 41);
    let file = open_rw(&vol);
    file.write_all_at(&data, 16 * MIB).unwrap();
    file.sync_all().unwrap();
    let blocks_before = std::fs::metadata(&backing).unwrap().blocks();

    sh_ok(&format!(
        "fallocate --punch-hole -o 17M -l 2M {}",
        vol.display()
    ));

    // Zeros in the range, buffered and direct; the data around it intact.
    let zeros = vec![0u8; 2 * MIB as usize];
    assert!(
        read_exact_at(&vol, 17 * MIB, zeros.len()) == zeros,
        "buffered read of the hole"
    );
    assert!(
        read_direct(&vol, 17 * MIB, zeros.len()) == zeros,
        "O_DIRECT read of the hole"
    );
    assert!(read_exact_at(&vol, 16 * MIB, MIB as usize) == data[..MIB as usize]);
    assert!(read_exact_at(&vol, 19 * MIB, 5 * MIB as usize) == data[3 * MIB as usize..]);

    // The backing file lost the range's blocks and has a hole there.
    let blocks_after = std::fs::metadata(&backing).unwrap().blocks();
    assert!(
        blocks_before - blocks_after >= 2 * MIB / 512,
        "st_blocks of the backing file: {blocks_before} before, {blocks_after} after"
    );
    let backing_file = File::open(&backing).unwrap();
    assert_eq!(
        lseek(&backing_file, 17 * MIB as i64, libc::SEEK_HOLE).unwrap(),
        17 * MIB as i64
    );
    assert_eq!(
        lseek(&backing_file, 17 * MIB as i64, libc::SEEK_DATA).unwrap(),
        19 * MIB as i64
    );
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), GIB);
}

/// `fallocate --zero-range` zeroes exactly the range and keeps the size.
#[test]
fn zero_range_zeroes_exactly_the_range() {
    require("fallocate");
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    let data = random_bytes(4 * MIB as usize, 51);
    open_rw(&vol).write_all_at(&data, 32 * MIB).unwrap();

    // An unaligned range: 1 MiB + 100 bytes starting 3 bytes into the second MiB.
    let (start, len) = (33 * MIB + 3, MIB + 100);
    sh_ok(&format!(
        "fallocate --zero-range -o {start} -l {len} {}",
        vol.display()
    ));

    let back = read_exact_at(&vol, 32 * MIB, data.len());
    let (from, to) = (
        (start - 32 * MIB) as usize,
        (start + len - 32 * MIB) as usize,
    );
    assert!(back[..from] == data[..from], "data before the range");
    assert!(
        back[from..to].iter().all(|&b| b == 0),
        "the range is not zero"
    );
    assert!(back[to..] == data[to..], "data after the range");
    assert!(read_direct_range(&vol, start, len as usize)
        .iter()
        .all(|&b| b == 0));
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), GIB);
}

/// `SEEK_DATA`/`SEEK_HOLE` find the data written at 1 MiB and 5 MiB and the holes between.
#[test]
fn seek_data_and_seek_hole_report_real_holes() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    let file = open_rw(&vol);
    file.write_all_at(&[0x11; 4096], MIB).unwrap();
    file.write_all_at(&[0x22; 4096], 5 * MIB).unwrap();
    let (m1, m5, k4) = (MIB as i64, 5 * MIB as i64, 4096i64);

    let path = vol.clone();
    within(30, "lseek SEEK_DATA/SEEK_HOLE", move || {
        let file = File::open(&path).unwrap();
        assert_eq!(lseek(&file, 0, libc::SEEK_DATA).unwrap(), m1);
        assert_eq!(lseek(&file, m1 + 100, libc::SEEK_DATA).unwrap(), m1 + 100);
        assert_eq!(lseek(&file, m1, libc::SEEK_HOLE).unwrap(), m1 + k4);
        assert_eq!(lseek(&file, m1 + k4, libc::SEEK_DATA).unwrap(), m5);
        assert_eq!(lseek(&file, m5, libc::SEEK_HOLE).unwrap(), m5 + k4);
        assert_eq!(lseek(&file, 0, libc::SEEK_HOLE).unwrap(), 0);
        assert_eq!(lseek(&file, 2 * m1, libc::SEEK_HOLE).unwrap(), 2 * m1);

        // No data after the last piece; the end of the volume counts as a hole.
        let err = lseek(&file, m5 + k4, libc::SEEK_DATA).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENXIO),
            "SEEK_DATA after the data: {err}"
        );
        let end = GIB as i64;
        assert_eq!(lseek(&file, end - 1, libc::SEEK_HOLE).unwrap(), end - 1);
        for offset in [end, end + 1] {
            let err = lseek(&file, offset, libc::SEEK_DATA).unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::ENXIO),
                "SEEK_DATA at {offset}: {err}"
            );
        }
    });
}

/// `stat -f` of the mount and of a volume reports non-zero sizes.
#[test]
fn statfs_reports_nonzero_sizes() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    for path in [daemon.mnt.clone(), daemon.vol("vol1")] {
        let out = sh_ok(&format!("stat -f -c '%b %f %a %S %l' {}", path.display()));
        let fields: Vec<u64> = out.split_whitespace().map(|f| f.parse().unwrap()).collect();
        let [blocks, free, avail, block_size, name_max] = fields[..] else {
            panic!("stat -f printed {out:?}");
        };
        assert!(blocks > 0, "total blocks of {}: {out}", path.display());
        assert!(
            free > 0 && avail > 0,
            "free blocks of {}: {out}",
            path.display()
        );
        assert!(
            free <= blocks && avail <= free,
            "block counts of {}: {out}",
            path.display()
        );
        assert!(block_size >= 512, "block size of {}: {out}", path.display());
        assert!(name_max > 0, "name length of {}: {out}", path.display());
    }
}

/// Shared `mmap` fails at once with ENODEV; a private read-only mapping shows the data.
#[test]
fn shared_mmap_fails_with_enodev_and_private_mmap_shows_the_data() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");
    let data = random_bytes(3 * 4096, 71);
    open_rw(&vol).write_all_at(&data, 8192).unwrap();

    let path = vol.clone();
    let mapped = within(30, "mmap of a volume", move || {
        let file = open_rw(&path);
        let len = 4 * 4096;
        for prot in [libc::PROT_READ | libc::PROT_WRITE, libc::PROT_READ] {
            // SAFETY: a new mapping chosen by the kernel; nothing is accessed through it.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            let err = io::Error::last_os_error();
            if addr != libc::MAP_FAILED {
                // SAFETY: unmapping exactly the mapping created above.
                unsafe { libc::munmap(addr, len) };
                panic!("MAP_SHARED (prot {prot}) of a direct_io volume succeeded");
            }
            assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "MAP_SHARED: {err}");
        }

        // SAFETY: a new private read-only mapping chosen by the kernel.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                4096,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "MAP_PRIVATE: {}",
            io::Error::last_os_error()
        );
        // SAFETY: the mapping is `len` readable bytes and stays mapped until munmap below.
        let mapped = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        // SAFETY: unmapping exactly the mapping created above.
        unsafe { libc::munmap(addr, len) };
        mapped
    });

    // The mapping starts at 4096: one page of zeros, then the data.
    for (i, &b) in mapped.iter().enumerate() {
        let wanted = if i < 4096 { 0 } else { data[i - 4096] };
        assert_eq!(b, wanted, "mapped byte {i}");
    }
}

/// `ls -l` shows `-rw-rw----` and the volume's size; `touch` works; chmod and chown fail
/// with EPERM and change nothing.
#[test]
fn mode_is_0660_touch_works_and_chmod_chown_fail_with_eperm() {
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let vol = daemon.vol("vol1");

    let ls = sh_ok(&format!("ls -l {}", vol.display()));
    let fields: Vec<&str> = ls.split_whitespace().collect();
    assert_eq!(fields[0], "-rw-rw----", "ls -l: {ls}");
    assert_eq!(fields[4], GIB.to_string(), "ls -l size: {ls}");

    sh_ok(&format!("touch {}", vol.display()));
    sh_ok(&format!("touch -d '2020-01-01 00:00' {}", vol.display()));

    // The same commands through the shell, then the syscalls for the exact errno.
    for cmd in ["chmod 600", "chmod 666", "chown 65534", "chown 0:65534"] {
        let out = sh(&format!("{cmd} {}", vol.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "`{cmd}` succeeded");
        assert!(
            stderr.contains("Operation not permitted"),
            "`{cmd}`: {stderr}"
        );
    }
    let err = std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o600)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "chmod: {err}");
    let err = std::os::unix::fs::chown(&vol, Some(65534), None).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "chown: {err}");

    let meta = std::fs::metadata(&vol).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(meta.len(), GIB);
}

/// While fio keeps vol1 busy, `stat`, `ls` and reads of vol2 complete promptly.
#[test]
fn another_volume_stays_responsive_while_one_runs_fio() {
    require("fio");
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 2);
    daemon.create_volume("vol2", 1);
    let vol2 = daemon.vol("vol2");
    let marker = random_bytes(MIB as usize, 81);
    open_rw(&vol2).write_all_at(&marker, 100 * MIB).unwrap();

    // fio in the background, under its own timeout.
    let mut fio_child = Command::new("timeout")
        .args([
            "-k",
            "5",
            "120",
            "fio",
            "--name=busy",
            "--rw=randrw",
            "--bs=4k",
        ])
        .args([
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=32",
            "--numjobs=2",
        ])
        .args(["--size=1G", "--time_based", "--runtime=6"])
        .arg(format!("--filename={}", daemon.vol("vol1").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    std::thread::sleep(Duration::from_millis(1000));

    // Probe vol2 and the mount while fio runs; each probe on its own deadline.
    let mut probes = 0;
    let mut slowest = Duration::ZERO;
    while fio_child.try_wait().unwrap().is_none() {
        let (path, mnt, wanted) = (vol2.clone(), daemon.mnt.clone(), marker.clone());
        let took = within(10, "stat/ls/read of vol2 during fio on vol1", move || {
            let started = Instant::now();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), GIB);
            assert!(std::fs::read_dir(&mnt).unwrap().count() >= 3);
            assert!(read_exact_at(&path, 100 * MIB, MIB as usize) == wanted);
            assert!(read_direct(&path, 100 * MIB, MIB as usize) == wanted);
            started.elapsed()
        });
        probes += 1;
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = fio_child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio on vol1 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{probes} probes of vol2 during fio on vol1, slowest {slowest:?}");
    assert!(probes >= 10, "only {probes} probes ran during fio");
    assert!(
        slowest < Duration::from_secs(3),
        "slowest probe of vol2: {slowest:?}"
    );
    assert_no_d_state(daemon.pid());
}
