//! Survives a mapped image that shrinks under the refill.
//!
//! Touching a page of a file mapping past the file's end raises SIGBUS, which would kill the
//! daemon and take every volume with it. While a refill scans a window of the image it
//! registers that window here; a SIGBUS inside a registered window is answered by mapping a
//! page of zeros over the faulting address and flagging the window, so the scan goes on
//! harmlessly and the refill fails with a reason afterwards. A SIGBUS anywhere else keeps
//! its default action.
//!
//! The kernel's own copies out of the mapping (the `pwrite` that writes the window into the
//! backing file) never raise SIGBUS: they fail with `EFAULT`, which the refill reports.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

const SLOTS: usize = 64;

/// One registered window: `[start, end)` and whether a fault hit it.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static WINDOWS: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();

/// A registered window; unregisters on drop.
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers `[ptr, ptr + len)` as a window whose faults are absorbed.
    ///
    /// Returns `None` when every slot is taken; the caller then fails the refill instead of
    /// scanning unguarded.
    pub fn register(ptr: *const u8, len: usize) -> Option<Self> {
        install_handler();

        let start = ptr as usize;
        for (index, slot) in WINDOWS.iter().enumerate() {
            // Claim a free slot by swapping its end from 0; start is written afterwards and a
            // handler that sees end != 0 but start == 0 simply does not match.
            if slot
                .end
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.faulted.store(false, Ordering::Release);
                slot.start.store(start, Ordering::Release);
                slot.end.store(start + len, Ordering::Release);
                return Some(Self { slot: index });
            }
        }
        None
    }

    /// Whether a fault was absorbed in this window since it was registered.
    pub fn faulted(&self) -> bool {
        WINDOWS[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let slot = &WINDOWS[self.slot];
        slot.start.store(0, Ordering::Release);
        slot.end.store(0, Ordering::Release);
    }
}

fn install_handler() {
    INSTALL.call_once(|| {
        // SAFETY: `sigaction` is plain data; we fill the fields the kernel reads and install a
        // handler that only performs async-signal-safe work (atomics and raw syscalls).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;

    for slot in &WINDOWS {
        let start = slot.start.load(Ordering::Acquire);
        let end = slot.end.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= end {
            continue;
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let page_start = addr & !(page - 1);

        // Replace the vanished file page with an anonymous zero page at the same address. The
        // range lies inside a mapping the refill owns and keeps alive while it is registered.
        // SAFETY: MAP_FIXED over a page of our own live mapping; no Rust reference relies on
        // the old contents beyond reading bytes, which become zeros.
        let mapped = unsafe {
            libc::mmap(
                page_start as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            slot.faulted.store(true, Ordering::Release);
            return;
        }
        break;
    }

    // Not ours: fall back to the default action, which the re-executed access then triggers.
    // SAFETY: resetting a signal disposition is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn truncated_mapping_reads_zeros_and_flags_the_window() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 64 * 1024]).unwrap();
        // SAFETY: the file is private to this test; truncation below is the point.
        let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
        let guard = Guard::register(map.as_ptr(), map.len()).unwrap();

        file.set_len(4096).unwrap();
        let sum: u64 = map.iter().map(|&b| u64::from(b)).sum();

        assert_eq!(sum, 7 * 4096);
        assert!(guard.faulted());
    }
}
