//! The change log: how separate roomfs processes using one data dir (a daemon and standalone
//! `roomfs mount`s) hear of each other's changes, and where a space's recent events are kept
//! for watchers that resume.
//!
//! Layout: `<data-dir>/events/rooms/<id>.log` and `events/sessions/<id>.log`, one per space,
//! reached beneath the data dir's held descriptor and never through a symlink (see
//! `store::local::at`). Each is append-only text, one JSON object per line:
//!
//! ```text
//! {"roomfs_change_log":1,"base_seq":0}
//! {"seq":1,"type":"file.updated","time":1763700000123,"participant":"agent","by":"6c0f…","path":"a.txt","size":3}
//! {"type":"attributes","time":1763700000200,"participant":"agent","by":"6c0f…","path":"a.txt"}
//! ```
//!
//! The first line is the header: `base_seq` is the last event compaction dropped (0 when none
//! was). Events carry their `seq`; internal records (attributes, exchanges) carry none. `by`
//! names the process that wrote the line (an [`Origin`]), so each process skips its own.
//!
//! **The seq rule.** A process appends only while it holds an exclusive `flock` on the log:
//! it first reads whatever others appended since it last looked (so it knows the last `seq`),
//! then writes its lines, numbered on from there, in one `write`. So `seq` increases by one per
//! event of the space, whichever process made it, and every process sees the same order.
//!
//! **Crash safety.** A reader takes only whole lines (ending in a newline); a line without its
//! newline is either being written (it will be complete) or torn by a crash. A writer holding
//! the lock knows which: it ends a torn line with a newline first, so that the next line starts
//! clean, and a line that does not parse is skipped by everyone. Nothing but whole lines is
//! ever delivered, so no watcher ever saw a torn one; its `seq`, if it had one, stays unused
//! unless the line parses once ended.
//!
//! **Durability.** Lines are written without `fsync`: events are for telling others, and a
//! power cut that loses the last lines of the log also loses the changes they describe where
//! those were not made durable themselves. After such a loss the next events take the lost
//! seqs again; a watcher that had seen more than the log now holds is told of the gap.
//!
//! **Retention and compaction.** What to keep is the daemon's `event_retention`: the daemon
//! writes it to `events/retention.json` when it starts, and standalone mounts (which have no
//! configuration) keep what that file says, read when they start and again before they
//! compact, or the default where no daemon ever ran. So a standalone mount never compacts away
//! what the daemon was told to keep. When a log holds half as many events again as retention
//! keeps, the writer holding the lock compacts it: it writes the header (the new
//! `base_seq`) and the retained lines to `.<id>.log.compact`, syncs it and renames it over the
//! log. Other processes notice the new file (its inode changed) and go on reading from the
//! event they had reached. So compaction costs a copy of the retained lines once in a while,
//! about what writing them cost.
//!
//! **Following.** One thread per process (`roomfs-events`) writes the lines of this process's
//! changes (queued by [`LogFeed::publish`], which never waits for I/O) and follows the logs of
//! the spaces open in the process: it waits on inotify watches of the two log directories, so
//! an idle data dir costs it no wake-up at all. Where inotify cannot be had (the
//! `fs.inotify.max_user_instances` limit), it looks every 50 ms instead: one `fstat` per open
//! space.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::json;
use tokio::sync::broadcast;

use super::feed::{Backlog, ChangeFeed, Fanout, ForeignChanges, Retention};
use super::{Changed, Origin, Record, now_ms};
use crate::space::{SpaceId, SpaceKind};
use crate::store::local::at::{Dir, check, fstatat};

/// How often the logs are looked at when inotify cannot be had.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// A line longer than this is not a record (skipped).
const MAX_LINE: usize = 1 << 20;

/// A log is compacted once it holds this many times what retention keeps.
const COMPACT_AT: f64 = 1.5;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The change logs of one data dir and the thread that writes and follows them (see the
/// module docs). The thread runs while this or any of its feeds is alive.
pub struct Logs {
    shared: Arc<Shared>,
}

struct Shared {
    /// `events/rooms` and `events/sessions`.
    rooms: Dir,
    sessions: Dir,
    origin: Origin,
    /// What to keep, and whether this process was told (else it follows `retention.json`).
    retention: Mutex<Retention>,
    configured: bool,
    /// `events/`.
    events: Dir,
    /// The logs open in this process, by space.
    feeds: Mutex<HashMap<SpaceId, Weak<LogFeed>>>,
    /// An eventfd that wakes the thread: a feed has lines to write, or this is gone.
    wake: OwnedFd,
    /// Whether the thread follows through inotify (else it polls every [`POLL_EVERY`]).
    inotify: AtomicBool,
}

impl Shared {
    fn dir(&self, kind: SpaceKind) -> &Dir {
        match kind {
            SpaceKind::Room => &self.rooms,
            SpaceKind::Session => &self.sessions,
        }
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: an eventfd we own, and 8 bytes to write from.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}

/// Where the daemon records its `event_retention` for the other processes on the data dir.
const RETENTION_FILE: &str = "retention.json";

/// The retention recorded in `events/retention.json`, or the default where there is none (or
/// it cannot be read: said once in the log).
fn recorded_retention(events: &Dir) -> Retention {
    match events.read_file(OsStr::new(RETENTION_FILE)) {
        Ok(None) => Retention::default(),
        Ok(Some(bytes)) => serde_json::from_slice::<Retention>(&bytes)
            .map_err(io::Error::other)
            .and_then(|r| r.check().map(|()| r).map_err(io::Error::other))
            .unwrap_or_else(|e| {
                log::warn!("events/{RETENTION_FILE} is not usable ({e}): keeping the default");
                Retention::default()
            }),
        Err(e) => {
            log::warn!("cannot read events/{RETENTION_FILE} ({e}): keeping the default");
            Retention::default()
        }
    }
}

/// `<id>.log`.
fn log_name(space: &SpaceId) -> OsString {
    OsString::from(format!("{}.log", space.id))
}

impl Logs {
    /// Opens the logs of the data dir `data` (making `events/` if missing) and starts their
    /// thread. Everything written by this process carries `origin`. `retention`: what this
    /// process was configured to keep (recorded for the others), or `None` to keep what the
    /// data dir's `retention.json` says (see the module docs).
    pub fn open(data: &Dir, retention: Option<Retention>) -> io::Result<Logs> {
        let (events, _) = data.create_dirs(Path::new("events"), 0o700)?;
        let configured = retention.is_some();
        let retention = match retention {
            Some(r) => {
                let text = serde_json::to_vec(&r).map_err(io::Error::other)?;
                events.write_file_atomic(OsStr::new(RETENTION_FILE), &text, 0o600)?;
                r
            }
            None => recorded_retention(&events),
        };
        let rooms = events.create_dirs(Path::new("rooms"), 0o700)?.0;
        let sessions = events.create_dirs(Path::new("sessions"), 0o700)?.0;
        // SAFETY: plain flags; the result is checked.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        let shared = Arc::new(Shared {
            rooms,
            sessions,
            origin: Origin::new(),
            retention: Mutex::new(retention),
            configured,
            events,
            feeds: Mutex::new(HashMap::new()),
            // SAFETY: just made, owned by nobody else.
            wake: unsafe { OwnedFd::from_raw_fd(wake) },
            inotify: AtomicBool::new(false),
        });
        let inotify = watch(&shared);
        shared.inotify.store(inotify.is_some(), Ordering::Relaxed);
        // The thread's own descriptor of the eventfd, valid after `Shared` is gone.
        let wake = shared.wake.try_clone()?;
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("roomfs-events".into())
            .spawn(move || run(&weak, &wake, inotify))?;
        Ok(Logs { shared })
    }

    /// What this process keeps of each log (its configuration, or the daemon's as recorded).
    pub fn retention(&self) -> Retention {
        *lock(&self.shared.retention)
    }

    /// Whether other processes' changes are noticed through inotify (else by polling).
    pub fn uses_inotify(&self) -> bool {
        self.shared.inotify.load(Ordering::Relaxed)
    }

    /// The log of `space`: the one open in this process, or opened (and made) now.
    pub fn feed(&self, space: &SpaceId) -> io::Result<Arc<LogFeed>> {
        let mut feeds = lock(&self.shared.feeds);
        if let Some(feed) = feeds.get(space).and_then(Weak::upgrade) {
            return Ok(feed);
        }
        let feed = Arc::new(LogFeed::open(self.shared.clone(), space.clone())?);
        feeds.retain(|_, f| f.strong_count() > 0);
        feeds.insert(space.clone(), Arc::downgrade(&feed));
        Ok(feed)
    }

    /// Removes the log of `space` (the space is deleted). Whoever still has it open keeps an
    /// unnamed file; a space made again under the same id starts from `seq` 1.
    pub fn remove(&self, space: &SpaceId) -> io::Result<()> {
        lock(&self.shared.feeds).remove(space);
        self.shared.dir(space.kind).remove_file(&log_name(space))?;
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The thread wakes, finds nothing left, and ends.
        self.wake();
    }
}

/// Watches the two log directories; `None` (logged) where inotify cannot be had.
fn watch(shared: &Shared) -> Option<Inotify> {
    let flags = AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_ONLYDIR;
    let result = (|| {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        for dir in [&shared.rooms, &shared.sessions] {
            // The directory we hold, through its descriptor's magic link (no path lookup).
            let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
            inotify.add_watch(path.as_str(), flags)?;
        }
        Ok::<_, nix::Error>(inotify)
    })();
    match result {
        Ok(i) => Some(i),
        Err(e) => {
            log::warn!(
                "cannot watch the change logs with inotify ({e}); looking for other processes' \
                 changes every {} ms instead",
                POLL_EVERY.as_millis()
            );
            None
        }
    }
}

/// The thread: writes what this process published, reads what others appended; ends once
/// the logs and all their feeds are gone.
fn run(shared: &Weak<Shared>, wake: &OwnedFd, inotify: Option<Inotify>) {
    let timeout = if inotify.is_some() {
        -1
    } else {
        POLL_EVERY.as_millis() as libc::c_int
    };
    loop {
        let mut fds = vec![libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(i) = &inotify {
            fds.push(libc::pollfd {
                fd: i.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            log::error!(
                "change logs: poll failed: {}; no longer following them",
                io::Error::last_os_error()
            );
            return;
        }
        let mut drained = 0u64;
        // SAFETY: our eventfd, and 8 bytes to read into.
        unsafe { libc::read(wake.as_raw_fd(), (&raw mut drained).cast(), 8) };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Which logs others (or this process) touched; `None`: look at all of them.
        let touched: Option<HashSet<(SpaceKind, OsString)>> = match &inotify {
            None => None,
            Some(i) => read_inotify(i),
        };
        let feeds: Vec<Arc<LogFeed>> = lock(&shared.feeds)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for feed in &feeds {
            if let Err(e) = feed.write_pending() {
                log::error!("writing the change log of {}: {e}", feed.space);
            }
        }
        for feed in &feeds {
            let look = touched
                .as_ref()
                .is_none_or(|t| t.contains(&(feed.space.kind, feed.name.clone())));
            if look && let Err(e) = feed.follow() {
                log::warn!("reading the change log of {}: {e}", feed.space);
            }
        }
    }
}

/// The names of the logs inotify reported changed; `None` when it lost count (overflow).
fn read_inotify(inotify: &Inotify) -> Option<HashSet<(SpaceKind, OsString)>> {
    let mut touched = HashSet::new();
    loop {
        match inotify.read_events() {
            Ok(events) if events.is_empty() => break,
            Ok(events) => {
                for e in events {
                    if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                        return None;
                    }
                    // The watch descriptors are 1 (rooms) and 2 (sessions), in the order added;
                    // a name is looked up under both kinds instead of relying on that.
                    if let Some(name) = e.name {
                        touched.insert((SpaceKind::Room, name.clone()));
                        touched.insert((SpaceKind::Session, name));
                    }
                }
            }
            Err(nix::Error::EAGAIN) => break,
            Err(e) => {
                log::debug!("reading inotify events: {e}");
                return None;
            }
        }
    }
    Some(touched)
}

/// One space's change log, as this process writes and follows it (see the module docs).
pub struct LogFeed {
    space: SpaceId,
    name: OsString,
    shared: Arc<Shared>,
    /// Changes published here, waiting for the thread to write them.
    queue: Mutex<Queue>,
    written: Condvar,
    /// The log as this process has read it.
    state: Mutex<State>,
    fanout: Fanout,
}

#[derive(Default)]
struct Queue {
    changes: Vec<(Arc<str>, Changed)>,
    /// Changes ever published, and ever written (or given up on).
    published: u64,
    written: u64,
}

struct State {
    file: Arc<File>,
    /// Device and inode of `file`: another one at the log's name means it was compacted.
    ident: (u64, u64),
    /// Bytes read so far: every whole line before this offset was taken.
    pos: u64,
    /// The last `seq` seen (0: none yet).
    head: u64,
    /// The header's `base_seq`.
    base: u64,
    /// The first event the file retains: its `seq` and time.
    first: Option<(u64, u64)>,
    /// Internal records seen after the line of `head` (to find our place again in a
    /// compacted log).
    internal_after: u64,
}

/// How `read_lines` takes what it reads.
enum Mode<'a> {
    /// What the log held when it was opened: read, not delivered.
    History,
    /// New lines: delivered.
    Live,
    /// A compacted log, read from its start: delivered from the place reached on.
    Resume(&'a mut Resume),
}

/// The place reached in a log before it was compacted.
struct Resume {
    /// The last event taken.
    head: u64,
    /// Internal records taken after it.
    internal_after: u64,
    /// Whether the place was found (every line after it is new).
    found: bool,
    /// Internal records after the place still to skip.
    skip_internal: u64,
}

impl State {
    fn retained(&self) -> u64 {
        self.first.map_or(0, |(seq, _)| self.head + 1 - seq)
    }
}

impl LogFeed {
    fn open(shared: Arc<Shared>, space: SpaceId) -> io::Result<LogFeed> {
        let name = log_name(&space);
        let (file, ident) = open_log(shared.dir(space.kind), &name)?;
        let feed = LogFeed {
            name,
            state: Mutex::new(State {
                file: Arc::new(file),
                ident,
                pos: 0,
                head: 0,
                base: 0,
                first: None,
                internal_after: 0,
            }),
            space,
            shared,
            queue: Mutex::new(Queue::default()),
            written: Condvar::new(),
            fanout: Fanout::default(),
        };
        {
            let mut state = lock(&feed.state);
            if state.file.metadata()?.len() == 0 {
                feed.write_header(&mut state)?;
            }
            // What is there already is history: read, not delivered.
            feed.read_lines(&mut state, &mut Mode::History)?;
        }
        Ok(feed)
    }

    /// The space whose log this is.
    pub fn space(&self) -> &SpaceId {
        &self.space
    }

    /// Writes the header of an empty log (under the lock, in case another process does too).
    fn write_header(&self, state: &mut State) -> io::Result<()> {
        let _lock = Flock::exclusive(&state.file)?;
        if state.file.metadata()?.len() == 0 {
            let header = json!({"roomfs_change_log": 1, "base_seq": 0});
            (&*state.file).write_all(format!("{header}\n").as_bytes())?;
        }
        Ok(())
    }

    /// Reads the whole lines after `state.pos` and takes them as `mode` says. Returns whether
    /// a partial line is left at the end.
    fn read_lines(&self, state: &mut State, mode: &mut Mode) -> io::Result<bool> {
        let mut buf = vec![0u8; 64 << 10];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = state
                .file
                .read_at(&mut buf, state.pos + carry.len() as u64)?;
            if n == 0 {
                return Ok(!carry.is_empty());
            }
            carry.extend_from_slice(&buf[..n]);
            let mut start = 0;
            while let Some(nl) = carry[start..].iter().position(|&b| b == b'\n') {
                let line = &carry[start..start + nl];
                let at = state.pos;
                state.pos += nl as u64 + 1;
                self.take_line(state, line, at, mode);
                start += nl + 1;
            }
            carry.drain(..start);
            if carry.len() > MAX_LINE {
                log::warn!(
                    "change log of {}: skipping a line of over {MAX_LINE} bytes",
                    self.space
                );
                state.pos += carry.len() as u64;
                carry.clear();
            }
        }
    }

    /// Takes one whole line found at offset `at` (see `read_lines`).
    fn take_line(&self, state: &mut State, line: &[u8], at: u64, mode: &mut Mode) {
        if at == 0
            && let Some(base) = parse_header(line)
        {
            state.base = base;
            state.head = state.head.max(base);
            if let Mode::Resume(r) = mode
                && base > 0
                && base >= r.head
            {
                // The event reached was compacted away: everything after it is new.
                r.found = true;
                r.skip_internal = 0;
                if base > r.head {
                    // Compacted twice since we read: what came between is lost to us.
                    log::warn!(
                        "change log of {}: events {}..={base} were compacted away before this \
                         process read them; its mounts learn of those changes at their cache TTL",
                        self.space,
                        r.head + 1
                    );
                }
            }
            return;
        }
        let Some(record) = Record::parse_log_line(line) else {
            if !line.is_empty() {
                log::debug!(
                    "change log of {}: skipping a torn or unknown line",
                    self.space
                );
            }
            return;
        };
        let deliver = match mode {
            Mode::History => false,
            Mode::Live => true,
            Mode::Resume(r) if record.seq > 0 => {
                if record.seq == r.head {
                    r.found = true;
                    r.skip_internal = r.internal_after;
                } else if record.seq > r.head {
                    r.found = true;
                    r.skip_internal = 0;
                }
                record.seq > r.head
            }
            Mode::Resume(r) => {
                let skip = !r.found || r.skip_internal > 0;
                r.skip_internal = r.skip_internal.saturating_sub(u64::from(r.found));
                !skip
            }
        };
        if record.seq > 0 {
            if record.seq <= state.head {
                return; // seen already
            }
            state.head = record.seq;
            state.internal_after = 0;
            if state.first.is_none() {
                state.first = Some((record.seq, record.time));
            }
        } else {
            state.internal_after += 1;
        }
        if deliver {
            let foreign = record.origin != self.shared.origin;
            self.fanout.deliver(Arc::new(record), foreign);
        }
    }

    /// Whether `state.file` is still the file at the log's name (compaction replaces it).
    fn is_current(&self, state: &State) -> io::Result<bool> {
        let name = CString::new(self.name.as_bytes()).map_err(io::Error::other)?;
        match fstatat(self.shared.dir(self.space.kind).as_raw_fd(), &name) {
            Ok(st) => Ok((st.st_dev, st.st_ino) == state.ident),
            // Removed (the space was deleted): keep the file we have.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Moves to the file now at the log's name, delivering what follows the place reached.
    fn reopen(&self, state: &mut State) -> io::Result<()> {
        // The file we had is whole up to the compaction that replaced it (appends are made
        // under its lock, by writers that find it current): take the rest of it first, so
        // that nothing it holds is missed for being compacted away.
        self.read_lines(state, &mut Mode::Live)?;
        let (file, ident) = open_log(self.shared.dir(self.space.kind), &self.name)?;
        let mut resume = Resume {
            head: state.head,
            internal_after: state.internal_after,
            found: state.head == 0,
            skip_internal: if state.head == 0 {
                state.internal_after
            } else {
                0
            },
        };
        *state = State {
            file: Arc::new(file),
            ident,
            pos: 0,
            head: 0,
            base: 0,
            first: None,
            internal_after: 0,
        };
        self.read_lines(state, &mut Mode::Resume(&mut resume))?;
        Ok(())
    }

    /// Reads what others appended (the thread calls it when inotify says the log changed).
    fn follow(&self) -> io::Result<()> {
        let mut state = lock(&self.state);
        if !self.is_current(&state)? {
            self.reopen(&mut state)?;
        }
        self.read_lines(&mut state, &mut Mode::Live)?;
        Ok(())
    }

    /// Writes the queued changes (the thread calls it).
    fn write_pending(&self) -> io::Result<()> {
        let (changes, count) = {
            let mut q = lock(&self.queue);
            if q.changes.is_empty() {
                return Ok(());
            }
            let changes = std::mem::take(&mut q.changes);
            let count = changes.len() as u64;
            (changes, count)
        };
        let result = self.append(&changes);
        let mut q = lock(&self.queue);
        q.written += count;
        self.written.notify_all();
        result
    }

    /// Appends `changes` under the log's lock, numbering events on from the last `seq` in it.
    fn append(&self, changes: &[(Arc<str>, Changed)]) -> io::Result<()> {
        let mut state = lock(&self.state);
        let lock = loop {
            let lock = Flock::exclusive(&state.file)?;
            if self.is_current(&state)? {
                break lock;
            }
            drop(lock);
            self.reopen(&mut state)?;
        };
        // Others' lines first, so that ours are numbered after them.
        if self.read_lines(&mut state, &mut Mode::Live)? {
            // A line without its newline while we hold the lock: torn by a crash. End it, so
            // that ours start on a line of their own (it is skipped unless it parses).
            (&*state.file).write_all(b"\n")?;
            self.read_lines(&mut state, &mut Mode::Live)?;
        }
        let time = now_ms();
        let mut text = String::new();
        let mut records = Vec::with_capacity(changes.len());
        let mut head = state.head;
        for (participant, change) in changes {
            let seq = if change.is_event() {
                head += 1;
                head
            } else {
                0
            };
            let record = Record {
                seq,
                time,
                participant: participant.clone(),
                origin: self.shared.origin,
                change: change.clone(),
            };
            text.push_str(&record.log_line());
            text.push('\n');
            records.push(record);
        }
        (&*state.file).write_all(text.as_bytes())?;
        // Ours are taken as any line is (delivered to subscribers, not to listeners).
        self.read_lines(&mut state, &mut Mode::Live)?;
        let retained = state.retained();
        let oldest = state.first.map(|(_, time)| time);
        if self.must_compact(retained, oldest)
            && let Err(e) = self.compact(&mut state)
        {
            log::warn!("compacting the change log of {}: {e}", self.space);
        }
        drop(lock);
        Ok(())
    }

    /// Whether a log holding `retained` events, the oldest from `oldest`, is to be compacted;
    /// a process that follows the daemon's retention reads it again first.
    fn must_compact(&self, retained: u64, oldest: Option<u64>) -> bool {
        let exceeded = |r: Retention| r.exceeded(retained, oldest, COMPACT_AT);
        if !exceeded(*lock(&self.shared.retention)) {
            return false;
        }
        if self.shared.configured {
            return true;
        }
        let now = recorded_retention(&self.shared.events);
        *lock(&self.shared.retention) = now;
        exceeded(now)
    }

    /// Rewrites the log with only what retention keeps (holding its lock; see the module docs).
    fn compact(&self, state: &mut State) -> io::Result<()> {
        let started = Instant::now();
        let mut bytes = Vec::new();
        {
            let mut buf = vec![0u8; 64 << 10];
            let mut off = 0u64;
            while off < state.pos {
                let n = state.file.read_at(&mut buf, off)?;
                if n == 0 {
                    break;
                }
                bytes.extend_from_slice(&buf[..n]);
                off += n as u64;
            }
            bytes.truncate(state.pos as usize);
        }
        // Every line's offset and, for events, seq and time.
        let mut lines: Vec<(usize, Option<(u64, u64)>)> = Vec::new();
        let mut start = 0;
        while let Some(nl) = bytes[start..].iter().position(|&b| b == b'\n') {
            let line = &bytes[start..start + nl];
            let event = Record::parse_log_line(line)
                .filter(|r| r.seq > 0)
                .map(|r| (r.seq, r.time));
            lines.push((start, event));
            start += nl + 1;
        }
        let events: Vec<(usize, u64, u64)> = lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.1.map(|(seq, time)| (i, seq, time)))
            .collect();
        let total = events.len() as u64;
        let retention = *lock(&self.shared.retention);
        let kept_from = events
            .iter()
            .enumerate()
            .find(|(n, (_, _, time))| retention.keeps(*time, total - 1 - *n as u64))
            .map(|(_, e)| *e);
        let (base, from_line) = match kept_from {
            Some((i, seq, _)) => (seq - 1, i),
            None => (state.head, lines.len()),
        };
        let mut out =
            format!("{}\n", json!({"roomfs_change_log": 1, "base_seq": base})).into_bytes();
        if let Some(&(from, _)) = lines.get(from_line) {
            out.extend_from_slice(&bytes[from..]);
        }
        let dir = self.shared.dir(self.space.kind);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(&self.name);
        tmp_name.push(".compact");
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
        let mut tmp = dir.at(Path::new(&tmp_name))?.open(flags, 0o600)?;
        tmp.write_all(&out)?;
        tmp.sync_all()?;
        let (from, to) = (
            CString::new(tmp_name.as_bytes()).map_err(io::Error::other)?,
            CString::new(self.name.as_bytes()).map_err(io::Error::other)?,
        );
        let fd = dir.as_raw_fd();
        // SAFETY: a valid descriptor and NUL-terminated names.
        check(unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) })?;
        dir.sync()?;
        let st = tmp.metadata()?;
        let file = dir
            .at(Path::new(&self.name))?
            .open(libc::O_RDWR | libc::O_APPEND, 0)?;
        let reopened = file.metadata()?;
        if (reopened.dev(), reopened.ino()) != (st.dev(), st.ino()) {
            return Err(io::Error::other("the compacted log was replaced at once"));
        }
        state.file = Arc::new(file);
        state.ident = (st.dev(), st.ino());
        state.pos = out.len() as u64;
        state.base = base;
        state.first = kept_from.map(|(_, seq, time)| (seq, time));
        log::debug!(
            "compacted the change log of {}: {} of {total} events kept, {} ms",
            self.space,
            state.retained(),
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// The retained events after `since`, read from the log as this process has read it.
    fn read_backlog(&self, since: u64, max: usize) -> io::Result<Backlog> {
        let (file, end, head) = {
            let state = lock(&self.state);
            (state.file.clone(), state.pos, state.head)
        };
        let mut backlog = Backlog {
            oldest: 1,
            head,
            events: Vec::new(),
        };
        let mut first = true;
        let mut carry = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0u64;
        while off < end {
            let want = buf.len().min((end - off) as usize);
            let n = file.read_at(&mut buf[..want], off)?;
            if n == 0 {
                break;
            }
            off += n as u64;
            carry.extend_from_slice(&buf[..n]);
            let mut start = 0;
            while let Some(nl) = carry[start..].iter().position(|&b| b == b'\n') {
                let line = &carry[start..start + nl];
                start += nl + 1;
                if std::mem::take(&mut first)
                    && let Some(base) = parse_header(line)
                {
                    backlog.oldest = base + 1;
                    continue;
                }
                let Some(record) = Record::parse_log_line(line).filter(|r| r.seq > 0) else {
                    continue;
                };
                if record.seq > since && backlog.events.len() < max {
                    backlog.events.push(Arc::new(record));
                }
            }
            carry.drain(..start);
            if backlog.events.len() >= max {
                break;
            }
        }
        Ok(backlog)
    }
}

impl ChangeFeed for LogFeed {
    fn publish(&self, participant: &Arc<str>, changes: &[Changed]) {
        if changes.is_empty() {
            return;
        }
        let was_empty = {
            let mut q = lock(&self.queue);
            let was_empty = q.changes.is_empty();
            q.changes
                .extend(changes.iter().map(|c| (participant.clone(), c.clone())));
            q.published += changes.len() as u64;
            was_empty
        };
        if was_empty {
            self.shared.wake();
        }
    }

    fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut q = lock(&self.queue);
        let target = q.published;
        while q.written < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("change log of {}: flush timed out", self.space);
                return;
            }
            q = self
                .written
                .wait_timeout(q, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn read(&self, since: u64, max: usize) -> io::Result<Backlog> {
        // Up to date with what others appended, not only with what the thread has seen.
        self.follow()?;
        self.read_backlog(since, max)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.fanout.subscribe()
    }

    fn listen(&self, listener: Weak<dyn ForeignChanges>) {
        self.fanout.listen(listener);
    }
}

/// Opens (or makes) the log `name` in `dir`, never through a symlink.
fn open_log(dir: &Dir, name: &OsStr) -> io::Result<(File, (u64, u64))> {
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_APPEND;
    let file = dir.at(Path::new(name))?.open(flags, 0o600)?;
    let st = file.metadata()?;
    if !st.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            Path::new(name).display()
        )));
    }
    Ok((file, (st.dev(), st.ino())))
}

/// The `base_seq` of a header line.
fn parse_header(line: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("roomfs_change_log")?;
    v.get("base_seq")?.as_u64()
}

/// An exclusive `flock` on a file, held until dropped.
struct Flock(Arc<File>);

impl Flock {
    fn exclusive(file: &Arc<File>) -> io::Result<Flock> {
        loop {
            // SAFETY: a valid descriptor.
            match check(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                other => return other.map(|()| Flock(file.clone())),
            }
        }
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        // SAFETY: a valid descriptor.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
