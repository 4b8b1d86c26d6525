//! Who is asking: identities come from the kernel, never from the request.
//!
//! The socket reads `SO_PEERCRED`; the FUSE side reads the uid, gid and pid of the request.
//! Supplementary groups are read from `/proc/<pid>/status`, which reflects the process's real
//! credentials; when that process is gone (or its uid no longer matches, a recycled pid) only
//! the primary group counts, which can deny but never grant more than the caller holds.

use std::fs;

/// The credentials of one request.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Caller {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Supplementary groups, the primary one included.
    pub groups: Vec<u32>,
}

impl Caller {
    /// A caller with exactly these ids and no supplementary groups.
    pub fn new(uid: u32, gid: u32) -> Self {
        Self {
            uid,
            gid,
            groups: vec![gid],
        }
    }

    /// The credentials of process `pid`, which the kernel reported as `uid`/`gid`.
    pub fn from_process(uid: u32, gid: u32, pid: u32) -> Self {
        let mut caller = Self::new(uid, gid);
        if let Some(groups) = supplementary_groups(uid, pid) {
            caller
                .groups
                .extend(groups.into_iter().filter(|g| *g != gid));
        }
        caller
    }

    /// The daemon's own identity, for work it does on its own behalf.
    pub fn daemon() -> Self {
        Self::new(0, 0)
    }

    /// Whether the caller is in group `gid`.
    pub fn in_group(&self, gid: u32) -> bool {
        self.groups.contains(&gid)
    }
}

/// Reads the `Groups:` line of `/proc/<pid>/status` if the process still runs as `uid`.
fn supplementary_groups(uid: u32, pid: u32) -> Option<Vec<u32>> {
    if pid == 0 {
        return None;
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;

    // The Uid line is "real effective saved fs"; a recycled pid shows another uid.
    let effective_uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u32>()
        .ok()?;
    if effective_uid != uid {
        return None;
    }

    let groups = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        groups
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

/// Looks up a group id by name in the system group database.
pub fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `group` is a plain C struct for which all-zero bytes are a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized storage owned by this frame, and
    // getgrnam_r writes only within `buf`'s stated length.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(group.gr_gid)
}

/// Looks up a user id by name in the system password database.
pub fn user_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `passwd` is a plain C struct for which all-zero bytes are a valid value.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: as in `group_id`; getpwnam_r writes only within `buf`'s stated length.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut passwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(passwd.pw_uid)
}

/// The primary group of user `uid`, if the password database knows the user.
pub fn primary_group(uid: u32) -> Option<u32> {
    // SAFETY: `passwd` is a plain C struct for which all-zero bytes are a valid value.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: as in `group_id`; getpwuid_r writes only within `buf`'s stated length.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut passwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(passwd.pw_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_groups_are_read() {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let caller = Caller::from_process(uid, gid, std::process::id());
        assert!(caller.in_group(gid));
    }

    #[test]
    fn recycled_pid_with_other_uid_grants_nothing_extra() {
        let caller = Caller::from_process(12345, 777, std::process::id());
        assert_eq!(caller.groups, vec![777]);
    }

    #[test]
    fn root_group_resolves() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(user_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-volumed"), None);
    }
}
