//! POSIX record locks (`fcntl` `F_GETLK`, `F_SETLK`, `F_SETLKW`) on a space's files, served by
//! the daemon instead of the kernel, for every mount of the space in this process.
//!
//! Why the daemon serves them: a program that coordinates through locks (sqlite checks for
//! changes each time it takes a lock) must see what others committed since it last looked,
//! and only the daemon knows when a handle takes a lock (see `fs::locks`).
//!
//! A file is known by its inode in one mount: a commit may give it another file on disk, and
//! a path changes with renames and is taken over by a new file after an unlink. So, as with
//! the kernel's own locks, each mount's locks are its own; sharing them between mounts (and
//! hosts) needs a file identity that lasts across commits.
//!
//! The rules are POSIX's: a lock belongs to an owner (the kernel's id of the process's open
//! files), covers a byte range (inclusive; `u64::MAX` ends at infinity), is shared (read) or
//! exclusive (write); locks of different owners conflict where they overlap and either is
//! exclusive; an owner's new lock replaces what it held in that range (splitting locks), an
//! unlock removes it. A request that conflicts fails at once (`EAGAIN`), or waits (`F_SETLKW`)
//! in the order requests came, unless waiting would close a cycle of owners waiting for each
//! other (`EDEADLK`).
//!
//! Invariants: the held locks of one file never conflict with each other; a waiter is answered
//! exactly once (granted, refused, or cancelled with `EINTR` when its owner lets go of the
//! file); answers are given after this table's lock is released, so they may do I/O.
//!
//! The table (one per space, behind one mutex) is kept so that a request on a file costs, for
//! each other owner holding locks on it, the logarithm of that owner's locks, plus the locks
//! it overlaps: not the number of locks on the file (a program taking 50,000 byte locks on one
//! file must not take quadratic time). Only letting go of a file handle looks at every lock of
//! the file, once.
//! - Each file with locks held or requests waiting has its entry, and only those do; its held
//!   locks are grouped by owner, and an owner's are kept by start. An owner's locks never
//!   overlap each other (a new one replaces what the owner held in its range), so the ones
//!   that can overlap a range are the owner's last lock starting before it and those starting
//!   in it: a conflict check looks at those for each other owner of the file, and a split
//!   touches only the owner's locks in the range.
//! - A file's waiting requests are kept with it, in the order they came; `waits` lists, for
//!   each owner, the file of each of its waiting requests (once per request), so the search
//!   for a cycle of waiting owners (`EDEADLK`) looks at their waits only.
//!
//! The table is the daemon's memory, not the agent's (the kernel charges its own locks to the
//! process that takes them), so it is bounded: an owner holds at most
//! [`MAX_LOCKS_PER_OWNER`] locks and waiting requests, the space [`MAX_LOCKS`]; a request that
//! could take either past its bound is refused with `ENOLCK` ("too many locks"), and changes
//! nothing. A request that cannot add a lock (an unlock that splits none, a lock over what the
//! owner holds) is never refused. As the kernel does, an owner's adjacent locks of one kind
//! (taken through one handle, by one process) are one lock: a program locking a file record by
//! record in order holds one lock, not one per record.
//! Invariant: `counts` holds, for each owner with any, its locks plus waiting requests, and
//! `total` their sum.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// The kernel's id of a lock's owner.
pub type Owner = u64;

/// The most locks and waiting requests one owner (a process's open files) may have in a space
/// (see the module docs): ~100 bytes each.
pub const MAX_LOCKS_PER_OWNER: usize = 100_000;

/// The most locks and waiting requests of a space, all owners together.
pub const MAX_LOCKS: usize = 400_000;

/// Which file a lock is on: its inode number in a mount (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub mount: u64,
    pub ino: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Read,
    Write,
}

/// A lock held, as `F_GETLK` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub owner: Owner,
    pub pid: u32,
    pub kind: LockKind,
    pub start: u64,
    /// Inclusive; `u64::MAX`: to the end of the file, however long it grows.
    pub end: u64,
    /// The file handle it was taken through (see [`Locks::release_handle`]).
    pub fh: u64,
}

impl Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    fn conflicts(&self, owner: Owner, kind: LockKind, start: u64, end: u64) -> bool {
        self.owner != owner
            && self.overlaps(start, end)
            && (self.kind == LockKind::Write || kind == LockKind::Write)
    }
}

/// A lock or unlock request.
#[derive(Clone, Debug)]
pub struct Request {
    pub key: FileKey,
    pub owner: Owner,
    pub pid: u32,
    /// `None`: unlock.
    pub kind: Option<LockKind>,
    pub start: u64,
    pub end: u64,
    pub fh: u64,
}

/// What a granted lock request is told: whether its owner held no lock on the file before
/// (it starts looking at the file afresh).
pub type Granted = Result<bool, i32>;

/// Answers a waiting request.
pub type Answer = Box<dyn FnOnce(Granted) + Send>;

/// Answers to give once the table is unlocked (see the module docs).
#[must_use = "answers must be given"]
pub struct Answers(Vec<(Answer, Granted)>);

impl Answers {
    /// Gives every answer.
    pub fn give(self) {
        for (answer, result) in self.0 {
            answer(result);
        }
    }
}

struct Waiter {
    request: Request,
    answer: Answer,
}

/// An owner's locks on a file, by start; they never overlap each other.
type OwnerLocks = BTreeMap<u64, Held>;

/// The locks of one file (see the module docs).
#[derive(Default)]
struct File {
    held: BTreeMap<Owner, OwnerLocks>,
    /// In the order they came.
    waiting: Vec<Waiter>,
}

impl File {
    /// A lock of another owner than `owner` that conflicts with `kind` on `start..=end`.
    fn conflict(&self, owner: Owner, kind: LockKind, start: u64, end: u64) -> Option<&Held> {
        self.held
            .iter()
            .filter(|(o, _)| **o != owner)
            .find_map(|(_, locks)| {
                overlapping(locks, start, end).find(|h| h.conflicts(owner, kind, start, end))
            })
    }

    fn is_empty(&self) -> bool {
        self.held.is_empty() && self.waiting.is_empty()
    }
}

/// The locks of `locks` (one owner's) that overlap `start..=end`, by start.
fn overlapping(locks: &OwnerLocks, start: u64, end: u64) -> impl Iterator<Item = &Held> {
    let (before, within) = if start <= end {
        (
            locks.range(..start).next_back().map(|(_, h)| h),
            Some(locks.range(start..=end).map(|(_, h)| h)),
        )
    } else {
        (None, None)
    };
    before
        .filter(move |h| h.end >= start)
        .into_iter()
        .chain(within.into_iter().flatten())
}

/// How many locks the owner's locks `locks` would become at most once `r` is applied (before
/// adjacent ones join): each lock it overlaps goes, and gives back its head and its tail where
/// they reach out of `r`'s range.
fn locks_after(locks: &OwnerLocks, r: &Request) -> usize {
    let mut gone = 0;
    let mut kept = 0;
    for h in overlapping(locks, r.start, r.end) {
        gone += 1;
        kept += usize::from(h.start < r.start) + usize::from(h.end > r.end);
    }
    locks.len() - gone + kept + usize::from(r.kind.is_some())
}

struct Table {
    files: HashMap<FileKey, File>,
    /// For each owner, the file of each of its waiting requests.
    waits: HashMap<Owner, Vec<FileKey>>,
    /// For each owner with any, its locks and waiting requests (see the module docs).
    counts: HashMap<Owner, usize>,
    total: usize,
    /// [`MAX_LOCKS_PER_OWNER`] and [`MAX_LOCKS`] (smaller in tests).
    per_owner: usize,
    max: usize,
}

/// The locks of one space (see the module docs).
pub struct Locks {
    table: Mutex<Table>,
    /// Files record locks were taken on (see [`Locks::mark`]): the most recent
    /// [`MARKED_MAX`].
    marked: Mutex<Marked>,
}

/// Paths, each with when it was last marked (a count), and the paths by that count, to forget
/// the one marked longest ago.
#[derive(Default)]
struct Marked {
    paths: HashMap<std::path::PathBuf, u64>,
    by_age: BTreeMap<u64, std::path::PathBuf>,
    next: u64,
}

/// How many files locked once [`Locks`] remembers.
const MARKED_MAX: usize = 4096;

impl Default for Locks {
    fn default() -> Self {
        Self::with_limits(MAX_LOCKS_PER_OWNER, MAX_LOCKS)
    }
}

impl Locks {
    /// A table whose owners may each have `per_owner` locks and waiting requests, and all of
    /// them together `max`.
    pub fn with_limits(per_owner: usize, max: usize) -> Self {
        Self {
            table: Mutex::new(Table {
                files: HashMap::new(),
                waits: HashMap::new(),
                counts: HashMap::new(),
                total: 0,
                per_owner,
                max,
            }),
            marked: Mutex::new(Marked::default()),
        }
    }

    /// Remembers that a record lock was taken on the file at `path`: a program coordinating
    /// through locks (sqlite) reads it again under each lock, and the mounts serve its later
    /// read-only opens through the daemon, whose handles move on to the latest version at
    /// each lock, rather than handing them to the kernel (passthrough), which keeps reading
    /// the version it opened. A lock on sqlite's WAL index `NAME-shm` marks `NAME` and
    /// `NAME-wal` too.
    pub fn mark(&self, path: &std::path::Path) {
        use std::os::unix::ffi::OsStrExt;
        let mut paths = vec![path.to_path_buf()];
        if let Some(db) = path
            .file_name()
            .and_then(|n| n.as_bytes().strip_suffix(b"-shm"))
        {
            let db = std::ffi::OsStr::from_bytes(db);
            let mut wal = db.to_os_string();
            wal.push("-wal");
            paths.push(path.with_file_name(db));
            paths.push(path.with_file_name(wal));
        }
        let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        for p in paths {
            let now = marked.next;
            marked.next += 1;
            if let Some(then) = marked.paths.insert(p.clone(), now) {
                marked.by_age.remove(&then);
            } else if marked.paths.len() > MARKED_MAX
                && let Some((_, oldest)) = marked.by_age.pop_first()
            {
                marked.paths.remove(&oldest);
            }
            marked.by_age.insert(now, p);
        }
    }

    /// Whether a record lock was taken on the file at `path` (see [`Locks::mark`]).
    pub fn marked(&self, path: &std::path::Path) -> bool {
        let marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        marked.paths.contains_key(path)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `F_GETLK`: a lock that conflicts with the one described, if any.
    pub fn test(
        &self,
        key: &FileKey,
        owner: Owner,
        kind: LockKind,
        start: u64,
        end: u64,
    ) -> Option<Held> {
        let table = self.table();
        table
            .files
            .get(key)?
            .conflict(owner, kind, start, end)
            .cloned()
    }

    /// `F_SETLK`: takes or drops a lock without waiting. `Ok(first)`: done (`first`: the
    /// owner held no lock on the file before); `Err(EAGAIN)`: another owner's lock conflicts.
    /// Locks given up may let waiters in: their answers come back to be given.
    pub fn set(&self, request: Request) -> (Granted, Answers) {
        let mut table = self.table();
        let result = table.try_apply(&request);
        let answers = match result {
            Ok(_) => table.wake(&request.key),
            Err(_) => Vec::new(),
        };
        (result, Answers(answers))
    }

    /// `F_SETLKW`: like [`Locks::set`], but a conflicting request waits and `answer` is called
    /// once it is granted, refused, or cancelled. `EDEADLK` at once if waiting would close a
    /// cycle of owners waiting for each other.
    pub fn set_waiting(&self, request: Request, answer: Answer) -> Answers {
        let mut table = self.table();
        match table.try_apply(&request) {
            Ok(first) => {
                let mut answers = table.wake(&request.key);
                answers.insert(0, (answer, Ok(first)));
                Answers(answers)
            }
            Err(libc::EAGAIN) if !table.would_deadlock(&request) => {
                if !table.may_add(request.owner, 1) {
                    return Answers(vec![(answer, Err(libc::ENOLCK))]);
                }
                table.charge(request.owner, 1);
                table
                    .waits
                    .entry(request.owner)
                    .or_default()
                    .push(request.key);
                let file = table.files.entry(request.key).or_default();
                file.waiting.push(Waiter { request, answer });
                Answers(Vec::new())
            }
            Err(libc::EAGAIN) => Answers(vec![(answer, Err(libc::EDEADLK))]),
            Err(e) => Answers(vec![(answer, Err(e))]),
        }
    }

    /// Drops every lock `owner` holds on the file and cancels its waiting requests there: the
    /// owner closed a descriptor of the file (POSIX drops a process's locks on a file at any
    /// close of it).
    pub fn release_owner(&self, key: &FileKey, owner: Owner) -> Answers {
        let mut table = self.table();
        let mut answers = table.cancel(key, |w| w.request.owner == owner);
        let gone = table
            .files
            .get_mut(key)
            .and_then(|file| file.held.remove(&owner))
            .map_or(0, |locks| locks.len());
        table.discharge(owner, gone);
        answers.extend(table.wake(key));
        Answers(answers)
    }

    /// Drops the locks taken through the file handle `fh` and cancels its waiting requests:
    /// the handle is gone (its last descriptor was closed without the kernel telling which
    /// owner closed it).
    pub fn release_handle(&self, key: &FileKey, fh: u64) -> Answers {
        let mut table = self.table();
        let mut answers = table.cancel(key, |w| w.request.fh == fh);
        let mut gone = Vec::new();
        if let Some(file) = table.files.get_mut(key) {
            for (owner, locks) in file.held.iter_mut() {
                let before = locks.len();
                locks.retain(|_, h| h.fh != fh);
                gone.push((*owner, before - locks.len()));
            }
            file.held.retain(|_, locks| !locks.is_empty());
        }
        for (owner, n) in gone {
            table.discharge(owner, n);
        }
        answers.extend(table.wake(key));
        Answers(answers)
    }

    /// Whether `owner` holds a lock on the file.
    pub fn holds_any(&self, key: &FileKey, owner: Owner) -> bool {
        let table = self.table();
        table
            .files
            .get(key)
            .is_some_and(|file| file.held.contains_key(&owner))
    }
}

impl Table {
    /// Whether `owner` may have `more` locks or waiting requests (see the module docs).
    fn may_add(&self, owner: Owner, more: usize) -> bool {
        let has = self.counts.get(&owner).copied().unwrap_or(0);
        has + more <= self.per_owner && self.total + more <= self.max
    }

    fn charge(&mut self, owner: Owner, n: usize) {
        if n > 0 {
            *self.counts.entry(owner).or_default() += n;
            self.total += n;
        }
    }

    fn discharge(&mut self, owner: Owner, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(has) = self.counts.get_mut(&owner) {
            *has -= n;
            if *has == 0 {
                self.counts.remove(&owner);
            }
        }
        self.total -= n;
    }

    /// Applies `request` if nothing conflicts; `Ok(first)`, `Err(EAGAIN)`, or `Err(ENOLCK)`
    /// when it could take its owner or the space past their bounds.
    fn try_apply(&mut self, r: &Request) -> Granted {
        if r.start > r.end {
            return Err(libc::EINVAL);
        }
        let file = self.files.entry(r.key).or_default();
        if let Some(kind) = r.kind
            && file.conflict(r.owner, kind, r.start, r.end).is_some()
        {
            self.forget_if_empty(&r.key);
            return Err(libc::EAGAIN);
        }
        let (before, after) = file
            .held
            .get(&r.owner)
            .map_or((0, usize::from(r.kind.is_some())), |locks| {
                (locks.len(), locks_after(locks, r))
            });
        if after > before && !self.may_add(r.owner, after - before) {
            self.forget_if_empty(&r.key);
            return Err(libc::ENOLCK);
        }
        let file = self.files.get_mut(&r.key).expect("made above");
        let locks = file.held.entry(r.owner).or_default();
        let first = locks.is_empty();
        // The owner's locks in the range give way (cut around it): the one starting before
        // it keeps its head, and whichever reaches past it (that one or the last starting in
        // it) its tail.
        let mut tail = None;
        if let Some((_, h)) = locks.range_mut(..r.start).next_back()
            && h.end >= r.start
        {
            if h.end > r.end {
                tail = Some(Held {
                    start: r.end + 1,
                    ..h.clone()
                });
            }
            h.end = r.start - 1;
        }
        let within: Vec<u64> = locks.range(r.start..=r.end).map(|(s, _)| *s).collect();
        for start in within {
            if let Some(h) = locks.remove(&start)
                && h.end > r.end
            {
                tail = Some(Held {
                    start: r.end + 1,
                    ..h
                });
            }
        }
        if let Some(t) = tail {
            locks.insert(t.start, t);
        }
        if let Some(kind) = r.kind {
            let mut new = Held {
                owner: r.owner,
                pid: r.pid,
                kind,
                start: r.start,
                end: r.end,
                fh: r.fh,
            };
            // Adjacent locks of the same kind, handle and process join it (see the module docs).
            let joins = |h: &Held| h.kind == kind && h.fh == r.fh && h.pid == r.pid;
            if let Some(start) = r.start.checked_sub(1).and_then(|last| {
                locks
                    .range(..r.start)
                    .next_back()
                    .filter(|(_, h)| h.end == last && joins(h))
                    .map(|(s, _)| *s)
            }) {
                locks.remove(&start);
                new.start = start;
            }
            if let Some(next) = r.end.checked_add(1)
                && locks.get(&next).is_some_and(joins)
                && let Some(h) = locks.remove(&next)
            {
                new.end = h.end;
            }
            locks.insert(new.start, new);
        }
        let now = locks.len();
        if locks.is_empty() {
            file.held.remove(&r.owner);
        }
        self.forget_if_empty(&r.key);
        if now > before {
            self.charge(r.owner, now - before);
        } else {
            self.discharge(r.owner, before - now);
        }
        Ok(first)
    }

    /// Drops the entry of a file with no locks and no waiters.
    fn forget_if_empty(&mut self, key: &FileKey) {
        if self.files.get(key).is_some_and(File::is_empty) {
            self.files.remove(key);
        }
    }

    /// Takes one waiting request of `owner` on `key` off `waits`.
    fn unwait(&mut self, owner: Owner, key: &FileKey) {
        if let Some(keys) = self.waits.get_mut(&owner) {
            if let Some(i) = keys.iter().position(|k| k == key) {
                keys.swap_remove(i);
            }
            if keys.is_empty() {
                self.waits.remove(&owner);
            }
        }
    }

    /// Grants the waiting requests on `key` that no longer conflict, in the order they came,
    /// until none can go.
    fn wake(&mut self, key: &FileKey) -> Vec<(Answer, Granted)> {
        let mut answers = Vec::new();
        loop {
            let Some(file) = self.files.get_mut(key) else {
                return answers;
            };
            let free = file.waiting.iter().position(|w| {
                let r = &w.request;
                let kind = r.kind.unwrap_or(LockKind::Read);
                file.conflict(r.owner, kind, r.start, r.end).is_none()
            });
            let Some(i) = free else {
                self.forget_if_empty(key);
                return answers;
            };
            let w = file.waiting.remove(i);
            self.unwait(w.request.owner, key);
            self.discharge(w.request.owner, 1);
            let result = self.try_apply(&w.request);
            answers.push((w.answer, result));
        }
    }

    /// Cancels the waiting requests on `key` that `which` picks.
    fn cancel(&mut self, key: &FileKey, which: impl Fn(&Waiter) -> bool) -> Vec<(Answer, Granted)> {
        let Some(file) = self.files.get_mut(key) else {
            return Vec::new();
        };
        let (cancelled, kept) = std::mem::take(&mut file.waiting)
            .into_iter()
            .partition::<Vec<_>, _>(|w| which(w));
        file.waiting = kept;
        let mut answers = Vec::with_capacity(cancelled.len());
        for w in cancelled {
            self.unwait(w.request.owner, key);
            self.discharge(w.request.owner, 1);
            answers.push((w.answer, Err(libc::EINTR)));
        }
        self.forget_if_empty(key);
        answers
    }

    /// The owners whose locks keep `r` waiting.
    fn blockers(&self, r: &Request) -> Vec<Owner> {
        let kind = r.kind.unwrap_or(LockKind::Read);
        let Some(file) = self.files.get(&r.key) else {
            return Vec::new();
        };
        file.held
            .iter()
            .filter(|(o, locks)| {
                **o != r.owner
                    && overlapping(locks, r.start, r.end)
                        .any(|h| h.conflicts(r.owner, kind, r.start, r.end))
            })
            .map(|(o, _)| *o)
            .collect()
    }

    /// Whether `r` waiting would close a cycle: an owner keeping it waiting waits, directly or
    /// through others, for `r`'s owner.
    fn would_deadlock(&self, r: &Request) -> bool {
        let mut seen = std::collections::HashSet::new();
        let mut next = self.blockers(r);
        while let Some(owner) = next.pop() {
            if owner == r.owner {
                return true;
            }
            if !seen.insert(owner) {
                continue;
            }
            let mut keys = self.waits.get(&owner).cloned().unwrap_or_default();
            keys.sort_unstable_by_key(|k| (k.mount, k.ino));
            keys.dedup();
            for key in keys {
                let Some(file) = self.files.get(&key) else {
                    continue;
                };
                for w in file.waiting.iter().filter(|w| w.request.owner == owner) {
                    next.extend(self.blockers(&w.request));
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI32, Ordering};

    const END: u64 = u64::MAX;

    fn key() -> FileKey {
        FileKey { mount: 1, ino: 2 }
    }

    fn req(owner: Owner, kind: Option<LockKind>, start: u64, end: u64) -> Request {
        Request {
            key: key(),
            owner,
            pid: owner as u32 + 100,
            kind,
            start,
            end,
            fh: owner,
        }
    }

    fn set(l: &Locks, owner: Owner, kind: Option<LockKind>, start: u64, end: u64) -> Granted {
        let (result, answers) = l.set(req(owner, kind, start, end));
        answers.give();
        result
    }

    /// A waiting request's answer, once given: 0 before, 1 granted, -errno refused.
    fn waiter(l: &Locks, owner: Owner, kind: LockKind, start: u64, end: u64) -> Arc<AtomicI32> {
        let seen = Arc::new(AtomicI32::new(0));
        let s = seen.clone();
        l.set_waiting(
            req(owner, Some(kind), start, end),
            Box::new(move |r| s.store(r.map(|_| 1).unwrap_or_else(|e| -e), Ordering::SeqCst)),
        )
        .give();
        seen
    }

    use LockKind::{Read, Write};

    #[test]
    fn shared_locks_share_and_exclusive_ones_conflict_where_they_overlap() {
        let l = Locks::default();
        assert_eq!(set(&l, 1, Some(Read), 0, 99), Ok(true));
        assert_eq!(set(&l, 2, Some(Read), 50, 149), Ok(true));
        assert_eq!(set(&l, 3, Some(Write), 90, 95), Err(libc::EAGAIN));
        assert_eq!(set(&l, 3, Some(Write), 150, END), Ok(true));
        let conflict = l.test(&key(), 4, Read, 200, 300).unwrap();
        assert_eq!(
            (conflict.owner, conflict.pid, conflict.kind),
            (3, 103, Write)
        );
        assert_eq!((conflict.start, conflict.end), (150, END));
        assert_eq!(
            l.test(&key(), 3, Write, 150, 160),
            None,
            "its own locks never conflict"
        );
        assert_eq!(l.test(&key(), 4, Read, 0, 149), None);
    }

    #[test]
    fn an_owners_new_lock_replaces_and_splits_what_it_held() {
        let l = Locks::default();
        assert_eq!(set(&l, 1, Some(Write), 0, 99), Ok(true));
        // Downgrade the middle: the ends stay exclusive.
        assert_eq!(set(&l, 1, Some(Read), 40, 59), Ok(false));
        assert_eq!(set(&l, 2, Some(Read), 45, 50), Ok(true));
        assert_eq!(set(&l, 2, Some(Read), 30, 30), Err(libc::EAGAIN));
        assert_eq!(set(&l, 2, Some(Read), 60, 60), Err(libc::EAGAIN));
        // Unlock a hole: the rest is still held.
        assert_eq!(set(&l, 1, None, 0, 9), Ok(false));
        assert_eq!(set(&l, 2, Some(Write), 0, 9), Ok(false));
        assert_eq!(set(&l, 2, Some(Write), 10, 10), Err(libc::EAGAIN));
        assert!(l.holds_any(&key(), 1));
        assert_eq!(set(&l, 1, None, 0, END), Ok(false));
        assert!(!l.holds_any(&key(), 1));
        assert_eq!(
            set(&l, 1, Some(Read), 200, 200),
            Ok(true),
            "first again once all are gone"
        );
        assert_eq!(
            set(&l, 1, Some(Read), 0, 0),
            Err(libc::EAGAIN),
            "2 still holds 0..=9"
        );
    }

    #[test]
    fn waiters_are_granted_in_order_when_the_lock_goes() {
        let l = Locks::default();
        set(&l, 1, Some(Write), 0, END).unwrap();
        let a = waiter(&l, 2, Write, 0, 10);
        let b = waiter(&l, 3, Read, 5, 5);
        assert_eq!((a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)), (0, 0));
        set(&l, 1, None, 0, END).unwrap();
        assert_eq!(a.load(Ordering::SeqCst), 1, "the first waiter goes first");
        assert_eq!(
            b.load(Ordering::SeqCst),
            0,
            "the second still conflicts with it"
        );
        l.release_owner(&key(), 2).give();
        assert_eq!(b.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wait_that_closes_a_cycle_is_edeadlk() {
        let l = Locks::default();
        set(&l, 1, Some(Write), 0, 0).unwrap();
        set(&l, 2, Some(Write), 1, 1).unwrap();
        let one_waits = waiter(&l, 1, Write, 1, 1);
        let two_waits = waiter(&l, 2, Write, 0, 0);
        assert_eq!(two_waits.load(Ordering::SeqCst), -libc::EDEADLK);
        assert_eq!(one_waits.load(Ordering::SeqCst), 0);
        set(&l, 2, None, 0, END).unwrap();
        assert_eq!(one_waits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn closing_the_file_drops_the_owners_locks_and_cancels_its_waits() {
        let l = Locks::default();
        set(&l, 1, Some(Write), 0, END).unwrap();
        set(&l, 2, Some(Read), 0, 0).unwrap_err();
        let two = waiter(&l, 2, Read, 0, 0);
        let three = waiter(&l, 3, Write, 0, 0);
        l.release_owner(&key(), 2).give();
        assert_eq!(two.load(Ordering::SeqCst), -libc::EINTR);
        l.release_handle(&key(), 1).give();
        assert_eq!(
            three.load(Ordering::SeqCst),
            1,
            "the handle's locks went with it"
        );
        assert!(!l.holds_any(&key(), 1));
    }

    #[test]
    fn many_locks_of_one_owner_are_each_exactly_where_they_were_put() {
        const N: u64 = 50_000;
        let l = Locks::default();
        // Owner 1 write-locks every even byte, owner 2 every odd one: all granted.
        for i in 0..N {
            assert_eq!(set(&l, 1, Some(Write), 2 * i, 2 * i), Ok(i == 0), "{i}");
        }
        for i in 0..N {
            assert_eq!(
                set(&l, 2, Some(Write), 2 * i + 1, 2 * i + 1),
                Ok(i == 0),
                "{i}"
            );
        }
        // Each byte is held by the right owner, and only by it.
        for i in [0, 1, 2, 777, N - 1, N, 2 * N - 2, 2 * N - 1] {
            let owner = 1 + i % 2;
            let held = l.test(&key(), 3, Read, i, i).unwrap();
            assert_eq!((held.owner, held.start, held.end), (owner, i, i), "{i}");
            assert_eq!(l.test(&key(), owner, Write, i, i), None, "{i}");
            assert_eq!(
                set(&l, 3 - owner, Some(Read), i, i),
                Err(libc::EAGAIN),
                "{i}"
            );
        }
        assert_eq!(set(&l, 3, Some(Write), 2 * N, END), Ok(true));
        // Owner 1 takes a range over 100 of its locks and 100 of owner 2's: refused, nothing
        // changes. Owner 2 lets go of that range; then it is granted, replacing owner 1's.
        assert_eq!(set(&l, 1, Some(Write), 1000, 1199), Err(libc::EAGAIN));
        assert_eq!(set(&l, 2, None, 1000, 1199), Ok(false));
        assert_eq!(set(&l, 1, Some(Read), 1000, 1199), Ok(false));
        let held = l.test(&key(), 4, Write, 1100, 1100).unwrap();
        assert_eq!(
            (held.owner, held.kind, held.start, held.end),
            (1, Read, 1000, 1199)
        );
        assert_eq!(set(&l, 4, Some(Read), 1000, 1199), Ok(true));
        assert_eq!(l.test(&key(), 4, Write, 999, 999).unwrap().owner, 2);
        assert_eq!(l.test(&key(), 4, Write, 1200, 1200).unwrap().kind, Write);
        // A waiter behind owner 2's last byte goes in when owner 2 lets go of everything.
        let waits = waiter(&l, 4, Write, 2 * N - 1, 2 * N - 1);
        assert_eq!(waits.load(Ordering::SeqCst), 0);
        l.release_owner(&key(), 2).give();
        assert_eq!(waits.load(Ordering::SeqCst), 1);
        // Owner 1 unlocks every other of its bytes: the others stay held.
        for i in (0..N).step_by(2) {
            assert_eq!(set(&l, 1, None, 2 * i, 2 * i), Ok(false));
        }
        assert_eq!(set(&l, 5, Some(Write), 0, 0), Ok(true));
        assert_eq!(set(&l, 5, Some(Write), 2, 2), Err(libc::EAGAIN));
        assert_eq!(
            set(&l, 5, Some(Write), 1, 1),
            Ok(false),
            "owner 2's are gone"
        );
        check_counts(&l);
        l.release_handle(&key(), 1).give();
        assert!(!l.holds_any(&key(), 1));
        assert_eq!(set(&l, 5, Some(Write), 2, 2), Ok(false));
        check_counts(&l);
    }

    #[test]
    fn a_split_keeps_both_ends_of_the_lock_it_cuts() {
        let l = Locks::default();
        // Three locks of owner 1; a write over 15..=45 cuts the first and last, drops the middle.
        set(&l, 1, Some(Read), 0, 19).unwrap();
        set(&l, 1, Some(Read), 25, 30).unwrap();
        set(&l, 1, Some(Read), 40, 59).unwrap();
        set(&l, 1, Some(Write), 15, 45).unwrap();
        let at = |b: u64| {
            l.test(&key(), 2, Read, b, b)
                .map(|h| (h.kind, h.start, h.end))
        };
        assert_eq!(at(14), None, "a read lock does not conflict with a read");
        assert_eq!(at(15), Some((Write, 15, 45)));
        assert_eq!(at(45), Some((Write, 15, 45)));
        assert_eq!(at(46), None);
        let w = |b: u64| {
            l.test(&key(), 2, Write, b, b)
                .map(|h| (h.kind, h.start, h.end))
        };
        assert_eq!(w(0), Some((Read, 0, 14)));
        assert_eq!(w(46), Some((Read, 46, 59)));
        assert_eq!(w(60), None);
        // A lock inside one lock of the owner splits it in three.
        set(&l, 1, None, 20, 30).unwrap();
        assert_eq!(w(19), Some((Write, 15, 19)));
        assert_eq!(w(25), None);
        assert_eq!(w(31), Some((Write, 31, 45)));
        // To the end of the file, and an unlock to the end.
        set(&l, 1, Some(Write), 100, END).unwrap();
        set(&l, 1, Some(Read), 200, 299).unwrap();
        assert_eq!(w(150), Some((Write, 100, 199)));
        assert_eq!(w(250), Some((Read, 200, 299)));
        assert_eq!(w(u64::MAX), Some((Write, 300, END)));
        set(&l, 1, None, 250, END).unwrap();
        assert_eq!(w(u64::MAX), None);
        assert_eq!(w(249), Some((Read, 200, 249)));
    }

    /// Recounts every owner's locks and waiting requests: `counts` and `total` must agree.
    fn check_counts(l: &Locks) {
        let t = l.table();
        let mut counts: HashMap<Owner, usize> = HashMap::new();
        for file in t.files.values() {
            for (owner, locks) in &file.held {
                *counts.entry(*owner).or_default() += locks.len();
            }
            for w in &file.waiting {
                *counts.entry(w.request.owner).or_default() += 1;
            }
        }
        assert_eq!(t.counts, counts);
        assert_eq!(t.total, counts.values().sum::<usize>());
    }

    #[test]
    fn adjacent_locks_of_one_kind_handle_and_process_are_one() {
        let l = Locks::default();
        // Record by record, in order and out of it: one lock.
        for i in [0, 1, 2, 4, 5, 3] {
            set(&l, 1, Some(Write), i * 10, i * 10 + 9).unwrap();
        }
        let held = l.test(&key(), 2, Read, 25, 25).unwrap();
        assert_eq!((held.start, held.end), (0, 59));
        check_counts(&l);
        assert_eq!(l.table().total, 1);
        // Another kind, another handle, or a gap keep locks apart.
        set(&l, 1, Some(Read), 60, 69).unwrap();
        l.set(Request {
            fh: 99,
            ..req(1, Some(Write), 70, 79)
        })
        .1
        .give();
        set(&l, 1, Some(Write), 81, 89).unwrap();
        let w = |b: u64| l.test(&key(), 2, Write, b, b).map(|h| (h.start, h.end));
        assert_eq!(w(0), Some((0, 59)));
        assert_eq!(w(65), Some((60, 69)));
        assert_eq!(w(75), Some((70, 79)));
        assert_eq!(w(85), Some((81, 89)));
        assert_eq!(l.table().total, 4);
        // A lock that reaches the end of the file joins nothing past it; an unlock cuts.
        set(&l, 1, Some(Write), 90, END).unwrap();
        assert_eq!(w(END), Some((81, END)));
        set(&l, 1, None, 20, 29).unwrap();
        assert_eq!((w(19), w(30)), (Some((0, 19)), Some((30, 59))));
        check_counts(&l);
    }

    #[test]
    fn an_owner_or_a_space_past_its_bound_is_enolck_and_nothing_changes() {
        let l = Locks::with_limits(4, 6);
        for i in 0..4 {
            assert_eq!(set(&l, 1, Some(Read), i * 2, i * 2), Ok(i == 0));
        }
        assert_eq!(set(&l, 1, Some(Read), 100, 100), Err(libc::ENOLCK));
        // What adds no lock still goes: a lock over one it holds, a change of kind, an unlock
        // of a whole lock; an unlock that would split one is refused.
        assert_eq!(set(&l, 1, Some(Write), 2, 2), Ok(false));
        assert_eq!(set(&l, 1, None, 2, 2), Ok(false));
        assert_eq!(set(&l, 1, Some(Read), 100, 100), Ok(false));
        assert_eq!(set(&l, 1, Some(Write), 200, 300), Err(libc::ENOLCK));
        set(&l, 1, None, 200, 300).unwrap();
        set(&l, 1, None, 100, 100).unwrap();
        set(&l, 1, Some(Write), 200, 300).unwrap();
        assert_eq!(set(&l, 1, None, 250, 250), Err(libc::ENOLCK));
        assert_eq!(
            l.test(&key(), 2, Read, 250, 250).map(|h| (h.start, h.end)),
            Some((200, 300)),
            "the refused unlock changed nothing"
        );
        check_counts(&l);
        // The space: owner 2 may have two, and its wait counts as one.
        assert_eq!(set(&l, 2, Some(Read), 1000, 1000), Ok(true));
        let waits = waiter(&l, 2, Write, 0, 0);
        assert_eq!(waits.load(Ordering::SeqCst), 0);
        assert_eq!(set(&l, 3, Some(Read), 2000, 2000), Err(libc::ENOLCK));
        assert_eq!(
            waiter(&l, 3, Write, 0, 0).load(Ordering::SeqCst),
            -libc::ENOLCK
        );
        check_counts(&l);
        // Closing the file gives back what the owner had: owner 2's wait is let in.
        l.release_owner(&key(), 1).give();
        assert_eq!(waits.load(Ordering::SeqCst), 1);
        assert_eq!(set(&l, 3, Some(Read), 2000, 2000), Ok(true));
        check_counts(&l);
        l.release_handle(&key(), 2).give();
        l.release_handle(&key(), 3).give();
        check_counts(&l);
        assert_eq!(l.table().total, 0);
    }

    #[test]
    fn files_locked_are_remembered_the_latest_first() {
        let l = Locks::default();
        let p = |s: &str| std::path::PathBuf::from(s);
        l.mark(&p("d/app.db-shm"));
        for n in ["d/app.db-shm", "d/app.db", "d/app.db-wal"] {
            assert!(l.marked(&p(n)), "{n}");
        }
        assert!(!l.marked(&p("d/other")));
        // Marked again, a file stays while others come and go.
        for i in 0..MARKED_MAX {
            l.mark(&p(&format!("f{i}")));
            if i % 1000 == 0 {
                l.mark(&p("d/app.db"));
            }
        }
        assert!(l.marked(&p("d/app.db")));
        assert!(!l.marked(&p("d/app.db-wal")), "forgotten, the longest ago");
        assert!(l.marked(&p(&format!("f{}", MARKED_MAX - 1))));
        let m = l.marked.lock().unwrap();
        assert_eq!((m.paths.len(), m.by_age.len()), (MARKED_MAX, MARKED_MAX));
    }

    #[test]
    fn a_waiting_request_with_an_empty_range_is_refused_at_once() {
        let l = Locks::default();
        set(&l, 1, Some(Write), 0, END).unwrap();
        let bad = waiter(&l, 2, Write, 10, 9);
        assert_eq!(bad.load(Ordering::SeqCst), -libc::EINVAL);
        assert_eq!(set(&l, 2, Some(Write), 10, 9), Err(libc::EINVAL));
        assert_eq!(l.test(&key(), 2, Write, 10, 9), None);
    }

    #[test]
    fn a_cycle_across_files_is_edeadlk_and_ends_with_the_wait_that_made_it() {
        let l = Locks::default();
        let other = FileKey { mount: 1, ino: 3 };
        let on = |key: FileKey, owner: Owner, start: u64| Request {
            key,
            ..req(owner, Some(Write), start, start)
        };
        let answer = |seen: &Arc<AtomicI32>| -> Answer {
            let s = seen.clone();
            Box::new(move |r| s.store(r.map(|_| 1).unwrap_or_else(|e| -e), Ordering::SeqCst))
        };
        set(&l, 1, Some(Write), 0, 0).unwrap();
        l.set(on(other, 2, 0)).1.give();
        // 1 waits for 2 on the other file; 2 waiting for 1 here would close the cycle.
        let one = Arc::new(AtomicI32::new(0));
        l.set_waiting(on(other, 1, 0), answer(&one)).give();
        let two = waiter(&l, 2, Write, 0, 0);
        assert_eq!(two.load(Ordering::SeqCst), -libc::EDEADLK);
        // 1 gives up its wait (closes the other file): 2 may wait for it now.
        l.release_owner(&other, 1).give();
        assert_eq!(one.load(Ordering::SeqCst), -libc::EINTR);
        let two = waiter(&l, 2, Write, 0, 0);
        assert_eq!(two.load(Ordering::SeqCst), 0);
        set(&l, 1, None, 0, END).unwrap();
        assert_eq!(two.load(Ordering::SeqCst), 1);
    }
}
