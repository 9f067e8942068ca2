//! A store that can be ended: the layer every open space's store is wrapped in
//! ([`crate::space::Space`]), so that a space deleted while something still holds it is done
//! with at once.
//!
//! A session is ended by deleting its space, after its mounts are unmounted; a mount that is
//! busy (an agent's shell in it, a file held open) is only detached, and goes on serving until
//! its last user lets go. Without this layer that mount kept working on the space: an agent
//! creating entries there as fast as it could kept the delete from ever finishing (`ENOTEMPTY`),
//! and once a new session took the same id, the old mount showed the new session's `.meta`
//! records, which are found by the session's id.
//!
//! Invariant: once [`Ending::end`] has returned, no request reaches the store beneath and none
//! is under way; every request answers `ENOENT`, as for a directory removed with all it held.
//! A request counts itself under way before it looks at the flag, and `end` sets the flag
//! before it looks at the count (both sequentially consistent), so each request is either
//! refused or waited for. Contents opened before (`Content`, `WorkingCopy`) are the caller's:
//! a reader of an open file reads on, as of a removed file, and its commit is refused.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{
    Capabilities, CommitRequest, Committed, Content, DirEntry, Kind, Meta, Owner, RenameMode,
    SetAttr, Store, StoreError, StoreResult, StoreStatfs, Usage, WorkingCopy, XattrMode,
};

/// How long [`Ending::end`] waits for requests under way (a store request that takes longer,
/// an S3 one retrying, is left to finish on its own; logged).
const DRAIN: Duration = Duration::from_secs(10);

/// `inner`, until it is ended (see the module docs).
pub struct Ending {
    inner: Arc<dyn Store>,
    ended: AtomicBool,
    under_way: AtomicUsize,
}

/// A request under way: counted until dropped.
struct UnderWay<'a>(&'a AtomicUsize);

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ending {
    pub fn new(inner: Arc<dyn Store>) -> Ending {
        Ending {
            inner,
            ended: AtomicBool::new(false),
            under_way: AtomicUsize::new(0),
        }
    }

    /// Ends the store: refuses every request from now on, and returns once the requests
    /// under way are done (or after [`DRAIN`]). Whether they were.
    pub fn end(&self) -> bool {
        self.ended.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while self.under_way.load(Ordering::SeqCst) > 0 {
            if start.elapsed() >= DRAIN {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// The store beneath for one request, unless ended.
    fn pass(&self) -> StoreResult<(UnderWay<'_>, &dyn Store)> {
        self.under_way.fetch_add(1, Ordering::SeqCst);
        let counted = UnderWay(&self.under_way);
        if self.ended.load(Ordering::SeqCst) {
            return Err(StoreError::errno(libc::ENOENT));
        }
        Ok((counted, self.inner.as_ref()))
    }
}

impl Store for Ending {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn stat(&self, path: &Path) -> StoreResult<Meta> {
        self.pass()?.1.stat(path)
    }

    fn list(&self, path: &Path) -> StoreResult<Vec<DirEntry>> {
        self.pass()?.1.list(path)
    }

    fn open(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        self.pass()?.1.open(path)
    }

    fn open_to_read(&self, path: &Path) -> StoreResult<Arc<dyn Content>> {
        self.pass()?.1.open_to_read(path)
    }

    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> StoreResult<Meta> {
        self.pass()?.1.create(path, perm, owner, exclusive)
    }

    fn create_held(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.pass()?.1.create_held(path, perm, owner)
    }

    fn working_copy(&self, path: &Path) -> StoreResult<Arc<dyn WorkingCopy>> {
        self.pass()?.1.working_copy(path)
    }

    fn commit(&self, req: CommitRequest<'_>) -> StoreResult<Committed> {
        self.pass()?.1.commit(req)
    }

    fn mknod(&self, path: &Path, kind: Kind, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.pass()?.1.mknod(path, kind, perm, owner)
    }

    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> StoreResult<Meta> {
        self.pass()?.1.mkdir(path, perm, owner)
    }

    fn rmdir(&self, path: &Path) -> StoreResult<()> {
        self.pass()?.1.rmdir(path)
    }

    fn unlink(&self, path: &Path) -> StoreResult<()> {
        self.pass()?.1.unlink(path)
    }

    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> StoreResult<()> {
        self.pass()?.1.rename(from, to, mode)
    }

    fn link(&self, from: &Path, to: &Path) -> StoreResult<Meta> {
        self.pass()?.1.link(from, to)
    }

    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> StoreResult<Meta> {
        self.pass()?.1.symlink(target, path, owner)
    }

    fn readlink(&self, path: &Path) -> StoreResult<PathBuf> {
        self.pass()?.1.readlink(path)
    }

    fn set_attr(&self, path: &Path, attr: &SetAttr) -> StoreResult<Meta> {
        self.pass()?.1.set_attr(path, attr)
    }

    fn sync(&self, path: &Path) -> StoreResult<()> {
        self.pass()?.1.sync(path)
    }

    fn statfs(&self) -> StoreResult<StoreStatfs> {
        self.pass()?.1.statfs()
    }

    fn usage(&self) -> StoreResult<Usage> {
        self.pass()?.1.usage()
    }

    fn get_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<Vec<u8>> {
        self.pass()?.1.get_xattr(path, name)
    }

    fn set_xattr(
        &self,
        path: &Path,
        name: &OsStr,
        value: &[u8],
        mode: XattrMode,
    ) -> StoreResult<()> {
        self.pass()?.1.set_xattr(path, name, value, mode)
    }

    fn list_xattr(&self, path: &Path) -> StoreResult<Vec<OsString>> {
        self.pass()?.1.list_xattr(path)
    }

    fn remove_xattr(&self, path: &Path, name: &OsStr) -> StoreResult<()> {
        self.pass()?.1.remove_xattr(path, name)
    }

    /// Drops what the store beneath remembers; nothing to refuse.
    fn forget(&self, path: &Path, tree: bool) {
        self.inner.forget(path, tree)
    }

    fn forget_removed(&self, path: &Path) {
        self.inner.forget_removed(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::failing::{FailingStore, Op};
    use crate::store::mem::MemStore;

    #[test]
    fn an_ended_store_refuses_everything_and_waits_for_what_was_under_way() {
        let slow = Arc::new(FailingStore::new(MemStore::new()));
        slow.mkdir(Path::new("d"), 0o755, Owner::default()).unwrap();
        // A request under way when the store is ended: `end` waits for it.
        slow.slow(Op::List, Duration::from_millis(200))
            .times(1)
            .plan();
        let ending = Arc::new(Ending::new(slow.clone()));
        let under_way = {
            let e = ending.clone();
            std::thread::spawn(move || e.list(Path::new("")).map(|l| l.len()))
        };
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        assert!(ending.end());
        assert!(
            start.elapsed() >= Duration::from_millis(100),
            "waited for it"
        );
        assert_eq!(under_way.join().unwrap().unwrap(), 1);
        assert!(ending.has_ended());
        for refused in [
            ending.stat(Path::new("d")).map(drop),
            ending.list(Path::new("")).map(drop),
            ending
                .mkdir(Path::new("e"), 0o755, Owner::default())
                .map(drop),
            ending
                .create(Path::new("f"), 0o644, Owner::default(), true)
                .map(drop),
            ending.usage().map(drop),
        ] {
            assert_eq!(refused.unwrap_err().raw_os_error(), libc::ENOENT);
        }
        assert!(
            slow.stat(Path::new("e")).is_err(),
            "nothing reached the store"
        );
        assert_eq!(slow.calls(Op::Mkdir), 1, "only the test's own");
    }
}
