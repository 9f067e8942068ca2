//! What roomfs counts and times, served as Prometheus text at `GET /metrics` (see
//! [`crate::control::server::metrics_router`]).
//!
//! Every metric is defined here and nowhere else; the rest of the code calls one-line functions
//! ([`fuse_op`], [`bytes_read`], [`committed`], [`denied`], ...). The metrics live in one
//! process-wide registry, so all mounts of a daemon add up; a standalone `roomfs mount` counts
//! too, but has no endpoint to show it.
//!
//! Invariant: **labels stay bounded.** A label value comes from a closed set (a FUSE operation
//! name, an errno name, a space kind) or names a space that is mounted right now (the space
//! gauges are rebuilt at every scrape from the daemon's mount table, so a space that is no
//! longer mounted disappears). No label ever carries a path, a file name or a user's input.
//!
//! Counters only grow; gauges that describe the daemon's state (mounts, sessions, space usage)
//! are sampled at scrape time from a [`Snapshot`] the daemon takes, so they cannot drift.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::errno::Errno;
use crate::space::quota::{Limits, Usage};

/// The `Content-Type` of [`render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Defines [`FuseOp`] and its names.
macro_rules! fuse_ops {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// A FUSE operation the adapter serves: the closed set of the `op` label.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum FuseOp { $($variant),* }

        impl FuseOp {
            const COUNT: usize = [$(FuseOp::$variant),*].len();

            /// The name in the metrics (the kernel's name of the request).
            pub fn name(self) -> &'static str {
                match self { $(FuseOp::$variant => $name),* }
            }
        }
    };
}

fuse_ops! {
    Lookup => "lookup", Forget => "forget", Getattr => "getattr", Setattr => "setattr",
    Readlink => "readlink", Mknod => "mknod", Mkdir => "mkdir", Unlink => "unlink",
    Rmdir => "rmdir", Symlink => "symlink", Rename => "rename", Link => "link", Open => "open",
    Create => "create", Read => "read", Write => "write", CopyFileRange => "copy_file_range",
    Fallocate => "fallocate", Flush => "flush", Release => "release", Fsync => "fsync",
    Lseek => "lseek", Opendir => "opendir", Readdir => "readdir", Readdirplus => "readdirplus",
    Releasedir => "releasedir", Fsyncdir => "fsyncdir", Getxattr => "getxattr",
    Listxattr => "listxattr", Setxattr => "setxattr", Removexattr => "removexattr",
    Ioctl => "ioctl", Statfs => "statfs", Getlk => "getlk", Setlk => "setlk",
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// An errno, shown by its name (`EDQUOT`); the set of errnos is closed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ErrnoName(i32);

impl EncodeLabelValue for ErrnoName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let name = format!("{:?}", nix::errno::Errno::from_raw(self.0));
        if name == "UnknownErrno" {
            write!(encoder, "errno{}", self.0)
        } else {
            encoder.write_str(&name)
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrnoLabel {
    errno: ErrnoName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// A failed backend request: the operation and what kind of failure (closed sets).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendErrorLabel {
    op: &'static str,
    kind: &'static str,
}

/// A mounted space: `rooms/<id>` or `sessions/<id>`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpaceLabel {
    space: String,
}

/// Every metric of the process.
struct Metrics {
    registry: Registry,
    fuse_duration: Family<OpLabel, Histogram, fn() -> Histogram>,
    /// Each operation's histogram of `fuse_duration`, found once: a request then costs no
    /// family lookup (requests take microseconds; this is on every one of them).
    fuse_by_op: [OnceLock<Histogram>; FuseOp::COUNT],
    fuse_errors: Family<ErrnoLabel, Counter>,
    /// Each errno's counter of `fuse_errors`, found once, as for `fuse_by_op`: three of a new
    /// file's requests are answered with an error (a lookup's `ENOENT`, Python's `isatty`
    /// `ENOTTY`, the kernel's `security.capability` probe `ENODATA`).
    fuse_errors_by: [OnceLock<Counter>; ERRNO_COUNTERS],
    read_bytes: Counter,
    written_bytes: Counter,
    commits: Counter,
    commit_failures: Family<ErrnoLabel, Counter>,
    denied: Counter,
    open_handles: Family<KindLabel, Gauge>,
    mounts: Family<KindLabel, Gauge>,
    sessions: Gauge,
    space_used_bytes: Family<SpaceLabel, Gauge>,
    space_used_files: Family<SpaceLabel, Gauge>,
    space_limit_bytes: Family<SpaceLabel, Gauge>,
    space_limit_files: Family<SpaceLabel, Gauge>,
    space_limit_file_bytes: Family<SpaceLabel, Gauge>,
    backend_requests: Family<OpLabel, Counter>,
    backend_errors: Family<BackendErrorLabel, Counter>,
    backend_retries: Family<OpLabel, Counter>,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_bytes: Gauge,
}

/// FUSE latency buckets: 10 µs to ~2.6 s, ×4 each.
fn fuse_histogram() -> Histogram {
    Histogram::new(exponential_buckets(10e-6, 4.0, 10))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("roomfs");
        let m = Metrics {
            fuse_duration: Family::new_with_constructor(fuse_histogram),
            fuse_by_op: std::array::from_fn(|_| OnceLock::new()),
            fuse_errors: Family::default(),
            fuse_errors_by: std::array::from_fn(|_| OnceLock::new()),
            read_bytes: Counter::default(),
            written_bytes: Counter::default(),
            commits: Counter::default(),
            commit_failures: Family::default(),
            denied: Counter::default(),
            open_handles: Family::default(),
            mounts: Family::default(),
            sessions: Gauge::default(),
            space_used_bytes: Family::default(),
            space_used_files: Family::default(),
            space_limit_bytes: Family::default(),
            space_limit_files: Family::default(),
            space_limit_file_bytes: Family::default(),
            backend_requests: Family::default(),
            backend_errors: Family::default(),
            backend_retries: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "build",
            "The roomfs version serving",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_with_unit(
            "fuse_request_duration",
            "Time to serve one FUSE request, by operation (the count is the number of requests)",
            Unit::Seconds,
            m.fuse_duration.clone(),
        );
        registry.register(
            "fuse_errors",
            "FUSE requests answered with an error, by errno (ENOENT from lookups is normal)",
            m.fuse_errors.clone(),
        );
        registry.register_with_unit(
            "read",
            "Bytes read through the daemon (not counting reads the kernel serves from the disk \
             directly with FUSE passthrough)",
            Unit::Bytes,
            m.read_bytes.clone(),
        );
        registry.register_with_unit(
            "written",
            "Bytes written into working copies (write and copy_file_range)",
            Unit::Bytes,
            m.written_bytes.clone(),
        );
        registry.register(
            "commits",
            "Commits that published a new version of a file (close, fsync, last release)",
            m.commits.clone(),
        );
        registry.register(
            "commit_failures",
            "Commit attempts that failed, by errno; the file keeps its previous version",
            m.commit_failures.clone(),
        );
        registry.register(
            "grant_denials",
            "Operations refused with EACCES because the path is outside the mount's grant or \
             under a read-only prefix",
            m.denied.clone(),
        );
        registry.register(
            "open_handles",
            "File and directory handles open now, over all mounts",
            m.open_handles.clone(),
        );
        registry.register(
            "mounts",
            "Mounts the daemon serves, by space kind",
            m.mounts.clone(),
        );
        registry.register(
            "sessions",
            "Sessions that exist (created and not yet ended)",
            m.sessions.clone(),
        );
        registry.register_with_unit(
            "space_used",
            "Bytes in the files of a mounted space with limits",
            Unit::Bytes,
            m.space_used_bytes.clone(),
        );
        registry.register(
            "space_used_files",
            "Files, directories and links of a mounted space with limits",
            m.space_used_files.clone(),
        );
        registry.register_with_unit(
            "space_limit",
            "Byte limit of a mounted space (absent: unlimited)",
            Unit::Bytes,
            m.space_limit_bytes.clone(),
        );
        registry.register(
            "space_limit_files",
            "Entry limit of a mounted space (absent: unlimited)",
            m.space_limit_files.clone(),
        );
        registry.register_with_unit(
            "space_limit_file_size",
            "Largest file allowed in a mounted space (absent: unlimited)",
            Unit::Bytes,
            m.space_limit_file_bytes.clone(),
        );
        registry.register(
            "backend_requests",
            "Requests to an object store (S3), by operation (retries not counted: see \
             backend_retries)",
            m.backend_requests.clone(),
        );
        registry.register(
            "backend_errors",
            "Object store requests that failed after their retries, by operation and kind \
             (not_found and precondition are often answers, not faults)",
            m.backend_errors.clone(),
        );
        registry.register(
            "backend_retries",
            "Object store request attempts that were retries, by operation",
            m.backend_retries.clone(),
        );
        registry.register(
            "cache_hits",
            "Reads of object store files served from the local cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Reads of object store files that had to fetch from the store",
            m.cache_misses.clone(),
        );
        registry.register_with_unit(
            "cache",
            "Bytes the local cache of object store files holds now",
            Unit::Bytes,
            m.cache_bytes.clone(),
        );
        // Series that should show (at zero) before anything happened.
        for kind in ["file", "dir"] {
            drop(m.open_handles.get_or_create(&KindLabel { kind }));
        }
        for kind in ["room", "session"] {
            drop(m.mounts.get_or_create(&KindLabel { kind }));
        }
        Metrics { registry, ..m }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Handles open per kind, kept beside the gauge so [`FuseHandles`] can give back what a mount
/// still held when it went away.
static OPEN_FILES: AtomicI64 = AtomicI64::new(0);
static OPEN_DIRS: AtomicI64 = AtomicI64::new(0);

/// One FUSE request of operation `op` took `elapsed`.
pub fn fuse_op(op: FuseOp, elapsed: Duration) {
    let m = &*METRICS;
    m.fuse_by_op[op as usize]
        .get_or_init(|| {
            m.fuse_duration
                .get_or_create(&OpLabel { op: op.name() })
                .clone()
        })
        .observe(elapsed.as_secs_f64());
}

/// Times one FUSE request: records [`fuse_op`] when dropped.
pub struct FuseTimer {
    op: FuseOp,
    start: Instant,
}

impl FuseTimer {
    pub fn start(op: FuseOp) -> FuseTimer {
        FuseTimer {
            op,
            start: Instant::now(),
        }
    }
}

impl Drop for FuseTimer {
    fn drop(&mut self) {
        fuse_op(self.op, self.start.elapsed());
    }
}

/// Errnos below this have a counter found once (see `fuse_errors_by`); Linux's go to 133.
const ERRNO_COUNTERS: usize = 160;

/// A FUSE request was answered with `errno`.
pub fn fuse_error(errno: i32) {
    let m = &*METRICS;
    let family = || {
        m.fuse_errors
            .get_or_create(&ErrnoLabel {
                errno: ErrnoName(errno),
            })
            .clone()
    };
    match usize::try_from(errno)
        .ok()
        .and_then(|e| m.fuse_errors_by.get(e))
    {
        Some(counter) => counter.get_or_init(family).inc(),
        None => family().inc(),
    };
}

/// `n` bytes were read through the daemon.
pub fn bytes_read(n: usize) {
    METRICS.read_bytes.inc_by(n as u64);
}

/// `n` bytes were written into a working copy.
pub fn bytes_written(n: u64) {
    METRICS.written_bytes.inc_by(n);
}

/// A commit published a new version.
pub fn committed() {
    METRICS.commits.inc();
}

/// A commit attempt failed with `errno`.
pub fn commit_failed(errno: &Errno) {
    METRICS
        .commit_failures
        .get_or_create(&ErrnoLabel {
            errno: ErrnoName(errno.0),
        })
        .inc();
}

/// The grant refused an operation.
pub fn denied() {
    METRICS.denied.inc();
}

thread_local! {
    /// Whether this thread's object-store requests are the change feed's (see [`FeedRequests`]).
    static FEED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, the object-store requests this thread makes are counted as the change feed's
/// (`op="feed_get"`, `feed_put`...), so what following other hosts costs shows apart from the
/// files' requests.
pub struct FeedRequests(bool);

impl FeedRequests {
    pub fn enter() -> FeedRequests {
        FeedRequests(FEED.with(|f| f.replace(true)))
    }
}

impl Drop for FeedRequests {
    fn drop(&mut self) {
        FEED.with(|f| f.set(self.0));
    }
}

/// `op`, or its change feed's name on a thread counting for the feed.
fn backend_op(op: &'static str) -> &'static str {
    if !FEED.with(std::cell::Cell::get) {
        return op;
    }
    match op {
        "get" => "feed_get",
        "put" => "feed_put",
        "head" => "feed_head",
        "list" => "feed_list",
        "delete" => "feed_delete",
        "delete_many" => "feed_delete_many",
        _ => "feed_other",
    }
}

/// A request `op` (a fixed name: `get`, `put`, `list`...) was sent to an object store.
pub fn backend_request(op: &'static str) {
    let op = backend_op(op);
    METRICS
        .backend_requests
        .get_or_create(&OpLabel { op })
        .inc();
}

/// A request `op` to an object store failed with a failure of `kind` (a fixed name).
pub fn backend_error(op: &'static str, kind: &'static str) {
    let op = backend_op(op);
    METRICS
        .backend_errors
        .get_or_create(&BackendErrorLabel { op, kind })
        .inc();
}

/// A request `op` to an object store was tried again.
pub fn backend_retry(op: &'static str) {
    let op = backend_op(op);
    METRICS.backend_retries.get_or_create(&OpLabel { op }).inc();
}

/// A read of an object store file was served from the local cache (`hit`) or not.
pub fn cache_read(hit: bool) {
    if hit {
        METRICS.cache_hits.inc();
    } else {
        METRICS.cache_misses.inc();
    }
}

/// The local cache of object store files holds `bytes` now.
pub fn cache_size(bytes: u64) {
    METRICS.cache_bytes.set(bytes as i64);
}

/// Counts the handles one mount has open, for the `open_handles` gauge; whatever is still
/// counted when it is dropped (the mount went away with handles the kernel never released) is
/// given back, so the gauge cannot drift.
#[derive(Debug, Default)]
pub struct FuseHandles {
    files: AtomicI64,
    dirs: AtomicI64,
}

impl FuseHandles {
    /// A file handle was opened, if `opened`.
    pub fn file_opened_if(&self, opened: bool) {
        if opened {
            Self::adjust(&self.files, &OPEN_FILES, 1);
        }
    }

    pub fn file_released(&self) {
        Self::adjust(&self.files, &OPEN_FILES, -1);
    }

    pub fn dir_opened(&self) {
        Self::adjust(&self.dirs, &OPEN_DIRS, 1);
    }

    pub fn dir_released(&self) {
        Self::adjust(&self.dirs, &OPEN_DIRS, -1);
    }

    /// Two atomic adds: the gauge reads the totals at the scrape.
    fn adjust(mine: &AtomicI64, total: &AtomicI64, by: i64) {
        mine.fetch_add(by, Ordering::Relaxed);
        total.fetch_add(by, Ordering::Relaxed);
    }
}

impl Drop for FuseHandles {
    fn drop(&mut self) {
        OPEN_FILES.fetch_sub(self.files.load(Ordering::Relaxed), Ordering::Relaxed);
        OPEN_DIRS.fetch_sub(self.dirs.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// The daemon's state at a scrape.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub room_mounts: u64,
    pub session_mounts: u64,
    pub sessions: u64,
    /// Mounted spaces whose usage is counted (those with limits), each once.
    pub spaces: Vec<SpaceSample>,
}

/// The usage and limits of one mounted space.
#[derive(Debug, Clone)]
pub struct SpaceSample {
    /// `rooms/<id>` or `sessions/<id>`.
    pub space: String,
    pub usage: Usage,
    pub limits: Limits,
}

/// Only one scrape sets the sampled gauges and encodes at a time.
static SCRAPE: Mutex<()> = Mutex::new(());

/// Every metric in the Prometheus text format, with the gauges of `snapshot` (`None`: no
/// daemon state, e.g. in tests).
pub fn render(snapshot: Option<&Snapshot>) -> String {
    let _one = SCRAPE.lock().unwrap_or_else(|e| e.into_inner());
    let m = &*METRICS;
    for (kind, total) in [("file", &OPEN_FILES), ("dir", &OPEN_DIRS)] {
        m.open_handles
            .get_or_create(&KindLabel { kind })
            .set(total.load(Ordering::Relaxed));
    }
    if let Some(s) = snapshot {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        m.mounts
            .get_or_create(&KindLabel { kind: "room" })
            .set(gauge(s.room_mounts));
        m.mounts
            .get_or_create(&KindLabel { kind: "session" })
            .set(gauge(s.session_mounts));
        m.sessions.set(gauge(s.sessions));
        for family in [
            &m.space_used_bytes,
            &m.space_used_files,
            &m.space_limit_bytes,
            &m.space_limit_files,
            &m.space_limit_file_bytes,
        ] {
            family.clear();
        }
        for sample in &s.spaces {
            let label = SpaceLabel {
                space: sample.space.clone(),
            };
            let set = |family: &Family<SpaceLabel, Gauge>, value: Option<u64>| {
                if let Some(v) = value {
                    family.get_or_create(&label).set(gauge(v));
                }
            };
            set(&m.space_used_bytes, Some(sample.usage.bytes));
            set(&m.space_used_files, Some(sample.usage.files));
            set(&m.space_limit_bytes, sample.limits.max_bytes);
            set(&m.space_limit_files, sample.limits.max_files);
            set(&m.space_limit_file_bytes, sample.limits.max_file_bytes);
        }
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry) {
        // Writing into a String cannot fail; a label that refused to encode would land here.
        log::error!("encoding metrics failed: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name{labels}` (labels exactly as printed) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_and_labels_render() {
        // The registry is process-wide and other tests count too: compare before and after.
        let before = render(None);
        let read = |t: &str| sample(t, "roomfs_read_bytes_total").unwrap_or(0.0);
        let failed =
            |t: &str| sample(t, "roomfs_commit_failures_total{errno=\"EDQUOT\"}").unwrap_or(0.0);
        let fuse_errors = |t: &str, name: &str| {
            sample(t, &format!("roomfs_fuse_errors_total{{errno=\"{name}\"}}")).unwrap_or(0.0)
        };
        bytes_read(1000);
        commit_failed(&Errno::EDQUOT);
        fuse_op(FuseOp::Lookup, Duration::from_micros(30));
        fuse_error(libc::ENOTTY);
        fuse_error(libc::ENOTTY);
        fuse_error(4001);
        let after = render(None);
        assert!(read(&after) - read(&before) >= 1000.0, "{after}");
        assert!(failed(&after) - failed(&before) >= 1.0, "{after}");
        assert!(fuse_errors(&after, "ENOTTY") - fuse_errors(&before, "ENOTTY") >= 2.0);
        assert!(fuse_errors(&after, "errno4001") - fuse_errors(&before, "errno4001") >= 1.0);
        assert!(after.contains("roomfs_build_info{version=\""), "{after}");
        let lookups_under_40us = |t: &str| {
            sample(
                t,
                "roomfs_fuse_request_duration_seconds_bucket{op=\"lookup\",le=\"4e-05\"}",
            )
            .unwrap_or(0.0)
        };
        assert!(
            lookups_under_40us(&after) - lookups_under_40us(&before) >= 1.0,
            "{after}"
        );
        // Handle gauges show from the start, at zero if need be.
        assert!(
            after.contains("roomfs_open_handles{kind=\"dir\"}"),
            "{after}"
        );
        assert!(
            after.contains("# TYPE roomfs_commits_total counter"),
            "{after}"
        );
    }

    #[test]
    fn unknown_errnos_keep_their_number() {
        let mut out = String::new();
        let label = ErrnoLabel {
            errno: ErrnoName(4000),
        };
        let family: Family<ErrnoLabel, Counter> = Family::default();
        family.get_or_create(&label).inc();
        let mut registry = Registry::default();
        registry.register("x", "x", family);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("x_total{errno=\"errno4000\"} 1"), "{out}");
    }

    #[test]
    fn space_gauges_follow_the_snapshot() {
        let limits = Limits {
            max_file_bytes: Some(10),
            max_files: None,
            max_bytes: Some(500),
        };
        let snapshot = Snapshot {
            room_mounts: 2,
            session_mounts: 1,
            sessions: 3,
            spaces: vec![SpaceSample {
                space: "sessions/unit-test-space".into(),
                usage: Usage {
                    files: 4,
                    bytes: 120,
                },
                limits,
            }],
        };
        let text = render(Some(&snapshot));
        let s = "{space=\"sessions/unit-test-space\"}";
        assert_eq!(
            sample(&text, &format!("roomfs_space_used_bytes{s}")),
            Some(120.0)
        );
        assert_eq!(
            sample(&text, &format!("roomfs_space_used_files{s}")),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, &format!("roomfs_space_limit_bytes{s}")),
            Some(500.0)
        );
        assert_eq!(sample(&text, &format!("roomfs_space_limit_files{s}")), None);
        assert_eq!(
            sample(&text, &format!("roomfs_space_limit_file_size_bytes{s}")),
            Some(10.0)
        );
        assert_eq!(sample(&text, "roomfs_sessions"), Some(3.0));
        assert_eq!(sample(&text, "roomfs_mounts{kind=\"room\"}"), Some(2.0));
        // A space no longer mounted disappears at the next scrape.
        let text = render(Some(&Snapshot::default()));
        assert!(!text.contains("unit-test-space"), "{text}");
    }
}
