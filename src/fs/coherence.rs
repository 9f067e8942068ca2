//! Keeping the kernel's caches of this mount right when others change the space: another
//! mount of the same space in this process, the daemon itself (a session exported into a
//! room), or another roomfs process using the same data dir (through the space's change feed,
//! see [`crate::events`]). The space tells every mount but the one that made a change
//! ([`Space::changed`]); a mount then tells its kernel what it cached of the paths involved is
//! stale.
//!
//! Nothing here waits for the kernel: notifications are queued for the FUSE adapter's notifier
//! thread (see [`KernelCache`]), so this runs safely from another mount's request handler or
//! the feed's thread. A file open in this mount gets its attributes invalidated only: its
//! readers keep the version they opened, and its pages stay theirs.
//!
//! A move made elsewhere is applied to this mount's inode table when it knows the entry: the
//! inode keeps its identity under its new name, as for a move made here, so a file this mount
//! has open for writing is committed under the new name (also over a file that was there, or
//! into a directory this mount did not know, whose directories are then added to the table),
//! and the kernel, looking the names up again, finds the same inodes (and their cached
//! pages). An exchange of two entries it knows swaps them. What was under the new name and
//! is open here stays (it is the moved file, opened through its new name since the move);
//! then, and where the entry is unknown, both names are looked up again.
//!
//! A file this mount has open that was deleted, or replaced by a move, elsewhere is treated as
//! if the unlink or the rename were made here, from the moment the mount hears of it
//! ([`Fs::gone_elsewhere`]): the handles opened before commit nothing over what is there now
//! (`FileHandle::gone`), the inode leaves the name, readers read on. Likewise a directory
//! removed elsewhere leaves its name here, and a process in it lists it empty.
//!
//! [`Space::changed`]: crate::space::Space::changed

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::handle::FileHandle;
use super::{Fs, Ino, KernelCache, lock, read_lock, write_lock};
use crate::events::Changed;
use crate::space::{Made, SpaceWatcher};
use crate::store::{Kind, RenameMode};

impl SpaceWatcher for Fs {
    fn changed_elsewhere(&self, change: &Changed, made: Made) {
        let Some(kernel) = self.kernel.get() else {
            return;
        };
        let kernel = kernel.as_ref();
        match change {
            Changed::FileDeleted { path } => {
                self.gone_elsewhere(path);
                self.invalidate(kernel, path, false)
            }
            Changed::FolderDeleted { path } => {
                if let Some(ino) = self.dir_gone_elsewhere(path) {
                    // It has no links now.
                    kernel.attributes_changed(ino);
                }
                self.invalidate(kernel, path, false)
            }
            Changed::File { path, .. } | Changed::FolderCreated { path } => {
                self.invalidate(kernel, path, false)
            }
            Changed::Attributes { path } => self.invalidate(kernel, path, true),
            Changed::FileMoved { from, to, .. } => {
                self.gone_elsewhere(to);
                self.moved_elsewhere(kernel, from, to, false, made)
            }
            Changed::FolderMoved { from, to } => {
                self.moved_elsewhere(kernel, from, to, false, made)
            }
            Changed::Exchanged { a, b } => self.moved_elsewhere(kernel, a, b, true, made),
        }
    }
}

impl Fs {
    /// The file at `path` was deleted, or replaced by a move, elsewhere. If this mount has it
    /// open, it is as if the unlink or the rename over it were made here: its readers keep
    /// reading the version they opened, its writers' changes are not committed over what is
    /// there now (nor bring back what was deleted), and the name is looked up again.
    ///
    /// The kernel may have opened the inode again through the name it cached before hearing
    /// of the change, getting the version there now: those handles keep the name. So the
    /// handles opened before the change are marked gone (they commit nothing), and the inode
    /// leaves the name only when none was opened since. (A store may tell versions by their
    /// bytes — S3's ETags — so a handle on an older version with the same bytes counts as
    /// opened since: committing over the new version is then as if it had opened it.)
    fn gone_elsewhere(&self, path: &Path) {
        let Some(name) = path.file_name() else {
            return;
        };
        let Some((parent, Some(ino))) = read_lock(&self.table).resolve(path) else {
            return;
        };
        let handles = match lock(&self.opens).get(&ino) {
            Some(state) if !state.handles.is_empty() => state.handles.clone(),
            _ => return,
        };
        // A file made here whose creation is not committed yet (on a store that makes new
        // files at their first commit) is not what was removed elsewhere: nobody else has
        // seen it, so what they removed was there before it.
        if handles
            .iter()
            .any(|&fh| self.file(fh).is_ok_and(|h| lock(&h).creates))
        {
            return;
        }
        let now = match self.store.stat(path) {
            Ok(meta) => Some(meta.version),
            Err(e) if e.raw_os_error() == libc::ENOENT => None,
            Err(e) => {
                log::warn!(
                    "{}: changed elsewhere, and cannot be looked at now ({e}): the files open \
                     here keep its name",
                    path.display()
                );
                return;
            }
        };
        let mut opened_since = false;
        let mut linked = None;
        for fh in handles {
            let Ok(handle) = self.file(fh) else { continue };
            let mut h = lock(&handle);
            if Some(&h.base().meta().version) == now.as_ref() {
                opened_since = true;
            } else if h.base().meta().nlink <= 1 {
                h.gone = true;
            } else {
                // A file with other names lives on under them: its changes go there, as for
                // an unlink here (see `keep_a_name`).
                linked = Some(h.base().meta().clone());
            }
        }
        if opened_since {
            return;
        }
        {
            let mut table = write_lock(&self.table);
            // Unless a change made here moved it meanwhile.
            if table.resolve(path) != Some((parent, Some(ino))) {
                return;
            }
            table.detach(parent, name);
        }
        if let Some(meta) = linked {
            self.keep_a_name(ino, path, &meta);
        }
    }

    /// The directory at `path` was removed elsewhere. If the kernel knows it (a process here
    /// may be in it), it is as if `rmdir` were made here: its inode leaves the name and, while
    /// the kernel knows it, answers with its last known attributes and no links, and lists
    /// nothing — unless a directory is there again (made anew before this mount heard).
    /// Returns the inode it detached.
    fn dir_gone_elsewhere(&self, path: &Path) -> Option<Ino> {
        let name = path.file_name()?;
        let Some((parent, Some(ino))) = read_lock(&self.table).resolve(path) else {
            return None;
        };
        match self.store.stat(path) {
            Err(e) if e.raw_os_error() == libc::ENOENT => {}
            _ => return None, // there again (the kernel looks it up again), or cannot tell
        }
        let mut table = write_lock(&self.table);
        // Unless a change made here moved it meanwhile.
        if table.resolve(path) != Some((parent, Some(ino))) {
            return None;
        }
        table.detach_removed_dir(parent, name, None);
        Some(ino)
    }

    /// Queues the notifications for a change at `path`: of its attributes only, or of
    /// everything the kernel cached of it.
    fn invalidate(&self, kernel: &dyn KernelCache, path: &Path, attributes_only: bool) {
        let Some((parent, ino)) = read_lock(&self.table).resolve(path) else {
            return; // the kernel knows nothing on the way to it
        };
        if attributes_only {
            if let Some(ino) = ino {
                kernel.attributes_changed(ino);
            }
            return;
        }
        kernel.attributes_changed(parent);
        if let Some(name) = path.file_name() {
            kernel.entry_changed(parent, name);
        }
        if let Some(ino) = ino {
            self.content_changed(kernel, ino);
        }
    }

    /// The content of `ino` changed elsewhere: its attributes if it is open here (its pages
    /// are its readers'), else everything cached of it.
    fn content_changed(&self, kernel: &dyn KernelCache, ino: Ino) {
        let open = {
            let mut opens = lock(&self.opens);
            match opens.get_mut(&ino) {
                Some(state) => {
                    // Its cached pages are of another version now.
                    state.cached_version = None;
                    !state.handles.is_empty()
                }
                None => false,
            }
        };
        if open {
            kernel.attributes_changed(ino);
        } else {
            kernel.data_changed(ino);
        }
    }

    /// `from` moved to `to` (or, with `exchange`, the two swapped) elsewhere.
    fn moved_elsewhere(
        &self,
        kernel: &dyn KernelCache,
        from: &Path,
        to: &Path,
        exchange: bool,
        made: Made,
    ) {
        let (Some(from_name), Some(to_name)) = (from.file_name(), to.file_name()) else {
            return; // the root does not move
        };
        let entry = |at: Option<(Ino, Option<Ino>)>, name: &OsStr| {
            if let Some((parent, ino)) = at {
                kernel.attributes_changed(parent);
                kernel.entry_changed(parent, name);
                if let Some(ino) = ino {
                    // Its ctime changed (and, for what was replaced, whether it exists).
                    kernel.attributes_changed(ino);
                }
            }
        };
        // Heard late (from another process or host: a move in this process is told before
        // anything here touches the names again), the move may be older than what this mount
        // knows at `from`: a file made there since (here, or elsewhere), as a lock file is
        // taken again once the last holder renamed it into place (`t.lock` moved to `t`, then
        // made anew). Moving that inode to `to` would commit the new file there. So the inode
        // at `from` follows such a move only while the name is free in the store (and no
        // handle here is still creating its file), or when it is the moved file held open
        // here (the file at `to` now); otherwise both names are just looked up again. The
        // inodes of an exchange swap unless one of them is held open here as a file that is
        // not the one now at the other name (made at its name since the exchange).
        let follows = |from, to| match exchange {
            true => self.exchanges_along(from, to),
            false => self.moves_along(from, to),
        };
        if made == Made::Elsewhere && !follows(from, to) {
            let table = read_lock(&self.table);
            let (src, dst) = (table.resolve(from), table.resolve(to));
            drop(table);
            entry(src, from_name);
            entry(dst, to_name);
            return;
        }
        // What was under the new name leaves it, as for a rename over it made here, unless
        // this mount has it open: then (`gone_elsewhere` left it there) it is the moved file
        // itself, opened through the new name since the move (a look-up races with hearing of
        // it), and the kernel just looks both names up again. (Looked at before the table is
        // locked for the move, and checked again under it: a handle opened between the two
        // looks keeps the name too.)
        let open = |ino: Ino| {
            lock(&self.opens)
                .get(&ino)
                .is_some_and(|state| !state.handles.is_empty())
        };
        // A file it has open for writing that went into a directory it does not know (nor
        // the kernel): the directories are added to the table, so that its commit goes there.
        let (replaceable, into_unknown) = {
            let table = read_lock(&self.table);
            match (table.resolve(from), table.resolve(to)) {
                (Some((_, Some(s))), Some((_, Some(d)))) if !exchange && d != s => {
                    drop(table);
                    ((!open(d)).then_some(d), false)
                }
                (Some((_, Some(s))), None) if !exchange => {
                    drop(table);
                    (None, open(s))
                }
                _ => (None, false),
            }
        };
        let (src, dst) = {
            let mut table = write_lock(&self.table);
            let (src, dst) = (table.resolve(from), table.resolve(to));
            match (src, dst) {
                // The entry and the directory it went to are known: the inode follows its
                // name, as for a move made here (so a file this mount writes is committed
                // under its new name), replacing what was there.
                (Some((src_parent, Some(_))), Some((dst_parent, None))) if !exchange => {
                    table.rename(src_parent, from_name, dst_parent, to_name, false);
                }
                (Some((src_parent, Some(_))), Some((dst_parent, Some(d))))
                    if !exchange && replaceable == Some(d) =>
                {
                    table.rename(src_parent, from_name, dst_parent, to_name, false);
                }
                (Some((src_parent, Some(_))), None) if into_unknown => {
                    let dst_parent = table.dirs_for_move(to.parent().unwrap_or(Path::new("")));
                    table.rename(src_parent, from_name, dst_parent, to_name, false);
                }
                // Both names known: they swap, as for an exchange made here.
                (Some((src_parent, Some(_))), Some((dst_parent, Some(_)))) if exchange => {
                    table.rename(src_parent, from_name, dst_parent, to_name, true);
                }
                _ => {}
            }
            (src, dst)
        };
        entry(src, from_name);
        entry(dst, to_name);
    }

    /// The handles open on `ino`.
    fn open_handles(&self, ino: Ino) -> Vec<Arc<Mutex<FileHandle>>> {
        lock(&self.opens)
            .get(&ino)
            .map(|state| state.handles.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|fh| self.file(fh).ok())
            .collect()
    }

    /// Whether the inodes this mount knows at `a` and `b` may swap for an exchange of the two
    /// heard from elsewhere (see `moved_elsewhere`): none of them is held open here as another
    /// file than the one now at the other name.
    fn exchanges_along(&self, a: &Path, b: &Path) -> bool {
        for (from, to) in [(a, b), (b, a)] {
            let Some((_, Some(ino))) = read_lock(&self.table).resolve(from) else {
                continue;
            };
            let handles = self.open_handles(ino);
            if handles.is_empty() {
                continue;
            }
            if handles.iter().any(|h| lock(h).creates) {
                return false;
            }
            let Ok(there) = self.store.stat(to) else {
                return false;
            };
            if !handles
                .iter()
                .any(|h| same_file(lock(h).base().meta(), &there))
            {
                return false;
            }
        }
        true
    }

    /// Whether what this mount knows at `from` is what moved to `to` elsewhere (see
    /// `moved_elsewhere`): `from` is free in the store, or the inode there is held open here
    /// as the file now at `to`.
    fn moves_along(&self, from: &Path, to: &Path) -> bool {
        // Nothing known at `from`: nothing to carry along (and nothing to ask the store).
        let Some((_, Some(ino))) = read_lock(&self.table).resolve(from) else {
            return true;
        };
        let handles = self.open_handles(ino);
        // A file made here whose creation is not committed yet (on a store that makes new
        // files at their first commit, the store does not show it: its name looks free) is
        // not what another mount moved.
        if handles.iter().any(|h| lock(h).creates) {
            return false;
        }
        match self.store.stat(from) {
            Err(e) if e.raw_os_error() == libc::ENOENT => return true,
            Err(_) => return false, // cannot tell: looked up again
            Ok(_) if handles.is_empty() => return false,
            Ok(_) => {}
        }
        let Ok(moved) = self.store.stat(to) else {
            return false;
        };
        handles
            .iter()
            .any(|h| same_file(lock(h).base().meta(), &moved))
    }

    /// The changes a rename of `from` to `to` made, for the space to announce: a move (of a
    /// file or a folder), or for an exchange, the swap (for caches) and an update of each
    /// path (for watchers).
    pub(super) fn renamed(&self, from: &Path, to: &Path, mode: RenameMode) -> Vec<Changed> {
        // What is at each name now (a change racing right after this rename may show through;
        // an entry gone already is announced as a file): whether a directory, and the size.
        let at = |path: &Path| match self.store.stat(path) {
            Ok(m) => (m.kind == Kind::Dir, m.size),
            Err(_) => (false, 0),
        };
        let updated = |path: &Path| match at(path) {
            (true, _) => Changed::folder_created(path),
            (false, size) => Changed::file(path, size),
        };
        let (from, to) = (from.to_path_buf(), to.to_path_buf());
        match mode {
            RenameMode::Exchange => {
                let (at_from, at_to) = (updated(&from), updated(&to));
                vec![Changed::Exchanged { a: from, b: to }, at_from, at_to]
            }
            RenameMode::Replace | RenameMode::NoReplace => match at(&to) {
                (true, _) => vec![Changed::FolderMoved { from, to }],
                (false, size) => vec![Changed::FileMoved { from, to, size }],
            },
        }
    }
}

/// Whether `held` and `now` are the same file: by its identity where the store has one (a
/// rename changes the version of a local file, its ctime), else by its version (S3's ETag).
fn same_file(held: &crate::store::Meta, now: &crate::store::Meta) -> bool {
    match (held.file_id, now.file_id) {
        (Some(a), Some(b)) => a == b,
        _ => held.version == now.version,
    }
}
