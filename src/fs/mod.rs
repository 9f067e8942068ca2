//! The filesystem core: inodes, open handles, staged writes committed on close, directory
//! listings, grant checks and limits. It knows nothing of FUSE and nothing of the backend
//! behind the [`Store`] seam: every operation takes plain values and returns an [`Errno`] on
//! failure, so it is tested without a mount, against in-memory and failing stores.
//!
//! No lock of the core is held across store I/O: the inode table is locked only to resolve
//! and to record names; operations that change names claim them in the space instead (see
//! `space::claims`), so only operations on the same names wait for each other. A file
//! handle's own lock is held across its I/O: it serializes that handle's operations, as the
//! kernel does for one descriptor. Lock order: a handle's lock, then a claim (a commit claims
//! its path under its handle's lock); never a handle's lock under a claim (what open handles
//! show is read after the claim is dropped: see `link`).
//!
//! By concern: `access` (grant decisions), `names` (lookup and changes of names), `attrs`
//! (attributes, truncation), `open` (opens, shared handles, release), `io` (reads, writes,
//! allocation), `commit` (commit on close and fsync), `dirs` (listings), `passthrough`,
//! `coherence` (changes made by others).

mod access;
mod attrs;
pub mod closers;
mod coherence;
mod commit;
mod dirs;
pub mod handle;
pub mod inode;
mod io;
mod locks;
mod names;
mod open;
pub mod passthrough;
pub mod seed;
mod stream;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_failing;
#[cfg(test)]
mod tests_model;
mod xattrs;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

pub use crate::errno::{Errno, FsResult};
pub use crate::space::quota::{Limits, Quota, Usage};
pub use closers::Tid;
use dirs::{DirHandle, Listings};
use handle::FileHandle;
use inode::InodeTable;
pub use inode::{Ino, ROOT};
pub use locks::{LockReply, lock_type};
use passthrough::Window;
pub use passthrough::{Backing, PASSTHROUGH_MIN};

use crate::events::Changed;
use crate::grant::Grant;
use crate::space::claims::{Claim, Span};
use crate::space::hub::WatcherId;
use crate::space::{Space, SpaceWatcher};
use crate::store::{Kind, Meta, Owner, SetAttr, Store, StoreStatfs, Version};

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
    /// Let the kernel read large files from the disk directly (see `passthrough`).
    pub passthrough: bool,
    /// Who this mount's changes are made by, in events: the token's name, the mount's label,
    /// or its mount point.
    pub participant: Arc<str>,
    /// The count of bytes held by open directories' listings that this mount shares with
    /// others, within one budget (`dirs::LISTINGS_BUDGET`): a daemon's mounts share one, so
    /// that many mounts cannot hold a budget each. `None`: a count of this mount's own.
    pub listings_held: Option<Arc<AtomicUsize>>,
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
    /// Also clear the set-user-ID bit, and the set-group-ID bit of a group-executable file
    /// (see [`Fs::drop_set_ids`]).
    pub drop_set_ids: bool,
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
/// with direct I/O, which bypasses the cache (but not a mapping: that is made of the cache's
/// pages). Readers keep the cached pages only when they are known to hold the current
/// committed version, and a reader reads directly while readers of other versions (cached,
/// or direct ones, which may map) are open. Read-write opens that share one handle
/// (see `open_path`) are one writer as far as the cache goes: they all see its working copy.
#[derive(Default)]
struct OpenState {
    readers: u32,
    writers: u32,
    /// Readers that read through the page cache (opened while no writer was open).
    cached_readers: u32,
    /// The open handles of this inode.
    handles: Vec<u64>,
    /// Of the cached readers, those that took a POSIX lock (see `locks`).
    cached_lockers: u32,
    /// The committed version the kernel's cached pages hold, if known.
    cached_version: Option<Version>,
    /// The size the kernel was last shown of this inode while readers read it through the
    /// page cache (see [`Fs::showing`]).
    shown: Option<u64>,
    /// The handle that read-write opens without `O_TRUNC`/`O_APPEND` share, and how many of
    /// the open file handles are it.
    shared: Option<(Arc<Mutex<FileHandle>>, u32)>,
    /// The kernel's passthrough of this inode, while handles opened with it are open.
    window: Option<Window>,
}

/// Tells the kernel that what it cached is stale (the FUSE adapter implements it with FUSE
/// notifications; without a mount there is nothing to tell). Every method only queues the
/// notification for a thread of its own and returns: the core calls them from request
/// handlers and with locks held, and the kernel may be waiting for a request that waits for
/// such a lock (hf-mount and libfuse deadlocked on notifications sent inline).
pub trait KernelCache: Send + Sync {
    /// The attributes (size, times) of `ino` changed.
    fn attributes_changed(&self, ino: Ino);
    /// The content of `ino` changed: cached pages and attributes are stale.
    fn data_changed(&self, ino: Ino);
    /// The entry `name` in the directory `parent` changed (created, removed, renamed or
    /// replaced): the kernel must look it up again.
    fn entry_changed(&self, parent: Ino, name: &OsStr);
    /// The content of each `(ino, from)` changed from offset `from` on: the kernel drops its
    /// cached pages from the one holding `from` on (and the attributes). Calls `then` once it
    /// did (a reply that must not go out before: see `fs::locks`, `Fs::show_then`).
    fn data_changed_then(&self, pages: Vec<(Ino, u64)>, then: Box<dyn FnOnce() + Send>);
}

/// A mounted space: the space (its store, limits and other mounts) plus the state of the
/// kernel's view of it.
pub struct Fs {
    space: Arc<Space>,
    /// The space's store.
    store: Arc<dyn Store>,
    /// This mount's id among the space's watchers, once it watches (see `watch_space`).
    watcher: std::sync::OnceLock<WatcherId>,
    kernel: std::sync::OnceLock<Box<dyn KernelCache>>,
    /// The kernel's passthrough, when the mount has it (see `passthrough`).
    backing: std::sync::OnceLock<Box<dyn Backing>>,
    /// Registering a backing file failed once: large files are read through the daemon.
    passthrough_failed: AtomicBool,
    /// The mount clears set-user/group-IDs at writes itself (see `Fs::clears_set_ids`).
    clears_set_ids: AtomicBool,
    /// The mount is stopping and its open files were committed for the last time: changes
    /// to them are refused (see `Fs::seal`).
    sealed: AtomicBool,
    options: FsOptions,
    table: RwLock<InodeTable>,
    opens: Mutex<HashMap<Ino, OpenState>>,
    files: RwLock<HashMap<u64, Arc<Mutex<FileHandle>>>>,
    dirs: Mutex<HashMap<u64, DirHandle>>,
    /// The listings the open directories hold, shared (see `dirs`).
    listings: Mutex<Listings>,
    next_fh: AtomicU64,
    /// Tells this mount's core from the others of the process (its files' lock keys).
    id: u64,
    /// Unix seconds of the last open, listing or change (inactivity timeouts use it).
    last_activity: AtomicU64,
    /// What is asked of the processes closing files (see `closers`).
    processes: closers::Processes,
    /// The device of the mount, once mounted (tells its descriptors from other mounts').
    mount_dev: std::sync::OnceLock<libc::dev_t>,
}

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
    pub fn new(space: Arc<Space>, options: FsOptions) -> Fs {
        let listings = Listings::counted_in(options.listings_held.clone().unwrap_or_default());
        Fs {
            store: space.store().clone(),
            space,
            watcher: std::sync::OnceLock::new(),
            kernel: std::sync::OnceLock::new(),
            backing: std::sync::OnceLock::new(),
            passthrough_failed: AtomicBool::new(false),
            clears_set_ids: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            options,
            table: RwLock::new(InodeTable::default()),
            opens: Mutex::new(HashMap::new()),
            files: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            listings: Mutex::new(listings),
            next_fh: AtomicU64::new(1),
            id: {
                static NEXT: AtomicU64 = AtomicU64::new(1);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
            last_activity: AtomicU64::new(unix_secs()),
            processes: closers::Processes::default(),
            mount_dev: std::sync::OnceLock::new(),
        }
    }

    /// Unix seconds of the last open, listing or change through this mount; now while a file
    /// is open through it (a writer that pauses longer than an idle timeout is still at work).
    pub fn last_activity(&self) -> u64 {
        if !read_lock(&self.files).is_empty() {
            return unix_secs();
        }
        self.last_activity.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        self.last_activity.store(unix_secs(), Ordering::Relaxed);
    }

    /// Connects the kernel's caches, once the mount exists.
    pub fn set_kernel_cache(&self, kernel: Box<dyn KernelCache>) {
        let _ = self.kernel.set(kernel);
    }

    /// The device number of the mount, once it exists.
    pub fn set_mount_dev(&self, dev: libc::dev_t) {
        let _ = self.mount_dev.set(dev);
    }

    /// The space this mount shows.
    pub fn space(&self) -> &Arc<Space> {
        &self.space
    }

    /// Has this mount hear of changes others make to its space (see `coherence`).
    pub fn watch_space(self: &Arc<Self>) {
        let weak: std::sync::Weak<dyn SpaceWatcher> = Arc::downgrade(self) as _;
        let id = self.space.watch(weak);
        if self.watcher.set(id).is_err() {
            self.space.unwatch(id);
        }
    }

    /// Stops hearing of changes to the space (the mount ended).
    pub fn unwatch_space(&self) {
        if let Some(id) = self.watcher.get() {
            self.space.unwatch(*id);
        }
    }

    /// Tells the space (its other mounts, its feed) of a change made through this mount.
    fn publish(&self, change: Changed) {
        self.publish_all(&[change]);
    }

    /// [`Fs::publish`] of several changes, in order.
    fn publish_all(&self, changes: &[Changed]) {
        let by = self.watcher.get().copied();
        self.space.changed(changes, &self.options.participant, by);
    }

    /// Runs `create` holding one reserved entry of the quota (released if it fails).
    fn creating<T>(&self, create: impl FnOnce() -> FsResult<T>) -> FsResult<T> {
        self.touch();
        if let Some(q) = self.space.quota() {
            q.add_entry()?;
        }
        let result = create();
        if result.is_err()
            && let Some(q) = self.space.quota()
        {
            q.remove_entry(0);
        }
        result
    }

    /// The mode bits and owner of a new entry of `kind` at `path`, asked for with `perm` by
    /// `caller`: the caller's owner, but in a directory with the set-group-ID bit the
    /// directory's group, and a new directory gets the bit too (the group semantics of
    /// Linux's own filesystems, which shared directories such as `git init --shared`'s
    /// rely on). The kernel has already cleared the bits the caller may not set.
    fn new_entry(
        &self,
        path: &Path,
        kind: Kind,
        perm: u16,
        caller: &Caller,
    ) -> FsResult<(u16, Owner)> {
        let parent = self.store.stat(path.parent().unwrap_or(Path::new("")))?;
        let setgid = parent.perm & libc::S_ISGID as u16 != 0;
        let perm = match kind {
            Kind::Dir if setgid => perm | libc::S_ISGID as u16,
            _ => perm,
        };
        let gid = if setgid { parent.gid } else { caller.gid };
        let owner = self.options.owner_from_caller.then_some((caller.uid, gid));
        Ok((perm, owner))
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

    /// Before `name` in `parent`, a name of the file `id` (with several names), joins the
    /// inode the table knows for that file: whether that inode is still the file. An inode's
    /// name may hold another file by now (replaced by a commit or a rename, here or
    /// elsewhere), and the file system may have given the number of a deleted file to a new
    /// one (ext4 does at once), so the identity alone could join two different files into one
    /// inode, whose pages the kernel would then share. The inode's name is looked at (one
    /// `stat`, only when a second name of a file is first met); if it is not the file, or has
    /// no name left, the table forgets the identity and the name gets an inode of its own.
    fn check_linked(&self, id: crate::store::FileId, parent: Ino, name: &OsStr) {
        let (known, here) = {
            let table = read_lock(&self.table);
            (table.linked_to(id), table.child(parent, name))
        };
        let Some((ino, path)) = known else {
            return;
        };
        if here == Some(ino) {
            return;
        }
        let still =
            path.is_some_and(|path| self.store.stat(&path).is_ok_and(|m| m.file_id == Some(id)));
        if !still {
            write_lock(&self.table).forget_linked(id, ino);
        }
    }

    fn remember(&self, parent: Ino, name: &OsStr, meta: &Meta) -> Attr {
        // A name of a file with several: the kernel must see one inode for all of them.
        let linked = meta
            .file_id
            .filter(|_| meta.nlink > 1 && meta.kind != Kind::Dir);
        if let Some(id) = linked {
            self.check_linked(id, parent, name);
        }
        let ino = {
            let mut table = write_lock(&self.table);
            let ino = table.remember(parent, name, meta.kind, linked);
            if meta.kind == Kind::Dir {
                table.keep_dir_attrs(ino, meta);
            }
            ino
        };
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

    /// Whether changes through open handles are refused (see `seal`); checked under the
    /// handle's lock, so a change either is in the last commit or fails.
    fn sealed(&self) -> FsResult<()> {
        if self.sealed.load(Ordering::SeqCst) {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    fn file(&self, fh: u64) -> FsResult<Arc<Mutex<FileHandle>>> {
        read_lock(&self.files).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    /// How long a claim of a file's path waits for other mounts to be told of changes made
    /// elsewhere in the process (see `Space::settle`; told within microseconds unless the
    /// teller waits for the caller's own handle).
    const SETTLE_BOUND: std::time::Duration = std::time::Duration::from_millis(20);

    /// The path of `ino`, claimed for a change (see `space::claims`): no other operation of
    /// this process changes it until the claim is dropped. `None` once it has no name.
    fn claim_path(&self, ino: Ino) -> Option<(PathBuf, Claim<'_>)> {
        let mut settled = false;
        loop {
            let path = read_lock(&self.table).path(ino)?;
            let claim = self.space.claim(&[(&path, Span::Entry)]);
            // A rename may have moved it between the look and the claim.
            if read_lock(&self.table).path(ino).as_ref() != Some(&path) {
                continue;
            }
            // One in another mount may have let its claims go before this mount was told of
            // it (see `Space::settle`): wait for that, briefly, and look again.
            if settled || self.space.all_told() {
                return Some((path, claim));
            }
            drop(claim);
            self.space.settle(Self::SETTLE_BOUND);
            settled = true;
        }
    }

    /// The path of `name` in `parent` (checked as by `child_path`), claimed for a change.
    fn claim_child(&self, parent: Ino, name: &OsStr) -> FsResult<(PathBuf, Claim<'_>)> {
        loop {
            let path = self.child_path(parent, name)?;
            let claim = self.space.claim(&[(&path, Span::Entry)]);
            if self.child_path(parent, name).as_ref() == Ok(&path) {
                return Ok((path, claim));
            }
        }
    }

    /// Capacity and usage; a space with limits reports its limits and what it uses of them.
    pub fn statfs(&self) -> FsResult<StoreStatfs> {
        let mut s = self.store.statfs()?;
        if let Some(q) = self.space.quota() {
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
