//! The local-disk store: a space is a plain directory tree under the data dir, so operators can
//! inspect and back it up with ordinary tools. Working copies live in a staging area on the
//! same filesystem, so a commit is one atomic exchange of names (`renameat2`).
//!
//! Every name is resolved beneath the space's directory, held open, never through a symlink
//! (see `at`): a space's content is hostile input to the daemon that serves it.

pub mod append;
pub mod at;
pub mod patch;
pub mod spaces;
pub mod staging;

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use append::{AppendMark, append_in_place};
use at::{At, Dir, check};
use patch::{PATCH_MIN, Patch, hold_for_reading, patch_in_place};
pub use spaces::LocalBackend;
pub use staging::StagingArea;

use super::{
    Content, DirEntry, Kind, Meta, Owner, RenameMode, SetAttr, Staged, Store, StoreStatfs, TimeSpec,
};

/// A space stored as a directory tree on local disk.
pub struct LocalStore {
    /// The space's directory, held open: every path is resolved beneath it (see `at`).
    root: Dir,
    staging: Arc<StagingArea>,
    /// Set when a reader could not take its read lock: patches would no longer be isolated.
    no_patches: AtomicBool,
    /// Set when the filesystem cannot exchange two names (`RENAME_EXCHANGE`: NFS, ZFS before
    /// 2.2): commits rename the working copy over the file instead.
    no_exchange: AtomicBool,
}

impl LocalStore {
    /// The space whose directory is `root` (held open), staging working copies in `staging`
    /// (on the same filesystem).
    pub fn new(root: Dir, staging: Arc<StagingArea>) -> LocalStore {
        LocalStore {
            root,
            staging,
            no_patches: AtomicBool::new(false),
            no_exchange: AtomicBool::new(false),
        }
    }

    /// The committed content in `file`, with its attributes `meta`. A reader of a patchable
    /// file holds the read lock (see `patch`), waiting for a patch under way to finish (the
    /// attributes are then read again, only then).
    fn content(&self, file: File, mut st: libc::stat) -> Arc<dyn Content> {
        if st.st_size as u64 >= PATCH_MIN {
            match hold_for_reading(&file) {
                Ok(false) => {}
                Ok(true) => st = fstat(&file).unwrap_or(st),
                Err(e) => {
                    if !self.no_patches.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "no read locks on this filesystem ({e}): large files are copied \
                             on commit"
                        );
                    }
                }
            }
        }
        Arc::new(LocalContent {
            meta: meta_of(&st),
            file,
        })
    }

    /// Attributes of `file`, which has a second link: the crash marker of an in-place append
    /// or patch. One under way holds the file's `flock` (wait for it to end); one whose process
    /// died is finished or undone first. Either way the attributes are of a whole version.
    fn settled(&self, file: &File) -> io::Result<libc::stat> {
        let fd = file.as_raw_fd();
        while unsafe { libc::flock(fd, libc::LOCK_SH) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
        let mut st = fstat(file);
        if st.as_ref().is_ok_and(|st| st.st_nlink > 1) {
            self.staging.recover_stale();
            st = fstat(file);
        }
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        st
    }

    /// Puts the working copy at `staged` in place of the file at `target`: by exchanging the
    /// two names (true: `staged` then names the old version, to be removed), or where the
    /// filesystem cannot, by renaming over it (false).
    ///
    /// Unlike a rename over an existing file, an exchange does not make ext4 force the new
    /// data to disk (auto_da_alloc), which costs ~0.4 ms per commit; durability is `fsync`'s job.
    fn swap_in(&self, staged: &At, target: &At) -> io::Result<bool> {
        if !self.no_exchange.load(Ordering::Relaxed) {
            match renameat2(staged, target, libc::RENAME_EXCHANGE) {
                Ok(()) => return Ok(true),
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

    /// `path` for the `*at` system calls, resolved beneath the space root.
    fn at(&self, path: &Path) -> io::Result<At> {
        self.root.at(path)
    }

    /// The working copy `staged` for the `*at` system calls.
    fn staged_at(&self, staged: &Staged) -> io::Result<At> {
        self.staging.dir().at(Path::new(&staged.name))
    }

    /// Gives a directory or node just made at `at` its exact mode (the process umask must not
    /// narrow it) and `owner`.
    fn settle_new(at: &At, perm: u16, owner: Owner) -> io::Result<()> {
        chmod_at(at, perm, 0)?;
        if let Some((uid, gid)) = owner {
            chown_at(at, uid, gid)?;
        }
        Ok(())
    }

    /// Fsyncs the directory holding `path` (after its entry changed).
    fn sync_dir_of(&self, path: &Path) -> io::Result<()> {
        let dir = self.at(path.parent().unwrap_or(Path::new("")))?;
        dir.open(libc::O_RDONLY | libc::O_DIRECTORY, 0)?.sync_all()
    }
}

/// The store of room `r` in a new data dir at `data` (for tests of this crate).
#[cfg(test)]
pub fn test_store(data: &Path) -> LocalStore {
    let (backend, _) = LocalBackend::open(data).unwrap();
    let room = crate::space::SpaceId::new(crate::space::SpaceKind::Room, "r").unwrap();
    backend.open_space(&room, Some(None)).unwrap()
}

/// Committed content backed by an open local file, with its attributes read once.
struct LocalContent {
    file: File,
    meta: Meta,
}

impl Content for LocalContent {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        // Only this version's bytes: a later in-place append may have grown the file.
        self.read_before(buf, offset, self.meta.size)
    }
    fn meta(&self) -> io::Result<Meta> {
        Ok(self.meta.clone())
    }
    fn local_file(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn read_appended_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = offset + buf.len() as u64;
        if end <= self.meta.size {
            return self.read_at(buf, offset);
        }
        let size = self.settled_size()?.unwrap_or(0);
        self.read_before(buf, offset, size.max(self.meta.size))
    }
}

impl LocalContent {
    /// Reads at `offset`, nothing at or past `end`.
    fn read_before(&self, buf: &mut [u8], offset: u64, end: u64) -> io::Result<usize> {
        let left = end.saturating_sub(offset);
        let len = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if len == 0 {
            return Ok(0);
        }
        self.file.read_at(&mut buf[..len], offset)
    }

    /// The file's size now, if no append (or patch) is under way on it: its crash marker, a
    /// second link, exists from before the first byte is written until after the last. Two
    /// looks, since one `fstat` reads the link count and the size one after the other.
    fn settled_size(&self) -> io::Result<Option<u64>> {
        let first = self.file.metadata()?;
        let second = self.file.metadata()?;
        let settled = first.nlink() == 1 && second.nlink() == 1 && first.len() == second.len();
        Ok(settled.then_some(first.len()))
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

/// The store's kind of a local file type (the `S_IFMT` bits of a mode).
fn kind_of(mode: u32) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFSOCK => Kind::Socket,
        libc::S_IFBLK => Kind::BlockDevice,
        _ => Kind::CharDevice, // S_IFCHR, the only type left
    }
}

/// The store's kind of a directory entry's type; `None` when the directory did not say.
fn kind_of_entry(t: nix::dir::Type) -> Option<Kind> {
    use nix::dir::Type;
    Some(match t {
        Type::File => Kind::File,
        Type::Directory => Kind::Dir,
        Type::Symlink => Kind::Symlink,
        Type::Fifo => Kind::Fifo,
        Type::Socket => Kind::Socket,
        Type::BlockDevice => Kind::BlockDevice,
        Type::CharacterDevice => Kind::CharDevice,
    })
}

/// Attributes of an open file.
pub fn fstat(file: &File) -> io::Result<libc::stat> {
    Ok(nix::sys::stat::fstat(file)?)
}

/// Converts local attributes (`fstat`, `fstatat`) into the store's attribute type.
pub fn meta_of(st: &libc::stat) -> Meta {
    Meta {
        kind: kind_of(st.st_mode),
        rdev: match st.st_mode & libc::S_IFMT {
            libc::S_IFBLK | libc::S_IFCHR => st.st_rdev,
            _ => 0,
        },
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        version: (
            st.st_dev,
            st.st_ino,
            st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
        ),
        volatile: false,
    }
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn chown_file(file: &File, owner: Owner) -> io::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    Ok(())
}

fn timespec(t: Option<TimeSpec>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeSpec::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeSpec::At(t)) => {
            let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut sec = -(d.as_secs() as i64);
                    let mut nsec = -(d.subsec_nanos() as i64);
                    if nsec < 0 {
                        sec -= 1;
                        nsec += 1_000_000_000;
                    }
                    (sec, nsec)
                }
            };
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        }
    }
}

/// Copies all of `src` into `dst` from offset 0, in the kernel where possible.
fn copy_content(src: &dyn Content, dst: &File) -> io::Result<()> {
    super::copy_range(src, dst, 0, src.meta()?.size)
}

fn renameat2(from: &At, to: &At, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: valid descriptors and NUL-terminated paths.
    check(unsafe {
        libc::renameat2(
            from.dir(),
            from.name().as_ptr(),
            to.dir(),
            to.name().as_ptr(),
            flags,
        )
    })
}

/// `fchownat` without following a symlink; `u32::MAX` leaves an id alone.
fn chown_at(at: &At, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: a valid descriptor and a NUL-terminated path.
    check(unsafe {
        libc::fchownat(
            at.dir(),
            at.name().as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// `fchmodat`: the exact mode (the process umask does not narrow it).
fn chmod_at(at: &At, perm: u16, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid descriptor and a NUL-terminated path.
    check(unsafe {
        libc::fchmodat(
            at.dir(),
            at.name().as_ptr(),
            libc::mode_t::from(perm),
            flags,
        )
    })
}

impl Store for LocalStore {
    fn stat(&self, path: &Path) -> io::Result<Meta> {
        Ok(meta_of(&self.at(path)?.stat()?))
    }

    fn list(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let dir = self.at(path)?;
        let fd = dir.open(libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
        let mut entries = nix::dir::Dir::from_fd(fd.into()).map_err(io::Error::from)?;
        let listed = entries.as_raw_fd();
        let mut out = Vec::new();
        for entry in entries.iter() {
            let entry = entry.map_err(io::Error::from)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsStr::from_bytes(name).to_os_string();
            let kind = match entry.file_type().and_then(kind_of_entry) {
                Some(kind) => kind,
                // The filesystem did not say (DT_UNKNOWN): ask the entry itself.
                None => kind_of(At::new(listed, Path::new(&name))?.stat()?.st_mode),
            };
            out.push(DirEntry { name, kind });
        }
        Ok(out)
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn Content>> {
        // Only regular files are content. The kernel opens FIFOs and refuses device nodes
        // itself (they are shown as what they are, and mounts are nodev), so another type
        // only comes here after a change behind the mount's back (O_NONBLOCK: a FIFO must not
        // block the daemon). Checking the type before opening too would cost every open a
        // system call.
        let file = self
            .at(path)?
            .open(libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, 0)?;
        let mut st = fstat(&file)?;
        if kind_of(st.st_mode) != Kind::File {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        if st.st_nlink > 1 {
            st = self.settled(&file)?;
        }
        Ok(self.content(file, st))
    }

    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> io::Result<Meta> {
        let excl = if exclusive { libc::O_EXCL } else { 0 };
        let flags = libc::O_WRONLY | libc::O_CREAT | excl | libc::O_NOFOLLOW;
        let file = self.at(path)?.open(flags, libc::mode_t::from(perm))?;
        file.set_permissions(fs::Permissions::from_mode(u32::from(perm)))?;
        chown_file(&file, owner)?;
        Ok(meta_of(&fstat(&file)?))
    }

    fn stage(&self, seed: Option<&dyn Content>) -> io::Result<Staged> {
        let (file, name) = self.staging.new_file()?;
        let staged = Staged { file, name };
        match seed.map_or(Ok(()), |seed| copy_content(seed, &staged.file)) {
            Ok(()) => Ok(staged),
            Err(e) => {
                self.discard(staged);
                Err(e)
            }
        }
    }

    fn commit(
        &self,
        staged: Staged,
        path: &Path,
        durable: bool,
    ) -> Result<Arc<dyn Content>, (io::Error, Staged)> {
        let prepared = (|| {
            let target = self.at(path)?;
            // The new content takes over the identity (mode, owner) of the file it replaces.
            let current = target.stat()?;
            if current.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            let perm = fs::Permissions::from_mode(current.st_mode & 0o7777);
            staged.file.set_permissions(perm)?;
            if nix::unistd::geteuid().is_root() {
                chown_file(&staged.file, Some((current.st_uid, current.st_gid)))?;
            }
            if durable {
                staged.file.sync_all()?;
            }
            let before = fstat(&staged.file)?;
            let exchanged = self.swap_in(&self.staged_at(&staged)?, &target)?;
            Ok((before, exchanged.then_some(current.st_size as u64)))
        })();
        let (before, replaced_size) = match prepared {
            Ok(sizes) => sizes,
            Err(e) => return Err((e, staged)),
        };
        if let Some(size) = replaced_size {
            // The staging name now names the replaced version.
            self.staging.remove_replaced(staged.name.clone(), size);
        }
        if durable && let Err(e) = self.sync_dir_of(path) {
            log::error!(
                "committed {} but could not sync its directory: {e}",
                path.display()
            );
        }
        // Read after the exchange: it changed the ctime, part of the version readers compare.
        let st = fstat(&staged.file).unwrap_or(before);
        Ok(self.content(staged.file, st))
    }

    fn append(
        &self,
        base: &dyn Content,
        path: &Path,
        tail: &[u8],
    ) -> io::Result<Option<Arc<dyn Content>>> {
        let was = base.meta()?;
        if was.size < PATCH_MIN && was.size + tail.len() as u64 >= PATCH_MIN {
            // Its readers hold no read lock (too small to be patched): keep it below the size
            // where patches begin, so it never becomes patchable under them.
            return Ok(None);
        }
        let (dev, ino, _) = was.version;
        let staging = self.staging.dir();
        let marker = |mark: &AppendMark| self.staging.new_name(|n| mark.name(n));
        let appended =
            append_in_place(&self.at(path)?, (dev, ino), was.size, tail, staging, marker)?;
        Ok(match appended {
            Some(file) => {
                let st = fstat(&file)?;
                Some(self.content(file, st))
            }
            None => None,
        })
    }

    fn changing(&self, path: &Path) -> bool {
        // Appenders and patchers hold the file's lock exclusively. Others hold it shared for
        // moments (a reader waiting out an append, another appender looking, as here), and
        // readers of large (patchable) files for as long as they have it open: so below that
        // size any lock means a change under way or about to be, above it only an exclusive
        // one does.
        let Ok(file) = self
            .at(path)
            .and_then(|at| at.open(libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, 0))
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

    fn patch(
        &self,
        base: &dyn Content,
        path: &Path,
        staged: &Staged,
        written: &[(u64, u64)],
        durable: bool,
    ) -> io::Result<Option<Arc<dyn Content>>> {
        let was = base.meta()?;
        let (Some(base_file), false) = (base.local_file(), self.no_patches.load(Ordering::Relaxed))
        else {
            return Ok(None);
        };
        let to = staged.file.metadata()?.len();
        if was.size < PATCH_MIN {
            return Ok(None);
        }
        let patch = Patch {
            staged: &staged.file,
            staged_name: &staged.name,
            from: was.size,
            to,
            written,
            durable,
        };
        let (dev, ino, _) = was.version;
        let staging = self.staging.dir();
        let marker = |mark: &patch::PatchMark| self.staging.new_name(|n| mark.name(n));
        let patched = patch_in_place(
            &self.at(path)?,
            base_file,
            (dev, ino),
            &patch,
            staging,
            marker,
        )?;
        Ok(match patched {
            Some(file) => {
                let st = fstat(&file)?;
                Some(self.content(file, st))
            }
            None => None,
        })
    }

    fn discard(&self, staged: Staged) {
        if let Err(e) = self.staging.remove(&staged.name) {
            log::warn!("could not remove working copy {}: {e}", staged.name);
        }
    }

    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> io::Result<Meta> {
        let at = self.at(path)?;
        let mode = libc::mode_t::from(perm);
        // SAFETY: a valid descriptor and a NUL-terminated path.
        check(unsafe { libc::mkdirat(at.dir(), at.name().as_ptr(), mode) })?;
        Self::settle_new(&at, perm, owner)?;
        Ok(meta_of(&at.stat()?))
    }

    fn mknod(&self, path: &Path, kind: Kind, perm: u16, owner: Owner) -> io::Result<Meta> {
        let file_type = match kind {
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            _ => return Err(io::Error::from_raw_os_error(libc::EPERM)),
        };
        let at = self.at(path)?;
        let mode = file_type | libc::mode_t::from(perm);
        // SAFETY: a valid descriptor and a NUL-terminated path.
        check(unsafe { libc::mknodat(at.dir(), at.name().as_ptr(), mode, 0) })?;
        Self::settle_new(&at, perm, owner)?;
        Ok(meta_of(&at.stat()?))
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        let at = self.at(path)?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        check(unsafe { libc::unlinkat(at.dir(), at.name().as_ptr(), libc::AT_REMOVEDIR) })
    }

    fn unlink(&self, path: &Path) -> io::Result<()> {
        let at = self.at(path)?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        check(unsafe { libc::unlinkat(at.dir(), at.name().as_ptr(), 0) })
    }

    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> io::Result<()> {
        let flags = match mode {
            RenameMode::Replace => 0,
            RenameMode::NoReplace => libc::RENAME_NOREPLACE,
            RenameMode::Exchange => libc::RENAME_EXCHANGE,
        };
        renameat2(&self.at(from)?, &self.at(to)?, flags)
    }

    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> io::Result<Meta> {
        let at = self.at(path)?;
        let target = cstr(target)?;
        // SAFETY: a valid descriptor and NUL-terminated paths.
        check(unsafe { libc::symlinkat(target.as_ptr(), at.dir(), at.name().as_ptr()) })?;
        if let Some((uid, gid)) = owner {
            chown_at(&at, uid, gid)?;
        }
        Ok(meta_of(&at.stat()?))
    }

    fn readlink(&self, path: &Path) -> io::Result<PathBuf> {
        let at = self.at(path)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: a valid descriptor, a NUL-terminated path and a buffer of the given size.
        let n = unsafe {
            libc::readlinkat(
                at.dir(),
                at.name().as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(PathBuf::from(OsString::from_vec(buf)))
    }

    fn set_attr(&self, path: &Path, attr: &SetAttr) -> io::Result<Meta> {
        let at = self.at(path)?;
        if let Some(perm) = attr.perm {
            chmod_at(&at, perm, libc::AT_SYMLINK_NOFOLLOW)?;
        }
        if attr.uid.is_some() || attr.gid.is_some() {
            chown_at(
                &at,
                attr.uid.unwrap_or(u32::MAX),
                attr.gid.unwrap_or(u32::MAX),
            )?;
        }
        if attr.atime.is_some() || attr.mtime.is_some() {
            let times = [timespec(attr.atime), timespec(attr.mtime)];
            // SAFETY: a valid descriptor, a NUL-terminated path and two timespecs.
            check(unsafe {
                libc::utimensat(
                    at.dir(),
                    at.name().as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        Ok(meta_of(&at.stat()?))
    }

    fn sync(&self, path: &Path) -> io::Result<()> {
        let at = self.at(path)?;
        at.open(libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, 0)?
            .sync_all()?;
        self.sync_dir_of(path)
    }

    fn statfs(&self) -> io::Result<StoreStatfs> {
        let s = nix::sys::statvfs::fstatvfs(&self.root).map_err(io::Error::from)?;
        Ok(StoreStatfs {
            blocks: s.blocks(),
            bfree: s.blocks_free(),
            bavail: s.blocks_available(),
            files: s.files(),
            ffree: s.files_free(),
            bsize: s.fragment_size() as u32,
            namelen: s.name_max() as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = test_store(dir.path());
        (dir, store)
    }

    impl LocalStore {
        /// The backing file of `path`, for tests that look behind the store's back.
        fn full(&self, path: &Path) -> PathBuf {
            let fd = self.root.as_raw_fd();
            fs::read_link(format!("/proc/self/fd/{fd}"))
                .unwrap()
                .join(path)
        }
    }

    #[test]
    fn a_reader_follows_whole_appends_only() {
        use std::io::Write;
        let (_d, s) = store();
        let path = Path::new("log");
        fs::write(s.full(path), b"one\n").unwrap();
        let reader = s.open(path).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(reader.read_appended_at(&mut buf, 0).unwrap(), 4);
        let appended = s.append(reader.as_ref(), path, b"two\n").unwrap();
        assert!(appended.is_some(), "appended in place");
        assert_eq!(
            reader.read_at(&mut buf, 4).unwrap(),
            0,
            "its own version ends"
        );
        assert_eq!(reader.read_appended_at(&mut buf, 4).unwrap(), 4);
        assert_eq!(&buf[..4], b"two\n");
        // A second link is the marker of an append under way: nothing past the version.
        let marker = s.full(Path::new("marker"));
        fs::hard_link(s.full(path), &marker).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(s.full(path))
            .unwrap()
            .write_all(b"thr")
            .unwrap();
        assert_eq!(reader.read_appended_at(&mut buf, 4).unwrap(), 0);
        fs::remove_file(&marker).unwrap();
        assert_eq!(reader.read_appended_at(&mut buf, 4).unwrap(), 7);
    }

    #[test]
    fn large_replaced_versions_are_removed_in_the_background() {
        let (d, s) = store();
        let big = vec![7u8; 1 << 20];
        fs::write(s.full(Path::new("f")), &big).unwrap();
        let staged = s.stage(None).unwrap();
        staged.file.write_all_at(b"small", 0).unwrap();
        s.commit(staged, Path::new("f"), false)
            .map_err(|(e, _)| e)
            .unwrap();
        assert_eq!(fs::read(s.full(Path::new("f"))).unwrap(), b"small");
        let staging = d.path().join(".staging");
        let leftovers = || {
            walk(&staging)
                .into_iter()
                .filter(|p| p.file_name().is_some_and(|n| n != "lock"))
                .count()
        };
        for _ in 0..500 {
            if leftovers() == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("the replaced version is still in the staging area");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }

    #[test]
    fn commit_replaces_atomically_and_old_readers_keep_their_version() {
        // Also where the filesystem cannot exchange names (the rename fallback).
        for no_exchange in [false, true] {
            let (_d, s) = store();
            s.no_exchange.store(no_exchange, Ordering::Relaxed);
            s.create(Path::new("f"), 0o644, None, true).unwrap();
            let old = s.open(Path::new("f")).unwrap();
            s.set_attr(
                Path::new("f"),
                &SetAttr {
                    perm: Some(0o640),
                    ..Default::default()
                },
            )
            .unwrap();
            let staged = s.stage(None).unwrap();
            let staging =
                fs::read_link(format!("/proc/self/fd/{}", s.staging.dir().as_raw_fd())).unwrap();
            staged.file.write_all_at(b"new", 0).unwrap();
            let committed = s
                .commit(staged, Path::new("f"), true)
                .map_err(|(e, _)| e)
                .unwrap();
            let mut buf = [0u8; 8];
            assert_eq!(
                old.read_at(&mut buf, 0).unwrap(),
                0,
                "old snapshot stays empty"
            );
            assert_eq!(committed.read_at(&mut buf, 0).unwrap(), 3);
            assert_eq!(fs::read(s.full(Path::new("f"))).unwrap(), b"new");
            assert_eq!(s.stat(Path::new("f")).unwrap().perm, 0o640);
            let left: Vec<_> = fs::read_dir(&staging)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != "lock")
                .collect();
            assert!(left.is_empty(), "nothing left in staging: {left:?}");
        }
    }

    #[test]
    fn stage_seeds_from_committed_content() {
        let (_d, s) = store();
        fs::write(s.full(Path::new("f")), b"hello world").unwrap();
        let seed = s.open(Path::new("f")).unwrap();
        let staged = s.stage(Some(seed.as_ref())).unwrap();
        let mut buf = vec![0u8; 32];
        let n = staged.file.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"hello world");
        s.discard(staged);
    }

    #[test]
    fn stale_staging_of_dead_process_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".staging/999999-1");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("lock"), b"").unwrap();
        fs::write(stale.join("w0"), b"partial").unwrap();
        let data = Dir::open_trusted(dir.path(), false).unwrap();
        let (_area, removed) = StagingArea::create(&data).unwrap();
        assert_eq!(removed, 1);
        assert!(!stale.exists());
        // A live area is not removed by a second process starting.
        let (_other, removed2) = StagingArea::create(&data).unwrap();
        assert_eq!(removed2, 0);
        assert_eq!(
            fs::read_dir(dir.path().join(".staging")).unwrap().count(),
            2
        );
    }

    #[test]
    fn opening_a_file_with_a_crash_marker_waits_for_or_recovers_it() {
        use super::append::AppendMark;
        let (d, s) = store();
        let target = s.full(Path::new("log"));
        fs::write(&target, b"whole\n").unwrap();
        // An append under way in a live process: it holds the flock and a marker link.
        let appender = fs::OpenOptions::new().append(true).open(&target).unwrap();
        assert_eq!(
            unsafe { libc::flock(appender.as_raw_fd(), libc::LOCK_EX) },
            0
        );
        let live_marker = d.path().join("live-marker");
        fs::hard_link(&target, &live_marker).unwrap();
        appender.write_all_at(b"half", 6).unwrap();
        let opened = std::thread::scope(|scope| {
            let reader = scope.spawn(|| s.open(Path::new("log")).unwrap().meta().unwrap().size);
            std::thread::sleep(Duration::from_millis(50));
            assert!(!reader.is_finished(), "the reader waits for the append");
            appender.write_all_at(b" line\n", 10).unwrap();
            fs::remove_file(&live_marker).unwrap();
            unsafe { libc::flock(appender.as_raw_fd(), libc::LOCK_UN) };
            reader.join().unwrap()
        });
        assert_eq!(opened, 16, "a whole version: the append done");

        // A dead process's marker: the append is undone before the file is read.
        let stale = d.path().join(".staging/999999-5");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("lock"), b"").unwrap();
        let now = fs::metadata(&target).unwrap();
        let mark = AppendMark {
            from: 16,
            to: 30,
            mtime: (now.mtime(), now.mtime_nsec()),
        };
        fs::hard_link(&target, stale.join(mark.name(0))).unwrap();
        appender.write_all_at(b"cut sh", 16).unwrap();
        let content = s.open(Path::new("log")).unwrap();
        assert_eq!(content.meta().unwrap().size, 16);
        assert_eq!(fs::read(&target).unwrap(), b"whole\nhalf line\n");
        assert!(!stale.exists(), "the stale staging is gone");
    }

    #[test]
    fn a_reader_opening_during_a_patch_gets_the_patched_version() {
        let (_d, s) = store();
        let target = s.full(Path::new("db"));
        fs::write(&target, vec![b'o'; PATCH_MIN as usize]).unwrap();
        // A patcher holds the exclusive lock (as `patch_in_place` does while writing).
        let patcher = fs::OpenOptions::new().write(true).open(&target).unwrap();
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        assert_eq!(
            unsafe { libc::fcntl(patcher.as_raw_fd(), libc::F_OFD_SETLK, &lock) },
            0
        );
        let seen = std::thread::scope(|scope| {
            let reader = scope.spawn(|| s.open(Path::new("db")).unwrap());
            std::thread::sleep(Duration::from_millis(50));
            assert!(!reader.is_finished(), "the reader waits for the patch");
            patcher.write_all_at(b"grown", PATCH_MIN).unwrap();
            drop(patcher);
            reader.join().unwrap()
        });
        assert_eq!(
            seen.meta().unwrap().size,
            PATCH_MIN + 5,
            "the size after the patch"
        );
        let mut tail = [0u8; 5];
        assert_eq!(seen.read_at(&mut tail, PATCH_MIN).unwrap(), 5);
        assert_eq!(&tail, b"grown");
    }

    #[test]
    fn rename_noreplace_and_exchange() {
        let (_d, s) = store();
        fs::write(s.full(Path::new("a")), b"A").unwrap();
        fs::write(s.full(Path::new("b")), b"B").unwrap();
        let err = s
            .rename(Path::new("a"), Path::new("b"), RenameMode::NoReplace)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        s.rename(Path::new("a"), Path::new("b"), RenameMode::Exchange)
            .unwrap();
        assert_eq!(fs::read(s.full(Path::new("b"))).unwrap(), b"A");
        assert_eq!(fs::read(s.full(Path::new("a"))).unwrap(), b"B");
    }

    #[test]
    fn fifos_and_socket_names_are_stored_and_devices_refused() {
        let (_d, s) = store();
        let fifo = s.mknod(Path::new("pipe"), Kind::Fifo, 0o640, None).unwrap();
        assert_eq!((fifo.kind, fifo.perm), (Kind::Fifo, 0o640));
        let sock = s
            .mknod(Path::new("sock"), Kind::Socket, 0o755, None)
            .unwrap();
        assert_eq!((sock.kind, sock.perm), (Kind::Socket, 0o755));
        assert!(
            fs::metadata(s.full(Path::new("pipe")))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        let mut listed: Vec<_> = s
            .list(Path::new(""))
            .unwrap()
            .into_iter()
            .map(|e| (e.name.into_string().unwrap(), e.kind))
            .collect();
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            listed,
            vec![("pipe".into(), Kind::Fifo), ("sock".into(), Kind::Socket)]
        );
        // Opening a FIFO as file content neither blocks nor succeeds.
        assert!(s.open(Path::new("pipe")).is_err());
        let dev = s.mknod(Path::new("dev"), Kind::CharDevice, 0o600, None);
        assert_eq!(dev.unwrap_err().raw_os_error(), Some(libc::EPERM));
        // A device node placed in the store by someone else is shown, and refused as content.
        let devno = libc::makedev(1, 3);
        let placed = CString::new(s.full(Path::new("null")).into_os_string().into_vec()).unwrap();
        assert_eq!(
            unsafe { libc::mknod(placed.as_ptr(), libc::S_IFCHR | 0o600, devno) },
            0
        );
        let meta = s.stat(Path::new("null")).unwrap();
        assert_eq!((meta.kind, meta.rdev), (Kind::CharDevice, devno));
        let open = s.open(Path::new("null")).map(|_| ());
        assert_eq!(open.unwrap_err().raw_os_error(), Some(libc::EISDIR));
    }

    #[test]
    fn paths_longer_than_path_max_work_like_short_ones() {
        let (_d, s) = store();
        let mut dir = PathBuf::new();
        while dir.as_os_str().len() < libc::PATH_MAX as usize {
            dir.push("d".repeat(250));
            s.mkdir(&dir, 0o755, None).unwrap();
        }
        let (a, b) = (dir.join("a"), dir.join("b"));
        s.create(&a, 0o644, None, true).unwrap();
        let staged = s.stage(None).unwrap();
        staged.file.write_all_at(b"long", 0).unwrap();
        s.commit(staged, &a, true).map_err(|(e, _)| e).unwrap();
        s.rename(&a, &b, RenameMode::Replace).unwrap();
        assert_eq!(s.stat(&b).unwrap().size, 4);
        let mut buf = [0u8; 8];
        assert_eq!(s.open(&b).unwrap().read_at(&mut buf, 0).unwrap(), 4);
        assert_eq!(&buf[..4], b"long");
        assert_eq!(s.list(&dir).unwrap().len(), 1);
        s.symlink(Path::new("b"), &a, None).unwrap();
        assert_eq!(s.readlink(&a).unwrap(), Path::new("b"));
        s.unlink(&a).unwrap();
        s.unlink(&b).unwrap();
        s.rmdir(&dir).unwrap();
    }
}
