//! Native qcow2 images through the real daemon: every kind of image qemu writes (versions 2
//! and 3, each cluster size, compressed with zlib and zstd, zero clusters, extended L2 entries,
//! odd and sparse virtual sizes) re-images a volume filled with 0xAA into exactly the bytes of
//! `qemu-img convert -O raw` followed by zeros; unsafe, damaged and mislabelled images are
//! refused at upload with a 400 and stay inactive; an image too large by virtual size leaves
//! the volume untouched; and a stored image that is cut short or changed on disk fails the
//! re-image with a reason instead of succeeding with zeros.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Offset of the header's `size` (virtual size) field.
const HDR_SIZE: u64 = 24;
/// Offset of the header's `crypt_method` field.
const HDR_CRYPT_METHOD: u64 = 32;
/// Offset of the header's `l1_table_offset` field.
const HDR_L1_OFFSET: u64 = 40;
/// Offset of the header's `l1_size` field (u32).
const HDR_L1_SIZE: u64 = 36;
/// Offset of the header's `refcount_table_offset` field.
const HDR_REFCOUNT_OFFSET: u64 = 48;
/// Offset of the v3 header's `incompatible_features` field.
const HDR_INCOMPAT: u64 = 72;

// ----- helpers ------------------------------------------------------------------------------

/// A path quoted for `sh`.
fn q(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// A scratch directory for the images a test builds.
fn workdir() -> tempfile::TempDir {
    require("qemu-img");
    require("qemu-io");
    tempfile::Builder::new()
        .prefix("volumed-qcow2.")
        .tempdir()
        .unwrap()
}

/// Mixes `x` into a well-spread 64-bit value (a few xorshift-multiply rounds).
fn mix(mut x: u64) -> u64 {
    for k in [0x2545_f491_4f6c_dd1d_u64, 0x9e37_79b9_7f4a_7c15] {
        x ^= x >> 31;
        x = x.wrapping_mul(k);
        x ^= x >> 29;
    }
    x
}

/// Fills `buf`, the bytes at absolute offset `at`, with 512-byte blocks of varied kinds:
/// random (incompressible), low-entropy (compressible), zeros, and text naming the offset.
/// Every block depends on its offset, so a block written to the wrong place shows.
fn fill_varied(buf: &mut [u8], at: u64, seed: u64) {
    for (i, block) in buf.chunks_mut(512).enumerate() {
        let offset = at + i as u64 * 512;
        let h = mix(seed ^ mix(offset));
        let mut state = h | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        match h % 8 {
            0..=2 => block.iter_mut().for_each(|b| *b = next() as u8),
            3 | 4 => block
                .iter_mut()
                .for_each(|b| *b = 0x40 | (next() as u8 & 0x0f)),
            5 => block.fill(0),
            _ => {
                let text = format!("seed {seed:x} offset {offset:#x}; ");
                for (b, t) in block.iter_mut().zip(text.bytes().cycle()) {
                    *b = t;
                }
            }
        }
    }
}

/// Writes a sparse raw file of `len` bytes with varied data in `regions` (offset, length).
fn sparse_raw(path: &Path, len: u64, regions: &[(u64, u64)], seed: u64) {
    let file = File::create(path).unwrap();
    file.set_len(len).unwrap();
    for &(offset, size) in regions {
        assert!(
            offset + size <= len,
            "region past the end of {}",
            path.display()
        );
        let mut buf = vec![0u8; size as usize];
        fill_varied(&mut buf, offset, seed);
        file.write_all_at(&buf, offset).unwrap();
    }
}

/// Converts the raw file `raw` into a qcow2 image at `out` with `options` (`-o`) and `extra`
/// arguments (`-c` for compressed).
fn convert_to_qcow2(raw: &Path, out: &Path, options: &str, extra: &str) {
    sh_ok(&format!(
        "qemu-img convert -f raw -O qcow2 {extra} -o {options} {} {}",
        q(raw),
        q(out)
    ));
}

/// Runs `qemu-io` commands on a qcow2 image, in order.
fn qemu_io(image: &Path, commands: &[&str]) {
    let args: Vec<String> = commands.iter().map(|c| format!("-c \"{c}\"")).collect();
    sh_ok(&format!("qemu-io -f qcow2 {} {}", args.join(" "), q(image)));
}

/// `qemu-img info --output=json` of an image.
fn qemu_info(image: &Path) -> Value {
    let text = sh_ok(&format!("qemu-img info --output=json {}", q(image)));
    serde_json::from_str(&text).unwrap()
}

/// `qemu-img map --output=json` of an image.
fn qemu_map(image: &Path) -> Vec<Value> {
    let text = sh_ok(&format!("qemu-img map -f qcow2 --output=json {}", q(image)));
    serde_json::from_str(&text).unwrap()
}

/// Asserts the image really has a mapping of the kind `what` picks, so a case tests what it
/// claims to test.
fn assert_map_has(image: &Path, what: &str, pick: impl Fn(&Value) -> bool) {
    let map = qemu_map(image);
    assert!(
        map.iter().any(pick),
        "{}: qemu-img map shows no {what}: {map:?}",
        image.display()
    );
}

/// Writes `bytes` at `offset` of `path` in place.
fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
    file.sync_all().unwrap();
}

/// Reads the big-endian u64 at `offset` of `path`.
fn read_be64(path: &Path, offset: u64) -> u64 {
    let mut buf = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    u64::from_be_bytes(buf)
}

/// Offset in the file of the active L2 entry of guest cluster `index`, for an image whose
/// first L1 entry covers that cluster.
fn l2_entry_at(image: &Path, index: u64) -> u64 {
    let l1 = read_be64(image, HDR_L1_OFFSET);
    let l2 = read_be64(image, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(
        l2,
        0,
        "{}: guest cluster {index} has no L2 table",
        image.display()
    );
    l2 + 8 * index
}

/// Registers an image with `disk_format`; returns the response.
fn create_image(daemon: &Daemon, name: &str, disk_format: &str) -> Response {
    daemon.api(
        "POST",
        "/v2/images",
        Some(json!({"name": name, "disk_format": disk_format, "container_format": "bare"})),
    )
}

/// Registers an image and uploads the bytes of `file`; returns its id and the upload's answer.
fn upload(daemon: &Daemon, file: &Path, name: &str, disk_format: &str) -> (String, Response) {
    let r = create_image(daemon, name, disk_format);
    assert_eq!(r.status, 201, "create image {name}: {}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let data = std::fs::read(file).unwrap();
    let r = http(
        &daemon.socket,
        "PUT",
        &format!("/v2/images/{id}/file"),
        &[("Content-Type", "application/octet-stream")],
        &data,
    );
    (id, r)
}

/// Uploads `file` as a qcow2 image that must be accepted; returns its id.
fn upload_qcow2(daemon: &Daemon, file: &Path, name: &str) -> String {
    let (id, r) = upload(daemon, file, name, "qcow2");
    assert_eq!(r.status, 204, "upload {name}: {}", r.text());
    id
}

/// The Glance view of an image.
fn image_view(daemon: &Daemon, id: &str) -> Value {
    let r = daemon.api("GET", &format!("/v2/images/{id}"), None);
    assert_eq!(r.status, 200, "get image {id}: {}", r.text());
    r.json()
}

/// The volume's backing file in the state directory.
fn backing_path(daemon: &Daemon, volume: &Value) -> PathBuf {
    let id = volume["id"].as_str().expect("volume id");
    daemon.state.join("volumes").join(format!("{id}.raw"))
}

/// The stored file of an uploaded image in the state directory.
fn stored_image(daemon: &Daemon, id: &str) -> PathBuf {
    daemon.state.join("images").join(format!("{id}.img"))
}

/// Writes `byte` over the whole volume through the mount. The mount does direct I/O, so the
/// bytes are in the backing file when the writes return; no fsync is needed for the refill to
/// have to remove them.
fn fill_volume(daemon: &Daemon, volume: &str, byte: u8) {
    let path = daemon.vol(volume);
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let chunk = vec![byte; 4 * MIB as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).unwrap();
        done += n as u64;
    }
}

/// What a volume must hold.
#[derive(Clone, Copy)]
enum Expect<'a> {
    /// The bytes of this file, then zeros up to the volume's end.
    ImageThenZeros(&'a Path),
    /// Zeros only.
    Zeros,
    /// This byte everywhere.
    Filled(u8),
}

/// Reads the volume through the mount and compares it with `expect`; names the first
/// differing offset.
fn assert_volume_is(daemon: &Daemon, volume: &str, expect: Expect<'_>, what: &str) {
    let mut vol = File::open(daemon.vol(volume)).unwrap();
    let total = vol.metadata().unwrap().len();
    let (mut image, fill) = match expect {
        Expect::ImageThenZeros(path) => (Some(File::open(path).unwrap()), 0),
        Expect::Zeros => (None, 0),
        Expect::Filled(byte) => (None, byte),
    };
    let image_len = image.as_ref().map_or(0, |f| f.metadata().unwrap().len());
    assert!(
        image_len <= total,
        "{what}: expected {image_len} bytes of image in a volume of {total}"
    );

    let step = 4 * MIB as usize;
    let (mut got, mut want) = (vec![0u8; step], vec![0u8; step]);
    let mut offset = 0u64;
    while offset < total {
        let n = (total - offset).min(step as u64) as usize;
        vol.read_exact(&mut got[..n])
            .unwrap_or_else(|e| panic!("{what}: read of the volume at {offset} failed: {e}"));
        let in_image = image_len.saturating_sub(offset).min(n as u64) as usize;
        if let Some(file) = image.as_mut() {
            file.read_exact(&mut want[..in_image]).unwrap();
        }
        want[in_image..n].fill(fill);

        // One slice comparison per chunk; the search only runs to name a mismatch.
        if got[..n] != want[..n] {
            let i = (0..n).find(|&i| got[i] != want[i]).unwrap();
            let at = offset + i as u64;
            let part = if at < image_len {
                "in the image"
            } else {
                "past the image"
            };
            panic!(
                "{what}: byte at offset {at} ({part}) is {:#04x}, expected {:#04x} (volume of \
                 {total} bytes, image of {image_len})",
                got[i], want[i]
            );
        }
        offset += n as u64;
    }
}

/// Uploads a qcow2 image, checks its recorded virtual size against `qemu-img info`, fills the
/// volume with 0xAA, re-images it, and compares it with `qemu-img convert -O raw` of the
/// image followed by zeros. Returns the image id.
fn assert_reimage_matches_qemu(daemon: &Daemon, work: &Path, volume: &str, image: &Path) -> String {
    let label = image.file_name().unwrap().to_string_lossy().into_owned();
    let info = qemu_info(image);
    assert_eq!(info["format"], "qcow2", "{label}: {info}");
    let virtual_size = info["virtual-size"].as_u64().unwrap();
    let file_len = std::fs::metadata(image).unwrap().len();

    let id = upload_qcow2(daemon, image, &label);
    let view = image_view(daemon, &id);
    assert_eq!(view["status"], "active", "{label}: {view}");
    assert_eq!(view["disk_format"], "qcow2", "{label}: {view}");
    assert_eq!(view["size"], file_len, "{label}: {view}");
    assert_eq!(
        view["virtual_size"], virtual_size,
        "{label}: virtual_size differs from qemu-img info's virtual-size: {view}"
    );

    let reference = work.join(format!("{label}.raw"));
    sh_ok(&format!(
        "qemu-img convert -f qcow2 -O raw {} {}",
        q(image),
        q(&reference)
    ));
    assert_eq!(std::fs::metadata(&reference).unwrap().len(), virtual_size);

    fill_volume(daemon, volume, 0xAA);
    let r = daemon.reimage(volume, &id, false);
    assert_eq!(r.status, 202, "{label}: reimage: {}", r.text());
    let after = daemon.wait_reimage(volume, Duration::from_secs(120));
    assert_eq!(after["reimage"]["state"], "succeeded", "{label}: {after}");
    assert_eq!(after["status"], "available", "{label}: {after}");
    assert_eq!(after["volume_image_metadata"]["image_id"], id.as_str());
    assert_eq!(after["volume_image_metadata"]["disk_format"], "qcow2");

    assert_volume_is(daemon, volume, Expect::ImageThenZeros(&reference), &label);
    std::fs::remove_file(&reference).unwrap();
    id
}

/// Regions of data spread over a disk of `len` bytes: the start (not a multiple of any
/// cluster), one in the middle off any alignment, and the very end.
fn spread_regions(len: u64) -> Vec<(u64, u64)> {
    vec![
        (0, MIB + 4 * KIB + 512 + 100),
        (len / 2 + 3 * 512, 700 * KIB + 4000),
        (len - 500 * KIB - 17, 500 * KIB + 17),
    ]
}

/// Builds `base.raw` with spread data and converts it once per (name, options) pair, then
/// checks each image against one volume of a fresh daemon.
fn check_conversions(virtual_size: u64, seed: u64, cases: &[(&str, &str)], extra: &str) {
    let work = workdir();
    let raw = work.path().join("base.raw");
    sparse_raw(&raw, virtual_size, &spread_regions(virtual_size), seed);

    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    for (name, options) in cases {
        let image = work.path().join(name);
        convert_to_qcow2(&raw, &image, options, extra);
        assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);
        std::fs::remove_file(&image).unwrap();
    }
}

// ----- the image matrix ---------------------------------------------------------------------

/// Version 2 images at every cluster size, 512 B to 2 MiB, re-image equal to qemu's raw.
#[test]
fn v2_images_at_every_cluster_size_reimage_equal_to_qemu_raw() {
    check_conversions(
        200 * MIB,
        2,
        &[
            ("v2-512.qcow2", "compat=0.10,cluster_size=512"),
            ("v2-4k.qcow2", "compat=0.10,cluster_size=4k"),
            ("v2-64k.qcow2", "compat=0.10,cluster_size=64k"),
            ("v2-2m.qcow2", "compat=0.10,cluster_size=2M"),
        ],
        "",
    );
}

/// Version 3 images at every cluster size, 512 B to 2 MiB, re-image equal to qemu's raw.
#[test]
fn v3_images_at_every_cluster_size_reimage_equal_to_qemu_raw() {
    check_conversions(
        200 * MIB,
        3,
        &[
            ("v3-512.qcow2", "compat=1.1,cluster_size=512"),
            ("v3-4k.qcow2", "compat=1.1,cluster_size=4k"),
            (
                "v3-64k.qcow2",
                "compat=1.1,cluster_size=64k,refcount_bits=1",
            ),
            ("v3-2m.qcow2", "compat=1.1,cluster_size=2M,refcount_bits=64"),
        ],
        "",
    );
}

/// zlib and zstd compressed images (mixed with clusters too random to compress) re-image
/// equal to qemu's raw.
#[test]
fn compressed_zlib_and_zstd_images_reimage_equal_to_qemu_raw() {
    let work = workdir();
    let raw = work.path().join("base.raw");
    let virtual_size = 64 * MIB;
    sparse_raw(
        &raw,
        virtual_size,
        &[(0, 6 * MIB + 1000), (40 * MIB, 2 * MIB)],
        4,
    );

    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let cases = [
        ("zlib-v2-64k.qcow2", "compat=0.10,cluster_size=64k"),
        ("zlib-v3-512.qcow2", "compat=1.1,cluster_size=512"),
        ("zlib-v3-4k.qcow2", "compat=1.1,cluster_size=4k"),
        ("zlib-v3-2m.qcow2", "compat=1.1,cluster_size=2M"),
        (
            "zstd-v3-4k.qcow2",
            "compat=1.1,cluster_size=4k,compression_type=zstd",
        ),
        (
            "zstd-v3-64k.qcow2",
            "compat=1.1,cluster_size=64k,compression_type=zstd",
        ),
        (
            "zstd-v3-2m.qcow2",
            "compat=1.1,cluster_size=2M,compression_type=zstd",
        ),
    ];
    for (name, options) in cases {
        let image = work.path().join(name);
        convert_to_qcow2(&raw, &image, options, "-c");
        assert_map_has(&image, "compressed cluster", |m| m["compressed"] == true);
        let kind = if name.starts_with("zstd") {
            "zstd"
        } else {
            "zlib"
        };
        let info = qemu_info(&image);
        assert_eq!(
            info["format-specific"]["data"]["compression-type"], kind,
            "{name}: {info}"
        );
        assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);
        std::fs::remove_file(&image).unwrap();
    }
}

/// A daemon's resident memory in bytes: (now, peak since the last reset).
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * KIB
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Uploading and re-imaging 256 MiB of compressed clusters (2 MiB zstd, 64 KiB and 512 B zlib
/// clusters) is exact and keeps the daemon's peak memory within 64 MiB of its idle size: the
/// inflate workers hold a bounded set of buffers, and the mapped image is released as it is
/// read, tables included (with 512 B clusters they are spread over the whole file).
#[test]
fn compressed_refill_stays_bounded_in_memory() {
    let work = workdir();
    let raw = work.path().join("base.raw");
    // Text: every cluster compresses, so the image is all compressed clusters and tables.
    sh_ok(&format!(
        "base64 -w 0 < /dev/urandom | head -c {} > {}",
        256 * MIB,
        q(&raw)
    ));

    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    for (name, options) in [
        (
            "big-zstd-2m.qcow2",
            "compat=1.1,cluster_size=2M,compression_type=zstd",
        ),
        ("big-zlib-64k.qcow2", "compat=1.1,cluster_size=64k"),
        ("big-zlib-512.qcow2", "compat=1.1,cluster_size=512"),
    ] {
        let image = work.path().join(name);
        convert_to_qcow2(&raw, &image, options, "-c");

        let pid = daemon.pid();
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
        let (idle, _) = rss(pid);
        let id = upload_qcow2(&daemon, &image, name);
        let (_, upload_peak) = rss(pid);
        assert!(
            upload_peak.saturating_sub(idle) < 64 * MIB,
            "{name}: upload peak {upload_peak} bytes, idle {idle} bytes"
        );

        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
        let (idle, _) = rss(pid);
        let r = daemon.reimage("vol1", &id, false);
        assert_eq!(r.status, 202, "{name}: {}", r.text());
        let view = daemon.wait_reimage("vol1", Duration::from_secs(300));
        assert_eq!(view["status"], "available", "{name}: {view}");
        let (_, peak) = rss(pid);
        assert!(
            peak.saturating_sub(idle) < 64 * MIB,
            "{name}: peak {peak} bytes, idle {idle} bytes"
        );

        let v = daemon.vol("vol1");
        sh_ok(&format!(
            "timeout 120 cmp -n {} {} {}",
            256 * MIB,
            q(&v),
            q(&raw)
        ));
        std::fs::remove_file(&image).unwrap();
    }
}

/// Zero clusters (v3, with and without preallocated host space, and after discard), zeros
/// written into a v2 image, and a v3 image with zero clusters amended down to v2, all re-image
/// equal to qemu's raw: no 0xAA and no stale preallocated bytes show through.
#[test]
fn zero_clusters_with_and_without_preallocation_reimage_as_zeros() {
    let work = workdir();
    let raw = work.path().join("base.raw");
    let virtual_size = 128 * MIB;
    sparse_raw(&raw, virtual_size, &[(0, 4 * MIB), (100 * MIB, 2 * MIB)], 5);
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    // Zero clusters over data keep their host clusters (and the old bytes in them) unless
    // unmapped; over unallocated ranges they have none.
    // Offsets are whole 2 MiB clusters where every cluster size must get zero clusters, and
    // unaligned elsewhere (qemu then writes zeros into the clusters it has to copy).
    let zero_writes = [
        "write -z 2M 2M",
        "write -z -u 100M 2M",
        "write -z 60M 2M",
        "write -z 64k 128k",
        "write -z 1000k 20k",
        "discard 1M 256k",
    ];
    for (name, options) in [
        ("zero-v3-64k.qcow2", "compat=1.1,cluster_size=64k"),
        ("zero-v3-4k.qcow2", "compat=1.1,cluster_size=4k"),
        ("zero-v3-2m.qcow2", "compat=1.1,cluster_size=2M"),
    ] {
        let image = work.path().join(name);
        convert_to_qcow2(&raw, &image, options, "");
        qemu_io(&image, &zero_writes);
        // Preallocated zero clusters: qemu-img map shows them as zero with a host offset.
        assert_map_has(&image, "preallocated zero cluster", |m| {
            m["zero"] == true && m["present"] == true && m.get("offset").is_some()
        });
        assert_map_has(&image, "zero cluster without host space", |m| {
            m["zero"] == true && m["present"] == true && m.get("offset").is_none()
        });
        assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);
    }

    // Data written, then zeroed in place on v3: the host cluster still holds the pattern.
    let image = work.path().join("zero-over-pattern.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 -o compat=1.1 {} 64M",
        q(&image)
    ));
    qemu_io(
        &image,
        &[
            "write -P 0x5c 0 4M",
            "write -z 1M 1M",
            "write -P 0x6d 1536k 4k",
        ],
    );
    assert_map_has(&image, "preallocated zero cluster", |m| {
        m["zero"] == true && m.get("offset").is_some()
    });
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);

    // Version 2 has no zero flag: qemu writes zeros (or leaves clusters unallocated).
    let image = work.path().join("zero-v2.qcow2");
    convert_to_qcow2(&raw, &image, "compat=0.10", "");
    qemu_io(&image, &zero_writes[..5]);
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);

    // A v3 image with zero clusters amended down to v2.
    let image = work.path().join("zero-amended-v2.qcow2");
    convert_to_qcow2(&raw, &image, "compat=1.1", "");
    qemu_io(&image, &zero_writes);
    sh_ok(&format!(
        "qemu-img amend -f qcow2 -o compat=0.10 {}",
        q(&image)
    ));
    assert_eq!(
        qemu_info(&image)["format-specific"]["data"]["compat"],
        "0.10"
    );
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);

    // Metadata preallocation: every cluster has host space and no data was ever written.
    let image = work.path().join("prealloc-metadata.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 -o compat=1.1,preallocation=metadata {} 32M",
        q(&image)
    ));
    qemu_io(&image, &["write -P 0x11 5M 100k"]);
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);
}

/// Extended L2 entries: subcluster-sized data, zero and unallocated subclusters inside one
/// cluster, plus whole compressed clusters, re-image equal to qemu's raw.
#[test]
fn extended_l2_subclusters_reimage_equal_to_qemu_raw() {
    let work = workdir();
    let noise = work.path().join("noise.bin");
    random_file(&noise, MIB as usize, 6);
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    for (name, cluster) in [("el2-64k.qcow2", 64 * KIB), ("el2-32k.qcow2", 32 * KIB)] {
        let sub = cluster / 32;
        let image = work.path().join(name);
        sh_ok(&format!(
            "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size={cluster} {} 256M",
            q(&image)
        ));
        // qemu-io reads its commands itself, without a shell's quoting.
        let n = noise.display();
        let commands = [
            // One cluster with data in subclusters 1, 3-4 and 31, the rest unallocated.
            format!("write -s {n} {sub} {sub}"),
            format!("write -s {n} {} {}", 3 * sub, 2 * sub),
            format!("write -s {n} {} {sub}", 31 * sub),
            // A full cluster, then zero subclusters inside it.
            format!("write -s {n} {} {cluster}", 4 * cluster),
            format!("write -z {} {}", 4 * cluster + 2 * sub, 3 * sub),
            format!("write -z -u {} {sub}", 4 * cluster + 10 * sub),
            // A data run crossing cluster boundaries at subcluster granularity.
            format!(
                "write -s {n} {} {}",
                9 * cluster + 7 * sub,
                cluster + 13 * sub
            ),
            // Zero subclusters in an unallocated cluster.
            format!("write -z {} {}", 20 * cluster + 5 * sub, 4 * sub),
            // Compressed whole clusters.
            format!("write -c -P 0x4e {} {cluster}", 30 * cluster),
            format!("write -c -s {n} {} {cluster}", 31 * cluster),
            // Far away, in another L2 table.
            format!("write -s {n} {} {}", 200 * MIB + sub, 5 * sub),
            format!("discard {} {sub}", 200 * MIB + 2 * sub),
        ];
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io(&image, &commands);
        assert_eq!(
            qemu_info(&image)["format-specific"]["data"]["extended-l2"],
            true
        );
        assert_map_has(&image, "compressed cluster", |m| m["compressed"] == true);
        assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);
    }

    // Whole-image compression with extended L2 entries (zstd).
    let raw = work.path().join("base.raw");
    sparse_raw(&raw, 32 * MIB, &[(5000, 3 * MIB)], 7);
    let image = work.path().join("el2-zstd-compressed.qcow2");
    convert_to_qcow2(
        &raw,
        &image,
        "extended_l2=on,cluster_size=64k,compression_type=zstd",
        "-c",
    );
    assert_map_has(&image, "compressed cluster", |m| m["compressed"] == true);
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);
}

/// Virtual sizes that are not a multiple of the cluster size or of 512 bytes re-image equal
/// to qemu's raw, record qemu's virtual size, and leave zeros past it.
#[test]
fn odd_virtual_sizes_reimage_equal_to_qemu_raw_and_zeros_after() {
    let work = workdir();
    let noise = work.path().join("noise.bin");
    random_file(&noise, MIB as usize, 8);
    // qemu-io reads its commands itself, without a shell's quoting.
    let n = noise.display();
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    // qemu-img rounds 1000001 up to whole sectors; data reaches the last byte.
    let image = work.path().join("size-1000001.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 {} 1000001",
        q(&image)
    ));
    qemu_io(&image, &[&format!("write -s {n} 900000 100448")]);
    assert_eq!(qemu_info(&image)["virtual-size"], 1_000_448);
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);

    // A header size that is not a multiple of 512 (qemu ignores the partial last sector).
    for (name, options, size) in [
        ("hdr-1000001-v3.qcow2", "compat=1.1", 1_000_001u64),
        (
            "hdr-odd-v2-512.qcow2",
            "compat=0.10,cluster_size=512",
            12_345_679,
        ),
        (
            "hdr-odd-v3-2m.qcow2",
            "compat=1.1,cluster_size=2M",
            700_001 * KIB + 333,
        ),
    ] {
        let image = work.path().join(name);
        let created = size.div_ceil(512) * 512;
        sh_ok(&format!(
            "qemu-img create -q -f qcow2 -o {options} {} {created}",
            q(&image)
        ));
        qemu_io(
            &image,
            &[
                &format!("write -s {n} 0 70000"),
                &format!("write -s {n} {} {}", created - 123_392, 123_392),
            ],
        );
        patch(&image, HDR_SIZE, &size.to_be_bytes());
        assert_eq!(
            qemu_info(&image)["virtual-size"],
            size / 512 * 512,
            "{name}"
        );
        assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);
    }

    // Sizes qemu itself creates that are whole sectors but not whole clusters.
    for (name, options, size) in [
        ("size-700001k-2m.qcow2", "cluster_size=2M", 700_001 * KIB),
        ("size-odd-64k-v2.qcow2", "compat=0.10", 999 * MIB + 3 * 512),
        (
            "size-odd-4k-compressed.qcow2",
            "cluster_size=4k",
            300 * MIB + 7 * 512,
        ),
    ] {
        let image = work.path().join(name);
        sh_ok(&format!(
            "qemu-img create -q -f qcow2 -o {options} {} {size}",
            q(&image)
        ));
        // The last, partial cluster holds data up to the last byte (compressed: all of it).
        let (c, tail) = if name.contains("compressed") {
            ("-c ", size % (4 * KIB))
        } else {
            ("", 300 * KIB + 512)
        };
        qemu_io(
            &image,
            &[
                &format!("write -s {n} 4096 20000"),
                &format!("write {c}-s {n} {} {tail}", size - tail),
            ],
        );
        assert_eq!(qemu_info(&image)["virtual-size"], size, "{name}");
        assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);
    }
}

/// A sparse image (900 MiB virtual, 3 MiB of data) re-images equal to qemu's raw and leaves
/// the volume's backing file mostly holes.
#[test]
fn sparse_image_reimages_equal_to_qemu_raw_and_leaves_holes() {
    let work = workdir();
    let raw = work.path().join("base.raw");
    let virtual_size = 900 * MIB;
    let regions = [(0, MIB), (450 * MIB + 512, MIB), (899 * MIB, MIB)];
    sparse_raw(&raw, virtual_size, &regions, 9);
    let daemon = Daemon::start();
    let volume = daemon.create_volume("vol1", 1);
    let backing = backing_path(&daemon, &volume);

    for (name, options) in [
        ("sparse-v3-64k.qcow2", "compat=1.1"),
        ("sparse-v2-2m.qcow2", "compat=0.10,cluster_size=2M"),
    ] {
        let image = work.path().join(name);
        convert_to_qcow2(&raw, &image, options, "");
        assert!(
            std::fs::metadata(&image).unwrap().len() <= 16 * MIB,
            "{name}"
        );
        assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);

        // The 0xAA fill was discarded and the image's holes stayed holes.
        daemon.wait_space_reclaimed("vol1");
        let allocated = std::fs::metadata(&backing).unwrap().blocks() * 512;
        assert!(
            allocated <= 16 * MIB,
            "{name}: the backing file has {allocated} bytes allocated for 3 MiB of data"
        );
    }
}

/// Images with internal snapshots (the active state is read), a persistent dirty bitmap
/// (an optional header extension and autoclear bit), lazy refcounts, and a v2 image amended
/// up to v3 are accepted and re-image equal to qemu's raw.
#[test]
fn snapshots_bitmaps_lazy_refcounts_and_amended_images_reimage_equal_to_qemu_raw() {
    let work = workdir();
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    let image = work.path().join("snapshots.qcow2");
    sh_ok(&format!("qemu-img create -q -f qcow2 {} 64M", q(&image)));
    qemu_io(&image, &["write -P 0x01 0 2M", "write -P 0x02 10M 1M"]);
    sh_ok(&format!("qemu-img snapshot -c first {}", q(&image)));
    qemu_io(&image, &["write -P 0x03 512k 1M", "write -z 10M 512k"]);
    sh_ok(&format!("qemu-img snapshot -c second {}", q(&image)));
    qemu_io(&image, &["write -P 0x04 30M 64k", "discard 0 64k"]);
    assert_eq!(qemu_info(&image)["snapshots"].as_array().unwrap().len(), 2);
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);

    let image = work.path().join("bitmap-lazy.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 -o lazy_refcounts=on {} 64M",
        q(&image)
    ));
    sh_ok(&format!("qemu-img bitmap --add {} dirty0", q(&image)));
    qemu_io(&image, &["write -P 0x05 1M 3M", "write -z 2M 64k"]);
    let info = qemu_info(&image);
    assert_eq!(
        info["format-specific"]["data"]["lazy-refcounts"], true,
        "{info}"
    );
    assert!(
        info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .is_some_and(|b| !b.is_empty()),
        "{info}"
    );
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);

    let image = work.path().join("amended-up-v3.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 -o compat=0.10 {} 64M",
        q(&image)
    ));
    qemu_io(&image, &["write -P 0x06 0 3M"]);
    sh_ok(&format!(
        "qemu-img amend -f qcow2 -o compat=1.1 {}",
        q(&image)
    ));
    qemu_io(&image, &["write -z 1M 1M", "write -P 0x07 40M 64k"]);
    assert_eq!(
        qemu_info(&image)["format-specific"]["data"]["compat"],
        "1.1"
    );
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &image);
}

// ----- refusals at upload -------------------------------------------------------------------

/// Uploads `file` as `disk_format` and asserts a 400 whose message holds every word of
/// `expect` (case-insensitive), an image left inactive with no stored data, and a re-image
/// from it refused.
fn assert_upload_refused(daemon: &Daemon, file: &Path, disk_format: &str, expect: &[&str]) {
    let label = file.file_name().unwrap().to_string_lossy().into_owned();
    let (id, r) = upload(daemon, file, &label, disk_format);
    assert_eq!(
        r.status,
        400,
        "{label} as {disk_format}: upload answered {}: {}",
        r.status,
        r.text()
    );
    let message = r.fault_message();
    for word in expect {
        assert!(
            message.to_lowercase().contains(&word.to_lowercase()),
            "{label} as {disk_format}: the refusal does not mention {word:?}: {message}"
        );
    }

    let view = image_view(daemon, &id);
    assert_ne!(view["status"], "active", "{label}: {view}");
    assert!(view["checksum"].is_null(), "{label}: {view}");
    assert!(
        !stored_image(daemon, &id).exists(),
        "{label}: the refused upload was stored"
    );
    let r = daemon.reimage("vol1", &id, false);
    assert_eq!(
        r.status,
        400,
        "{label}: reimage from a refused image: {}",
        r.text()
    );
    assert_eq!(daemon.status("vol1"), "available");
}

/// A valid 64 MiB v3 image with some data, to be damaged by a test.
fn valid_image(work: &Path, name: &str) -> PathBuf {
    let image = work.join(name);
    sh_ok(&format!("qemu-img create -q -f qcow2 {} 64M", q(&image)));
    qemu_io(&image, &["write -P 0x61 0 1M", "write -P 0x62 32M 1M"]);
    image
}

/// Backing files, external data files, encryption (LUKS and legacy AES), unknown incompatible
/// features, the dirty and corrupt bits, L1 and refcount tables past the end, too small or
/// overlapping, L2 entries pointing past the end or into metadata or with reserved bits, and
/// a truncated file are refused at upload with a 400 that names the cause; the image stays
/// inactive and cannot re-image a volume.
#[test]
fn unsafe_or_damaged_qcow2_is_refused_at_upload_with_400() {
    let work = workdir();
    let w = work.path();
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    let base = valid_image(w, "base.qcow2");
    let top = w.join("backing-file.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 -b {} -F qcow2 {} 64M",
        q(&base),
        q(&top)
    ));
    assert_upload_refused(&daemon, &top, "qcow2", &["backing file"]);

    let data_file = w.join("external-data.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 -o data_file={} {} 64M",
        q(&w.join("external.raw")),
        q(&data_file)
    ));
    assert_upload_refused(&daemon, &data_file, "qcow2", &["external data file"]);

    let luks = w.join("luks-encrypted.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 --object secret,id=s,data=x \
         -o encrypt.format=luks,encrypt.key-secret=s {} 64M",
        q(&luks)
    ));
    assert_upload_refused(&daemon, &luks, "qcow2", &["encrypted"]);

    // The legacy AES method, which qemu no longer creates: set crypt_method = 1.
    let aes = valid_image(w, "aes-encrypted.qcow2");
    patch(&aes, HDR_CRYPT_METHOD, &1u32.to_be_bytes());
    assert_upload_refused(&daemon, &aes, "qcow2", &["encrypted"]);

    let features = read_be64(&valid_image(w, "probe.qcow2"), HDR_INCOMPAT);
    for (name, bit, words) in [
        (
            "unknown-feature.qcow2",
            1u64 << 40,
            &["unknown incompatible"][..],
        ),
        (
            "unknown-feature-low.qcow2",
            1u64 << 5,
            &["unknown incompatible"][..],
        ),
        ("dirty.qcow2", 1u64 << 0, &["dirty"][..]),
        ("corrupt.qcow2", 1u64 << 1, &["corrupt"][..]),
    ] {
        let image = valid_image(w, name);
        patch(&image, HDR_INCOMPAT, &(features | bit).to_be_bytes());
        assert_upload_refused(&daemon, &image, "qcow2", words);
    }

    let l1_past_end = valid_image(w, "l1-past-eof.qcow2");
    patch(&l1_past_end, HDR_L1_OFFSET, &(1u64 << 40).to_be_bytes());
    assert_upload_refused(
        &daemon,
        &l1_past_end,
        "qcow2",
        &["L1 table", "does not fit"],
    );

    let l1_too_small = valid_image(w, "l1-too-small.qcow2");
    patch(&l1_too_small, HDR_L1_SIZE, &0u32.to_be_bytes());
    assert_upload_refused(&daemon, &l1_too_small, "qcow2", &["L1 table"]);

    let refcount_past_end = valid_image(w, "refcount-table-past-eof.qcow2");
    patch(
        &refcount_past_end,
        HDR_REFCOUNT_OFFSET,
        &(1u64 << 40).to_be_bytes(),
    );
    assert_upload_refused(&daemon, &refcount_past_end, "qcow2", &["refcount table"]);

    let refcount_on_l1 = valid_image(w, "refcount-table-on-l1.qcow2");
    let l1 = read_be64(&refcount_on_l1, HDR_L1_OFFSET);
    patch(&refcount_on_l1, HDR_REFCOUNT_OFFSET, &l1.to_be_bytes());
    assert_upload_refused(&daemon, &refcount_on_l1, "qcow2", &["overlaps"]);

    // L2 entries: a data cluster past the end, one on the L1 table, reserved bits set.
    let copied = 1u64 << 63;
    for (name, entry, words) in [
        (
            "l2-data-past-eof.qcow2",
            Some(copied | 1 << 40),
            &["does not fit"][..],
        ),
        ("l2-data-on-l1.qcow2", None, &["overlaps"][..]),
        ("l2-reserved-bits.qcow2", Some(0), &["L2 entry"][..]),
    ] {
        let image = valid_image(w, name);
        let at = l2_entry_at(&image, 3);
        let entry = match entry {
            Some(0) => read_be64(&image, at) | 1 << 1,
            Some(entry) => entry,
            None => copied | read_be64(&image, HDR_L1_OFFSET),
        };
        patch(&image, at, &entry.to_be_bytes());
        assert_upload_refused(&daemon, &image, "qcow2", words);
    }

    // A compressed image cut in the middle.
    let raw = w.join("base.raw");
    sparse_raw(&raw, 32 * MIB, &[(0, 8 * MIB)], 10);
    let whole = w.join("compressed.qcow2");
    convert_to_qcow2(&raw, &whole, "compat=1.1", "-c");
    let cut = w.join("truncated-compressed.qcow2");
    std::fs::copy(&whole, &cut).unwrap();
    let len = std::fs::metadata(&cut).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_upload_refused(&daemon, &cut, "qcow2", &["qcow2"]);

    // The daemon refused everything and still serves.
    let good = upload_qcow2(&daemon, &whole, "whole");
    assert_eq!(image_view(&daemon, &good)["status"], "active");
}

/// Bytes that do not match the declared `disk_format` are refused at upload: a qcow2 (or
/// vmdk, vhdx, vdi, vpc) file declared raw, and raw or vmdk bytes declared qcow2.
#[test]
fn content_not_matching_disk_format_is_refused_at_upload() {
    let work = workdir();
    let w = work.path();
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    let qcow2 = valid_image(w, "qcow2-declared-raw.qcow2");
    assert_upload_refused(&daemon, &qcow2, "raw", &["qcow2", "raw"]);

    let raw = w.join("raw-declared-qcow2.raw");
    random_file(&raw, 4 * MIB as usize, 11);
    assert_upload_refused(&daemon, &raw, "qcow2", &["qcow2"]);

    // A raw image of zeros is no qcow2 either.
    let zeros = w.join("zeros-declared-qcow2.raw");
    File::create(&zeros).unwrap().set_len(MIB).unwrap();
    assert_upload_refused(&daemon, &zeros, "qcow2", &["qcow2"]);

    let luks = w.join("luks-declared-raw.luks");
    sh_ok(&format!(
        "qemu-img create -q -f luks --object secret,id=s,data=x -o key-secret=s {} 16M",
        q(&luks)
    ));
    assert_upload_refused(&daemon, &luks, "raw", &["luks", "raw"]);

    for format in ["vmdk", "vhdx", "vdi", "vpc"] {
        let image = w.join(format!("{format}-image.{format}"));
        sh_ok(&format!(
            "qemu-img convert -f qcow2 -O {format} {} {}",
            q(&qcow2),
            q(&image)
        ));
        assert_upload_refused(&daemon, &image, "raw", &[format, "raw"]);
        if format == "vmdk" {
            assert_upload_refused(&daemon, &image, "qcow2", &["vmdk", "qcow2"]);
        }
    }
}

/// Image formats other than raw and qcow2 are refused when the image is created, with a 400
/// that names the supported formats (`vpc` is qemu's name for Glance's `vhd`, unknown to
/// Glance, so its refusal lists the known formats instead).
#[test]
fn other_disk_formats_are_refused_at_create_naming_raw_and_qcow2() {
    let daemon = Daemon::start();
    for format in ["vmdk", "vhdx", "vdi", "vhd", "vpc"] {
        let r = create_image(&daemon, &format!("{format}-image"), format);
        assert_eq!(r.status, 400, "{format}: {}", r.text());
        let message = r.fault_message();
        assert!(
            message.contains(format) && message.contains("raw") && message.contains("qcow2"),
            "{format}: the refusal does not name the format and raw, qcow2: {message}"
        );
        if format != "vpc" {
            assert!(
                message.contains("supported: raw, qcow2"),
                "{format}: the refusal does not name the supported formats: {message}"
            );
        }
    }
    let r = daemon.api("GET", "/v2/images", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["images"],
        json!([]),
        "a refused format left an image"
    );
}

// ----- virtual size checked before the volume is touched ------------------------------------

/// A qcow2 image that fits the volume by file size but not by virtual size (2 GiB, or 1 GiB
/// and one sector, onto 1 GiB) is refused with a 400 before the volume leaves its status; its
/// data stays. Exactly 1 GiB fits, up to its last byte.
#[test]
fn qcow2_too_large_by_virtual_size_is_refused_and_volume_untouched() {
    let work = workdir();
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    let exact = work.path().join("one-gib.qcow2");
    sh_ok(&format!("qemu-img create -q -f qcow2 {} 1G", q(&exact)));
    qemu_io(
        &exact,
        &["write -P 0x71 0 64k", "write -P 0x72 1048575k 1k"],
    );
    assert_reimage_matches_qemu(&daemon, work.path(), "vol1", &exact);

    fill_volume(&daemon, "vol1", 0x3c);
    for (name, size) in [
        ("two-gib.qcow2", 2 * GIB),
        ("gib-and-sector.qcow2", GIB + 512),
    ] {
        let image = work.path().join(name);
        sh_ok(&format!("qemu-img create -q -f qcow2 {} {size}", q(&image)));
        qemu_io(&image, &["write -P 0x77 0 1M"]);
        assert!(std::fs::metadata(&image).unwrap().len() < MIB + 512 * KIB);
        let id = upload_qcow2(&daemon, &image, name);
        assert_eq!(image_view(&daemon, &id)["virtual_size"], size);
        let before = daemon.volume("vol1");

        let r = daemon.reimage("vol1", &id, false);
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        let message = r.fault_message();
        assert!(
            message.contains("virtual size") && message.contains("2GB"),
            "{name}: the refusal does not name the virtual size: {message}"
        );

        let after = daemon.volume("vol1");
        assert_eq!(after["status"], "available", "{name}: {after}");
        assert_eq!(after["reimage"], before["reimage"], "{name}: {after}");
        assert_eq!(after["updated_at"], before["updated_at"], "{name}: {after}");
        assert_eq!(
            after["volume_image_metadata"], before["volume_image_metadata"],
            "{name}: {after}"
        );
    }
    assert_volume_is(
        &daemon,
        "vol1",
        Expect::Filled(0x3c),
        "volume after the refusals",
    );
}

// ----- stored images changed on disk --------------------------------------------------------

/// Re-images and asserts the re-image ended `error` with a reason holding `expect`, and the
/// volume's old content was discarded (all zeros) with no image metadata recorded.
fn assert_reimage_fails(daemon: &Daemon, id: &str, expect: &str) {
    fill_volume(daemon, "vol1", 0xAA);
    let r = daemon.reimage("vol1", id, false);
    assert_eq!(r.status, 202, "{}", r.text());
    let view = daemon.wait_reimage("vol1", Duration::from_secs(120));
    assert_eq!(view["reimage"]["state"], "failed", "{view}");
    assert_eq!(view["status"], "error", "{view}");
    let message = view["reimage"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "a failed re-image says why: {view}");
    assert!(
        message.to_lowercase().contains(expect),
        "the failure's reason does not mention {expect:?}: {view}"
    );
    let reason = view["status_reason"].as_str().unwrap_or_default();
    assert!(reason.contains(message), "{view}");
    assert!(view.get("volume_image_metadata").is_none(), "{view}");
    assert_volume_is(
        daemon,
        "vol1",
        Expect::Zeros,
        "volume after the failed re-image",
    );
}

/// A stored compressed qcow2 cut to half its size after upload fails the re-image with a
/// reason, never succeeds with zeros, and the daemon keeps working.
#[test]
fn truncated_stored_qcow2_fails_the_reimage_instead_of_reading_zeros() {
    let work = workdir();
    let raw = work.path().join("base.raw");
    sparse_raw(&raw, 32 * MIB, &[(0, 8 * MIB)], 12);
    let image = work.path().join("compressed.qcow2");
    convert_to_qcow2(&raw, &image, "compat=1.1", "-c");
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let id = upload_qcow2(&daemon, &image, "compressed");

    let stored = stored_image(&daemon, &id);
    let len = std::fs::metadata(&stored).unwrap().len();
    assert_eq!(len, std::fs::metadata(&image).unwrap().len());
    sh_ok(&format!("truncate -s {} {}", len / 2, q(&stored)));
    assert_reimage_fails(&daemon, &id, "image");

    // The daemon keeps serving: a good image re-images the volume from `error`.
    let good = upload_qcow2(&daemon, &image, "good");
    daemon.reimage_and_wait("vol1", &good);
    let reference = work.path().join("reference.raw");
    sh_ok(&format!(
        "qemu-img convert -O raw {} {}",
        q(&image),
        q(&reference)
    ));
    assert_volume_is(
        &daemon,
        "vol1",
        Expect::ImageThenZeros(&reference),
        "volume after a good re-image",
    );
}

/// One byte changed in the middle of a stored raw or qcow2 image after upload fails the
/// re-image with a reason that names the corruption; the volume's content is discarded.
#[test]
fn flipped_byte_in_stored_image_fails_the_reimage_as_corrupt() {
    let work = workdir();
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    let raw = work.path().join("image.raw");
    random_file(&raw, 8 * MIB as usize, 13);
    let raw_id = daemon.import_image(&raw, "raw");

    let data = work.path().join("data.raw");
    random_file(&data, 8 * MIB as usize, 14);
    let qcow2 = work.path().join("image.qcow2");
    sh_ok(&format!(
        "qemu-img convert -f raw -O qcow2 {} {}",
        q(&data),
        q(&qcow2)
    ));
    let qcow2_id = upload_qcow2(&daemon, &qcow2, "qcow2");

    for id in [raw_id, qcow2_id] {
        let stored = stored_image(&daemon, &id);
        let middle = std::fs::metadata(&stored).unwrap().len() / 2 + 12345;
        let mut byte = [0u8; 1];
        File::open(&stored)
            .unwrap()
            .read_exact_at(&mut byte, middle)
            .unwrap();
        sh_ok(&format!(
            "printf '\\{:03o}' | dd of={} bs=1 seek={middle} conv=notrunc status=none",
            byte[0] ^ 0x01,
            q(&stored)
        ));
        assert_reimage_fails(&daemon, &id, "corrupt");
    }
}

/// The refill reads only the data of a stored sparse image, but what it checks covers the
/// holes too: data written into a hole, or a data block punched out, fails the re-image as
/// corrupt. An image recorded by an older volumed, with a hash of every byte instead of the
/// block hash, is still checked, holes included.
#[test]
fn changed_holes_of_a_stored_sparse_image_fail_the_reimage_as_corrupt() {
    let work = workdir();
    let mut daemon = Daemon::start();
    daemon.create_volume("vol1", 1);
    let raw = work.path().join("sparse.raw");
    sparse_raw(&raw, 32 * MIB, &[(MIB, 2 * MIB), (20 * MIB, MIB)], 21);
    let upload = |name: &str| {
        let id = daemon.import_image(&raw, name);
        let view = image_view(&daemon, &id);
        assert_eq!(view["status"], "active", "{view}");
        id
    };

    let filled_hole = upload("filled-hole");
    sh_ok(&format!(
        "printf 'x' | dd of={} bs=1 seek={} conv=notrunc status=none",
        q(&stored_image(&daemon, &filled_hole)),
        10 * MIB + 5
    ));
    assert_reimage_fails(&daemon, &filled_hole, "corrupt");

    let punched = upload("punched");
    sh_ok(&format!(
        "fallocate -p -o {} -l 4096 {}",
        MIB + 8192,
        q(&stored_image(&daemon, &punched))
    ));
    assert_reimage_fails(&daemon, &punched, "corrupt");

    // An older volumed recorded `verify_hash`, the xxh3-128 of every byte, and no block hash.
    let legacy = upload("legacy");
    let mut xxh3 = xxhash_rust::xxh3::Xxh3::new();
    xxh3.update(&std::fs::read(&raw).unwrap());
    daemon.stop();
    let state_file = daemon.state.join("state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let record = &mut state["images"][legacy.as_str()];
    assert!(record["block_hash"].is_string(), "{record}");
    record.as_object_mut().unwrap().remove("block_hash");
    record["verify_hash"] = json!(format!("{:032x}", xxh3.digest128()));
    std::fs::write(&state_file, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    daemon.spawn_and_wait();

    fill_volume(&daemon, "vol1", 0xAA);
    let after = daemon.reimage_and_wait("vol1", &legacy);
    assert_eq!(after["reimage"]["state"], "succeeded", "{after}");
    assert_volume_is(
        &daemon,
        "vol1",
        Expect::ImageThenZeros(&raw),
        "legacy image",
    );
    sh_ok(&format!(
        "printf 'x' | dd of={} bs=1 seek={} conv=notrunc status=none",
        q(&stored_image(&daemon, &legacy)),
        30 * MIB
    ));
    assert_reimage_fails(&daemon, &legacy, "corrupt");
}

/// A compressed cluster whose descriptor claims too few sectors (its stream is cut short, so
/// qemu cannot read it either) is refused at upload or fails the re-image with a reason;
/// it never succeeds with zeros or part of a cluster.
#[test]
fn compressed_cluster_cut_short_is_refused_or_fails_the_reimage() {
    let work = workdir();
    let raw = work.path().join("base.raw");
    sparse_raw(&raw, 16 * MIB, &[(0, 4 * MIB)], 15);
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    for kind in ["zlib", "zstd"] {
        let image = work.path().join(format!("cut-descriptor-{kind}.qcow2"));
        convert_to_qcow2(&raw, &image, &format!("compression_type={kind}"), "-c");

        // 64 KiB clusters: bits 0-53 hold the host offset, bits 54-61 the extra sectors.
        let at = l2_entry_at(&image, 2);
        let entry = read_be64(&image, at);
        assert_ne!(
            entry & 1 << 62,
            0,
            "{kind}: guest cluster 2 is not compressed"
        );
        assert_ne!(
            entry >> 54 & 0xff,
            0,
            "{kind}: the cluster already fits one sector"
        );
        patch(&image, at, &(entry & !(0xff << 54)).to_be_bytes());
        let qemu = sh(&format!(
            "qemu-img convert -O raw {} {}",
            q(&image),
            q(&work.path().join("qemu.raw"))
        ));
        assert!(
            !qemu.status.success(),
            "{kind}: qemu-img read the cut cluster"
        );

        let (id, r) = upload(&daemon, &image, &format!("cut-{kind}"), "qcow2");
        if r.status == 400 {
            assert!(r.fault_message().contains("qcow2"), "{kind}: {}", r.text());
            assert_ne!(image_view(&daemon, &id)["status"], "active");
            continue;
        }
        assert_eq!(r.status, 204, "{kind}: {}", r.text());
        assert_reimage_fails(&daemon, &id, "compressed");
    }
}

/// Bytes changed inside compressed clusters before upload (deflate and zstd carry no
/// checksum, so qemu reads them as other bytes): the re-image either fails with a reason or
/// writes exactly what qemu reads, never anything else.
#[test]
fn damaged_compressed_payload_fails_or_matches_qemu() {
    let work = workdir();
    let raw = work.path().join("base.raw");
    sparse_raw(&raw, 16 * MIB, &[(0, 8 * MIB)], 16);
    let daemon = Daemon::start();
    daemon.create_volume("vol1", 1);

    for kind in ["zlib", "zstd"] {
        let image = work.path().join(format!("damaged-{kind}.qcow2"));
        convert_to_qcow2(&raw, &image, &format!("compression_type={kind}"), "-c");
        let len = std::fs::metadata(&image).unwrap().len();
        patch(&image, len / 2, &[0u8; 4096]);
        patch(&image, len / 3, &[0xffu8; 100]);

        let reference = work.path().join(format!("damaged-{kind}.raw"));
        let qemu = sh(&format!(
            "qemu-img convert -O raw {} {}",
            q(&image),
            q(&reference)
        ));
        let (id, r) = upload(&daemon, &image, &format!("damaged-{kind}"), "qcow2");
        assert!(r.status == 204 || r.status == 400, "{kind}: {}", r.text());
        if r.status == 400 {
            continue;
        }

        fill_volume(&daemon, "vol1", 0xAA);
        let r = daemon.reimage("vol1", &id, false);
        assert_eq!(r.status, 202, "{kind}: {}", r.text());
        let view = daemon.wait_reimage("vol1", Duration::from_secs(120));
        match view["reimage"]["state"].as_str() {
            Some("succeeded") => {
                assert!(
                    qemu.status.success(),
                    "{kind}: qemu cannot read the image but the re-image succeeded: {view}"
                );
                let what = format!("{kind}: re-image of a damaged image");
                assert_volume_is(&daemon, "vol1", Expect::ImageThenZeros(&reference), &what);
            }
            Some("failed") => {
                assert_eq!(view["status"], "error", "{kind}: {view}");
                assert!(view["reimage"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()));
                assert_volume_is(&daemon, "vol1", Expect::Zeros, "failed re-image");
                // Leave `error` for the next image.
                let r = daemon.api(
                    "POST",
                    &format!("/v3/volumes/{}/action", view["id"].as_str().unwrap()),
                    Some(json!({"os-reset_status": {"status": "available"}})),
                );
                assert_eq!(r.status, 202, "{}", r.text());
            }
            _ => panic!("{kind}: unexpected end of the re-image: {view}"),
        }
    }
}

/// A stored qcow2 image (dense or compressed) that shrinks while the refill writes it ends
/// the volume in `error` with a reason and the content discarded; the daemon lives on.
#[test]
fn qcow2_image_shrinking_during_refill_ends_error_and_daemon_serves() {
    let work = workdir();
    let daemon = Daemon::start_with("refill_rate_limit = 4\nrefill_window_mib = 1");
    daemon.create_volume("vol1", 1);

    let dense_raw = work.path().join("dense.raw");
    random_file(&dense_raw, 16 * MIB as usize, 17);
    let dense = work.path().join("dense.qcow2");
    convert_to_qcow2(&dense_raw, &dense, "compat=1.1", "");
    let packed_raw = work.path().join("packed.raw");
    sparse_raw(&packed_raw, 48 * MIB, &[(0, 48 * MIB)], 18);
    let packed = work.path().join("packed.qcow2");
    convert_to_qcow2(&packed_raw, &packed, "compat=1.1,cluster_size=4k", "-c");

    for image in [dense, packed] {
        let label = image.file_name().unwrap().to_string_lossy().into_owned();
        let id = upload_qcow2(&daemon, &image, &label);
        let stored = stored_image(&daemon, &id);
        let len = std::fs::metadata(&stored).unwrap().len();

        fill_volume(&daemon, "vol1", 0xAA);
        let r = daemon.reimage("vol1", &id, false);
        assert_eq!(r.status, 202, "{label}: {}", r.text());
        // Shrink the file once the refill writes (after it hashed the whole file).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let view = daemon.volume("vol1");
            assert_eq!(
                view["status"], "downloading",
                "{label}: ended early: {view}"
            );
            if view["reimage"]["bytes_done"].as_u64().unwrap_or(0) > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{label}: no progress: {view}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sh_ok(&format!("truncate -s {} {}", len / 4, q(&stored)));

        let view = daemon.wait_reimage("vol1", Duration::from_secs(120));
        assert_eq!(view["reimage"]["state"], "failed", "{label}: {view}");
        assert_eq!(view["status"], "error", "{label}: {view}");
        let message = view["reimage"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("image"), "{label}: {view}");
        assert_volume_is(&daemon, "vol1", Expect::Zeros, &label);
        assert_eq!(daemon.mount_entries(), 1, "{label}");
        assert!(
            daemon.log_text().contains("re-image failed"),
            "{label}: {}",
            daemon.log_text()
        );
    }
    // The same process still serves the API and the volume.
    daemon.create_volume("after", 1);
    assert_eq!(daemon.status("vol1"), "error");
}
