//! Commit on close: what a handle changed becomes the file's content, atomically, through the
//! store (which owns how: see [`Store::commit`](crate::store::Store::commit)).
//!
//! `close()` commits (FUSE `flush`, so a failed commit is reported by `close()`), unless it
//! comes from a process that never used the handle (see `closers`), or the handle only emptied
//! the file and its process still has it open on another descriptor (a shell's `cmd > f`) or
//! was killed (see `closers` too); the last close of all (`release`) always commits, except
//! an emptying abandoned by a killed process (`FileHandle::abandoned`), which it drops;
//! `fsync()` commits and makes it durable. A file unlinked while
//! open has no path: its changes live on in the handle, for its reads and writes, until its
//! last close drops them, as on any POSIX filesystem. A spoiled working
//! copy (a write into it failed and its bytes were not written again) is refused with that
//! write's error, and the previous version stays.

use std::path::Path;

use super::handle::{FileHandle, Pending};
use super::{Errno, Fs, FsResult, Tid, closers, lock, read_lock};
use crate::events::Changed;
use crate::store::{Change, CommitRequest, SetAttr, TimeSpec, Version};

/// The most bytes an appender's working copy may hold for them to be appended to a version
/// others committed meanwhile (they are read into memory); past that, its copy wins whole.
const APPENDS_TAKEN_BACK_MAX: u64 = 64 << 20;

/// Appended bytes committed longer than this after their last write keep that write's time as
/// the file's mtime (see `written_at`); sooner, the commit's own time is as good.
const APPEND_TIME_SLACK: std::time::Duration = std::time::Duration::from_millis(10);

/// The time of the last write of bytes a handle held in memory, when committed noticeably
/// later (a published log, a writer that holds its file open): on a disk the write would
/// have set the mtime then, and `make` and `rsync` go by it. `None`: the commit's own time,
/// or times the handle set itself, stand.
fn written_at(h: &FileHandle) -> Option<std::time::SystemTime> {
    let Pending::Appended { at, .. } = h.pending() else {
        return None;
    };
    if h.kept_times().is_some_and(|t| t.mtime.is_some()) {
        return None;
    }
    let late = std::time::SystemTime::now()
        .duration_since(*at)
        .is_ok_and(|d| d > APPEND_TIME_SLACK);
    late.then_some(*at)
}

impl Fs {
    /// `close()` by thread `by` (lock owner `owner`) of one copy of the descriptor: commits,
    /// unless `by` is of a process that never used the handle (see `closers`); then the
    /// owner's POSIX locks on the file go (after the commit: whoever takes them next sees it).
    pub fn flush(&self, fh: u64, by: Tid, owner: Option<u64>) -> FsResult<()> {
        let handle = self.file(fh)?;
        let mut h = lock(&handle);
        let key = owner.map(|_| self.lock_key_of(&h));
        let result = self.commit_at_close(&mut h, by);
        drop(h);
        if let Some(key) = key {
            self.release_locks(&key, owner, None);
        }
        result
    }

    fn commit_at_close(&self, h: &mut FileHandle, by: Tid) -> FsResult<()> {
        if !h.dirty() {
            return Ok(());
        }
        if h.users.stranger(by, closers::thread_group) {
            log::debug!(
                "not committing inode {} at a close by thread {by} of another process",
                h.ino
            );
            return Ok(());
        }
        if h.only_emptied && by != 0 {
            let dev = self.mount_dev.get().copied();
            if (self.processes.holds_writer)(by, dev, h.ino, h.appends()) {
                log::debug!(
                    "not committing inode {} emptied at a close by thread {by}: its process \
                     still has it open for writing",
                    h.ino
                );
                return Ok(());
            }
            if (self.processes.killed)(by) {
                log::debug!(
                    "not committing inode {} emptied by thread {by}, killed before it wrote",
                    h.ino
                );
                h.abandoned = true;
                return Ok(());
            }
        }
        self.commit(h, self.options.sync_on_close)
    }

    /// The last close of all (`release`): commits what is left, or drops an emptying a killed
    /// user abandoned (see `closers`).
    pub(super) fn commit_at_release(&self, h: &mut FileHandle) -> FsResult<()> {
        if h.abandoned && h.only_emptied {
            h.drop_changes();
            // The kernel took the file as emptied at the open.
            if let Some(kernel) = self.kernel.get() {
                kernel.attributes_changed(h.ino);
            }
            return Ok(());
        }
        if !h.dirty() {
            return Ok(());
        }
        self.commit(h, self.options.sync_on_close)
    }

    /// `fsync()`: commits and makes the file durable, without closing it.
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        let handle = self.file(fh)?;
        let mut h = lock(&handle);
        if h.dirty() {
            return self.commit(&mut h, true);
        }
        let path = read_lock(&self.table).path(h.ino);
        match path {
            Some(path) => Ok(self.store.sync(&path)?),
            None => Ok(()),
        }
    }

    /// Commits what `h` changed at the file's current path (see the module docs). Failures
    /// are counted in the metrics.
    pub(super) fn commit(&self, h: &mut FileHandle, durable: bool) -> FsResult<()> {
        let result = self
            .try_commit(h, durable)
            .inspect_err(crate::metrics::commit_failed);
        // (A store that failed, EIO, would fail this too.)
        if result.is_err_and(|e| e != Errno::EIO) && h.creates {
            self.make_created(h);
        }
        result
    }

    /// The open of `h` created the file, which the store makes at its first commit
    /// (`Capabilities::created_at_commit`), and that commit failed for what was written (a
    /// full spool, a quota): the file is made as it was created, empty, as on a store that
    /// made it at the open. The handle keeps its changes, to commit again. Best effort
    /// (logged); until a commit succeeds, the file is this process's.
    fn make_created(&self, h: &mut FileHandle) {
        let Some(path) = read_lock(&self.table).path(h.ino) else {
            return;
        };
        let base = h.base().clone();
        match self.store.commit(CommitRequest {
            path: &path,
            base: &base,
            change: Change::Append {
                tail: &[],
                follow: false,
            },
            durable: false,
            attrs: None,
        }) {
            Ok(done) => h.rebase_created(done.content),
            Err(e) => log::warn!(
                "{}: the file created could not be made empty either: {e}",
                path.display()
            ),
        }
    }

    /// [`Fs::commit`], uncounted.
    fn try_commit(&self, h: &mut FileHandle, durable: bool) -> FsResult<()> {
        if let Some(s) = h.staged().and_then(|s| s.spoiled) {
            let path = read_lock(&self.table).path(h.ino);
            log::warn!(
                "not committing {}: a write into bytes {}..{} failed ({}) and they were not \
                 written again; it keeps its previous version",
                path.as_deref().unwrap_or(Path::new("(unlinked)")).display(),
                s.from,
                s.to,
                s.errno
            );
            return Err(s.errno);
        }
        if !h.dirty() || h.gone {
            // Deleted or replaced elsewhere (see `gone`): kept for its own reads, as below.
            return Ok(());
        }
        let Some((path, _claim)) = self.claim_path(h.ino) else {
            // Unlinked (or replaced by a rename) while open: there is nothing to commit to.
            // The handle keeps its changes for its own reads and writes (`fsync`, a close of
            // one of its descriptors, a published output) until its last close drops them.
            return Ok(());
        };
        if h.staged().is_some_and(|s| s.appends_from.is_some())
            && self.store.stat(&path)?.version != h.base().meta().version
        {
            // Appends in a working copy of an older version: take them back, to append them
            // to the file as it is now, rather than replace what others appended.
            h.take_back_appends(APPENDS_TAKEN_BACK_MAX)?;
        }
        let ranges = h.changed_ranges();
        if ranges.is_none() {
            h.finish_seeding()?;
        }
        let base = h.base().clone();
        let mut sizes = (base.meta().size, h.size()?);
        // A file counts once per name (see `link`), so its growth does too: charged for the
        // names it has now (links made or removed since it was opened), settled for those it
        // has once committed (a commit may leave the other names on the old version).
        let names = |meta: &crate::store::Meta| u64::from(meta.nlink.max(1));
        let per_names =
            |(old, new): (u64, u64), n: u64| (old.saturating_mul(n), new.saturating_mul(n));
        let opened_with = match self.space.quota() {
            Some(_) => names(&self.store.stat(&path)?),
            None => names(base.meta()),
        };
        // The byte quota is charged for the growth, and settled with what the commit did.
        // Refused, the change of a handle that does not append (which replaces the file, see
        // `Change`) is charged again from the file as it is now, which another writer's close
        // may have replaced since this handle opened it.
        if let Some(q) = self.space.quota() {
            let (old, new) = per_names(sizes, opened_with);
            match q.resize(old, new) {
                Err(Errno::EDQUOT) if !h.appends() => match self.size_now(&path)? {
                    Some(now) if now != sizes.0 => {
                        let (old, new) = per_names((now, sizes.1), opened_with);
                        q.resize(old, new)?;
                        sizes.0 = now;
                    }
                    _ => return Err(Errno::EDQUOT),
                },
                charged => charged?,
            }
        }
        // Where the store takes them, the attributes set meanwhile (see `hold_for_commit`).
        let with_attrs = self.store.capabilities().attrs_at_commit;
        let written_at = written_at(h).map(|t| SetAttr {
            mtime: Some(TimeSpec::At(t)),
            ..Default::default()
        });
        let mut attrs = with_attrs.then(|| h.commit_attrs()).flatten();
        if with_attrs && let Some(w) = &written_at {
            attrs.get_or_insert_default().mtime = w.mtime;
        }
        let result = {
            let seeding = h.staged().and_then(|s| s.seeding.clone());
            let complete = || seeding.as_ref().map_or(Ok(()), |s| s.finish());
            let change = match (h.pending(), &ranges) {
                (Pending::Appended { tail, .. }, _) => Change::Append {
                    tail,
                    follow: h.appends(),
                },
                (Pending::Staged(s), Some(written)) => Change::Ranges {
                    copy: &s.copy,
                    written,
                    complete: &complete,
                },
                (Pending::Staged(s), None) => Change::Whole(&s.copy),
                (Pending::Clean, _) => return Ok(()),
            };
            self.store.commit(CommitRequest {
                path: &path,
                base: &base,
                change,
                durable,
                attrs: attrs.clone(),
            })
        };
        match result {
            Ok(done) => {
                if let Some(q) = self.space.quota() {
                    let committed = done.content.meta();
                    q.settle(
                        per_names(sizes, opened_with),
                        per_names((done.replaced_size, committed.size), names(committed)),
                    );
                }
                h.committed(done.content, done.followed);
                if !with_attrs && let Some(times) = h.kept_times().or(written_at) {
                    // Times set through the descriptor after its last write stay the file's.
                    self.store.set_attr(&path, &times)?;
                }
                self.committed(h, &path, &base.meta().version);
                Ok(())
            }
            Err(e) => {
                if let Some(q) = self.space.quota() {
                    let (old, new) = per_names(sizes, opened_with);
                    let _ = q.resize(new, old);
                }
                Err(e.into())
            }
        }
    }

    /// Bookkeeping after `h` committed at `path` (it worked from version `from`): what the
    /// kernel's caches of this mount and the space's other mounts must drop.
    fn committed(&self, h: &FileHandle, path: &Path, from: &Version) {
        crate::metrics::committed();
        let version = h.base().meta().version.clone();
        let mut opens = lock(&self.opens);
        let others_open = match opens.get_mut(&h.ino) {
            Some(state) => {
                // A cached writer's pages are exactly what it just committed (unless it moved
                // on to another version: its appends followed others'); an appender writing
                // directly left the pages it did not write into, which are the same.
                let sole_cached_writer = h.cached_view() && !h.moved && state.writers == 1;
                // So are an appender's (writing directly) when the pages were those of the
                // version it started from, whoever else has the file open: their opens would
                // have made the pages nobody's (see `open`).
                let appended_to_cached =
                    h.appends_direct && !h.moved && state.cached_version.as_ref() == Some(from);
                state.cached_version =
                    (sole_cached_writer || appended_to_cached).then_some(version);
                state.handles.len() > 1
            }
            None => false,
        };
        drop(opens);
        // Alone, the handle's own writes kept the kernel's view right; with others open, what
        // the kernel cached (size, times) may be another handle's.
        if let Some(kernel) = self.kernel.get() {
            if others_open || h.moved {
                kernel.attributes_changed(h.ino);
            }
            if h.moved && h.cached_view() {
                // Its pages hold this handle's appends where the kernel thought the file ended
                // (or, appending directly, the end of the version it started from).
                kernel.data_changed(h.ino);
            }
        }
        self.publish(Changed::file(path, h.committed_size()));
    }

    /// The mount stops while files are still open in it (a daemon stopping once its grace
    /// period ends): commits every open handle's pending changes for the last time and refuses
    /// changes through them from now on (`EIO`), so that no write is reported done and then
    /// lost with the process. A change under way finishes first and is in the commit (each
    /// handle's lock is taken). Returns the handles committed.
    pub fn seal(&self) -> usize {
        self.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.commit_all()
    }

    /// Commits every open handle's pending changes (on shutdown).
    pub fn commit_all(&self) -> usize {
        let handles: Vec<_> = read_lock(&self.files).values().cloned().collect();
        let mut committed = 0;
        for handle in handles {
            let mut h = lock(&handle);
            if h.dirty() && !h.abandoned && self.commit(&mut h, self.options.sync_on_close).is_ok()
            {
                committed += 1;
            }
        }
        committed
    }
}
