//! Names: looking them up, and making, removing and moving entries.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{Attr, Caller, Errno, Fs, FsResult, Ino, NAME_MAX, deny, lock, read_lock, write_lock};
use crate::events::Changed;
use crate::grant::Access;
use crate::space::claims::Span;
use crate::store::{FileId, Kind, Meta, RenameMode};

/// Entries looked at, at most, in search of another name of a file open here whose last
/// known name was removed (see [`Fs::keep_a_name`]).
const NAME_SEARCH: usize = 100_000;

impl Fs {
    /// Looks up `name` in `parent`; the kernel now holds one more reference to the result.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let path = self.child_path(parent, name)?;
        if !self.shows(path.parent().unwrap_or(Path::new("")), name) {
            return Err(deny("lookup", &path, &"outside the grant"));
        }
        match self.store.stat(&path) {
            Ok(meta) => Ok(self.remember(parent, name, &meta)),
            Err(e) => {
                if e.raw_os_error() == libc::ENOENT {
                    write_lock(&self.table).detach(parent, name);
                }
                Err(e.into())
            }
        }
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: Ino, n: u64) {
        let gone = {
            let mut table = write_lock(&self.table);
            table.forget(ino, n);
            table.kind(ino).is_none()
        };
        // The kernel no longer knows the inode, so its cache bookkeeping can go too.
        if gone {
            let mut opens = lock(&self.opens);
            if opens.get(&ino).is_some_and(|s| s.handles.is_empty()) {
                opens.remove(&ino);
            }
        }
    }

    pub fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let path = self.path(ino)?;
        self.allow("readlink", &path, Access::Read)?;
        let target = self.store.readlink(&path)?;
        self.allow_link_target("readlink", &path, &target)?;
        Ok(target.into_os_string().into_encoded_bytes())
    }

    /// `mknod`: regular files only; FIFOs, sockets and devices have no place in a file store.
    pub fn mknod(&self, parent: Ino, name: &OsStr, mode: u32, caller: &Caller) -> FsResult<Attr> {
        let (path, _claim) = self.claim_child(parent, name)?;
        self.allow("mknod", &path, Access::Write)?;
        // Device nodes are refused: a space is data, and mounts are `nodev` anyway.
        let kind = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            _ => return Err(Errno::EPERM),
        };
        let (perm, owner) = self.new_entry(&path, kind, (mode & 0o7777) as u16, caller)?;
        let meta = self.creating(|| {
            Ok(match kind {
                Kind::File => self.store.create(&path, perm, owner, true)?,
                _ => self.store.mknod(&path, kind, perm, owner)?,
            })
        })?;
        self.publish(Changed::file(&path, meta.size));
        Ok(self.remember(parent, name, &meta))
    }

    pub fn mkdir(&self, parent: Ino, name: &OsStr, mode: u32, caller: &Caller) -> FsResult<Attr> {
        let (path, _claim) = self.claim_child(parent, name)?;
        self.allow("mkdir", &path, Access::Write)?;
        let (perm, owner) = self.new_entry(&path, Kind::Dir, (mode & 0o7777) as u16, caller)?;
        let meta = self.creating(|| Ok(self.store.mkdir(&path, perm, owner)?))?;
        self.publish(Changed::folder_created(&path));
        Ok(self.remember(parent, name, &meta))
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &OsStr,
        target: &Path,
        caller: &Caller,
    ) -> FsResult<Attr> {
        let (path, _claim) = self.claim_child(parent, name)?;
        self.allow("symlink", &path, Access::Write)?;
        if target.as_os_str().is_empty() || target.as_os_str().len() > libc::PATH_MAX as usize {
            return Err(Errno::EINVAL);
        }
        self.allow_link_target("symlink", &path, target)?;
        let (_, owner) = self.new_entry(&path, Kind::Symlink, 0o777, caller)?;
        let meta = self.creating(|| Ok(self.store.symlink(target, &path, owner)?))?;
        self.publish(Changed::file(&path, meta.size));
        Ok(self.remember(parent, name, &meta))
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr) -> FsResult<()> {
        let (path, _claim) = self.claim_child(parent, name)?;
        self.allow("unlink", &path, Access::Write)?;
        let meta = self.store.stat(&path)?;
        if meta.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        self.store.unlink(&path)?;
        let ino = {
            let mut table = write_lock(&self.table);
            let ino = table.child(parent, name);
            table.detach(parent, name);
            ino
        };
        if let Some(ino) = ino {
            self.links_dropped(ino, &meta);
            self.keep_a_name(ino, &path, &meta);
        }
        self.released(&meta);
        self.publish(Changed::file_deleted(&path));
        Ok(())
    }

    pub fn rmdir(&self, parent: Ino, name: &OsStr) -> FsResult<()> {
        let (path, _claim) = self.claim_child(parent, name)?;
        self.allow("rmdir", &path, Access::Write)?;
        // What it was, for a process still in it (`ls` there lists it empty, as on ext4).
        let before = self.store.stat(&path);
        self.store.rmdir(&path)?;
        write_lock(&self.table).detach_removed_dir(parent, name, before.ok());
        if let Some(q) = self.space.quota() {
            q.remove_entry(0);
        }
        self.publish(Changed::folder_deleted(&path));
        Ok(())
    }

    /// `rename`/`renameat2`: `flags` may hold `RENAME_NOREPLACE` or `RENAME_EXCHANGE`.
    pub fn rename(
        &self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let mode = match flags {
            0 => RenameMode::Replace,
            libc::RENAME_NOREPLACE => RenameMode::NoReplace,
            libc::RENAME_EXCHANGE => RenameMode::Exchange,
            _ => return Err(Errno::EINVAL),
        };
        let (from, to, claim) = loop {
            let from = self.child_path(parent, name)?;
            let to = self.child_path(new_parent, new_name)?;
            // Everything below both names moves: no change under either may run meanwhile.
            let claim = self.space.claim(&[(&from, Span::Tree), (&to, Span::Tree)]);
            let same = self.child_path(parent, name).as_ref() == Ok(&from)
                && self.child_path(new_parent, new_name).as_ref() == Ok(&to);
            if same {
                break (from, to, claim);
            }
        };
        self.allow("rename", &from, Access::Write)?;
        self.allow("rename to", &to, Access::Write)?;
        // Moving or replacing a directory that holds differently granted paths would carry
        // them somewhere else.
        for end in [&from, &to] {
            if self.options.grant.leads_to(end.as_os_str().as_bytes()) {
                return Err(deny("rename", end, &"it contains separately granted paths"));
            }
        }
        self.allow_links_moved("rename", &from, &to)?;
        if mode == RenameMode::Exchange {
            self.allow_links_moved("rename", &to, &from)?;
        }
        let replaced = match mode {
            RenameMode::Replace => self.store.stat(&to).ok(),
            _ => None,
        };
        if let Some(target) = replaced
            .as_ref()
            .filter(|t| t.nlink > 1 && t.file_id.is_some())
            && self.store.stat(&from)?.file_id == target.file_id
        {
            // Two names of one file: POSIX says rename does nothing.
            return Ok(());
        }
        self.store.rename(&from, &to, mode)?;
        if let Some(meta) = &replaced {
            self.released(meta);
        }
        let replaced_ino = {
            let mut table = write_lock(&self.table);
            let replaced_ino = table.child(new_parent, new_name);
            table.rename(
                parent,
                name,
                new_parent,
                new_name,
                mode == RenameMode::Exchange,
            );
            replaced_ino
        };
        // A file replaced while open here that has other names lives on under them.
        if let (Some(meta), Some(ino)) = (&replaced, replaced_ino) {
            self.links_dropped(ino, meta);
            self.keep_a_name(ino, &to, meta);
        }
        // Published before the names are let go: a commit to the old name by another mount
        // in between would otherwise reach the other mounts before they hear of the move.
        self.publish_all(&self.renamed(&from, &to, mode));
        drop(claim);
        Ok(())
    }

    /// A name of `ino`, a file that had other names (`meta`, from before), was removed here.
    /// The kernel lowers the link count it caches itself at an `unlink` (or a rename over the
    /// name), but it drops the raised count a `link()` answered with when a write to the file
    /// was changing its size at that moment: the count it caches can so reach 0, and the
    /// kernel then refuses `link()` of the file with `ENOENT`, without asking (a file linked,
    /// the link removed, while another process rewrites it). The file's other names are
    /// looked up again (by the notifier thread), which brings the count the store holds.
    fn links_dropped(&self, ino: Ino, meta: &Meta) {
        if meta.kind != Kind::File || meta.nlink <= 1 {
            return;
        }
        let Some(kernel) = self.kernel.get() else {
            return;
        };
        for (parent, name) in read_lock(&self.table).names(ino) {
            kernel.entry_changed(parent, &name);
        }
    }

    /// `ino` lost the last name this mount knew it by (unlinked here, or elsewhere) while open,
    /// and the file had other names (`meta`, from before): names this mount never looked up,
    /// or forgot with the inode (the kernel forgets the inodes it stops caching). The file
    /// lives on under them, and its open handles must go on committing to it, as writes to an
    /// inode do on a local disk, not be dropped as a removed file's are. So another name is
    /// looked for among those this mount may write, first beside the one removed, then
    /// through the space (directory by directory, until [`NAME_SEARCH`] entries were looked
    /// at); found, and asked about again (a listing is a moment old: the name may hold
    /// another file by now), the inode takes it. No lock is held while the store is asked,
    /// and the thread announces a long wait first (`store::wait`), so the mount's other
    /// requests are read by another thread meanwhile. Changes at the name after that reach
    /// the inode as any other change does (heard from elsewhere, or made here).
    pub(super) fn keep_a_name(&self, ino: Ino, removed: &Path, meta: &Meta) {
        let Some(id) = meta.file_id else {
            return;
        };
        if meta.kind != Kind::File || meta.nlink <= 1 {
            return;
        }
        let open = lock(&self.opens)
            .get(&ino)
            .is_some_and(|state| !state.handles.is_empty());
        if !open || read_lock(&self.table).path(ino).is_some() {
            return;
        }
        match self.search_name(id, removed.parent().unwrap_or(Path::new(""))) {
            Some(found) => write_lock(&self.table).adopt_name(ino, &found),
            None => log::warn!(
                "{}: removed while open, and no other name of the file was found that this \
                 mount may write: what its open descriptors write is dropped when they close",
                removed.display()
            ),
        }
    }

    /// A name of the file `id` (with several names) this mount may write: the directory
    /// `near` first, then the whole space, breadth first.
    fn search_name(&self, id: FileId, near: &Path) -> Option<PathBuf> {
        crate::store::wait::announce();
        let mut budget = NAME_SEARCH;
        let mut listed: HashSet<PathBuf> = HashSet::new();
        let mut queue = VecDeque::from([near.to_path_buf(), PathBuf::new()]);
        while let Some(dir) = queue.pop_front() {
            if !listed.insert(dir.clone()) {
                continue;
            }
            let Ok(entries) = self.store.list(&dir) else {
                continue;
            };
            for entry in entries {
                budget = budget.checked_sub(1)?;
                let path = dir.join(&entry.name);
                match entry.kind {
                    Kind::Dir => queue.push_back(path),
                    Kind::File => {
                        if !self.options.grant.is_full()
                            && self
                                .options
                                .grant
                                .check(path.as_os_str().as_bytes(), Access::Write)
                                .is_err()
                        {
                            continue;
                        }
                        let meta = match entry.meta {
                            Some(meta) => meta,
                            None => match self.store.stat(&path) {
                                Ok(meta) => meta,
                                Err(_) => continue,
                            },
                        };
                        // (Its last other name may have no other now.) Listed a moment ago: still
                        // the file?
                        if meta.file_id == Some(id)
                            && self
                                .store
                                .stat(&path)
                                .is_ok_and(|now| now.file_id == Some(id))
                        {
                            return Some(path);
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// Gives back the quota held by a removed (or replaced) entry.
    pub(super) fn released(&self, meta: &Meta) {
        if let Some(q) = self.space.quota() {
            q.remove_entry(if meta.kind == Kind::File {
                meta.size
            } else {
                0
            });
        }
    }

    /// A hard link `new_name` in `new_parent` to `ino`, where the store keeps them (else
    /// `EPERM`). Both names must be writable under the grant (`EACCES`), and governed by the
    /// same granted prefix: a link may not carry a file across the grant's boundaries
    /// (`EXDEV`, as across filesystems: tools copy instead). The new name joins `ino` (one
    /// inode for all names of a file).
    pub fn link(&self, ino: Ino, new_parent: Ino, new_name: &OsStr) -> FsResult<Attr> {
        let (from, to, claim) = loop {
            let from = self.path(ino)?;
            let to = self.child_path(new_parent, new_name)?;
            let claim = self
                .space
                .claim(&[(&from, Span::Entry), (&to, Span::Entry)]);
            let same = read_lock(&self.table).path(ino).as_ref() == Some(&from)
                && self.child_path(new_parent, new_name).as_ref() == Ok(&to);
            if same {
                break (from, to, claim);
            }
        };
        self.allow("link", &from, Access::Write)?;
        self.allow("link to", &to, Access::Write)?;
        if !self.store.capabilities().hard_links {
            return Err(Errno::EPERM);
        }
        let grant = &self.options.grant;
        if !grant.same_rule(from.as_os_str().as_bytes(), to.as_os_str().as_bytes()) {
            let _ = deny("link", &to, &"it would carry the file across the grant");
            return Err(Errno(libc::EXDEV));
        }
        // A hard link to a symlink is one more symlink, at `to`.
        self.allow_links_moved("link", &from, &to)?;
        let meta = self.creating(|| Ok(self.store.link(&from, &to)?))?;
        if let Some(q) = self.space.quota() {
            // Usage counts the bytes of every name, as a count of the space does: a new name
            // that takes it past the byte limit goes again (`EDQUOT`). (Its size comes from the
            // link itself: a `stat` of the source before it races a rewrite of the file.)
            let bytes = match meta.kind {
                Kind::File => meta.size,
                _ => 0,
            };
            if let Err(e) = q.resize(0, bytes) {
                if let Err(u) = self.store.unlink(&to) {
                    log::error!(
                        "{}: a hard link past the byte limit could not be removed again: {u}",
                        to.display()
                    );
                    return Err(e);
                }
                q.remove_entry(0);
                return Err(e);
            }
        }
        write_lock(&self.table).link(ino, new_parent, new_name, meta.file_id);
        // Another name: the file's link count changed too.
        self.publish_all(&[Changed::attributes(&from), Changed::file(&to, meta.size)]);
        // Not under the claim: what open handles show is read under their locks, and a commit
        // takes its claim under its handle's lock (the order is handle, then claim).
        drop(claim);
        Ok(self.as_open(Attr::new(ino, &meta)))
    }
}
