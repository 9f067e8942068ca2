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
//! - While the window is open, every open of the inode names its backing file. Readers of
//!   that same file are served by the kernel. Writers, and readers that found a newer version
//!   (the file was replaced since), get direct I/O besides: their reads and writes still come
//!   to the daemon, which serves them by every rule of staged writes, and only their memory
//!   maps are of the window's file (the kernel maps the backing file).
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
use super::handle::FileHandle;
use crate::store::Content;

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
    /// The committed file registered, as `(dev, ino)`.
    pub object: (u64, u64),
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
    /// The inode is in a window: reads and writes come to the daemon with direct I/O, and
    /// only memory maps are of the backing file `id`.
    MapsOnly(u32),
}

impl Passing {
    /// The backing file id to send with the open reply, if any.
    pub fn backing_id(self) -> Option<u32> {
        match self {
            Passing::No => None,
            Passing::Reads(id) | Passing::MapsOnly(id) => Some(id),
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

    /// Decides how the kernel serves `fh`, a new open of the inode whose open bookkeeping is
    /// `window` and `others_open` (any handle of it open), on `content`; `read_only` for an
    /// open that can change nothing. Registers a backing file when a window opens.
    pub(super) fn passing_for(
        &self,
        window: &mut Option<Window>,
        others_open: bool,
        fh: u64,
        content: &dyn Content,
        read_only: bool,
    ) -> Passing {
        let object = content.meta().ok().map(|m| (m.version.0, m.version.1));
        if let Some(w) = window {
            w.fhs.push(fh);
            return if read_only && object == Some(w.object) {
                Passing::Reads(w.id)
            } else {
                Passing::MapsOnly(w.id)
            };
        }
        let Some(backing) = self.backing.get() else {
            return Passing::No;
        };
        let size = content.meta().map(|m| m.size).unwrap_or(0);
        let (Some(file), Some(object)) = (content.local_file(), object) else {
            return Passing::No;
        };
        if !read_only
            || others_open
            || size < PASSTHROUGH_MIN
            || self.passthrough_failed.load(Ordering::Relaxed)
        {
            return Passing::No;
        }
        match backing.register(file) {
            Ok(id) => {
                *window = Some(Window {
                    id,
                    object,
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

    /// Logs a writer (or a reader of a newer version) whose memory maps are of the window's
    /// file rather than of what it reads and writes.
    pub(super) fn note_maps_only(&self, h: &FileHandle, passing: Passing) {
        if let Passing::MapsOnly(_) = passing {
            log::debug!(
                "inode {} opened {} while a passthrough reader has it open: direct I/O, and \
                 memory maps show the reader's version",
                h.ino,
                if h.writable {
                    "for writing"
                } else {
                    "at a newer version"
                }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::fs::{Caller, FsOptions, ROOT};
    use crate::store::local::{LocalStore, StagingArea};

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
        let (area, _) = StagingArea::create(dir.path()).unwrap();
        let root = dir.path().join("rooms/r");
        let store = LocalStore::open(root.clone(), Arc::new(area)).unwrap();
        let fs = Fs::new(Arc::new(store), FsOptions::default());
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
    fn opens_during_a_window_name_its_file_and_keep_staged_writes() {
        let s = setup(None);
        let ino = s.file("f", BIG);
        let reader = s.fs.open(ino, RO, 0).unwrap();
        let id = reader.passthrough.unwrap();

        // A writer must name the window's file too: direct I/O keeps its writes staged.
        let w = s.fs.open(ino, libc::O_RDWR, 0).unwrap();
        assert_eq!(w.passthrough, Some(id));
        assert!(w.direct_io && !w.keep_cache);
        s.fs.write(w.fh, 0, b"new", 0).unwrap();
        assert_eq!(s.fs.read(w.fh, 0, 3).unwrap(), b"new");
        assert_eq!(std::fs::read(s.root.join("f")).unwrap()[..3], *b"aaa");
        // A second read-write open joins the writer's handle, in the window too.
        let joined = s.fs.open(ino, libc::O_RDWR, 0).unwrap();
        assert_eq!(joined.passthrough, Some(id));
        assert!(joined.direct_io);
        assert_eq!(s.fs.read(joined.fh, 0, 3).unwrap(), b"new");
        s.fs.release(joined.fh).unwrap();
        s.fs.release(w.fh).unwrap();
        assert_eq!(std::fs::read(s.root.join("f")).unwrap()[..3], *b"new");

        // The file was replaced: a reader of the new version reads it through the daemon.
        let newer = s.fs.open(ino, RO, 0).unwrap();
        assert_eq!(newer.passthrough, Some(id));
        assert!(newer.direct_io, "the window's file is the previous version");
        assert_eq!(s.fs.read(newer.fh, 0, 3).unwrap(), b"new");
        assert_eq!(s.live().len(), 1);
        s.fs.release(reader.fh).unwrap();
        assert_eq!(s.live().len(), 1, "the newer reader still uses the window");
        s.fs.release(newer.fh).unwrap();
        assert!(s.live().is_empty());

        // Alone again: a window on the new version.
        let again = s.fs.open(ino, RO, 0).unwrap();
        assert!(again.passthrough.is_some() && !again.direct_io);
        assert_eq!(s.live()[0].1, s.disk_ino("f"));
        s.fs.release(again.fh).unwrap();
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
