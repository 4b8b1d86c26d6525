//! The README's story, end to end: create, mkfs, loop mount, import, re-image, find the image.

mod common;

use common::*;

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
