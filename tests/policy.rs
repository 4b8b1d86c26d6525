//! Who may re-image what: the policies over both front ends (the socket and the control
//! file), as root and as an unprivileged user (uid nobody, via `setpriv`), the kernel's
//! permission checks on volume files, the control file's errno for each refusal, and policy
//! reload on SIGHUP. A refused request must change nothing.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// setpriv credentials of uid nobody with only its primary group, nogroup.
const NOBODY: &str = "--reuid=nobody --regid=nogroup --clear-groups";

/// uid nobody with the supplementary group `users` (gid 100).
const NOBODY_IN_USERS: &str = "--reuid=nobody --regid=nogroup --groups=users";

/// The owner uid of volumes created for nobody.
const NOBODY_UID: u32 = 65534;

/// What bash prints when the write to the control file fails with each errno.
const EACCES: &str = "write error: Permission denied";
const ENOENT: &str = "write error: No such file or directory";
const EBUSY: &str = "write error: Device or resource busy";
const EFBIG: &str = "write error: File too large";
const EINVAL: &str = "write error: Invalid argument";

/// The owner re-images their own volume over the socket; root's image is usable by them.
#[test]
fn owner_reimages_own_volume_over_the_socket_as_nobody() {
    let (d, image) = setup("");

    let (code, body) = reimage_as(&d, NOBODY, "mine", &image, false);
    assert_eq!(code, 202, "{body}");
    assert_eq!(body, "", "202 has an empty body");
    let view = wait_done(&d, "mine");
    assert_eq!(view["status"], "available", "{view}");
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
    assert_eq!(view["volume_image_metadata"]["image_id"], image, "{view}");
}

/// The owner re-images their own volume with a line written to the control file.
#[test]
fn owner_reimages_own_volume_through_the_control_file_as_nobody() {
    let (d, image) = setup("");

    control_ok(&d, NOBODY, "reimage mine base");
    let view = wait_done(&d, "mine");
    assert_eq!(view["status"], "available", "{view}");
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
    assert_eq!(view["volume_image_metadata"]["image_id"], image, "{view}");
}

/// Another user's volume is invisible to nobody on the socket: 404 for show and re-image,
/// and nothing changes.
#[test]
fn nobody_cannot_reimage_roots_volume_over_the_socket() {
    let (d, image) = setup("");
    let before = snapshot(&d, "roots");

    let (code, body) = curl_as(&d, NOBODY, "GET", "/v3/volumes/roots", None);
    assert_fault(code, &body, 404);
    let (code, body) = reimage_as(&d, NOBODY, "roots", &image, false);
    let message = assert_fault(code, &body, 404);
    assert!(message.contains("roots"), "{message}");
    let (code, body) = reimage_as(&d, NOBODY, "roots", &image, true);
    assert_fault(code, &body, 404);

    let (code, body) = curl_as(&d, NOBODY, "GET", "/v3/volumes", None);
    assert_eq!(code, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = listed["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mine"], "nobody lists only their own volume");

    assert_eq!(snapshot(&d, "roots"), before);
    assert_marker(&d, "roots");
}

/// Through the control file, another user's volume does not exist for nobody (ENOENT).
#[test]
fn nobody_cannot_reimage_roots_volume_through_the_control_file() {
    let (d, _image) = setup("");
    let before = snapshot(&d, "roots");

    control_fails(&d, NOBODY, "reimage roots base", ENOENT);
    control_fails(&d, NOBODY, "reimage roots base reimage_reserved", ENOENT);

    assert_eq!(snapshot(&d, "roots"), before);
    assert_marker(&d, "roots");
}

/// Root, an administrator, re-images another user's volume through both front ends.
#[test]
fn root_reimages_any_volume_over_the_socket_and_the_control_file() {
    let (d, image) = setup("");

    let view = d.reimage_and_wait("mine", &image);
    assert_eq!(view["status"], "available", "{view}");
    assert_eq!(
        view["owner_uid"], NOBODY_UID,
        "the owner stays nobody: {view}"
    );

    control_ok(
        &d,
        "--reuid=root --regid=root --clear-groups",
        "reimage mine base",
    );
    let view = wait_done(&d, "mine");
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
}

/// `"volume:reimage" = "role:admin"` denies the owner with 403 and EACCES, changes nothing,
/// and still lets root re-image the owner's volume.
#[test]
fn admin_only_reimage_policy_denies_the_owner() {
    let (d, image) = setup("[policy]\n\"volume:reimage\" = \"role:admin\"\n");
    let before = snapshot(&d, "mine");

    let (code, body) = reimage_as(&d, NOBODY, "mine", &image, false);
    let message = assert_fault(code, &body, 403);
    assert!(message.contains("volume:reimage"), "{message}");
    control_fails(&d, NOBODY, "reimage mine base", EACCES);
    assert_eq!(snapshot(&d, "mine"), before);
    assert_marker(&d, "mine");

    // The owner still sees the volume: it is the re-image that is denied.
    let (code, body) = curl_as(&d, NOBODY, "GET", "/v3/volumes/mine", None);
    assert_eq!(code, 200, "{body}");

    let view = d.reimage_and_wait("mine", &image);
    assert_eq!(view["status"], "available", "{view}");
    control_ok(
        &d,
        "--reuid=root --regid=root --clear-groups",
        "reimage mine base",
    );
    wait_done(&d, "mine");
}

/// `"volume:reimage" = "!"` denies everyone, root included, on both front ends.
#[test]
fn never_policy_denies_even_root() {
    let (d, image) = setup("[policy]\n\"volume:reimage\" = \"!\"\n");
    let before = snapshot(&d, "roots");

    let r = d.reimage("roots", &image, false);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["forbidden"]["code"], 403, "{}", r.text());
    assert_eq!(
        control_errno(&d, b"reimage roots base\n"),
        Some(libc::EACCES)
    );
    control_fails(
        &d,
        "--reuid=root --regid=root --clear-groups",
        "reimage roots base",
        EACCES,
    );

    assert_eq!(snapshot(&d, "roots"), before);
    assert_marker(&d, "roots");
}

/// The policy is chosen by the volume's status: with `volume:reimage_reserved` for admins
/// only, the owner of a reserved volume gets 403 (not 400) even with the flag false, while
/// their available volume is still theirs to re-image.
#[test]
fn reimage_reserved_policy_is_chosen_by_status_even_with_flag_false() {
    let (d, image) = setup("[policy]\n\"volume:reimage_reserved\" = \"role:admin\"\n");
    let spare = create_volume_for_nobody(&d, "spare");
    reserve(&d, "mine");
    let before = snapshot(&d, "mine");
    assert_eq!(before["status"], "reserved");

    for flag in [false, true] {
        let (code, body) = reimage_as(&d, NOBODY, "mine", &image, flag);
        let message = assert_fault(code, &body, 403);
        assert!(
            message.contains("volume:reimage_reserved"),
            "{flag}: {message}"
        );
    }
    control_fails(&d, NOBODY, "reimage mine base", EACCES);
    control_fails(&d, NOBODY, "reimage mine base reimage_reserved", EACCES);
    assert_eq!(snapshot(&d, "mine"), before);
    assert_marker(&d, "mine");

    let (code, body) = reimage_as(&d, NOBODY, &spare, &image, false);
    assert_eq!(code, 202, "{body}");
    wait_done(&d, &spare);

    // Root passes the policy; then the status decides.
    let r = d.reimage("mine", &image, false);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(snapshot(&d, "mine"), before);
    let r = d.reimage("mine", &image, true);
    assert_eq!(r.status, 202, "{}", r.text());
    let view = wait_done(&d, "mine");
    assert_eq!(view["status"], "reserved", "{view}");
}

/// `group:NAME` matches supplementary groups (read from the kernel, not the request) and the
/// primary group, and grants nothing to others, root included.
#[test]
fn group_rules_match_the_callers_groups() {
    let policy = "[policy]\n\"volume:reimage\" = \"group:users\"\n\
                  \"volume:reimage_reserved\" = \"group:nogroup\"\n";
    let (d, image) = setup(policy);
    let reserved = create_volume_for_nobody(&d, "reserved-one");
    reserve(&d, &reserved);
    let before = snapshot(&d, "mine");

    // Without the group: denied on both front ends.
    let (code, body) = reimage_as(&d, NOBODY, "mine", &image, false);
    assert_fault(code, &body, 403);
    control_fails(&d, NOBODY, "reimage mine base", EACCES);
    assert_eq!(snapshot(&d, "mine"), before);

    // With users as a supplementary group: allowed on both.
    let (code, body) = reimage_as(&d, NOBODY_IN_USERS, "mine", &image, false);
    assert_eq!(code, 202, "{body}");
    wait_done(&d, "mine");
    control_ok(&d, NOBODY_IN_USERS, "reimage mine base");
    wait_done(&d, "mine");

    // nogroup is nobody's primary group: it counts.
    let (code, body) = reimage_as(&d, NOBODY, &reserved, &image, true);
    assert_eq!(code, 202, "{body}");
    let view = wait_done(&d, &reserved);
    assert_eq!(view["status"], "reserved", "{view}");

    // Root is in neither group, and the rule names no admin.
    let r = d.reimage("roots", &image, false);
    assert_eq!(r.status, 403, "{}", r.text());
    let r = d.reimage(&reserved, &image, true);
    assert_eq!(r.status, 403, "{}", r.text());
}

/// Members of the configured admin group are administrators: they see, re-image and reset
/// other users' volumes; without the group the same user is not.
#[test]
fn admin_group_members_are_administrators() {
    let (d, image) = setup("admin_group = \"users\"\n");
    let before = snapshot(&d, "roots");

    let (code, body) = reimage_as(&d, NOBODY, "roots", &image, false);
    assert_fault(code, &body, 404);
    let reset = r#"{"os-reset_status": {"status": "error"}}"#;
    let (code, body) = curl_as(&d, NOBODY, "POST", "/v3/volumes/mine/action", Some(reset));
    assert_fault(code, &body, 403);
    assert_eq!(snapshot(&d, "roots"), before);
    assert_eq!(d.status("mine"), "available");

    let (code, body) = reimage_as(&d, NOBODY_IN_USERS, "roots", &image, false);
    assert_eq!(code, 202, "{body}");
    wait_done(&d, "roots");
    control_ok(&d, NOBODY_IN_USERS, "reimage roots base");
    wait_done(&d, "roots");
    let path = "/v3/volumes/roots/action";
    let (code, body) = curl_as(&d, NOBODY_IN_USERS, "POST", path, Some(reset));
    assert_eq!(code, 202, "{body}");
    assert_eq!(d.status("roots"), "error");
}

/// Volume files are mode 0660, owned by the owner and the owner's group; the kernel lets
/// the owner (and the group) read and write their volume and refuses root's to them.
#[test]
fn volume_files_are_0660_and_the_kernel_enforces_it() {
    use std::os::unix::fs::MetadataExt;
    let (d, _image) = setup("");

    let mine = std::fs::metadata(d.vol("mine")).unwrap();
    assert_eq!(mine.mode() & 0o7777, 0o660);
    assert_eq!((mine.uid(), mine.gid()), (NOBODY_UID, 65534));
    let roots = std::fs::metadata(d.vol("roots")).unwrap();
    assert_eq!(roots.mode() & 0o7777, 0o660);
    assert_eq!((roots.uid(), roots.gid()), (0, 0));

    let mnt = d.mnt.to_str().unwrap();
    let read = |file: &str| format!("head -c 4096 {mnt}/{file} | wc -c");
    let write = |file: &str| {
        format!("printf owner | dd of={mnt}/{file} bs=4096 seek=1 conv=notrunc status=none")
    };

    assert_eq!(stdout_ok(&as_user(NOBODY, &read("mine"))).trim(), "4096");
    stdout_ok(&as_user(NOBODY, &write("mine")));
    assert_eq!(read_direct(&d.vol("mine"), 4096, 4096)[..5], *b"owner");

    // uid 1 (daemon) in group nogroup: the group bits apply.
    let group_member = "--reuid=1 --regid=nogroup --clear-groups";
    assert_eq!(
        stdout_ok(&as_user(group_member, &read("mine"))).trim(),
        "4096"
    );

    for creds in [NOBODY, group_member] {
        let out = as_user(creds, &format!("head -c 4096 {mnt}/roots > /dev/null"));
        assert_denied(&out);
        let out = as_user(creds, &write("roots"));
        assert_denied(&out);
    }
    assert_marker(&d, "roots");
    assert_eq!(d.status("roots"), "available");
}

/// Each refusal through the control file has its errno (ENOENT, EBUSY, EFBIG, EINVAL), as
/// root and as the owner, and none of them changes anything.
#[test]
fn control_file_errnos_fit_each_refusal_and_change_nothing() {
    let (d, image) = setup("");
    let root_volume_id = d.volume("roots")["id"].as_str().unwrap().to_string();

    // Fixtures: an image that needs 2 GiB, a reserved volume, one with two attachments.
    let big = d.dir.path().join("needs-two.raw");
    random_file(&big, 4096, 9);
    let r = d.api(
        "POST",
        "/v2/images",
        Some(json!({"name": "needs-two", "disk_format": "raw", "min_disk": 2})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let needs_two = r.json()["id"].as_str().unwrap().to_string();
    upload(&d, &needs_two, &big);
    let held = create_volume_for_nobody(&d, "held");
    reserve(&d, &held);
    let shared = create_volume_for_nobody(&d, "shared");
    let instance = "5d3f1e0a-51b1-4c7e-9d7a-0f0d3c8b6a21";
    reserve_for(&d, &shared, Some(instance));
    reserve_for(&d, &shared, Some(instance));

    let unknown = "4c7f3b8e-7a1d-4c55-b3a2-8f6e0d1c2b3a";
    let root_cases: Vec<(String, i32)> = vec![
        ("reimage nosuch base\n".into(), libc::ENOENT),
        (format!("reimage {unknown} base\n"), libc::ENOENT),
        ("reimage roots nosuch\n".into(), libc::ENOENT),
        (format!("reimage roots {unknown}\n"), libc::ENOENT),
        ("reimage held base\n".into(), libc::EBUSY),
        ("reimage shared base reimage_reserved\n".into(), libc::EBUSY),
        ("reimage shared base\n".into(), libc::EBUSY),
        ("reimage roots needs-two\n".into(), libc::EFBIG),
        (
            format!("reimage {root_volume_id} {needs_two}\n"),
            libc::EFBIG,
        ),
        ("reimage roots\n".into(), libc::EINVAL),
        ("reimage\n".into(), libc::EINVAL),
        ("\n".into(), libc::EINVAL),
        ("frobnicate roots base\n".into(), libc::EINVAL),
        ("reimage roots base yes\n".into(), libc::EINVAL),
        (
            "reimage roots base reimage_reserved extra\n".into(),
            libc::EINVAL,
        ),
        (
            "reimage roots base\nreimage mine base\n".into(),
            libc::EINVAL,
        ),
        (format!("reimage roots {image} true\n"), libc::EINVAL),
    ];
    let volumes = ["roots", "mine", "held", "shared"];
    let before: Vec<Value> = volumes.iter().map(|v| snapshot(&d, v)).collect();

    for (line, errno) in &root_cases {
        assert_eq!(
            control_errno(&d, line.as_bytes()),
            Some(*errno),
            "root wrote {line:?}"
        );
    }
    assert_eq!(
        control_errno(&d, b"reimage roots \xff\xfe\n"),
        Some(libc::EINVAL),
        "not UTF-8"
    );

    for (line, expected) in [
        ("reimage mine nosuch", ENOENT),
        ("reimage held base", EBUSY),
        ("reimage shared base reimage_reserved", EBUSY),
        ("reimage mine needs-two", EFBIG),
        ("reimage mine", EINVAL),
        ("please reimage mine base", EINVAL),
    ] {
        control_fails(&d, NOBODY, line, expected);
    }

    let after: Vec<Value> = volumes.iter().map(|v| snapshot(&d, v)).collect();
    assert_eq!(after, before, "a refused control line changed a volume");
    assert_marker(&d, "roots");
    assert_marker(&d, "mine");

    // A good line still works afterwards.
    control_ok(&d, NOBODY, "reimage mine base");
    assert_eq!(wait_done(&d, "mine")["reimage"]["state"], "succeeded");
}

/// SIGHUP reloads the policy from the config file: a stricter rule applies to the next
/// request on both front ends, a broken file keeps the rules in force, and relaxing works.
#[test]
fn sighup_reloads_the_policy() {
    let (d, image) = setup("");
    let original = std::fs::read_to_string(&d.config).unwrap();

    let (code, body) = reimage_as(&d, NOBODY, "mine", &image, false);
    assert_eq!(code, 202, "{body}");
    wait_done(&d, "mine");

    // Stricter.
    let strict = format!("{original}\n[policy]\n\"volume:reimage\" = \"role:admin\"\n");
    reload(&d, &strict, "policies reloaded");
    let before = snapshot(&d, "mine");
    let (code, body) = reimage_as(&d, NOBODY, "mine", &image, false);
    assert_fault(code, &body, 403);
    control_fails(&d, NOBODY, "reimage mine base", EACCES);
    assert_eq!(snapshot(&d, "mine"), before);
    let r = d.reimage("mine", &image, false);
    assert_eq!(r.status, 202, "root is still allowed: {}", r.text());
    wait_done(&d, "mine");

    // A broken file is refused and the strict rules stay.
    let broken = format!("{original}\n[policy]\n\"volume:reimage\" = \"role:\"\n");
    reload(&d, &broken, "policies not reloaded");
    let (code, body) = reimage_as(&d, NOBODY, "mine", &image, false);
    assert_fault(code, &body, 403);

    // Back to the defaults.
    reload(&d, &original, "policies reloaded");
    let (code, body) = reimage_as(&d, NOBODY, "mine", &image, false);
    assert_eq!(code, 202, "{body}");
    wait_done(&d, "mine");
    control_ok(&d, NOBODY, "reimage mine base");
    wait_done(&d, "mine");
}

// ----- helpers ---------------------------------------------------------------------------

/// A daemon reachable by other users, with an image `base` (root's, shared), a volume
/// `mine` owned by nobody and a volume `roots` owned by root, each marked at offset 0.
fn setup(extra: &str) -> (Daemon, String) {
    require("setpriv");
    require("curl");
    require("bash");
    let d = Daemon::start_with(extra);

    let file = d.dir.path().join("base.raw");
    random_file(&file, 1 << 20, 1);
    let image = d.import_image(&file, "base");
    create_volume_for_nobody(&d, "mine");
    d.create_volume("roots", 1);
    for volume in ["mine", "roots"] {
        write_marker(&d, volume);
    }
    (d, image)
}

fn create_volume_for_nobody(d: &Daemon, name: &str) -> String {
    let r = d.api(
        "POST",
        "/v3/volumes",
        Some(json!({"volume": {"name": name, "size": 1, "owner": NOBODY_UID}})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["volume"]["owner_uid"], NOBODY_UID);
    name.to_string()
}

/// Quotes `text` for a shell.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Runs `script` with bash under the setpriv credentials `creds`.
fn as_user(creds: &str, script: &str) -> Output {
    sh(&format!("setpriv {creds} bash -c {}", quote(script)))
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_denied(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Permission denied"),
        "expected EACCES from the kernel, got {}: {stderr}",
        out.status
    );
}

/// A request with curl under `creds`; returns the status and the body.
fn curl_as(d: &Daemon, creds: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let data = body.map(|b| format!("-d {}", quote(b))).unwrap_or_default();
    let script = format!(
        "curl -sS --unix-socket {} -X {method} -H 'Content-Type: application/json' \
         -H 'OpenStack-API-Version: volume 3.68' {data} -w '\\n%{{http_code}}' \
         http://localhost{path}",
        quote(d.socket.to_str().unwrap())
    );
    let out = stdout_ok(&as_user(creds, &script));
    let (body, code) = out.rsplit_once('\n').expect("curl printed a status");
    (code.trim().parse().unwrap(), body.to_string())
}

fn reimage_as(d: &Daemon, creds: &str, volume: &str, image: &str, flag: bool) -> (u16, String) {
    let body = json!({"os-reimage": {"image_id": image, "reimage_reserved": flag}});
    let path = format!("/v3/volumes/{volume}/action");
    curl_as(d, creds, "POST", &path, Some(&body.to_string()))
}

/// Asserts a fault body of status `code`; returns its message.
fn assert_fault(code: u16, body: &str, expected: u16) -> String {
    assert_eq!(code, expected, "{body}");
    let fault: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("fault is not JSON ({e}): {body}"));
    let name = match expected {
        403 => "forbidden",
        404 => "itemNotFound",
        400 => "badRequest",
        other => panic!("no fault name known for {other}"),
    };
    assert_eq!(fault[name]["code"], expected, "{body}");
    let message = fault[name]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{body}");
    message.to_string()
}

/// Writes `line` (plus a newline) to the control file as `creds`; asserts success.
fn control_ok(d: &Daemon, creds: &str, line: &str) {
    let out = as_user(creds, &control_script(d, line));
    stdout_ok(&out);
}

/// Writes `line` to the control file as `creds`; asserts the shell reports `error`.
fn control_fails(d: &Daemon, creds: &str, line: &str, error: &str) {
    let out = as_user(creds, &control_script(d, line));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(error),
        "{creds} wrote {line:?}: expected {error:?}, got {}: {stderr}",
        out.status
    );
}

fn control_script(d: &Daemon, line: &str) -> String {
    let control = d.mnt.join(".control");
    format!(
        "echo {} > {}",
        quote(line),
        quote(control.to_str().unwrap())
    )
}

/// Writes `bytes` to the control file in one write as root; the errno, if it failed.
fn control_errno(d: &Daemon, bytes: &[u8]) -> Option<i32> {
    let mut control = std::fs::OpenOptions::new()
        .write(true)
        .open(d.mnt.join(".control"))
        .unwrap();
    match control.write(bytes) {
        Ok(n) => {
            assert_eq!(n, bytes.len(), "short write to the control file");
            None
        }
        Err(e) => e.raw_os_error(),
    }
}

/// What a refused request must leave unchanged.
fn snapshot(d: &Daemon, volume: &str) -> Value {
    let v = d.volume(volume);
    json!({
        "status": v["status"],
        "status_reason": v["status_reason"],
        "bootable": v["bootable"],
        "reimage": v["reimage"],
        "volume_image_metadata": v.get("volume_image_metadata"),
        "updated_at": v["updated_at"],
    })
}

fn marker(volume: &str) -> Vec<u8> {
    format!("marker of {volume}\n").repeat(200).into_bytes()
}

fn write_marker(d: &Daemon, volume: &str) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(d.vol(volume))
        .unwrap();
    file.write_all_at(&marker(volume), 0).unwrap();
    file.sync_all().unwrap();
}

/// Asserts the volume still holds the marker written at setup: nothing re-imaged it.
fn assert_marker(d: &Daemon, volume: &str) {
    let expected = marker(volume);
    let found = read_direct(&d.vol(volume), 0, 8192);
    assert!(
        found[..expected.len()] == expected[..],
        "{volume} lost its data"
    );
}

fn wait_done(d: &Daemon, volume: &str) -> Value {
    d.wait_reimage(volume, Duration::from_secs(120))
}

fn reserve(d: &Daemon, volume: &str) {
    reserve_for(d, volume, None);
}

/// Reserves `volume` with an attachment without connector, as root.
fn reserve_for(d: &Daemon, volume: &str, instance: Option<&str>) {
    d.reserve(&d.volume(volume)["id"], instance);
    assert_eq!(d.status(volume), "reserved");
}

fn upload(d: &Daemon, id: &str, file: &Path) {
    let r = http(
        &d.socket,
        "PUT",
        &format!("/v2/images/{id}/file"),
        &[("Content-Type", "application/octet-stream")],
        &std::fs::read(file).unwrap(),
    );
    assert_eq!(r.status, 204, "upload: {}", r.text());
}

/// Replaces the config file, sends SIGHUP, and waits until the log says `outcome` once more.
fn reload(d: &Daemon, config: &str, outcome: &str) {
    let seen = d.log_text().matches(outcome).count();
    std::fs::write(&d.config, config).unwrap();
    d.signal(libc::SIGHUP);

    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log_text().matches(outcome).count() == seen {
        assert!(
            Instant::now() < deadline,
            "no {outcome:?} in the log after SIGHUP:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
