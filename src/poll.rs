//! Adaptive polling: keeps idle CPUs awake for a short window after each filesystem request.
//!
//! Every FUSE request is a round trip between the caller's thread and a daemon thread. When the
//! CPU a sleeping thread is woken on is idle, it must first leave its halt state; on virtual
//! machines that costs tens to hundreds of microseconds per wake-up, several times the whole
//! cost of the request. While requests keep coming, one `SCHED_IDLE` thread per CPU spins so
//! that no CPU halts: such threads run only when nothing else wants the CPU and are preempted at
//! once when something does. They park after `window` without requests, so an idle mount costs
//! nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The spinning threads of one process.
pub struct Poller {
    start: Instant,
    window_ns: u64,
    /// Nanoseconds since `start` of the last request.
    last: AtomicU64,
    /// Whether the spinners are parked (so a request must wake them).
    parked: AtomicBool,
    threads: std::sync::OnceLock<Vec<Thread>>,
}

impl Poller {
    /// Starts one spinner per CPU; `None` for a zero window.
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
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut threads = Vec::new();
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
        let _ = poller.threads.set(threads);
        Some(poller)
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Called at every request: restarts the window, waking the spinners if they sleep.
    pub fn activity(&self) {
        self.last.store(self.now_ns(), Ordering::Relaxed);
        if self.parked.swap(false, Ordering::AcqRel)
            && let Some(threads) = self.threads.get()
        {
            threads.iter().for_each(Thread::unpark);
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
            let idle = self
                .now_ns()
                .saturating_sub(self.last.load(Ordering::Relaxed));
            if idle < self.window_ns {
                // Plain work, not `spin_loop()`: a PAUSE loop makes hypervisors deschedule the
                // virtual CPU (pause-loop exiting), which is the very halt to avoid.
                let mut x = 0u64;
                for i in 0..512u64 {
                    x = std::hint::black_box(x.wrapping_add(i));
                }
            } else {
                self.parked.store(true, Ordering::Release);
                // A request between the check and here unparks us at once (park tokens).
                std::thread::park();
            }
        }
    }
}
