//! How the local store commits: the choreography behind [`Store::commit`](crate::store::Store).
//!
//! - A file with several names (hard links) is rewritten in place from the working copy,
//!   with a redo marker like a patch's, so every name keeps showing the one file (readers that
//!   have it open read it as it is rewritten, as on a local disk).
//! - A whole working copy is swapped in by exchanging names (`renameat2(RENAME_EXCHANGE)`):
//!   readers of the old version keep its file, the staging name then holds the old version,
//!   which is removed (in the background when large). Where the filesystem cannot exchange,
//!   the copy is renamed over the file.
//! - A large working copy holding only the writer's ranges is patched into the file in place
//!   when nobody else reads, appends to or patches it and it still is the writer's version
//!   (see `patch`); otherwise the rest of the base is copied in and the copy swapped in whole.
//!   So is a copy with a punched hole: a patch would write the hole as zeros (not freeing its
//!   space), and its redo after a crash could not tell it from ranges left alone.
//! - Appends are added to the file in place under its `flock` with a crash marker (none for
//!   bytes within one page; see `append`), onto the file as it is now: when others appended
//!   since the writer's base, the bytes follow theirs (`O_APPEND`); bytes a plain writer added
//!   at the end of its base (a new file written once) go onto the base only, and when the file
//!   moved on, the base and the bytes replace it whole. While another append is under way (in
//!   this process or another), the commit retries for up to 10 ms, then appends through a
//!   working copy of the current version (which can lose a racing append of another process).
//!   Durable appends go in place too, synced (see `append`). Within this process, append commits to
//!   one file take turns.

use std::any::Any;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::append::{AppendMark, append_in_place};
use super::at::At;
use super::content::{LocalContent, LocalCopy, fstat};
use super::patch::{PATCH_MIN, Patch, PatchMark, RewriteMark, patch_in_place, rewrite_in_place};
use super::{APPEND_TURNS, LocalStore, chown_file, copy_xattrs, renameat2};
use crate::store::{
    Change, CommitRequest, Committed, Content, StoreError, StoreResult, WorkingCopy, copy_range,
};

/// How often a commit of appends retries in place while other appenders get in its way, and
/// the pause between tries (at most 10 ms in all; then it commits through a working copy).
const APPEND_RETRIES: u32 = 50;
const APPEND_RETRY_PAUSE: Duration = Duration::from_micros(200);

/// `copy` as a working copy of this store.
fn own(copy: &Arc<dyn WorkingCopy>) -> StoreResult<&LocalCopy> {
    (copy.as_ref() as &dyn Any)
        .downcast_ref::<LocalCopy>()
        .ok_or_else(|| {
            StoreError::failed(
                libc::EXDEV,
                "commit",
                io::Error::other("the working copy was made by another store"),
            )
        })
}

/// Checks that what an exchange put at `staged` (what was at the target) is a regular file.
fn check_replaced(staged: &At) -> io::Result<()> {
    let st = staged.stat()?;
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        return Ok(());
    }
    Err(io::Error::from_raw_os_error(libc::EISDIR))
}

/// `content` as content of this store.
fn local(content: &Arc<dyn Content>) -> Option<&LocalContent> {
    (content.as_ref() as &dyn Any).downcast_ref::<LocalContent>()
}

impl LocalStore {
    pub(super) fn commit_change(&self, req: CommitRequest<'_>) -> StoreResult<Committed> {
        match req.change {
            Change::Whole(copy) => self.commit_whole(req.path, own(copy)?, req.durable, false),
            Change::Ranges {
                copy,
                written,
                complete,
            } => {
                let copy = own(copy)?;
                if let Some(done) =
                    self.try_patch(req.base, req.path, copy, written, req.durable)?
                {
                    return Ok(done);
                }
                complete()?;
                self.commit_whole(req.path, copy, req.durable, false)
            }
            Change::Append { tail, follow } => {
                self.commit_append(req.path, req.base, tail, follow, req.durable)
            }
        }
    }

    /// Puts the working copy at `staged` in place of the file at `target`: by exchanging the
    /// two names (true: `staged` then names the old version, to be removed), or where the
    /// filesystem cannot, by renaming over it (false).
    ///
    /// Unlike a rename over an existing file, an exchange does not make ext4 force the new
    /// data to disk (auto_da_alloc), which costs ~0.4 ms per commit; durability is `fsync`'s job.
    pub(super) fn swap_in(&self, staged: &At, target: &At) -> io::Result<bool> {
        use std::sync::atomic::Ordering;
        if !self.no_exchange.load(Ordering::Relaxed) {
            match renameat2(staged, target, libc::RENAME_EXCHANGE) {
                Ok(()) => {
                    if let Err(e) = check_replaced(staged) {
                        // Put back what was there; the working copy stays the caller's.
                        renameat2(staged, target, libc::RENAME_EXCHANGE).map_err(|back| {
                            log::error!(
                                "swapped out a non-file while committing ({e}) and could not \
                                 put it back ({back}): it is in the staging area"
                            );
                            back
                        })?;
                        return Err(e);
                    }
                    return Ok(true);
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    if !self.no_exchange.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "the data dir's filesystem cannot exchange names ({e}): commits \
                             rename over the previous version instead"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        renameat2(staged, target, 0).map(|()| false)
    }

    /// Swaps the working copy `copy` in at `path`, keeping the mode and owner of the file it
    /// replaces. What the exchange swapped out must be a regular file: the target was checked
    /// before, but something else (a directory) may have been renamed there since, by a
    /// process outside this one's claims; it is then put back and the commit fails, since the
    /// replaced version is removed from the staging area afterwards.
    fn commit_whole(
        &self,
        path: &Path,
        copy: &LocalCopy,
        durable: bool,
        followed: bool,
    ) -> StoreResult<Committed> {
        let target = self.at(path)?;
        let current = target.stat()?;
        if current.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(StoreError::errno(libc::EISDIR));
        }
        if current.st_nlink > 1 {
            return self.commit_linked(&target, path, copy, durable, followed);
        }
        // The new content takes over the identity (mode, owner) of the file it replaces.
        use std::os::unix::fs::PermissionsExt;
        let perm = std::fs::Permissions::from_mode(current.st_mode & 0o7777);
        copy.file.set_permissions(perm)?;
        if nix::unistd::geteuid().is_root() {
            chown_file(&copy.file, Some((current.st_uid, current.st_gid)))?;
        }
        copy_xattrs(&target, &copy.file)?;
        if durable {
            copy.file.sync_all()?;
        }
        let before = fstat(&copy.file)?;
        let staged = self.staging.dir().at(Path::new(&copy.name))?;
        let exchanged = self.swap_in(&staged, &target)?;
        copy.consume();
        if exchanged {
            // The staging name now names the replaced version.
            self.staging
                .remove_replaced(copy.name.clone(), current.st_size as u64);
        }
        if durable && let Err(e) = self.sync_dir_of(path) {
            log::error!(
                "committed {} but could not sync its directory: {e}",
                path.display()
            );
        }
        // Read after the exchange: it changed the ctime, part of the version readers compare.
        let st = fstat(&copy.file).unwrap_or(before);
        let file = copy.file.try_clone()?;
        Ok(Committed {
            content: self.content(file, st),
            replaced_size: current.st_size as u64,
            followed,
        })
    }

    /// Commits `copy` into a file with several names (hard links, or an in-place change's
    /// marker): rewritten in place, so that every name keeps showing the one file.
    fn commit_linked(
        &self,
        target: &At,
        path: &Path,
        copy: &LocalCopy,
        durable: bool,
        followed: bool,
    ) -> StoreResult<Committed> {
        let replaced_size = target.stat()?.st_size as u64;
        let marker = |mark: &RewriteMark| self.staging.new_name(|n| mark.name(n));
        let file = rewrite_in_place(
            target,
            &copy.file,
            &copy.name,
            self.staging.dir(),
            marker,
            durable,
        )?;
        if durable && let Err(e) = self.sync_dir_of(path) {
            log::error!(
                "committed {} but could not sync its directory: {e}",
                path.display()
            );
        }
        let st = fstat(&file)?;
        Ok(Committed {
            content: self.content(file, st),
            replaced_size,
            followed,
        })
    }

    /// Patches the writer's ranges of `copy` into the file in place, if it still is `base`
    /// and nobody else has it; `None` when that is not possible now.
    fn try_patch(
        &self,
        base: &Arc<dyn Content>,
        path: &Path,
        copy: &LocalCopy,
        written: &[(u64, u64)],
        durable: bool,
    ) -> StoreResult<Option<Committed>> {
        use std::sync::atomic::Ordering;
        let Some(base) = local(base) else {
            return Ok(None);
        };
        if self.no_patches.load(Ordering::Relaxed)
            || base.meta.size < PATCH_MIN
            || copy.punched.load(Ordering::Relaxed)
        {
            return Ok(None);
        }
        let to = copy.file.metadata()?.len();
        let patch = Patch {
            staged: &copy.file,
            staged_name: &copy.name,
            from: base.meta.size,
            to,
            written,
            durable,
        };
        let marker = |mark: &PatchMark| self.staging.new_name(|n| mark.name(n));
        let patched = patch_in_place(
            &self.at(path)?,
            &base.file,
            base.ident(),
            &patch,
            self.staging.dir(),
            marker,
        )?;
        let Some(file) = patched else {
            return Ok(None);
        };
        let st = fstat(&file)?;
        Ok(Some(Committed {
            content: self.content(file, st),
            replaced_size: base.meta.size,
            followed: false,
        }))
    }

    /// Commits appended bytes (see the module docs); without `follow`, onto the base only.
    fn commit_append(
        &self,
        path: &Path,
        base: &Arc<dyn Content>,
        tail: &[u8],
        follow: bool,
        durable: bool,
    ) -> StoreResult<Committed> {
        let ino = local(base).map_or(0, |b| b.ident().1);
        let _turn = self.append_turns[ino as usize % APPEND_TURNS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut current = base.clone();
        let mut followed = false;
        let mut tries = 0;
        for attempt in 1..=APPEND_RETRIES {
            tries = attempt;
            if let Some(content) = self.append_here(&current, path, tail, durable)? {
                return Ok(Committed {
                    content,
                    replaced_size: current.meta().size,
                    followed,
                });
            }
            let moved = if follow {
                self.follow(path, &mut current)?
            } else if self.moved_on(path, &current)? {
                break; // the base is no longer the file: it is replaced whole
            } else {
                false
            };
            followed |= moved;
            if attempt == APPEND_RETRIES {
                break;
            }
            if !moved {
                if !self.others_appending(path, &current)? {
                    break; // not possible in place, and nobody in the way
                }
                std::thread::sleep(APPEND_RETRY_PAUSE);
            }
        }
        log::debug!(
            "appends to {} committed through a working copy after {tries} tries (durable: \
             {durable}, follow: {follow})",
            path.display()
        );
        let size = current.meta().size;
        let copy = LocalCopy::new(self.staging.clone())?;
        copy_range(current.as_ref(), &copy, 0, size)?;
        copy.write_at(tail, size)?;
        self.commit_whole(path, &copy, durable, followed)
    }

    /// Whether the file at `path` is another version than `current`.
    fn moved_on(&self, path: &Path, current: &Arc<dyn Content>) -> StoreResult<bool> {
        let now = super::meta_of(&self.at(path)?.stat()?);
        Ok(now.version != current.meta().version)
    }

    /// Adds `tail` to the file at `path` in place, if it still is `base` and nobody else is
    /// appending to it; `None` when not possible now.
    fn append_here(
        &self,
        base: &Arc<dyn Content>,
        path: &Path,
        tail: &[u8],
        durable: bool,
    ) -> StoreResult<Option<Arc<dyn Content>>> {
        let Some(base) = local(base) else {
            return Ok(None);
        };
        let was = base.meta.size;
        if was < PATCH_MIN && was + tail.len() as u64 >= PATCH_MIN {
            // Its readers hold no read lock (too small to be patched): keep it below the size
            // where patches begin, so it never becomes patchable under them.
            return Ok(None);
        }
        let marker = |mark: &AppendMark| self.staging.new_name(|n| mark.name(n));
        let appended = append_in_place(
            &self.at(path)?,
            base.ident(),
            was,
            tail,
            self.staging.dir(),
            marker,
            durable,
        )?;
        Ok(match appended {
            Some(file) => {
                let st = fstat(&file)?;
                Some(self.content(file, st))
            }
            None => None,
        })
    }

    /// Moves `current` on to the file at `path` as it is now, if that is another version
    /// (others committed since); true if it moved.
    fn follow(&self, path: &Path, current: &mut Arc<dyn Content>) -> StoreResult<bool> {
        let now = super::meta_of(&self.at(path)?.stat()?);
        if now.kind != crate::store::Kind::File || now.version == current.meta().version {
            return Ok(false);
        }
        *current = self.open_content(path)?;
        Ok(true)
    }

    /// Whether an append to the file at `path` by someone else is under way or just went in
    /// (its crash marker is a second link, it holds the file's lock, or the file moved on):
    /// an in-place append is worth retrying.
    fn others_appending(&self, path: &Path, current: &Arc<dyn Content>) -> StoreResult<bool> {
        let now = super::meta_of(&self.at(path)?.stat()?);
        Ok(now.version != current.meta().version || now.nlink > 1 || self.changing(path))
    }

    /// Whether an in-place change of the file at `path` (an append or a patch) is under way
    /// right now, by this process or another.
    fn changing(&self, path: &Path) -> bool {
        // Appenders and patchers hold the file's lock exclusively. Others hold it shared for
        // moments (a reader waiting out an append, another appender looking, as here), and
        // readers of large (patchable) files for as long as they have it open: so below that
        // size any lock means a change under way or about to be, above it only an exclusive
        // one does.
        let Ok(file) = self
            .at(path)
            .and_then(|at| at.open(libc::O_RDONLY | libc::O_NONBLOCK, 0))
        else {
            return false;
        };
        let probe = match fstat(&file) {
            Ok(st) if (st.st_size as u64) < PATCH_MIN => libc::LOCK_EX,
            _ => libc::LOCK_SH,
        };
        // SAFETY: a valid descriptor; flock touches no memory.
        unsafe { libc::flock(file.as_raw_fd(), probe | libc::LOCK_NB) != 0 }
    }
}
