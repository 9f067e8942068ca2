//! Tests of the core without a mount. Each runs against the in-memory store and the local
//! store (a test that looks at what only a local disk has, inode numbers, says so).

use super::*;
use crate::store::local::test_store;
use crate::store::mem::MemStore;
use crate::store::{Change, CommitRequest};

const RW: i32 = libc::O_RDWR;
/// A caller the test does not name: every close commits.
const CALLER: Tid = 0;

/// The backends the core is tested against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Mem,
    Local,
    /// The S3 store over an in-memory bucket.
    S3,
}

const BACKENDS: [Backend; 3] = [Backend::Mem, Backend::Local, Backend::S3];

struct Setup {
    _dir: Option<tempfile::TempDir>,
    /// The space's directory, on the local store.
    root: Option<PathBuf>,
    store: Arc<dyn Store>,
    fs: Arc<Fs>,
}

fn setup(options: FsOptions) -> Setup {
    setup_on(Backend::Mem, options, None)
}

/// A space of its own on `backend`, counted against `quota`.
fn setup_on(backend: Backend, options: FsOptions, quota: Option<Arc<Quota>>) -> Setup {
    let (dir, root, store): (_, _, Arc<dyn Store>) = match backend {
        Backend::Mem => (None, None, Arc::new(MemStore::new())),
        Backend::Local => {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("rooms/r");
            let store = Arc::new(test_store(dir.path()));
            (Some(dir), Some(root), store)
        }
        Backend::S3 => {
            let dir = tempfile::tempdir().unwrap();
            let (_, store) = crate::store::s3::test_store(dir.path());
            (Some(dir), None, store)
        }
    };
    let id = crate::space::SpaceId::new(crate::space::SpaceKind::Room, "r").unwrap();
    let space = Arc::new(Space::new(id, store.clone(), quota));
    Setup {
        _dir: dir,
        root,
        store,
        fs: Arc::new(Fs::new(space, options)),
    }
}

fn full_on(backend: Backend) -> Setup {
    setup_on(
        backend,
        FsOptions {
            links_anywhere: true,
            ..Default::default()
        },
        None,
    )
}

/// A full-access space on each backend in turn.
fn every_store() -> impl Iterator<Item = Setup> {
    BACKENDS.into_iter().map(full_on)
}

impl Setup {
    /// The committed content of `path`, read through the store.
    fn read(&self, path: &str) -> Vec<u8> {
        let content = self.store.open(Path::new(path)).unwrap();
        let mut buf = vec![0u8; content.meta().size as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = content.read_at(&mut buf[done..], done as u64).unwrap();
            assert!(n > 0, "short read of {path}");
            done += n;
        }
        buf
    }

    /// Puts `bytes` at `path` behind the mount's back (as another host or process would).
    fn put(&self, path: &str, bytes: &[u8]) {
        let path = Path::new(path);
        self.store.create(path, 0o644, None, false).unwrap();
        let base = self.store.open(path).unwrap();
        let copy = self.store.working_copy(Path::new("f")).unwrap();
        copy.write_at(bytes, 0).unwrap();
        self.store
            .commit(CommitRequest {
                path,
                base: &base,
                change: Change::Whole(&copy),
                durable: false,
                attrs: None,
            })
            .unwrap();
    }

    fn exists(&self, path: &str) -> bool {
        self.store.stat(Path::new(path)).is_ok()
    }

    fn mkdir(&self, path: &str) {
        self.store.mkdir(Path::new(path), 0o755, None).unwrap();
    }

    /// The inode number of the file behind `path`, on the local store.
    fn inode(&self, path: &str) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let root = self.root.as_ref()?;
        Some(std::fs::metadata(root.join(path)).unwrap().ino())
    }
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
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"hello", CALLER).unwrap();
        assert_eq!(s.read("f"), b"");
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert!(
            r.direct_io,
            "a reader opened during a write bypasses the page cache"
        );
        assert_eq!(s.fs.read(r.fh, 0, 100).unwrap(), b"");
        assert_eq!(s.fs.read(w.fh, 0, 100).unwrap(), b"hello");
        assert_eq!(s.fs.getattr(attr.ino, Some(w.fh)).unwrap().size, 5);
        s.fs.flush(w.fh, CALLER, None).unwrap();
        assert_eq!(s.read("f"), b"hello");
        // Bytes added at the end were committed as an append: the reader reads on into them
        // (whole, as `tail -f` wants; in place on the local store, into the next object that
        // extends its own on S3).
        assert_eq!(s.fs.read(r.fh, 0, 100).unwrap(), b"hello");
        // A rewrite is a new version: the reader keeps the one it opened, whole.
        s.fs.write(w.fh, 0, b"HELLO, world", CALLER).unwrap();
        s.fs.flush(w.fh, CALLER, None).unwrap();
        assert_eq!(s.read("f"), b"HELLO, world");
        assert_eq!(s.fs.read(r.fh, 0, 100).unwrap(), b"hello");
        s.fs.release(w.fh).unwrap();
        s.fs.release(r.fh).unwrap();
        let again = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert!(
            again.keep_cache,
            "the sole writer's cached pages are the committed version"
        );
        assert!(again.no_flush);
        assert_eq!(s.fs.read(again.fh, 0, 100).unwrap(), b"HELLO, world");
    }
}

#[test]
fn a_close_by_a_process_that_never_used_the_handle_does_not_commit() {
    for s in every_store() {
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
        s.fs.flush(w.fh, stranger, None).unwrap();
        assert_eq!(s.read("f"), b"");
        s.fs.write(w.fh, 4, b" and whole", me).unwrap();
        s.fs.flush(w.fh, me, None).unwrap();
        assert_eq!(s.read("f"), b"half and whole");

        // A process that wrote through the handle commits at its close.
        s.fs.write(w.fh, 0, b"HALF", stranger).unwrap();
        s.fs.flush(w.fh, stranger, None).unwrap();
        assert_eq!(s.read("f"), b"HALF and whole");

        // The last close always commits, whoever it comes from.
        let w2 = s.fs.open(attr.ino, libc::O_WRONLY, me).unwrap();
        s.fs.write(w2.fh, 0, b"last", me).unwrap();
        s.fs.flush(w2.fh, stranger, None).unwrap();
        assert_eq!(s.read("f"), b"HALF and whole");
        s.fs.release(w2.fh).unwrap();
        assert_eq!(s.read("f"), b"last and whole");
        s.fs.release(w.fh).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The shell of `closers_fake`: a process as the core's fake `/proc` describes it.
const SHELL: Tid = 4242;

thread_local! {
    /// Whether `SHELL` still has its file open on another descriptor (`dup2`ed onto stdout).
    static HOLDS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Whether `SHELL` is ending, killed by a signal.
    static KILLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `s` with its processes answered by `HOLDS` and `KILLED` (the calls come on the test's
/// thread).
fn closers_fake(mut s: Setup) -> Setup {
    Arc::get_mut(&mut s.fs).unwrap().processes = closers::Processes {
        holds_writer: |tid, _, _, _| tid == SHELL && HOLDS.get(),
        killed: |tid| tid == SHELL && KILLED.get(),
    };
    s
}

#[test]
fn a_redirect_publishes_the_emptied_file_only_when_the_command_ends() {
    for s in every_store().map(closers_fake) {
        let trunc = libc::O_WRONLY | libc::O_TRUNC;
        let (attr, created) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(created.fh, 0, b"old\n", CALLER).unwrap();
        s.fs.release(created.fh).unwrap();

        // `cmd > f`: the shell opens, dup2s onto stdout and closes what it opened.
        let w = s.fs.open(attr.ino, trunc, SHELL).unwrap();
        HOLDS.set(true);
        s.fs.flush(w.fh, SHELL, None).unwrap();
        assert_eq!(s.read("f"), b"old\n", "the command still has it open");
        let later = std::time::Instant::now() + 2 * handle::PUBLISH_EVERY;
        assert_eq!(
            s.fs.publish_streams_at(later),
            0,
            "no output to publish yet"
        );
        assert_eq!(s.read("f"), b"old\n");
        // The command writes and exits: its close commits.
        s.fs.write(w.fh, 0, b"new\n", SHELL).unwrap();
        HOLDS.set(false);
        s.fs.flush(w.fh, SHELL, None).unwrap();
        assert_eq!(s.read("f"), b"new\n");
        s.fs.release(w.fh).unwrap();

        // A command that ends normally without output leaves the file empty, as `: > f` does.
        let w = s.fs.open(attr.ino, trunc, SHELL).unwrap();
        HOLDS.set(true);
        s.fs.flush(w.fh, SHELL, None).unwrap();
        assert_eq!(s.read("f"), b"new\n");
        HOLDS.set(false);
        s.fs.flush(w.fh, SHELL, None).unwrap();
        assert_eq!(s.read("f"), b"");
        s.fs.release(w.fh).unwrap();
    }
}

#[test]
fn a_command_killed_before_it_wrote_leaves_the_previous_version() {
    for s in every_store().map(closers_fake) {
        let trunc = libc::O_WRONLY | libc::O_TRUNC;
        let (attr, created) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(created.fh, 0, b"old\n", CALLER).unwrap();
        s.fs.release(created.fh).unwrap();

        let w = s.fs.open(attr.ino, trunc, SHELL).unwrap();
        HOLDS.set(true);
        s.fs.flush(w.fh, SHELL, None).unwrap();
        // Killed: the exit closes its descriptors (none left in `/proc`).
        HOLDS.set(false);
        KILLED.set(true);
        s.fs.flush(w.fh, SHELL, None).unwrap();
        KILLED.set(false);
        assert_eq!(s.read("f"), b"old\n");
        s.fs.release(w.fh).unwrap();
        assert_eq!(s.read("f"), b"old\n", "the last close drops the emptying");
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert_eq!(s.fs.read(r.fh, 0, 100).unwrap(), b"old\n");
        s.fs.release(r.fh).unwrap();

        // Killed after writing: what it wrote is committed, as any writer's at its exit.
        let w = s.fs.open(attr.ino, trunc, SHELL).unwrap();
        s.fs.write(w.fh, 0, b"part", SHELL).unwrap();
        KILLED.set(true);
        s.fs.flush(w.fh, SHELL, None).unwrap();
        KILLED.set(false);
        assert_eq!(s.read("f"), b"part");
        s.fs.release(w.fh).unwrap();

        // A process that still has the descriptor writes after the killed one: its bytes are
        // committed at the last close, in place of the emptied file.
        let w = s.fs.open(attr.ino, trunc, SHELL).unwrap();
        KILLED.set(true);
        s.fs.flush(w.fh, SHELL, None).unwrap();
        KILLED.set(false);
        s.fs.write(w.fh, 0, b"survivor", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        assert_eq!(s.read("f"), b"survivor");
    }
}

#[test]
fn a_reader_of_an_empty_file_reads_what_an_o_trunc_writer_adds() {
    for s in every_store() {
        let (attr, created) = create(&s.fs, ROOT, "log", RW);
        s.fs.release(created.fh).unwrap();
        // `: > log; tail -f log & cmd > log`.
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        let w =
            s.fs.open(attr.ino, libc::O_WRONLY | libc::O_TRUNC, CALLER)
                .unwrap();
        s.fs.write(w.fh, 0, b"l 1\n", CALLER).unwrap();
        s.fs.flush(w.fh, CALLER, None).unwrap();
        assert_eq!(s.read("log"), b"l 1\n");
        assert_eq!(s.fs.read(r.fh, 0, 100).unwrap(), b"l 1\n");
        s.fs.write(w.fh, 4, b"l 2\n", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        assert_eq!(s.fs.read(r.fh, 0, 100).unwrap(), b"l 1\nl 2\n");
        s.fs.release(r.fh).unwrap();
    }
}

#[test]
fn a_working_copy_shows_the_files_mode_and_its_own_size() {
    for s in every_store() {
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
}

#[test]
fn read_write_opens_share_one_working_copy() {
    for s in every_store() {
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
        assert_eq!(s.read("db"), b"v1");
        // Any member's close commits what all of them wrote.
        s.fs.flush(b.fh, CALLER, None).unwrap();
        assert_eq!(s.read("db"), b"A2+B");
        s.fs.release(b.fh).unwrap();
        s.fs.write(a.fh, 0, b"a3", CALLER).unwrap();
        assert_eq!(s.fs.read(a.fh, 0, 10).unwrap(), b"a3+B");
        s.fs.release(a.fh).unwrap();
        assert_eq!(s.read("db"), b"a3+B");
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
        assert_eq!(s.read("db"), b"private");
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
}

#[test]
fn a_lone_writer_keeps_cached_pages_only_of_the_version_it_opens() {
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"v1", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        // The pages cached are v1, the committed version: a new writer may keep them.
        let w2 = s.fs.open(attr.ino, RW, CALLER).unwrap();
        assert!(w2.keep_cache && !w2.direct_io);
        s.fs.write(w2.fh, 0, b"v2", CALLER).unwrap();
        s.fs.release(w2.fh).unwrap();
        // Changed behind the mount's back: the cached pages are of another version.
        s.put("f", b"outside");
        let w3 = s.fs.open(attr.ino, RW, CALLER).unwrap();
        assert!(!w3.keep_cache, "pages of another version are dropped");
        s.fs.release(w3.fh).unwrap();
    }
}

/// A file `log` holding `first\n`, committed, on a mount that clears set-IDs itself (its
/// appenders write with direct I/O).
fn log_on_a_mount_clearing_set_ids(s: &Setup) -> Attr {
    s.fs.clears_set_ids();
    let (attr, w) = create(&s.fs, ROOT, "log", RW);
    s.fs.write(w.fh, 0, b"first\n", CALLER).unwrap();
    s.fs.release(w.fh).unwrap();
    attr
}

#[test]
fn a_lone_appender_writes_directly_and_the_pages_it_did_not_write_stay_cached() {
    const APPEND: i32 = libc::O_WRONLY | libc::O_APPEND;
    for s in every_store() {
        let attr = log_on_a_mount_clearing_set_ids(&s);
        // Direct I/O spares the kernel's capability check; the pages of the version it starts
        // from stay.
        let a = s.fs.open(attr.ino, APPEND, CALLER).unwrap();
        assert!(a.direct_io && a.keep_cache);
        s.fs.write(a.fh, 6, b"second\n", CALLER).unwrap();
        s.fs.flush(a.fh, CALLER, None).unwrap();
        s.fs.release(a.fh).unwrap();
        assert_eq!(s.read("log"), b"first\nsecond\n");
        // Those pages are the new version's too (the appends dropped the ones they wrote into).
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert!(r.keep_cache && !r.direct_io);
        // An appender beside a reader writes directly as any writer there does, and the
        // reader's pages are of its own version.
        let a = s.fs.open(attr.ino, APPEND, CALLER).unwrap();
        assert!(a.direct_io);
        s.fs.write(a.fh, 13, b"third\n", CALLER).unwrap();
        s.fs.release(a.fh).unwrap();
        s.fs.release(r.fh).unwrap();
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert!(!r.keep_cache, "the cached pages are of an older version");
        s.fs.release(r.fh).unwrap();
    }
    // A mount that leaves set-IDs to the kernel appends through the page cache.
    let s = setup(FsOptions::default());
    let (attr, w) = create(&s.fs, ROOT, "log", RW);
    s.fs.release(w.fh).unwrap();
    let a = s.fs.open(attr.ino, APPEND, CALLER).unwrap();
    assert!(!a.direct_io);
    s.fs.release(a.fh).unwrap();
}

#[test]
fn an_appender_opened_before_the_last_ones_release_keeps_the_cached_pages() {
    const APPEND: i32 = libc::O_WRONLY | libc::O_APPEND;
    for s in every_store() {
        let attr = log_on_a_mount_clearing_set_ids(&s);
        // `close()` returns at the FLUSH, which commits; the kernel sends the RELEASE later,
        // so the next appender's OPEN can come first: the pages stay for it all the same.
        let a = s.fs.open(attr.ino, APPEND, CALLER).unwrap();
        s.fs.write(a.fh, 6, b"second\n", CALLER).unwrap();
        s.fs.flush(a.fh, CALLER, None).unwrap();
        let b = s.fs.open(attr.ino, APPEND, CALLER).unwrap();
        assert!(b.direct_io && b.keep_cache);
        s.fs.release(a.fh).unwrap();
        s.fs.write(b.fh, 13, b"third\n", CALLER).unwrap();
        s.fs.flush(b.fh, CALLER, None).unwrap();
        let c = s.fs.open(attr.ino, APPEND, CALLER).unwrap();
        assert!(c.keep_cache, "and after it committed, for the next one");
        s.fs.release(b.fh).unwrap();
        s.fs.release(c.fh).unwrap();
        assert_eq!(s.read("log"), b"first\nsecond\nthird\n");
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert!(r.keep_cache && !r.direct_io);
        s.fs.release(r.fh).unwrap();
        // A cached writer's open makes the pages nobody's.
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        let a = s.fs.open(attr.ino, APPEND, CALLER).unwrap();
        assert!(!a.keep_cache);
        s.fs.release(a.fh).unwrap();
        s.fs.release(w.fh).unwrap();
    }
}

#[test]
fn large_files_are_seeded_lazily_and_commit_whole() {
    for s in every_store() {
        let len = (seed::LAZY_SEED_MIN + 12345) as usize;
        let original: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        s.put("big", &original);
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
        assert_eq!(s.read("big"), original);
        s.fs.release(h.fh).unwrap();
        assert!(s.read("big") == expect);

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
        assert!(s.read("big") == expect);
    }
}

#[test]
fn large_files_are_patched_in_place_unless_somebody_else_has_them_open() {
    for s in every_store() {
        let len = (seed::LAZY_SEED_MIN + 4096) as usize;
        let original: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        s.put("db", &original);
        let inode = || s.inode("db");
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
        assert!(s.read("db") == original, "private until close");
        s.fs.release(w.fh).unwrap();
        assert!(s.read("db") == v1);
        assert_eq!(inode(), first, "patched in place");
        if let Some(root) = &s.root {
            use std::os::unix::fs::MetadataExt;
            let links = std::fs::metadata(root.join("db")).unwrap().nlink();
            assert_eq!(links, 1, "no crash marker left");
        }

        // A reader open: the writer commits a whole copy, the reader keeps its version.
        let mut v2 = v1.clone();
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        write(w.fh, 0, b"v2", &mut v2);
        s.fs.release(w.fh).unwrap();
        assert!(s.read("db") == v2);
        let second = inode();
        if s.root.is_some() {
            assert_ne!(second, first, "a new file, not a patch under the reader");
        }
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
        assert!(s.read("db") == b);
        s.fs.release(wa.fh).unwrap();
        assert!(s.read("db") == a, "the last close wins, whole");

        // fsync commits a durable patch; the handle goes on writing and patches again.
        let mut v3 = a.clone();
        let third = inode();
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        write(w.fh, 100, b"synced", &mut v3);
        s.fs.fsync(w.fh).unwrap();
        assert!(s.read("db") == v3);
        write(w.fh, 3 << 20, b"after", &mut v3);
        s.fs.release(w.fh).unwrap();
        assert!(s.read("db") == v3);
        assert_eq!(inode(), third, "both commits patched the same file");
    }
}

#[test]
fn a_flush_without_changes_commits_nothing() {
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"v1", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let before = s.store.stat(Path::new("f")).unwrap().version;
        let ino_before = s.inode("f");
        let h = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.flush(h.fh, CALLER, None).unwrap();
        s.fs.release(h.fh).unwrap();
        assert_eq!(s.store.stat(Path::new("f")).unwrap().version, before);
        assert_eq!(s.inode("f"), ino_before);
    }
}

#[test]
fn renames_and_unlinks_of_open_files() {
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "draft", RW);
        s.fs.write(w.fh, 0, b"text", CALLER).unwrap();
        s.fs.rename(ROOT, name("draft"), ROOT, name("final"), 0)
            .unwrap();
        s.fs.flush(w.fh, CALLER, None).unwrap();
        assert_eq!(s.read("final"), b"text");
        assert!(!s.exists("draft"));
        let w2 = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.write(w2.fh, 0, b"TEXT", CALLER).unwrap();
        s.fs.unlink(ROOT, name("final")).unwrap();
        assert_eq!(s.fs.getattr(attr.ino, None).unwrap().size, 4);
        s.fs.release(w2.fh).unwrap();
        s.fs.release(w.fh).unwrap();
        assert!(!s.exists("final"), "an unlinked file is not resurrected");
    }
}

/// An open of an inode another file was renamed over (or that was removed) after the kernel
/// looked its name up is `ESTALE`: the kernel then looks the name up again and opens the file
/// it names now, as a local filesystem's open would have.
#[test]
fn an_open_of_a_name_replaced_since_its_lookup_is_looked_up_again() {
    for s in every_store() {
        s.put("cfg", b"v1");
        s.put("cfg.tmp", b"v2");
        let old = s.fs.lookup(ROOT, name("cfg")).unwrap().ino;
        s.fs.rename(ROOT, name("cfg.tmp"), ROOT, name("cfg"), 0)
            .unwrap();
        assert_eq!(
            s.fs.open(old, libc::O_RDONLY, CALLER).unwrap_err(),
            Errno::ESTALE
        );
        let new = s.fs.lookup(ROOT, name("cfg")).unwrap().ino;
        let r = s.fs.open(new, libc::O_RDONLY, CALLER).unwrap();
        assert_eq!(s.fs.read(r.fh, 0, 10).unwrap(), b"v2");
        s.fs.release(r.fh).unwrap();
        s.fs.unlink(ROOT, name("cfg")).unwrap();
        assert_eq!(
            s.fs.open(new, libc::O_RDONLY, CALLER).unwrap_err(),
            Errno::ESTALE
        );
    }
}

/// A file unlinked (or replaced by a rename) while open keeps the handle's changes through
/// `fsync` and closes of its other descriptors (a temporary file made, unlinked and synced,
/// as Python's `TemporaryFile` does without `O_TMPFILE`), until its last close.
#[test]
fn an_unlinked_open_file_keeps_its_changes_until_its_last_close() {
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "scratch", RW);
        s.fs.write(w.fh, 0, b"abc", CALLER).unwrap();
        s.fs.unlink(ROOT, name("scratch")).unwrap();
        s.fs.fsync(w.fh).unwrap();
        assert_eq!(s.fs.read(w.fh, 0, 10).unwrap(), b"abc");
        assert_eq!(s.fs.getattr(attr.ino, Some(w.fh)).unwrap().size, 3);
        s.fs.write(w.fh, 3, b"def", CALLER).unwrap();
        s.fs.flush(w.fh, CALLER, None).unwrap();
        assert_eq!(s.fs.read(w.fh, 0, 10).unwrap(), b"abcdef");
        s.fs.release(w.fh).unwrap();
        assert!(!s.exists("scratch"), "an unlinked file is not resurrected");
        // Replaced by a rename while being written.
        s.put("u", b"x");
        let u = s.fs.lookup(ROOT, name("u")).unwrap();
        let w = s.fs.open(u.ino, RW, CALLER).unwrap();
        s.fs.write(w.fh, 0, b"mine", CALLER).unwrap();
        s.put("other", b"theirs");
        s.fs.rename(ROOT, name("other"), ROOT, name("u"), 0)
            .unwrap();
        s.fs.fsync(w.fh).unwrap();
        assert_eq!(s.fs.read(w.fh, 0, 10).unwrap(), b"mine");
        s.fs.release(w.fh).unwrap();
        assert_eq!(s.read("u"), b"theirs");
    }
}

/// A write into a sparse file (a disk image, a preallocated output) leaves its holes: the
/// working copy copies the committed file's data, not its holes.
#[test]
fn a_write_into_a_sparse_file_keeps_it_sparse() {
    let s = full_on(Backend::Local);
    let root = s.root.clone().unwrap();
    // Both ways a working copy is made: copied at once, and seeded lazily (large files).
    for (n, size) in [("small", 3u64 << 20), ("large", 256 << 20)] {
        let (attr, w) = create(&s.fs, ROOT, n, RW);
        s.fs.write(w.fh, size - 1, b"e", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.write(w.fh, size / 2, b"m", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let data = s.read(n);
        assert_eq!((data.len() as u64, data[(size / 2) as usize]), (size, b'm'));
        let used =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(root.join(n)).unwrap()) * 512;
        assert!(used < 1 << 20, "{n}: {used} bytes on disk for {size}");
    }
}

#[test]
fn truncate_by_path_commits_and_append_writes_at_the_end() {
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "log", RW);
        s.fs.write(w.fh, 0, b"one\n", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let a =
            s.fs.open(attr.ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        s.fs.write(a.fh, 0, b"two\n", CALLER).unwrap();
        s.fs.release(a.fh).unwrap();
        assert_eq!(s.read("log"), b"one\ntwo\n");
        let changes = AttrChanges {
            size: Some(3),
            ..Default::default()
        };
        assert_eq!(s.fs.setattr(attr.ino, None, &changes).unwrap().size, 3);
        assert_eq!(s.read("log"), b"one");
    }
}

/// A mount stopping with files still open commits them one last time and refuses changes
/// through them after that (`EIO`): no write is reported done and then lost with the process.
#[test]
fn a_sealed_mount_commits_open_files_and_refuses_further_changes() {
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "log", RW);
        s.fs.write(w.fh, 0, b"line 1\n", CALLER).unwrap();
        assert_eq!(s.read("log"), b"");
        assert_eq!(s.fs.seal(), 1);
        assert_eq!(s.read("log"), b"line 1\n", "committed at the seal");
        assert_eq!(s.fs.write(w.fh, 7, b"line 2\n", CALLER), Err(Errno::EIO));
        assert_eq!(s.fs.fallocate(w.fh, 0, 100, 0, CALLER), Err(Errno::EIO));
        let truncate = AttrChanges {
            size: Some(0),
            ..AttrChanges::default()
        };
        assert_eq!(
            s.fs.setattr(attr.ino, Some(w.fh), &truncate).err(),
            Some(Errno::EIO)
        );
        // Reads go on, and closing commits nothing more.
        assert_eq!(s.fs.read(w.fh, 0, 100).unwrap(), b"line 1\n");
        s.fs.release(w.fh).unwrap();
        assert_eq!(s.read("log"), b"line 1\n");
    }
}

#[test]
fn fallocate_changes_the_working_copy_like_a_write() {
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"abcdef", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let before = s.store.stat(Path::new("f")).unwrap().version;
        // A reservation inside the file, or past its end keeping the size, changes nothing.
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.fallocate(w.fh, 0, 2, keep, CALLER).unwrap();
        s.fs.fallocate(w.fh, 0, 100, keep, CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let meta = s.store.stat(Path::new("f")).unwrap();
        assert_eq!((meta.version, meta.size), (before, 6), "nothing committed");
        // Appends waiting in memory move into the working copy that a zeroing needs.
        let a =
            s.fs.open(attr.ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        s.fs.write(a.fh, 0, b"gh", CALLER).unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
        s.fs.fallocate(a.fh, 4, 3, punch, CALLER).unwrap();
        assert_eq!(s.fs.getattr(attr.ino, Some(a.fh)).unwrap().size, 8);
        assert_eq!(s.read("f"), b"abcdef");
        s.fs.release(a.fh).unwrap();
        assert_eq!(s.read("f"), b"abcd\0\0\0h");
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
        assert_eq!(s.read("f"), b"abcd\0\0\0\0\0\0");
        let r = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        assert_eq!(s.fs.fallocate(r.fh, 0, 1, 0, CALLER), Err(Errno::EBADF));
        s.fs.release(r.fh).unwrap();
    }
}

#[test]
fn copy_file_range_copies_what_the_source_handle_sees_into_the_working_copy() {
    for s in every_store() {
        let (src, w) = create(&s.fs, ROOT, "src", RW);
        s.fs.write(w.fh, 0, b"0123456789", CALLER).unwrap();
        // The source handle's uncommitted bytes are what it sees, so they are copied.
        let (dst, d) = create(&s.fs, ROOT, "dst", RW);
        s.fs.write(d.fh, 0, b"abcdef", CALLER).unwrap();
        let n = s.fs.copy_file_range((w.fh, 2), (d.fh, 4), 5, CALLER);
        assert_eq!(n, Ok(5));
        assert_eq!(s.fs.read(d.fh, 0, 100).unwrap(), b"abcd23456");
        assert_eq!(s.fs.getattr(dst.ino, Some(d.fh)).unwrap().size, 9);
        assert_eq!(s.read("dst"), b"", "private until close");
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
        assert_eq!(s.read("dst"), b"89cd23456");
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
}

#[test]
fn a_new_file_written_once_is_committed_in_place_without_a_working_copy() {
    // `open(path, "w")`: `O_CREAT | O_TRUNC`. Truncating the empty file the create just made
    // changes nothing, so the bytes wait in memory and go into that file at the close.
    let new = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "f", new);
        assert_eq!(attr.size, 0);
        let inode = s.inode("f");
        s.fs.write(w.fh, 0, b"hello", CALLER).unwrap();
        assert_eq!(s.read("f"), b"", "private until the close");
        assert_eq!(s.fs.getattr(attr.ino, Some(w.fh)).unwrap().size, 5);
        if let Some(root) = &s.root {
            let staging = root.join("../../.staging");
            // (Files only: an instance's `spread-N` subdirectories hold nothing by name.)
            let copies: usize = std::fs::read_dir(&staging)
                .unwrap()
                .map(|d| {
                    std::fs::read_dir(d.unwrap().path())
                        .unwrap()
                        .filter(|e| !e.as_ref().unwrap().file_type().unwrap().is_dir())
                        .count()
                        - 1
                })
                .sum();
            assert_eq!(copies, 0, "no working copy besides the lock");
        }
        s.fs.flush(w.fh, CALLER, None).unwrap();
        s.fs.release(w.fh).unwrap();
        assert_eq!(s.read("f"), b"hello");
        assert_eq!(s.inode("f"), inode, "the created file itself, not a copy");

        // Opened with `O_TRUNC` again (not created now): a new version, whole, as before.
        let reader = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        let (_, again) = create(&s.fs, ROOT, "f", new);
        s.fs.write(again.fh, 0, b"bye", CALLER).unwrap();
        s.fs.release(again.fh).unwrap();
        assert_eq!(s.read("f"), b"bye");
        assert_eq!(s.fs.read(reader.fh, 0, 100).unwrap(), b"hello");
        s.fs.release(reader.fh).unwrap();

        // An existing empty file truncated and closed unwritten still gets a new mtime.
        let (empty, e) = create(&s.fs, ROOT, "empty", new);
        s.fs.release(e.fh).unwrap();
        let before = s.store.stat(Path::new("empty")).unwrap().mtime;
        // Into the next second: on S3 an object's time is its Last-Modified, in seconds.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(
            1020 - u64::from(now.subsec_millis()),
        ));
        let t =
            s.fs.open(empty.ino, libc::O_WRONLY | libc::O_TRUNC, CALLER)
                .unwrap();
        s.fs.release(t.fh).unwrap();
        assert!(s.store.stat(Path::new("empty")).unwrap().mtime > before);
    }
}

#[test]
fn appends_commit_in_place_and_stay_private_until_close() {
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "log", RW);
        s.fs.write(w.fh, 0, b"one\n", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let inode = s.inode("log");
        let append = libc::O_WRONLY | libc::O_APPEND;

        let old_reader = s.fs.open(attr.ino, libc::O_RDONLY, CALLER).unwrap();
        let a = s.fs.open(attr.ino, append, CALLER).unwrap();
        s.fs.write(a.fh, 0, b"two\n", CALLER).unwrap();
        s.fs.write(a.fh, 0, b"three\n", CALLER).unwrap();
        // Not on disk yet; the handle sees its appends, others do not.
        assert_eq!(s.read("log"), b"one\n");
        assert_eq!(s.fs.read(a.fh, 2, 100).unwrap(), b"e\ntwo\nthree\n");
        assert_eq!(s.fs.read(old_reader.fh, 0, 100).unwrap(), b"one\n");
        s.fs.flush(a.fh, CALLER, None).unwrap();
        s.fs.release(a.fh).unwrap();
        assert_eq!(s.read("log"), b"one\ntwo\nthree\n");
        assert_eq!(s.inode("log"), inode, "committed in place, not by a copy");
        if let Some(root) = &s.root {
            use std::os::unix::fs::MetadataExt;
            let links = std::fs::metadata(root.join("log")).unwrap().nlink();
            assert_eq!(links, 1, "no crash marker left");
        }
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
        assert_eq!(s.read("log"), b"one\ntwo\nthree\nx\ny\n");

        // An appender whose bytes went to a working copy keeps another's too.
        let before = s.read("log");
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
        assert!(s.read("log") == expected);
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
        assert_eq!(s.read("log"), expected);

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
        assert_eq!(s.read("log"), b"on!");
    }
}

#[test]
fn names_are_checked() {
    for s in every_store() {
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
}

#[test]
fn the_grant_decides_every_operation() {
    let grant = Grant::parse_cli(&["in/:ro".into(), "out/:rw".into()]).unwrap();
    let s = setup(FsOptions {
        grant,
        ..Default::default()
    });
    s.mkdir("in");
    s.mkdir("out");
    s.put("in/a", b"a");
    s.put("secret", b"s");
    let c = Caller::default();
    assert_eq!(
        s.fs.lookup(ROOT, name("secret")).unwrap_err(),
        Errno::EACCES
    );
    let fh = s.fs.opendir(ROOT).unwrap();
    let mut names = Vec::new();
    s.fs.readdir(fh, 0, |e| {
        names.push(e.name.clone());
        true
    })
    .unwrap();
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
    for backend in BACKENDS {
        let quota = Arc::new(Quota::new(
            Limits {
                max_file_bytes: Some(10),
                max_files: Some(2),
                max_bytes: Some(15),
            },
            Usage::default(),
        ));
        let s = setup_on(
            backend,
            FsOptions {
                links_anywhere: true,
                ..Default::default()
            },
            Some(quota.clone()),
        );
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
}

/// `ftruncate` past the byte limit is refused at once, as a write is, not at the close.
#[test]
fn ftruncate_past_the_byte_limit_is_refused_at_once() {
    for backend in BACKENDS {
        let quota = Arc::new(Quota::new(
            Limits {
                max_bytes: Some(100),
                ..Default::default()
            },
            Usage::default(),
        ));
        let s = setup_on(backend, FsOptions::default(), Some(quota.clone()));
        let (f, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, &[1; 60], CALLER).unwrap();
        let grow = |size: u64| {
            s.fs.setattr(
                f.ino,
                Some(w.fh),
                &AttrChanges {
                    size: Some(size),
                    ..Default::default()
                },
            )
        };
        assert_eq!(grow(101).unwrap_err(), Errno::EDQUOT, "{backend:?}");
        grow(100).unwrap();
        s.fs.release(w.fh).unwrap();
        assert_eq!(quota.usage().bytes, 100, "{backend:?}");
    }
}

#[test]
fn a_writer_replacing_a_file_another_writer_replaced_is_charged_from_what_it_replaces() {
    for backend in BACKENDS {
        let quota = Arc::new(Quota::new(
            Limits {
                max_bytes: Some(15),
                ..Default::default()
            },
            Usage::default(),
        ));
        let s = setup_on(backend, FsOptions::default(), Some(quota.clone()));
        let (f, w0) = create(&s.fs, ROOT, "f", RW);
        s.fs.release(w0.fh).unwrap();
        // Two writers of the empty file write 10 bytes each, then close in turn: each
        // replaces the file, so it never holds more than 10.
        let a = s.fs.open(f.ino, libc::O_WRONLY, CALLER).unwrap();
        let b = s.fs.open(f.ino, libc::O_WRONLY, CALLER).unwrap();
        s.fs.write(a.fh, 0, &[b'a'; 10], CALLER).unwrap();
        s.fs.write(b.fh, 0, &[b'b'; 10], CALLER).unwrap();
        s.fs.release(a.fh).unwrap();
        assert_eq!(quota.usage().bytes, 10, "{backend:?}");
        s.fs.release(b.fh).unwrap();
        assert_eq!(quota.usage().bytes, 10, "{backend:?}");
        // A writer that opened the empty version writes after another's close: its growth
        // counts from the 10 bytes it will replace.
        let c =
            s.fs.open(f.ino, libc::O_WRONLY | libc::O_TRUNC, CALLER)
                .unwrap();
        let d = s.fs.open(f.ino, libc::O_WRONLY, CALLER).unwrap();
        s.fs.write(d.fh, 0, &[b'd'; 12], CALLER).unwrap();
        s.fs.release(d.fh).unwrap();
        assert_eq!(quota.usage().bytes, 12, "{backend:?}");
        s.fs.write(c.fh, 0, &[b'c'; 14], CALLER).unwrap();
        // Beyond the limit from what is there now, it is still refused.
        assert_eq!(
            s.fs.write(c.fh, 14, &[b'c'; 2], CALLER).unwrap_err(),
            Errno::EDQUOT,
            "{backend:?}"
        );
        s.fs.release(c.fh).unwrap();
        assert_eq!(quota.usage().bytes, 14, "{backend:?}");
        assert_eq!(s.read("f"), vec![b'c'; 14]);
        // Appends add to the file as it is: counted from the version they opened, refused.
        let e =
            s.fs.open(f.ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        assert_eq!(
            s.fs.write(e.fh, 0, &[b'e'; 2], CALLER).unwrap_err(),
            Errno::EDQUOT
        );
        s.fs.release(e.fh).unwrap();
    }
}

/// A file counts once per name, also when it grows: growing a file with several names, then
/// removing all but one, leaves its bytes counted once (removing each name gives back its
/// size, so growth counted once let a session store past its limit without bound).
#[test]
fn a_file_with_several_names_is_charged_its_growth_once_per_name() {
    for backend in BACKENDS {
        let quota = Arc::new(Quota::new(
            Limits {
                max_bytes: Some(1000),
                ..Default::default()
            },
            Usage::default(),
        ));
        let s = setup_on(
            backend,
            FsOptions {
                links_anywhere: true,
                ..Default::default()
            },
            Some(quota.clone()),
        );
        let (f, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.release(w.fh).unwrap();
        match s.fs.link(f.ino, ROOT, name("before")) {
            Err(Errno::EPERM) => continue, // a store without hard links
            linked => linked.unwrap(),
        };
        // Linked before the open, and while it is open.
        let a =
            s.fs.open(f.ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        s.fs.link(f.ino, ROOT, name("during")).unwrap();
        s.fs.write(a.fh, 0, &[b'x'; 300], CALLER).unwrap();
        s.fs.release(a.fh).unwrap();
        assert_eq!(quota.usage().bytes, 900, "{backend:?}: three names of 300");
        // Past the limit counted per name: refused.
        let b =
            s.fs.open(f.ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        s.fs.write(b.fh, 0, &[b'y'; 50], CALLER).unwrap();
        assert_eq!(
            s.fs.release(b.fh).unwrap_err(),
            Errno::EDQUOT,
            "{backend:?}"
        );
        // Rewritten smaller through one name: every name gives the bytes back.
        let c =
            s.fs.open(f.ino, libc::O_WRONLY | libc::O_TRUNC, CALLER)
                .unwrap();
        s.fs.write(c.fh, 0, &[b'z'; 100], CALLER).unwrap();
        s.fs.release(c.fh).unwrap();
        assert_eq!(quota.usage().bytes, 300, "{backend:?}: three names of 100");
        for n in ["before", "during"] {
            s.fs.unlink(ROOT, name(n)).unwrap();
        }
        assert_eq!(
            quota.usage(),
            Usage {
                files: 1,
                bytes: 100
            },
            "{backend:?}: what the space holds"
        );
    }
}

/// A file open for writing whose name is removed while it has other names this mount never
/// looked up (made by another process, or forgotten with the inode): it lives on under them,
/// and what is written through the open descriptor lands there, as on a local disk — not
/// dropped at the close as a removed file's changes are.
#[test]
fn writes_to_a_file_whose_name_is_removed_go_to_its_other_names() {
    let s = full_on(Backend::Local);
    let root = s.root.clone().unwrap();
    for (flags, other) in [
        (libc::O_WRONLY | libc::O_APPEND, "g"),
        (libc::O_WRONLY | libc::O_TRUNC, "sub/g"),
    ] {
        let (f, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"orig", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        // The other name, made behind the mount's back: the mount knows only `f`.
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::hard_link(root.join("f"), root.join(other)).unwrap();
        let h = s.fs.open(f.ino, flags, CALLER).unwrap();
        s.fs.unlink(ROOT, name("f")).unwrap();
        s.fs.write(h.fh, 0, b"+more", CALLER).unwrap();
        s.fs.release(h.fh).unwrap();
        let want: &[u8] = if flags & libc::O_APPEND != 0 {
            b"orig+more"
        } else {
            b"+more"
        };
        assert_eq!(s.read(other), want, "{other}");
        assert!(!s.exists("f"));
        std::fs::remove_file(root.join(other)).unwrap();
    }
    // Replaced by a rename rather than unlinked: the same.
    let (f, w) = create(&s.fs, ROOT, "f", RW);
    s.fs.write(w.fh, 0, b"orig", CALLER).unwrap();
    s.fs.release(w.fh).unwrap();
    std::fs::hard_link(root.join("f"), root.join("g")).unwrap();
    let h =
        s.fs.open(f.ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
            .unwrap();
    let (_, n) = create(&s.fs, ROOT, "new", RW);
    s.fs.release(n.fh).unwrap();
    s.fs.rename(ROOT, name("new"), ROOT, name("f"), 0).unwrap();
    s.fs.write(h.fh, 0, b"+more", CALLER).unwrap();
    s.fs.release(h.fh).unwrap();
    assert_eq!(s.read("g"), b"orig+more");
    assert_eq!(s.read("f"), b"");
}

/// A file read through the page cache grows elsewhere: before the kernel is shown the longer
/// size, it drops its pages from the one the shorter size ended in (cached cut with zeros
/// there, and read as such in the moment between the kernel setting the size and dropping its
/// pages), and only those; once per growth (dropping pages makes the kernel discard the reply
/// under way, which must not happen at every `stat`), not from a page boundary, and not
/// without such readers.
#[test]
fn a_longer_size_is_shown_beside_cached_readers_only_once_their_last_page_is_dropped() {
    #[derive(Default)]
    struct Pages(Mutex<Vec<String>>);
    impl KernelCache for Arc<Pages> {
        fn attributes_changed(&self, _: Ino) {}
        fn data_changed(&self, _: Ino) {}
        fn entry_changed(&self, _: Ino, _: &OsStr) {}
        fn data_changed_then(&self, pages: Vec<(Ino, u64)>, then: Box<dyn FnOnce() + Send>) {
            self.0.lock().unwrap().push(format!("drop {pages:?}"));
            then()
        }
    }
    for s in every_store() {
        let told = Arc::new(Pages::default());
        s.fs.set_kernel_cache(Box::new(told.clone()));
        let show = |ino, size| {
            let told2 = told.clone();
            s.fs.show_then(
                &[(ino, size)],
                Box::new(move || told2.0.lock().unwrap().push(format!("reply {size}"))),
            );
            std::mem::take(&mut *told.0.lock().unwrap()).join(", ")
        };
        s.put("log", &[b'a'; 5000]);
        let ino = s.fs.lookup(ROOT, name("log")).unwrap().ino;
        assert_eq!(show(ino, 9000), "reply 9000", "no reader open");
        let r = s.fs.open(ino, libc::O_RDONLY, CALLER).unwrap();
        assert_eq!(show(ino, 5000), "reply 5000");
        s.put("log", &[b'a'; 9000]);
        s.store.forget(Path::new("log"), false);
        let size = s.fs.getattr(ino, None).unwrap().size;
        assert_eq!(size, 9000);
        assert_eq!(show(ino, size), format!("drop [({ino}, 4096)], reply 9000"));
        assert_eq!(show(ino, size), "reply 9000", "once");
        assert_eq!(
            show(ino, 12288),
            format!("drop [({ino}, 8192)], reply 12288")
        );
        assert_eq!(show(ino, 13000), "reply 13000", "from a page boundary");
        s.fs.release(r.fh).unwrap();
        assert_eq!(show(ino, 20000), "reply 20000", "no reader open");
    }
}

/// A kernel cache that is told nothing (these tests look at the store).
struct NoKernel;

impl KernelCache for NoKernel {
    fn attributes_changed(&self, _: Ino) {}
    fn data_changed(&self, _: Ino) {}
    fn entry_changed(&self, _: Ino, _: &OsStr) {}
    fn data_changed_then(&self, _: Vec<(Ino, u64)>, then: Box<dyn FnOnce() + Send>) {
        then()
    }
}

/// A move heard late, after this mount made a new file at the old name (a lock file taken
/// again once the other mount renamed it into place): the new file is not the one that
/// moved, and stays under its own name (it followed the move, and was committed over the
/// target, then the empty file left at its name was renamed there: the target emptied).
#[test]
fn a_move_heard_late_does_not_carry_off_a_new_file_of_the_old_name() {
    use crate::space::SpaceWatcher;
    // An `O_EXCL` create (a lock file) and a plain one (a save's temporary file; on S3 it is
    // made only by its first commit).
    let cases = BACKENDS.into_iter().flat_map(|b| {
        [libc::O_EXCL, libc::O_TRUNC]
            .into_iter()
            .flat_map(move |f| [(b, f, false), (b, f, true)])
    });
    for (backend, flag, abandon) in cases {
        let s = full_on(backend);
        s.fs.set_kernel_cache(Box::new(NoKernel));
        // The other mount's save: `t.lock` written, then renamed to `t`.
        s.put("t.lock", b"other");
        s.store
            .rename(
                Path::new("t.lock"),
                Path::new("t"),
                crate::store::RenameMode::Replace,
            )
            .unwrap();
        // This mount takes the lock again before it hears of the move.
        let (_, h) = create(&s.fs, ROOT, "t.lock", libc::O_WRONLY | flag);
        s.fs.write(h.fh, 0, b"mine", CALLER).unwrap();
        // As the space does for a change heard from elsewhere: the store drops what it
        // remembers of both names first (on S3, also that this host made `t.lock` and has
        // not committed it yet).
        for p in ["t.lock", "t"] {
            s.store.forget(Path::new(p), false);
        }
        s.fs.changed_elsewhere(
            &Changed::FileMoved {
                from: "t.lock".into(),
                to: "t".into(),
                size: 5,
            },
            crate::space::Made::Elsewhere,
        );
        s.fs.release(h.fh).unwrap();
        if abandon {
            // A save given up: what it wrote never reaches `t`.
            s.fs.unlink(ROOT, name("t.lock")).unwrap();
            assert_eq!(s.read("t"), b"other", "{backend:?}");
        } else {
            s.fs.rename(ROOT, name("t.lock"), ROOT, name("t"), 0)
                .unwrap();
            assert_eq!(s.read("t"), b"mine", "{backend:?}");
        }
        assert!(!s.exists("t.lock"), "{backend:?}");
    }
}

/// An exchange of two names heard late, after this mount removed one of them and made it
/// anew: the new file stays under its own name; the other name shows what the exchange put
/// there.
#[test]
fn an_exchange_heard_late_does_not_carry_off_a_new_file_of_either_name() {
    use crate::space::SpaceWatcher;
    for backend in BACKENDS {
        let s = full_on(backend);
        s.fs.set_kernel_cache(Box::new(NoKernel));
        s.put("xa", b"A0");
        s.put("xb", b"B0");
        for n in ["xa", "xb"] {
            s.fs.lookup(ROOT, name(n)).unwrap();
        }
        // Another process swaps them (where the store can).
        let swapped = s.store.rename(
            Path::new("xa"),
            Path::new("xb"),
            crate::store::RenameMode::Exchange,
        );
        if swapped.is_err() {
            continue;
        }
        // This mount, before it hears of it, replaces `xa`: removed, made anew, written.
        s.fs.unlink(ROOT, name("xa")).unwrap();
        let (_, h) = create(&s.fs, ROOT, "xa", libc::O_WRONLY | libc::O_EXCL);
        s.fs.write(h.fh, 0, b"NEW", CALLER).unwrap();
        for p in ["xa", "xb"] {
            s.store.forget(Path::new(p), true);
        }
        s.fs.changed_elsewhere(
            &Changed::Exchanged {
                a: "xa".into(),
                b: "xb".into(),
            },
            crate::space::Made::Elsewhere,
        );
        s.fs.release(h.fh).unwrap();
        assert_eq!(s.read("xa"), b"NEW", "{backend:?}");
        assert_eq!(s.read("xb"), b"A0", "{backend:?}");
    }
}

#[test]
fn seek_data_and_hole_follow_each_handles_view() {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    // Holes are the local disk's: an in-memory store has none to tell.
    let s = full_on(Backend::Local);
    // A committed file with one 4 KiB block of data at 4 MiB in 8 MiB.
    let root = s.root.as_ref().unwrap();
    let f = std::fs::File::create(root.join("sparse")).unwrap();
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

#[test]
fn times_set_through_a_descriptor_before_its_commit_stay() {
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"extracted", CALLER).unwrap();
        // `tar -x` / `cp -p`: futimens on the descriptor, then close.
        let then = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        let times = AttrChanges {
            attr: SetAttr {
                atime: Some(crate::store::TimeSpec::At(then)),
                mtime: Some(crate::store::TimeSpec::At(then)),
                ..Default::default()
            },
            ..Default::default()
        };
        let shown = s.fs.setattr(attr.ino, Some(w.fh), &times).unwrap();
        assert_eq!((shown.mtime, shown.size), (then, 9), "{:?}", s.root);
        s.fs.release(w.fh).unwrap();
        let committed = s.store.stat(Path::new("f")).unwrap();
        assert_eq!(committed.mtime, then, "the commit keeps them");
        assert_eq!(s.read("f"), b"extracted");
        // A write after them sets the time of the write, as on a local disk.
        let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
        s.fs.setattr(attr.ino, Some(w.fh), &times).unwrap();
        s.fs.write(w.fh, 0, b"E", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        assert!(s.store.stat(Path::new("f")).unwrap().mtime > then);
    }
}

#[test]
fn user_xattrs_survive_whole_commits_and_appends() {
    for s in every_store() {
        let (attr, w) = create(&s.fs, ROOT, "f", RW);
        s.fs.write(w.fh, 0, b"one", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let ino = attr.ino;
        if !s.store.capabilities().xattrs {
            // A store without extended attributes (S3) refuses them all.
            assert_eq!(
                s.fs.setxattr(ino, name("user.mime_type"), b"text/plain", 0),
                Err(Errno::EOPNOTSUPP)
            );
            assert_eq!(
                s.fs.getxattr(ino, name("user.mime_type")),
                Err(Errno::EOPNOTSUPP)
            );
            continue;
        }
        s.fs.setxattr(ino, name("user.mime_type"), b"text/plain", 0)
            .unwrap();
        // A whole rewrite (a new version) and an append (in place).
        let w = s.fs.open(ino, RW | libc::O_TRUNC, CALLER).unwrap();
        s.fs.write(w.fh, 0, b"two", CALLER).unwrap();
        s.fs.release(w.fh).unwrap();
        let a =
            s.fs.open(ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
                .unwrap();
        s.fs.write(a.fh, 0, b"+", CALLER).unwrap();
        s.fs.release(a.fh).unwrap();
        assert_eq!(s.read("f"), b"two+");
        assert_eq!(
            s.fs.getxattr(ino, name("user.mime_type")).unwrap(),
            b"text/plain"
        );
        assert_eq!(s.fs.listxattr(ino).unwrap(), b"user.mime_type\0");
        assert_eq!(
            s.fs.setxattr(ino, name("user.mime_type"), b"x", libc::XATTR_CREATE),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            s.fs.getxattr(ino, name("security.selinux")),
            Err(Errno::ENODATA)
        );
        assert_eq!(
            s.fs.setxattr(ino, name("trusted.a"), b"x", 0),
            Err(Errno::EPERM)
        );
        assert_eq!(
            s.fs.setxattr(ino, name("other.a"), b"x", 0),
            Err(Errno::EOPNOTSUPP)
        );
        s.fs.removexattr(ino, name("user.mime_type")).unwrap();
        assert_eq!(
            s.fs.getxattr(ino, name("user.mime_type")),
            Err(Errno::ENODATA)
        );
    }
}

#[test]
fn a_running_writers_output_is_published_only_after_a_while_and_only_if_sequential() {
    use std::time::{Duration, Instant};
    for s in every_store() {
        let later = || Instant::now() + handle::PUBLISH_EVERY + Duration::from_millis(1);
        // A log: opened with O_TRUNC, written at its end.
        let (attr, log) = create(&s.fs, ROOT, "log", libc::O_WRONLY | libc::O_TRUNC);
        s.fs.write(log.fh, 0, b"started\n", CALLER).unwrap();
        assert_eq!(s.fs.publish_streams(), 0, "not before a second has passed");
        assert_eq!(s.read("log"), b"");
        // A file being rewritten out of order, and a database's shared handle.
        let (_, other) = create(&s.fs, ROOT, "data", libc::O_WRONLY);
        s.fs.write(other.fh, 100, b"x", CALLER).unwrap();
        s.fs.write(other.fh, 0, b"y", CALLER).unwrap();
        let (_, db) = create(&s.fs, ROOT, "db", RW);
        s.fs.write(db.fh, 0, b"page", CALLER).unwrap();
        assert_eq!(s.fs.publish_streams_at(later()), 1, "only the log");
        assert_eq!(s.read("log"), b"started\n");
        assert_eq!(s.read("data"), b"");
        assert_eq!(s.read("db"), b"");
        // It goes on growing: the next bytes are published the same way, in place.
        s.fs.write(log.fh, 8, b"listening on :8080\n", CALLER)
            .unwrap();
        assert_eq!(s.fs.publish_streams_at(later()), 0, "at most once a second");
        let much_later = Instant::now() + handle::PUBLISH_EVERY * 3;
        assert_eq!(s.fs.publish_streams_at(much_later), 1);
        assert_eq!(s.read("log"), b"started\nlistening on :8080\n");
        assert_eq!(s.fs.getattr(attr.ino, None).unwrap().size, 27);
        for h in [log, other, db] {
            s.fs.release(h.fh).unwrap();
        }
        assert_eq!(s.read("data")[0], b'y');
    }
}

#[test]
fn large_directories_are_read_a_reply_at_a_time() {
    for s in every_store() {
        let c = Caller::default();
        for i in 0..1000 {
            s.fs.mknod(ROOT, name(&format!("f{i:04}")), libc::S_IFREG | 0o644, &c)
                .unwrap();
        }
        let fh = s.fs.opendir(ROOT).unwrap();
        // The kernel asks again from where each reply stopped.
        let (mut offset, mut names) = (0, Vec::new());
        loop {
            let mut got = 0;
            s.fs.readdir(fh, offset, |e| {
                if got == 37 {
                    return false; // the reply is full
                }
                got += 1;
                names.push(e.name.to_string_lossy().into_owned());
                offset = e.next;
                true
            })
            .unwrap();
            if got == 0 {
                break;
            }
        }
        assert_eq!(names.len(), 1002);
        assert_eq!(&names[..3], [".", "..", "f0000"]);
        assert_eq!(names[1001], "f0999");
        // With attributes: the same entries, each looked up once.
        let (mut offset, mut plus) = (0, 0);
        loop {
            let mut got = 0;
            s.fs.readdirplus(fh, offset, |e, a| {
                if got == 50 {
                    return false;
                }
                assert!(e.name == "." || e.name == ".." || a.size == 0);
                got += 1;
                plus += 1;
                offset = e.next;
                true
            })
            .unwrap();
            if got == 0 {
                break;
            }
        }
        assert_eq!(plus, 1002);
        s.fs.releasedir(fh);
    }
}

/// Reads open directory `fh` from `offset` to its end in replies of `per_reply` entries, as
/// the kernel does; the names, and what `between` is given after each reply (the names of
/// that reply).
fn read_dir(
    s: &Setup,
    fh: u64,
    per_reply: usize,
    mut between: impl FnMut(&[String]),
) -> Vec<String> {
    let (mut offset, mut names) = (0, Vec::new());
    loop {
        let mut reply = Vec::new();
        s.fs.readdir(fh, offset, |e| {
            if reply.len() == per_reply {
                return false;
            }
            reply.push(e.name.to_string_lossy().into_owned());
            offset = e.next;
            true
        })
        .unwrap();
        if reply.is_empty() {
            return names;
        }
        between(&reply);
        names.extend(reply);
    }
}

/// `.`, `..` and `f0000`.. `f{n-1}`.
fn dir_names(n: usize) -> Vec<String> {
    let mut names = vec![".".to_string(), "..".to_string()];
    names.extend((0..n).map(|i| format!("f{i:04}")));
    names
}

/// Many handles of one large directory hold one listing between them, not one each (a user
/// opening a directory of 100,000 entries a thousand times would take tens of GB).
#[test]
fn handles_of_one_directory_share_its_listing() {
    for s in every_store() {
        let c = Caller::default();
        for i in 0..1000 {
            s.fs.mknod(ROOT, name(&format!("f{i:04}")), libc::S_IFREG | 0o644, &c)
                .unwrap();
        }
        let first = s.fs.opendir(ROOT).unwrap();
        let one = s.fs.listings_held();
        assert!(one > 1000 * 5, "{one}");
        let fhs: Vec<u64> = (0..100).map(|_| s.fs.opendir(ROOT).unwrap()).collect();
        assert_eq!(s.fs.listings_held(), one, "one listing for 101 handles");
        let listing = s.fs.dir_listing(first).unwrap();
        for &fh in &fhs {
            assert!(Arc::ptr_eq(&s.fs.dir_listing(fh).unwrap(), &listing));
        }
        assert_eq!(Arc::strong_count(&listing), 102);
        drop(listing);
        // Each reads every entry once, whatever the others read.
        assert_eq!(read_dir(&s, fhs[7], 37, |_| {}), dir_names(1000));
        assert_eq!(read_dir(&s, first, 50, |_| {}), dir_names(1000));
        // Read again from 0: listed again, and the same, so still shared.
        assert_eq!(read_dir(&s, first, 50, |_| {}), dir_names(1000));
        assert_eq!(s.fs.listings_held(), one);
        for fh in fhs.into_iter().chain([first]) {
            s.fs.releasedir(fh);
        }
        assert_eq!(s.fs.listings_held(), 0);
    }
}

/// A handle reads the directory as it was at `opendir` (or at its last rewind), also when
/// other handles of it, opened after a change, hold another listing.
#[test]
fn a_handle_lists_the_directory_as_it_was_when_opened() {
    for s in every_store() {
        let c = Caller::default();
        for i in 0..300 {
            s.fs.mknod(ROOT, name(&format!("f{i:04}")), libc::S_IFREG | 0o644, &c)
                .unwrap();
        }
        let before = s.fs.opendir(ROOT).unwrap();
        let also_before = s.fs.opendir(ROOT).unwrap();
        let one = s.fs.listings_held();
        s.fs.mknod(ROOT, name("f0300"), libc::S_IFREG | 0o644, &c)
            .unwrap();
        s.fs.unlink(ROOT, name("f0000")).unwrap();
        let after = s.fs.opendir(ROOT).unwrap();
        assert!(s.fs.listings_held() > one, "two listings");
        let mut now = dir_names(301);
        now.remove(2);
        assert_eq!(read_dir(&s, after, 37, |_| {}), now);
        assert_eq!(read_dir(&s, before, 37, |_| {}), dir_names(300));
        // Rewound, it shows the directory as it is now, sharing the newer listing.
        assert_eq!(read_dir(&s, before, 37, |_| {}), now);
        assert!(Arc::ptr_eq(
            &s.fs.dir_listing(before).unwrap(),
            &s.fs.dir_listing(after).unwrap()
        ));
        s.fs.releasedir(also_before);
        assert_eq!(s.fs.listings_held(), one, "the old listing is freed");
        for fh in [before, after] {
            s.fs.releasedir(fh);
        }
        assert_eq!(s.fs.listings_held(), 0);
    }
}

/// Past the budget for listings, a handle holds a window of entries at a time, and still reads
/// each entry once: also while the entries read are removed (`rm -rf`) and others are created.
#[test]
fn listings_over_the_budget_are_read_a_window_at_a_time() {
    for s in every_store() {
        let c = Caller::default();
        let n = dirs::WINDOW * 2 + 100;
        for i in 0..n {
            s.fs.mknod(ROOT, name(&format!("f{i:04}")), libc::S_IFREG | 0o644, &c)
                .unwrap();
        }
        let shared = s.fs.opendir(ROOT).unwrap();
        let held = s.fs.listings_held();
        s.fs.set_listings_budget(held + 10);
        // Another directory does not fit beside it.
        s.fs.mkdir(ROOT, name("d"), 0o755, &c).unwrap();
        let d = s.fs.lookup(ROOT, name("d")).unwrap().ino;
        let small = s.fs.opendir(d).unwrap();
        assert!(s.fs.dir_listing(small).is_none());
        s.fs.releasedir(small);
        s.fs.releasedir(shared);
        s.fs.set_listings_budget(0);
        let mut all = dir_names(n);
        all.insert(2, "d".into());
        let fh = s.fs.opendir(ROOT).unwrap();
        assert!(s.fs.dir_listing(fh).is_none());
        assert_eq!(s.fs.listings_held(), 0);
        assert_eq!(read_dir(&s, fh, 37, |_| {}), all);
        assert_eq!(read_dir(&s, fh, 200, |_| {}), all);
        // `rm -rf`: each reply's entries are removed before the next is asked for; new entries
        // before the place read to do not show, those after it may.
        let mut created = 0;
        let names = read_dir(&s, fh, 37, |reply| {
            for e in reply.iter().filter(|e| e.starts_with('f')) {
                s.fs.unlink(ROOT, name(e)).unwrap();
                if created < 50 {
                    s.fs.mknod(
                        ROOT,
                        name(&format!("a{created}")),
                        libc::S_IFREG | 0o644,
                        &c,
                    )
                    .unwrap();
                    created += 1;
                }
            }
        });
        assert_eq!(
            names, all,
            "every entry once, none created before the place read"
        );
        assert_eq!(s.fs.listings_held(), 0);
        s.fs.releasedir(fh);
    }
}

/// Mounts sharing a count of listings (a daemon's) share the budget: listings held through
/// one leave less for the others, and are given back when released.
#[test]
fn mounts_sharing_a_count_share_the_listings_budget() {
    let held = Arc::new(AtomicUsize::new(0));
    let mount = || {
        setup(FsOptions {
            links_anywhere: true,
            listings_held: Some(held.clone()),
            ..Default::default()
        })
    };
    let (a, b) = (mount(), mount());
    let c = Caller::default();
    for s in [&a, &b] {
        for i in 0..300 {
            s.fs.mknod(ROOT, name(&format!("f{i:04}")), libc::S_IFREG | 0o644, &c)
                .unwrap();
        }
    }
    let in_a = a.fs.opendir(ROOT).unwrap();
    let one = held.load(Ordering::Relaxed);
    assert!(one > 0);
    assert_eq!(b.fs.listings_held(), one, "b counts a's listing");
    // Room for one listing of the two in all: b's does not fit beside a's.
    b.fs.set_listings_budget(one + one / 2);
    let in_b = b.fs.opendir(ROOT).unwrap();
    assert!(b.fs.dir_listing(in_b).is_none(), "b holds a window");
    assert_eq!(read_dir(&b, in_b, 37, |_| {}), dir_names(300));
    b.fs.releasedir(in_b);
    a.fs.releasedir(in_a);
    assert_eq!(held.load(Ordering::Relaxed), 0);
    let in_b = b.fs.opendir(ROOT).unwrap();
    assert!(
        b.fs.dir_listing(in_b).is_some(),
        "it fits once a's is released"
    );
    b.fs.releasedir(in_b);
}

/// Takes a lock through `fh` for `owner` without waiting; the answer.
/// A process that releases its lock before closing (`lockf(F_ULOCK)`, then `close`): what it
/// wrote is committed at the unlock, so the next holder reads it (a counter incremented under
/// the lock by several processes loses no increment).
#[test]
fn an_unlock_commits_what_the_holder_wrote() {
    for s in every_store() {
        s.put("count", b"0");
        let ino = s.fs.lookup(ROOT, name("count")).unwrap().ino;
        let a = s.fs.open(ino, RW, CALLER).unwrap();
        setlk(&s, a.fh, 7, libc::F_WRLCK).unwrap();
        s.fs.write(a.fh, 0, b"1", CALLER).unwrap();
        assert_eq!(s.read("count"), b"0", "not committed while locked");
        let b = s.fs.open(ino, libc::O_RDONLY, CALLER).unwrap();
        setlk(&s, a.fh, 7, libc::F_UNLCK).unwrap();
        assert_eq!(s.read("count"), b"1", "committed at the unlock");
        // The next holder, with a handle opened before, reads it.
        setlk(&s, b.fh, 8, libc::F_RDLCK).unwrap();
        assert_eq!(s.fs.read(b.fh, 0, 10).unwrap(), b"1");
        setlk(&s, b.fh, 8, libc::F_UNLCK).unwrap();
        s.fs.release(b.fh).unwrap();
        s.fs.release(a.fh).unwrap();
        assert_eq!(s.read("count"), b"1");
    }
}

/// A read-write open joins the shared handle with the version it found; if a member
/// committed after that (the open asked the store before the commit, joined after), the
/// handle keeps its newer base rather than going back to the version found.
#[test]
fn a_read_write_open_never_takes_the_shared_handle_back_to_an_older_version() {
    for s in every_store() {
        s.put("count", b"0");
        let ino = s.fs.lookup(ROOT, name("count")).unwrap().ino;
        let a = s.fs.open(ino, libc::O_RDWR, CALLER).unwrap();
        // Another open asks the store now...
        let found = std::time::Instant::now();
        let stale = s.store.open(Path::new("count")).unwrap();
        // ...a member commits...
        s.fs.write(a.fh, 0, b"1", CALLER).unwrap();
        s.fs.flush(a.fh, CALLER, None).unwrap();
        assert_eq!(s.read("count"), b"1");
        // ...and the open joins.
        let shared = s.fs.file(a.fh).unwrap();
        let b = s.fs.join(999, shared, (stale, found), CALLER);
        assert_eq!(
            s.fs.read(b.fh, 0, 10).unwrap(),
            b"1",
            "not back to the old version"
        );
        // (`b` is a name of the handle only: the open that would have made it counts it.)
        write_lock(&s.fs.files).remove(&b.fh);
        s.fs.release(a.fh).unwrap();
    }
}

fn setlk(s: &Setup, fh: u64, owner: u64, typ: i32) -> FsResult<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let reply = Box::new(move |r| tx.send(r).unwrap());
    s.fs.setlk(fh, owner, owner as u32, (0, u64::MAX), typ, false, reply);
    rx.recv().unwrap()
}

#[test]
fn taking_a_lock_moves_a_read_only_handle_on_to_the_latest_version() {
    for s in every_store() {
        s.put("db", b"one");
        let ino = s.fs.lookup(ROOT, name("db")).unwrap().ino;
        let r = s.fs.open(ino, libc::O_RDONLY, CALLER).unwrap();
        s.put("db", b"two!"); // another process or host commits
        assert_eq!(s.fs.read(r.fh, 0, 10).unwrap(), b"one", "a plain reader");
        setlk(&s, r.fh, 7, libc::F_RDLCK).unwrap();
        assert_eq!(s.fs.read(r.fh, 0, 10).unwrap(), b"two!");
        // Another owner's write lock conflicts; at the holder's close it goes.
        let w = s.fs.open(ino, libc::O_RDWR, CALLER).unwrap();
        assert_eq!(setlk(&s, w.fh, 8, libc::F_WRLCK), Err(Errno(libc::EAGAIN)));
        s.fs.flush(r.fh, CALLER, Some(7)).unwrap();
        setlk(&s, w.fh, 8, libc::F_WRLCK).unwrap();
        // A lock with an unknown type is refused.
        assert_eq!(setlk(&s, r.fh, 7, 99), Err(Errno::EINVAL));
    }
}

#[test]
fn a_plain_reader_through_the_page_cache_keeps_a_locking_handle_where_it_is() {
    for s in every_store() {
        s.put("f", b"one");
        let ino = s.fs.lookup(ROOT, name("f")).unwrap().ino;
        let plain = s.fs.open(ino, libc::O_RDONLY, CALLER).unwrap();
        let locking = s.fs.open(ino, libc::O_RDONLY, CALLER).unwrap();
        assert!(
            !plain.direct_io && !locking.direct_io,
            "both read through the page cache"
        );
        s.put("f", b"two!");
        setlk(&s, locking.fh, 7, libc::F_RDLCK).unwrap();
        // Moving would drop the pages the plain reader reads its version from.
        assert_eq!(s.fs.read(locking.fh, 0, 10).unwrap(), b"one");
        s.fs.release(plain.fh).unwrap();
        setlk(&s, locking.fh, 7, libc::F_RDLCK).unwrap();
        assert_eq!(s.fs.read(locking.fh, 0, 10).unwrap(), b"two!");
        assert_eq!(s.fs.read(plain.fh, 0, 10), Err(Errno::EBADF));
    }
}

/// New entries in a set-group-ID directory take its group, whoever makes them, and new
/// directories the bit too; elsewhere they take the caller's group.
#[test]
fn new_entries_in_a_set_group_id_directory_take_its_group() {
    for backend in BACKENDS {
        let s = setup_on(
            backend,
            FsOptions {
                owner_from_caller: true,
                ..Default::default()
            },
            None,
        );
        let c = Caller {
            uid: 1000,
            gid: 1000,
            pid: 0,
        };
        let shared = s.fs.mkdir(ROOT, name("shared"), 0o775, &c).unwrap();
        let plain = s.fs.mkdir(ROOT, name("plain"), 0o775, &c).unwrap();
        assert_eq!((shared.gid, plain.gid), (1000, 1000), "{backend:?}");
        let to_group = AttrChanges {
            attr: SetAttr {
                perm: Some(0o2775),
                gid: Some(4242),
                ..Default::default()
            },
            ..Default::default()
        };
        s.fs.setattr(shared.ino, None, &to_group).unwrap();
        let sub = s.fs.mkdir(shared.ino, name("sub"), 0o755, &c).unwrap();
        let (file, opened) =
            s.fs.create(shared.ino, name("f"), 0o644, libc::O_WRONLY, &c)
                .unwrap();
        s.fs.release(opened.fh).unwrap();
        let (excl, opened) =
            s.fs.create(sub.ino, name("e"), 0o600, libc::O_WRONLY | libc::O_EXCL, &c)
                .unwrap();
        s.fs.release(opened.fh).unwrap();
        let link =
            s.fs.symlink(shared.ino, name("l"), Path::new("f"), &c)
                .unwrap();
        let fifo =
            s.fs.mknod(shared.ino, name("p"), libc::S_IFIFO | 0o644, &c)
                .unwrap();
        let deeper = s.fs.mkdir(sub.ino, name("deeper"), 0o700, &c).unwrap();
        let other = s.fs.mkdir(plain.ino, name("d"), 0o755, &c).unwrap();
        for (what, attr) in [
            ("sub", &sub),
            ("f", &file),
            ("sub/e", &excl),
            ("l", &link),
            ("p", &fifo),
            ("sub/deeper", &deeper),
        ] {
            assert_eq!((attr.uid, attr.gid), (1000, 4242), "{backend:?} {what}");
        }
        assert_eq!(other.gid, 1000, "{backend:?}");
        assert_eq!(
            sub.perm, 0o2755,
            "{backend:?}: the bit goes on to directories"
        );
        assert_eq!(deeper.perm, 0o2700, "{backend:?}");
        assert_eq!((file.perm, excl.perm), (0o644, 0o600), "{backend:?}");
        assert_eq!(other.perm, 0o755, "{backend:?}");
        // What the store keeps, not only what the mount said.
        let kept = s.store.stat(Path::new("shared/sub/deeper")).unwrap();
        assert_eq!((kept.gid, kept.perm), (4242, 0o2700), "{backend:?}");
        assert_eq!(s.store.stat(Path::new("shared/f")).unwrap().gid, 4242);
    }
}
