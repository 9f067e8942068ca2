//! Adaptive low latency: keeps idle CPUs from halting for a short window after each request.
//!
//! Every FUSE request is a round trip between the caller's thread and a daemon thread, and each
//! direction wakes a sleeping thread. When the CPU it is woken on has halted, it must first leave
//! its halt state; on virtual machines that costs tens of microseconds per wake-up, several times
//! the whole cost of the request. While requests keep coming, the poller asks the kernel for a
//! CPU latency of zero through the PM QoS interface (`/dev/cpu_dma_latency`, as latency-sensitive
//! services do): idle CPUs then poll in the kernel's idle loop, which a wake-up reaches without an
//! interrupt. The request is withdrawn `window` after the last filesystem request, so an idle
//! mount changes nothing.
//!
//! Without access to `/dev/cpu_dma_latency` (not root), one `SCHED_IDLE` thread per CPU spins
//! instead; such threads run only when nothing else wants the CPU. That keeps CPUs from halting
//! too, but a wake-up must then interrupt the spinner, so it gains about half as much.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The PM QoS device: a process's latency request lives as long as its open file.
const CPU_LATENCY_DEVICE: &str = "/dev/cpu_dma_latency";
/// Written to the device: "wake me within 0 µs", which makes idle CPUs poll.
const LOW_LATENCY: i32 = 0;
/// Written to the device: withdraw the constraint (the kernel's `PM_QOS_DEFAULT_VALUE`).
const NO_CONSTRAINT: i32 = -1;

/// The adaptive low-latency state of one process.
pub struct Poller {
    start: Instant,
    window_ns: u64,
    /// Nanoseconds since `start` of the last request.
    last: AtomicU64,
    /// Whether the worker threads are parked (so a request must wake them).
    parked: AtomicBool,
    threads: std::sync::OnceLock<Vec<Thread>>,
}

impl Poller {
    /// Starts the latency holder (or the spinners when it is unavailable); `None` for a zero
    /// window.
    pub fn start(window: Duration) -> Option<Arc<Poller>> {
        if window.is_zero() {
            return None;
        }
        let poller = Arc::new(Poller {
            start: Instant::now(),
            window_ns: window.as_nanos() as u64,
            last: AtomicU64::new(0),
            parked: AtomicBool::new(true),
            threads: std::sync::OnceLock::new(),
        });
        let mut threads = Vec::new();
        match File::options().write(true).open(CPU_LATENCY_DEVICE) {
            Ok(device) => {
                let p = poller.clone();
                let spawned = std::thread::Builder::new()
                    .name("roomfs-latency".into())
                    .spawn(move || p.hold_latency(device));
                match spawned {
                    Ok(handle) => threads.push(handle.thread().clone()),
                    Err(e) => log::warn!("adaptive low latency disabled: {e}"),
                }
            }
            Err(e) => {
                log::debug!("{CPU_LATENCY_DEVICE}: {e}; spinning idle CPUs instead");
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                for cpu in 0..cpus {
                    let p = poller.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("roomfs-poll-{cpu}"))
                        .spawn(move || p.spin(cpu));
                    match spawned {
                        Ok(handle) => threads.push(handle.thread().clone()),
                        Err(e) => log::warn!("adaptive polling disabled: {e}"),
                    }
                }
            }
        }
        let _ = poller.threads.set(threads);
        Some(poller)
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn idle_ns(&self) -> u64 {
        self.now_ns()
            .saturating_sub(self.last.load(Ordering::Relaxed))
    }

    /// Called at every request: restarts the window, waking the workers if they sleep.
    pub fn activity(&self) {
        self.last.store(self.now_ns(), Ordering::Relaxed);
        if self.parked.swap(false, Ordering::AcqRel)
            && let Some(threads) = self.threads.get()
        {
            threads.iter().for_each(Thread::unpark);
        }
    }

    /// Whether the window has run out: marks the workers parked, unless a request came in
    /// meanwhile (then the window goes on).
    fn window_over(&self) -> bool {
        if self.idle_ns() < self.window_ns {
            return false;
        }
        self.parked.store(true, Ordering::Release);
        // A request between the check above and the store saw `parked == false` and woke no
        // one: look again, and take the window back if so.
        !(self.idle_ns() < self.window_ns && self.parked.swap(false, Ordering::AcqRel))
    }

    /// Holds a zero CPU latency request while requests come, and none otherwise.
    fn hold_latency(&self, mut device: File) {
        let set = |device: &mut File, value: i32| {
            if let Err(e) = device.write_all(&value.to_ne_bytes()) {
                log::debug!("{CPU_LATENCY_DEVICE}: {e}");
            }
        };
        loop {
            // A request that came while we were not parked yet left its token: no wake-up lost.
            std::thread::park();
            if self.parked.load(Ordering::Acquire) {
                continue;
            }
            set(&mut device, LOW_LATENCY);
            while !self.window_over() {
                let left = self.window_ns.saturating_sub(self.idle_ns());
                std::thread::sleep(Duration::from_nanos(left.max(50_000)));
            }
            set(&mut device, NO_CONSTRAINT);
        }
    }

    fn spin(&self, cpu: usize) {
        // Only idle time: pin to one CPU at the lowest scheduling class.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                log::warn!("adaptive polling: cannot use SCHED_IDLE; not spinning on CPU {cpu}");
                return;
            }
        }
        loop {
            if !self.window_over() {
                // Plain work, not `spin_loop()`: a PAUSE loop makes hypervisors deschedule the
                // virtual CPU (pause-loop exiting), which is the very halt to avoid.
                let mut x = 0u64;
                for i in 0..512u64 {
                    x = std::hint::black_box(x.wrapping_add(i));
                }
            } else {
                // A request after `window_over` unparks us at once (park tokens).
                std::thread::park();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The CPU latency the kernel currently grants (the strictest request of all processes).
    fn granted_latency() -> Option<i32> {
        let mut device = File::open(CPU_LATENCY_DEVICE).ok()?;
        let mut value = [0u8; 4];
        device.read_exact(&mut value).ok()?;
        Some(i32::from_ne_bytes(value))
    }

    fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..400 {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn requests_low_latency_while_busy_and_withdraws_it_when_idle() {
        let Some(before) = granted_latency() else {
            eprintln!("skipped: {CPU_LATENCY_DEVICE} is not readable (needs root)");
            return;
        };
        let poller = Poller::start(Duration::from_millis(50)).expect("a non-zero window");
        poller.activity();
        assert!(
            wait_for(|| granted_latency() == Some(LOW_LATENCY)),
            "a request makes the poller ask for zero latency"
        );
        if before != LOW_LATENCY {
            // Someone else on the machine may hold a zero request too: only then can the
            // withdrawal not be seen.
            assert!(
                wait_for(|| granted_latency() != Some(LOW_LATENCY)),
                "the request is withdrawn after the window"
            );
        }
    }
}
