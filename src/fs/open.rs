//! Opening and releasing files: how the kernel may cache each open (see `OpenState`),
//! read-write opens sharing one handle, passthrough windows, and the commit of what is left at
//! the last release.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::handle::{FileHandle, Mode};
use super::passthrough::Passing;
use super::{Attr, Caller, Errno, Fs, FsResult, Ino, Opened, Tid, lock, read_lock, write_lock};
use crate::events::Changed;
use crate::grant::Access;
use crate::store::{Content, Kind, Meta, StoreError};

/// Whether an open made the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Created {
    No,
    Yes,
    /// Made by `Store::create_held`: the handle commits it (see
    /// `Capabilities::created_at_commit`).
    Held,
}

impl Fs {
    /// Opens the file `ino` with the `open(2)` flags `flags`, for thread `by`. An inode whose
    /// name moved to another (see `passthrough`) still opens under that name (a cached entry,
    /// `/proc/<pid>/fd`) where its passthrough readers allow; elsewhere it is `ESTALE` again.
    /// So is an inode left without a name: another file was renamed over it (or it was
    /// removed) after the kernel looked its name up for this open. A local filesystem does the
    /// lookup and the open as one step, so a reader of a file saved by renames (config
    /// reloaders, `mv tmp cfg`) never fails there; on `ESTALE` the kernel looks the name up
    /// again and opens what it names now (or reports `ENOENT` if nothing).
    pub fn open(&self, ino: Ino, flags: i32, by: Tid) -> FsResult<Opened> {
        let path = read_lock(&self.table).path(ino).ok_or(Errno::ESTALE)?;
        Ok(self.open_path(ino, &path, flags, by, Created::No)?.0)
    }

    /// Opens `ino` at `path`; `created`: this very request created it (`create`), so an empty
    /// file found there is the one it made. Also returns the attributes of the version opened
    /// when they are what the kernel is to see of the file: the new handle is its only one and
    /// holds no changes yet.
    fn open_path(
        &self,
        ino: Ino,
        path: &Path,
        flags: i32,
        by: Tid,
        created: Created,
    ) -> FsResult<(Opened, Option<Meta>)> {
        self.touch();
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let access = if writable || flags & libc::O_TRUNC != 0 {
            Access::Write
        } else {
            Access::Read
        };
        self.allow("open", path, access)?;
        let truncate = writable && flags & libc::O_TRUNC != 0;
        let found = std::time::Instant::now();
        let open = |path| {
            let opened = match access {
                // A reader reads the version it opens (fetched now from a store that keeps no
                // replaced versions, see `Store::open_to_read`).
                Access::Read => self.store.open_to_read(path),
                Access::Write => self.store.open(path),
            };
            match opened {
                // Removed (by another process or host) since the kernel looked the name up,
                // which it may have done a TTL ago: it looks it up again on `ESTALE`, and then
                // reports `ENOENT` itself, or creates the file for `O_CREAT`, as a local disk
                // would have.
                Err(e) if e.raw_os_error() == libc::ENOENT && created == Created::No => {
                    Err(StoreError::errno(libc::ESTALE))
                }
                opened => opened,
            }
        };
        let mut committed = open(path)?;
        // A rename onto the name changes the store first and the table after: the store may
        // have given the file the name holds now, while the table still names the inode it
        // is replacing (the kernel would read the new file's bytes within the old one's size).
        // Once no rename of the name is under way, the inode's name says which it was: if the
        // inode lost the name (renamed over, or moved), the kernel looks the name up again
        // (`ESTALE`); if a rename ran but left the name this inode's, the store is asked again.
        if created == Created::No {
            let mut tries = 0;
            loop {
                let waited = self.space.wait_moves(path);
                if read_lock(&self.table).path(ino).as_deref() != Some(path) || tries == 3 {
                    return Err(Errno::ESTALE);
                }
                if !waited {
                    break;
                }
                tries += 1;
                committed = open(path)?;
            }
        }
        let meta = committed.meta().clone();
        let version = meta.version.clone();
        // `O_TRUNC`: the handle starts from an empty working copy; but truncating a file this
        // request just created, still empty, changes nothing. The handle then starts clean on
        // that empty version, and a new file written once at its end (the common `open(path,
        // "w")`, `>`) waits in memory and is added in place at the commit: no working copy to
        // create, swap in and free.
        let truncated = match truncate && !(created != Created::No && meta.size == 0) {
            true => Some(self.store.working_copy(path)?),
            false => None,
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // Read-write opens that neither truncate nor append update the file together (sqlite
        // connections): they share one handle, so each sees the others' writes at once.
        let shares = flags & libc::O_ACCMODE == libc::O_RDWR
            && flags & (libc::O_TRUNC | libc::O_APPEND) == 0;
        // The first open of an inode that took its name over from one held by passthrough
        // readers is mostly the open the kernel retries after `ESTALE`: a reader racing it
        // must not start a window that would turn it away again.
        let successor = read_lock(&self.table).is_unopened_successor(ino)
            && write_lock(&self.table).first_open_of_successor(ino);
        // See `FileHandle::appends_direct`; only where the mount clears set-IDs itself, since
        // the kernel leaves that to the mount for direct writes.
        let appends = flags & libc::O_APPEND != 0 && self.clears_set_ids.load(Ordering::Relaxed);
        // A read-only open by the process making a new file through the shared read-write
        // handle reads what it wrote, as on a local disk (git's `index-pack` writes a new pack
        // through one descriptor while its threads read it back by name). There is no earlier
        // version to keep private from it; other processes still see only what was committed,
        // and so does the writer's own process for files that were there before. (Asked before
        // the opens are locked: a handle's lock comes first.)
        let own_writer = match writable || truncate {
            true => None,
            false => self.shared_written_by(ino, by),
        };
        // (Asked before the opens are locked, and only where passthrough may be chosen.)
        let locked = access == Access::Read
            && meta.size >= super::passthrough::PASSTHROUGH_MIN
            && self.space.locks().marked(path);
        let (direct_io, keep_cache, alone, passing, only) = {
            let mut opens = lock(&self.opens);
            let state = opens.entry(ino).or_default();
            if let Some(own) = own_writer
                && let Some((shared, members)) = &mut state.shared
                && Arc::ptr_eq(shared, &own)
            {
                *members += 1;
                state.handles.push(fh);
                state.writers += 1;
                drop(opens);
                let mut opened = self.join(fh, own, (committed, found), by);
                opened.no_flush = true;
                return Ok((opened, None));
            }
            let others_open = !state.handles.is_empty();
            let only = !others_open;
            let passing = self.passing_for(
                &mut state.window,
                others_open || successor,
                locked,
                fh,
                committed.as_ref(),
                &meta,
                flags,
            );
            if passing == Passing::Stale {
                drop(opens);
                self.supersede(ino);
                return Err(Errno::ESTALE);
            }
            if shares && let Some((shared, members)) = &mut state.shared {
                // Read-write opens never join a window (they are `Stale` there).
                debug_assert_eq!(passing, Passing::No);
                *members += 1;
                let shared = shared.clone();
                state.handles.push(fh);
                state.writers += 1;
                drop(opens);
                return Ok((self.join(fh, shared, (committed, found), by), None));
            }
            state.handles.push(fh);
            if passing != Passing::No {
                // The kernel bypasses its page cache for every handle of the inode now.
                if writable {
                    state.cached_version = None;
                    state.writers += 1;
                } else {
                    state.readers += 1;
                }
                (true, false, false, passing, only)
            } else if writable {
                let alone = state.readers == 0 && state.writers == 0;
                // A writer alone starts from the committed version: pages cached of exactly
                // that version stay (dropping a large file's pages costs milliseconds). It then
                // fills the page cache with its own, not yet committed, data; an appender
                // writes with direct I/O instead, dropping only the pages it writes into, so
                // the pages stay for it beside other writers too, and stay that version's until
                // it commits (another writer's open made them nobody's: `cached_version` is
                // then `None`). Not beside readers of the page cache: one reading the page its
                // version ends in would cache it cut at that end. That covers the appender whose
                // open reaches the mount before the RELEASE of the one before it.
                let keep = (alone || (appends && state.readers == 0))
                    && state.cached_version.as_ref() == Some(&version);
                if !(appends && keep) {
                    state.cached_version = None;
                }
                state.writers += 1;
                (!alone || appends, keep, alone, passing, only)
            } else {
                state.readers += 1;
                // Readers of another version read through the page cache: dropping it (as an
                // open without `keep_cache` does) would show them this version's pages where
                // they miss. So do readers that read directly (they opened while a writer had
                // the file) but map it: a mapping is made of the page cache's pages. This
                // reader reads directly until they are gone.
                let others_cached_another =
                    state.cached_readers > 0 && state.cached_version.as_ref() != Some(&version);
                let others_direct = state.readers - 1 > state.cached_readers;
                if state.writers > 0 || others_cached_another || others_direct {
                    (true, false, false, passing, only)
                } else {
                    let keep = state.cached_version.as_ref() == Some(&version);
                    state.cached_version = Some(version);
                    state.cached_readers += 1;
                    state.shown.get_or_insert(meta.size);
                    (false, keep, false, passing, only)
                }
            }
        };
        let clean = truncated.is_none();
        let mode = match (writable, flags & libc::O_APPEND != 0) {
            (false, _) => Mode::Read,
            (true, false) => Mode::Write,
            (true, true) => Mode::Append,
        };
        let mut handle = FileHandle::new(ino, mode, direct_io, committed);
        handle.set_path(path);
        if let Some(copy) = truncated {
            handle.truncated(copy);
        }
        if created == Created::Held {
            handle.commits_creation();
        }
        handle.users.add(by);
        handle.seed_on_demand = alone && mode == Mode::Write;
        handle.made_by_open = created != Created::No;
        handle.appends_direct = (alone || keep_cache) && appends && passing == Passing::No;
        if shares {
            // A database's file: its changes are committed at close only.
            handle.not_sequential();
        }
        let handle = Arc::new(Mutex::new(handle));
        if shares {
            let mut opens = lock(&self.opens);
            if let Some(state) = opens.get_mut(&ino) {
                // A second read-write open racing this one made its own handle: it stays
                // private, as every writer was before sharing.
                state.shared.get_or_insert_with(|| (handle.clone(), 1));
            }
        }
        write_lock(&self.files).insert(fh, handle);
        let opened = Opened {
            fh,
            // A passthrough reader's reads never reach the daemon; everyone else in a window
            // is served with direct I/O.
            direct_io: direct_io && !matches!(passing, Passing::Reads(_)),
            keep_cache,
            no_flush: !writable,
            passthrough: passing.backing_id(),
        };
        Ok((opened, (only && clean).then_some(meta)))
    }

    /// The shared read-write handle of `ino`, if its open made the file and a thread of the
    /// process of thread `by` opened it or wrote through it.
    fn shared_written_by(&self, ino: Ino, by: Tid) -> Option<Arc<Mutex<FileHandle>>> {
        let shared = lock(&self.opens)
            .get(&ino)?
            .shared
            .as_ref()
            .map(|(h, _)| h.clone())?;
        let pid = super::closers::thread_group(by)?;
        let known = {
            let h = lock(&shared);
            h.made_by_open && h.users.known_process(pid, super::closers::thread_group)
        };
        known.then_some(shared)
    }

    /// Makes `fh` another name of the shared read-write handle `shared`. While it has nothing
    /// uncommitted, it moves on to `latest` (the version this open found, at `found`), so a
    /// new member never reads older data than a fresh open would — unless the handle's base
    /// is newer than that (a member committed since the open asked the store: moving there
    /// would take the file back to an older version, and the next lock holder would read it,
    /// losing an update).
    pub(super) fn join(
        &self,
        fh: u64,
        shared: Arc<Mutex<FileHandle>>,
        (latest, found): (Arc<dyn Content>, std::time::Instant),
        by: Tid,
    ) -> Opened {
        let mut h = lock(&shared);
        h.users.add(by);
        let moved = latest.meta().version != h.base().meta().version
            && !h.based_after(found)
            && h.move_to(latest);
        let direct_io = h.direct_io;
        drop(h);
        write_lock(&self.files).insert(fh, shared);
        Opened {
            fh,
            direct_io,
            // The kernel's pages are the shared handle's view, unless it just moved on.
            keep_cache: !direct_io && !moved,
            no_flush: false,
            passthrough: None,
        }
    }

    /// Creates and opens `name` in `parent` (`open` with `O_CREAT`).
    pub fn create(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: &Caller,
    ) -> FsResult<(Attr, Opened)> {
        let (path, claim) = self.claim_child(parent, name)?;
        self.allow("create", &path, Access::Write)?;
        let (perm, owner) = self.new_entry(&path, Kind::File, (mode & 0o7777) as u16, caller)?;
        // A writer without `O_EXCL` may leave making the file to its commit, where the store
        // does that (one write to an object store instead of two).
        let held = flags & libc::O_EXCL == 0
            && flags & libc::O_ACCMODE != libc::O_RDONLY
            && self.store.capabilities().created_at_commit;
        let created = self.creating(|| {
            Ok(match held {
                true => self.store.create_held(&path, perm, owner)?,
                false => self.store.create(&path, perm, owner, true)?,
            })
        });
        drop(claim);
        let fresh = match (&created, held) {
            (Err(_), _) => Created::No,
            (Ok(_), false) => Created::Yes,
            (Ok(_), true) => Created::Held,
        };
        let meta = match created {
            Ok(meta) => {
                self.publish(Changed::file(&path, meta.size));
                meta
            }
            Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => {
                let meta = match self.store.stat(&path) {
                    Ok(meta) => meta,
                    // Made and removed again elsewhere in between: the name is free, and the
                    // kernel, told `ESTALE`, looks it up again and creates it.
                    Err(e) if e.raw_os_error() == libc::ENOENT => return Err(Errno::ESTALE),
                    Err(e) => return Err(e.into()),
                };
                if meta.kind == Kind::Dir {
                    return Err(Errno::EISDIR);
                }
                meta
            }
            Err(e) => return Err(e),
        };
        let attr = self.remember(parent, name, &meta);
        match self.open_path(attr.ino, &path, flags, caller.pid, fresh) {
            Ok((opened, Some(meta))) => Ok((Attr::new(attr.ino, &meta), opened)),
            // Joining a shared working copy, or beside other handles: what they show.
            Ok((opened, None)) => Ok((self.as_open(attr), opened)),
            Err(e) => {
                self.forget(attr.ino, 1);
                Err(e)
            }
        }
    }

    /// The last reference to the handle is gone: commit what is left (a mapping written after
    /// `close()`), then forget the handle.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let Some(handle) = write_lock(&self.files).remove(&fh) else {
            return Err(Errno::EBADF);
        };
        let h = lock(&handle);
        // Unlocked first: waiters let in are answered here and may lock this handle.
        let key = self.lock_key_of(&h);
        drop(h);
        self.release_locks(&key, None, Some(fh));
        let mut h = lock(&handle);
        if self.leave_shared(&handle, h.ino, fh) {
            return Ok(());
        }
        let result = self.commit_at_release(&mut h);
        if result.is_ok() && h.dirty() {
            // Unlinked while open (the commit had no path): the changes go with the handle.
            h.drop_changes();
        }
        if result.is_err() && h.dirty() {
            log::error!(
                "dropping uncommitted changes to inode {} after a failed commit",
                h.ino
            );
            h.drop_changes();
            // The kernel may hold the dropped size (its cached pages are dropped at the next
            // open: they are of no committed version).
            if let Some(kernel) = self.kernel.get() {
                kernel.attributes_changed(h.ino);
            }
        }
        let mut opens = lock(&self.opens);
        let mut unregister = None;
        if let Some(state) = opens.get_mut(&h.ino) {
            state.handles.retain(|&other| other != fh);
            unregister = Self::leave_window(&mut state.window, fh);
            if h.writable() {
                state.writers -= 1;
            } else {
                state.readers -= 1;
                if !h.direct_io {
                    state.cached_readers -= 1;
                    if state.cached_readers == 0 {
                        state.shown = None;
                    }
                    if h.locker {
                        state.cached_lockers -= 1;
                    }
                }
            }
            if state.readers == 0 && state.writers == 0 && state.cached_version.is_none() {
                opens.remove(&h.ino);
            }
        }
        drop(opens);
        self.unregister_backing(unregister);
        result
    }

    /// `fh` of the shared handle `handle` is released: true while other file handles still
    /// share it (nothing to commit or close yet); the last one ends the sharing.
    pub(super) fn leave_shared(&self, handle: &Arc<Mutex<FileHandle>>, ino: Ino, fh: u64) -> bool {
        let mut opens = lock(&self.opens);
        let Some(state) = opens.get_mut(&ino) else {
            return false;
        };
        let Some((shared, members)) = &mut state.shared else {
            return false;
        };
        if !Arc::ptr_eq(shared, handle) {
            return false;
        }
        if *members == 1 {
            state.shared = None;
            return false;
        }
        *members -= 1;
        state.handles.retain(|&other| other != fh);
        state.writers -= 1;
        let unregister = Self::leave_window(&mut state.window, fh);
        drop(opens);
        self.unregister_backing(unregister);
        true
    }
}
