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
//!
//! All of this trades idle CPU time for latency, so it backs off when there is none to trade:
//! while requests come, the poller looks at the machine's idle time (`/proc/stat`, at most
//! every [`SAMPLE_EVERY`]), and when less than half a CPU was idle it withdraws the latency
//! request and tells the FUSE threads not to spin for the next request ([`Poller::spare_cpu`]):
//! on a machine whose CPUs are all busy (many agents, builds beside them) a CPU never halts
//! anyway, and every microsecond spent polling is taken from the programs whose requests it
//! waits for.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::sync::Mutex;
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
    /// Whether the machine had idle CPU lately (see [`Poller::spare_cpu`]).
    spare: AtomicBool,
    /// The last look at `/proc/stat`: when (nanoseconds since `start`) and what it showed.
    sample: Mutex<Option<(u64, CpuTimes)>>,
}

/// How often the machine's idle time is looked at, at most.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Idle CPUs (on average over the last sample) below which polling backs off.
const SPARE_CPUS: f64 = 0.5;

/// The machine's CPU time from `/proc/stat`, in ticks: idle (with I/O wait) and in all.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CpuTimes {
    idle: u64,
    total: u64,
}

impl CpuTimes {
    /// The first line of `/proc/stat`: `cpu user nice system idle iowait irq softirq steal ...`
    /// (guest time is counted in user time already).
    fn parse(stat: &str) -> Option<CpuTimes> {
        let mut fields = stat.lines().next()?.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let v: Vec<u64> = fields
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        (v.len() >= 5).then(|| CpuTimes {
            idle: v[3] + v[4],
            total: v.iter().sum(),
        })
    }

    fn now() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Whether at least `SPARE_CPUS` of `cpus` were idle on average from `before` to `self`
    /// (yes when no time passed).
    fn spare_since(&self, before: &CpuTimes, cpus: usize) -> bool {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return true;
        }
        let idle = self.idle.saturating_sub(before.idle);
        idle as f64 / total as f64 * cpus as f64 >= SPARE_CPUS
    }
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
            spare: AtomicBool::new(true),
            sample: Mutex::new(None),
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

    /// Whether the machine had idle CPU to spare lately (at least half a CPU idle on average),
    /// so that polling for latency takes time nobody else wants. Looks at `/proc/stat` when
    /// the last look is older than [`SAMPLE_EVERY`] (one caller at a time; the others take the
    /// last answer); yes when it cannot be read.
    pub fn spare_cpu(&self) -> bool {
        let now = self.now_ns();
        if let Ok(mut sample) = self.sample.try_lock() {
            let due = sample
                .as_ref()
                .is_none_or(|(at, _)| now.saturating_sub(*at) >= SAMPLE_EVERY.as_nanos() as u64);
            if due && let Some(times) = CpuTimes::now() {
                if let Some((_, before)) = sample.as_ref() {
                    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                    self.spare
                        .store(times.spare_since(before, cpus), Ordering::Relaxed);
                }
                *sample = Some((now, times));
            }
        }
        self.spare.load(Ordering::Relaxed)
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
            // Held only while the machine has idle CPU to spare (looked at again as the
            // window goes on).
            let mut low = self.spare_cpu();
            if low {
                set(&mut device, LOW_LATENCY);
            }
            while !self.window_over() {
                let left = self.window_ns.saturating_sub(self.idle_ns());
                std::thread::sleep(Duration::from_nanos(left.max(50_000)));
                let spare = self.spare_cpu();
                if spare != low {
                    set(&mut device, if spare { LOW_LATENCY } else { NO_CONSTRAINT });
                    low = spare;
                }
            }
            if low {
                set(&mut device, NO_CONSTRAINT);
            }
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
    fn spare_cpu_is_idle_time_against_all_time() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        let before = CpuTimes::parse(stat).unwrap();
        assert_eq!(
            before,
            CpuTimes {
                idle: 850,
                total: 1000
            }
        );
        // Two CPUs, 100 ticks: 30 idle is 0.6 of a CPU; 20 idle is 0.4.
        let spare = CpuTimes {
            idle: 880,
            total: 1100,
        };
        assert!(spare.spare_since(&before, 2));
        let busy = CpuTimes {
            idle: 870,
            total: 1100,
        };
        assert!(!busy.spare_since(&before, 2));
        assert!(
            before.spare_since(&before, 2),
            "no time passed: no reason to back off"
        );
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None);
        assert!(
            CpuTimes::now().is_some(),
            "this machine's /proc/stat parses"
        );
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
