//! The core against a failing backend: every backend failure reaches the program as the
//! documented errno, a failed commit leaves the previous version and keeps the writer's
//! changes for another try, and a slow backend holds up only the operations that wait for it.

use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::store::failing::{FailingStore, Op};
use crate::store::mem::MemStore;

const RW: i32 = libc::O_RDWR;
const CALLER: Tid = 0;

struct Setup {
    store: Arc<FailingStore<MemStore>>,
    fs: Arc<Fs>,
}

fn setup() -> Setup {
    let store = Arc::new(FailingStore::new(MemStore::new()));
    let id = crate::space::SpaceId::new(crate::space::SpaceKind::Room, "r").unwrap();
    let space = Arc::new(Space::new(id, store.clone(), None));
    let fs = Fs::new(
        space,
        FsOptions {
            links_anywhere: true,
            ..Default::default()
        },
    );
    Setup {
        store,
        fs: Arc::new(fs),
    }
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

impl Setup {
    /// A committed file `n` holding `bytes`; its inode.
    fn file(&self, n: &str, bytes: &[u8]) -> Ino {
        let (attr, h) = self
            .fs
            .create(ROOT, name(n), 0o644, RW, &Caller::default())
            .unwrap();
        self.fs.write(h.fh, 0, bytes, CALLER).unwrap();
        self.fs.release(h.fh).unwrap();
        attr.ino
    }

    /// What the store has committed at `n`.
    fn committed(&self, n: &str) -> Vec<u8> {
        let content = self.store.inner().open(Path::new(n)).unwrap();
        let mut buf = vec![0u8; content.meta().size as usize];
        let got = content.read_at(&mut buf, 0).unwrap();
        buf.truncate(got);
        buf
    }
}

#[test]
fn a_failed_commit_is_eio_at_close_and_keeps_the_previous_version() {
    let s = setup();
    let ino = s.file("f", b"v1");
    let h = s.fs.open(ino, RW, CALLER).unwrap();
    s.fs.write(h.fh, 0, b"v2 longer", CALLER).unwrap();
    s.store.fail(Op::Commit, libc::EIO).times(1).plan();
    assert_eq!(s.fs.flush(h.fh, CALLER, None), Err(Errno::EIO));
    assert_eq!(s.committed("f"), b"v1", "the previous version stays");
    // The writer still has its changes: the next close commits them.
    assert_eq!(s.fs.read(h.fh, 0, 100).unwrap(), b"v2 longer");
    s.fs.flush(h.fh, CALLER, None).unwrap();
    assert_eq!(s.committed("f"), b"v2 longer");
    s.fs.release(h.fh).unwrap();

    // Failing at the last release: the changes are dropped, the previous version stays,
    // and a later open sees exactly that.
    let h = s.fs.open(ino, RW, CALLER).unwrap();
    s.fs.write(h.fh, 0, b"v3", CALLER).unwrap();
    s.store.fail(Op::Commit, libc::EIO).transient().plan();
    assert_eq!(s.fs.release(h.fh), Err(Errno::EIO));
    s.store.heal();
    assert_eq!(s.committed("f"), b"v2 longer");
    let r = s.fs.open(ino, libc::O_RDONLY, CALLER).unwrap();
    assert_eq!(s.fs.read(r.fh, 0, 100).unwrap(), b"v2 longer");
    s.fs.release(r.fh).unwrap();
}

#[test]
fn failed_appends_keep_their_bytes_for_the_next_close() {
    let s = setup();
    let ino = s.file("log", b"one\n");
    let a =
        s.fs.open(ino, libc::O_WRONLY | libc::O_APPEND, CALLER)
            .unwrap();
    s.fs.write(a.fh, 0, b"two\n", CALLER).unwrap();
    s.store.fail(Op::Commit, libc::EIO).times(1).plan();
    assert_eq!(s.fs.flush(a.fh, CALLER, None), Err(Errno::EIO));
    assert_eq!(s.committed("log"), b"one\n");
    s.fs.release(a.fh).unwrap();
    assert_eq!(s.committed("log"), b"one\ntwo\n");
}

#[test]
fn a_full_staging_area_is_enospc_and_nothing_half_written_is_committed() {
    let s = setup();
    let ino = s.file("f", b"before");
    // No room for a working copy at all.
    s.store.fail(Op::WorkingCopy, libc::ENOSPC).times(1).plan();
    let h = s.fs.open(ino, RW, CALLER).unwrap();
    assert_eq!(s.fs.write(h.fh, 0, b"x", CALLER), Err(Errno::ENOSPC));
    s.fs.release(h.fh).unwrap();
    assert_eq!(s.committed("f"), b"before");

    // The disk fills in the middle of a write: the copy is spoiled, its commit refused.
    let h = s.fs.open(ino, RW, CALLER).unwrap();
    s.fs.write(h.fh, 0, b"AAAAAAAAAA", CALLER).unwrap();
    s.store.fail(Op::CopyWrite, libc::ENOSPC).times(1).plan();
    assert_eq!(s.fs.write(h.fh, 10, b"BBBB", CALLER), Err(Errno::ENOSPC));
    assert_eq!(s.fs.flush(h.fh, CALLER, None), Err(Errno::ENOSPC));
    assert_eq!(s.committed("f"), b"before", "nothing half written goes in");
    // Written again (as a database rolling back does), it commits.
    s.fs.write(h.fh, 10, b"BBBB", CALLER).unwrap();
    s.fs.release(h.fh).unwrap();
    assert_eq!(s.committed("f"), b"AAAAAAAAAABBBB");
}

#[test]
fn every_other_backend_failure_is_its_errno_and_changes_nothing() {
    let s = setup();
    let ino = s.file("f", b"data");
    let c = Caller::default();
    s.fs.mkdir(ROOT, name("d"), 0o755, &c).unwrap();
    // Look-ups and attributes.
    s.store.fail(Op::Stat, libc::EIO).times(1).plan();
    assert_eq!(s.fs.lookup(ROOT, name("f")).unwrap_err(), Errno::EIO);
    s.store.fail(Op::Stat, libc::EIO).times(1).plan();
    assert_eq!(s.fs.getattr(ino, None).unwrap_err(), Errno::EIO);
    // Listings.
    s.store.fail(Op::List, libc::EIO).times(1).plan();
    assert_eq!(s.fs.opendir(ROOT).unwrap_err(), Errno::EIO);
    // Opens.
    s.store.fail(Op::Open, libc::EIO).times(1).plan();
    assert_eq!(s.fs.open(ino, RW, CALLER).unwrap_err(), Errno::EIO);
    // Changes of names: refused, and the names stay as they were.
    for (op, errno) in [
        (Op::Unlink, libc::EIO),
        (Op::Rename, libc::EXDEV),
        (Op::Create, libc::ENOSPC),
        (Op::Mkdir, libc::EDQUOT),
        (Op::Rmdir, libc::EIO),
        (Op::SetAttr, libc::EPERM),
    ] {
        s.store.fail(op, errno).times(1).plan();
        let result = match op {
            Op::Unlink => s.fs.unlink(ROOT, name("f")),
            Op::Rename => s.fs.rename(ROOT, name("f"), ROOT, name("g"), 0),
            Op::Create => s.fs.create(ROOT, name("new"), 0o644, RW, &c).map(|_| ()),
            Op::Mkdir => s.fs.mkdir(ROOT, name("e"), 0o755, &c).map(|_| ()),
            Op::Rmdir => s.fs.rmdir(ROOT, name("d")),
            Op::SetAttr => {
                let chmod = AttrChanges {
                    attr: SetAttr {
                        perm: Some(0o600),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                s.fs.setattr(ino, None, &chmod).map(|_| ())
            }
            _ => unreachable!(),
        };
        assert_eq!(result, Err(Errno(errno)), "{op:?}");
    }
    assert_eq!(s.fs.lookup(ROOT, name("f")).unwrap().ino, ino);
    assert!(s.fs.lookup(ROOT, name("d")).is_ok());
    assert_eq!(s.fs.lookup(ROOT, name("g")).unwrap_err(), Errno::ENOENT);
    assert_eq!(s.fs.lookup(ROOT, name("new")).unwrap_err(), Errno::ENOENT);
    assert_eq!(s.committed("f"), b"data");
    assert_eq!(s.fs.getattr(ino, None).unwrap().perm, 0o644);
}

#[test]
fn a_slow_commit_holds_up_only_what_waits_for_that_name() {
    let s = setup();
    let c = Caller::default();
    s.fs.mkdir(ROOT, name("d"), 0o755, &c).unwrap();
    let d = s.fs.lookup(ROOT, name("d")).unwrap().ino;
    let (slow, h) = s.fs.create(d, name("slow"), 0o644, RW, &c).unwrap();
    s.fs.write(h.fh, 0, b"slowly", CALLER).unwrap();
    // The next commit takes long (an upload to a slow store).
    s.store
        .slow(Op::Commit, Duration::from_secs(2))
        .times(1)
        .plan();
    let (started_tx, started) = mpsc::channel();
    let committer = {
        let fs = s.fs.clone();
        std::thread::spawn(move || {
            started_tx.send(()).unwrap();
            fs.release(h.fh)
        })
    };
    started.recv().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // Meanwhile, everything else goes on: look-ups, listings, another file's whole life.
    let other = s.fs.create(ROOT, name("other"), 0o644, RW, &c).unwrap().1;
    s.fs.write(other.fh, 0, b"quick", CALLER).unwrap();
    s.fs.release(other.fh).unwrap();
    assert!(s.fs.lookup(d, name("slow")).is_ok());
    let dir = s.fs.opendir(d).unwrap();
    s.fs.releasedir(dir);
    s.fs.unlink(ROOT, name("other")).unwrap();
    assert!(
        !committer.is_finished(),
        "the slow commit was still under way while the rest went on"
    );
    // Renaming its directory waits for it, then moves the committed file: right after the
    // rename, the file under its new name is the committed one.
    s.fs.rename(ROOT, name("d"), ROOT, name("e"), 0).unwrap();
    assert_eq!(
        s.committed("e/slow"),
        b"slowly",
        "the rename waited for the commit"
    );
    committer.join().unwrap().unwrap();
    assert_eq!(s.fs.getattr(slow.ino, None).unwrap().size, 6);
}
