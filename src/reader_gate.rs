//! Keeps one FUSE thread reading requests at a time, and hands the reading over when a request
//! may take long or others are waiting.
//!
//! The kernel wakes the threads blocked reading `/dev/fuse` in turn, so with several of them
//! every request lands on the thread that has slept longest: a cold thread, often on another
//! CPU. A round trip then costs two to three times what it costs when one hot thread takes them
//! all (measured on a 2-vCPU VM: 30–45 µs against 13–16 µs for open+close). So after a request
//! a thread goes back to reading only if no other thread is; otherwise it stands by, parked.
//! Before a request that may block (a durable commit, a large copy) or when more requests are
//! already pending, the busy thread wakes a standby thread to read in its place, so requests
//! never wait behind a slow one while threads are free.
//!
//! Standby threads are parked inside a filesystem callback, after its reply. They return to
//! reading when woken, when [`ReaderGate::close`] is called, or when they find the connection
//! gone (checked every [`LIVENESS_CHECK`]), so the session can always end.
//!
//! Under concurrent load the kernel queues requests faster than one thread takes them: a thread
//! ending a callback while requests are already waiting goes on reading even though another
//! thread reads too, rather than standing by only to be woken for the next one (a park and a
//! wake-up, two context switches, per request). Once the queue is drained the extra readers
//! stand by again at their next callback.
//!
//! While requests stream (the previous one ended less than the spin window ago), the reading
//! thread polls the device for the window before it blocks in `read`: the caller's next request
//! is then taken without waking a sleeping thread, which costs a few microseconds of each round
//! trip on a VM even with idle CPUs polling (see `poll.rs`). It yields the CPU between polls,
//! so when the machine has no idle CPU the spin gives way to whatever else is runnable (the
//! very programs whose requests it waits for) instead of taking their time; and while the
//! machine has less than half a CPU idle it does not spin at all ([`Poller::spare_cpu`]). After a quiet
//! window the next request is served without spinning, so an idle mount spins at most once per
//! burst.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{Thread, ThreadId};
use std::time::{Duration, Instant};

use crate::poll::Poller;

/// How often a standby thread checks that the FUSE connection is still there.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);

/// Callbacks in a row that find requests pending before a standby thread is woken.
const BACKLOG: u32 = 2;

/// How long the reading thread polls for the next request while requests stream.
pub const SPIN_WINDOW: Duration = Duration::from_micros(50);

/// Which of a session's threads read requests.
pub struct ReaderGate {
    state: Mutex<State>,
    /// How long the reading thread polls for the next request before it blocks (zero: never).
    spin: Duration,
    /// The session's `/dev/fuse` (a duplicate): tells whether requests are pending, and whether
    /// the connection is gone.
    device: OnceLock<OwnedFd>,
    /// Says whether the machine has idle CPU to spin with (see [`Poller::spare_cpu`]); without
    /// it, the spin window alone decides.
    poller: OnceLock<Arc<Poller>>,
}

struct State {
    /// Threads reading or about to read (not inside a callback, not standing by).
    reading: usize,
    /// Parked threads, most recently parked last (woken first: its cache is warmest).
    standby: Vec<(ThreadId, Thread)>,
    /// How many callbacks in a row found more requests pending.
    backlog: u32,
    /// When the last callback ended.
    last_end: Option<Instant>,
    /// Whether the current request came within the spin window of the previous one.
    streaming: bool,
    /// Spins that caught a request, and spins that ran out.
    spins: (u64, u64),
    closed: bool,
}

/// A thread's turn in a callback: gives up reading on creation, decides on drop (after the
/// reply) whether to read again or stand by.
pub struct Turn<'a>(&'a ReaderGate);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl ReaderGate {
    /// A gate for a session whose `threads` threads all start reading; the reading thread polls
    /// for up to `spin` for the next request while requests stream (zero: it never does).
    pub fn new(threads: usize, spin: Duration) -> ReaderGate {
        ReaderGate {
            state: Mutex::new(State {
                reading: threads,
                standby: Vec::new(),
                backlog: 0,
                last_end: None,
                streaming: false,
                spins: (0, 0),
                closed: false,
            }),
            spin,
            device: OnceLock::new(),
            poller: OnceLock::new(),
        }
    }

    /// Spins only while `poller` says the machine has idle CPU to spare.
    pub fn set_poller(&self, poller: Arc<Poller>) {
        let _ = self.poller.set(poller);
    }

    /// Whether spinning now takes only time nobody else wants.
    fn spare_cpu(&self) -> bool {
        self.poller.get().is_none_or(|p| p.spare_cpu())
    }

    /// The spin window for this machine: [`SPIN_WINDOW`] when `low_latency` is wanted and there
    /// is a CPU for the caller besides the spinning one, else zero.
    pub fn spin_window(low_latency: bool) -> Duration {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if low_latency && cpus > 1 {
            SPIN_WINDOW
        } else {
            Duration::ZERO
        }
    }

    /// Spins that caught a request, and spins that ran out (for the logs and tests).
    pub fn spins(&self) -> (u64, u64) {
        self.lock().spins
    }

    /// Gives the gate the session's device, once the session exists.
    pub fn set_device(&self, device: &impl AsFd) {
        match device.as_fd().try_clone_to_owned() {
            Ok(fd) => {
                let _ = self.device.set(fd);
            }
            Err(e) => log::warn!("reader gate: cannot duplicate the FUSE device: {e}"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a callback. `may_block`: the request may take long, so another thread should read
    /// meanwhile.
    pub fn enter(&self, may_block: bool) -> Turn<'_> {
        let mut state = self.lock();
        state.reading = state.reading.saturating_sub(1);
        state.streaming =
            !self.spin.is_zero() && state.last_end.is_some_and(|end| end.elapsed() < self.spin);
        if state.reading == 0 && !state.standby.is_empty() {
            // One request pending now and then is the caller's next one racing ahead (an
            // asynchronous release, then the next open): cheaper to serve in turn than to wake
            // a thread. Requests pending at several callbacks in a row are a real backlog.
            if self.poll(libc::POLLIN) & libc::POLLIN != 0 {
                state.backlog += 1;
            } else {
                state.backlog = 0;
            }
            if may_block || state.backlog >= BACKLOG {
                state.backlog = 0;
                Self::wake_one(&mut state);
            }
        }
        Turn(self)
    }

    fn wake_one(state: &mut State) {
        if let Some((_, thread)) = state.standby.pop() {
            state.reading += 1;
            thread.unpark();
        }
    }

    /// Ends a callback: back to reading if nobody reads or requests are waiting, else stand by
    /// until needed.
    fn leave(&self) {
        let mut state = self.lock();
        state.last_end = Some(Instant::now());
        if state.reading > 0 && !state.closed && self.poll(libc::POLLIN) & libc::POLLIN != 0 {
            // More requests than the other readers take at once: read too.
            state.reading += 1;
            return;
        }
        if state.closed || state.reading == 0 {
            state.reading += 1;
            if state.streaming && !state.closed {
                drop(state);
                if !self.spare_cpu() {
                    return;
                }
                let caught = self.await_request();
                let mut state = self.lock();
                if caught {
                    state.spins.0 += 1;
                } else {
                    state.spins.1 += 1;
                }
            }
            return;
        }
        let me = std::thread::current();
        let id = me.id();
        state.standby.push((id, me));
        loop {
            drop(state);
            std::thread::park_timeout(LIVENESS_CHECK);
            state = self.lock();
            if !state.standby.iter().any(|(t, _)| *t == id) {
                return; // woken: `wake_one` counted us as reading
            }
            if !state.closed && self.poll(0) & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            {
                log::debug!("FUSE connection gone: releasing standby threads");
                state.closed = true;
            }
            if state.closed {
                state.standby.retain(|(t, _)| *t != id);
                state.reading += 1;
                return;
            }
        }
    }

    /// The thread in a callback is about to wait on something slow it could not tell at
    /// [`ReaderGate::enter`] (a request to a remote store: see `store::wait`): if no other
    /// thread reads requests, a standby thread reads them meanwhile.
    pub fn waiting(&self) {
        let mut state = self.lock();
        if state.reading == 0 {
            Self::wake_one(&mut state);
        }
    }

    /// Sends every standby thread back to reading for good (the session is ending).
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        while !state.standby.is_empty() {
            Self::wake_one(&mut state);
        }
    }

    /// Polls the device for up to the spin window: whether a request (or a hang-up, which the
    /// read that follows reports) came meanwhile.
    fn await_request(&self) -> bool {
        let start = Instant::now();
        loop {
            if self.poll(libc::POLLIN) != 0 {
                return true;
            }
            if start.elapsed() >= self.spin {
                return false;
            }
            // Only idle time: anything runnable on this CPU goes first.
            std::thread::yield_now();
        }
    }

    /// The device's `poll` events among `events` (plus errors); none without a device.
    fn poll(&self, events: libc::c_short) -> libc::c_short {
        let Some(device) = self.device.get() else {
            return 0;
        };
        let mut fd = libc::pollfd {
            fd: device.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        match unsafe { libc::poll(&mut fd, 1, 0) } {
            1 => fd.revents,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn standing_by(gate: &ReaderGate) -> usize {
        gate.lock().standby.len()
    }

    fn reading(gate: &ReaderGate) -> usize {
        gate.lock().reading
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("timed out waiting for {what}");
    }

    /// Runs one callback on a new thread (as a FUSE thread would), counting it when the
    /// thread gets back to reading.
    fn callback(
        gate: &Arc<ReaderGate>,
        may_block: bool,
        back: &Arc<AtomicUsize>,
    ) -> std::thread::JoinHandle<()> {
        let (gate, back) = (gate.clone(), back.clone());
        std::thread::spawn(move || {
            drop(gate.enter(may_block));
            back.fetch_add(1, Ordering::SeqCst);
        })
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        (r, w)
    }

    #[test]
    fn one_thread_reads_and_hands_over_before_blocking() {
        let gate = Arc::new(ReaderGate::new(3, Duration::ZERO));
        let back = Arc::new(AtomicUsize::new(0));
        let mut threads: Vec<_> = (0..3).map(|_| callback(&gate, false, &back)).collect();
        wait_for("two threads to stand by", || standing_by(&gate) == 2);
        wait_for("one thread to read", || back.load(Ordering::SeqCst) == 1);
        assert_eq!(reading(&gate), 1);

        // The reader takes a request that may block: a standby thread reads meanwhile, and the
        // blocking one stands by when done.
        threads.push(callback(&gate, true, &back));
        wait_for("the standby to take over", || {
            back.load(Ordering::SeqCst) == 2
        });
        wait_for("the blocking thread to stand by", || {
            standing_by(&gate) == 2
        });
        assert_eq!(reading(&gate), 1);

        gate.close();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(back.load(Ordering::SeqCst), 4);
        assert_eq!(standing_by(&gate), 0);
    }

    #[test]
    fn a_callback_about_to_wait_hands_over_the_reading_once() {
        let gate = Arc::new(ReaderGate::new(3, Duration::ZERO));
        let back = Arc::new(AtomicUsize::new(0));
        let mut threads: Vec<_> = (0..2).map(|_| callback(&gate, false, &back)).collect();
        wait_for("two threads to stand by", || standing_by(&gate) == 2);
        // A request that seemed quick finds it must wait on the store, twice: one standby
        // thread reads meanwhile, and only one.
        let turn = gate.enter(false);
        assert_eq!((reading(&gate), standing_by(&gate)), (0, 2));
        gate.waiting();
        assert_eq!((reading(&gate), standing_by(&gate)), (1, 1));
        gate.waiting();
        assert_eq!((reading(&gate), standing_by(&gate)), (1, 1));
        wait_for("the woken thread to read", || {
            back.load(Ordering::SeqCst) == 1
        });
        // (Closed first: the turn's end would otherwise stand by, as another thread reads.)
        gate.close();
        drop(turn);
        for t in threads.drain(..) {
            t.join().unwrap();
        }
    }

    #[test]
    fn pending_requests_wake_a_standby_thread() {
        let gate = Arc::new(ReaderGate::new(2, Duration::ZERO));
        let (r, w) = pipe();
        gate.set_device(&r);
        let back = Arc::new(AtomicUsize::new(0));
        let mut threads = vec![callback(&gate, false, &back)];
        wait_for("a thread to stand by", || standing_by(&gate) == 1);

        // Nothing pending: a quick request keeps the standby thread parked.
        threads.push(callback(&gate, false, &back));
        wait_for("the reader to return", || back.load(Ordering::SeqCst) == 1);
        assert_eq!(standing_by(&gate), 1);

        // A request pending once: served in turn.
        nix::unistd::write(&w, b"x").unwrap();
        threads.push(callback(&gate, false, &back));
        wait_for("the reader to return", || back.load(Ordering::SeqCst) == 2);
        assert_eq!(standing_by(&gate), 1);
        // Still pending at the next callback, a backlog: the standby thread is woken, and the
        // busy one, finding requests still waiting, reads on too instead of standing by.
        threads.push(callback(&gate, false, &back));
        wait_for("the standby and the busy thread to read", || {
            back.load(Ordering::SeqCst) == 4
        });
        assert_eq!(standing_by(&gate), 0);
        assert_eq!(reading(&gate), 2);

        gate.close();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn the_reader_polls_for_the_next_request_only_while_requests_stream() {
        let window = Duration::from_secs(1);
        let gate = ReaderGate::new(1, window);
        let (r, w) = pipe();
        gate.set_device(&r);

        // A first request: nothing came shortly before it, so the reader does not spin after.
        drop(gate.enter(false));
        assert_eq!(gate.spins(), (0, 0));

        // The next one comes at once: the reader polls, and catches a request arriving 20 ms
        // later.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            nix::unistd::write(&w, b"x").unwrap();
            w
        });
        drop(gate.enter(false));
        let _w = writer.join().unwrap();
        assert_eq!(gate.spins(), (1, 0));
        nix::unistd::read(&r, &mut [0u8; 1]).unwrap();

        // Another at once, but nothing follows it: the spin runs out after the window...
        drop(gate.enter(false));
        assert_eq!(gate.spins(), (1, 1));
        // ...and the request after that quiet window is served without spinning.
        drop(gate.enter(false));
        assert_eq!(gate.spins(), (1, 1));
    }

    #[test]
    fn standby_threads_leave_when_the_connection_is_gone() {
        let gate = Arc::new(ReaderGate::new(2, Duration::ZERO));
        let (r, w) = pipe();
        gate.set_device(&r);
        let back = Arc::new(AtomicUsize::new(0));
        let first = callback(&gate, false, &back);
        wait_for("a thread to stand by", || standing_by(&gate) == 1);
        // The device hangs up (as `/dev/fuse` does after an unmount): no close() needed.
        drop(w);
        first.join().unwrap();
        assert_eq!(back.load(Ordering::SeqCst), 1);
        assert_eq!(standing_by(&gate), 0);
    }
}
