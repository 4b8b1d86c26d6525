//! The README's story, end to end: create, mkfs, loop mount, import, re-image, find the image.
//!
//! A real directory tree becomes an ext4 image (`mkfs.ext4 -d`); a volume gets a file system
//! and some old data through a loop device; then the volume is re-imaged through each front
//! end a user has (`volumectl reimage --wait`, raw HTTP with curl, and a line written to the
//! control file). After each, the volume must hold exactly the image's tree, pass `e2fsck`,
//! and keep nothing of the old data.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Size of the ext4 image built from the tree.
const IMAGE_MIB: u64 = 32;

#[test]
fn harness_starts_and_stops_a_daemon() {
    let mut daemon = Daemon::start();
    assert!(daemon.mnt.join(".control").exists());
    assert_eq!(daemon.mount_entries(), 1);
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    assert_eq!(daemon.mount_entries(), 0);
    assert!(!daemon.socket.exists());
}

/// The README story: volumectl, then curl, then the control file each re-image the volume
/// to exactly the image's tree, and nothing of the old file system survives.
#[test]
fn readme_story_reimages_to_the_image_tree_through_every_front_end() {
    for tool in [
        "mkfs.ext4",
        "e2fsck",
        "losetup",
        "mount",
        "umount",
        "diff",
        "curl",
    ] {
        require(tool);
    }
    let daemon = Daemon::start();
    let work = daemon.dir.path().join("work");
    let tree = build_tree(&work);
    let image = build_ext4_image(&tree, &work.join("image.raw"));

    // Create the volume as the README does.
    let out = daemon.volumectl(&["create", "vol1", "--size", "1"]);
    assert_success(&out, "volumectl create vol1 --size 1");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("vol1"),
        "create does not name the volume: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let file = daemon.vol("vol1");
    let size = std::fs::metadata(&file).unwrap().len();
    assert_eq!(size, 1 << 30, "vol1 is not 1 GiB in the mount");
    put_old_file_system(&file, &work);

    // Import and re-image with volumectl, waiting for the end.
    let image_arg = image.to_str().unwrap();
    let out = daemon.volumectl(&["image", "import", image_arg, "--name", "base"]);
    assert_success(&out, "volumectl image import");
    let image_id = image_id_by_name(&daemon, "base");

    let out = daemon.volumectl(&["reimage", "vol1", "base", "--wait"]);
    assert_success(&out, "volumectl reimage vol1 base --wait");
    let view = daemon.volume("vol1");
    assert_reimaged_view(&view, &image_id);
    assert_volume_holds_tree(&file, &tree, &work);

    // The same through raw HTTP, as `curl --unix-socket` sends it.
    put_old_file_system(&file, &work);
    let body = format!(r#"{{"os-reimage": {{"image_id": "{image_id}"}}}}"#);
    let script = format!(
        "curl -sS --unix-socket {} -o {} -w '%{{http_code}}' -X POST \
         -H 'Content-Type: application/json' -H 'OpenStack-API-Version: volume 3.68' \
         -d {} http://localhost/v3/volumes/vol1/action",
        quote(&daemon.socket),
        quote(&work.join("curl-body")),
        quote_str(&body)
    );
    let code = sh_ok(&script);
    assert_eq!(code.trim(), "202", "curl re-image");
    let reply = std::fs::read(work.join("curl-body")).unwrap();
    assert!(reply.is_empty(), "202 must have an empty body: {reply:?}");
    let view = daemon.wait_reimage("vol1", Duration::from_secs(120));
    assert_reimaged_view(&view, &image_id);
    assert_volume_holds_tree(&file, &tree, &work);

    // And through the control file, by image name.
    put_old_file_system(&file, &work);
    let control = daemon.mnt.join(".control");
    sh_ok(&format!("echo 'reimage vol1 base' > {}", quote(&control)));
    let view = daemon.wait_reimage("vol1", Duration::from_secs(120));
    assert_reimaged_view(&view, &image_id);
    assert_volume_holds_tree(&file, &tree, &work);
}

/// Every volumectl command of the story prints parseable JSON with `--json`.
#[test]
fn volumectl_json_output_parses_for_every_story_command() {
    let daemon = Daemon::start();
    let work = daemon.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let image = work.join("small.raw");
    random_file(&image, 1 << 20, 7);
    let image_arg = image.to_str().unwrap();

    let created = json_of(&daemon, &["--json", "create", "vol1", "--size", "1"]);
    assert_eq!(created["volume"]["name"], "vol1", "{created}");
    assert_eq!(created["volume"]["size"], 1, "{created}");

    let imported = json_of(
        &daemon,
        &["--json", "image", "import", image_arg, "--name", "base"],
    );
    assert_eq!(imported["name"], "base", "{imported}");
    assert_eq!(imported["status"], "active", "{imported}");
    assert_eq!(imported["size"], 1 << 20, "{imported}");

    let reimaged = json_of(&daemon, &["--json", "reimage", "vol1", "base", "--wait"]);
    assert!(reimaged.is_object(), "{reimaged}");

    let shown = json_of(&daemon, &["--json", "show", "vol1"]);
    assert_eq!(shown["volume"]["status"], "available", "{shown}");
    assert_eq!(shown["volume"]["bootable"], "true", "{shown}");
    assert_eq!(
        shown["volume"]["volume_image_metadata"]["image_name"], "base",
        "{shown}"
    );

    let listed = json_of(&daemon, &["--json", "list"]);
    let names = names_in(&listed, "volumes");
    assert_eq!(names, ["vol1"], "{listed}");

    let images = json_of(&daemon, &["--json", "image", "list"]);
    assert_eq!(names_in(&images, "images"), ["base"], "{images}");

    let image_view = json_of(&daemon, &["--json", "image", "show", "base"]);
    assert_eq!(image_view["name"], "base", "{image_view}");
}

// ----- helpers ---------------------------------------------------------------------------

/// A loop device attached by the test; detached when dropped, whatever happened.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path, read_only: bool) -> Self {
        let flag = if read_only { "--read-only " } else { "" };
        let out = sh_ok(&format!("losetup --find --show {flag}{}", quote(file)));
        let device = out.trim().to_string();
        assert!(device.starts_with("/dev/loop"), "losetup said {out:?}");
        LoopDevice(device)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = sh(&format!("losetup -d {}", self.0));
    }
}

/// A file system mounted by the test; unmounted when dropped (lazily as a last resort).
struct Mounted(PathBuf);

impl Mounted {
    fn new(device: &LoopDevice, dir: &Path, options: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        sh_ok(&format!("mount -o {options} {} {}", device.0, quote(dir)));
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let dir = quote(&self.0);
        let _ = sh(&format!("umount {dir} || umount -l {dir}"));
    }
}

fn quote(path: &Path) -> String {
    quote_str(path.to_str().expect("test paths are UTF-8"))
}

fn quote_str(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn assert_success(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds a small root-file-system-like tree: text, binary, empty and hidden files,
/// a name with spaces, nested and empty directories, file and directory symlinks.
fn build_tree(work: &Path) -> PathBuf {
    let tree = work.join("tree");
    for dir in [
        "etc",
        "usr/bin",
        "usr/lib/deep/er",
        "var/log",
        "var/cache",
        "home/user",
    ] {
        std::fs::create_dir_all(tree.join(dir)).unwrap();
    }
    std::fs::write(tree.join("etc/hostname"), "volumed-test\n").unwrap();
    let motd: String = (0..200)
        .map(|i| format!("line {i} of the motd\n"))
        .collect();
    std::fs::write(tree.join("etc/motd"), motd).unwrap();
    random_file(&tree.join("usr/bin/tool"), 300 * 1024 + 17, 1);
    random_file(&tree.join("usr/lib/deep/er/libdata.so"), 2 << 20, 2);
    std::fs::write(tree.join("var/log/empty"), "").unwrap();
    std::fs::write(tree.join("home/user/.profile"), "export PS1='$ '\n").unwrap();
    std::fs::write(tree.join("home/user/name with spaces.txt"), "spaces\n").unwrap();
    std::os::unix::fs::symlink("tool", tree.join("usr/bin/link")).unwrap();
    std::os::unix::fs::symlink("usr/bin", tree.join("bin")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", tree.join("etc/dangling")).unwrap();
    tree
}

fn build_ext4_image(tree: &Path, image: &Path) -> PathBuf {
    sh_ok(&format!(
        "truncate -s {IMAGE_MIB}M {0} && mkfs.ext4 -q -F -d {1} {0}",
        quote(image),
        quote(tree)
    ));
    sh_ok(&format!("e2fsck -fn {}", quote(image)));
    image.to_path_buf()
}

/// Gives the volume a fresh ext4 file system holding `old-data.txt`, through a loop device.
fn put_old_file_system(volume: &Path, work: &Path) {
    sh_ok(&format!("mkfs.ext4 -q -F {}", quote(volume)));
    let device = LoopDevice::attach(volume, false);
    let mounted = Mounted::new(&device, &work.join("old"), "rw");
    std::fs::write(mounted.0.join("old-data.txt"), "old secret\n".repeat(1000)).unwrap();
    std::fs::create_dir(mounted.0.join("old-dir")).unwrap();
    drop(mounted);
    drop(device);
}

/// Mounts the volume read-only and compares it with the tree: same files, same bytes,
/// same symlink targets, nothing else but mkfs's `lost+found`.
fn assert_volume_holds_tree(volume: &Path, tree: &Path, work: &Path) {
    let fsck = sh(&format!("e2fsck -fn {}", quote(volume)));
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the re-imaged volume: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    let device = LoopDevice::attach(volume, true);
    let mounted = Mounted::new(&device, &work.join("check"), "ro");
    let root = &mounted.0;
    let diff = sh(&format!(
        "diff -r --no-dereference -x lost+found {} {}",
        quote(tree),
        quote(root)
    ));
    assert!(
        diff.status.success(),
        "the volume differs from the image's tree:\n{}{}",
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );

    for (link, target) in [
        ("usr/bin/link", "tool"),
        ("bin", "usr/bin"),
        ("etc/dangling", "/nowhere/at/all"),
    ] {
        let found = std::fs::read_link(root.join(link)).unwrap();
        assert_eq!(found, Path::new(target), "symlink {link}");
    }
    assert!(!root.join("old-data.txt").exists(), "the old file survived");
    assert!(!root.join("old-dir").exists(), "the old directory survived");

    let mut top: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["bin", "etc", "home", "lost+found", "usr", "var"]);
}

fn assert_reimaged_view(view: &Value, image_id: &str) {
    assert_eq!(view["status"], "available", "{view}");
    assert_eq!(view["bootable"], "true", "{view}");
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
    assert_eq!(view["reimage"]["image_id"], image_id, "{view}");
    let meta = &view["volume_image_metadata"];
    assert_eq!(meta["image_id"], image_id, "{view}");
    assert_eq!(meta["image_name"], "base", "{view}");
}

/// The id of the image called `name`, asserting it is active.
fn image_id_by_name(daemon: &Daemon, name: &str) -> String {
    let r = daemon.api("GET", &format!("/v2/images/{name}"), None);
    assert_eq!(r.status, 200, "image {name}: {}", r.text());
    let image = r.json();
    assert_eq!(image["status"], "active", "{image}");
    image["id"].as_str().unwrap().to_string()
}

/// Runs volumectl, asserts success, and parses its stdout as one JSON document.
fn json_of(daemon: &Daemon, args: &[&str]) -> Value {
    let out = daemon.volumectl(args);
    assert_success(&out, &format!("volumectl {}", args.join(" ")));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "volumectl {} printed no JSON ({e}): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn names_in(listing: &Value, key: &str) -> Vec<String> {
    listing[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} array: {listing}"))
        .iter()
        .map(|v| v["name"].as_str().unwrap_or_default().to_string())
        .collect()
}
