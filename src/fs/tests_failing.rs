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
    setup_on(MemStore::new())
}

fn setup_on(mem: MemStore) -> Setup {
    let store = Arc::new(FailingStore::new(mem));
    let fs = Arc::new(fs_over(store.clone()));
    Setup { store, fs }
}

/// A mount of room `r` stored in `store`, hard links allowed anywhere.
fn fs_over(store: Arc<dyn Store>) -> Fs {
    let id = crate::space::SpaceId::new(crate::space::SpaceKind::Room, "r").unwrap();
    let space = Arc::new(Space::new(id, store, None));
    Fs::new(
        space,
        FsOptions {
            links_anywhere: true,
            ..Default::default()
        },
    )
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

fn set(perm: Option<u16>, owner: Option<(u32, u32)>, mtime: Option<SystemTime>) -> AttrChanges {
    AttrChanges {
        attr: SetAttr {
            perm,
            uid: owner.map(|o| o.0),
            gid: owner.map(|o| o.1),
            mtime: mtime.map(crate::store::TimeSpec::At),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn attributes_set_while_a_file_is_written_go_with_its_commit_where_the_store_takes_them() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let s = setup_on(MemStore::new().with_attrs_at_commit());
    let c = Caller::default();
    // As `tar -x` and `cp -a` do: write, then owner, mode and times through the descriptor.
    let (attr, h) = s.fs.create(ROOT, name("f"), 0o600, RW, &c).unwrap();
    s.fs.write(h.fh, 0, b"bytes", CALLER).unwrap();
    s.fs.setattr(attr.ino, Some(h.fh), &set(None, Some((7, 8)), None))
        .unwrap();
    let shown =
        s.fs.setattr(attr.ino, Some(h.fh), &set(Some(0o751), None, None))
            .unwrap();
    assert_eq!(
        (shown.perm, shown.uid, shown.gid),
        (0o751, 7, 8),
        "shown at once"
    );
    s.fs.setattr(attr.ino, Some(h.fh), &set(None, None, Some(t)))
        .unwrap();
    assert_eq!(
        s.store.calls(Op::SetAttr),
        0,
        "nothing set in the store yet"
    );
    let seen = s.fs.getattr(attr.ino, None).unwrap();
    assert_eq!(
        (seen.perm, seen.uid, seen.gid, seen.mtime),
        (0o751, 7, 8, t)
    );
    let committed = s.store.inner().stat(Path::new("f")).unwrap();
    assert_eq!(
        (committed.perm, committed.size),
        (0o600, 0),
        "others see the file as created"
    );
    s.fs.release(h.fh).unwrap();
    let committed = s.store.inner().stat(Path::new("f")).unwrap();
    assert_eq!(
        (
            committed.perm,
            committed.uid,
            committed.gid,
            committed.mtime,
            committed.size
        ),
        (0o751, 7, 8, t, 5),
        "the commit set them, with the bytes"
    );
    assert_eq!(s.store.calls(Op::SetAttr), 0, "in the commit, not besides");
    let seen = s.fs.getattr(attr.ino, None).unwrap();
    assert_eq!((seen.perm, seen.uid, seen.mtime), (0o751, 7, t));

    // A write by an unprivileged process drops set-IDs, held ones too.
    let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
    s.fs.write(w.fh, 0, b"z", CALLER).unwrap();
    s.fs.setattr(attr.ino, None, &set(Some(0o6751), None, None))
        .unwrap();
    assert_eq!(s.fs.getattr(attr.ino, None).unwrap().perm, 0o6751);
    s.fs.drop_set_ids(attr.ino).unwrap();
    assert_eq!(s.fs.getattr(attr.ino, None).unwrap().perm, 0o751);
    s.fs.release(w.fh).unwrap();
    assert_eq!(s.store.inner().stat(Path::new("f")).unwrap().perm, 0o751);
    assert_eq!(s.store.calls(Op::SetAttr), 0);

    // A file nobody writes: set at once.
    s.fs.setattr(attr.ino, None, &set(Some(0o640), None, None))
        .unwrap();
    assert_eq!(s.store.calls(Op::SetAttr), 1);
    assert_eq!(s.store.inner().stat(Path::new("f")).unwrap().perm, 0o640);

    // Two handles with changes: which commits last is not known, so at once too.
    let a = s.fs.open(attr.ino, RW, CALLER).unwrap();
    let b = s.fs.open(attr.ino, RW, CALLER).unwrap();
    s.fs.write(a.fh, 0, b"A", CALLER).unwrap();
    s.fs.write(b.fh, 1, b"B", CALLER).unwrap();
    s.fs.setattr(attr.ino, None, &set(Some(0o600), None, None))
        .unwrap();
    assert_eq!(s.store.calls(Op::SetAttr), 2);
    s.fs.release(a.fh).unwrap();
    s.fs.release(b.fh).unwrap();
    assert_eq!(s.store.inner().stat(Path::new("f")).unwrap().perm, 0o600);

    // A write after the times gives way to the write's own time, as on a local disk.
    let w = s.fs.open(attr.ino, RW, CALLER).unwrap();
    s.fs.write(w.fh, 0, b"x", CALLER).unwrap();
    s.fs.setattr(attr.ino, None, &set(Some(0o644), None, Some(t)))
        .unwrap();
    s.fs.write(w.fh, 1, b"y", CALLER).unwrap();
    s.fs.release(w.fh).unwrap();
    let committed = s.store.inner().stat(Path::new("f")).unwrap();
    assert_eq!(committed.perm, 0o644);
    assert!(committed.mtime > t, "the write came after the times");
    assert_eq!(s.store.calls(Op::SetAttr), 2);
}

#[test]
fn attributes_held_for_a_commit_that_fails_stay_unset_with_the_changes() {
    let s = setup_on(MemStore::new().with_attrs_at_commit());
    let ino = s.file("f", b"old");
    let h = s.fs.open(ino, RW, CALLER).unwrap();
    s.fs.write(h.fh, 0, b"new", CALLER).unwrap();
    s.fs.setattr(ino, None, &set(Some(0o700), None, None))
        .unwrap();
    s.store.fail(Op::Commit, libc::EIO).plan();
    assert_eq!(s.fs.flush(h.fh, CALLER, None).unwrap_err(), Errno::EIO);
    s.store.heal();
    // Not the last close: the changes stay the writer's, and so do the attributes.
    assert_eq!(s.store.inner().stat(Path::new("f")).unwrap().perm, 0o644);
    assert_eq!(s.fs.getattr(ino, None).unwrap().perm, 0o700);
    s.fs.release(h.fh).unwrap();
    let committed = s.store.inner().stat(Path::new("f")).unwrap();
    assert_eq!((committed.perm, s.committed("f")), (0o700, b"new".to_vec()));
}

/// An open file whose last known name is removed while it has another name this mount never
/// looked up: the search for that name lists the space, and another process renames a file
/// over it right after the listing. The name, holding another file now, is not taken: the
/// writes of the removed name's file are not committed over the file moved there.
#[test]
fn a_name_found_for_a_removed_names_file_is_asked_about_again_before_it_is_taken() {
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(crate::store::local::test_store(
        data.path(),
    )));
    let fs = fs_over(store.clone());
    // Behind the mount: `x/a` and `d/b` one file, `e/v` another.
    let root = data.path().join("rooms/r");
    for d in ["x", "d", "e"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("x/a"), b"OLD").unwrap();
    std::fs::hard_link(root.join("x/a"), root.join("d/b")).unwrap();
    std::fs::write(root.join("e/v"), b"VVVV").unwrap();
    let x = fs.lookup(ROOT, name("x")).unwrap().ino;
    let a = fs.lookup(x, name("a")).unwrap();
    let h = fs.open(a.ino, RW, CALLER).unwrap();
    fs.write(h.fh, 0, b"NEWDATA", CALLER).unwrap();
    // Right after `d` is listed (the search's listing has `d/b` as the file), `mv e/v d/b`.
    let moved = root.clone();
    store.after_list(move |dir| {
        if dir == Path::new("d") && moved.join("e/v").exists() {
            std::fs::rename(moved.join("e/v"), moved.join("d/b")).unwrap();
        }
    });
    fs.unlink(x, name("a")).unwrap();
    fs.release(h.fh).unwrap();
    assert_eq!(std::fs::read(root.join("d/b")).unwrap(), b"VVVV");
}
