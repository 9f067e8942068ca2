//! Attributes: what `stat` shows while files are open and written, and changes to them.

use std::sync::{Arc, Mutex};

use super::handle::{FileHandle, Mode};
use super::{Attr, AttrChanges, Errno, Fs, FsResult, Ino, Tid, lock, read_lock};
use crate::events::Changed;
use crate::grant::Access;
use crate::store::{Kind, SetAttr};

impl Fs {
    /// Attributes of `ino`.
    ///
    /// The kernel keeps one size per inode and cuts reads through the page cache at it (FUSE
    /// sends no file handle with `fstat`). So while a reader that reads through the page cache
    /// has the file open, the committed size is shown: a writer that came later must not make
    /// that reader see a cut version. Otherwise a handle's uncommitted working copy is shown, so
    /// a writer sees its own size. A file unlinked while open shows the content its handles
    /// still hold. A mode or owner held for a handle's commit (`hold_for_commit`) is shown.
    pub fn getattr(&self, ino: Ino, fh: Option<u64>) -> FsResult<Attr> {
        let mut attr = self.getattr_unheld(ino, fh)?;
        if self.store.capabilities().attrs_at_commit {
            // A mode or owner held for a handle's commit is the file's here already.
            for handle in self.handles_of(ino) {
                let h = lock(&handle);
                if h.ino == ino {
                    h.show_held(&mut attr);
                }
            }
        }
        Ok(attr)
    }

    /// The kernel is about to be shown `size` as the size of `ino`: returns the offset from
    /// which it must drop its cached pages first, if any.
    ///
    /// A reader through the page cache that read to the end of the file left the kernel that
    /// end's last page as it read it, cut with zeros past the end. Told of a longer file (it
    /// grew by appends, here or on another host), the kernel sets the new size first and
    /// drops its pages after: a reader reading in between (`tail -f`, a poller at the end)
    /// reads those zeros where the next bytes are. So that page goes first, from a thread of
    /// its own (the kernel waits for a read of it under way), and the attributes are sent
    /// after. Dropping pages makes the kernel discard attributes that a request under way
    /// brings (this reply, too: the process asking gets them, the kernel asks once more), so
    /// the size shown is remembered and it is done once per growth, not at every `stat`.
    /// `None` where no reader reads the file through the page cache, where the size grows
    /// from a page boundary, or does not grow.
    fn showing(&self, ino: Ino, size: u64) -> Option<u64> {
        const PAGE: u64 = 4096;
        let mut opens = lock(&self.opens);
        let state = opens.get_mut(&ino).filter(|s| s.cached_readers > 0)?;
        let before = state.shown.replace(size)?;
        (size > before && before % PAGE != 0).then_some(before / PAGE * PAGE)
    }

    /// Calls `reply`, which shows the kernel the attributes `shown` (inode, size) of files, once
    /// it dropped the pages it must drop before it learns them (see [`Fs::showing`]): at once
    /// where none. Only for replies the kernel waits for holding no directory's lock (`getattr`):
    /// a lookup's reply held back here once waited behind an entry's invalidation, which waited
    /// for the lookup's own directory lock, and the mount hung.
    pub fn show_then(&self, shown: &[(Ino, u64)], reply: Box<dyn FnOnce() + Send>) {
        let pages: Vec<_> = shown
            .iter()
            .filter_map(|&(ino, size)| Some((ino, self.showing(ino, size)?)))
            .collect();
        match self.kernel.get() {
            Some(kernel) if !pages.is_empty() => kernel.data_changed_then(pages, reply),
            _ => reply(),
        }
    }

    /// The open handles of `ino`.
    fn handles_of(&self, ino: Ino) -> Vec<Arc<Mutex<FileHandle>>> {
        let fhs = lock(&self.opens)
            .get(&ino)
            .map(|s| s.handles.clone())
            .unwrap_or_default();
        fhs.into_iter()
            .filter_map(|fh| self.file(fh).ok())
            .collect()
    }

    /// [`Fs::getattr`] without the attributes held for commits.
    fn getattr_unheld(&self, ino: Ino, fh: Option<u64>) -> FsResult<Attr> {
        let (handles, cached_readers) = match lock(&self.opens).get(&ino) {
            Some(state) => (state.handles.clone(), state.cached_readers),
            None => (Vec::new(), 0),
        };
        let handles = match fh {
            Some(fh) => vec![fh],
            None => handles,
        };
        let path = read_lock(&self.table).path(ino);
        let mut fallback = None;
        for fh in handles {
            let Ok(handle) = self.file(fh) else { continue };
            let h = lock(&handle);
            if h.ino != ino {
                continue;
            }
            if cached_readers == 0
                && let Some(mut meta) = h.pending_meta()?
            {
                // A `chmod`/`chown` since the handle opened went to the committed file, and
                // its names are the committed file's (the working copy has none of its own:
                // a link count of 0 makes the kernel refuse `link()` with `ENOENT`).
                match path.as_ref().map(|p| self.store.stat(p)) {
                    Some(Ok(now)) => {
                        (meta.perm, meta.uid, meta.gid, meta.nlink) =
                            (now.perm, now.uid, now.gid, now.nlink)
                    }
                    Some(Err(_)) => {}
                    None => meta.nlink = 0, // unlinked while open
                }
                return Ok(Attr::new(ino, &meta));
            }
            if path.is_none() && fallback.is_none() {
                fallback = Some(h.base().clone());
            }
        }
        // No name left: only its open handles (or, for a directory, a process in it) keep it.
        let unlinked = |meta: &crate::store::Meta| {
            let mut attr = Attr::new(ino, meta);
            attr.nlink = 0;
            attr
        };
        match (path, fallback) {
            (Some(path), _) => {
                self.allow_traverse("stat", &path)?;
                Ok(Attr::new(ino, &self.store.stat(&path)?))
            }
            (None, Some(content)) => Ok(unlinked(content.meta())),
            (None, None) => match read_lock(&self.table).removed_dir(ino) {
                Some(meta) => Ok(unlinked(meta)),
                None => Err(Errno::ENOENT),
            },
        }
    }

    pub fn setattr(&self, ino: Ino, fh: Option<u64>, changes: &AttrChanges) -> FsResult<Attr> {
        if let Some(path) = read_lock(&self.table).path(ino) {
            self.allow("setattr", &path, Access::Write)?;
        }
        if let Some(size) = changes.size {
            self.truncate(ino, fh, size, changes.by)?;
        }
        let mut attr = changes.attr.clone();
        if changes.drop_set_ids
            && attr.perm.is_none()
            && let Some(perm) = self.perm_without_set_ids(ino)?
        {
            attr.perm = Some(perm);
        }
        let attr = &attr;
        let any = attr.perm.is_some()
            || attr.uid.is_some()
            || attr.gid.is_some()
            || attr.atime.is_some()
            || attr.mtime.is_some();
        if any && self.hold_for_commit(ino, attr) {
            return self.getattr(ino, fh);
        }
        if any {
            let (path, _claim) = self.claim_path(ino).ok_or(Errno::ENOENT)?;
            self.store.set_attr(&path, attr)?;
            self.publish(Changed::attributes(&path));
        }
        if attr.atime.is_some() || attr.mtime.is_some() {
            // Writers with uncommitted changes set them again after their commit.
            for handle in self.handles_of(ino) {
                let mut h = lock(&handle);
                if h.dirty() {
                    h.keep_times(attr.atime, attr.mtime);
                }
            }
        }
        self.getattr(ino, fh)
    }

    /// Holds `attr` for the commit of the one handle of `ino` with uncommitted changes, where
    /// the store takes attributes with commits (`Capabilities::attrs_at_commit`): `tar -x` and
    /// `cp -a` set owner, mode and times after writing each file, which would otherwise cost
    /// an object store a copy of the object onto itself each. Whether it did; not with two
    /// such handles (which commits last is not known).
    fn hold_for_commit(&self, ino: Ino, attr: &SetAttr) -> bool {
        if !self.store.capabilities().attrs_at_commit {
            return false;
        }
        let mut writer = None;
        for handle in self.handles_of(ino) {
            let h = lock(&handle);
            if h.ino == ino && h.dirty() {
                if writer.is_some() {
                    return false;
                }
                drop(h);
                writer = Some(handle);
            }
        }
        let Some(handle) = writer else {
            return false;
        };
        let mut h = lock(&handle);
        // (Committed meanwhile: set at once.)
        if !h.dirty() {
            return false;
        }
        h.hold_attrs(attr);
        true
    }

    /// The mount clears set-IDs at writes, truncates and chowns itself (`drop_set_ids`), as the
    /// kernel then leaves it to: appenders may then write with direct I/O (see `open_path`).
    pub fn clears_set_ids(&self) {
        self.clears_set_ids
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Clears the set-user-ID bit of the file `ino`, and its set-group-ID bit if it is group
    /// executable, as a local filesystem does when an unprivileged process writes or truncates
    /// it (the kernel leaves that to the mount, see `fuse.rs`: otherwise it would ask for
    /// `security.capability` before every write).
    pub fn drop_set_ids(&self, ino: Ino) -> FsResult<()> {
        let mut held = false;
        for handle in self.handles_of(ino) {
            let mut h = lock(&handle);
            held |= h.ino == ino && h.drop_held_set_ids();
        }
        if held && let Some(kernel) = self.kernel.get() {
            kernel.attributes_changed(ino);
        }
        let Some(perm) = self.perm_without_set_ids(ino)? else {
            return Ok(());
        };
        let (path, _claim) = self.claim_path(ino).ok_or(Errno::ENOENT)?;
        let attr = SetAttr {
            perm: Some(perm),
            ..SetAttr::default()
        };
        self.store.set_attr(&path, &attr)?;
        self.publish(Changed::attributes(&path));
        if let Some(kernel) = self.kernel.get() {
            kernel.attributes_changed(ino);
        }
        Ok(())
    }

    /// The mode of `ino` without its set-IDs, if that differs from its mode. Not for a
    /// directory, whose set-group-ID says what group its new entries get; anything else loses
    /// them as on a local disk (writes and truncates reach only regular files; a `chown` of a
    /// FIFO clears them too).
    fn perm_without_set_ids(&self, ino: Ino) -> FsResult<Option<u16>> {
        let path = self.path(ino)?;
        let meta = self.store.stat(&path)?;
        if meta.kind == Kind::Dir {
            return Ok(None);
        }
        let mut perm = meta.perm & !(libc::S_ISUID as u16);
        if perm & libc::S_IXGRP as u16 != 0 {
            perm &= !(libc::S_ISGID as u16);
        }
        Ok((perm != meta.perm).then_some(perm))
    }

    /// Truncation: through a writable handle it changes that handle's working copy; by path
    /// (`truncate(2)`) it is committed at once, atomically.
    pub(super) fn truncate(&self, ino: Ino, fh: Option<u64>, size: u64, by: Tid) -> FsResult<()> {
        if read_lock(&self.table).kind(ino) == Some(Kind::Dir) {
            return Err(Errno::EISDIR);
        }
        if let Some(q) = self.space.quota() {
            q.check_size(size)?;
        }
        if let Some(fh) = fh
            && let Ok(handle) = self.file(fh)
        {
            let mut h = lock(&handle);
            if h.writable() {
                self.sealed()?;
                h.users.add(by);
                // Growing past the byte limit is refused now, as a write would be, not at
                // the close.
                if let Some(q) = self.space.quota() {
                    self.check_growth(q, &h, size)?;
                }
                return h.truncate(self.store.as_ref(), size);
            }
        }
        let path = self.path(ino)?;
        let committed = self.store.open(&path)?;
        let mut temp = FileHandle::new(ino, Mode::Write, true, committed);
        temp.truncate(self.store.as_ref(), size)?;
        self.commit(&mut temp, false)
    }
}
