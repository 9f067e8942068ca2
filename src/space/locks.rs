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

use std::collections::HashMap;
use std::sync::Mutex;

/// The kernel's id of a lock's owner.
pub type Owner = u64;

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

#[derive(Default)]
struct Table {
    held: HashMap<FileKey, Vec<Held>>,
    /// In the order they came.
    waiting: Vec<Waiter>,
}

/// The locks of one space (see the module docs).
#[derive(Default)]
pub struct Locks {
    table: Mutex<Table>,
}

impl Locks {
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
        let held = table.held.get(key)?;
        held.iter()
            .find(|h| h.conflicts(owner, kind, start, end))
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
            Err(_) if table.would_deadlock(&request) => Answers(vec![(answer, Err(libc::EDEADLK))]),
            Err(_) => {
                table.waiting.push(Waiter { request, answer });
                Answers(Vec::new())
            }
        }
    }

    /// Drops every lock `owner` holds on the file and cancels its waiting requests there: the
    /// owner closed a descriptor of the file (POSIX drops a process's locks on a file at any
    /// close of it).
    pub fn release_owner(&self, key: &FileKey, owner: Owner) -> Answers {
        let mut table = self.table();
        let mut answers = table.cancel(|w| w.request.key == *key && w.request.owner == owner);
        if let Some(held) = table.held.get_mut(key) {
            held.retain(|h| h.owner != owner);
        }
        answers.extend(table.wake(key));
        Answers(answers)
    }

    /// Drops the locks taken through the file handle `fh` and cancels its waiting requests:
    /// the handle is gone (its last descriptor was closed without the kernel telling which
    /// owner closed it).
    pub fn release_handle(&self, key: &FileKey, fh: u64) -> Answers {
        let mut table = self.table();
        let mut answers = table.cancel(|w| w.request.key == *key && w.request.fh == fh);
        if let Some(held) = table.held.get_mut(key) {
            held.retain(|h| h.fh != fh);
        }
        answers.extend(table.wake(key));
        Answers(answers)
    }

    /// Whether `owner` holds a lock on the file.
    pub fn holds_any(&self, key: &FileKey, owner: Owner) -> bool {
        let table = self.table();
        table
            .held
            .get(key)
            .is_some_and(|held| held.iter().any(|h| h.owner == owner))
    }
}

impl Table {
    /// Applies `request` if nothing conflicts; `Ok(first)` or `Err(EAGAIN)`.
    fn try_apply(&mut self, r: &Request) -> Granted {
        if r.start > r.end {
            return Err(libc::EINVAL);
        }
        let held = self.held.entry(r.key).or_default();
        if let Some(kind) = r.kind
            && held
                .iter()
                .any(|h| h.conflicts(r.owner, kind, r.start, r.end))
        {
            return Err(libc::EAGAIN);
        }
        let first = !held.iter().any(|h| h.owner == r.owner);
        // The owner's locks in the range give way (cut around it).
        let mut kept = Vec::with_capacity(held.len() + 1);
        for h in held.drain(..) {
            if h.owner != r.owner || !h.overlaps(r.start, r.end) {
                kept.push(h);
                continue;
            }
            if h.start < r.start {
                kept.push(Held {
                    end: r.start - 1,
                    ..h.clone()
                });
            }
            if h.end > r.end {
                kept.push(Held {
                    start: r.end + 1,
                    ..h
                });
            }
        }
        if let Some(kind) = r.kind {
            kept.push(Held {
                owner: r.owner,
                pid: r.pid,
                kind,
                start: r.start,
                end: r.end,
                fh: r.fh,
            });
        }
        *held = kept;
        if held.is_empty() {
            self.held.remove(&r.key);
        }
        Ok(first)
    }

    /// Grants the waiting requests on `key` that no longer conflict, in the order they came,
    /// until none can go.
    fn wake(&mut self, key: &FileKey) -> Vec<(Answer, Granted)> {
        let mut answers = Vec::new();
        loop {
            let mut granted = None;
            for (i, w) in self.waiting.iter().enumerate() {
                if w.request.key != *key {
                    continue;
                }
                let free = self.held.get(key).is_none_or(|held| {
                    let kind = w.request.kind.unwrap_or(LockKind::Read);
                    !held
                        .iter()
                        .any(|h| h.conflicts(w.request.owner, kind, w.request.start, w.request.end))
                });
                if free {
                    granted = Some(i);
                    break;
                }
            }
            let Some(i) = granted else {
                return answers;
            };
            let w = self.waiting.remove(i);
            let result = self.try_apply(&w.request);
            answers.push((w.answer, result));
        }
    }

    fn cancel(&mut self, which: impl Fn(&Waiter) -> bool) -> Vec<(Answer, Granted)> {
        let (cancelled, kept) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition::<Vec<_>, _>(|w| which(w));
        self.waiting = kept;
        cancelled
            .into_iter()
            .map(|w| (w.answer, Err(libc::EINTR)))
            .collect()
    }

    /// The owners whose locks keep `r` waiting.
    fn blockers(&self, r: &Request) -> Vec<Owner> {
        let kind = r.kind.unwrap_or(LockKind::Read);
        self.held
            .get(&r.key)
            .map(|held| {
                held.iter()
                    .filter(|h| h.conflicts(r.owner, kind, r.start, r.end))
                    .map(|h| h.owner)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `r` waiting would close a cycle: an owner keeping it waiting waits, directly or
    /// through others, for `r`'s owner.
    fn would_deadlock(&self, r: &Request) -> bool {
        let mut seen = Vec::new();
        let mut next = self.blockers(r);
        while let Some(owner) = next.pop() {
            if owner == r.owner {
                return true;
            }
            if seen.contains(&owner) {
                continue;
            }
            seen.push(owner);
            for w in self.waiting.iter().filter(|w| w.request.owner == owner) {
                next.extend(self.blockers(&w.request));
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
}
