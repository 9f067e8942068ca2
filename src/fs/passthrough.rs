//! FUSE passthrough: the kernel reads a large file straight from its committed file on the
//! local disk, with no request to the daemon and without the FUSE page cache (which keeps
//! pages one by one, where the disk's filesystem uses large folios): sequential reads then
//! run at the speed of the disk's filesystem, and the daemon is not involved at all.
//!
//! The kernel's rule shapes everything here: while any handle of an inode is open with a
//! backing file, every other open of that inode must name the same backing file, and none may
//! go through the page cache. So:
//! - A *window* opens only for a read-only open of a file of at least [`PASSTHROUGH_MIN`]
//!   bytes that nobody else has open in this mount (a writer's working copy is not the
//!   committed file, and cached handles would block it); its backing file is the committed
//!   file that open found.
//! - While the window is open, every open of the inode must name its backing file. Readers of
//!   that same file are served by the kernel. Write-only opens name it too and get direct I/O
//!   besides: their writes come to the daemon and are staged by every rule (a write-only
//!   descriptor cannot be mapped, so the backing file serves them nothing). A read-write open
//!   could map the backing file while it writes a working copy, and a reader of a newer
//!   version would map an old one: for those the name moves to a new inode
//!   ([`InodeTable::supersede`](super::inode::InodeTable::supersede)) and the open is
//!   answered `ESTALE`, on which the kernel looks the name up again and opens the new inode.
//! - The window closes when the last handle opened in it is released (the kernel has let go
//!   of the backing file before it sends that release).
//!
//! Isolation is kept by the store as for any reader: a reader of a patchable file holds the
//! read lock for as long as it is open (no patch goes into that file meanwhile), commits by
//! exchange leave the window's file as it was, and appends committed in place are the one
//! change such a reader sees as it is written (as `tail -f` wants).

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;

use super::Fs;
use crate::store::{Content, Meta, Version};

/// Files at least this large may be read through passthrough. Below it the FUSE page cache
/// costs little, and the registration (two system calls) would weigh on small-file reads.
pub const PASSTHROUGH_MIN: u64 = 1 << 20;

/// Registers files with the kernel as backing files (the FUSE adapter implements it with the
/// FUSE device's ioctls; tests record the calls).
pub trait Backing: Send + Sync {
    /// Registers `file`; returns the id that open replies name it by.
    fn register(&self, file: &File) -> io::Result<u32>;
    /// Withdraws the registration `id`, which no open handle uses any more.
    fn unregister(&self, id: u32);
}

/// An inode's passthrough window: its registered backing file and the handles opened in it.
#[derive(Debug)]
pub struct Window {
    pub id: u32,
    /// The stored object whose file is registered.
    pub object: Version,
    /// The file handles opened in the window (each released one leaves it).
    pub fhs: Vec<u64>,
}

/// How the kernel serves one open with respect to passthrough.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passing {
    /// Not at all: reads and writes come to the daemon (page cache or direct I/O).
    No,
    /// The kernel reads (and maps) the backing file `id` itself.
    Reads(u32),
    /// A write-only open in a window: its writes come to the daemon with direct I/O (a
    /// write-only descriptor cannot be mapped, so the backing file `id` serves nothing).
    WritesOnly(u32),
    /// The open cannot be served in the inode's window: the name is to move to a new inode.
    Stale,
}

impl Passing {
    /// The backing file id to send with the open reply, if any.
    pub fn backing_id(self) -> Option<u32> {
        match self {
            Passing::No | Passing::Stale => None,
            Passing::Reads(id) | Passing::WritesOnly(id) => Some(id),
        }
    }
}

impl Fs {
    /// Connects the kernel's passthrough, once the mount has it (the kernel offered it and
    /// the options allow it).
    pub fn set_backing(&self, backing: Box<dyn Backing>) {
        let _ = self.backing.set(backing);
    }

    /// Whether the options ask for passthrough and nothing showed it unavailable yet (the
    /// FUSE adapter asks the kernel for it, and connects a [`Backing`], only then).
    pub fn wants_passthrough(&self) -> bool {
        self.options.passthrough && !self.passthrough_failed.load(Ordering::Relaxed)
    }

    /// The kernel cannot pass reads through (`why`): large files are read through the daemon.
    pub fn passthrough_unavailable(&self, why: &dyn std::fmt::Display) {
        if !self.passthrough_failed.swap(true, Ordering::Relaxed) {
            log::info!("large files are read through the daemon: {why}");
        }
    }

    /// Decides how the kernel serves `fh`, a new open with `flags` of the inode whose open
    /// bookkeeping is `window` and `others_open` (any handle of it open), on `content`
    /// (whose attributes are `meta`). Registers a backing file when a window opens. No
    /// window opens on a file record locks were taken on (`locked`, see `Locks::mark`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn passing_for(
        &self,
        window: &mut Option<Window>,
        others_open: bool,
        locked: bool,
        fh: u64,
        content: &dyn Content,
        meta: &Meta,
        flags: i32,
    ) -> Passing {
        let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0;
        let write_only = flags & libc::O_ACCMODE == libc::O_WRONLY;
        let local = content.local();
        if let Some(w) = window {
            let same = local.as_ref().is_some_and(|l| l.object == w.object);
            let passing = if read_only && same {
                Passing::Reads(w.id)
            } else if write_only {
                Passing::WritesOnly(w.id)
            } else {
                // A read-write open could map the window's file while it writes a working
                // copy, a reader of a newer version would map an old one.
                return Passing::Stale;
            };
            w.fhs.push(fh);
            return passing;
        }
        let Some(backing) = self.backing.get() else {
            return Passing::No;
        };
        let Some(local) = local else {
            return Passing::No;
        };
        if !read_only
            || others_open
            || locked
            || meta.size < PASSTHROUGH_MIN
            || self.passthrough_failed.load(Ordering::Relaxed)
        {
            return Passing::No;
        }
        match backing.register(local.file) {
            Ok(id) => {
                *window = Some(Window {
                    id,
                    object: local.object,
                    fhs: vec![fh],
                });
                Passing::Reads(id)
            }
            Err(e) => {
                // EPERM without CAP_SYS_ADMIN, ELOOP when the data dir is itself on a stacked
                // filesystem (overlayfs): no point in trying again for every open.
                self.passthrough_unavailable(&format_args!("passthrough failed ({e})"));
                Passing::No
            }
        }
    }

    /// `fh` is released: it leaves its inode's window. Returns the backing id to unregister
    /// when it was the window's last handle.
    pub(super) fn leave_window(window: &mut Option<Window>, fh: u64) -> Option<u32> {
        let w = window.as_mut()?;
        w.fhs.retain(|&other| other != fh);
        if w.fhs.is_empty() {
            return window.take().map(|w| w.id);
        }
        None
    }

    /// Withdraws a backing file registration (outside the open bookkeeping's lock).
    pub(super) fn unregister_backing(&self, id: Option<u32>) {
        if let (Some(id), Some(backing)) = (id, self.backing.get()) {
            backing.unregister(id);
        }
    }

    /// Moves the name of `ino`, whose window cannot serve an open, to a new inode: the
    /// caller answers `ESTALE`, on which the kernel looks the name up again and opens that.
    /// The window's readers keep the old inode; its handles still commit to the name.
    pub(super) fn supersede(&self, ino: super::Ino) {
        let links = {
            let mut table = super::write_lock(&self.table);
            let links = table.names(ino);
            table.supersede(ino);
            links
        };
        // The kernel looks the name opened up again at the `ESTALE`; the file's other names
        // (hard links) too, once told (by the notifier thread).
        if let Some(kernel) = self.kernel.get() {
            for (parent, name) in links {
                kernel.entry_changed(parent, &name);
            }
        }
        log::debug!("inode {ino}: passthrough readers hold it; its name moves to a new inode");
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::fs::{Caller, Errno, FsOptions, ROOT};
    use crate::store::local::test_store;

    const RO: i32 = libc::O_RDONLY;

    /// Records registrations as the kernel would see them: live ids and the files behind them.
    #[derive(Default)]
    struct Registry {
        next: Mutex<u32>,
        live: Mutex<Vec<(u32, u64)>>,
        fail: Option<i32>,
    }

    impl Backing for Arc<Registry> {
        fn register(&self, file: &File) -> io::Result<u32> {
            if let Some(errno) = self.fail {
                return Err(io::Error::from_raw_os_error(errno));
            }
            let mut next = self.next.lock().unwrap();
            *next += 1;
            let ino = file.metadata()?.ino();
            self.live.lock().unwrap().push((*next, ino));
            Ok(*next)
        }

        fn unregister(&self, id: u32) {
            let mut live = self.live.lock().unwrap();
            let before = live.len();
            live.retain(|&(other, _)| other != id);
            assert_eq!(live.len() + 1, before, "unregistered {id} twice or never");
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        root: PathBuf,
        fs: Fs,
        registry: Arc<Registry>,
    }

    fn setup(fail: Option<i32>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rooms/r");
        let store = test_store(dir.path());
        let id = crate::space::SpaceId::new(crate::space::SpaceKind::Room, "r").unwrap();
        let space = Arc::new(crate::space::Space::new(id, Arc::new(store), None));
        let fs = Fs::new(space, FsOptions::default());
        let registry = Arc::new(Registry {
            fail,
            ..Default::default()
        });
        fs.set_backing(Box::new(registry.clone()));
        Setup {
            _dir: dir,
            root,
            fs,
            registry,
        }
    }

    impl Setup {
        /// A committed file `name` of `len` bytes, and its inode.
        fn file(&self, name: &str, len: usize) -> u64 {
            std::fs::write(self.root.join(name), vec![b'a'; len]).unwrap();
            self.fs.lookup(ROOT, OsStr::new(name)).unwrap().ino
        }

        fn live(&self) -> Vec<(u32, u64)> {
            self.registry.live.lock().unwrap().clone()
        }

        fn disk_ino(&self, name: &str) -> u64 {
            std::fs::metadata(self.root.join(name)).unwrap().ino()
        }
    }

    const BIG: usize = PASSTHROUGH_MIN as usize;

    #[test]
    fn readers_of_a_large_file_share_one_backing_file_until_the_last_is_released() {
        let s = setup(None);
        let ino = s.file("f", BIG);
        let a = s.fs.open(ino, RO, 0).unwrap();
        let id = a
            .passthrough
            .expect("a lone reader of a large file passes through");
        assert!(
            !a.direct_io && !a.keep_cache,
            "the kernel rejects page-cache flags"
        );
        assert_eq!(s.live(), vec![(id, s.disk_ino("f"))]);
        let b = s.fs.open(ino, RO, 0).unwrap();
        assert_eq!(
            b.passthrough,
            Some(id),
            "every open names the same backing file"
        );
        assert!(!b.direct_io);
        s.fs.release(a.fh).unwrap();
        assert_eq!(s.live().len(), 1, "still used by the second reader");
        s.fs.release(b.fh).unwrap();
        assert!(
            s.live().is_empty(),
            "released with the window's last handle"
        );
        // A new window registers anew.
        let c = s.fs.open(ino, RO, 0).unwrap();
        assert!(c.passthrough.is_some());
        s.fs.release(c.fh).unwrap();
        assert!(s.live().is_empty());
    }

    #[test]
    fn small_files_writers_and_files_open_otherwise_do_not_start_a_window() {
        let s = setup(None);
        let small = s.file("small", BIG - 1);
        let r = s.fs.open(small, RO, 0).unwrap();
        assert_eq!(r.passthrough, None);
        s.fs.release(r.fh).unwrap();

        let big = s.file("big", BIG);
        let w = s.fs.open(big, libc::O_WRONLY, 0).unwrap();
        assert_eq!(
            w.passthrough, None,
            "a writer's working copy is not the file"
        );
        let r = s.fs.open(big, RO, 0).unwrap();
        assert_eq!(
            r.passthrough, None,
            "the file is open through the page cache"
        );
        s.fs.release(w.fh).unwrap();
        let r2 = s.fs.open(big, RO, 0).unwrap();
        assert_eq!(r2.passthrough, None, "a cached reader is still open");
        s.fs.release(r.fh).unwrap();
        s.fs.release(r2.fh).unwrap();
        // O_RDONLY|O_TRUNC may change the file: no window either.
        let t = s.fs.open(big, RO | libc::O_TRUNC, 0).unwrap();
        assert_eq!(t.passthrough, None);
        s.fs.release(t.fh).unwrap();
        assert!(s.live().is_empty());
    }

    #[test]
    fn write_only_opens_join_a_window_and_keep_their_writes_staged() {
        let s = setup(None);
        let ino = s.file("f", BIG);
        let reader = s.fs.open(ino, RO, 0).unwrap();
        let id = reader.passthrough.unwrap();
        // A write-only descriptor cannot be mapped: it names the window's file, and its
        // writes come to the daemon (direct I/O) and stay staged until its close.
        let w = s.fs.open(ino, libc::O_WRONLY, 0).unwrap();
        assert_eq!(w.passthrough, Some(id));
        assert!(w.direct_io && !w.keep_cache);
        s.fs.write(w.fh, 0, b"new", 0).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap()[..3], *b"aaa");
        let appender = s.fs.open(ino, libc::O_WRONLY | libc::O_APPEND, 0).unwrap();
        assert_eq!(appender.passthrough, Some(id));
        s.fs.release(appender.fh).unwrap();
        s.fs.release(w.fh).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap()[..3], *b"new");
        assert_eq!(
            s.fs.read(reader.fh, 0, 3).unwrap(),
            b"aaa",
            "the reader keeps its version"
        );
        s.fs.release(reader.fh).unwrap();
        assert!(s.live().is_empty());
    }

    #[test]
    fn opens_a_window_cannot_serve_move_the_name_to_a_new_inode() {
        let s = setup(None);
        let x = s.file("f", BIG);
        let reader = s.fs.open(x, RO, 0).unwrap();
        let first = reader.passthrough.unwrap();
        let w = s.fs.open(x, libc::O_WRONLY, 0).unwrap();

        // A read-write open could map the window's file while writing a working copy.
        assert_eq!(s.fs.open(x, libc::O_RDWR, 0).unwrap_err(), Errno::ESTALE);
        // Through a cached entry (or /proc/<pid>/fd), readers still share x's window.
        let cached = s.fs.open(x, RO, 0).unwrap();
        assert_eq!(cached.passthrough, Some(first));
        s.fs.release(cached.fh).unwrap();
        assert_eq!(s.fs.open(x, libc::O_RDWR, 0).unwrap_err(), Errno::ESTALE);
        let y = s.fs.lookup(ROOT, OsStr::new("f")).unwrap().ino;
        assert_ne!(x, y, "the kernel's next lookup finds a new inode");
        // A reader racing the kernel's retry to the new inode starts no window there, so the
        // retried open is not turned away again.
        let racer = s.fs.open(y, RO, 0).unwrap();
        assert_eq!(racer.passthrough, None);
        let rw = s.fs.open(y, libc::O_RDWR, 0).unwrap();
        assert_eq!(rw.passthrough, None);
        s.fs.write(rw.fh, 0, b"rw!", 0).unwrap();
        assert_eq!(s.fs.read(rw.fh, 0, 3).unwrap(), b"rw!");
        s.fs.release(rw.fh).unwrap();
        s.fs.release(racer.fh).unwrap();
        // The write-only handle still commits to the name: last close wins, whole.
        s.fs.write(w.fh, 0, b"wo", 0).unwrap();
        s.fs.release(w.fh).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap()[..3], *b"woa");
        assert_eq!(s.fs.read(reader.fh, 0, 3).unwrap(), b"aaa");

        // A reader of a newer version than a window's file gets a new inode too.
        let r2 = s.fs.open(y, RO, 0).unwrap();
        let second = r2.passthrough.unwrap();
        assert_ne!(first, second, "each inode has its own window");
        std::fs::write(s.root.join("f.new"), vec![b'b'; BIG]).unwrap();
        std::fs::rename(s.root.join("f.new"), s.root.join("f")).unwrap();
        assert_eq!(s.fs.open(y, RO, 0).unwrap_err(), Errno::ESTALE);
        let z = s.fs.lookup(ROOT, OsStr::new("f")).unwrap().ino;
        let r3 = s.fs.open(z, RO, 0).unwrap();
        assert_eq!(r3.passthrough, None, "the retried open starts no window");
        assert_eq!(s.fs.read(r3.fh, 0, 3).unwrap(), b"bbb");
        assert_eq!(s.live().len(), 2);
        for fh in [reader.fh, r2.fh, r3.fh] {
            s.fs.release(fh).unwrap();
        }
        assert!(s.live().is_empty());
        let r4 = s.fs.open(z, RO, 0).unwrap();
        assert!(r4.passthrough.is_some(), "later opens may");
        s.fs.release(r4.fh).unwrap();
        s.fs.forget(x, 1);
        s.fs.forget(y, 1);
        assert_eq!(s.fs.lookup(ROOT, OsStr::new("f")).unwrap().ino, z);
    }

    #[test]
    fn a_failed_registration_turns_passthrough_off_for_the_mount() {
        let s = setup(Some(libc::EPERM));
        let ino = s.file("f", BIG);
        let r = s.fs.open(ino, RO, 0).unwrap();
        assert_eq!(r.passthrough, None);
        assert!(!r.direct_io, "read through the page cache instead");
        s.fs.release(r.fh).unwrap();
        assert!(s.fs.passthrough_failed.load(Ordering::Relaxed));
        let created =
            s.fs.create(ROOT, OsStr::new("f"), 0o644, RO, &Caller::default())
                .unwrap()
                .1;
        assert_eq!(created.passthrough, None);
        s.fs.release(created.fh).unwrap();
    }
}
