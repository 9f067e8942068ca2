//! The filesystem core: inodes, open handles, staged writes committed on close, directory
//! listings. It knows nothing of FUSE: every operation takes plain values and returns an
//! [`Errno`] on failure, so it is tested without a mount.

pub mod closers;
pub mod error;
pub mod handle;
pub mod inode;
pub mod passthrough;
pub mod quota;
pub mod seed;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

pub use closers::Tid;
pub use error::{Errno, FsResult};
use handle::{Allocation, DirHandle, DirItem, FileHandle};
use inode::InodeTable;
pub use inode::{Ino, ROOT};
pub use passthrough::{Backing, PASSTHROUGH_MIN};
use passthrough::{Passing, Window};
pub use quota::{Limits, Quota, Usage};

use crate::grant::{Access, Grant};
use crate::store::{Content, Kind, Meta, Owner, RenameMode, SetAttr, Store, StoreStatfs};

/// Longest file name accepted (as on ext4 and most Linux filesystems).
pub const NAME_MAX: usize = 255;

/// Options of the filesystem core.
#[derive(Clone, Debug, Default)]
pub struct FsOptions {
    /// Make every commit durable (file and directory fsync), not only those asked by `fsync`.
    pub sync_on_close: bool,
    /// Give new entries the caller's uid/gid (needs a root daemon).
    pub owner_from_caller: bool,
    /// The paths this mount may touch; everything else is EACCES.
    pub grant: Grant,
    /// Symlinks may point anywhere (the operator's own, full-access mounts); otherwise they must
    /// stay within the grant.
    pub links_anywhere: bool,
    /// The space's limits and usage, shared by all its mounts; `None` is unlimited.
    pub quota: Option<Arc<Quota>>,
    /// Let the kernel read large files from the disk directly (see `passthrough`).
    pub passthrough: bool,
}

/// Attributes of an inode as shown to programs.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// The device number of a device node (see `Meta::rdev`).
    pub rdev: u64,
    /// Generated content: the kernel must ask again every time.
    pub volatile: bool,
}

impl Attr {
    fn new(ino: Ino, meta: &Meta) -> Attr {
        Attr {
            ino,
            kind: meta.kind,
            size: meta.size,
            blocks: meta.blocks,
            perm: meta.perm,
            nlink: meta.nlink,
            uid: meta.uid,
            gid: meta.gid,
            atime: meta.atime,
            mtime: meta.mtime,
            ctime: meta.ctime,
            rdev: meta.rdev,
            volatile: meta.volatile,
        }
    }
}

/// Who asks for an operation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Requested attribute changes (`setattr`): a new size, and the rest as the store takes them.
#[derive(Clone, Debug, Default)]
pub struct AttrChanges {
    pub size: Option<u64>,
    pub attr: SetAttr,
    /// The thread asking (see `closers`); 0 when unknown.
    pub by: Tid,
}

/// The result of opening a file: the handle, and how the kernel should cache it.
#[derive(Clone, Copy, Debug)]
pub struct Opened {
    pub fh: u64,
    /// Bypass the kernel page cache for this handle (its reads and writes come to us).
    pub direct_io: bool,
    /// The kernel's cached pages of this file are still the committed content: keep them.
    pub keep_cache: bool,
    /// Closing it commits nothing (read-only), so the kernel need not send `flush`.
    pub no_flush: bool,
    /// The backing file the kernel is to read this handle's file from (see `passthrough`;
    /// with `direct_io`, a write-only open that only names it).
    pub passthrough: Option<u32>,
}

/// One entry produced by `readdir`.
#[derive(Clone, Debug)]
pub struct Listed {
    pub ino: Ino,
    /// The offset of the entry after this one.
    pub next: u64,
    pub kind: Kind,
    pub name: std::ffi::OsString,
}

/// Per-inode bookkeeping of open handles, which decides how the kernel may cache the file.
///
/// The kernel page cache is shared by every handle of an inode, but a writer's changes must stay
/// invisible until its commit. So: a writer alone on the inode goes through the page cache; any
/// handle opened while another writer (or, for a writer, anyone) has the inode open is served
/// with direct I/O, which bypasses the cache. Readers keep the cached pages only when they
/// are known to hold the current committed version. Read-write opens that share one handle
/// (see `open_path`) are one writer as far as the cache goes: they all see its working copy.
#[derive(Default)]
struct OpenState {
    readers: u32,
    writers: u32,
    /// Readers that read through the page cache (opened while no writer was open).
    cached_readers: u32,
    /// The open handles of this inode.
    handles: Vec<u64>,
    /// The committed version the kernel's cached pages hold, if known.
    cached_version: Option<(u64, u64, i64)>,
    /// The handle that read-write opens without `O_TRUNC`/`O_APPEND` share, and how many of
    /// the open file handles are it.
    shared: Option<(Arc<Mutex<FileHandle>>, u32)>,
    /// The kernel's passthrough of this inode, while handles opened with it are open.
    window: Option<Window>,
}

/// Tells the kernel that what it cached about an inode is stale (the FUSE adapter implements
/// it with FUSE notifications; without a mount there is nothing to tell).
pub trait KernelCache: Send + Sync {
    /// The attributes (size, times) of `ino` changed.
    fn attributes_changed(&self, ino: Ino);
    /// The content of `ino` changed: cached pages and attributes are stale. Called with file
    /// handles locked, so it must not wait for the kernel (which may wait for a read that
    /// waits for such a lock).
    fn data_changed(&self, ino: Ino);
}

/// How often a commit of appends retries in place while other appenders get in its way, and
/// the pause between tries (at most 10 ms in all; then it commits through a working copy).
const APPEND_RETRIES: u32 = 50;
const APPEND_RETRY_PAUSE: Duration = Duration::from_micros(200);
/// The most bytes an appender's working copy may hold for them to be appended to a version
/// others committed meanwhile (they are read into memory); past that, its copy wins whole.
const APPENDS_TAKEN_BACK_MAX: u64 = 64 << 20;

/// A mounted space: the store plus the state of the kernel's view of it.
pub struct Fs {
    store: Arc<dyn Store>,
    kernel: std::sync::OnceLock<Box<dyn KernelCache>>,
    /// The kernel's passthrough, when the mount has it (see `passthrough`).
    backing: std::sync::OnceLock<Box<dyn Backing>>,
    /// Registering a backing file failed once: large files are read through the daemon.
    passthrough_failed: AtomicBool,
    options: FsOptions,
    table: RwLock<InodeTable>,
    opens: Mutex<HashMap<Ino, OpenState>>,
    files: RwLock<HashMap<u64, Arc<Mutex<FileHandle>>>>,
    dirs: Mutex<HashMap<u64, DirHandle>>,
    next_fh: AtomicU64,
    /// Unix seconds of the last open, listing or change (inactivity timeouts use it).
    last_activity: AtomicU64,
    /// Commits of appends to one inode take turns in this mount (inodes share these locks by
    /// number): in place or through a working copy, none can land between another's look at
    /// the file and its commit. Other mounts and processes are met by `Store::append`'s checks.
    append_turns: [Mutex<()>; APPEND_TURNS],
}

/// How many locks the inodes' append commits share (see `Fs::append_turns`).
const APPEND_TURNS: usize = 64;

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Logs a refused operation and returns its errno (EACCES, also under read-only prefixes).
fn deny(op: &str, path: &Path, why: &dyn std::fmt::Display) -> Errno {
    log::info!("denied {op} {:?}: {why}", path);
    crate::metrics::denied();
    Errno::EACCES
}

fn check_name(name: &OsStr) -> FsResult<()> {
    let bytes = name.as_bytes();
    if bytes.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

impl Fs {
    pub fn new(store: Arc<dyn Store>, options: FsOptions) -> Fs {
        Fs {
            store,
            kernel: std::sync::OnceLock::new(),
            backing: std::sync::OnceLock::new(),
            passthrough_failed: AtomicBool::new(false),
            options,
            table: RwLock::new(InodeTable::default()),
            opens: Mutex::new(HashMap::new()),
            files: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            last_activity: AtomicU64::new(unix_secs()),
            append_turns: std::array::from_fn(|_| Mutex::new(())),
        }
    }

    /// Unix seconds of the last open, listing or change through this mount.
    pub fn last_activity(&self) -> u64 {
        self.last_activity.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        self.last_activity.store(unix_secs(), Ordering::Relaxed);
    }

    /// Connects the kernel's caches, once the mount exists.
    pub fn set_kernel_cache(&self, kernel: Box<dyn KernelCache>) {
        let _ = self.kernel.set(kernel);
    }

    /// The grant's decision for `op` on `path`; a refusal is logged so operators see what a
    /// sandbox tried.
    fn allow(&self, op: &str, path: &Path, access: Access) -> FsResult<()> {
        if self.options.grant.is_full() {
            return Ok(());
        }
        self.options
            .grant
            .check(path.as_os_str().as_bytes(), access)
            .map_err(|denied| deny(op, path, &denied))
    }

    /// Directories above granted prefixes may be traversed and listed (filtered), not read.
    fn allow_traverse(&self, op: &str, path: &Path) -> FsResult<()> {
        if self.options.grant.can_traverse(path.as_os_str().as_bytes()) {
            Ok(())
        } else {
            Err(deny(op, path, &"outside the grant"))
        }
    }

    /// Under a restricted grant, a symlink at `link` may only point at paths the grant shows:
    /// never outside the space (absolute, or climbing above the root) or outside the grant,
    /// because other participants of the room would follow it with their own rights.
    fn allow_link_target(&self, op: &str, link: &Path, target: &Path) -> FsResult<()> {
        if self.options.links_anywhere {
            return Ok(());
        }
        let mut resolved: Vec<&OsStr> = link
            .parent()
            .map(|p| p.iter().collect())
            .unwrap_or_default();
        let mut inside = !target.is_absolute();
        for part in target.iter() {
            match part.as_bytes() {
                b"." => {}
                b".." => inside &= resolved.pop().is_some(),
                _ => resolved.push(part),
            }
        }
        let resolved: PathBuf = resolved.iter().collect();
        if inside
            && self
                .options
                .grant
                .can_traverse(resolved.as_os_str().as_bytes())
        {
            Ok(())
        } else {
            Err(deny(
                op,
                link,
                &format!("its target {target:?} leaves the grant"),
            ))
        }
    }

    /// Whether `name` in the directory `dir` is visible through the grant.
    fn shows(&self, dir: &Path, name: &OsStr) -> bool {
        self.options
            .grant
            .shows(dir.as_os_str().as_bytes(), name.as_bytes())
    }

    /// Runs `create` holding one reserved entry of the quota (released if it fails).
    fn creating<T>(&self, create: impl FnOnce() -> FsResult<T>) -> FsResult<T> {
        self.touch();
        if let Some(q) = &self.options.quota {
            q.add_entry()?;
        }
        let result = create();
        if result.is_err()
            && let Some(q) = &self.options.quota
        {
            q.remove_entry(0);
        }
        result
    }

    fn owner(&self, caller: &Caller) -> Owner {
        self.options
            .owner_from_caller
            .then_some((caller.uid, caller.gid))
    }

    /// The path of `ino`, or ENOENT if it no longer has a name.
    fn path(&self, ino: Ino) -> FsResult<PathBuf> {
        read_lock(&self.table).path(ino).ok_or(Errno::ENOENT)
    }

    /// The path of `name` inside the directory `parent`, after checking the name.
    fn child_path(&self, parent: Ino, name: &OsStr) -> FsResult<PathBuf> {
        check_name(name)?;
        let table = read_lock(&self.table);
        if table.kind(parent) != Some(Kind::Dir) {
            return Err(if table.kind(parent).is_some() {
                Errno::ENOTDIR
            } else {
                Errno::ENOENT
            });
        }
        Ok(table.path(parent).ok_or(Errno::ENOENT)?.join(name))
    }

    fn remember(&self, parent: Ino, name: &OsStr, meta: &Meta) -> Attr {
        let ino = write_lock(&self.table).remember(parent, name, meta.kind);
        self.as_open(Attr::new(ino, meta))
    }

    /// `attr`, read from the store, as the kernel must see it: while the file is open, what
    /// `getattr` shows (a writer's uncommitted size, see there). The kernel takes the size in
    /// every reply that carries attributes (lookup, readdirplus, create) as the file's size, and
    /// would otherwise cut the writer's own reads and mappings at the committed size.
    fn as_open(&self, attr: Attr) -> Attr {
        let open = lock(&self.opens)
            .get(&attr.ino)
            .is_some_and(|state| !state.handles.is_empty());
        if open {
            self.getattr(attr.ino, None).unwrap_or(attr)
        } else {
            attr
        }
    }

    fn file(&self, fh: u64) -> FsResult<Arc<Mutex<FileHandle>>> {
        read_lock(&self.files).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    // ---- names ---------------------------------------------------------------------------

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
                if e.raw_os_error() == Some(libc::ENOENT) {
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

    /// Attributes of `ino`.
    ///
    /// The kernel keeps one size per inode and cuts reads through the page cache at it (FUSE
    /// sends no file handle with `fstat`). So while a reader that reads through the page cache
    /// has the file open, the committed size is shown: a writer that came later must not make
    /// that reader see a cut version. Otherwise a handle's uncommitted working copy is shown, so
    /// a writer sees its own size. A file unlinked while open shows the content its handles
    /// still hold.
    pub fn getattr(&self, ino: Ino, fh: Option<u64>) -> FsResult<Attr> {
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
                // A `chmod`/`chown` since the handle opened went to the committed file.
                match path.as_ref().map(|p| self.store.stat(p)) {
                    Some(Ok(now)) => (meta.perm, meta.uid, meta.gid) = (now.perm, now.uid, now.gid),
                    Some(Err(_)) => {}
                    None => meta.nlink = 0, // unlinked while open
                }
                return Ok(Attr::new(ino, &meta));
            }
            if path.is_none() && fallback.is_none() {
                fallback = h.committed.clone();
            }
        }
        match (path, fallback) {
            (Some(path), _) => {
                self.allow_traverse("stat", &path)?;
                Ok(Attr::new(ino, &self.store.stat(&path)?))
            }
            (None, Some(content)) => {
                let mut attr = Attr::new(ino, &content.meta()?);
                attr.nlink = 0; // no name left: only its open handles keep it
                Ok(attr)
            }
            (None, None) => Err(Errno::ENOENT),
        }
    }

    pub fn setattr(&self, ino: Ino, fh: Option<u64>, changes: &AttrChanges) -> FsResult<Attr> {
        if let Some(path) = read_lock(&self.table).path(ino) {
            self.allow("setattr", &path, Access::Write)?;
        }
        if let Some(size) = changes.size {
            self.truncate(ino, fh, size, changes.by)?;
        }
        let attr = &changes.attr;
        let any = attr.perm.is_some()
            || attr.uid.is_some()
            || attr.gid.is_some()
            || attr.atime.is_some()
            || attr.mtime.is_some();
        if any {
            self.store.set_attr(&self.path(ino)?, attr)?;
        }
        self.getattr(ino, fh)
    }

    /// Truncation: through a writable handle it changes that handle's working copy; by path
    /// (`truncate(2)`) it is committed at once, atomically.
    fn truncate(&self, ino: Ino, fh: Option<u64>, size: u64, by: Tid) -> FsResult<()> {
        if read_lock(&self.table).kind(ino) == Some(Kind::Dir) {
            return Err(Errno::EISDIR);
        }
        if let Some(q) = &self.options.quota {
            q.check_size(size)?;
        }
        if let Some(fh) = fh
            && let Ok(handle) = self.file(fh)
        {
            let mut h = lock(&handle);
            if h.writable {
                h.users.add(by);
                return h.truncate(self.store.as_ref(), size);
            }
        }
        let path = self.path(ino)?;
        let committed = self.store.open(&path)?;
        let mut temp = FileHandle::new(ino, true, false, true, Some(committed));
        temp.truncate(self.store.as_ref(), size)?;
        self.commit(&mut temp, false)
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
        let path = self.child_path(parent, name)?;
        self.allow("mknod", &path, Access::Write)?;
        // Device nodes are refused: a space is data, and mounts are `nodev` anyway.
        let kind = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            _ => return Err(Errno::EPERM),
        };
        let (perm, owner) = ((mode & 0o7777) as u16, self.owner(caller));
        let meta = self.creating(|| {
            Ok(match kind {
                Kind::File => self.store.create(&path, perm, owner, true)?,
                _ => self.store.mknod(&path, kind, perm, owner)?,
            })
        })?;
        Ok(self.remember(parent, name, &meta))
    }

    pub fn mkdir(&self, parent: Ino, name: &OsStr, mode: u32, caller: &Caller) -> FsResult<Attr> {
        let path = self.child_path(parent, name)?;
        self.allow("mkdir", &path, Access::Write)?;
        let meta = self.creating(|| {
            Ok(self
                .store
                .mkdir(&path, (mode & 0o7777) as u16, self.owner(caller))?)
        })?;
        Ok(self.remember(parent, name, &meta))
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &OsStr,
        target: &Path,
        caller: &Caller,
    ) -> FsResult<Attr> {
        let path = self.child_path(parent, name)?;
        self.allow("symlink", &path, Access::Write)?;
        if target.as_os_str().is_empty() || target.as_os_str().len() > libc::PATH_MAX as usize {
            return Err(Errno::EINVAL);
        }
        self.allow_link_target("symlink", &path, target)?;
        let meta =
            self.creating(|| Ok(self.store.symlink(target, &path, self.owner(caller))?))?;
        Ok(self.remember(parent, name, &meta))
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr) -> FsResult<()> {
        let path = self.child_path(parent, name)?;
        self.allow("unlink", &path, Access::Write)?;
        let mut table = write_lock(&self.table);
        let meta = self.store.stat(&path)?;
        if meta.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        self.store.unlink(&path)?;
        table.detach(parent, name);
        self.released(&meta);
        Ok(())
    }

    pub fn rmdir(&self, parent: Ino, name: &OsStr) -> FsResult<()> {
        let path = self.child_path(parent, name)?;
        self.allow("rmdir", &path, Access::Write)?;
        let mut table = write_lock(&self.table);
        self.store.rmdir(&path)?;
        table.detach(parent, name);
        if let Some(q) = &self.options.quota {
            q.remove_entry(0);
        }
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
        let from = self.child_path(parent, name)?;
        let to = self.child_path(new_parent, new_name)?;
        self.allow("rename", &from, Access::Write)?;
        self.allow("rename to", &to, Access::Write)?;
        // Moving or replacing a directory that holds differently granted paths would carry
        // them somewhere else.
        for end in [&from, &to] {
            if self.options.grant.leads_to(end.as_os_str().as_bytes()) {
                return Err(deny("rename", end, &"it contains separately granted paths"));
            }
        }
        // Renames hold the table exclusively so that no commit resolves a path mid-rename.
        let mut table = write_lock(&self.table);
        let replaced = match mode {
            RenameMode::Replace => self.store.stat(&to).ok(),
            _ => None,
        };
        self.store.rename(&from, &to, mode)?;
        if let Some(meta) = replaced {
            self.released(&meta);
        }
        table.rename(
            parent,
            name,
            new_parent,
            new_name,
            mode == RenameMode::Exchange,
        );
        Ok(())
    }

    /// Gives back the quota held by a removed (or replaced) entry.
    fn released(&self, meta: &Meta) {
        if let Some(q) = &self.options.quota {
            q.remove_entry(if meta.kind == Kind::File {
                meta.size
            } else {
                0
            });
        }
    }

    /// Hard links are refused (EPERM; EACCES first where the grant forbids either name): a
    /// commit replaces a file's content by a new one, which would split linked names apart.
    pub fn link(&self, ino: Ino, new_parent: Ino, new_name: &OsStr) -> FsResult<Attr> {
        let from = self.path(ino)?;
        let to = self.child_path(new_parent, new_name)?;
        self.allow("link", &from, Access::Write)?;
        self.allow("link to", &to, Access::Write)?;
        Err(Errno::EPERM)
    }

    /// Extended attributes are not stored: changing one is EOPNOTSUPP where the grant allows
    /// writing, EACCES where it does not.
    pub fn change_xattr(&self, ino: Ino) -> FsResult<()> {
        let path = self.path(ino)?;
        self.allow("setxattr", &path, Access::Write)?;
        Err(Errno::EOPNOTSUPP)
    }

    // ---- files ---------------------------------------------------------------------------

    /// Opens the file `ino` with the `open(2)` flags `flags`, for thread `by`. An inode whose
    /// name moved to another (see `passthrough`) still opens under that name (a cached entry,
    /// `/proc/<pid>/fd`) where its passthrough readers allow; elsewhere it is `ESTALE` again.
    pub fn open(&self, ino: Ino, flags: i32, by: Tid) -> FsResult<Opened> {
        let path = self.path(ino)?;
        self.open_path(ino, &path, flags, by)
    }

    fn open_path(&self, ino: Ino, path: &Path, flags: i32, by: Tid) -> FsResult<Opened> {
        self.touch();
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let access = if writable || flags & libc::O_TRUNC != 0 {
            Access::Write
        } else {
            Access::Read
        };
        self.allow("open", path, access)?;
        let truncate = writable && flags & libc::O_TRUNC != 0;
        let committed = self.store.open(path)?;
        let meta = committed.meta()?;
        let version = meta.version;
        let staged = if truncate {
            Some(self.store.stage(None)?)
        } else {
            None
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
        let (direct_io, keep_cache, alone, passing) = {
            let mut opens = lock(&self.opens);
            let state = opens.entry(ino).or_default();
            let others_open = !state.handles.is_empty();
            let passing = self.passing_for(
                &mut state.window,
                others_open || successor,
                fh,
                committed.as_ref(),
                &meta,
                flags,
            );
            if passing == Passing::Stale {
                drop(opens);
                if let Some(staged) = staged {
                    self.store.discard(staged);
                }
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
                return Ok(self.join(fh, shared, committed, by));
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
                (true, false, false, passing)
            } else if writable {
                let alone = state.readers == 0 && state.writers == 0;
                // A writer alone starts from the committed version: pages cached of exactly
                // that version stay (dropping a large file's pages costs milliseconds). It then
                // fills the page cache with its own, not yet committed, data.
                let keep = alone && state.cached_version == Some(version);
                state.cached_version = None;
                state.writers += 1;
                (!alone, keep, alone, passing)
            } else {
                state.readers += 1;
                if state.writers > 0 {
                    (true, false, false, passing)
                } else {
                    let keep = state.cached_version == Some(version);
                    state.cached_version = Some(version);
                    state.cached_readers += 1;
                    (false, keep, false, passing)
                }
            }
        };
        let mut handle = FileHandle::new(
            ino,
            writable,
            flags & libc::O_APPEND != 0,
            direct_io,
            Some(committed),
        );
        handle.dirty = staged.is_some();
        handle.staged = staged;
        handle.users.add(by);
        handle.may_patch = alone && !handle.append;
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
        Ok(Opened {
            fh,
            // A passthrough reader's reads never reach the daemon; everyone else in a window
            // is served with direct I/O.
            direct_io: direct_io && !matches!(passing, Passing::Reads(_)),
            keep_cache,
            no_flush: !writable,
            passthrough: passing.backing_id(),
        })
    }

    /// Makes `fh` another name of the shared read-write handle `shared`. While it has nothing
    /// uncommitted, it moves on to `latest` (the version this open found), so a new member
    /// never reads older data than a fresh open would.
    fn join(
        &self,
        fh: u64,
        shared: Arc<Mutex<FileHandle>>,
        latest: Arc<dyn Content>,
        by: Tid,
    ) -> Opened {
        let mut h = lock(&shared);
        h.users.add(by);
        let current = h
            .committed
            .as_ref()
            .and_then(|c| c.meta().ok())
            .map(|m| m.version);
        let moved = !h.dirty
            && h.staged.is_none()
            && h.appended.is_empty()
            && latest.meta().ok().map(|m| m.version) != current;
        if moved {
            h.committed = Some(latest);
        }
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
        let path = self.child_path(parent, name)?;
        self.allow("create", &path, Access::Write)?;
        let perm = (mode & 0o7777) as u16;
        let created =
            self.creating(|| Ok(self.store.create(&path, perm, self.owner(caller), true)?));
        let meta = match created {
            Ok(meta) => meta,
            Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => {
                let meta = self.store.stat(&path)?;
                if meta.kind == Kind::Dir {
                    return Err(Errno::EISDIR);
                }
                meta
            }
            Err(e) => return Err(e),
        };
        let attr = self.remember(parent, name, &meta);
        match self.open_path(attr.ino, &path, flags, caller.pid) {
            // Joining a shared working copy: its size, not the committed one.
            Ok(opened) => Ok((self.as_open(attr), opened)),
            Err(e) => {
                self.forget(attr.ino, 1);
                Err(e)
            }
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let handle = self.file(fh)?;
        let h = lock(&handle);
        h.read(offset, size as usize)
    }

    /// `write(2)` through `fh` by thread `by`: at `offset`, or at the end for an `O_APPEND`
    /// handle.
    /// `lseek` with `SEEK_DATA` or `SEEK_HOLE` (the kernel answers the other kinds itself).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<u64> {
        let hole = match whence {
            libc::SEEK_DATA => false,
            libc::SEEK_HOLE => true,
            _ => return Err(Errno::EINVAL),
        };
        let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        let handle = self.file(fh)?;
        let h = lock(&handle);
        h.seek(offset, hole)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8], by: Tid) -> FsResult<u32> {
        self.write_to(fh, offset, data, Some(by))
    }

    /// A write-back of cached pages (a shared mapping) through `fh`: always at `offset`, even
    /// for an `O_APPEND` handle.
    pub fn write_back(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_to(fh, offset, data, None)
    }

    /// A write by thread `by`, or a write-back (`None`: the kernel's, at its offset).
    fn write_to(&self, fh: u64, offset: u64, data: &[u8], by: Option<Tid>) -> FsResult<u32> {
        let placed = by.is_none();
        let handle = self.file(fh)?;
        let mut h = lock(&handle);
        if let Some(by) = by {
            h.users.add(by);
        }
        let Some(q) = &self.options.quota else {
            return h.write(self.store.as_ref(), offset, data, placed);
        };
        let start = if h.append && !placed {
            h.size()?
        } else {
            offset
        };
        let len = q.fit_write(start, data.len())?;
        q.check_growth(h.committed_size()?, start + len as u64)?;
        h.write(self.store.as_ref(), offset, &data[..len], placed)
    }

    /// `copy_file_range(2)` by thread `by`: copies up to `len` bytes of what `fh_in` sees at
    /// `off_in` into `fh_out` at `off_out`, as a read and a write through the two handles would
    /// (the kernel has checked modes, `O_APPEND` and overlaps), without the data crossing into
    /// the kernel and back. Returns the bytes copied: fewer at the source's end, at a size
    /// limit, or when an error cuts a long copy short after some bytes went in.
    pub fn copy_file_range(
        &self,
        (fh_in, off_in): (u64, u64),
        (fh_out, off_out): (u64, u64),
        len: u64,
        by: Tid,
    ) -> FsResult<u32> {
        /// Bytes moved per step, and at most per call (callers loop on short copies).
        const CHUNK: u64 = 1 << 20;
        const MOST: u64 = 64 << 20;
        let len = len.min(MOST);
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(CHUNK) as u32;
            let step = self
                .read(fh_in, off_in + done, want)
                .and_then(|data| Ok((data.len(), self.write(fh_out, off_out + done, &data, by)?)));
            match step {
                Ok((read, written)) => {
                    done += u64::from(written);
                    if written as usize != read || read < want as usize {
                        break; // the source's end, or a size limit
                    }
                }
                Err(e) if done == 0 => return Err(e),
                Err(_) => break, // report what went in; the caller's next call gets the error
            }
        }
        Ok(done as u32)
    }

    /// `fallocate(2)` through `fh` by thread `by`, with the kernel's `mode` flags.
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32, by: Tid) -> FsResult<()> {
        let how = Allocation::from_mode(mode)?;
        let handle = self.file(fh)?;
        let mut h = lock(&handle);
        if !h.writable {
            return Err(Errno::EBADF);
        }
        h.users.add(by);
        if let Some(q) = &self.options.quota {
            let grown = how.size_after(h.size()?, offset.saturating_add(len));
            q.check_size(grown)?;
            q.check_growth(h.committed_size()?, grown)?;
        }
        h.allocate(self.store.as_ref(), how, offset, len)
    }

    /// Whether closing `fh` may take long: a durable commit, or the commit of a large working
    /// copy (written as a patch, or completed by copying the rest).
    pub fn commit_may_block(&self, fh: u64) -> bool {
        if self.options.sync_on_close {
            return true;
        }
        let Ok(handle) = self.file(fh) else {
            return false;
        };
        let h = lock(&handle);
        h.dirty && h.seeding.is_some()
    }

    /// Whether a write through `fh` would first copy a large committed file into a working copy.
    pub fn write_may_copy(&self, fh: u64) -> bool {
        const LARGE: u64 = 1 << 20;
        let Ok(handle) = self.file(fh) else {
            return false;
        };
        let h = lock(&handle);
        // Larger files are seeded lazily (see `seed`): their first write copies a block or two.
        // Appends wait in memory (up to `APPEND_BUFFER_MAX`, past which this misses one copy).
        h.writable
            && h.staged.is_none()
            && !h.append
            && h.committed_size()
                .is_ok_and(|size| size > LARGE && size < seed::LAZY_SEED_MIN)
    }

    /// `close()` of one descriptor: commits what the handle changed, so commit errors reach the
    /// caller's `close()`.
    /// `close()` by thread `by` of one copy of the descriptor: commits, unless `by` is of a
    /// process that never used the handle (see `closers`).
    pub fn flush(&self, fh: u64, by: Tid) -> FsResult<()> {
        let handle = self.file(fh)?;
        let mut h = lock(&handle);
        if h.dirty && h.users.stranger(by, closers::thread_group) {
            log::debug!(
                "not committing inode {} at a close by thread {by} of another process",
                h.ino
            );
            return Ok(());
        }
        if h.dirty {
            self.commit(&mut h, self.options.sync_on_close)?;
        }
        Ok(())
    }

    /// `fsync()`: commits and makes the file durable, without closing it.
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        let handle = self.file(fh)?;
        let mut h = lock(&handle);
        if h.dirty {
            return self.commit(&mut h, true);
        }
        let path = read_lock(&self.table).path(h.ino);
        match path {
            Some(path) => Ok(self.store.sync(&path)?),
            None => Ok(()),
        }
    }

    /// The last reference to the handle is gone: commit what is left (a mapping written after
    /// `close()`), then forget the handle.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let Some(handle) = write_lock(&self.files).remove(&fh) else {
            return Err(Errno::EBADF);
        };
        let mut h = lock(&handle);
        if self.leave_shared(&handle, h.ino, fh) {
            return Ok(());
        }
        let result = if h.dirty {
            self.commit(&mut h, self.options.sync_on_close)
        } else {
            Ok(())
        };
        if result.is_err() && (h.staged.is_some() || !h.appended.is_empty()) {
            log::error!(
                "dropping uncommitted changes to inode {} after a failed commit",
                h.ino
            );
            // The kernel may hold the dropped size (its cached pages are dropped at the next
            // open: they are of no committed version).
            if let Some(kernel) = self.kernel.get() {
                kernel.attributes_changed(h.ino);
            }
        }
        if let Some(staged) = h.staged.take() {
            self.store.discard(staged);
        }
        let mut opens = lock(&self.opens);
        let mut unregister = None;
        if let Some(state) = opens.get_mut(&h.ino) {
            state.handles.retain(|&other| other != fh);
            unregister = Self::leave_window(&mut state.window, fh);
            if h.writable {
                state.writers -= 1;
            } else {
                state.readers -= 1;
                if !h.direct_io {
                    state.cached_readers -= 1;
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
    fn leave_shared(&self, handle: &Arc<Mutex<FileHandle>>, ino: Ino, fh: u64) -> bool {
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

    /// Commits the handle's working copy over the file's current path. A file unlinked while
    /// open has no path: its changes are dropped, as on any POSIX filesystem. A spoiled working
    /// copy (a write into it failed, and its bytes were not written again) is refused with
    /// that write's error. Failures are counted in the metrics.
    fn commit(&self, h: &mut FileHandle, durable: bool) -> FsResult<()> {
        self.try_commit(h, durable)
            .inspect_err(crate::metrics::commit_failed)
    }

    /// [`Fs::commit`], uncounted.
    fn try_commit(&self, h: &mut FileHandle, durable: bool) -> FsResult<()> {
        if let Some(s) = h.spoiled {
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
        if self.commit_patch(h, durable)? {
            return Ok(());
        }
        h.finish_seeding()?;
        let _turn = h
            .append
            .then(|| lock(&self.append_turns[h.ino as usize % APPEND_TURNS]));
        if h.appends_from.is_some() && self.file_moved_on(h)? {
            // Appends in a working copy of an older version: take them back, to append them
            // to the file as it is now (below), rather than replace what others appended.
            h.take_back_appends(self.store.as_ref(), APPENDS_TAKEN_BACK_MAX)?;
        }
        if h.staged.is_none() && !h.appended.is_empty() {
            // In place, onto the version the handle knows (the store checks it still is the
            // file); if others appended meanwhile, follow them, a few times at most.
            let mut tries = 0;
            for attempt in 1.. {
                tries = attempt;
                if !durable && self.commit_appended(h)? {
                    return Ok(());
                }
                let moved = self.follow_appends(h)?;
                if durable || attempt == APPEND_RETRIES {
                    break;
                }
                if !moved {
                    if !self.others_appending(h)? {
                        break; // not possible in place, and nobody in the way
                    }
                    std::thread::sleep(APPEND_RETRY_PAUSE);
                }
            }
            // Not possible in place (or a durable commit): a working copy takes the appends.
            log::debug!(
                "appends to inode {} committed through a working copy after {tries} tries \
                 (durable: {durable}, file now {:?})",
                h.ino,
                self.file_now(h)?
                    .map(|(_, m, moved_on)| (m.size, m.nlink, moved_on))
            );
            h.ensure_staged(self.store.as_ref())?;
        }
        let Some(staged) = h.staged.take() else {
            h.dirty = false;
            return Ok(());
        };
        let table = read_lock(&self.table);
        let Some(path) = table.path(h.ino) else {
            drop(table);
            self.store.discard(staged);
            h.dirty = false;
            return Ok(());
        };
        // The byte quota is charged for the growth of the committed file.
        let sizes = match &self.options.quota {
            Some(q) => {
                let old = self.store.stat(&path).map(|m| m.size).unwrap_or(0);
                let new = staged.file.metadata().map(|m| m.len()).unwrap_or(0);
                if let Err(e) = q.resize(old, new) {
                    h.staged = Some(staged);
                    return Err(e);
                }
                Some((q, old, new))
            }
            None => None,
        };
        match self.store.commit(staged, &path, durable) {
            Ok(content) => {
                drop(table);
                self.committed(h, content);
                Ok(())
            }
            Err((e, staged)) => {
                if let Some((q, old, new)) = sizes {
                    let _ = q.resize(new, old);
                }
                h.staged = Some(staged);
                log::error!("commit of {} failed: {e}", path.display());
                Err(e.into())
            }
        }
    }

    /// Commits a large working copy by writing only what the handle changed into the committed
    /// file in place; false when it was not seeded for that or the store cannot do it now (see
    /// `Store::patch`): the caller then commits the whole copy.
    fn commit_patch(&self, h: &mut FileHandle, durable: bool) -> FsResult<bool> {
        let (Some(ranges), Some(base), Some(staged)) =
            (h.patch_ranges(), h.committed.clone(), h.staged.as_ref())
        else {
            return Ok(false);
        };
        let table = read_lock(&self.table);
        let Some(path) = table.path(h.ino) else {
            return Ok(false); // unlinked while open: `commit` drops the changes
        };
        let old = base.meta()?.size;
        let new = staged.file.metadata()?.len();
        let patched = self.charged((old, new), "commit", &path, || {
            self.store
                .patch(base.as_ref(), &path, staged, &ranges, durable)
        })?;
        let Some(content) = patched else {
            return Ok(false);
        };
        drop(table);
        if let Some(seeding) = h.seeding.take() {
            seeding.cancel();
        }
        if let Some(staged) = h.staged.take() {
            self.store.discard(staged);
        }
        self.committed(h, content);
        Ok(true)
    }

    /// Charges the byte quota for the file growing from `old` to `new` bytes, then runs
    /// `attempt`, a commit in place by the store; gives the quota back unless it went in.
    /// `None`: the store declined (the caller commits a working copy instead).
    fn charged(
        &self,
        (old, new): (u64, u64),
        what: &str,
        path: &Path,
        attempt: impl FnOnce() -> std::io::Result<Option<Arc<dyn Content>>>,
    ) -> FsResult<Option<Arc<dyn Content>>> {
        if let Some(q) = &self.options.quota {
            q.resize(old, new)?;
        }
        let result = attempt();
        if !matches!(result, Ok(Some(_)))
            && let Some(q) = &self.options.quota
        {
            let _ = q.resize(new, old);
        }
        result.map_err(|e| {
            log::error!("{what} of {} failed: {e}", path.display());
            e.into()
        })
    }

    /// An append handle's bytes go at the end of the file as it is when they are committed:
    /// if others committed since the handle opened (another appender, most often), it moves on
    /// to their version first, so no appender's bytes replace another's. Only for appends
    /// still waiting in memory, the handle's only change. True if it moved.
    fn follow_appends(&self, h: &mut FileHandle) -> FsResult<bool> {
        let Some((path, now, moved_on)) = self.file_now(h)? else {
            return Ok(false); // unlinked: `commit` drops the appends
        };
        if now.kind != Kind::File || !moved_on {
            return Ok(false);
        }
        h.committed = Some(self.store.open(&path)?);
        h.moved = true;
        Ok(true)
    }

    /// The file at `h`'s path as it is now, and whether that is another version than the one
    /// `h` started from (another object, or changed: an in-place append may leave the ctime
    /// alone within a clock tick, never the size); `None` once unlinked.
    fn file_now(&self, h: &FileHandle) -> FsResult<Option<(PathBuf, Meta, bool)>> {
        let Some(path) = read_lock(&self.table).path(h.ino) else {
            return Ok(None);
        };
        let now = self.store.stat(&path)?;
        let seen = h.committed.as_ref().map(|c| c.meta()).transpose()?;
        let moved_on = seen.is_none_or(|m| (m.version, m.size) != (now.version, now.size));
        Ok(Some((path, now, moved_on)))
    }

    /// Whether the file at `h`'s path is no longer the version `h` started from.
    fn file_moved_on(&self, h: &FileHandle) -> FsResult<bool> {
        Ok(self.file_now(h)?.is_some_and(|(_, _, moved_on)| moved_on))
    }

    /// Whether the file `h` appends to changed since `h` last looked, or another append to it
    /// is under way (its crash marker is a second link, or it holds the file's lock): an
    /// in-place append is worth retrying.
    fn others_appending(&self, h: &FileHandle) -> FsResult<bool> {
        let Some((path, now, moved_on)) = self.file_now(h)? else {
            return Ok(false);
        };
        Ok(moved_on || now.nlink > 1 || self.store.changing(&path))
    }

    /// Commits the appends waiting in `h` by adding them to the committed file in place; false
    /// when the store cannot do that now (see `Store::append`).
    fn commit_appended(&self, h: &mut FileHandle) -> FsResult<bool> {
        let table = read_lock(&self.table);
        let Some(path) = table.path(h.ino) else {
            // Unlinked while open: the appends go with the file.
            h.appended = Vec::new();
            h.appended_at = None;
            h.dirty = false;
            return Ok(true);
        };
        let Some(base) = h.committed.clone() else {
            return Ok(false);
        };
        let old = base.meta()?.size;
        let new = old + h.appended.len() as u64;
        let appended = self.charged((old, new), "append", &path, || {
            self.store.append(base.as_ref(), &path, &h.appended)
        })?;
        let Some(content) = appended else {
            return Ok(false);
        };
        drop(table);
        h.appended = Vec::new();
        h.appended_at = None;
        self.committed(h, content);
        Ok(true)
    }

    /// Bookkeeping after `h` committed `content`.
    fn committed(&self, h: &mut FileHandle, content: Arc<dyn Content>) {
        crate::metrics::committed();
        let version = content.meta().ok().map(|m| m.version);
        h.committed = Some(content);
        h.dirty = false;
        h.appends_from = None;
        let mut opens = lock(&self.opens);
        let others_open = match opens.get_mut(&h.ino) {
            Some(state) => {
                // A cached writer's pages are exactly what it just committed (unless it moved
                // on to another version, see `follow_appends`).
                let sole_cached_writer = !h.direct_io && !h.moved && state.writers == 1;
                state.cached_version = if sole_cached_writer { version } else { None };
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
            if h.moved && !h.direct_io {
                // Its pages hold this handle's appends where the kernel thought the file ended.
                kernel.data_changed(h.ino);
            }
        }
    }

    /// Commits every open handle's pending changes (on shutdown).
    pub fn commit_all(&self) -> usize {
        let handles: Vec<_> = read_lock(&self.files).values().cloned().collect();
        let mut committed = 0;
        for handle in handles {
            let mut h = lock(&handle);
            if h.dirty && self.commit(&mut h, self.options.sync_on_close).is_ok() {
                committed += 1;
            }
        }
        committed
    }

    // ---- directories ---------------------------------------------------------------------

    pub fn opendir(&self, ino: Ino) -> FsResult<u64> {
        self.touch();
        let path = self.path(ino)?;
        self.allow_traverse("opendir", &path)?;
        let entries = self.list(&path)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, DirHandle { ino, entries });
        Ok(fh)
    }

    /// The entries of directory `path` that the grant shows, sorted by name.
    fn list(&self, path: &Path) -> FsResult<Vec<DirItem>> {
        let mut entries: Vec<DirItem> = self
            .store
            .list(path)?
            .into_iter()
            .filter(|e| self.shows(path, &e.name))
            .map(|e| DirItem {
                name: e.name,
                kind: e.kind,
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Entries of an open directory from `offset` on (`.` and `..` first).
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<Listed>> {
        let mut dirs = lock(&self.dirs);
        let dir = dirs.get_mut(&fh).ok_or(Errno::EBADF)?;
        if offset == 0 {
            // rewinddir(): show the directory as it is now.
            dir.entries = self.list(&self.path(dir.ino)?)?;
        }
        let table = read_lock(&self.table);
        let mut out = Vec::new();
        for (i, item) in dot_entries().iter().chain(dir.entries.iter()).enumerate() {
            if (i as u64) < offset {
                continue;
            }
            // Entries the kernel has not looked up yet have no inode number: readdir shows a
            // placeholder (the kernel looks the name up before using it).
            let ino = match i {
                0 => dir.ino,
                1 => table.parent(dir.ino).unwrap_or(ROOT),
                _ => table.child(dir.ino, &item.name).unwrap_or(u64::MAX),
            };
            out.push(Listed {
                ino,
                next: i as u64 + 1,
                kind: item.kind,
                name: item.name.clone(),
            });
        }
        Ok(out)
    }

    /// `readdirplus`: like `readdir`, with attributes; every entry handed to `emit` counts as a
    /// lookup. `emit` returns false when the reply buffer is full (that entry is not counted).
    pub fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        mut emit: impl FnMut(&Listed, &Attr) -> bool,
    ) -> FsResult<()> {
        let (dir_ino, listed) = {
            let dirs = lock(&self.dirs);
            let ino = dirs.get(&fh).ok_or(Errno::EBADF)?.ino;
            drop(dirs);
            (ino, self.readdir(fh, offset)?)
        };
        let dir_path = self.path(dir_ino)?;
        for entry in listed {
            let dot = entry.name == "." || entry.name == "..";
            let attr = if dot {
                let ino = if entry.name == "." {
                    dir_ino
                } else {
                    entry.ino
                };
                let path = if entry.name == "." {
                    dir_path.clone()
                } else {
                    dir_path.parent().map(Path::to_path_buf).unwrap_or_default()
                };
                let Ok(meta) = self.store.stat(&path) else {
                    continue;
                };
                Attr::new(ino, &meta)
            } else {
                let Ok(meta) = self.store.stat(&dir_path.join(&entry.name)) else {
                    continue; // removed since the listing was taken
                };
                self.remember(dir_ino, &entry.name, &meta)
            };
            let listed = Listed {
                ino: attr.ino,
                ..entry
            };
            if !emit(&listed, &attr) {
                if !dot {
                    self.forget(attr.ino, 1);
                }
                break;
            }
        }
        Ok(())
    }

    /// `fsync` of a directory: its entries are durable on return.
    pub fn fsyncdir(&self, ino: Ino) -> FsResult<()> {
        let path = self.path(ino)?;
        self.allow_traverse("fsyncdir", &path)?;
        Ok(self.store.sync(&path)?)
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    /// Capacity and usage; a space with limits reports its limits and what it uses of them.
    pub fn statfs(&self) -> FsResult<StoreStatfs> {
        let mut s = self.store.statfs()?;
        if let Some(q) = &self.options.quota {
            let (limits, usage) = (q.limits(), q.usage());
            let bsize = u64::from(s.bsize.max(1));
            if let Some(max) = limits.max_bytes {
                let free_blocks = max.saturating_sub(usage.bytes) / bsize;
                s.blocks = max / bsize;
                s.bfree = free_blocks.min(s.bfree);
                s.bavail = free_blocks.min(s.bavail);
            }
            if let Some(max) = limits.max_files {
                s.files = max;
                s.ffree = max.saturating_sub(usage.files).min(s.ffree);
            }
        }
        Ok(s)
    }
}

/// The `.` and `..` entries of a directory listing.
fn dot_entries() -> [DirItem; 2] {
    [
        DirItem {
            name: ".".into(),
            kind: Kind::Dir,
        },
        DirItem {
            name: "..".into(),
            kind: Kind::Dir,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::{LocalStore, StagingArea};

    const RW: i32 = libc::O_RDWR;
    /// A caller the test does not name: every close commits.
    const CALLER: Tid = 0;

    struct Setup {
        _dir: tempfile::TempDir,
        root: PathBuf,
        fs: Fs,
    }

    fn setup(options: FsOptions) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let (area, _) = StagingArea::create(dir.path()).unwrap();
        let root = dir.path().join("rooms/r");
        let store = LocalStore::open(root.clone(), Arc::new(area)).unwrap();
        Setup {
            _dir: dir,
            root,
            fs: Fs::new(Arc::new(store), options),
        }
    }

    fn full() -> Setup {
        setup(FsOptions {
            links_anywhere: true,
            ..Default::default()
        })
    }

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn create(fs: &Fs, parent: Ino, n: &str, flags: i32) -> (Attr, Opened) {
        fs.create(parent, name(n), 0o644, flags, &Caller::default())
            .unwrap()
    }

    #[test]
    fn writes_are_invisible_until_the_handle_commits() {
        let s = full();
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"hello", CALLER).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"");
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert!(
            r.direct_io,
            "a reader opened during a write bypasses the page cache"
        );
        assert_eq!(s.fs.read(r.fh, 0, 100).unwrap(), b"");
        assert_eq!(s.fs.read(w.fh, 0, 100).unwrap(), b"hello");
        assert_eq!(s.fs.getattr(attr.ino, Some(w.fh)).unwrap().size, 5);
        s.fs.flush(w.fh, CALLER).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"hello");
        // The reader keeps the version it opened.
        assert_eq!(s.fs.read(r.fh, 0, 100).unwrap(), b"");
        s.fs.release(w.fh).unwrap();
        s.fs.release(r.fh).unwrap();
        let again = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert!(
            again.keep_cache,
            "the sole writer's cached pages are the committed version"
        );
        assert!(again.no_flush);
        assert_eq!(s.fs.read(again.fh, 0, 100).unwrap(), b"hello");
    }

    #[test]
    fn a_close_by_a_process_that_never_used_the_handle_does_not_commit() {
        let s = full();
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() } as Tid;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let stranger = child.id();
        let (attr, created) = create(&s.fs, ROOT, "f", RW);
        s.fs.release(created.fh).unwrap();
        let w = s.fs.open(attr.ino, RW, me).unwrap();
        s.fs.write(w.fh, 0, b"half", me).unwrap();
        // A child closing the copy it inherited, at exec or exit.
        s.fs.flush(w.fh, stranger).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"");
        s.fs.write(w.fh, 4, b" and whole", me).unwrap();
        s.fs.flush(w.fh, me).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"half and whole");

        // A process that wrote through the handle commits at its close.
        s.fs.write(w.fh, 0, b"HALF", stranger).unwrap();
        s.fs.flush(w.fh, stranger).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"HALF and whole");

        // The last close always commits, whoever it comes from.
        let w2 = s.fs.open(attr.ino, libc::O_WRONLY, me).unwrap();
        s.fs.write(w2.fh, 0, b"last", me).unwrap();
        s.fs.flush(w2.fh, stranger).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"HALF and whole");
        s.fs.release(w2.fh).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"last and whole");
        s.fs.release(w.fh).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_working_copy_shows_the_files_mode_and_its_own_size() {
        let s = full();
        let (attr, w) =
            s.fs.create(ROOT, name("x"), 0o750, RW, &Caller::default())
                .unwrap();
        s.fs.write(w.fh, 0, b"1234", CALLER).unwrap();
        let seen = s.fs.getattr(attr.ino, Some(w.fh)).unwrap();
        assert_eq!((seen.perm, seen.size), (0o750, 4));
        let chmod = AttrChanges {
            attr: SetAttr {
                perm: Some(0o700),
                ..Default::default()
            },
            ..Default::default()
        };
        s.fs.setattr(attr.ino, None, &chmod).unwrap();
        let seen = s.fs.getattr(attr.ino, Some(w.fh)).unwrap();
        assert_eq!((seen.perm, seen.size), (0o700, 4));
        s.fs.release(w.fh).unwrap();
    }

    #[test]
    fn read_write_opens_share_one_working_copy() {
        let s = full();
        let (attr, created) = create(&s.fs, ROOT, "db", RW);
        s.fs.write(created.fh, 0, b"v1", CALLER).unwrap();
        s.fs.release(created.fh).unwrap();

        let a = s.fs.open(attr.ino, RW, CALLER).unwrap();
        let reader = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        let b = s.fs.open(attr.ino, RW, CALLER).unwrap();
        assert_eq!(b.direct_io, a.direct_io, "members read through one view");
        s.fs.write(a.fh, 0, b"A2", CALLER).unwrap();
        assert_eq!(s.fs.read(b.fh, 0, 10).unwrap(), b"A2", "b sees a's write");
        s.fs.write(b.fh, 2, b"+B", CALLER).unwrap();
        assert_eq!(s.fs.read(a.fh, 0, 10).unwrap(), b"A2+B");
        // Until a member commits, everybody else sees the committed version.
        assert_eq!(s.fs.read(reader.fh, 0, 10).unwrap(), b"v1");
        assert_eq!(std::fs::read(s.root.join("db")).unwrap(), b"v1");
        // Any member's close commits what all of them wrote.
        s.fs.flush(b.fh, CALLER).unwrap();
        assert_eq!(std::fs::read(s.root.join("db")).unwrap(), b"A2+B");
        s.fs.release(b.fh).unwrap();
        s.fs.write(a.fh, 0, b"a3", CALLER).unwrap();
        assert_eq!(s.fs.read(a.fh, 0, 10).unwrap(), b"a3+B");
        s.fs.release(a.fh).unwrap();
        assert_eq!(std::fs::read(s.root.join("db")).unwrap(), b"a3+B");
        s.fs.release(reader.fh).unwrap();

        // Write-only, truncating and appending opens keep their own copies.
        let c = s.fs.open(attr.ino, RW, CALLER).unwrap();
        let w = s.fs.open(attr.ino, libc::O_WRONLY, CALLER).unwrap();
        let t = s.fs.open(attr.ino, RW | libc::O_TRUNC, CALLER).unwrap();
        s.fs.write(w.fh, 0, b"private", CALLER).unwrap();
        assert_eq!(s.fs.read(c.fh, 0, 10).unwrap(), b"a3+B");
        assert_eq!(s.fs.read(t.fh, 0, 10).unwrap(), b"");
        s.fs.release(t.fh).unwrap();
        s.fs.release(w.fh).unwrap();
        assert_eq!(std::fs::read(s.root.join("db")).unwrap(), b"private");
        // A new member of a handle with nothing uncommitted reads what a fresh open would.
        let d = s.fs.open(attr.ino, RW, CALLER).unwrap();
        assert!(!d.keep_cache, "the shared view moved on to a newer version");
        assert_eq!(s.fs.read(c.fh, 0, 10).unwrap(), b"private");
        s.fs.release(c.fh).unwrap();
        s.fs.release(d.fh).unwrap();
        assert!(
            lock(&s.fs.opens).get(&attr.ino).is_none(),
            "nothing left open"
        );
    }

    #[test]
    fn a_lone_writer_keeps_cached_pages_only_of_the_version_it_opens() {
        let s = full();
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"v1", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        // The pages cached are v1, the committed version: a new writer may keep them.
        let w2 = s.fs.open(attr.ino, RW, CALLER).unwrap();
        assert!(w2.keep_cache && !w2.direct_io);
        s.fs.write(w2.fh, 0, b"v2", CALLER).unwrap();
        s.fs.release(w2.fh).unwrap();
        // Changed behind the mount's back: the cached pages are of another version.
        std::fs::write(s.root.join("f"), b"outside").unwrap();
        let w3 = s.fs.open(attr.ino, RW, CALLER).unwrap();
        assert!(!w3.keep_cache, "pages of another version are dropped");
        s.fs.release(w3.fh).unwrap();
    }

    #[test]
    fn large_files_are_seeded_lazily_and_commit_whole() {
        let s = full();
        let len = (seed::LAZY_SEED_MIN + 12345) as usize;
        let original: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        std::fs::write(s.root.join("big"), &original).unwrap();
        let attr = s.fs.lookup(ROOT, name("big")).unwrap();
        let h = s.fs.open(attr.ino, RW, CALLER).unwrap();
        let mut expect = original.clone();
        for offset in [len - 3, 2 << 20, 17] {
            s.fs.write(h.fh, offset as u64, b"XYZ", CALLER).unwrap();
            expect[offset..offset + 3].copy_from_slice(b"XYZ");
        }
        // The handle sees the seed plus its writes, before the commit too.
        assert_eq!(s.fs.read(h.fh, 0, 32).unwrap(), &expect[..32]);
        assert_eq!(
            s.fs.read(h.fh, (3 << 20) - 5, 10).unwrap(),
            &expect[(3 << 20) - 5..(3 << 20) + 5]
        );
        assert_eq!(std::fs::read(s.root.join("big")).unwrap(), original);
        s.fs.release(h.fh).unwrap();
        assert!(std::fs::read(s.root.join("big")).unwrap() == expect);

        // A truncation while seeding keeps exactly the bytes below the cut.
        let h = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.write(h.fh, 5, b"abc", CALLER).unwrap();
        let cut = (1 << 20) + 7;
        s.fs.setattr(
            attr.ino,
            Some(h.fh),
            &AttrChanges {
                size: Some(cut as u64),
                ..Default::default()
            },
        )
        .unwrap();
        s.fs.release(h.fh).unwrap();
        expect[5..8].copy_from_slice(b"abc");
        expect.truncate(cut);
        assert!(std::fs::read(s.root.join("big")).unwrap() == expect);
    }

    #[test]
    fn large_files_are_patched_in_place_unless_somebody_else_has_them_open() {
        use std::os::unix::fs::MetadataExt;
        let s = full();
        let len = (seed::LAZY_SEED_MIN + 4096) as usize;
        let original: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let path = s.root.join("db");
        std::fs::write(&path, &original).unwrap();
        let inode = || std::fs::metadata(&path).unwrap().ino();
        let first = inode();
        let attr = s.fs.lookup(ROOT, name("db")).unwrap();
        let write = |fh: u64, offset: usize, data: &[u8], expect: &mut Vec<u8>| {
            s.fs.write(fh, offset as u64, data, CALLER).unwrap();
            if expect.len() < offset + data.len() {
                expect.resize(offset + data.len(), 0);
            }
            expect[offset..offset + data.len()].copy_from_slice(data);
        };

        // Alone: the changed blocks and the new tail go into the same file.
        let mut v1 = original.clone();
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        write(w.fh, 4096 * 3, &[1u8; 4096], &mut v1);
        write(w.fh, 1 << 20, b"middle", &mut v1);
        write(w.fh, len + 10, b"tail", &mut v1);
        assert!(
            std::fs::read(&path).unwrap() == original,
            "private until close"
        );
        s.fs.release(w.fh).unwrap();
        assert!(std::fs::read(&path).unwrap() == v1);
        assert_eq!(inode(), first, "patched in place");
        assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 1);

        // A reader open: the writer commits a whole copy, the reader keeps its version.
        let mut v2 = v1.clone();
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        write(w.fh, 0, b"v2", &mut v2);
        s.fs.release(w.fh).unwrap();
        assert!(std::fs::read(&path).unwrap() == v2);
        let second = inode();
        assert_ne!(second, first, "a new file, not a patch under the reader");
        assert_eq!(s.fs.read(r.fh, 4096 * 3, 4).unwrap(), [1u8; 4]);
        assert_eq!(s.fs.read(r.fh, 0, 2).unwrap(), &v1[..2]);
        s.fs.release(r.fh).unwrap();

        // Two writers: the last close wins, whole, though the first to open could patch.
        let (mut a, mut b) = (v2.clone(), v2.clone());
        let wa = s.fs.open(attr.ino, libc::O_WRONLY, CALLER).unwrap();
        let wb = s.fs.open(attr.ino, libc::O_WRONLY, CALLER).unwrap();
        write(wa.fh, 8192, b"AAAA", &mut a);
        write(wb.fh, 2 << 20, b"BBBB", &mut b);
        s.fs.release(wb.fh).unwrap();
        assert!(std::fs::read(&path).unwrap() == b);
        s.fs.release(wa.fh).unwrap();
        assert!(
            std::fs::read(&path).unwrap() == a,
            "the last close wins, whole"
        );

        // fsync commits a durable patch; the handle goes on writing and patches again.
        let mut v3 = a.clone();
        let third = inode();
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        write(w.fh, 100, b"synced", &mut v3);
        s.fs.fsync(w.fh).unwrap();
        assert!(std::fs::read(&path).unwrap() == v3);
        write(w.fh, 3 << 20, b"after", &mut v3);
        s.fs.release(w.fh).unwrap();
        assert!(std::fs::read(&path).unwrap() == v3);
        assert_eq!(inode(), third, "both commits patched the same file");
    }

    #[test]
    fn a_flush_without_changes_commits_nothing() {
        let s = full();
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"v1", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let ino_before = std::fs::metadata(s.root.join("f")).unwrap();
        let h = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.flush(h.fh, CALLER).unwrap();
        s.fs.release(h.fh).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(s.root.join("f")).unwrap().ino(),
            ino_before.ino()
        );
    }

    #[test]
    fn renames_and_unlinks_of_open_files() {
        let s = full();
        let (attr, w) = create(&s.fs, ROOT, "draft", RW);
        s.fs.write(w.fh, 0, b"text", CALLER).unwrap();
        s.fs.rename(ROOT, name("draft"), ROOT, name("final"), 0)
            .unwrap();
        s.fs.flush(w.fh, CALLER).unwrap();
        assert_eq!(std::fs::read(s.root.join("final")).unwrap(), b"text");
        assert!(!s.root.join("draft").exists());
        let w2 = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.write(w2.fh, 0, b"TEXT", CALLER).unwrap();
        s.fs.unlink(ROOT, name("final")).unwrap();
        assert_eq!(s.fs.getattr(attr.ino, None).unwrap().size, 4);
        s.fs.release(w2.fh).unwrap();
        s.fs.release(w.fh).unwrap();
        assert!(
            !s.root.join("final").exists(),
            "an unlinked file is not resurrected"
        );
    }

    #[test]
    fn truncate_by_path_commits_and_append_writes_at_the_end() {
        let s = full();
        let (attr, w) = create(&s.fs, ROOT, "log", RW);
        s.fs.write(w.fh, 0, b"one\n", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let a =
            s.fs.open(attr.ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        s.fs.write(a.fh, 0, b"two\n", CALLER).unwrap();
        s.fs.release(a.fh).unwrap();
        assert_eq!(std::fs::read(s.root.join("log")).unwrap(), b"one\ntwo\n");
        let changes = AttrChanges {
            size: Some(3),
            ..Default::default()
        };
        assert_eq!(s.fs.setattr(attr.ino, None, &changes).unwrap().size, 3);
        assert_eq!(std::fs::read(s.root.join("log")).unwrap(), b"one");
    }

    #[test]
    fn fallocate_changes_the_working_copy_like_a_write() {
        use std::os::unix::fs::MetadataExt;
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let s = full();
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"abcdef", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let ino_before = std::fs::metadata(s.root.join("f")).unwrap().ino();
        // A reservation inside the file, or past its end keeping the size, changes nothing.
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.fallocate(w.fh, 0, 2, keep, CALLER).unwrap();
        s.fs.fallocate(w.fh, 0, 100, keep, CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let meta = std::fs::metadata(s.root.join("f")).unwrap();
        assert_eq!(
            (meta.ino(), meta.len()),
            (ino_before, 6),
            "nothing committed"
        );
        // Appends waiting in memory move into the working copy that a zeroing needs.
        let a =
            s.fs.open(attr.ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        s.fs.write(a.fh, 0, b"gh", CALLER).unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
        s.fs.fallocate(a.fh, 4, 3, punch, CALLER).unwrap();
        assert_eq!(s.fs.getattr(attr.ino, Some(a.fh)).unwrap().size, 8);
        assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"abcdef");
        s.fs.release(a.fh).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"abcd\0\0\0h");
        // Growing by zeroing past the end; bad modes and read-only handles are refused.
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.fallocate(w.fh, 6, 4, libc::FALLOC_FL_ZERO_RANGE, CALLER)
            .unwrap();
        let insert = libc::FALLOC_FL_INSERT_RANGE;
        assert_eq!(
            s.fs.fallocate(w.fh, 0, 4096, insert, CALLER),
            Err(Errno::EOPNOTSUPP)
        );
        assert_eq!(
            s.fs.fallocate(w.fh, 0, 1, libc::FALLOC_FL_PUNCH_HOLE, CALLER),
            Err(Errno::EOPNOTSUPP),
            "a hole is punched only with KEEP_SIZE"
        );
        s.fs.release(w.fh).unwrap();
        assert_eq!(
            std::fs::read(s.root.join("f")).unwrap(),
            b"abcd\0\0\0\0\0\0"
        );
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert_eq!(s.fs.fallocate(r.fh, 0, 1, 0, CALLER), Err(Errno::EBADF));
        s.fs.release(r.fh).unwrap();
    }

    #[test]
    fn copy_file_range_copies_what_the_source_handle_sees_into_the_working_copy() {
        let s = full();
        let (src, w) = create(&s.fs, ROOT, "src", RW);
        s.fs.write(w.fh, 0, b"0123456789", CALLER).unwrap();
        // The source handle's uncommitted bytes are what it sees, so they are copied.
        let (dst, d) = create(&s.fs, ROOT, "dst", RW);
        s.fs.write(d.fh, 0, b"abcdef", CALLER).unwrap();
        let n = s.fs.copy_file_range((w.fh, 2), (d.fh, 4), 5, CALLER);
        assert_eq!(n, Ok(5));
        assert_eq!(s.fs.read(d.fh, 0, 100).unwrap(), b"abcd23456");
        assert_eq!(s.fs.getattr(dst.ino, Some(d.fh)).unwrap().size, 9);
        assert_eq!(
            std::fs::read(s.root.join("dst")).unwrap(),
            b"",
            "private until close"
        );
        // Short at the source's end; nothing past it.
        assert_eq!(
            s.fs.copy_file_range((w.fh, 8), (d.fh, 0), 100, CALLER),
            Ok(2)
        );
        assert_eq!(
            s.fs.copy_file_range((w.fh, 10), (d.fh, 0), 100, CALLER),
            Ok(0)
        );
        s.fs.release(w.fh).unwrap();
        s.fs.release(d.fh).unwrap();
        assert_eq!(std::fs::read(s.root.join("dst")).unwrap(), b"89cd23456");
        // From a reader of the committed file, and into a read-only handle: EBADF.
        let r = s.fs.open(src.ino, libc::O_RDONLY, CALLER).unwrap();
        let ro = s.fs.open(dst.ino, libc::O_RDONLY, CALLER).unwrap();
        assert_eq!(
            s.fs.copy_file_range((r.fh, 0), (ro.fh, 0), 4, CALLER),
            Err(Errno::EBADF)
        );
        s.fs.release(r.fh).unwrap();
        s.fs.release(ro.fh).unwrap();
    }

    #[test]
    fn appends_commit_in_place_and_stay_private_until_close() {
        use std::os::unix::fs::MetadataExt;
        let s = full();
        let (attr, w) = create(&s.fs, ROOT, "log", RW);
        s.fs.write(w.fh, 0, b"one\n", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let backing = s.root.join("log");
        let inode = std::fs::metadata(&backing).unwrap().ino();
        let append = libc::O_WRONLY | libc::O_APPEND;

        let old_reader = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        let a = s.fs.open(attr.ino, append, CALLER).unwrap();
        s.fs.write(a.fh, 0, b"two\n", CALLER).unwrap();
        s.fs.write(a.fh, 0, b"three\n", CALLER).unwrap();
        // Not on disk yet; the handle sees its appends, others do not.
        assert_eq!(std::fs::read(&backing).unwrap(), b"one\n");
        assert_eq!(s.fs.read(a.fh, 2, 100).unwrap(), b"e\ntwo\nthree\n");
        assert_eq!(s.fs.read(old_reader.fh, 0, 100).unwrap(), b"one\n");
        s.fs.flush(a.fh, CALLER).unwrap();
        s.fs.release(a.fh).unwrap();
        assert_eq!(std::fs::read(&backing).unwrap(), b"one\ntwo\nthree\n");
        let after = std::fs::metadata(&backing).unwrap();
        assert_eq!(after.ino(), inode, "committed in place, not by a copy");
        assert_eq!(after.nlink(), 1, "no crash marker left");
        // A reader opened before the commit reads on into the committed appends.
        assert_eq!(
            s.fs.read(old_reader.fh, 0, 100).unwrap(),
            b"one\ntwo\nthree\n"
        );
        s.fs.release(old_reader.fh).unwrap();

        // Two appenders from one version: each one's bytes go at the end as it is at its commit.
        let x = s.fs.open(attr.ino, append, CALLER).unwrap();
        let y = s.fs.open(attr.ino, append, CALLER).unwrap();
        s.fs.write(x.fh, 0, b"x\n", CALLER).unwrap();
        s.fs.write(y.fh, 0, b"y\n", CALLER).unwrap();
        assert_eq!(s.fs.getattr(attr.ino, Some(x.fh)).unwrap().size, 16);
        s.fs.release(x.fh).unwrap();
        s.fs.release(y.fh).unwrap();
        assert_eq!(std::fs::read(&backing).unwrap(), b"one\ntwo\nthree\nx\ny\n");

        // An appender whose bytes went to a working copy keeps another's too.
        let before = std::fs::read(&backing).unwrap();
        let big = vec![b'w'; handle::APPEND_BUFFER_MAX + 10];
        let x = s.fs.open(attr.ino, append, CALLER).unwrap();
        let y = s.fs.open(attr.ino, append, CALLER).unwrap();
        s.fs.write(x.fh, 0, &big, CALLER).unwrap();
        s.fs.write(y.fh, 0, b"y2\n", CALLER).unwrap();
        s.fs.release(y.fh).unwrap();
        s.fs.write(x.fh, 0, b"x2\n", CALLER).unwrap();
        s.fs.release(x.fh).unwrap();
        let mut expected = before.clone();
        expected.extend_from_slice(b"y2\n");
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b"x2\n");
        assert!(std::fs::read(&backing).unwrap() == expected);
        let cut = AttrChanges {
            size: Some(before.len() as u64),
            ..Default::default()
        };
        s.fs.setattr(attr.ino, None, &cut).unwrap();

        // More than the buffer holds moves to a working copy and still commits whole.
        let big = vec![b'z'; handle::APPEND_BUFFER_MAX + 10];
        let b = s.fs.open(attr.ino, append, CALLER).unwrap();
        s.fs.write(b.fh, 0, b"small\n", CALLER).unwrap();
        s.fs.write(b.fh, 0, &big, CALLER).unwrap();
        s.fs.write(b.fh, 0, b"end", CALLER).unwrap();
        s.fs.release(b.fh).unwrap();
        let mut expected = b"one\ntwo\nthree\nx\ny\nsmall\n".to_vec();
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b"end");
        assert_eq!(std::fs::read(&backing).unwrap(), expected);

        // Truncating through an appending handle drops the waiting appends first.
        let t =
            s.fs.open(attr.ino, libc::O_RDWR | libc::O_APPEND, CALLER)
                .unwrap();
        s.fs.write(t.fh, 0, b"gone", CALLER).unwrap();
        let cut = AttrChanges {
            size: Some(2),
            ..Default::default()
        };
        assert_eq!(s.fs.setattr(attr.ino, Some(t.fh), &cut).unwrap().size, 2);
        s.fs.write(t.fh, 0, b"!", CALLER).unwrap();
        s.fs.release(t.fh).unwrap();
        assert_eq!(std::fs::read(&backing).unwrap(), b"on!");
    }

    #[test]
    fn names_are_checked() {
        let s = full();
        let long = "x".repeat(256);
        let c = Caller::default();
        assert_eq!(
            s.fs.mkdir(ROOT, name(&long), 0o755, &c).unwrap_err(),
            Errno::ENAMETOOLONG
        );
        assert_eq!(
            s.fs.lookup(ROOT, name(&long)).unwrap_err(),
            Errno::ENAMETOOLONG
        );
        assert_eq!(
            s.fs.mkdir(ROOT, name(".."), 0o755, &c).unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            s.fs.mkdir(ROOT, name("a/b"), 0o755, &c).unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            s.fs.lookup(ROOT, name("missing")).unwrap_err(),
            Errno::ENOENT
        );
        let fifo =
            s.fs.mknod(ROOT, name("p"), libc::S_IFIFO | 0o644, &c)
                .unwrap();
        assert_eq!((fifo.kind, fifo.perm), (Kind::Fifo, 0o644));
        let device = libc::S_IFCHR | 0o644;
        assert_eq!(
            s.fs.mknod(ROOT, name("dev"), device, &c).unwrap_err(),
            Errno::EPERM
        );
    }

    #[test]
    fn the_grant_decides_every_operation() {
        let grant = Grant::parse_cli(&["in/:ro".into(), "out/:rw".into()]).unwrap();
        let s = setup(FsOptions {
            grant,
            ..Default::default()
        });
        std::fs::create_dir_all(s.root.join("in")).unwrap();
        std::fs::create_dir_all(s.root.join("out")).unwrap();
        std::fs::write(s.root.join("in/a"), b"a").unwrap();
        std::fs::write(s.root.join("secret"), b"s").unwrap();
        let c = Caller::default();
        assert_eq!(
            s.fs.lookup(ROOT, name("secret")).unwrap_err(),
            Errno::EACCES
        );
        let fh = s.fs.opendir(ROOT).unwrap();
        let names: Vec<_> =
            s.fs.readdir(fh, 0)
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect();
        assert_eq!(names, [".", "..", "in", "out"]);
        let inp = s.fs.lookup(ROOT, name("in")).unwrap().ino;
        let a = s.fs.lookup(inp, name("a")).unwrap().ino;
        assert!(s.fs.open(a, libc::O_RDONLY, CALLER).is_ok());
        assert_eq!(s.fs.open(a, RW, CALLER).unwrap_err(), Errno::EACCES);
        assert_eq!(
            s.fs.mkdir(inp, name("d"), 0o755, &c).unwrap_err(),
            Errno::EACCES
        );
        let out = s.fs.lookup(ROOT, name("out")).unwrap().ino;
        assert_eq!(
            s.fs.rename(inp, name("a"), out, name("a"), 0).unwrap_err(),
            Errno::EACCES
        );
        assert_eq!(
            s.fs.symlink(out, name("l"), Path::new("/etc/passwd"), &c)
                .unwrap_err(),
            Errno::EACCES
        );
        s.fs.symlink(out, name("ok"), Path::new("../in/a"), &c)
            .unwrap();
        assert_eq!(s.fs.link(a, out, name("h")).unwrap_err(), Errno::EACCES);
    }

    #[test]
    fn quota_limits_file_size_entries_and_bytes() {
        let quota = Arc::new(Quota::new(
            Limits {
                max_file_bytes: Some(10),
                max_files: Some(2),
                max_bytes: Some(15),
            },
            Usage::default(),
        ));
        let s = setup(FsOptions {
            links_anywhere: true,
            quota: Some(quota.clone()),
            ..Default::default()
        });
        let (_, w) = create(&s.fs, ROOT, "a", RW);
        assert_eq!(
            s.fs.write(w.fh, 0, &[1; 16], CALLER).unwrap(),
            10,
            "cut short at the limit"
        );
        assert_eq!(
            s.fs.write(w.fh, 10, &[1; 1], CALLER).unwrap_err(),
            Errno::EFBIG
        );
        s.fs.release(w.fh).unwrap();
        assert_eq!(
            quota.usage(),
            Usage {
                files: 1,
                bytes: 10
            }
        );
        let (b, w) = create(&s.fs, ROOT, "b", RW);
        assert_eq!(
            s.fs.write(w.fh, 0, &[1; 6], CALLER).unwrap_err(),
            Errno::EDQUOT
        );
        s.fs.write(w.fh, 0, &[1; 3], CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        // Appends committed in place are counted like any growth.
        let w =
            s.fs.open(b.ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        assert_eq!(
            s.fs.write(w.fh, 0, &[1; 3], CALLER).unwrap_err(),
            Errno::EDQUOT
        );
        s.fs.write(w.fh, 0, &[1; 2], CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        assert_eq!(quota.usage().bytes, 15);
        let c = Caller::default();
        assert_eq!(
            s.fs.mkdir(ROOT, name("d"), 0o755, &c).unwrap_err(),
            Errno::EDQUOT
        );
        s.fs.unlink(ROOT, name("a")).unwrap();
        assert_eq!(quota.usage(), Usage { files: 1, bytes: 5 });
        s.fs.mkdir(ROOT, name("d"), 0o755, &c).unwrap();
        let st = s.fs.statfs().unwrap();
        assert_eq!((st.files, st.ffree), (2, 0));
    }

    #[test]
    fn seek_data_and_hole_follow_each_handles_view() {
        use std::os::unix::fs::FileExt;
        const MIB: u64 = 1 << 20;
        let s = full();
        // A committed file with one 4 KiB block of data at 4 MiB in 8 MiB.
        let f = std::fs::File::create(s.root.join("sparse")).unwrap();
        f.set_len(8 * MIB).unwrap();
        f.write_all_at(&[b'd'; 4096], 4 * MIB).unwrap();
        drop(f);
        let ino = s.fs.lookup(ROOT, name("sparse")).unwrap().ino;
        let (data, hole) = (libc::SEEK_DATA, libc::SEEK_HOLE);

        let r = s.fs.open(ino, libc::O_RDONLY, CALLER).unwrap();
        assert_eq!(s.fs.lseek(r.fh, 0, data), Ok(4 * MIB));
        assert_eq!(s.fs.lseek(r.fh, 0, hole), Ok(0));
        assert_eq!(s.fs.lseek(r.fh, 4 * MIB as i64, hole), Ok(4 * MIB + 4096));
        assert_eq!(
            s.fs.lseek(r.fh, 4 * MIB as i64 + 4096, data),
            Err(Errno::ENXIO)
        );
        assert_eq!(s.fs.lseek(r.fh, 8 * MIB as i64, hole), Err(Errno::ENXIO));
        assert_eq!(s.fs.lseek(r.fh, -1, data), Err(Errno::ENXIO));
        assert_eq!(s.fs.lseek(r.fh, 0, libc::SEEK_END), Err(Errno::EINVAL));

        // Appended bytes held in memory are data after the committed holes.
        let a =
            s.fs.open(ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        s.fs.write(a.fh, 0, b"tail", CALLER).unwrap();
        assert_eq!(s.fs.lseek(a.fh, 4 * MIB as i64 + 4096, data), Ok(8 * MIB));
        assert_eq!(s.fs.lseek(a.fh, 8 * MIB as i64, hole), Ok(8 * MIB + 4));
        s.fs.release(a.fh).unwrap();
        // The reader still sees its version.
        assert_eq!(
            s.fs.lseek(r.fh, 4 * MIB as i64 + 4096, data),
            Err(Errno::ENXIO)
        );
        s.fs.release(r.fh).unwrap();

        // A working copy still being seeded tells no holes (its own are not the file's).
        let w = s.fs.open(ino, RW, CALLER).unwrap();
        s.fs.write(w.fh, MIB, b"x", CALLER).unwrap();
        assert_eq!(s.fs.lseek(w.fh, 0, data), Ok(0));
        assert_eq!(s.fs.lseek(w.fh, 0, hole), Ok(8 * MIB + 4));
        s.fs.release(w.fh).unwrap();

        // A new file's working copy has exactly the holes its writes left.
        let (_, n) = create(&s.fs, ROOT, "new", RW | libc::O_TRUNC);
        s.fs.write(n.fh, 2 * MIB, b"x", CALLER).unwrap();
        assert_eq!(s.fs.lseek(n.fh, 0, data), Ok(2 * MIB));
        assert_eq!(s.fs.lseek(n.fh, 2 * MIB as i64, hole), Ok(2 * MIB + 1));
        s.fs.release(n.fh).unwrap();
    }
}
