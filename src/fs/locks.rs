//! POSIX record locks (`fcntl`), served by the daemon (the table is the space's, see
//! `space::locks`), and what taking one means for the handle: it looks at the file afresh.
//!
//! A handle keeps the committed version it opened (a reader reads one version, whole). A
//! program that coordinates through locks wants the opposite each time it takes a lock: it
//! takes it to look at what others did. sqlite reads the database's change counter under a
//! shared lock at the start of every transaction and trusts its cache if it did not change, so
//! a read-only connection that kept its first version would serve stale rows forever. So each
//! time a lock is granted, the handle it was taken through moves on to the latest committed
//! version (if it has nothing uncommitted) before the grant is answered. In WAL mode sqlite
//! locks only its WAL index, `NAME-shm`, and reads `NAME` under those locks: a lock on
//! `NAME-shm` moves that process's handles of `NAME` on too.
//!
//! The other half of that protocol: a program that releases its lock before it closes the file
//! (`lockf(F_ULOCK)`, `fcntl(F_UNLCK)`, then `close`) expects the next holder to read what it
//! wrote. So an unlock first commits what the releasing process changed in the file (its
//! handles of it with uncommitted changes); a failed commit is reported at their close.
//!
//! A handle that reads through the kernel's page cache moves only when every handle reading
//! the file through the page cache takes part in locking (plain readers keep their version
//! whole, and the page cache is shared): the pages are then dropped before the grant is
//! answered, by the notifier thread, so the lock's holder never reads a page of the old
//! version.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use super::handle::{FileHandle, Mode};
use super::{Errno, Fs, FsResult, Ino, lock, read_lock};
use crate::space::locks::{FileKey, Held, LockKind, Request};

/// Answers a lock request (see [`Fs::setlk`]).
pub type LockReply = Box<dyn FnOnce(FsResult<()>) + Send>;

/// `F_RDLCK`/`F_WRLCK`/`F_UNLCK` as a lock kind (`None`: unlock).
pub fn lock_kind(typ: i32) -> FsResult<Option<LockKind>> {
    match typ {
        libc::F_RDLCK => Ok(Some(LockKind::Read)),
        libc::F_WRLCK => Ok(Some(LockKind::Write)),
        libc::F_UNLCK => Ok(None),
        _ => Err(Errno::EINVAL),
    }
}

/// The `F_*LCK` type of a lock kind.
pub fn lock_type(kind: LockKind) -> i32 {
    match kind {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
    }
}

impl Fs {
    /// The key the space's lock table knows the file of `h` by (see `InodeTable::lock_ino`).
    fn lock_key(&self, h: &FileHandle) -> FileKey {
        FileKey {
            mount: self.id,
            ino: read_lock(&self.table).lock_ino(h.ino),
        }
    }

    fn handle_key(&self, fh: u64) -> FsResult<(Arc<Mutex<FileHandle>>, FileKey)> {
        let handle = self.file(fh)?;
        let key = self.lock_key(&lock(&handle));
        Ok((handle, key))
    }

    /// `F_GETLK` through `fh` by `owner`: a lock of another owner that conflicts with the one
    /// described by `typ` over `start..=end`, if any.
    pub fn getlk(
        &self,
        fh: u64,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
    ) -> FsResult<Option<Held>> {
        let Some(kind) = lock_kind(typ)? else {
            return Err(Errno::EINVAL);
        };
        let (_, key) = self.handle_key(fh)?;
        Ok(self.space.locks().test(&key, owner, kind, start, end))
    }

    /// `F_SETLK` (`wait` false) or `F_SETLKW` through `fh` by `owner` (of process `pid`):
    /// `reply` is called exactly once, at once or, for a lock that must wait, when it is
    /// granted, refused (`EDEADLK`) or cancelled (`EINTR`: its owner closed the file).
    #[allow(clippy::too_many_arguments)]
    pub fn setlk(
        self: &Arc<Self>,
        fh: u64,
        owner: u64,
        pid: u32,
        (start, end): (u64, u64),
        typ: i32,
        wait: bool,
        reply: LockReply,
    ) {
        let request = lock_kind(typ).and_then(|kind| {
            let (_, key) = self.handle_key(fh)?;
            Ok(Request {
                key,
                owner,
                pid,
                kind,
                start,
                end,
                fh,
            })
        });
        let request = match request {
            Ok(r) => r,
            Err(e) => return reply(Err(e)),
        };
        let locking = request.kind.is_some();
        if !locking {
            self.commit_before_unlock(fh, pid);
        } else if let Ok(handle) = self.file(fh) {
            let ino = lock(&handle).ino;
            if let Some(path) = read_lock(&self.table).path(ino) {
                self.space.locks().mark(&path);
            }
        }
        let locks = self.space.locks();
        if !wait {
            let (result, answers) = locks.set(request);
            answers.give();
            return match result {
                Ok(_) => self.granted(fh, pid, locking, reply),
                Err(e) => reply(Err(Errno(e))),
            };
        }
        let fs = Arc::downgrade(self);
        let answer = Box::new(move |result: Result<bool, i32>| match result {
            Ok(_) => match fs.upgrade() {
                Some(fs) => fs.granted(fh, pid, locking, reply),
                None => reply(Err(Errno::EIO)), // the mount is gone
            },
            Err(e) => reply(Err(Errno(e))),
        });
        locks.set_waiting(request, answer).give();
    }

    /// Commits what process `pid` changed in the file of `fh` before it releases a lock on it
    /// (see the module docs): `fh`, and its other handles of the file with changes.
    fn commit_before_unlock(&self, fh: u64, pid: u32) {
        let Ok(handle) = self.file(fh) else {
            return;
        };
        let ino = lock(&handle).ino;
        let handles = match lock(&self.opens).get(&ino) {
            Some(state) => state.handles.clone(),
            None => vec![fh],
        };
        for other in handles {
            let Ok(handle) = self.file(other) else {
                continue;
            };
            let mut h = lock(&handle);
            let theirs = other == fh || h.users.include_process(pid, super::closers::thread_group);
            if theirs
                && h.dirty()
                && let Err(e) = self.commit(&mut h, false)
            {
                log::warn!("the commit before an unlock of inode {ino} failed: {e:?}");
            }
        }
    }

    /// A lock was granted through `fh` to process `pid`: answers `reply`, after moving the
    /// handles that look at the file afresh (see the module docs).
    fn granted(&self, fh: u64, pid: u32, locking: bool, reply: LockReply) {
        let mut drop_pages = Vec::new();
        if locking {
            drop_pages.extend(self.look_afresh(fh));
            for db in self.wal_database_handles(fh, pid) {
                drop_pages.extend(self.look_afresh(db));
            }
        }
        match self.kernel.get() {
            Some(kernel) if !drop_pages.is_empty() => {
                let pages = drop_pages.into_iter().map(|ino| (ino, 0)).collect();
                kernel.data_changed_then(pages, Box::new(|| reply(Ok(()))));
            }
            _ => reply(Ok(())),
        }
    }

    /// When `fh` is sqlite's WAL index `NAME-shm`, the handles of `NAME` in the same directory
    /// that process `pid` uses.
    fn wal_database_handles(&self, fh: u64, pid: u32) -> Vec<u64> {
        let Ok(handle) = self.file(fh) else {
            return Vec::new();
        };
        let ino = lock(&handle).ino;
        let db = {
            let table = read_lock(&self.table);
            let Some(path) = table.path(ino) else {
                return Vec::new();
            };
            let name = path.file_name().map(|n| n.as_bytes()).unwrap_or_default();
            let Some(db) = name.strip_suffix(b"-shm") else {
                return Vec::new();
            };
            table
                .parent(ino)
                .and_then(|parent| table.child(parent, OsStr::from_bytes(db)))
        };
        let Some(db) = db else {
            return Vec::new();
        };
        let handles = match lock(&self.opens).get(&db) {
            Some(state) => state.handles.clone(),
            None => return Vec::new(),
        };
        handles
            .into_iter()
            .filter(|&fh| {
                self.file(fh).is_ok_and(|h| {
                    lock(&h)
                        .users
                        .include_process(pid, super::closers::thread_group)
                })
            })
            .collect()
    }

    /// Moves the handle `fh` on to the file's latest committed version if it has nothing
    /// uncommitted and may (see the module docs); the inode whose cached pages must be dropped
    /// before its owner reads, if any.
    fn look_afresh(&self, fh: u64) -> Option<Ino> {
        let handle = self.file(fh).ok()?;
        let mut h = lock(&handle);
        let cached_reader = h.mode() == Mode::Read && !h.direct_io;
        if cached_reader && !h.locker {
            h.locker = true;
            if let Some(state) = lock(&self.opens).get_mut(&h.ino) {
                state.cached_lockers += 1;
            }
        }
        if h.dirty() {
            return None;
        }
        let path = read_lock(&self.table).path(h.ino)?;
        let latest = match self.store.open(&path) {
            Ok(latest) => latest,
            Err(e) => {
                log::warn!(
                    "a lock on {} keeps the version its handle had: {e}",
                    path.display()
                );
                return None;
            }
        };
        let version = latest.meta().version.clone();
        if version == h.base().meta().version {
            return None;
        }
        if !h.cached_view() {
            h.move_to(latest);
            return None;
        }
        let mut opens = lock(&self.opens);
        let state = opens.get_mut(&h.ino)?;
        if state.cached_lockers < state.cached_readers {
            // A plain reader reads its version through the same pages.
            return None;
        }
        h.move_to(latest);
        state.cached_version = Some(version);
        Some(h.ino)
    }

    /// The key of the file of `h` in the lock table (see `release_locks`).
    pub(super) fn lock_key_of(&self, h: &FileHandle) -> FileKey {
        self.lock_key(h)
    }

    /// Drops locks on the file `key` (and cancels waiting requests): those of `owner`, at a
    /// close by it of any descriptor of the file (POSIX drops an owner's locks on a file at
    /// any close of it); those taken through `fh` when the handle is gone (a close the kernel
    /// did not report with its owner, see `Opened::no_flush`). Call with no handle locked:
    /// waiters let in are answered here.
    pub(super) fn release_locks(&self, key: &FileKey, owner: Option<u64>, fh: Option<u64>) {
        let locks = self.space.locks();
        if let Some(owner) = owner {
            locks.release_owner(key, owner).give();
        }
        if let Some(fh) = fh {
            locks.release_handle(key, fh).give();
        }
    }
}
