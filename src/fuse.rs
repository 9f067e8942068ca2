//! The FUSE adapter: translates kernel requests into filesystem-core calls and core errors into
//! errnos. No filesystem logic lives here.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    CopyFileRangeFlags, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, AttrChanges, Caller, Errno, Fs, FsResult, Opened, lock_type};
use crate::metrics::{self, FuseHandles, FuseOp, FuseTimer};
use crate::poll::Poller;
use crate::reader_gate::{ReaderGate, Turn};
use crate::store::{Kind, SetAttr, TimeSpec};

/// Serves one [`Fs`] to the kernel.
pub struct FuseAdapter {
    fs: Arc<Fs>,
    /// How long the kernel may trust attributes and names without asking again.
    ttl: Duration,
    poller: Option<Arc<Poller>>,
    gate: Arc<ReaderGate>,
    /// Handles open through this mount, for the metrics.
    handles: FuseHandles,
    /// The kernel leaves clearing set-IDs on write, truncate and chown to the mount (see
    /// `init`).
    kills_set_ids: bool,
}

/// Reads and writes above this size may take a while: another thread reads requests meanwhile.
/// Above the kernel's readahead requests (128 KiB), which come in streams where handing over
/// each one would cost more than it saves.
const LARGE_IO: u32 = 256 << 10;

impl FuseAdapter {
    pub fn new(
        fs: Arc<Fs>,
        ttl: Duration,
        poller: Option<Arc<Poller>>,
        gate: Arc<ReaderGate>,
    ) -> FuseAdapter {
        FuseAdapter {
            fs,
            ttl,
            poller,
            gate,
            handles: FuseHandles::default(),
            kills_set_ids: false,
        }
    }

    /// Starts serving a request `op` (its name in the metrics, which time it until the guards
    /// drop): keeps CPUs from halting while requests keep coming, and has another thread read
    /// requests meanwhile if this one `may_block`.
    fn turn(&self, op: FuseOp, may_block: bool) -> (FuseTimer, Turn<'_>) {
        let timer = FuseTimer::start(op);
        if !crate::store::wait::hooked() {
            // Each request thread serves this session only: hooked at its first request.
            let gate = self.gate.clone();
            crate::store::wait::set_hook(Box::new(move || gate.waiting()));
        }
        if let Some(p) = &self.poller {
            p.activity();
        }
        (timer, self.gate.enter(may_block))
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.blocks,
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
            crtime: a.ctime,
            kind: file_type(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: kernel_rdev(a.rdev),
            blksize: 4096,
            flags: 0,
        }
    }

    /// How long the kernel may cache `a`: not at all for generated content.
    fn ttl(&self, a: &Attr) -> Duration {
        if a.volatile { Duration::ZERO } else { self.ttl }
    }

    fn entry(&self, reply: ReplyEntry, result: Result<Attr, Errno>) {
        match result {
            Ok(a) => reply.entry(&self.ttl(&a), &self.attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// What the notifier thread is to tell the kernel.
enum Notice {
    Attributes(u64),
    Data(u64),
    /// Pages to drop (of each inode, from an offset on), then something to do (a reply that
    /// must wait for it).
    DataThen(Vec<(u64, u64)>, Box<dyn FnOnce() + Send>),
    Entry(u64, std::ffi::OsString),
}

/// Tells the kernel about changes through FUSE notifications, sent by a thread of its own:
/// the core queues them from request handlers and with locks held, and a notification may
/// wait for the kernel (dropping pages waits on their locks, an entry on its directory's),
/// which may be waiting for a request that waits for such a lock. Pages a reply waits for
/// (`DataThen`) are dropped by a second thread: behind an entry's invalidation, which waits
/// for its directory's lock, such a reply would wait for a lookup holding that lock too.
pub struct Notify {
    notices: std::sync::mpsc::Sender<Notice>,
    replies: std::sync::mpsc::Sender<Notice>,
}

impl Notify {
    /// Starts the notifier thread for the mount whose notifier is `notifier`; it ends when
    /// the mount's core drops this.
    pub fn start(notifier: fuser::Notifier) -> std::io::Result<Notify> {
        let (notices, rx) = std::sync::mpsc::channel::<Notice>();
        Self::serve("roomfs-notify", notifier.clone(), rx)?;
        let (replies, rx) = std::sync::mpsc::channel::<Notice>();
        Self::serve("roomfs-pages", notifier, rx)?;
        Ok(Notify { notices, replies })
    }

    /// Starts a thread `name` sending the notices of `rx` to the kernel.
    fn serve(
        name: &str,
        notifier: fuser::Notifier,
        rx: std::sync::mpsc::Receiver<Notice>,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for notice in rx {
                    let (what, result) = match notice {
                        Notice::DataThen(pages, then) => {
                            let mut result = Ok(());
                            for (ino, from) in pages {
                                let from = from.min(i64::MAX as u64) as i64;
                                match notifier.inval_inode(INodeNo(ino), from, 0) {
                                    Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                                        result = Err(e)
                                    }
                                    _ => {}
                                }
                            }
                            then();
                            ("pages", result)
                        }
                        // A negative offset invalidates the attributes only.
                        Notice::Attributes(ino) => {
                            ("attributes", notifier.inval_inode(INodeNo(ino), -1, 0))
                        }
                        Notice::Data(ino) => ("pages", notifier.inval_inode(INodeNo(ino), 0, 0)),
                        Notice::Entry(parent, name) => {
                            ("entry", notifier.inval_entry(INodeNo(parent), &name))
                        }
                    };
                    // ENOENT: the kernel had nothing cached for it.
                    if let Err(e) = result
                        && e.raw_os_error() != Some(libc::ENOENT)
                    {
                        log::debug!("invalidating {what} failed: {e}");
                    }
                }
            })?;
        Ok(())
    }

    fn send(&self, notice: Notice) {
        let queue = match notice {
            Notice::DataThen(..) => &self.replies,
            _ => &self.notices,
        };
        // The threads only end with the mount; what waited for them is done now.
        if let Err(std::sync::mpsc::SendError(Notice::DataThen(_, then))) = queue.send(notice) {
            then();
        }
    }
}

impl crate::fs::KernelCache for Notify {
    fn attributes_changed(&self, ino: u64) {
        self.send(Notice::Attributes(ino));
    }

    fn data_changed(&self, ino: u64) {
        self.send(Notice::Data(ino));
    }

    fn entry_changed(&self, parent: u64, name: &OsStr) {
        self.send(Notice::Entry(parent, name.to_os_string()));
    }

    fn data_changed_then(&self, pages: Vec<(u64, u64)>, then: Box<dyn FnOnce() + Send>) {
        self.send(Notice::DataThen(pages, then));
    }
}

/// Registers backing files for passthrough with the FUSE device's ioctls.
pub struct Backings(pub std::os::fd::OwnedFd);

// FUSE_DEV_IOC_BACKING_CLOSE (linux/fuse.h): fuser only closes through a reply's `BackingId`.
nix::ioctl_write_ptr!(backing_close, 229, 2, u32);

impl crate::fs::Backing for Backings {
    fn register(&self, file: &std::fs::File) -> std::io::Result<u32> {
        fuser::BackingId::create_raw(&self.0, file)
    }

    fn unregister(&self, id: u32) {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid FUSE device descriptor and a pointer to a live u32.
        if let Err(e) = unsafe { backing_close(self.0.as_raw_fd(), &id) } {
            log::warn!("closing passthrough backing file {id} failed: {e}");
        }
    }
}

fn errno(e: Errno) -> fuser::Errno {
    metrics::fuse_error(e.0);
    fuser::Errno::from_i32(e.0)
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::CharDevice => FileType::CharDevice,
    }
}

/// A device number as the kernel reads it from FUSE attributes (`new_decode_dev`: 12 bits of
/// major, 20 of minor).
fn kernel_rdev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn open_flags(o: &Opened) -> FopenFlags {
    let mut flags = FopenFlags::empty();
    if o.direct_io {
        flags |= FopenFlags::FOPEN_DIRECT_IO;
    }
    if o.keep_cache {
        flags |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if o.no_flush {
        flags |= FopenFlags::FOPEN_NOFLUSH;
    }
    flags
}

fn time_spec(t: Option<TimeOrNow>) -> Option<TimeSpec> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeSpec::Now,
        TimeOrNow::SpecificTime(t) => TimeSpec::At(before_epoch_fixed(t)),
    })
}

/// A time the kernel sent as seconds and nanoseconds, as fuser 0.18 makes it: a time before
/// 1970 (`tv_sec` −s, `tv_nsec` n, meaning −s + n) comes as −(s + n) (its `TODO` in
/// `system_time_from_time`), so `touch -d '1969-12-31 23:59:59.25'` would set −1.25 s, not
/// −0.75 s. The mapping is one to one, so the time meant is recovered.
fn before_epoch_fixed(t: SystemTime) -> SystemTime {
    match SystemTime::UNIX_EPOCH.duration_since(t) {
        Ok(d) if d.subsec_nanos() != 0 => {
            SystemTime::UNIX_EPOCH - Duration::from_secs(d.as_secs())
                + Duration::from_nanos(u64::from(d.subsec_nanos()))
        }
        _ => t,
    }
}

/// An xattr value or name list: its size when asked with `size` 0, ERANGE when it does not
/// fit `size`.
fn xattr_reply(reply: ReplyXattr, size: u32, result: Result<Vec<u8>, Errno>) {
    match result {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(fuser::Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(errno(e)),
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each flag is optional: ask for what the running kernel offers.
        for flag in [
            // O_TRUNC must reach open(): the kernel's separate truncate carries no file handle,
            // so it could not be kept in the writer's working copy.
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            // Always readdirplus (not the AUTO heuristic): `ls -l`, `find`, `os.walk` and
            // list-then-stat all want the attributes.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_MAX_PAGES,
            // POSIX locks are served by the daemon (see `fs::locks`); `flock` stays the kernel's.
            InitFlags::FUSE_POSIX_LOCKS,
        ] {
            if config.add_capabilities(flag).is_err() {
                log::debug!("kernel does not offer {flag:?}");
            }
        }
        // The mount clears set-user/group-IDs where a write, truncate or chown must: the kernel
        // then marks checked inodes `S_NOSEC` instead of asking for `security.capability`
        // before every write (a round trip each).
        self.kills_set_ids = config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_ok();
        if self.kills_set_ids {
            self.fs.clears_set_ids();
        }
        if self.fs.wants_passthrough() {
            // Depth 1: backing files on a plain filesystem, and roomfs may itself be a lower
            // layer of an overlayfs.
            let offered = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !offered {
                self.fs
                    .passthrough_unavailable(&"the kernel does not offer FUSE passthrough");
            }
        }
        let _ = config.set_max_background(64);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn destroy(&mut self) {
        let n = self.fs.commit_all();
        if n > 0 {
            log::info!("committed {n} open files at unmount");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _turn = self.turn(FuseOp::Lookup, false);
        self.entry(reply, self.fs.lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _turn = self.turn(FuseOp::Forget, false);
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _turn = self.turn(FuseOp::Getattr, false);
        match self.fs.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => {
                // Only here: the kernel asks for attributes holding no directory's lock (a
                // lookup holds its directory's, which an entry's invalidation waits for).
                let (ttl, attr) = (self.ttl(&a), self.attr(&a));
                let reply = move || reply.attr(&ttl, &attr);
                self.fs.show_then(&[(a.ino, a.size)], Box::new(reply));
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _turn = self.turn(FuseOp::Setattr, size.is_some());
        let changes = AttrChanges {
            size,
            attr: SetAttr {
                perm: mode.map(|m| (m & 0o7777) as u16),
                uid,
                gid,
                atime: time_spec(atime),
                mtime: time_spec(mtime),
            },
            by: req.pid(),
            // As the kernel would otherwise: a truncate by an unprivileged process, and any
            // chown of a file, clear its set-IDs.
            drop_set_ids: self.kills_set_ids
                && ((size.is_some() && req.uid() != 0)
                    || ((uid.is_some() || gid.is_some()) && mode.is_none())),
        };
        match self.fs.setattr(ino.0, fh.map(|f| f.0), &changes) {
            Ok(a) => reply.attr(&self.ttl(&a), &self.attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _turn = self.turn(FuseOp::Readlink, false);
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let _turn = self.turn(FuseOp::Mknod, false);
        let result = self.fs.mknod(parent.0, name, mode & !umask, &caller(req));
        self.entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _turn = self.turn(FuseOp::Mkdir, false);
        let result = self.fs.mkdir(parent.0, name, mode & !umask, &caller(req));
        self.entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.turn(FuseOp::Unlink, false);
        empty(reply, self.fs.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.turn(FuseOp::Rmdir, false);
        empty(reply, self.fs.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _turn = self.turn(FuseOp::Symlink, false);
        let result = self.fs.symlink(parent.0, link_name, target, &caller(req));
        self.entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _turn = self.turn(FuseOp::Rename, false);
        empty(
            reply,
            self.fs
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _turn = self.turn(FuseOp::Link, false);
        self.entry(reply, self.fs.link(ino.0, newparent.0, newname));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _turn = self.turn(FuseOp::Open, false);
        let opened = self.fs.open(ino.0, flags.0, req.pid());
        // An unprivileged `O_TRUNC` clears set-IDs (see `kills_set_ids`).
        let opened = match opened {
            Ok(o) if self.kills_set_ids && flags.0 & libc::O_TRUNC != 0 && req.uid() != 0 => {
                self.fs.drop_set_ids(ino.0).map(|()| o).inspect_err(|_| {
                    let _ = self.fs.release(o.fh);
                })
            }
            other => other,
        };
        self.handles.file_opened_if(opened.is_ok());
        match opened {
            Ok(o) => match o.passthrough {
                Some(id) => {
                    // SAFETY: the core registered `id` on this connection and keeps it until
                    // the last handle opened with it is released; `into_raw` leaves it open.
                    let backing = unsafe { reply.wrap_backing(id) };
                    reply.opened_passthrough(FileHandle(o.fh), open_flags(&o), &backing);
                    backing.into_raw();
                }
                None => reply.opened(FileHandle(o.fh), open_flags(&o)),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _turn = self.turn(FuseOp::Create, false);
        let created = self
            .fs
            .create(parent.0, name, mode & !umask, flags, &caller(req));
        self.handles.file_opened_if(created.is_ok());
        match created {
            Ok((a, o)) => match o.passthrough {
                Some(id) => {
                    // SAFETY: as in `open`.
                    let backing = unsafe { reply.wrap_backing(id) };
                    reply.created_passthrough(
                        &self.ttl(&a),
                        &self.attr(&a),
                        Generation(0),
                        FileHandle(o.fh),
                        open_flags(&o),
                        &backing,
                    );
                    backing.into_raw();
                }
                None => reply.created(
                    &self.ttl(&a),
                    &self.attr(&a),
                    Generation(0),
                    FileHandle(o.fh),
                    open_flags(&o),
                ),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _turn = self.turn(FuseOp::Read, size > LARGE_IO);
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => {
                metrics::bytes_read(data.len());
                reply.data(&data)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _turn = self.turn(
            FuseOp::Write,
            data.len() > LARGE_IO as usize || self.fs.write_may_copy(fh.0),
        );
        if self.kills_set_ids
            && write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            && let Err(e) = self.fs.drop_set_ids(ino.0)
        {
            return reply.error(errno(e));
        }
        let written = if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
            self.fs.write_back(fh.0, offset, data)
        } else {
            self.fs.write(fh.0, offset, data, req.pid())
        };
        match written {
            Ok(n) => {
                metrics::bytes_written(n.into());
                reply.written(n)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _turn = self.turn(FuseOp::CopyFileRange, len > u64::from(LARGE_IO));
        let copied =
            self.fs
                .copy_file_range((fh_in.0, offset_in), (fh_out.0, offset_out), len, req.pid());
        match copied {
            Ok(n) => {
                metrics::bytes_written(n.into());
                reply.written(n)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Zeroing or growing a large file may copy or write much: off the request threads.
        let _turn = self.turn(
            FuseOp::Fallocate,
            length > u64::from(LARGE_IO) || self.fs.write_may_copy(fh.0),
        );
        empty(
            reply,
            self.fs.fallocate(fh.0, offset, length, mode, req.pid()),
        );
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _turn = self.turn(FuseOp::Flush, self.fs.commit_may_block(fh.0));
        empty(reply, self.fs.flush(fh.0, req.pid(), Some(lock_owner.0)));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.turn(FuseOp::Release, self.fs.commit_may_block(fh.0));
        // Counted as closed once its last commit is done (and counted, if it failed).
        let released = self.fs.release(fh.0);
        self.handles.file_released();
        empty(reply, released);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.turn(FuseOp::Fsync, true);
        empty(reply, self.fs.fsync(fh.0));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _turn = self.turn(FuseOp::Lseek, false);
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _turn = self.turn(FuseOp::Opendir, true);
        match self.fs.opendir(ino.0) {
            Ok(fh) => {
                self.handles.dir_opened();
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _turn = self.turn(FuseOp::Readdir, offset == 0);
        let result = self.fs.readdir(fh.0, offset, |e| {
            !reply.add(INodeNo(e.ino), e.next, file_type(e.kind), &e.name)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _turn = self.turn(FuseOp::Readdirplus, offset == 0);
        let result = self.fs.readdirplus(fh.0, offset, |e, a| {
            !reply.add(
                INodeNo(a.ino),
                e.next,
                &e.name,
                &self.ttl(a),
                &self.attr(a),
                Generation(0),
            )
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _turn = self.turn(FuseOp::Releasedir, false);
        self.fs.releasedir(fh.0);
        self.handles.dir_released();
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _turn = self.turn(FuseOp::Fsyncdir, true);
        empty(reply, self.fs.fsyncdir(ino.0));
    }

    // Extended attributes: `user.*` names are stored with the file (see `fs::xattrs`).
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _turn = self.turn(FuseOp::Getxattr, false);
        xattr_reply(reply, size, self.fs.getxattr(ino.0, name));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _turn = self.turn(FuseOp::Listxattr, false);
        xattr_reply(reply, size, self.fs.listxattr(ino.0));
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _turn = self.turn(FuseOp::Setxattr, false);
        empty(reply, self.fs.setxattr(ino.0, name, value, flags));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _turn = self.turn(FuseOp::Removexattr, false);
        empty(reply, self.fs.removexattr(ino.0, name));
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let _turn = self.turn(FuseOp::Getlk, false);
        match self.fs.getlk(fh.0, lock_owner.0, start, end, typ) {
            Ok(Some(held)) => reply.locked(held.start, held.end, lock_type(held.kind), held.pid),
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        // A lock that must wait is answered later, by whoever lets it in: no thread waits.
        let _turn = self.turn(FuseOp::Setlk, false);
        let reply = Box::new(move |result: FsResult<()>| empty(reply, result));
        self.fs
            .setlk(fh.0, lock_owner.0, pid, (start, end), typ, sleep, reply);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        let _turn = self.turn(FuseOp::Ioctl, false);
        reply.error(fuser::Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _turn = self.turn(FuseOp::Statfs, false);
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }
}
