//! The local-disk store: a space is a plain directory tree under the data dir, so operators can
//! inspect and back it up with ordinary tools. Working copies live in a staging area on the
//! same filesystem, so a commit is one atomic exchange of names (`renameat2`).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::append::{append_in_place, roll_back_unfinished};
use super::patch::{PATCH_MIN, Patch, finish_unfinished, hold_for_reading, patch_in_place};
use super::{
    Content, DirEntry, Kind, Meta, Owner, RenameMode, SetAttr, Staged, Store, StoreStatfs, TimeSpec,
};

/// A space stored as a directory tree on local disk.
pub struct LocalStore {
    root: PathBuf,
    staging: Arc<StagingArea>,
    /// Set when a reader could not take its read lock: patches would no longer be isolated.
    no_patches: AtomicBool,
}

impl LocalStore {
    /// Opens (creating if needed) the space directory `root`, staging working copies in `staging`.
    pub fn open(root: PathBuf, staging: Arc<StagingArea>) -> io::Result<LocalStore> {
        fs::create_dir_all(&root)?;
        Ok(LocalStore {
            root,
            staging,
            no_patches: AtomicBool::new(false),
        })
    }

    /// The committed content in `file`, with its attributes `meta`. A reader of a patchable
    /// file holds the read lock (see `patch`), waiting for a patch under way to finish (the
    /// attributes are then read again, only then).
    fn content(&self, file: File, mut meta: fs::Metadata) -> Arc<dyn Content> {
        if meta.len() >= PATCH_MIN {
            match hold_for_reading(&file) {
                Ok(false) => {}
                Ok(true) => meta = file.metadata().unwrap_or(meta),
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
        Arc::new(LocalContent::new(file, &meta))
    }

    /// Attributes of `file`, which has a second link: the crash marker of an in-place append
    /// or patch. One under way holds the file's `flock` (wait for it to end); one whose process
    /// died is finished or undone first. Either way the attributes are of a whole version.
    fn settled(&self, file: &File) -> io::Result<fs::Metadata> {
        let fd = file.as_raw_fd();
        while unsafe { libc::flock(fd, libc::LOCK_SH) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
        let mut meta = file.metadata();
        if meta.as_ref().is_ok_and(|m| m.nlink() > 1) {
            self.staging.recover_stale();
            meta = file.metadata();
        }
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        meta
    }

    fn full(&self, path: &Path) -> PathBuf {
        if path.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(path)
        }
    }
}

/// The per-process directory of working copies, `<data-dir>/.staging/<instance>/`.
///
/// Each process holds an exclusive `flock` on its instance's `lock` file; at start-up, instance
/// directories whose lock can be taken belong to processes that are gone (a crash, `kill -9`) and
/// are removed: their working copies were never committed, so the committed files are untouched.
pub struct StagingArea {
    dir: PathBuf,
    counter: AtomicU64,
    /// Removes replaced versions of large files off the request path, started at first use.
    remover: Mutex<Option<mpsc::Sender<PathBuf>>>,
    _lock: nix::fcntl::Flock<File>,
}

/// Replaced versions at least this large are removed in the background: freeing their blocks
/// takes milliseconds on ext4 (more with `discard`), which `close()` would otherwise wait for.
const REMOVE_LATER_SIZE: u64 = 1 << 20;

impl StagingArea {
    /// Creates this process's staging directory under `data_dir` and removes stale ones.
    pub fn create(data_dir: &Path) -> io::Result<(StagingArea, usize)> {
        let base = data_dir.join(".staging");
        fs::create_dir_all(&base)?;
        let removed = Self::remove_stale(&base, true)?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir = base.join(format!("{}-{nanos}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let lock = nix::fcntl::Flock::lock(
            File::create(dir.join("lock"))?,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| io::Error::from(e))?;
        Ok((
            StagingArea {
                dir,
                counter: AtomicU64::new(0),
                remover: Mutex::new(None),
                _lock: lock,
            },
            removed,
        ))
    }

    /// Removes instance directories no live process holds, after finishing the patches and
    /// undoing the appends they left unfinished; returns how many working copies were dropped.
    /// `at_start`: also directories without a lock file (later, one may be a process starting).
    fn remove_stale(base: &Path, at_start: bool) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(base)? {
            let entry = entry?;
            let dir = entry.path();
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let Ok(lock) = File::open(dir.join("lock")) else {
                if !at_start {
                    continue;
                }
                // A directory without a lock file was never fully created: stale.
                removed += count_files(&dir);
                fs::remove_dir_all(&dir)?;
                continue;
            };
            match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(_held) => {
                    finish_unfinished(&dir);
                    roll_back_unfinished(&dir);
                    removed += count_files(&dir).saturating_sub(1);
                    fs::remove_dir_all(&dir)?;
                }
                Err(_) => continue, // a live process owns it
            }
        }
        Ok(removed)
    }

    /// Recovers what dead processes left unfinished, while running: a file that still shows a
    /// crash marker's second link must be whole before anybody reads it.
    fn recover_stale(&self) {
        let Some(base) = self.dir.parent() else {
            return;
        };
        if let Err(e) = Self::remove_stale(base, false) {
            log::warn!("could not recover stale staging: {e}");
        }
    }

    /// A fresh name in this staging area.
    fn new_name(&self, name: impl FnOnce(u64) -> String) -> PathBuf {
        self.dir
            .join(name(self.counter.fetch_add(1, Ordering::Relaxed)))
    }

    fn new_file(&self) -> io::Result<(File, PathBuf)> {
        let path = self.new_name(|n| format!("w{n}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        Ok((file, path))
    }
}

impl StagingArea {
    /// Removes `path` (a replaced version inside this staging area) now, or soon on a
    /// background thread if it is large. One left behind by a crash is stale staging, removed
    /// at the next start.
    fn remove_replaced(&self, path: &Path, size: u64) {
        if size >= REMOVE_LATER_SIZE {
            let mut remover = self.remover.lock().unwrap_or_else(|e| e.into_inner());
            if remover.is_none() {
                let (tx, rx) = mpsc::channel::<PathBuf>();
                let spawned = std::thread::Builder::new()
                    .name("roomfs-remove".into())
                    .spawn(move || {
                        for path in rx {
                            if let Err(e) = fs::remove_file(&path) {
                                log::warn!("could not remove {}: {e}", path.display());
                            }
                        }
                    });
                if spawned.is_ok() {
                    *remover = Some(tx);
                }
            }
            if let Some(tx) = remover.as_ref()
                && tx.send(path.to_path_buf()).is_ok()
            {
                return;
            }
        }
        if let Err(e) = fs::remove_file(path) {
            log::warn!("could not remove {}: {e}", path.display());
        }
    }
}

impl Drop for StagingArea {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Committed content backed by an open local file, with its attributes read once.
struct LocalContent {
    file: File,
    meta: Meta,
}

impl LocalContent {
    fn new(file: File, meta: &fs::Metadata) -> LocalContent {
        LocalContent {
            meta: meta_of(meta),
            file,
        }
    }
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

/// The store's kind of a local file type.
fn kind_of(ft: fs::FileType) -> Kind {
    if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Special
    }
}

/// Converts local metadata into the store's attribute type.
pub fn meta_of(m: &fs::Metadata) -> Meta {
    Meta {
        kind: kind_of(m.file_type()),
        size: m.size(),
        blocks: m.blocks(),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        version: (m.dev(), m.ino(), m.ctime() * 1_000_000_000 + m.ctime_nsec()),
        volatile: false,
    }
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
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

/// `renameat2(from, to, flags)` on full paths.
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    })
}

fn sync_dir_of(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    File::open(dir)?.sync_all()
}

impl Store for LocalStore {
    fn stat(&self, path: &Path) -> io::Result<Meta> {
        Ok(meta_of(&fs::symlink_metadata(self.full(path))?))
    }

    fn list(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.full(path))? {
            let entry = entry?;
            out.push(DirEntry {
                kind: kind_of(entry.file_type()?),
                name: entry.file_name(),
            });
        }
        Ok(out)
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn Content>> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.full(path))?;
        let mut meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        if meta.nlink() > 1 {
            meta = self.settled(&file)?;
        }
        Ok(self.content(file, meta))
    }

    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> io::Result<Meta> {
        let mut opts = OpenOptions::new();
        opts.write(true)
            .mode(u32::from(perm))
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
        if exclusive {
            opts.create_new(true);
        } else {
            opts.create(true);
        }
        let file = opts.open(self.full(path))?;
        file.set_permissions(fs::Permissions::from_mode(u32::from(perm)))?;
        chown_file(&file, owner)?;
        Ok(meta_of(&file.metadata()?))
    }

    fn stage(&self, seed: Option<&dyn Content>) -> io::Result<Staged> {
        let (file, path) = self.staging.new_file()?;
        let staged = Staged { file, path };
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
        let target = self.full(path);
        let prepared = (|| {
            // The new content takes over the identity (mode, owner) of the file it replaces.
            let current = fs::symlink_metadata(&target)?;
            if !current.is_file() {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            staged.file.set_permissions(current.permissions())?;
            if nix::unistd::geteuid().is_root() {
                chown_file(&staged.file, Some((current.uid(), current.gid())))?;
            }
            if durable {
                staged.file.sync_all()?;
            }
            let before = staged.file.metadata()?;
            // Swap the new content in, then drop the old: unlike a rename over an existing
            // file, an exchange does not make ext4 force the new data to disk (auto_da_alloc),
            // which costs ~0.4 ms per commit. Durability is fsync's job (above).
            renameat2(&staged.path, &target, libc::RENAME_EXCHANGE)
                .map(|()| (before, current.len()))
        })();
        let (before, replaced_size) = match prepared {
            Ok(sizes) => sizes,
            Err(e) => return Err((e, staged)),
        };
        // The staging path now names the replaced version.
        self.staging.remove_replaced(&staged.path, replaced_size);
        if durable && let Err(e) = sync_dir_of(&target) {
            log::error!(
                "committed {} but could not sync its directory: {e}",
                path.display()
            );
        }
        // Read after the exchange: it changed the ctime, part of the version readers compare.
        let meta = staged.file.metadata().unwrap_or(before);
        Ok(self.content(staged.file, meta))
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
        let appended = append_in_place(&self.full(path), (dev, ino), was.size, tail, |mark| {
            self.staging.new_name(|n| mark.name(n))
        })?;
        Ok(match appended {
            Some(file) => {
                let meta = file.metadata()?;
                Some(self.content(file, meta))
            }
            None => None,
        })
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
            staged_path: &staged.path,
            from: was.size,
            to,
            written,
            durable,
        };
        let (dev, ino, _) = was.version;
        let patched = patch_in_place(&self.full(path), base_file, (dev, ino), &patch, |mark| {
            self.staging.new_name(|n| mark.name(n))
        })?;
        Ok(match patched {
            Some(file) => {
                let meta = file.metadata()?;
                Some(self.content(file, meta))
            }
            None => None,
        })
    }

    fn discard(&self, staged: Staged) {
        if let Err(e) = fs::remove_file(&staged.path) {
            log::warn!(
                "could not remove working copy {}: {e}",
                staged.path.display()
            );
        }
    }

    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> io::Result<Meta> {
        let full = self.full(path);
        fs::DirBuilder::new().mode(u32::from(perm)).create(&full)?;
        let c = cstr(&full)?;
        // Apply the exact mode (the process umask must not narrow it) and the owner.
        check(unsafe { libc::chmod(c.as_ptr(), libc::mode_t::from(perm)) })?;
        if let Some((uid, gid)) = owner {
            check(unsafe { libc::lchown(c.as_ptr(), uid, gid) })?;
        }
        self.stat(path)
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(self.full(path))
    }

    fn unlink(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(self.full(path))
    }

    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> io::Result<()> {
        let flags = match mode {
            RenameMode::Replace => 0,
            RenameMode::NoReplace => libc::RENAME_NOREPLACE,
            RenameMode::Exchange => libc::RENAME_EXCHANGE,
        };
        renameat2(&self.full(from), &self.full(to), flags)
    }

    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> io::Result<Meta> {
        let full = self.full(path);
        std::os::unix::fs::symlink(target, &full)?;
        if let Some((uid, gid)) = owner {
            let c = cstr(&full)?;
            check(unsafe { libc::lchown(c.as_ptr(), uid, gid) })?;
        }
        self.stat(path)
    }

    fn readlink(&self, path: &Path) -> io::Result<PathBuf> {
        fs::read_link(self.full(path))
    }

    fn set_attr(&self, path: &Path, attr: &SetAttr) -> io::Result<Meta> {
        let c = cstr(&self.full(path))?;
        if let Some(perm) = attr.perm {
            check(unsafe {
                libc::fchmodat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    libc::mode_t::from(perm),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if attr.uid.is_some() || attr.gid.is_some() {
            let uid = attr.uid.unwrap_or(u32::MAX);
            let gid = attr.gid.unwrap_or(u32::MAX);
            check(unsafe { libc::lchown(c.as_ptr(), uid, gid) })?;
        }
        if attr.atime.is_some() || attr.mtime.is_some() {
            let times = [timespec(attr.atime), timespec(attr.mtime)];
            check(unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        self.stat(path)
    }

    fn sync(&self, path: &Path) -> io::Result<()> {
        let full = self.full(path);
        File::open(&full)?.sync_all()?;
        sync_dir_of(&full)
    }

    fn statfs(&self) -> io::Result<StoreStatfs> {
        let s = nix::sys::statvfs::statvfs(&self.root).map_err(io::Error::from)?;
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

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let (area, _) = StagingArea::create(dir.path()).unwrap();
        let store = LocalStore::open(dir.path().join("rooms/r"), Arc::new(area)).unwrap();
        (dir, store)
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
        let big = vec![7u8; REMOVE_LATER_SIZE as usize];
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
        let (_d, s) = store();
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
        let (area, removed) = StagingArea::create(dir.path()).unwrap();
        assert_eq!(removed, 1);
        assert!(!stale.exists());
        // A live area is not removed by a second process starting.
        let (_other, removed2) = StagingArea::create(dir.path()).unwrap();
        assert_eq!(removed2, 0);
        assert!(area.dir.exists());
    }

    #[test]
    fn opening_a_file_with_a_crash_marker_waits_for_or_recovers_it() {
        use crate::store::append::AppendMark;
        let (d, s) = store();
        let target = s.full(Path::new("log"));
        fs::write(&target, b"whole\n").unwrap();
        // An append under way in a live process: it holds the flock and a marker link.
        let appender = OpenOptions::new().append(true).open(&target).unwrap();
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
        let patcher = OpenOptions::new().write(true).open(&target).unwrap();
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
}
