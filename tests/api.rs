//! The control API's contract, request by request: Cinder's `os-reimage` (microversion gate,
//! body validation, the state table, attachments, image checks with rollback), the other
//! volume actions, the attachment life cycle, the Glance image routes, and bad input of every
//! kind. Every refusal must come with the OpenStack fault body and change nothing.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const VERSION: &str = "OpenStack-API-Version";
const GIB: u64 = 1 << 30;

/// Statuses other than available, error, reserved and in-use that a re-image must refuse;
/// each is reachable with `os-reset_status`. (`downloading` is not: only a re-image sets it,
/// and a running one refuses a second, see `concurrent_reimages_of_one_volume_accept_exactly_one`.)
const OTHER_STATUSES: &[&str] = &[
    "creating",
    "attaching",
    "detaching",
    "maintenance",
    "extending",
    "uploading",
    "retyping",
    "backing-up",
    "managing",
    "restoring-backup",
    "awaiting-transfer",
    "error_deleting",
    "error_restoring",
    "error_extending",
    "error_managing",
    "error_backing-up",
];

// ----- microversion gate -----------------------------------------------------------------

/// Without the header, or below 3.68, os-reimage is a bare 404 with an empty body.
#[test]
fn reimage_below_3_68_is_a_bare_404_and_changes_nothing() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    d.create_volume("vol1", 1);
    let before = snapshot(&d, "vol1");

    let valid = reimage_body(&image, None);
    let invalid = r#"{"os-reimage": {"image_id": "nope", "force": 1}}"#;
    for version in [None, Some("3.0"), Some("3.27"), Some("3.67")] {
        for body in [valid.as_str(), invalid] {
            let r = action(&d, "vol1", version, body);
            assert_eq!(r.status, 404, "{version:?} {body}: {}", r.text());
            assert!(r.body.is_empty(), "{version:?}: body {:?}", r.text());
            assert_eq!(
                r.header(VERSION),
                Some(format!("volume {}", version.unwrap_or("3.0")).as_str()),
                "{version:?}"
            );
            assert_eq!(
                snapshot(&d, "vol1"),
                before,
                "{version:?} changed the volume"
            );
        }
    }
}

/// Out-of-range versions are 406, malformed ones 400, `latest` and 3.68 work; responses
/// echo the version and say `Vary: OpenStack-API-Version`.
#[test]
fn microversion_header_is_checked_and_echoed() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    d.create_volume("vol1", 1);
    let before = snapshot(&d, "vol1");
    let body = reimage_body(&image, None);

    for version in ["3.72", "4.0", "2.0", "3.99999999999999999999"] {
        let r = action(&d, "vol1", Some(version), &body);
        assert_fault(&r, 406);
        assert_vary(&r);
        assert_eq!(snapshot(&d, "vol1"), before, "{version}");
    }
    for version in ["abc", "3", "3.", "3.068", "v3.68", "3.68.1", ""] {
        let r = action(&d, "vol1", Some(version), &body);
        assert_fault(&r, 400);
        assert_vary(&r);
        assert_eq!(snapshot(&d, "vol1"), before, "{version:?}");
    }

    let r = action(&d, "vol1", Some("3.68"), &body);
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(r.body.is_empty(), "202 has a body: {}", r.text());
    assert_eq!(r.header(VERSION), Some("volume 3.68"));
    assert_vary(&r);
    wait_done(&d, "vol1");

    let r = action(&d, "vol1", Some("latest"), &body);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.header(VERSION), Some("volume 3.71"));
    assert_vary(&r);
    let view = wait_done(&d, "vol1");
    assert_eq!(view["status"], "available", "{view}");

    // Faults echo the version too.
    let r = action(&d, "nosuch", Some("3.70"), &body);
    assert_fault(&r, 404);
    assert_eq!(r.header(VERSION), Some("volume 3.70"));
    assert_vary(&r);
}

// ----- body validation -------------------------------------------------------------------

/// `reimage_reserved` takes booleans and Cinder's word list: true words re-image a reserved
/// volume, false words are refused as a status error, anything else is a 400 naming it.
#[test]
fn reimage_reserved_accepts_booleans_and_listed_words_only() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    let volume = d.create_volume("vol1", 1);
    reserve(&d, &volume["id"], None);

    for value in [
        json!(true),
        json!("True"),
        json!("TRUE"),
        json!("true"),
        json!("1"),
        json!("ON"),
        json!("On"),
        json!("on"),
        json!("YES"),
        json!("Yes"),
        json!("yes"),
        json!("y"),
        json!("t"),
    ] {
        let r = action(
            &d,
            "vol1",
            Some("3.68"),
            &reimage_body(&image, Some(&value)),
        );
        assert_eq!(r.status, 202, "{value}: {}", r.text());
        let view = wait_done(&d, "vol1");
        assert_eq!(view["status"], "reserved", "{value}: {view}");
    }

    let before = snapshot(&d, "vol1");
    for value in [
        json!(false),
        json!("False"),
        json!("FALSE"),
        json!("false"),
        json!("0"),
        json!("OFF"),
        json!("Off"),
        json!("off"),
        json!("NO"),
        json!("No"),
        json!("no"),
        json!("n"),
        json!("f"),
    ] {
        let r = action(
            &d,
            "vol1",
            Some("3.68"),
            &reimage_body(&image, Some(&value)),
        );
        let message = assert_fault(&r, 400);
        assert!(
            message.contains("available or error,") && !message.contains("or reserved"),
            "{value}: {message}"
        );
        assert_eq!(snapshot(&d, "vol1"), before, "{value}");
    }

    for value in [
        json!(null),
        json!(1),
        json!(0),
        json!("TrUe"),
        json!("Y"),
        json!("T"),
        json!("wrong"),
        json!(""),
        json!([]),
        json!({}),
    ] {
        let r = action(
            &d,
            "vol1",
            Some("3.68"),
            &reimage_body(&image, Some(&value)),
        );
        let message = assert_fault(&r, 400);
        assert!(message.contains("reimage_reserved"), "{value}: {message}");
        assert_eq!(snapshot(&d, "vol1"), before, "{value}");
    }
}

/// `image_id` is read like oslo's `is_uuid_like`: any case, dashes optional, braces and
/// `urn:uuid:` allowed; anything that is not a UUID string is a 400.
#[test]
fn image_id_spellings_are_accepted_and_non_uuids_refused() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    d.create_volume("vol1", 1);

    let bare = image.replace('-', "");
    for spelling in [
        image.to_uppercase(),
        bare.clone(),
        bare.to_uppercase(),
        format!("{{{image}}}"),
        format!("urn:uuid:{image}"),
        format!("uuid:{bare}"),
    ] {
        let r = action(&d, "vol1", Some("3.68"), &reimage_body(&spelling, None));
        assert_eq!(r.status, 202, "{spelling}: {}", r.text());
        let view = wait_done(&d, "vol1");
        assert_eq!(
            view["volume_image_metadata"]["image_id"], image,
            "{spelling}"
        );
    }

    let before = snapshot(&d, "vol1");
    for image_id in [
        json!("not-a-uuid"),
        json!("base"),
        json!(format!("{image}0")),
        json!(&image[1..]),
        json!(42),
        json!(null),
        json!([image]),
        json!({"id": image}),
    ] {
        let body = json!({"os-reimage": {"image_id": image_id}}).to_string();
        let r = action(&d, "vol1", Some("3.68"), &body);
        let message = assert_fault(&r, 400);
        assert!(message.contains("image_id"), "{image_id}: {message}");
        assert_eq!(snapshot(&d, "vol1"), before, "{image_id}");
    }
}

/// Missing or extra keys, several top-level keys, unknown actions and non-objects are 400.
#[test]
fn malformed_action_bodies_are_refused_unchanged() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    d.create_volume("vol1", 1);
    let before = snapshot(&d, "vol1");

    let cases = [
        (json!({"os-reimage": {}}), "image_id"),
        (
            json!({"os-reimage": {"image_id": image, "force": true}}),
            "force",
        ),
        (
            json!({"os-reimage": {"image_id": image, "reimage_reserved": false, "x": 1}}),
            "x",
        ),
        (
            json!({"os-reimage": {"image_id": image}, "os-extend": {"new_size": 2}}),
            "too many body keys",
        ),
        (
            json!({"os-frobnicate": {"image_id": image}}),
            "no such action",
        ),
        (json!({}), "Malformed request body"),
        (
            json!([{"os-reimage": {"image_id": image}}]),
            "Malformed request body",
        ),
        (json!("os-reimage"), "Malformed request body"),
        (json!({"os-reimage": null}), "os-reimage"),
        (json!({"os-reimage": [image]}), "os-reimage"),
    ];
    for (body, word) in cases {
        let r = action(&d, "vol1", Some("3.68"), &body.to_string());
        let message = assert_fault(&r, 400);
        assert!(message.contains(word), "{body}: {message}");
        assert_eq!(snapshot(&d, "vol1"), before, "{body}");
    }

    let r = action(&d, "vol1", Some("3.68"), "{\"os-reimage\": {\"image_id\": ");
    assert_fault(&r, 400);
    assert_eq!(snapshot(&d, "vol1"), before);
}

// ----- the state table -------------------------------------------------------------------

/// available → 202 → downloading (with progress) → available, bootable, with the new
/// image's metadata replacing the old image's.
#[test]
fn available_volume_is_reimaged_through_downloading_with_metadata_replaced() {
    let d = Daemon::start_with("refill_rate_limit = 4\nrefill_window_mib = 1");
    let alpha = small_image(&d, "alpha", 1 << 20);
    let beta_file = d.dir.path().join("beta.raw");
    random_file(&beta_file, 12 << 20, 99);
    let beta = create_image(
        &d,
        json!({"name": "beta", "disk_format": "raw",
        "container_format": "bare", "min_disk": 1, "min_ram": 256}),
    );
    upload(&d, &beta, &beta_file);

    let view = d.create_volume("vol1", 1);
    assert_eq!(view["bootable"], "false", "{view}");
    assert!(view.get("volume_image_metadata").is_none(), "{view}");

    let view = d.reimage_and_wait("vol1", &alpha);
    assert_eq!(
        view["volume_image_metadata"]["image_name"], "alpha",
        "{view}"
    );

    // The second re-image runs at 4 MiB/s, so it is seen while it runs.
    let r = action(&d, "vol1", Some("3.68"), &reimage_body(&beta, None));
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(r.body.is_empty());
    let running = d.volume("vol1");
    assert_eq!(running["status"], "downloading", "{running}");
    assert_eq!(running["reimage"]["state"], "running", "{running}");
    assert_eq!(running["reimage"]["image_id"], beta, "{running}");
    assert_eq!(running["reimage"]["bytes_total"], 12 << 20, "{running}");
    assert_eq!(
        running["volume_image_metadata"]["image_name"], "alpha",
        "metadata changes only when the refill succeeds: {running}"
    );

    let mut progress_seen = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = d.volume("vol1");
        if view["status"] != "downloading" {
            break;
        }
        let done = view["reimage"]["bytes_done"].as_u64().unwrap();
        progress_seen |= done > 0 && done < 12 << 20;
        assert!(Instant::now() < deadline, "re-image never ended: {view}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(progress_seen, "no partial progress was ever shown");

    let view = d.volume("vol1");
    assert_eq!(view["status"], "available", "{view}");
    assert_eq!(view["bootable"], "true", "{view}");
    assert_eq!(view["status_reason"], Value::Null, "{view}");
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
    assert_eq!(view["reimage"]["bytes_done"], 12 << 20, "{view}");
    let image = d.api("GET", &format!("/v2/images/{beta}"), None).json();
    assert_eq!(
        view["volume_image_metadata"],
        json!({
            "image_id": beta,
            "image_name": "beta",
            "checksum": image["checksum"],
            "container_format": "bare",
            "disk_format": "raw",
            "min_disk": "1",
            "min_ram": "256",
            "size": (12u64 << 20).to_string(),
        }),
        "{view}"
    );
    let expected = std::fs::read(&beta_file).unwrap();
    let data = read_direct(&d.vol("vol1"), 0, 16 << 20);
    assert!(
        data[..expected.len()] == expected[..],
        "the volume does not hold beta"
    );
    assert!(
        data[expected.len()..].iter().all(|&b| b == 0),
        "old data after the image"
    );
    let last = read_direct(&d.vol("vol1"), GIB - (1 << 20), 1 << 20);
    assert!(
        last.iter().all(|&b| b == 0),
        "old data at the end of the volume"
    );
}

/// The next re-image is accepted as soon as the previous one shows as finished: the
/// volume's status and the end of its refill are one step, not two.
#[test]
fn next_reimage_is_accepted_as_soon_as_the_previous_shows_finished() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 64 << 10);
    d.create_volume("vol1", 1);

    for round in 0..40 {
        let r = action(&d, "vol1", Some("3.68"), &reimage_body(&image, None));
        assert_eq!(r.status, 202, "round {round}: {}", r.text());

        // Poll without pausing, to ask again the moment the status says it is over.
        let deadline = Instant::now() + Duration::from_secs(60);
        while d.volume("vol1")["status"] == "downloading" {
            assert!(Instant::now() < deadline, "round {round} never ended");
        }
    }
    let view = d.volume("vol1");
    assert_eq!(view["status"], "available", "{view}");
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
}

/// A 202 (or a successful control-file write) means the volume is downloading: a read issued
/// right after it waits for the refill and returns the image, never the old content.
#[test]
fn read_issued_right_after_acceptance_returns_the_new_content() {
    let d = Daemon::start();
    let file = d.dir.path().join("image.raw");
    random_file(&file, 1 << 20, 12);
    let image_data = std::fs::read(&file).unwrap();
    let image = d.import_image(&file, "base");
    d.create_volume("vol1", 1);

    for round in 0..20 {
        write_at(&d.vol("vol1"), 0, &[0x0f; 4096]);
        if round % 2 == 0 {
            let r = action(&d, "vol1", Some("3.68"), &reimage_body(&image, None));
            assert_eq!(r.status, 202, "round {round}: {}", r.text());
        } else {
            let mut control = std::fs::OpenOptions::new()
                .write(true)
                .open(d.mnt.join(".control"))
                .unwrap();
            control.write_all(b"reimage vol1 base\n").unwrap();
        }
        let data = read_direct(&d.vol("vol1"), 0, 4096);
        let seen = if data.iter().all(|&b| b == 0x0f) {
            "the old content"
        } else if data.iter().all(|&b| b == 0) {
            "zeros (a half-done refill)"
        } else {
            "something else"
        };
        assert!(
            data[..] == image_data[..4096],
            "round {round}: a read after the accepted request saw {seen}"
        );
        wait_done(&d, "vol1");
    }
}

/// An error volume is re-imaged and stays error, with a status_reason that says so.
#[test]
fn error_volume_is_reimaged_and_stays_error_with_reason() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    d.create_volume("vol1", 1);
    reset(&d, "vol1", json!({"status": "error"}));

    let r = action(&d, "vol1", Some("3.68"), &reimage_body(&image, None));
    assert_eq!(r.status, 202, "{}", r.text());
    let view = wait_done(&d, "vol1");
    assert_eq!(view["status"], "error", "{view}");
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
    assert_eq!(view["bootable"], "true", "{view}");
    assert_eq!(view["volume_image_metadata"]["image_id"], image, "{view}");
    let reason = view["status_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&image) && reason.contains("os-reset_status"),
        "status_reason does not explain the error status: {view}"
    );
}

/// A reserved volume without the flag is refused with 400 and stays as it was.
#[test]
fn reserved_volume_without_flag_is_refused_and_unchanged() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    let volume = d.create_volume("vol1", 1);
    reserve(&d, &volume["id"], None);
    let before = snapshot(&d, "vol1");
    assert_eq!(before["status"], "reserved");

    for body in [
        reimage_body(&image, None),
        reimage_body(&image, Some(&json!(false))),
    ] {
        let r = action(&d, "vol1", Some("3.68"), &body);
        let message = assert_fault(&r, 400);
        assert!(
            message.contains("status must be available or error,")
                && message.contains("current status is reserved"),
            "{message}"
        );
        assert_eq!(snapshot(&d, "vol1"), before);
    }
}

/// A reserved volume with the flag is re-imaged and goes back to reserved, its one
/// attachment kept.
#[test]
fn reserved_volume_with_flag_is_reimaged_back_to_reserved() {
    let d = Daemon::start_with("refill_rate_limit = 2\nrefill_window_mib = 1");
    let file = d.dir.path().join("image.raw");
    random_file(&file, 4 << 20, 3);
    let image = d.import_image(&file, "base");
    let volume = d.create_volume("vol1", 1);
    let attachment = reserve(
        &d,
        &volume["id"],
        Some("0e3c2a6e-5c4a-4a47-8bd9-2f1b7b0b9c11"),
    );

    let r = action(
        &d,
        "vol1",
        Some("3.68"),
        &reimage_body(&image, Some(&json!(true))),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(d.status("vol1"), "downloading");
    let view = wait_done(&d, "vol1");
    assert_eq!(view["status"], "reserved", "{view}");
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
    assert_eq!(view["volume_image_metadata"]["image_id"], image, "{view}");

    let r = d.api("GET", &format!("/v3/attachments/{attachment}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["attachment"]["status"], "reserved");
}

/// An in-use volume is refused even with the flag, and the message lists the three
/// statuses that would do.
#[test]
fn in_use_volume_with_flag_is_refused_listing_allowed_statuses() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    let volume = d.create_volume("vol1", 1);
    let attachment = reserve(&d, &volume["id"], None);
    connect(&d, &attachment);
    complete(&d, &attachment);
    let before = snapshot(&d, "vol1");
    assert_eq!(before["status"], "in-use");

    let r = action(
        &d,
        "vol1",
        Some("3.68"),
        &reimage_body(&image, Some(&json!(true))),
    );
    let message = assert_fault(&r, 400);
    assert!(
        message.contains("available or error or reserved") && message.contains("in-use"),
        "{message}"
    );
    assert_eq!(snapshot(&d, "vol1"), before);

    let r = action(&d, "vol1", Some("3.68"), &reimage_body(&image, None));
    let message = assert_fault(&r, 400);
    assert!(message.contains("available or error,"), "{message}");
    assert_eq!(snapshot(&d, "vol1"), before);
}

/// Every other status, set by an administrator's os-reset_status, refuses a re-image with
/// 400 and stays as it was, with the flag or without.
#[test]
fn every_other_status_refuses_reimage_unchanged() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    d.create_volume("vol1", 1);

    for status in OTHER_STATUSES {
        reset(&d, "vol1", json!({"status": status}));
        let before = snapshot(&d, "vol1");
        assert_eq!(before["status"], *status);
        for flag in [None, Some(json!(false)), Some(json!(true))] {
            let r = action(
                &d,
                "vol1",
                Some("3.68"),
                &reimage_body(&image, flag.as_ref()),
            );
            let message = assert_fault(&r, 400);
            assert!(
                message.contains(&format!("current status is {status}")),
                "{status} {flag:?}: {message}"
            );
            assert_eq!(snapshot(&d, "vol1"), before, "{status} {flag:?}");
        }
    }

    // A fake `downloading` without a refill (no fence) cannot be made by hand.
    let before = snapshot(&d, "vol1");
    let r = d.api(
        "POST",
        "/v3/volumes/vol1/action",
        Some(json!({"os-reset_status": {"status": "downloading"}})),
    );
    assert_fault(&r, 400);
    assert_eq!(snapshot(&d, "vol1"), before);

    // Back to available, it works again.
    reset(&d, "vol1", json!({"status": "available"}));
    let view = d.reimage_and_wait("vol1", &image);
    assert_eq!(view["status"], "available", "{view}");
}

/// Two or three attachments give 409 whatever the status and flag; the count is checked
/// before the status.
#[test]
fn more_than_one_attachment_is_a_conflict_before_the_status_check() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    let volume = d.create_volume("vol1", 1);
    let instance = "7b0a4c62-97c4-4d1b-b0a5-6ad2a1a4c3b1";
    let first = reserve(&d, &volume["id"], Some(instance));
    reserve(&d, &volume["id"], Some(instance));

    for attachments in [2, 3] {
        let before = snapshot(&d, "vol1");
        assert_eq!(before["status"], "reserved");
        for flag in [None, Some(json!(false)), Some(json!(true))] {
            let r = action(
                &d,
                "vol1",
                Some("3.68"),
                &reimage_body(&image, flag.as_ref()),
            );
            let message = assert_fault(&r, 409);
            assert!(message.contains("more than one"), "{message}");
            assert_eq!(snapshot(&d, "vol1"), before, "{attachments} {flag:?}");
        }
        if attachments == 2 {
            reserve(&d, &volume["id"], Some(instance));
        }
    }

    // In use with several attachments is a conflict too, not a status error.
    connect(&d, &first);
    complete(&d, &first);
    let before = snapshot(&d, "vol1");
    assert_eq!(before["status"], "in-use");
    let r = action(
        &d,
        "vol1",
        Some("3.68"),
        &reimage_body(&image, Some(&json!(true))),
    );
    assert_fault(&r, 409);
    assert_eq!(snapshot(&d, "vol1"), before);
}

/// Of many simultaneous re-image requests on one volume exactly one is accepted; the
/// others find it downloading.
#[test]
fn concurrent_reimages_of_one_volume_accept_exactly_one() {
    let d = Daemon::start_with("refill_rate_limit = 2\nrefill_window_mib = 1");
    let file = d.dir.path().join("image.raw");
    random_file(&file, 4 << 20, 4);
    let image = d.import_image(&file, "base");
    d.create_volume("vol1", 1);

    let racers = 8;
    let barrier = Arc::new(Barrier::new(racers));
    let body = reimage_body(&image, None);
    let threads: Vec<_> = (0..racers)
        .map(|_| {
            let barrier = barrier.clone();
            let socket = d.socket.clone();
            let body = body.clone();
            std::thread::spawn(move || {
                barrier.wait();
                http(
                    &socket,
                    "POST",
                    "/v3/volumes/vol1/action",
                    &[
                        ("Content-Type", "application/json"),
                        (VERSION, "volume 3.68"),
                    ],
                    body.as_bytes(),
                )
            })
        })
        .collect();
    let responses: Vec<Response> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    let accepted = responses.iter().filter(|r| r.status == 202).count();
    assert_eq!(accepted, 1, "{responses:?}");
    for r in responses.iter().filter(|r| r.status != 202) {
        let message = assert_fault(r, 400);
        assert!(
            message.contains("current status is downloading"),
            "{message}"
        );
    }
    let view = wait_done(&d, "vol1");
    assert_eq!(view["status"], "available", "{view}");
    assert_eq!(view["reimage"]["state"], "succeeded", "{view}");
}

// ----- image checks with rollback --------------------------------------------------------

/// A deactivated or queued image is refused with 400 and the volume keeps its status
/// (available or error); a reactivated image works.
#[test]
fn inactive_images_are_refused_and_the_volume_keeps_its_status() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    let queued = create_image(&d, json!({"name": "empty", "disk_format": "raw"}));
    d.create_volume("vol1", 1);
    d.create_volume("vol2", 1);
    reset(&d, "vol2", json!({"status": "error"}));

    let r = d.api(
        "POST",
        &format!("/v2/images/{image}/actions/deactivate"),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());

    for volume in ["vol1", "vol2"] {
        let before = snapshot(&d, volume);
        for id in [&image, &queued] {
            let r = action(&d, volume, Some("3.68"), &reimage_body(id, None));
            let message = assert_fault(&r, 400);
            assert!(message.contains("not active"), "{message}");
            assert_eq!(snapshot(&d, volume), before, "{volume} with {id}");
        }
    }

    let r = d.api(
        "POST",
        &format!("/v2/images/{image}/actions/reactivate"),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let view = d.reimage_and_wait("vol1", &image);
    assert_eq!(view["status"], "available", "{view}");
}

/// A raw image one byte over 1 GiB is refused for a 1 GiB volume and changes nothing; an
/// image of exactly 1 GiB is accepted and written.
#[test]
fn image_one_byte_larger_than_the_volume_is_refused_and_exact_fit_accepted() {
    require("curl");
    let d = Daemon::start();
    d.create_volume("vol1", 1);
    let before = snapshot(&d, "vol1");

    let over_file = d.dir.path().join("over.raw");
    sh_ok(&format!("truncate -s {} {}", GIB + 1, over_file.display()));
    let over = create_image(&d, json!({"name": "over", "disk_format": "raw"}));
    upload_streamed(&d, &over, &over_file);
    std::fs::remove_file(&over_file).unwrap();

    let r = action(&d, "vol1", Some("3.68"), &reimage_body(&over, None));
    let message = assert_fault(&r, 400);
    assert!(
        message.contains("Size of specified image 2GB is larger than volume size 1GB"),
        "{message}"
    );
    assert_eq!(snapshot(&d, "vol1"), before);

    // The control file says the same with EFBIG.
    let mut control = std::fs::OpenOptions::new()
        .write(true)
        .open(d.mnt.join(".control"))
        .unwrap();
    let err = control.write(b"reimage vol1 over\n").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    drop(control);
    assert_eq!(snapshot(&d, "vol1"), before);

    let exact_file = d.dir.path().join("exact.raw");
    sh_ok(&format!(
        "truncate -s {GIB} {0} && printf 'last' | dd of={0} bs=1 seek={1} conv=notrunc \
         status=none",
        exact_file.display(),
        GIB - 4
    ));
    let exact = create_image(&d, json!({"name": "exact", "disk_format": "raw"}));
    upload_streamed(&d, &exact, &exact_file);
    std::fs::remove_file(&exact_file).unwrap();

    let view = d.reimage_and_wait("vol1", &exact);
    assert_eq!(view["status"], "available", "{view}");
    let tail = read_direct(&d.vol("vol1"), GIB - 4096, 4096);
    assert_eq!(
        &tail[4092..],
        b"last",
        "the image's last bytes are not at the end"
    );
}

/// min_disk 2 on a 1 GiB volume is refused and changes nothing; min_disk 1 is accepted.
#[test]
fn image_min_disk_larger_than_the_volume_is_refused_and_equal_accepted() {
    let d = Daemon::start();
    let file = d.dir.path().join("image.raw");
    random_file(&file, 1 << 20, 5);
    let two = create_image(
        &d,
        json!({"name": "two", "disk_format": "raw", "min_disk": 2}),
    );
    upload(&d, &two, &file);
    let one = create_image(
        &d,
        json!({"name": "one", "disk_format": "raw", "min_disk": 1}),
    );
    upload(&d, &one, &file);
    d.create_volume("vol1", 1);
    d.create_volume("vol2", 1);
    reset(&d, "vol2", json!({"status": "error"}));

    for volume in ["vol1", "vol2"] {
        let before = snapshot(&d, volume);
        let r = action(&d, volume, Some("3.68"), &reimage_body(&two, None));
        let message = assert_fault(&r, 400);
        assert!(message.contains("minDisk"), "{message}");
        assert_eq!(snapshot(&d, volume), before, "{volume}");
    }

    let view = d.reimage_and_wait("vol1", &one);
    assert_eq!(view["volume_image_metadata"]["min_disk"], "1", "{view}");
}

/// An unknown volume, or an unknown image for a known volume, is 404 and changes nothing.
#[test]
fn unknown_volume_or_image_is_not_found() {
    let d = Daemon::start();
    let image = small_image(&d, "base", 1 << 20);
    d.create_volume("vol1", 1);
    let before = snapshot(&d, "vol1");

    for volume in ["nosuch", "8d0e5f0a-0d6e-4a53-9c2b-5b8f8a3c1e77"] {
        let r = action(&d, volume, Some("3.68"), &reimage_body(&image, None));
        let message = assert_fault(&r, 404);
        assert!(message.contains(volume), "{message}");
    }
    let missing = "3f1b6a52-2f7e-4a8e-8f3c-6b0f5d6e7a81";
    let r = action(&d, "vol1", Some("3.68"), &reimage_body(missing, None));
    let message = assert_fault(&r, 404);
    assert!(message.contains(missing), "{message}");
    assert_eq!(snapshot(&d, "vol1"), before);
}

// ----- attachments -----------------------------------------------------------------------

/// reserved → attaching (connector) → in-use (os-complete) → available (delete); the
/// attachments API does not exist below 3.27, os-complete not below 3.44.
#[test]
fn attachment_life_cycle_moves_the_volume_through_its_statuses() {
    let d = Daemon::start();
    let volume = d.create_volume("vol1", 1);
    let volume_id = volume["id"].as_str().unwrap();
    let body = json!({"attachment": {"volume_uuid": volume_id}}).to_string();

    for version in [None, Some("3.26")] {
        let r = request(&d, "POST", "/v3/attachments", version, &body);
        assert_eq!(r.status, 404, "{version:?}: {}", r.text());
        assert!(r.body.is_empty(), "{}", r.text());
        let r = request(&d, "GET", "/v3/attachments", version, "");
        assert_eq!(r.status, 404, "{version:?}");
        assert!(r.body.is_empty());
    }
    assert_eq!(d.status("vol1"), "available");

    let r = request(&d, "POST", "/v3/attachments", Some("3.27"), &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let attachment = r.json()["attachment"]["id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["attachment"]["status"], "reserved");
    assert_eq!(d.status("vol1"), "reserved");
    assert_eq!(
        d.volume("vol1")["attachments"],
        json!([]),
        "reservations are not listed"
    );

    connect(&d, &attachment);
    assert_eq!(d.status("vol1"), "attaching");

    let path = format!("/v3/attachments/{attachment}/action");
    let r = request(&d, "POST", &path, Some("3.43"), r#"{"os-complete": null}"#);
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(d.status("vol1"), "attaching");
    complete(&d, &attachment);
    let view = d.volume("vol1");
    assert_eq!(view["status"], "in-use", "{view}");
    assert_eq!(
        view["attachments"][0]["attachment_id"], attachment,
        "{view}"
    );

    let r = d.api("GET", "/v3/attachments", None);
    assert_eq!(
        r.json()["attachments"][0]["status"],
        "attached",
        "{}",
        r.text()
    );

    let r = d.api("DELETE", &format!("/v3/attachments/{attachment}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let view = d.volume("vol1");
    assert_eq!(view["status"], "available", "{view}");
    assert_eq!(view["attachments"], json!([]), "{view}");
    let r = d.api("GET", &format!("/v3/attachments/{attachment}"), None);
    assert_fault(&r, 404);
}

// ----- other volume actions --------------------------------------------------------------

/// os-reset_status is for administrators only, checks its values, refuses deleting and an
/// in-use without attachments, and `attach_status: detached` drops the attachments.
#[test]
fn reset_status_is_admin_only_and_checks_its_values() {
    require("setpriv");
    require("curl");
    let d = Daemon::start();
    let theirs = d.api(
        "POST",
        "/v3/volumes",
        Some(json!({"volume": {"name": "theirs", "size": 1, "owner": 65534}})),
    );
    assert_eq!(theirs.status, 202, "{}", theirs.text());
    let volume = d.create_volume("vol1", 1);

    // The owner may see the volume but not force its status.
    let (code, body) = curl_as_nobody(
        &d,
        "/v3/volumes/theirs/action",
        r#"{"os-reset_status": {"status": "error"}}"#,
    );
    assert_eq!(code, 403, "{body}");
    let fault: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(fault["forbidden"]["code"], 403, "{body}");
    assert_eq!(d.status("theirs"), "available");

    let before = snapshot(&d, "vol1");
    for (body, word) in [
        (json!({"os-reset_status": {"status": "bogus"}}), "bogus"),
        (
            json!({"os-reset_status": {"status": "deleting"}}),
            "deleting",
        ),
        (
            json!({"os-reset_status": {"status": "in-use"}}),
            "attachments",
        ),
        (
            json!({"os-reset_status": {"attach_status": "sideways"}}),
            "sideways",
        ),
        (
            json!({"os-reset_status": {"migration_status": "teleporting"}}),
            "teleporting",
        ),
        (json!({"os-reset_status": {}}), "status"),
        (json!({"os-reset_status": {"status": ""}}), "status"),
        (json!({"os-reset_status": {"status": 1}}), "status"),
        (json!({"os-reset_status": {"state": "error"}}), "state"),
    ] {
        let r = action(&d, "vol1", None, &body.to_string());
        let message = assert_fault(&r, 400);
        assert!(message.contains(word), "{body}: {message}");
        assert_eq!(snapshot(&d, "vol1"), before, "{body}");
    }

    reset(&d, "vol1", json!({"status": "ERROR"}));
    assert_eq!(d.status("vol1"), "error");
    reset(&d, "vol1", json!({"status": "available"}));

    reserve(&d, &volume["id"], None);
    assert_eq!(d.status("vol1"), "reserved");
    reset(
        &d,
        "vol1",
        json!({"status": "error", "attach_status": "detached"}),
    );
    assert_eq!(d.status("vol1"), "available");
    let r = d.api("GET", "/v3/attachments", None);
    assert_eq!(r.json()["attachments"], json!([]), "{}", r.text());
}

/// os-extend grows an available volume's file; not smaller, not equal, not absurd, and not
/// while the volume is reserved.
#[test]
fn extend_grows_an_available_volume_only() {
    let d = Daemon::start();
    let volume = d.create_volume("vol1", 1);
    let file = d.vol("vol1");

    let r = action(&d, "vol1", None, r#"{"os-extend": {"new_size": 2}}"#);
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(d.volume("vol1")["size"], 2);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * GIB);

    let before = snapshot(&d, "vol1");
    for new_size in [
        json!(1),
        json!(2),
        json!(0),
        json!(1_000_000_000_000_000u64),
    ] {
        let body = json!({"os-extend": {"new_size": new_size}}).to_string();
        assert_fault(&action(&d, "vol1", None, &body), 400);
        assert_eq!(snapshot(&d, "vol1"), before, "{new_size}");
    }
    for body in [
        r#"{"os-extend": {"new_size": "3"}}"#,
        r#"{"os-extend": {"new_size": -3}}"#,
        r#"{"os-extend": {}}"#,
        r#"{"os-extend": {"new_size": 3, "force": true}}"#,
    ] {
        assert_fault(&action(&d, "vol1", None, body), 400);
        assert_eq!(snapshot(&d, "vol1"), before, "{body}");
    }

    reserve(&d, &volume["id"], None);
    let before = snapshot(&d, "vol1");
    let r = action(&d, "vol1", None, r#"{"os-extend": {"new_size": 3}}"#);
    let message = assert_fault(&r, 400);
    assert!(message.contains("available"), "{message}");
    assert_eq!(snapshot(&d, "vol1"), before);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * GIB);
}

/// Deleting is refused while attached or reserved (400) and while the file is open (409);
/// once allowed, the file leaves the mount.
#[test]
fn delete_is_refused_while_attached_or_open_and_removes_the_file() {
    let d = Daemon::start();
    let volume = d.create_volume("vol1", 1);
    let attachment = reserve(&d, &volume["id"], None);

    let r = d.api("DELETE", "/v3/volumes/vol1", None);
    assert_fault(&r, 400);
    connect(&d, &attachment);
    complete(&d, &attachment);
    let r = d.api("DELETE", "/v3/volumes/vol1", None);
    let message = assert_fault(&r, 400);
    assert!(message.contains("in-use"), "{message}");
    let r = d.api("DELETE", &format!("/v3/attachments/{attachment}"), None);
    assert_eq!(r.status, 200, "{}", r.text());

    let open = std::fs::File::open(d.vol("vol1")).unwrap();
    let r = d.api("DELETE", "/v3/volumes/vol1", None);
    let message = assert_fault(&r, 409);
    assert!(message.contains("open"), "{message}");
    assert_eq!(d.status("vol1"), "available");
    drop(open);

    let r = d.api("DELETE", "/v3/volumes/vol1", None);
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(r.body.is_empty());
    assert!(!d.vol("vol1").exists(), "the file is still in the mount");
    let listed: Vec<String> = std::fs::read_dir(&d.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, [".control"]);
    assert_fault(&d.api("GET", "/v3/volumes/vol1", None), 404);
    assert_fault(&d.api("DELETE", "/v3/volumes/vol1", None), 404);
}

// ----- images ----------------------------------------------------------------------------

/// Create, upload, list, show (by id and name), deactivate, reactivate and delete an image;
/// checksum and os_hash_value are the md5 and sha512 of the file.
#[test]
fn image_routes_keep_the_image_record_and_hashes() {
    let d = Daemon::start();
    let file = d.dir.path().join("image.raw");
    random_file(&file, (3 << 20) + 123, 6);

    let r = d.api(
        "POST",
        "/v2/images",
        Some(
            json!({"name": "cirros", "disk_format": "raw", "container_format": "bare",
            "min_disk": 1, "min_ram": 64}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.header("Location"),
        Some(format!("/v2/images/{id}").as_str())
    );
    assert_eq!(created["status"], "queued", "{created}");
    assert_eq!(created["size"], Value::Null, "{created}");

    upload(&d, &id, &file);

    // A second upload is refused; a short body, since the refusal comes before it is read.
    let again = d.dir.path().join("again.raw");
    random_file(&again, 1024, 8);
    let r = upload_response(&d, &id, &again);
    assert_fault(&r, 409);

    let md5 = sh_ok(&format!("md5sum {}", file.display()));
    let sha512 = sh_ok(&format!("sha512sum {}", file.display()));
    for key in [id.as_str(), "cirros"] {
        let r = d.api("GET", &format!("/v2/images/{key}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        let image = r.json();
        assert_eq!(image["id"], id, "{image}");
        assert_eq!(image["status"], "active", "{image}");
        assert_eq!(image["size"], (3 << 20) + 123, "{image}");
        assert_eq!(image["virtual_size"], (3 << 20) + 123, "{image}");
        assert_eq!(image["min_disk"], 1, "{image}");
        assert_eq!(image["min_ram"], 64, "{image}");
        assert_eq!(image["disk_format"], "raw", "{image}");
        assert_eq!(image["container_format"], "bare", "{image}");
        assert_eq!(image["checksum"], md5.split_whitespace().next().unwrap());
        assert_eq!(image["os_hash_algo"], "sha512");
        assert_eq!(
            image["os_hash_value"],
            sha512.split_whitespace().next().unwrap()
        );
    }
    let r = d.api("GET", "/v2/images", None);
    assert_eq!(r.status, 200);
    let images = r.json()["images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0]["id"], id);

    let r = d.api("POST", &format!("/v2/images/{id}/actions/deactivate"), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(image_status(&d, &id), "deactivated");
    let r = d.api("POST", &format!("/v2/images/{id}/actions/reactivate"), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(image_status(&d, &id), "active");

    let r = d.api("DELETE", &format!("/v2/images/{id}"), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_fault(&d.api("GET", &format!("/v2/images/{id}"), None), 404);
    assert_fault(&d.api("DELETE", &format!("/v2/images/{id}"), None), 404);
    assert_eq!(d.api("GET", "/v2/images", None).json()["images"], json!([]));
}

/// A disk_format other than raw is refused with 400 naming what is supported.
#[test]
fn unsupported_disk_formats_are_refused_naming_raw() {
    let d = Daemon::start();
    for format in ["vmdk", "vhd", "vdi", "vhdx"] {
        let r = d.api(
            "POST",
            "/v2/images",
            Some(json!({"name": "x", "disk_format": format, "container_format": "bare"})),
        );
        let message = assert_fault(&r, 400);
        assert!(
            message.contains(format) && message.contains("raw") && message.contains("qcow2"),
            "{format}: {message}"
        );
    }
    let r = d.api("POST", "/v2/images", Some(json!({"disk_format": "floppy"})));
    let message = assert_fault(&r, 400);
    assert!(message.contains("floppy"), "{message}");
    assert_eq!(d.api("GET", "/v2/images", None).json()["images"], json!([]));
}

/// A "raw" upload whose bytes are a qcow2 image is refused and the image is not active.
#[test]
fn raw_upload_of_qcow2_bytes_is_refused_and_the_image_not_activated() {
    require("qemu-img");
    let d = Daemon::start();
    let file = d.dir.path().join("disk.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 {} 16M",
        file.display()
    ));

    let id = create_image(&d, json!({"name": "sneaky", "disk_format": "raw"}));
    let r = upload_response(&d, &id, &file);
    let message = assert_fault(&r, 400);
    assert!(message.contains("qcow2"), "{message}");
    let image = d.api("GET", &format!("/v2/images/{id}"), None).json();
    assert_ne!(image["status"], "active", "{image}");
    assert_eq!(image["size"], Value::Null, "{image}");
    assert_eq!(image["checksum"], Value::Null, "{image}");

    d.create_volume("vol1", 1);
    let r = action(&d, "vol1", Some("3.68"), &reimage_body(&id, None));
    assert_fault(&r, 400);
    assert_eq!(d.status("vol1"), "available");
}

// ----- bad input of every kind -----------------------------------------------------------

/// Malformed JSON, wrong types, unknown fields, bad names and sizes, oversized bodies,
/// unknown routes, wrong methods and media types all get the fitting 4xx with a fault body;
/// afterwards the daemon serves and another volume is untouched.
#[test]
fn bad_input_of_every_kind_gets_a_fitting_fault_and_harms_nothing() {
    let d = Daemon::start();
    d.create_volume("bystander", 1);
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    write_at(&d.vol("bystander"), 0, &pattern);
    let bystander = snapshot(&d, "bystander");

    let json_type = [("Content-Type", "application/json")];
    let post = |path: &str, body: &str| http(&d.socket, "POST", path, &json_type, body.as_bytes());

    // Malformed JSON.
    for body in [
        "{",
        "{\"volume\": ",
        "nul",
        "{\"volume\": {\"name\": \"a\",}}",
        "\u{0}",
    ] {
        let message = assert_fault(&post("/v3/volumes", body), 400);
        assert!(message.contains("JSON"), "{body:?}: {message}");
    }
    let r = post("/v3/volumes", "");
    assert_fault(&r, 400);

    // Wrong types, unknown fields, missing fields: the message names the field.
    for (body, field) in [
        (json!({"volume": {"name": 5, "size": 1}}), "name"),
        (json!({"volume": {"name": "a", "size": "1"}}), "size"),
        (json!({"volume": {"name": "a", "size": 1.5}}), "size"),
        (json!({"volume": {"name": "a", "size": -1}}), "size"),
        (json!({"volume": {"name": "a", "size": true}}), "size"),
        (
            json!({"volume": {"name": "a", "size": 1, "colour": "red"}}),
            "colour",
        ),
        (
            json!({"volume": {"name": "a", "size": 1}, "extra": 1}),
            "extra",
        ),
        (json!({"volume": {"size": 1}}), "name"),
        (json!({"volume": {"name": "a"}}), "size"),
        (json!({"volume": "a"}), "volume"),
        (
            json!({"volume": {"name": "a", "size": 1, "description": 3}}),
            "description",
        ),
        (
            json!({"volume": {"name": "a", "size": 1, "owner": -1}}),
            "owner",
        ),
        (json!({"name": "a", "size": 1}), "volume"),
    ] {
        let message = assert_fault(&post("/v3/volumes", &body.to_string()), 400);
        assert!(message.contains(field), "{body}: {message}");
    }

    // Names that are not file names, sizes of zero or absurd size.
    for name in [
        "a/b",
        "..",
        ".",
        ".hidden",
        &"x".repeat(65),
        "",
        "a b",
        "a\nb",
        "é",
    ] {
        let body = json!({"volume": {"name": name, "size": 1}}).to_string();
        let message = assert_fault(&post("/v3/volumes", &body), 400);
        assert!(!message.is_empty(), "{name:?}");
    }
    let ok64 = "y".repeat(64);
    let r = post(
        "/v3/volumes",
        &json!({"volume": {"name": ok64, "size": 1}}).to_string(),
    );
    assert_eq!(r.status, 202, "64 characters are allowed: {}", r.text());
    for size in [json!(0), json!(1_000_000_000_000_000u64), json!(u64::MAX)] {
        let body = json!({"volume": {"name": "sized", "size": size}}).to_string();
        let message = assert_fault(&post("/v3/volumes", &body), 400);
        assert!(message.contains("size"), "{size}: {message}");
    }
    let r = post(
        "/v3/volumes",
        &json!({"volume": {"name": "bystander", "size": 1}}).to_string(),
    );
    assert_fault(&r, 409);

    // Oversized bodies.
    let big = json!({"volume": {"name": "big", "size": 1, "description": "d".repeat(70_000)}});
    assert_fault(&post("/v3/volumes", &big.to_string()), 413);
    let big_action = format!(
        r#"{{"os-extend": {{"new_size": 2, "pad": "{}"}}}}"#,
        "p".repeat(65 * 1024)
    );
    assert_fault(&post("/v3/volumes/bystander/action", &big_action), 413);

    // A chunked body past the cap, and a declared length past it with no body sent.
    let chunk = format!(
        r#"{{"volume": {{"name": "c", "size": 1, "description": "{}"}}}}"#,
        "c".repeat(70_000)
    );
    let request = format!(
        "POST /v3/volumes HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    assert_eq!(raw_status(&d, request.as_bytes()), 413);
    let request = "POST /v3/volumes HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\
                   Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n{";
    assert_eq!(raw_status(&d, request.as_bytes()), 413);

    // Unknown routes.
    for path in [
        "/v3/snapshots",
        "/v1/volumes",
        "/nope",
        "/v3/volumes/bystander/extra",
        "/v3/volumes/nosuch",
        "/v2/images/nosuch",
        "/v3/volumes//action",
        "/v2/schemas/image",
    ] {
        let r = http(&d.socket, "GET", path, &[], b"");
        assert_fault(&r, 404);
    }

    // Wrong methods.
    for (method, path) in [
        ("PUT", "/v3/volumes"),
        ("DELETE", "/v3/volumes"),
        ("GET", "/v3/volumes/bystander/action"),
        ("PATCH", "/v3/volumes/bystander"),
        ("POST", "/v2/images/3f1b6a52-2f7e-4a8e-8f3c-6b0f5d6e7a81"),
        (
            "GET",
            "/v2/images/3f1b6a52-2f7e-4a8e-8f3c-6b0f5d6e7a81/file",
        ),
    ] {
        let r = http(&d.socket, method, path, &json_type, b"{}");
        assert_fault(&r, 405);
        assert!(
            r.header("Allow").is_some(),
            "{method} {path}: no Allow header"
        );
    }

    // Wrong media types.
    let body = json!({"volume": {"name": "typed", "size": 1}}).to_string();
    for media in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonp",
    ] {
        let r = http(
            &d.socket,
            "POST",
            "/v3/volumes",
            &[("Content-Type", media)],
            body.as_bytes(),
        );
        assert_fault(&r, 415);
    }
    let image = create_image(&d, json!({"name": "typed"}));
    let r = http(
        &d.socket,
        "PUT",
        &format!("/v2/images/{image}/file"),
        &json_type,
        b"data",
    );
    assert_fault(&r, 415);
    assert_eq!(image_status(&d, &image), "queued");

    // Volume actions with bad bodies on the bystander change nothing.
    for body in ["{", "[]", "{}", r#"{"os-extend": {"new_size": "big"}}"#] {
        assert_fault(&post("/v3/volumes/bystander/action", body), 400);
    }

    // Nothing of it hurt the daemon or the other volume.
    let r = http(&d.socket, "GET", "/", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(snapshot(&d, "bystander"), bystander);
    let data = read_direct(&d.vol("bystander"), 0, 1 << 20);
    assert!(data == pattern, "the bystander's data changed");
    let mut names: Vec<String> = d.api("GET", "/v3/volumes", None).json()["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["bystander".to_string(), ok64]);
}

// ----- helpers ---------------------------------------------------------------------------

/// A request with a JSON body and, if given, `OpenStack-API-Version: volume <version>`.
fn request(d: &Daemon, method: &str, path: &str, version: Option<&str>, body: &str) -> Response {
    let value = version.map(|v| format!("volume {v}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(value) = &value {
        headers.push((VERSION, value.as_str()));
    }
    http(&d.socket, method, path, &headers, body.as_bytes())
}

fn action(d: &Daemon, volume: &str, version: Option<&str>, body: &str) -> Response {
    request(
        d,
        "POST",
        &format!("/v3/volumes/{volume}/action"),
        version,
        body,
    )
}

fn reimage_body(image: &str, reserved: Option<&Value>) -> String {
    let mut args = json!({"image_id": image});
    if let Some(flag) = reserved {
        args["reimage_reserved"] = flag.clone();
    }
    json!({"os-reimage": args}).to_string()
}

/// Asserts an OpenStack fault body of status `code`; returns its message.
fn assert_fault(r: &Response, code: u16) -> String {
    assert_eq!(r.status, code, "expected {code}, got: {}", r.text());
    assert_eq!(
        r.header("Content-Type"),
        Some("application/json"),
        "fault without JSON content type: {}",
        r.text()
    );
    let body = r.json();
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("fault not an object: {body}"));
    assert_eq!(object.len(), 1, "fault must have exactly one key: {body}");
    let (name, fault) = object.iter().next().unwrap();
    let expected = match code {
        400 => Some("badRequest"),
        403 => Some("forbidden"),
        404 => Some("itemNotFound"),
        409 => Some("conflictingRequest"),
        413 => Some("overLimit"),
        415 => Some("badMediaType"),
        _ => None,
    };
    if let Some(expected) = expected {
        assert_eq!(name, expected, "{body}");
    }
    assert!(
        name.chars().next().is_some_and(|c| c.is_ascii_lowercase()),
        "{body}"
    );
    assert_eq!(fault["code"], code, "{body}");
    let message = fault["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "fault without a message: {body}");
    let fault_keys = fault.as_object().map(|o| o.len());
    assert_eq!(fault_keys, Some(2), "{body}");
    message.to_string()
}

fn assert_vary(r: &Response) {
    let vary = r.header("Vary").unwrap_or_default();
    assert!(
        vary.to_ascii_lowercase().contains("openstack-api-version"),
        "Vary is {vary:?}"
    );
}

/// What a refused request must leave unchanged.
fn snapshot(d: &Daemon, volume: &str) -> Value {
    let v = d.volume(volume);
    json!({
        "status": v["status"],
        "status_reason": v["status_reason"],
        "bootable": v["bootable"],
        "size": v["size"],
        "reimage": v["reimage"],
        "volume_image_metadata": v.get("volume_image_metadata"),
        "attachments": v["attachments"],
        "updated_at": v["updated_at"],
    })
}

fn wait_done(d: &Daemon, volume: &str) -> Value {
    d.wait_reimage(volume, Duration::from_secs(120))
}

/// An active raw image of `len` pseudo-random bytes; returns its id.
fn small_image(d: &Daemon, name: &str, len: usize) -> String {
    let file = d.dir.path().join(format!("{name}.raw"));
    random_file(&file, len, name.len() as u64);
    d.import_image(&file, name)
}

fn create_image(d: &Daemon, body: Value) -> String {
    let r = d.api("POST", "/v2/images", Some(body));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn upload_response(d: &Daemon, id: &str, file: &Path) -> Response {
    http(
        &d.socket,
        "PUT",
        &format!("/v2/images/{id}/file"),
        &[("Content-Type", "application/octet-stream")],
        &std::fs::read(file).unwrap(),
    )
}

fn upload(d: &Daemon, id: &str, file: &Path) {
    let r = upload_response(d, id, file);
    assert_eq!(r.status, 204, "upload: {}", r.text());
}

/// Uploads a large file with curl, which streams it instead of holding it in memory.
fn upload_streamed(d: &Daemon, id: &str, file: &Path) {
    let code = sh_ok(&format!(
        "curl -sS --unix-socket {} -o /dev/null -w '%{{http_code}}' -T {} \
         -H 'Content-Type: application/octet-stream' http://localhost/v2/images/{id}/file",
        d.socket.display(),
        file.display()
    ));
    assert_eq!(code.trim(), "204", "upload of {}", file.display());
}

fn image_status(d: &Daemon, id: &str) -> String {
    let r = d.api("GET", &format!("/v2/images/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["status"].as_str().unwrap().to_string()
}

/// Reserves the volume with an attachment (no connector); returns the attachment id.
fn reserve(d: &Daemon, volume_id: &Value, instance: Option<&str>) -> String {
    d.reserve(volume_id, instance)
}

fn connect(d: &Daemon, attachment: &str) {
    let r = d.api(
        "PUT",
        &format!("/v3/attachments/{attachment}"),
        Some(json!({"attachment": {"connector": {"host": "node-1"}}})),
    );
    assert_eq!(r.status, 200, "connector: {}", r.text());
    assert_eq!(r.json()["attachment"]["status"], "attaching");
}

fn complete(d: &Daemon, attachment: &str) {
    let r = d.api(
        "POST",
        &format!("/v3/attachments/{attachment}/action"),
        Some(json!({"os-complete": null})),
    );
    assert_eq!(r.status, 204, "complete: {}", r.text());
}

fn reset(d: &Daemon, volume: &str, fields: Value) {
    let r = d.api(
        "POST",
        &format!("/v3/volumes/{volume}/action"),
        Some(json!({"os-reset_status": fields})),
    );
    assert_eq!(r.status, 202, "reset {fields}: {}", r.text());
}

/// POSTs `body` to `path` as uid nobody with curl; returns the status and the body.
fn curl_as_nobody(d: &Daemon, path: &str, body: &str) -> (u16, String) {
    let script = format!(
        "curl -sS --unix-socket {} -X POST -H 'Content-Type: application/json' \
         -H 'OpenStack-API-Version: volume 3.68' -d {} -w '\\n%{{http_code}}' \
         http://localhost{path}",
        quote(d.socket.to_str().unwrap()),
        quote(body)
    );
    let out = sh_ok(&format!(
        "setpriv --reuid=nobody --regid=nogroup --clear-groups sh -c {}",
        quote(&script)
    ));
    let (body, code) = out.rsplit_once('\n').expect("curl printed a status");
    (code.trim().parse().unwrap(), body.to_string())
}

/// Quotes `text` for sh.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Writes `data` at `offset` of `path` without truncating it.
fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
    file.sync_all().unwrap();
}

/// Sends raw bytes as a request and returns the response's status code; the daemon must
/// answer without waiting for more.
fn raw_status(d: &Daemon, request: &[u8]) -> u16 {
    let mut stream = UnixStream::connect(&d.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The daemon may answer and close before it read everything; that is its right.
    let _ = stream.write_all(request);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1).and_then(|code| code.parse().ok());
    status.unwrap_or_else(|| panic!("no HTTP response: {text:?}"))
}
