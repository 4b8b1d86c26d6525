//! The fence in front of a volume's data path.
//!
//! A re-image must not run while a read or write is half done, and no request may see the
//! volume half refilled. Handlers therefore pass through a [`Gate`]: while it is open they
//! run inline and count as in flight; while it is fenced they are parked as closures and the
//! FUSE thread returns at once, so a fenced volume never holds a request thread and never
//! stalls the other volumes, `ls`, `statfs`, the control file or the socket.
//!
//! ```text
//!   handler ──try_enter──► open?  ── yes ─► I/O inline ─► drop(InFlight) ─► maybe wake fencer
//!                             └──── no ──► park(closure)      (reply answered after unfence)
//!   refill thread: fence() ─► waits in_flight == 0 ─► refill ─► unfence() ─► run parked FIFO
//! ```
//!
//! Fences nest: a re-image accepted while the space reclaim after the previous one holds a
//! short fence keeps the gate closed when that fence lifts. The gate opens when every
//! [`Gate::close`] has had its [`Gate::unfence`].

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A parked request: runs once the fence lifts.
pub type Parked = Box<dyn FnOnce() + Send>;

/// The fence of one volume.
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    drained: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Fences held; the gate is open at 0.
    fences: u32,
    in_flight: usize,
    parked: VecDeque<Parked>,
    /// When the running fence closed, for the time spent fenced.
    fenced_since: Option<Instant>,
    /// Time spent fenced by fences that have lifted.
    fenced_total: Duration,
}

/// Proof that a request is in flight; dropping it lets a waiting fence proceed.
pub struct InFlight<'a> {
    gate: &'a Gate,
}

impl Gate {
    /// Enters the gate if it is open.
    pub fn try_enter(&self) -> Option<InFlight<'_>> {
        let mut state = self.lock();
        if state.fences > 0 {
            return None;
        }
        state.in_flight += 1;
        Some(InFlight { gate: self })
    }

    /// Parks `request` while the gate is fenced; runs it now if the fence lifted meanwhile.
    pub fn park(&self, request: Parked) {
        let mut state = self.lock();
        if state.fences > 0 {
            state.parked.push_back(request);
            return;
        }
        drop(state);
        request();
    }

    /// Closes the gate and waits until every request in flight has finished.
    pub fn fence(&self) {
        self.close();
        self.drain();
    }

    /// Closes the gate without waiting: requests from now on are parked.
    pub fn close(&self) {
        let mut state = self.lock();
        if state.fences == 0 {
            state.fenced_since = Some(Instant::now());
        }
        state.fences += 1;
    }

    /// Waits until every request that entered before [`Gate::close`] has finished.
    pub fn drain(&self) {
        let mut state = self.lock();
        while state.in_flight > 0 {
            state = self
                .drained
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Lifts one fence; when none is left, runs the parked requests in arrival order,
    /// outside the lock.
    pub fn unfence(&self) {
        let parked = {
            let mut state = self.lock();
            state.fences = state.fences.saturating_sub(1);
            if state.fences > 0 {
                return;
            }
            if let Some(since) = state.fenced_since.take() {
                state.fenced_total += since.elapsed();
            }
            std::mem::take(&mut state.parked)
        };
        for request in parked {
            request();
        }
    }

    /// Whether the gate is fenced now.
    pub fn is_fenced(&self) -> bool {
        self.lock().fences > 0
    }

    /// Time this gate has spent fenced, the running fence included.
    pub fn fenced_time(&self) -> Duration {
        let state = self.lock();
        let running = state
            .fenced_since
            .map_or(Duration::ZERO, |since| since.elapsed());
        state.fenced_total + running
    }

    /// How many requests wait for the fence to lift.
    pub fn parked_len(&self) -> usize {
        self.lock().parked.len()
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // A panicking handler must not wedge the volume: the counters stay consistent because
        // every update is a single statement.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 && state.fences > 0 {
            self.gate.drained.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn open_gate_runs_inline() {
        let gate = Gate::default();
        assert!(gate.try_enter().is_some());
        assert!(!gate.is_fenced());
    }

    #[test]
    fn fence_waits_for_in_flight_and_parks_new_requests() {
        let gate = Arc::new(Gate::default());
        let ran = Arc::new(AtomicUsize::new(0));

        let guard_gate = gate.clone();
        let holder = std::thread::spawn(move || {
            let _in_flight = guard_gate.try_enter().unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        std::thread::sleep(Duration::from_millis(20));

        let fencer_gate = gate.clone();
        let fencer = std::thread::spawn(move || fencer_gate.fence());
        fencer.join().unwrap();
        holder.join().unwrap();
        assert!(gate.is_fenced());

        assert!(gate.try_enter().is_none());
        let counter = ran.clone();
        gate.park(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(gate.parked_len(), 1);

        gate.unfence();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert!(gate.try_enter().is_some());
    }

    /// Two fences: the gate stays closed until both are lifted, then runs what was parked.
    #[test]
    fn nested_fences_open_only_when_all_are_lifted() {
        let gate = Gate::default();
        let ran = Arc::new(AtomicUsize::new(0));
        gate.fence();
        gate.close();

        let counter = ran.clone();
        gate.park(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        gate.unfence();
        assert!(gate.is_fenced());
        assert!(gate.try_enter().is_none());
        assert_eq!(ran.load(Ordering::SeqCst), 0);

        gate.unfence();
        assert!(!gate.is_fenced());
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn fenced_time_grows_while_fenced_and_stops_when_lifted() {
        let gate = Gate::default();
        assert_eq!(gate.fenced_time(), Duration::ZERO);

        gate.fence();
        std::thread::sleep(Duration::from_millis(30));
        let during = gate.fenced_time();
        assert!(during >= Duration::from_millis(30), "{during:?}");

        gate.unfence();
        let after = gate.fenced_time();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(gate.fenced_time(), after, "an open gate adds no time");
        assert!(after >= during);
    }

    #[test]
    fn park_after_unfence_runs_at_once() {
        let gate = Gate::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        gate.park(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
