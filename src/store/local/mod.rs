//! The local-disk store: a space is a plain directory tree under the data dir, so operators can
//! inspect and back it up with ordinary tools. Working copies live in a staging area on the
//! same filesystem, so a commit is one atomic exchange of names (`renameat2`); appends and
//! patches of large files are committed in place, guarded by crash markers (see `commit`).
//!
//! Every name is resolved beneath the space's directory, held open, never through a symlink
//! (see `at`): a space's content is hostile input to the daemon that serves it. Directories so
//! resolved serve the next operations for a moment (`at::DirCache`); this store's renames and
//! removals of directories forget them at once.

pub mod append;
pub mod at;
mod commit;
pub mod content;
pub mod patch;
pub mod spaces;
pub mod staging;

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use at::{At, Dir, DirCache, check};
use content::kind_of;
pub use content::{LocalContent, LocalCopy, fstat, meta_of};
use patch::{PATCH_MIN, hold_for_reading};
pub use spaces::LocalBackend;
pub use staging::StagingArea;

use super::{
    Capabilities, CommitRequest, Committed, Content, DirEntry, Kind, Meta, Owner, RenameMode,
    SetAttr, Store, StoreError, StoreResult, StoreStatfs, TimeSpec, Usage, WorkingCopy, XattrMode,
};

/// How many locks the files' append commits share (see `LocalStore::append_turns`).
const APPEND_TURNS: usize = 64;

/// How long a directory resolved for one operation serves the next ones (see `at::DirCache`):
/// the default time the kernel trusts a mount's cached entries, since a directory renamed
/// behind the store's back (another process, an operator) is seen as late as they see it.
const DIR_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// A space stored as a directory tree on local disk.
pub struct LocalStore {
    /// The space's directory, held open: every path is resolved beneath it (see `at`).
    root: Dir,
    /// Directories resolved beneath `root` lately (see `at::DirCache`).
    dirs: Arc<DirCache>,
    staging: Arc<StagingArea>,
    /// Set when a reader could not take its read lock: patches would no longer be isolated.
    no_patches: AtomicBool,
    /// Set when the filesystem cannot exchange two names (`RENAME_EXCHANGE`: NFS, ZFS before
    /// 2.2): commits rename the working copy over the file instead.
    no_exchange: AtomicBool,
    /// Commits of appends to one file take turns in this process (files share these locks by
    /// inode number): in place or through a working copy, none can land between another's look
    /// at the file and its commit. Other processes are met by the in-place append's checks.
    append_turns: [Mutex<()>; APPEND_TURNS],
}

impl LocalStore {
    /// The space whose directory is `root` (held open), staging working copies in `staging`
    /// (on the same filesystem).
    pub fn new(root: Dir, staging: Arc<StagingArea>) -> LocalStore {
        LocalStore {
            root,
            dirs: Arc::new(DirCache::new(DIR_CACHE_TTL)),
            staging,
            no_patches: AtomicBool::new(false),
            no_exchange: AtomicBool::new(false),
            append_turns: std::array::from_fn(|_| Mutex::new(())),
        }
    }

    /// The committed content in `file`, with its attributes `st`. A reader of a patchable
    /// file holds the read lock (see `patch`), waiting for a patch under way to finish (the
    /// attributes are then read again, only then).
    fn content(&self, file: File, mut st: libc::stat) -> Arc<LocalContent> {
        if st.st_size as u64 >= PATCH_MIN {
            match hold_for_reading(&file) {
                Ok(false) => {}
                Ok(true) => {
                    st = fstat(&file).unwrap_or(st);
                    // The patch it waited for may have ended with its process (`kill -9`),
                    // half applied: its marker's link is then there to finish it from, which
                    // is done before this reader reads.
                    if st.st_nlink > 1
                        && let Ok(settled) = self.settled(&file)
                    {
                        st = settled;
                    }
                }
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
        Arc::new(LocalContent::new(file, &st))
    }

    /// Opens the committed file at `path` as content.
    fn open_content(&self, path: &Path) -> io::Result<Arc<LocalContent>> {
        // Only regular files are content. The kernel opens FIFOs and refuses device nodes
        // itself (they are shown as what they are, and mounts are nodev), so another type
        // only comes here after a change behind the mount's back (O_NONBLOCK: a FIFO must not
        // block the daemon). Checking the type before opening too would cost every open a
        // system call.
        let file = self.at(path)?.open(libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
        let mut st = fstat(&file)?;
        if kind_of(st.st_mode) != Kind::File {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        if st.st_nlink > 1 {
            st = self.settled(&file)?;
        }
        Ok(self.content(file, st))
    }

    /// Attributes of `file`, which has a second link: the crash marker of an in-place append
    /// or patch. One under way holds the file's `flock` (wait for it to end); one whose process
    /// died is finished or undone first. Either way the attributes are of a whole version.
    fn settled(&self, file: &File) -> io::Result<libc::stat> {
        flock_waiting(file, libc::LOCK_SH)?;
        let mut st = fstat(file);
        if st.as_ref().is_ok_and(|st| st.st_nlink > 1) {
            self.staging.recover_stale();
            st = fstat(file);
        }
        // SAFETY: a valid descriptor; flock touches no memory.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        st
    }

    /// `path` for the `*at` system calls, resolved beneath the space root (its directory
    /// perhaps from the cache of those resolved lately).
    fn at(&self, path: &Path) -> io::Result<At> {
        At::with_cache(self.root.as_raw_fd(), path, Some(&self.dirs))
    }

    /// Gives a directory or node just made at `at` its exact mode (the process umask must not
    /// narrow it) and `owner`.
    fn settle_new(at: &At, perm: u16, owner: Owner) -> io::Result<()> {
        chmod_at(at, perm, libc::AT_SYMLINK_NOFOLLOW)?;
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

/// Takes the `flock` `op` (`LOCK_SH`, `LOCK_EX`) of `file`, waiting for whoever holds a
/// conflicting one (an appender or patcher of the data dir: moments).
fn flock_waiting(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid descriptor; flock touches no memory.
    while unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    Ok(())
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

/// `at` as a path for the `l*xattr` calls: through this process's descriptor of its directory
/// (resolved beneath the space), and the `l*` calls do not follow the last component.
fn xattr_path(at: &At) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}/", at.dir()).into_bytes();
    p.extend_from_slice(at.name().to_bytes());
    CString::new(p).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn xattr_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `lgetxattr` into a buffer of the right size.
fn get_xattr_at(path: &CString, name: &CString) -> io::Result<Vec<u8>> {
    loop {
        // SAFETY: NUL-terminated strings; a null buffer of size 0 asks for the size.
        let size =
            unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: as above, with a buffer of `buf.len()` bytes.
        let got = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        match got {
            n if n >= 0 => {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ERANGE) {
                    return Err(e); // grown meanwhile: ask again
                }
            }
        }
    }
}

/// The `user.` attribute names of the entry at `path` (`llistxattr`).
fn list_user_xattrs(path: &CString) -> io::Result<Vec<OsString>> {
    loop {
        // SAFETY: a NUL-terminated path; a null buffer of size 0 asks for the size.
        let size = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: as above, with a buffer of `buf.len()` bytes.
        let got = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split(|&b| b == 0)
            .filter(|n| n.starts_with(b"user."))
            .map(|n| OsString::from_vec(n.to_vec()))
            .collect());
    }
}

/// Copies the `user.` attributes of the file at `from` to the open file `to` (a working copy
/// about to replace it: attributes belong to the file, not to one version).
fn copy_xattrs(from: &At, to: &File) -> io::Result<()> {
    let path = xattr_path(from)?;
    for name in list_user_xattrs(&path)? {
        let c = xattr_name(&name)?;
        let value = match get_xattr_at(&path, &c) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: a valid descriptor, a NUL-terminated name and a value of its length.
        check(unsafe {
            libc::fsetxattr(
                to.as_raw_fd(),
                c.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })?;
    }
    Ok(())
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
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            hard_links: true,
            special_files: true,
            in_place_append: true,
            ranged_commits_from: (!self.no_patches.load(Ordering::Relaxed)).then_some(PATCH_MIN),
            local_files: true,
            conditional_writes: true,
            xattrs: true,
            stream_commits_up_to: None,
            created_at_commit: false,
            attrs_at_commit: false,
        }
    }

    fn stat(&self, path: &Path) -> StoreResult<Meta> {
        Ok(meta_of(&self.at(path)?.stat()?))
    }

    fn list(&self, path: &Path) -> StoreResult<Vec<DirEntry>> {
        let dir = if path.as_os_str().is_empty() {
            self.root.reopen()?
        } else {
            self.root.open(path)?
        };
        let mut out = Vec::new();
        for (name, _) in dir.entries()? {
            // The attributes from the listed directory itself: one call per entry, no path
            // resolution (the core wants them for readdirplus anyway).
            let c = CString::new(name.as_bytes()).map_err(|_| StoreError::errno(libc::EINVAL))?;
            let st = match at::fstatat(dir.as_raw_fd(), &c) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // gone meanwhile
                Err(e) => return Err(e.into()),
            };
            let meta = meta_of(&st);
            out.push(DirEntry {
                name,
                kind: meta.kind,
                meta: Some(meta),
            });
        }
        Ok(out)
    }

    fn open(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        Ok(self.open_content(path)?)
    }

    fn open_to_read(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        // An open file is the version it opened: a commit replaces the name, not the file.
        self.open(path)
    }

    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> StoreResult<Meta> {
        let excl = if exclusive { libc::O_EXCL } else { 0 };
        let flags = libc::O_WRONLY | libc::O_CREAT | excl;
        let file = self.at(path)?.open(flags, libc::mode_t::from(perm))?;
        // The mode and owner the file got are mostly the ones asked for already (the process
        // umask narrows no bit of the caller's mode, the caller is the daemon's user): each
        // change is made only where needed, and the attributes read again only after one.
        let mut st = fstat(&file)?;
        let mut changed = false;
        if (st.st_mode & 0o7777) as u16 != perm {
            file.set_permissions(fs::Permissions::from_mode(u32::from(perm)))?;
            changed = true;
        }
        if let Some((uid, gid)) = owner
            && (st.st_uid, st.st_gid) != (uid, gid)
        {
            chown_file(&file, owner)?;
            changed = true;
        }
        if changed {
            st = fstat(&file)?;
        }
        Ok(meta_of(&st))
    }

    fn create_held(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.create(path, perm, owner, true)
    }

    fn working_copy(&self, _path: &Path) -> StoreResult<Arc<dyn WorkingCopy>> {
        Ok(Arc::new(LocalCopy::new(self.staging.clone())?))
    }

    fn commit(&self, req: CommitRequest<'_>) -> StoreResult<Committed> {
        let path = req.path;
        let attrs = req.attrs.clone();
        let done = self
            .commit_change(req)
            .map_err(|e| e.context(format_args!("commit of {}", path.display())))?;
        // Not asked for by the core here (no `attrs_at_commit`: a change of attributes costs
        // no more at once), but taken as asked.
        let Some(attrs) = attrs else {
            return Ok(done);
        };
        self.set_attr(path, &attrs)?;
        Ok(Committed {
            content: self.open(path)?,
            ..done
        })
    }

    fn mknod(&self, path: &Path, kind: Kind, perm: u16, owner: Owner) -> StoreResult<Meta> {
        let file_type = match kind {
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            _ => return Err(StoreError::errno(libc::EPERM)),
        };
        let at = self.at(path)?;
        let mode = file_type | libc::mode_t::from(perm);
        // SAFETY: a valid descriptor and a NUL-terminated path.
        check(unsafe { libc::mknodat(at.dir(), at.name().as_ptr(), mode, 0) })?;
        Self::settle_new(&at, perm, owner)?;
        Ok(meta_of(&at.stat()?))
    }

    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        let at = self.at(path)?;
        let mode = libc::mode_t::from(perm);
        // SAFETY: a valid descriptor and a NUL-terminated path.
        check(unsafe { libc::mkdirat(at.dir(), at.name().as_ptr(), mode) })?;
        if path.parent().is_some_and(|p| p.as_os_str().is_empty()) {
            // A directory at the top of the space (an agent's, a project's): the directories
            // made in it spread over the disk too (see `at::spread_subdirs`).
            if let Ok(dir) = at.open(libc::O_RDONLY | libc::O_DIRECTORY, 0) {
                at::spread_subdirs(dir.as_fd());
            }
        }
        Self::settle_new(&at, perm, owner)?;
        Ok(meta_of(&at.stat()?))
    }

    fn rmdir(&self, path: &Path) -> StoreResult<()> {
        let at = self.at(path)?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        check(unsafe { libc::unlinkat(at.dir(), at.name().as_ptr(), libc::AT_REMOVEDIR) })?;
        // A directory made at that path later is another one.
        self.dirs.forget_all();
        Ok(())
    }

    fn unlink(&self, path: &Path) -> StoreResult<()> {
        let at = self.at(path)?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        Ok(check(unsafe {
            libc::unlinkat(at.dir(), at.name().as_ptr(), 0)
        })?)
    }

    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> StoreResult<()> {
        let flags = match mode {
            RenameMode::Replace => 0,
            RenameMode::NoReplace => libc::RENAME_NOREPLACE,
            RenameMode::Exchange => libc::RENAME_EXCHANGE,
        };
        let to_at = self.at(to)?;
        renameat2(&self.at(from)?, &to_at, flags)?;
        // A directory moved, swapped or replaced: paths below it name other directories now.
        let moved_file = mode != RenameMode::Exchange
            && to_at
                .stat()
                .is_ok_and(|st| st.st_mode & libc::S_IFMT != libc::S_IFDIR);
        if !moved_file {
            self.dirs.forget_all();
        }
        Ok(())
    }

    fn link(&self, from: &Path, to: &Path) -> StoreResult<Meta> {
        let (from, to) = (self.at(from)?, self.at(to)?);
        if from.stat()?.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(StoreError::errno(libc::EPERM));
        }
        // SAFETY: valid descriptors and NUL-terminated names; the source is not followed.
        check(unsafe {
            libc::linkat(
                from.dir(),
                from.name().as_ptr(),
                to.dir(),
                to.name().as_ptr(),
                0,
            )
        })?;
        Ok(meta_of(&to.stat()?))
    }

    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> StoreResult<Meta> {
        let at = self.at(path)?;
        let target = cstr(target)?;
        // SAFETY: a valid descriptor and NUL-terminated paths.
        check(unsafe { libc::symlinkat(target.as_ptr(), at.dir(), at.name().as_ptr()) })?;
        if let Some((uid, gid)) = owner {
            chown_at(&at, uid, gid)?;
        }
        Ok(meta_of(&at.stat()?))
    }

    fn readlink(&self, path: &Path) -> StoreResult<PathBuf> {
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
            return Err(io::Error::last_os_error().into());
        }
        buf.truncate(n as usize);
        Ok(PathBuf::from(OsString::from_vec(buf)))
    }

    fn set_attr(&self, path: &Path, attr: &SetAttr) -> StoreResult<Meta> {
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

    fn sync(&self, path: &Path) -> StoreResult<()> {
        let at = self.at(path)?;
        at.open(libc::O_RDONLY | libc::O_NONBLOCK, 0)?.sync_all()?;
        Ok(self.sync_dir_of(path)?)
    }

    fn statfs(&self) -> StoreResult<StoreStatfs> {
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

    fn usage(&self) -> StoreResult<Usage> {
        let t = self.root.tally()?;
        Ok(Usage {
            files: t.entries,
            bytes: t.bytes,
        })
    }

    fn get_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<Vec<u8>> {
        let at = self.at(path)?;
        Ok(get_xattr_at(&xattr_path(&at)?, &xattr_name(name)?)?)
    }

    fn set_xattr(
        &self,
        path: &Path,
        name: &OsStr,
        value: &[u8],
        mode: XattrMode,
    ) -> StoreResult<()> {
        let at = self.at(path)?;
        let (p, n) = (xattr_path(&at)?, xattr_name(name)?);
        let flags = match mode {
            XattrMode::Set => 0,
            XattrMode::Create => libc::XATTR_CREATE,
            XattrMode::Replace => libc::XATTR_REPLACE,
        };
        // SAFETY: NUL-terminated strings and a value of its length.
        check(unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
        .map_err(|e| match e.raw_os_error() {
            // ext4's answer for attributes that do not fit the file's attribute space; a full
            // disk shows in the writes that need room.
            Some(libc::ENOSPC) => StoreError::answer(libc::ENOSPC),
            _ => e.into(),
        })
    }

    fn list_xattr(&self, path: &Path) -> StoreResult<Vec<OsString>> {
        let at = self.at(path)?;
        Ok(list_user_xattrs(&xattr_path(&at)?)?)
    }

    fn remove_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<()> {
        let at = self.at(path)?;
        let (p, n) = (xattr_path(&at)?, xattr_name(name)?);
        // SAFETY: NUL-terminated strings.
        Ok(check(unsafe {
            libc::lremovexattr(p.as_ptr(), n.as_ptr())
        })?)
    }

    /// The disk is asked every time, but resolved directories are kept for a moment (see
    /// `at::DirCache`): a directory moved or removed by another process is resolved again at
    /// the next operation, as the kernel's caches of the mounts look their names up again.
    fn forget(&self, _path: &Path, tree: bool) {
        if tree {
            self.dirs.forget_all();
        }
    }

    /// A file's name: no directory resolved changes.
    fn forget_removed(&self, _path: &Path) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Change;
    use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
    use std::time::Duration;

    /// Commits `copy` whole at `path` (opened as the base first).
    fn commit_whole(
        s: &LocalStore,
        path: &str,
        copy: &Arc<dyn WorkingCopy>,
        durable: bool,
    ) -> Committed {
        let path = Path::new(path);
        let base = s.open(path).unwrap();
        s.commit(CommitRequest {
            path,
            base: &base,
            change: Change::Whole(copy),
            durable,
            attrs: None,
        })
        .unwrap()
    }

    /// A directory or node just made and swapped for a symlink before its mode is set (an
    /// agent racing on the disk, or through another mount): the mode is not set through the
    /// link on what it points at (a root daemon would make any file set-user-ID root).
    #[test]
    fn a_new_entry_swapped_for_a_symlink_does_not_pass_its_mode_on() {
        let tmp = tempfile::tempdir().unwrap();
        let s = test_store(tmp.path());
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"#!/bin/sh").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join("rooms/r/p")).unwrap();
        let at = s.at(Path::new("p")).unwrap();
        let e = LocalStore::settle_new(&at, 0o4777, None).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    /// A directory renamed at a file's name between the commit's check and its exchange (by
    /// a process outside this one's claims) is put back, not swapped into the staging area,
    /// where the replaced version is removed (with everything in it, at the latest when the
    /// staging area is).
    #[test]
    fn a_commit_never_swaps_a_directory_out() {
        let tmp = tempfile::tempdir().unwrap();
        let s = test_store(tmp.path());
        std::fs::create_dir(tmp.path().join("rooms/r/d")).unwrap();
        std::fs::write(tmp.path().join("rooms/r/d/keep"), b"keep").unwrap();
        let staged_name = "swap-test";
        let staged = s.staging.dir().at(Path::new(staged_name)).unwrap();
        staged
            .open(libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600)
            .unwrap();
        let target = s.at(Path::new("d")).unwrap();
        let e = s.swap_in(&staged, &target).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR));
        assert_eq!(
            std::fs::read(tmp.path().join("rooms/r/d/keep")).unwrap(),
            b"keep"
        );
        assert!(staged.stat().unwrap().st_mode & libc::S_IFMT == libc::S_IFREG);
    }

    /// Appends `tail` to `path`, based on `base`.
    fn append(s: &LocalStore, path: &str, base: &Arc<dyn Content>, tail: &[u8]) -> Committed {
        append_durably(s, path, base, tail, false)
    }

    /// Appends `tail` to `path`, based on `base`; `durable`: as `fsync` commits.
    fn append_durably(
        s: &LocalStore,
        path: &str,
        base: &Arc<dyn Content>,
        tail: &[u8],
        durable: bool,
    ) -> Committed {
        s.commit(CommitRequest {
            path: Path::new(path),
            base,
            change: Change::Append { tail, follow: true },
            durable,
            attrs: None,
        })
        .unwrap()
    }

    /// Durable appends (a logger that `fsync`s each line, `--sync-on-close`) go in place too,
    /// with or without a crash marker, and leave none: readers of the versions before read
    /// on into them (through a copy, a reader of the empty log another mount appends to read
    /// nothing, and its kernel, told the longer size, zeros).
    #[test]
    fn durable_appends_are_committed_in_place() {
        let (_d, s) = store();
        let path = Path::new("log");
        fs::write(s.full(path), b"").unwrap();
        let inode = fs::metadata(s.full(path)).unwrap().ino();
        let reader = s.open(path).unwrap();
        let line = append_durably(&s, "log", &reader, b"one\n", true);
        let big = vec![b'x'; 10_000];
        append_durably(&s, "log", &line.content, &big, true);
        assert_eq!(fs::metadata(s.full(path)).unwrap().ino(), inode, "in place");
        let mut buf = vec![0u8; 20_000];
        assert_eq!(reader.read_appended_at(&mut buf, 0).unwrap(), 10_004);
        assert_eq!(&buf[..4], b"one\n");
        assert!(buf[4..10_004].iter().all(|&b| b == b'x'));
        // A marker is a second link to the file.
        assert_eq!(
            fs::metadata(s.full(path)).unwrap().nlink(),
            1,
            "no marker left"
        );
    }

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
        let inode = fs::metadata(s.full(path)).unwrap().ino();
        let appended = append(&s, "log", &reader, b"two\n");
        assert!(!appended.followed);
        assert_eq!(
            fs::metadata(s.full(path)).unwrap().ino(),
            inode,
            "appended in place"
        );
        assert_eq!(
            reader.read_at(&mut buf, 4).unwrap(),
            0,
            "its own version ends"
        );
        assert_eq!(reader.read_appended_at(&mut buf, 4).unwrap(), 4);
        assert_eq!(&buf[..4], b"two\n");
        // A second link while the file's flock is held is the marker of an append under
        // way: a read past the version waits for it to end (the kernel may know the longer
        // size already: a read answered short of it would leave zeros in its page).
        let changer = File::open(s.full(path)).unwrap();
        // SAFETY: a valid descriptor; flock touches no memory.
        assert_eq!(
            unsafe { libc::flock(changer.as_raw_fd(), libc::LOCK_EX) },
            0
        );
        let marker = s.full(Path::new("marker"));
        fs::hard_link(s.full(path), &marker).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(s.full(path))
            .unwrap()
            .write_all(b"thr")
            .unwrap();
        let waiting = std::thread::spawn({
            let reader = reader.clone();
            move || {
                let mut buf = [0u8; 16];
                let n = reader.read_appended_at(&mut buf, 4).unwrap();
                buf[..n].to_vec()
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!waiting.is_finished(), "waits for the append under way");
        fs::remove_file(&marker).unwrap();
        drop(changer);
        assert_eq!(waiting.join().unwrap(), b"two\nthr");
        assert_eq!(reader.read_appended_at(&mut buf, 4).unwrap(), 7);
        // A second link without the flock is a hard link: the file is read as it is now.
        fs::hard_link(s.full(path), s.full(Path::new("link"))).unwrap();
        fs::write(s.full(path), b"rewritten in place, longer\n").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(reader.read_at(&mut buf, 0).unwrap(), 27);
    }

    #[test]
    fn large_replaced_versions_are_removed_in_the_background() {
        let (d, s) = store();
        let big = vec![7u8; 1 << 20];
        fs::write(s.full(Path::new("f")), &big).unwrap();
        let copy = s.working_copy(Path::new("f")).unwrap();
        copy.write_at(b"small", 0).unwrap();
        commit_whole(&s, "f", &copy, false);
        drop(copy);
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
            let copy = s.working_copy(Path::new("f")).unwrap();
            let staging =
                fs::read_link(format!("/proc/self/fd/{}", s.staging.dir().as_raw_fd())).unwrap();
            copy.write_at(b"new", 0).unwrap();
            let committed = commit_whole(&s, "f", &copy, true).content;
            drop(copy);
            let mut buf = [0u8; 8];
            assert_eq!(
                old.read_at(&mut buf, 0).unwrap(),
                0,
                "old snapshot stays empty"
            );
            assert_eq!(committed.read_at(&mut buf, 0).unwrap(), 3);
            assert_eq!(fs::read(s.full(Path::new("f"))).unwrap(), b"new");
            assert_eq!(s.stat(Path::new("f")).unwrap().perm, 0o640);
            // (Its `spread-N` subdirectories aside: see `StagingArea::new_file`.)
            let left: Vec<_> = fs::read_dir(&staging)
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| !e.file_type().unwrap().is_dir())
                .map(|e| e.file_name())
                .filter(|n| n != "lock")
                .collect();
            assert!(left.is_empty(), "nothing left in staging: {left:?}");
        }
    }

    #[test]
    fn working_copies_seed_in_the_kernel_and_go_when_dropped() {
        let (_d, s) = store();
        fs::write(s.full(Path::new("f")), b"hello world").unwrap();
        let seed = s.open(Path::new("f")).unwrap();
        let copy = s.working_copy(Path::new("f")).unwrap();
        crate::store::copy_range(seed.as_ref(), copy.as_ref(), 0, 11).unwrap();
        let mut buf = vec![0u8; 32];
        let n = copy.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"hello world");
        let staging =
            fs::read_link(format!("/proc/self/fd/{}", s.staging.dir().as_raw_fd())).unwrap();
        let names = || {
            fs::read_dir(&staging)
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_name() != "lock" && !e.file_type().unwrap().is_dir())
                .count()
        };
        assert_eq!(names(), 1);
        drop(copy);
        assert_eq!(names(), 0, "an uncommitted copy is discarded when dropped");
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
            let reader = scope.spawn(|| s.open(Path::new("log")).unwrap().meta().size);
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
        assert_eq!(content.meta().size, 16);
        assert_eq!(fs::read(&target).unwrap(), b"whole\nhalf line\n");
        assert!(!stale.exists(), "the stale staging is gone");
    }

    /// `target` opened with the exclusive lock a patcher holds while it writes.
    fn patching(target: &Path) -> fs::File {
        let patcher = fs::OpenOptions::new().write(true).open(target).unwrap();
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        assert_eq!(
            unsafe { libc::fcntl(patcher.as_raw_fd(), libc::F_OFD_SETLK, &lock) },
            0
        );
        patcher
    }

    #[test]
    fn a_reader_opening_during_a_patch_gets_the_patched_version() {
        let (_d, s) = store();
        let target = s.full(Path::new("db"));
        fs::write(&target, vec![b'o'; PATCH_MIN as usize]).unwrap();
        // A patcher holds the exclusive lock (as `patch_in_place` does while writing).
        let patcher = patching(&target);
        let seen = std::thread::scope(|scope| {
            let reader = scope.spawn(|| s.open(Path::new("db")).unwrap());
            std::thread::sleep(Duration::from_millis(50));
            assert!(!reader.is_finished(), "the reader waits for the patch");
            patcher.write_all_at(b"grown", PATCH_MIN).unwrap();
            drop(patcher);
            reader.join().unwrap()
        });
        assert_eq!(seen.meta().size, PATCH_MIN + 5, "the size after the patch");
        let mut tail = [0u8; 5];
        assert_eq!(seen.read_at(&mut tail, PATCH_MIN).unwrap(), 5);
        assert_eq!(&tail, b"grown");
    }

    /// The patcher a reader waits for dies half way: the reader finishes the patch from the
    /// dead process's marker before it reads, rather than read half of it.
    #[test]
    fn a_reader_waiting_for_a_patch_whose_process_died_finishes_it_first() {
        use super::patch::PatchMark;
        let (d, s) = store();
        let target = s.full(Path::new("db"));
        fs::write(&target, vec![b'o'; PATCH_MIN as usize]).unwrap();
        let patcher = patching(&target);
        let seen = std::thread::scope(|scope| {
            let reader = scope.spawn(|| s.open(Path::new("db")).unwrap());
            std::thread::sleep(Duration::from_millis(50));
            assert!(!reader.is_finished(), "the reader waits for the patch");
            // What the patcher's process leaves as it dies half way: its staging directory
            // (lock free), the new version's blocks and the file's marker, half of it applied.
            let dead = d.path().join(".staging/999998-7");
            fs::create_dir_all(&dead).unwrap();
            fs::write(dead.join("lock"), b"").unwrap();
            let marker = PatchMark {
                from: PATCH_MIN,
                to: PATCH_MIN,
            }
            .name(0);
            fs::write(
                dead.join(PatchMark::data_name(&marker)),
                vec![b'n'; PATCH_MIN as usize],
            )
            .unwrap();
            fs::hard_link(&target, dead.join(&marker)).unwrap();
            patcher
                .write_all_at(&vec![b'n'; PATCH_MIN as usize / 2], 0)
                .unwrap();
            drop(patcher);
            reader.join().unwrap()
        });
        let mut all = vec![0u8; PATCH_MIN as usize];
        let mut done = 0;
        while done < all.len() {
            done += seen.read_at(&mut all[done..], done as u64).unwrap();
        }
        assert!(
            all.iter().all(|&b| b == b'n'),
            "the whole patch, never half"
        );
    }

    #[test]
    fn directories_renamed_or_removed_through_the_store_are_seen_at_once() {
        let (_d, s) = store();
        s.mkdir(Path::new("a"), 0o755, None).unwrap();
        s.create(Path::new("a/x"), 0o644, None, true).unwrap();
        s.rename(Path::new("a"), Path::new("b"), RenameMode::Replace)
            .unwrap();
        s.mkdir(Path::new("a"), 0o755, None).unwrap();
        s.create(Path::new("a/y"), 0o644, None, true).unwrap();
        assert!(s.full(Path::new("a/y")).exists(), "in the new directory");
        assert!(!s.full(Path::new("b/y")).exists());
        s.unlink(Path::new("a/y")).unwrap();
        s.rmdir(Path::new("a")).unwrap();
        s.mkdir(Path::new("a"), 0o755, None).unwrap();
        s.create(Path::new("a/z"), 0o644, None, true).unwrap();
        assert!(s.full(Path::new("a/z")).exists());
        // Swapped: each name reaches the other directory now.
        s.rename(Path::new("a"), Path::new("b"), RenameMode::Exchange)
            .unwrap();
        assert!(s.stat(Path::new("a/x")).is_ok());
        assert!(s.stat(Path::new("b/z")).is_ok());
    }

    #[test]
    fn rename_noreplace_and_exchange() {
        let (_d, s) = store();
        fs::write(s.full(Path::new("a")), b"A").unwrap();
        fs::write(s.full(Path::new("b")), b"B").unwrap();
        let err = s
            .rename(Path::new("a"), Path::new("b"), RenameMode::NoReplace)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), libc::EEXIST);
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
        assert_eq!(dev.unwrap_err().raw_os_error(), libc::EPERM);
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
        assert_eq!(open.unwrap_err().raw_os_error(), libc::EISDIR);
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
        let copy = s.working_copy(Path::new("f")).unwrap();
        copy.write_at(b"long", 0).unwrap();
        commit_whole(&s, a.to_str().unwrap(), &copy, true);
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
